"""Export to Feast: the feature definitions and their offline data as a Feast feature repository
that `feast apply` and `feast materialize` accept (Feast 0.67, `file` offline store over Parquet,
SQLite online store inside the folder). See docs/features.md#feast and decision 0025.

    FOLDER/feature_store.yaml           project, provider local, offline store `file`, online store SQLite
    FOLDER/refinery_features.py         Entity `profile` (join key profile_id), a FileSource and a
                                        FeatureView per time-to-live, a Field per feature
    FOLDER/data/<view>.parquet          profile_id, event_timestamp, one column per feature
    FOLDER/refinery_export.json         what was exported: moments, features and versions, views, rows

Feast answers a training row (profile, t) with the latest source row of the profile at or before t
(and not older than the view's TTL). So the Parquet holds, for every live profile, the values **our
offline store computes** (`offline.training_query`, the training sets' own SQL) at every moment
where one of them can change, and nothing in between:

- at `since` (the first moment anything was known, unless given), every profile's starting values;
- when an event becomes known (`max(timestamp, received_at)`), since it enters the aggregates then;
- when a time comparison of a feature flips: a filter `v > t - 90 days` holds until `t = v + 90 days`,
  `v >= t - 90 days` until one microsecond after it (the first moment of the new value is the row);
- rows whose values equal the row before are dropped (most candidates change nothing);
- for a view with a TTL, the last values are restated every TTL (a heartbeat, as a materialisation
  run confirms a value online), so Feast's TTL never blanks a value our training set gives.

Expression features only: a SQL feature may read `$as_of` anywhere, so its change moments cannot be
found; it is refused by name. Profiles are today's live profiles (merged ids: ask for the survivor).
"""

from __future__ import annotations

import json
import keyword
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlglot import exp

from refinery.features import registry
from refinery.features.compile import CompiledFeature, compile_feature
from refinery.features.definition import Feature
from refinery.features.errors import FeatureError
from refinery.features.offline import REQUEST, training_query
from refinery.storage.engine import Engine

#: The generated definitions file and the export's own record of itself.
DEFINITIONS = "refinery_features.py"
MANIFEST = "refinery_export.json"
#: Feast's entity and join key; the source's event time column.
ENTITY, JOIN_KEY, TIMESTAMP = "profile", "profile_id", "event_timestamp"
#: Names a feature cannot have in a Feast view (the source's own columns).
RESERVED = frozenset({JOIN_KEY, TIMESTAMP, "created_timestamp", "created"})
#: Profiles per request relation (one training query each), so memory stays bounded.
CHUNK = 100_000
_PROJECT = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
_PROFILES = "_feast_profiles"
_VALUES = "_feast_values"
_COMPARISONS = (exp.GT, exp.GTE, exp.LT, exp.LTE, exp.EQ, exp.NEQ)
_ONE_US = timedelta(microseconds=1)
#: `a OP b` written as `b OP' a`.
_FLIPPED: dict[type, type] = {exp.GT: exp.LT, exp.GTE: exp.LTE, exp.LT: exp.GT, exp.LTE: exp.GTE, exp.EQ: exp.EQ, exp.NEQ: exp.NEQ}
#: For `v OP t - d`, the moments (past v + d) at which it changes: `v > t - d` holds while t < v + d (changes
#: at v + d), `v >= t - d` while t <= v + d (changes one microsecond later), and so on.
_EDGES: dict[type, tuple[timedelta, ...]] = {exp.GT: (timedelta(0),), exp.LTE: (timedelta(0),), exp.GTE: (_ONE_US,),
                                             exp.LT: (_ONE_US,), exp.EQ: (timedelta(0), _ONE_US), exp.NEQ: (timedelta(0), _ONE_US)}


@dataclass
class FeastView:
    name: str
    ttl_seconds: int | None
    features: dict[str, str]        # feature name -> Feast type
    path: str                       # relative to the folder
    rows: int = 0


