"""The feature registry: definitions in `features` (the version in force) and `feature_versions`
(every version ever saved, so a training set built last month can be rebuilt with `name@3`).

A definition is compiled before it is saved (expressions by the segment language's compiler, SQL
features by `sql.check_sql` and a dry run), so a bad one is refused with its error and nothing is
written. Every change is a new version; saving the same definition again changes nothing.
"""

from __future__ import annotations

import difflib
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from sqlglot import exp

from refinery.features.compile import compile_expression
from refinery.features.definition import (
    Feature,
    check_entity,
    check_kind,
    check_name,
    parse_duration,
    window_text,
)
from refinery.features.errors import FeatureError, FeatureNotFound
from refinery.governance import audit
from refinery.governance.principal import Principal
from refinery.storage.engine import Engine

_FIELDS = "name, version, entity, kind, definition, time_window, ttl_seconds, value_type, owner, description, created_by, created_at"


def _cur(engine: Engine, cursor: Any) -> Any:
    return cursor if cursor is not None else engine.reader()


def _feature(row: tuple[Any, ...], updated: tuple[Any, Any] | None = None) -> Feature:
    f = Feature(str(row[0]), int(row[1]), str(row[2]), str(row[3]), str(row[4]), row[5], None if row[6] is None else int(row[6]),
                row[7], str(row[8]), row[9], str(row[10]), row[11])
    if updated is not None:
        f = Feature(**{**f.__dict__, "updated_by": updated[0], "updated_at": updated[1]})
    return f


def list_features(engine: Engine, *, cursor: Any = None) -> list[Feature]:
    rows = engine.fetch_all(f"SELECT {_FIELDS}, updated_by, updated_at FROM features WHERE deleted_at IS NULL ORDER BY name",  # noqa: S608 - constant text
                            cursor=_cur(engine, cursor))
    return [_feature(r[:12], (r[12], r[13])) for r in rows]


def get(engine: Engine, name: str, version: int | None = None, *, cursor: Any = None) -> Feature:
    """The live feature `name` (its version in force), or one version of it (also of a deleted feature)."""
    cur = _cur(engine, cursor)
    if version is None:
        rows = engine.fetch_all(f"SELECT {_FIELDS}, updated_by, updated_at FROM features WHERE name = ? AND deleted_at IS NULL",  # noqa: S608
                                [name], cursor=cur)
        if rows:
            return _feature(rows[0][:12], (rows[0][12], rows[0][13]))
        known = [f.name for f in list_features(engine, cursor=cur)]
        close = difflib.get_close_matches(name, known, n=1)
        raise FeatureNotFound(f"No feature {name!r}." + (f" Did you mean {close[0]!r}?" if close else ""),
                              fix=f"Use one of: {', '.join(known)}." if known else "Define one: refinery features create NAME EXPRESSION",
                              field="features")
    rows = engine.fetch_all(f"SELECT {_FIELDS} FROM feature_versions WHERE name = ? AND version = ?", [name, version], cursor=cur)  # noqa: S608
    if not rows:
        have = [str(r[0]) for r in engine.fetch_all("SELECT version FROM feature_versions WHERE name = ? ORDER BY version", [name], cursor=cur)]
        raise FeatureNotFound(f"Feature {name!r} has no version {version}.",
                              fix=f"Use one of its versions: {', '.join(have)}." if have else f"No feature {name!r} was ever saved.",
                              field="features")
    return _feature(rows[0])


def versions(engine: Engine, name: str, *, cursor: Any = None) -> list[Feature]:
    rows = engine.fetch_all(f"SELECT {_FIELDS} FROM feature_versions WHERE name = ? ORDER BY version", [name], cursor=_cur(engine, cursor))  # noqa: S608
    if not rows:
        get(engine, name, cursor=cursor)  # the not-found error, with suggestions
    return [_feature(r) for r in rows]


def resolve(engine: Engine, ref: str, *, cursor: Any = None) -> Feature:
    """`name` (the version in force) or `name@version`."""
    name, sep, version = ref.partition("@")
    if sep and not version.isdigit():
        raise FeatureError(f"{ref!r} is not a feature reference.", fix="Write NAME or NAME@VERSION, e.g. orders_90d@2.", field="features")
    return get(engine, name, int(version) if sep else None, cursor=cursor)


def validate(engine: Engine, kind: str, definition: str, window: str | None, *, cursor: Any = None) -> str:
    """Compile a definition against this store; its value type. Raises the compiler's errors."""
    check_kind(kind)
    if not definition or not definition.strip():
        raise FeatureError("The definition is empty.", field="expression" if kind == "expression" else "sql",
                           fix="e.g. count of 'Order Completed' in last 90 days" if kind == "expression" else "e.g. SELECT ... AS profile_id, ... AS value FROM events ...")
    if kind == "expression":
        from refinery.segments import store

        ctx = store.context(engine, cursor=_cur(engine, cursor))
        return compile_expression(definition, window, ctx).value_type
    if window_text(window) is not None:
        raise FeatureError("A SQL feature writes its window in its WHERE ($as_of - INTERVAL ...).", field="window",
                           fix="Leave the window out of a SQL feature's definition.")
    return _dry_run(engine, definition, cursor=cursor)


