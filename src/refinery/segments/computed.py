"""Computed traits: named aggregate expressions (`lifetime_value = sum(total) of 'Order Completed'`),
materialised per profile into `computed_trait_values` and usable in segment rules like any trait.

The language helper compiles an expression (`refinery.segments.traits.compile_trait`) to a SELECT of
`profile_id, value`; this module stores the definitions and materialises the values: the SELECT
runs on a read cursor, then one writer transaction replaces the trait's values, with its audit row.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from refinery.governance import audit
from refinery.governance.principal import Principal
from refinery.segments.store import SegmentExists, SegmentLifecycleError, SegmentNotFound
from refinery.storage.engine import Engine
from refinery.storage.writer import Writer

#: Trait names: as trait names in rules (`lifetime_value > 100`).
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_NEW = "_computed_trait_new_values"


@dataclass(frozen=True)
class ComputedTrait:
    name: str
    expression: str
    description: str | None
    version: int
    created_by: str
    created_at: datetime
    updated_by: str
    updated_at: datetime
    computed_at: datetime | None
    profiles: int | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("created_at", "updated_at", "computed_at"):
            d[k] = d[k].astimezone(UTC).isoformat() if d[k] is not None else None
        return d


_COLUMNS = "name, expression, description, version, created_by, created_at, updated_by, updated_at, computed_at, profiles"


def expressions(engine: Engine, *, cursor: Any = None) -> dict[str, str]:
    """name -> expression of every live computed trait (the compiler's `computed_traits`)."""
    rows = engine.fetch_all("SELECT name, expression FROM computed_traits WHERE deleted_at IS NULL ORDER BY name",
                            cursor=cursor if cursor is not None else engine.reader())
    return {str(n): str(x) for n, x in rows}


def list_traits(engine: Engine, *, cursor: Any = None) -> list[ComputedTrait]:
    rows = engine.fetch_all(f"SELECT {_COLUMNS} FROM computed_traits WHERE deleted_at IS NULL ORDER BY name",  # noqa: S608 - constant text
                            cursor=cursor if cursor is not None else engine.reader())
    return [ComputedTrait(*r) for r in rows]


def get(engine: Engine, name: str, *, cursor: Any = None) -> ComputedTrait:
    rows = engine.fetch_all(f"SELECT {_COLUMNS} FROM computed_traits WHERE name = ? AND deleted_at IS NULL",  # noqa: S608 - constant text
                            [name], cursor=cursor if cursor is not None else engine.reader())
    if not rows:
        known = [t.name for t in list_traits(engine, cursor=cursor)]
        raise SegmentNotFound(f"No computed trait {name!r}.",
                              fix=f"Use one of: {', '.join(known)}." if known else "Define one: refinery segments traits create NAME EXPRESSION",
                              field="name")
    return ComputedTrait(*rows[0])


def _compile(engine: Engine, expression: str, cursor: Any = None) -> Any:
    from refinery.segments import store
    from refinery.segments.traits import compile_trait

    return compile_trait(expression, store.context(engine, cursor=cursor))


def define(engine: Engine, actor: Principal, name: str, expression: str, description: str | None = None) -> ComputedTrait:
    """Create a computed trait, or save a new version of it. Call inside the writer."""
    if not NAME.match(name or ""):
        raise SegmentLifecycleError(f"Computed trait name {name!r} is not allowed.",
                                    fix="Use letters, digits and '_', starting with a letter, e.g. lifetime_value.", field="name")
    if not expression or not expression.strip():
        raise SegmentLifecycleError("The expression is empty.", fix="e.g. sum(total) of 'Order Completed'", field="expression")
    _compile(engine, expression, cursor=engine.reader())
    at = datetime.now(UTC)
    rows = engine.fetch_all("SELECT version, deleted_at, created_by, created_at FROM computed_traits WHERE name = ?", [name])
    if not rows:
        engine.execute(f"INSERT INTO computed_traits ({_COLUMNS}, deleted_at) VALUES (?, ?, ?, 1, ?, ?, ?, ?, NULL, NULL, NULL)",  # noqa: S608
                       [name, expression, description, actor.name, at, actor.name, at])
        version, created_by, created_at = 1, actor.name, at
    else:
        version = int(rows[0][0]) + 1
        created_by, created_at = (actor.name, at) if rows[0][1] is not None else (str(rows[0][2]), rows[0][3])
        engine.execute("UPDATE computed_traits SET expression = ?, description = ?, version = ?, created_by = ?, created_at = ?, "
                       "updated_by = ?, updated_at = ?, deleted_at = NULL WHERE name = ?",
                       [expression, description, version, created_by, created_at, actor.name, at, name])
    audit.record(engine, actor, "computed_traits.define", f"computed_trait:{name}", {"version": version})
    return ComputedTrait(name, expression, description, version, created_by, created_at, actor.name, at, None, None)


def delete(engine: Engine, actor: Principal, name: str) -> dict[str, Any]:
    """Delete a computed trait and its values. Refused while a segment uses it. Call inside the writer."""
    from refinery.segments import store

    get(engine, name, cursor=engine.reader())
    # A rule that names it (even inside a string) blocks the delete: safe, and the fix is plain.
    users = [s.name for s in store.list_segments(engine, cursor=engine.reader()) if re.search(rf"\b{re.escape(name)}\b", s.rule)]
    if users:
        raise SegmentExists(f"Computed trait {name!r} is used by segment(s) {', '.join(users)}.",
                            fix="Change those segments first.", field="name")
    n = engine.fetch_all("DELETE FROM computed_trait_values WHERE name = ?", [name])[0][0]
    engine.execute("UPDATE computed_traits SET deleted_at = ? WHERE name = ?", [datetime.now(UTC), name])
    audit.record(engine, actor, "computed_traits.delete", f"computed_trait:{name}", {"values": int(n)})
    return {"name": name, "values_deleted": int(n)}


def materialise(engine: Engine, writer: Writer, actor: Principal, name: str, *, as_of: datetime | None = None) -> dict[str, Any]:
    """Compute `name` for every profile and replace its stored values in one writer transaction."""
    at = (as_of or datetime.now(UTC)).astimezone(UTC)
    cur = engine.fresh_reader()
    try:
        trait = get(engine, name, cursor=cur)
        compiled = _compile(engine, trait.expression, cursor=cur)
        table = engine.fetch_arrow(compiled.select(at), cursor=cur)
    finally:
        cur.close()
    values = pa.table({
        "profile_id": table.column(0).cast(pa.string()),
        "value": pa.array([json.dumps(v, default=str) if v is not None else None for v in table.column(1).to_pylist()], pa.string()),
    })

    def write(e: Engine) -> int:
        e.execute("DELETE FROM computed_trait_values WHERE name = ?", [name])
        e.register(_NEW, values)
        try:
            n = e.fetch_all(f"INSERT INTO computed_trait_values (profile_id, name, value, computed_at) "  # noqa: S608 - constant text
                            f"SELECT profile_id, ?, CAST(value AS JSON), ? FROM {_NEW} WHERE profile_id IS NOT NULL", [name, at])[0][0]
        finally:
            e.unregister(_NEW)
        e.execute("UPDATE computed_traits SET computed_at = ?, profiles = ? WHERE name = ?", [at, int(n), name])
        audit.record(e, actor, "computed_traits.compute", f"computed_trait:{name}", {"version": trait.version, "profiles": int(n)})
        return int(n)

    profiles = writer.call(write)
    return {"name": name, "version": trait.version, "computed_at": at.isoformat(), "profiles": profiles}