@dataclass
class FeastExport:
    folder: str
    project: str
    as_of: str
    since: str
    profiles: int
    features: dict[str, int]        # name -> version exported
    views: list[FeastView] = field(default_factory=list)
    candidates: int = 0             # moments evaluated (before rows that change nothing were dropped)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- names ---------------------------------------------------------------------------------
def check_project(project: str) -> str:
    if not _PROJECT.match(project or ""):
        raise FeatureError(f"Feast project name {project!r} is not allowed.",
                           fix="Use letters, digits and '_', starting with a letter (Feast's SQLite online store puts it in "
                               "table names), e.g. refinery.", field="project")
    return project


def check_exportable(feature: Feature) -> Feature:
    """A feature Feast can hold under its own name, computed so that its change moments are known."""
    name = feature.name
    if not name.isidentifier() or keyword.iskeyword(name) or not name.isascii():
        raise FeatureError(f"Feature {name!r} cannot be a Feast field: its name is not a Python identifier.",
                           fix=f"Define it again under a name of letters, digits and '_' that is not a Python keyword "
                               f"(refinery features create {name}_f ...), and export that.", field="features")
    if name in RESERVED:
        raise FeatureError(f"Feature {name!r} has the name of a column of the exported data ({', '.join(sorted(RESERVED))}).",
                           fix=f"Define it again under another name (refinery features create {name}_value ...), and export that.",
                           field="features")
    if feature.kind == "sql":
        raise FeatureError(f"Feature {name!r} is a SQL feature: it may read $as_of anywhere, so the moments its value "
                           "changes cannot be found, and Feast's point-in-time join needs them.",
                           fix="Leave it out of the export (name the features to export), or write it as an expression feature.",
                           field="features")
    return feature