def _dry_run(engine: Engine, definition: str, *, cursor: Any = None) -> str:
    """Bind the SELECT (no rows read) so unknown columns and type errors are found when it is saved."""
    from refinery.errors import StorageError
    from refinery.features.errors import FeatureSQLError
    from refinery.features.sql import as_of, check_sql

    now = exp.cast(exp.Literal.string(datetime.now(UTC).isoformat(sep=" ")), exp.DataType.build("TIMESTAMPTZ"))
    probe = exp.select("*").from_(exp.Subquery(this=as_of(check_sql(definition, engine.dialect), now), alias="f")).limit(0)
    try:
        table = engine.fetch_arrow(probe, cursor=_cur(engine, cursor))
    except (StorageError, Exception) as e:  # noqa: BLE001 - the engine's own error, reported with the feature
        message = getattr(e, "message", str(e)).splitlines()[0]
        raise FeatureSQLError(f"The SQL feature does not run: {message}", field="sql",
                              fix="Check the column names against `refinery query \"DESCRIBE events\"`.") from None
    return _value_type(table.schema.field("value").type)


def _value_type(t: pa.DataType) -> str:
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return "timestamp"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    return "unknown"


def define(engine: Engine, actor: Principal, name: str, definition: str, *, kind: str = "expression", entity: str = "profile",
           window: str | None = None, ttl: str | int | None = None, owner: str | None = None,
           description: str | None = None) -> dict[str, Any]:
    """Create a feature or save a new version of it (when anything changed). Call inside the writer."""
    check_name(name)
    check_entity(entity)
    check_kind(kind)
    ttl_delta = parse_duration(ttl, "ttl")
    ttl_seconds = int(ttl_delta.total_seconds()) if ttl_delta is not None else None
    window = window_text(window)
    value_type = validate(engine, kind, definition, window, cursor=engine.reader())
    at = datetime.now(UTC)
    rows = engine.fetch_all(f"SELECT {_FIELDS}, deleted_at FROM features WHERE name = ?", [name])  # noqa: S608 - constant text
    owner = owner or (str(rows[0][8]) if rows and rows[0][12] is None else actor.name)
    if rows and rows[0][12] is None:
        old = _feature(rows[0][:12])
        same = (old.entity, old.kind, old.definition, old.window, old.ttl_seconds, old.owner, old.description) == \
            (entity, kind, definition, window, ttl_seconds, owner, description)
        if same:
            return {**get(engine, name, cursor=engine.reader()).to_dict(), "changed": False}
    version = int(engine.fetch_all("SELECT coalesce(max(version), 0) + 1 FROM feature_versions WHERE name = ?", [name])[0][0])
    values = [name, version, entity, kind, definition, window, ttl_seconds, value_type, owner, description, actor.name, at]
    engine.execute(f"INSERT INTO feature_versions ({_FIELDS}) VALUES ({', '.join('?' * 12)})", values)  # noqa: S608 - constant text
    if rows:
        revived = rows[0][12] is not None  # a deleted feature defined again: created anew
        first = [actor.name, at] if revived else [rows[0][10], rows[0][11]]
        engine.execute("UPDATE features SET version = ?, entity = ?, kind = ?, definition = ?, time_window = ?, ttl_seconds = ?, "
                       "value_type = ?, owner = ?, description = ?, updated_by = ?, updated_at = ?, deleted_at = NULL, "
                       "created_by = ?, created_at = ? WHERE name = ?", [*values[1:10], actor.name, at, *first, name])
    else:
        engine.execute(f"INSERT INTO features ({_FIELDS}, updated_by, updated_at, deleted_at) "  # noqa: S608 - constant text
                       f"VALUES ({', '.join('?' * 14)}, NULL)", [*values, actor.name, at])
    audit.record(engine, actor, "features.define", f"feature:{name}", {"version": version, "kind": kind})
    by, when = (actor.name, at) if not rows or rows[0][12] is not None else (str(rows[0][10]), rows[0][11])
    saved = Feature(name, version, entity, kind, definition, window, ttl_seconds, value_type, owner, description, by, when, actor.name, at)
    return {**saved.to_dict(), "changed": True}


def delete(engine: Engine, actor: Principal, name: str) -> dict[str, Any]:
    """Delete a feature (its versions stay, so past training sets can be rebuilt). Call inside the writer."""
    feature = get(engine, name)
    engine.execute("UPDATE features SET deleted_at = ? WHERE name = ?", [datetime.now(UTC), name])
    audit.record(engine, actor, "features.delete", f"feature:{name}", {"version": feature.version})
    return {"name": name, "deleted": True, "version": feature.version}