# --- when values change --------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Where a compiled feature's value can change: `relevant` is true for an event that can count
    for some moment (time comparisons taken as unknown), `moves` each event-side expression compared
    with the moment and the offset at which the comparison flips (`v + offset`, the first moment of
    the new truth value)."""

    relevant: exp.Expr
    moves: tuple[tuple[exp.Expr, timedelta], ...]


def _is_moment(node: exp.Expr) -> bool:
    return isinstance(node, exp.Column) and node.name == "ts" and node.table == "r"


def _interval(node: exp.Expr) -> timedelta | None:
    if not isinstance(node, exp.Interval):
        return None
    unit = node.unit.name.upper() if node.unit is not None else ""
    scale = {"SECOND": timedelta(seconds=1), "MICROSECOND": _ONE_US}.get(unit)
    try:
        return scale * int(node.this.name) if scale is not None else None
    except ValueError:
        return None


def timing(compiled: CompiledFeature) -> Timing:
    """The feature's change moments, or a FeatureError when the moment is used in a way whose
    changes cannot be enumerated (it can only be compared with an event's value in the filter)."""
    name = compiled.feature.name
    for part in (compiled.aggregate, compiled.value):
        if part is not None and any(_is_moment(c) for c in part.find_all(exp.Column)):
            raise _untimed(name)
    assert compiled.filter is not None
    relevant = compiled.filter.copy()
    moves: list[tuple[exp.Expr, timedelta]] = []
    comparisons: list[exp.Expr] = []
    for column in list(relevant.find_all(exp.Column)):
        if not _is_moment(column):
            continue
        moment: exp.Expr = column
        offset = timedelta(0)
        parent = moment.parent
        if isinstance(parent, (exp.Sub, exp.Add)) and parent.this is moment:
            step = _interval(parent.expression)
            if step is None:
                raise _untimed(name)
            offset = step if isinstance(parent, exp.Sub) else -step
            moment = parent
        comparison = moment.parent
        while isinstance(comparison, exp.Paren):
            comparison = comparison.parent
        if isinstance(comparison, _COMPARISONS):
            left = comparison.this is moment or _within(moment, comparison.this)
            other = comparison.expression if left else comparison.this
            op = _FLIPPED[type(comparison)] if left else type(comparison)  # as `other OP moment`
        elif isinstance(comparison, exp.Between) and not _within(moment, comparison.this):
            other = comparison.this
            op = exp.GTE if _within(moment, comparison.args["low"]) else exp.LTE
        else:
            raise _untimed(name)
        if any(_is_moment(c) for c in other.find_all(exp.Column)):
            raise _untimed(name)
        # `v OP t - offset` holds for t below or above v + offset, edge included or not: the moments it flips
        for step in _EDGES[op]:
            moves.append((other.copy(), offset + step))
        comparisons.append(comparison)
    return Timing(_unknown(relevant, comparisons), tuple(moves))


def _within(node: exp.Expr, tree: exp.Expr) -> bool:
    return any(n is node for n in tree.walk())


def _unknown(condition: exp.Expr, comparisons: list[exp.Expr]) -> exp.Expr:
    """`condition IS NOT FALSE` with each time comparison replaced by NULL: Kleene logic makes it
    false only for an event that no moment can count. Sound only through AND/OR/NOT; otherwise TRUE."""
    for comparison in comparisons:
        node: exp.Expr | None = comparison.parent
        while node is not None:
            if not isinstance(node, (exp.And, exp.Or, exp.Not, exp.Paren)):
                return exp.true()
            node = node.parent
    for comparison in comparisons:
        if comparison is condition:
            return exp.true()
        comparison.replace(exp.Null())
    return exp.Not(this=exp.Is(this=exp.Paren(this=condition), expression=exp.false()))


def _untimed(name: str) -> FeatureError:
    return FeatureError(f"Feature {name!r} uses the evaluated moment in a way whose changes cannot be listed, so its "
                        "values cannot be exported for Feast's point-in-time join.",
                        fix="Leave it out of the export (name the features to export), and report the expression.",
                        field="features")


# --- the queries ---------------------------------------------------------------------------
def _col(name: str, table: str | None = None) -> exp.Column:
    return exp.column(name, table=table)


def _ts(value: datetime) -> exp.Expr:
    return exp.cast(exp.Literal.string(value.astimezone(UTC).isoformat(sep=" ")), exp.DataType.build("TIMESTAMPTZ"))


def _plus(value: exp.Expr, offset: timedelta) -> exp.Expr:
    us = offset // _ONE_US
    if us == 0:
        return value
    interval = exp.Interval(this=exp.Literal.string(str(abs(us))), unit=exp.Var(this="MICROSECOND"))
    return exp.Add(this=value, expression=interval) if us > 0 else exp.Sub(this=value, expression=interval)


def candidates_query(timings: Sequence[Timing], since: datetime, as_of: datetime) -> exp.Select:
    """(profile_id, ts): the moments in (since, as_of] at which a value of these features can change,
    for the profiles in `_feast_profiles`."""
    known = exp.func("greatest", _col("timestamp", "e"), _col("received_at", "e"))
    ev = exp.select(exp.alias_(_col("profile_id", "ep"), "_feature_profile"), "e.*").from_(exp.to_table("events").as_("e")).join(
        exp.to_table("event_profiles").as_("ep"),
        on=exp.and_(exp.EQ(this=_col("source", "ep"), expression=_col("source", "e")),
                    exp.EQ(this=_col("message_id", "ep"), expression=_col("message_id", "e")))).where(
        exp.and_(exp.In(this=_col("profile_id", "ep"), query=exp.Subquery(this=exp.select("profile_id").from_(_PROFILES))),
                 exp.LTE(this=exp.func("greatest", _col("timestamp", "e"), _col("received_at", "e")), expression=_ts(as_of))))
    parts: list[exp.Select] = []

    def part(moment: exp.Expr, where: exp.Expr) -> exp.Select:
        return exp.select(exp.alias_(_col("_feature_profile", "e"), "profile_id"), exp.alias_(moment, "ts")).from_(
            exp.to_table("ev").as_("e")).where(where)

    any_relevant = exp.or_(*[exp.Paren(this=t.relevant.copy()) for t in timings])
    parts.append(part(known.copy(), any_relevant))
    for t in timings:
        for value, offset in t.moves:
            moved = exp.TryCast(this=value.copy(), to=exp.DataType.build("TIMESTAMPTZ"))
            parts.append(part(_plus(moved, offset), exp.Paren(this=t.relevant.copy())))
    union: exp.Query = parts[0]
    for p in parts[1:]:
        union = exp.union(union, p, distinct=False)
    where = exp.and_(exp.GT(this=exp.column("ts"), expression=_ts(since)), exp.LTE(this=exp.column("ts"), expression=_ts(as_of)))
    out = exp.select("profile_id", "ts").distinct().from_(exp.Subquery(this=union, alias="c")).where(where)
    return cast(exp.Select, out.with_("ev", as_=ev))


def _window(func: exp.Expr, order: str = "ts") -> exp.Window:
    return exp.Window(this=func, partition_by=[_col("profile_id")], order=exp.Order(expressions=[exp.Ordered(this=_col(order))]))


def rows_query(n: int, ttl: timedelta | None, as_of: datetime) -> exp.Select:
    """From `_feast_values` (profile_id, ts, f1..fn: values at every candidate moment): the rows
    whose values differ from the profile's row before, restated every `ttl` until the next row
    (or `as_of`) when there is a TTL. Columns: profile_id, event_timestamp, f1..fn."""
    fs = [f"f{i}" for i in range(1, n + 1)]
    lagged = exp.select("profile_id", "ts", *fs, *[exp.alias_(_window(exp.func("lag", _col(f))), f"_p{f}") for f in fs],
                        exp.alias_(_window(exp.RowNumber()), "_n")).from_(_VALUES)
    changed = exp.or_(exp.EQ(this=_col("_n"), expression=exp.Literal.number(1)),
                      *[exp.NullSafeNEQ(this=_col(f), expression=_col(f"_p{f}")) for f in fs])
    kept = exp.select("profile_id", "ts", *fs).from_(exp.Subquery(this=lagged, alias="w")).where(changed)
    if not ttl:
        out = exp.select("profile_id", exp.alias_(_col("ts"), TIMESTAMP), *fs).from_(exp.Subquery(this=kept, alias="k"))
        return cast(exp.Select, out.order_by("profile_id", TIMESTAMP))
    ttl_us = ttl // _ONE_US
    nxt = exp.Coalesce(this=_window(exp.func("lead", _col("ts"))), expressions=[_plus(_ts(as_of), _ONE_US)])
    spans = exp.select("profile_id", "ts", *fs, exp.alias_(nxt, "_next")).from_(exp.Subquery(this=kept, alias="k"))
    # restatements k = 0, 1, ... while ts + k * ttl < next
    count = exp.Add(this=exp.IntDiv(this=exp.Paren(this=exp.Sub(
        this=exp.Sub(this=exp.func("epoch_us", _col("_next")), expression=exp.func("epoch_us", _col("ts"))),
        expression=exp.Literal.number(1))), expression=exp.Literal.number(ttl_us)), expression=exp.Literal.number(1))
    beats = exp.select("profile_id", "ts", *fs, exp.alias_(exp.Explode(this=exp.func("range", exp.Literal.number(0), count)), "_k")).from_(
        exp.Subquery(this=spans, alias="s"))
    at = exp.Add(this=_col("ts"), expression=exp.func("to_microseconds", exp.Mul(this=_col("_k"), expression=exp.Literal.number(ttl_us))))
    out = exp.select("profile_id", exp.alias_(at, TIMESTAMP), *fs).from_(exp.Subquery(this=beats, alias="b"))
    return cast(exp.Select, out.order_by("profile_id", TIMESTAMP))


# --- types and text ------------------------------------------------------------------------
def feast_type(t: pa.DataType) -> tuple[str, pa.DataType]:
    """The Feast type's name (feast.types) and the Arrow type the Parquet column is written as."""
    if pa.types.is_boolean(t):
        return "Bool", pa.bool_()
    if pa.types.is_integer(t):
        return "Int64", pa.int64()
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "Float64", pa.float64()
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return "UnixTimestamp", pa.timestamp("us", tz="UTC")
    if pa.types.is_null(t):
        return "String", pa.string()
    return "String", pa.string()


def store_yaml(project: str) -> str:
    return "\n".join([
        "# Written by `refinery features export-feast`; see refinery_export.json for what was exported.",
        f"project: {json.dumps(project)}",
        "registry: data/registry.db",
        "provider: local",
        "offline_store:",
        "    type: file",
        "online_store:",
        "    type: sqlite",
        "    path: data/online_store.db",
        "entity_key_serialization_version: 3",
        "",
    ])


def definitions(project: str, views: Sequence[FeastView], features: dict[str, Feature], as_of: datetime) -> str:
    """The Python Feast reads on `feast apply`. Every name and text from a definition is a string
    literal written by repr() (names are checked identifiers besides); variable names are ours."""
    types = sorted({t for v in views for t in v.features.values()})
    lines = [
        f'"""Feast definitions of Refinery project {project!r}, exported as of {as_of.isoformat()}.',
        "",
        "Written by `refinery features export-feast`: export again rather than edit (docs/features.md#feast).",
        '"""',
        "",
        "from datetime import timedelta",
        "",
        "from feast import Entity, FeatureView, Field, FileSource",
        f"from feast.types import {', '.join(types)}" if types else "",
        "from feast.value_type import ValueType",
        "",
        f"profile = Entity(name={ENTITY!r}, join_keys=[{JOIN_KEY!r}], value_type=ValueType.STRING,",
        "                 description='A Refinery profile (its id as it is now: merged ids are answered by the survivor).')",
    ]
    for i, view in enumerate(views):
        lines += [
            "",
            f"source_{i} = FileSource(name={view.name + '_source'!r}, path={view.path!r}, timestamp_field={TIMESTAMP!r})",
            "",
            f"view_{i} = FeatureView(",
            f"    name={view.name!r},",
            "    entities=[profile],",
            f"    ttl=timedelta(seconds={int(view.ttl_seconds or 0)}),",
            "    schema=[",
        ]
        for name, ftype in view.features.items():
            f = features[name]
            tags = {"refinery_ref": f.ref, "refinery_owner": f.owner}
            if f.window:
                tags["refinery_window"] = f.window
            lines.append(f"        Field(name={name!r}, dtype={ftype}, description={f.definition!r}, tags={tags!r}),")
        lines += [
            "    ],",
            f"    source=source_{i},",
            "    online=True,",
            f"    tags={{'refinery_exported_at': {as_of.isoformat()!r}}},",
            ")",
        ]
    return "\n".join(line for line in lines) + "\n"


# --- the export ----------------------------------------------------------------------------
def _prepare_folder(folder: Path, replace: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise FeatureError(f"{folder} is a file, not a folder.", fix="Give a folder to write the Feast repository into.", field="folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not (folder / MANIFEST).is_file():
            raise FeatureError(f"{folder} is not empty and holds no earlier export.",
                               fix="Give a new or empty folder (an earlier export can be replaced with --replace).", field="folder")
        if not replace:
            raise FeatureError(f"{folder} holds an earlier export.", fix="Replace it with --replace, or give another folder.",
                               field="folder")
        for name in (MANIFEST, DEFINITIONS, "feature_store.yaml"):
            (folder / name).unlink(missing_ok=True)
        shutil.rmtree(folder / "data", ignore_errors=True)
    (folder / "data").mkdir(parents=True, exist_ok=True)


def export_feast(engine: Engine, folder: Path | str, names: Sequence[str] | None = None, *, project: str = "refinery",
                 as_of: datetime | None = None, since: datetime | None = None, replace: bool = False,
                 chunk: int = CHUNK) -> FeastExport:
    """Write a Feast repository of `names` (default: every live feature) into `folder`, with each
    live profile's values from `since` (default: the first moment an event was known) to `as_of`
    (default: now) at every moment one changed. See the module's docstring."""
    from refinery.segments import store as segment_store

    started = time.monotonic()
    check_project(project)
    now = datetime.now(UTC)
    as_of = (as_of or now).astimezone(UTC)
    if as_of > now:
        raise FeatureError(f"as_of {as_of.isoformat()} is in the future.", fix="Export as of now or an earlier moment.", field="as_of")
    folder = Path(folder)
    cur = engine.fresh_reader()
    try:
        defs = [registry.resolve(engine, n, cursor=cur) for n in names] if names else registry.list_features(engine, cursor=cur)
        if not defs:
            raise FeatureError("There are no features to export.", fix="Define one: refinery features create NAME EXPRESSION",
                               field="features")
        seen = [f.name for f in defs]
        dup = sorted({n for n in seen if seen.count(n) > 1})
        if dup:
            raise FeatureError(f"Feature(s) named twice: {', '.join(dup)}.", fix="Name each feature once (one version of each).",
                               field="features")
        for f in defs:
            check_exportable(f)
        ctx = segment_store.context(engine, cursor=cur)
        compiled = [compile_feature(f, ctx, exp.column("ts", table="r")) for f in defs]
        timings = [timing(c) for c in compiled]
        if since is None:
            first = engine.fetch_all("SELECT min(greatest(e.timestamp, e.received_at)) FROM events e JOIN event_profiles ep "
                                     "ON ep.source = e.source AND ep.message_id = e.message_id", cursor=cur)[0][0]
            since = min(first, as_of) if first is not None else as_of
        since = since.astimezone(UTC)
        if since > as_of:
            raise FeatureError(f"since {since.isoformat()} is after as_of {as_of.isoformat()}.", fix="Give a since before as_of.",
                               field="since")
        profiles = [str(r[0]) for r in engine.fetch_all("SELECT profile_id FROM profiles ORDER BY profile_id", cursor=cur)]
        _prepare_folder(folder, replace)
        groups: dict[int, list[int]] = {}
        for i, f in enumerate(defs):
            groups.setdefault(f.ttl_seconds or 0, []).append(i)
        result = FeastExport(str(folder), project, as_of.isoformat(), since.isoformat(), len(profiles), {f.name: f.version for f in defs})
        for ttl_seconds, members in sorted(groups.items()):
            view_name = "refinery_features" if not ttl_seconds else f"refinery_features_ttl_{ttl_seconds}s"
            view = FeastView(view_name, ttl_seconds or None, {}, f"data/{view_name}.parquet")
            result.candidates += _write_view(engine, folder / view.path, view, [compiled[i] for i in members],
                                             [timings[i] for i in members], profiles, since, as_of, chunk, cur)
            result.views.append(view)
    finally:
        cur.close()
    features = {f.name: f for f in defs}
    (folder / "feature_store.yaml").write_text(store_yaml(project), "utf-8")
    (folder / DEFINITIONS).write_text(definitions(project, result.views, features, as_of), "utf-8")
    result.seconds = round(time.monotonic() - started, 3)
    (folder / MANIFEST).write_text(json.dumps(result.to_dict(), indent=2) + "\n", "utf-8")
    return result


def _write_view(engine: Engine, path: Path, view: FeastView, compiled: list[CompiledFeature], timings: list[Timing],
                profiles: list[str], since: datetime, as_of: datetime, chunk: int, cur: Any) -> int:
    """Compute and write one view's rows, `chunk` profiles at a time; the number of candidate moments."""
    ttl = timedelta(seconds=view.ttl_seconds) if view.ttl_seconds else None
    candidates_sql = candidates_query(timings, since, as_of)
    values_sql = training_query(compiled)
    rows_sql = rows_query(len(compiled), ttl, as_of)
    writer: pq.ParquetWriter | None = None
    schema: pa.Schema | None = None
    evaluated = 0
    try:
        for start in range(0, max(len(profiles), 1), chunk):
            ids = pa.array(profiles[start:start + chunk], pa.string())
            engine.register(_PROFILES, pa.table({"profile_id": ids}), cursor=cur)
            try:
                moments = engine.fetch_arrow(candidates_sql, cursor=cur)
            finally:
                engine.unregister(_PROFILES, cursor=cur)
            first = pa.table({"profile_id": ids, "ts": pa.array([since] * len(ids), pa.timestamp("us", tz="UTC"))})
            request = pa.concat_tables([first, moments.select(["profile_id", "ts"]).cast(first.schema)])
            request = request.add_column(0, "row_id", pa.array(range(request.num_rows), pa.int64()))
            evaluated += request.num_rows
            engine.register(REQUEST, request, cursor=cur)
            try:
                values = engine.fetch_arrow(values_sql, cursor=cur)
            finally:
                engine.unregister(REQUEST, cursor=cur)
            if values.column("row_id") != request.column("row_id"):
                raise FeatureError("The feature values came back for other rows than were asked for.", fix="Report this; it is a bug.")
            table = pa.table({"profile_id": request.column("profile_id"), "ts": request.column("ts"),
                              **{f"f{i}": values.column(f"f{i}") for i in range(1, len(compiled) + 1)}})
            engine.register(_VALUES, table, cursor=cur)
            try:
                rows = engine.fetch_arrow(rows_sql, cursor=cur)
            finally:
                engine.unregister(_VALUES, cursor=cur)
            if schema is None:
                fields = [pa.field(JOIN_KEY, pa.string()), pa.field(TIMESTAMP, pa.timestamp("us", tz="UTC"))]
                for i, c in enumerate(compiled, start=1):
                    ftype, arrow = feast_type(rows.schema.field(f"f{i}").type)
                    view.features[c.feature.name] = ftype
                    fields.append(pa.field(c.feature.name, arrow))
                schema = pa.schema(fields)
                writer = pq.ParquetWriter(path, schema)
            columns = [rows.column("profile_id"), rows.column(TIMESTAMP),
                       *[rows.column(f"f{i}") for i in range(1, len(compiled) + 1)]]
            out = pa.Table.from_arrays([_as(c, f.type) for c, f in zip(columns, schema, strict=True)], schema=schema)
            assert writer is not None
            writer.write_table(out)
            view.rows += out.num_rows
    finally:
        if writer is not None:
            writer.close()
    return evaluated


def _as(column: pa.ChunkedArray, to: pa.DataType) -> pa.ChunkedArray:
    if column.type == to:
        return column
    if pa.types.is_timestamp(to) and pa.types.is_timestamp(column.type):
        return pc.cast(column, to)
    return pc.cast(column, to, safe=False)


def export_audited(rt: Any, actor: Any, folder: Path | str, names: Sequence[str] | None = None, **options: Any) -> FeastExport:
    """`export_feast` on a runtime's store, audited as a training set is (profile ids and derived
    values leave the store; no values in the record), before the command reports success."""
    from refinery.governance import audit

    result = export_feast(rt.engine, folder, names, **options)
    audit.record_now(rt.writer, actor, "features.export_feast", None,
                     {"features": result.features, "profiles": result.profiles, "rows": sum(v.rows for v in result.views),
                      "as_of": result.as_of, "since": result.since})
    return result
