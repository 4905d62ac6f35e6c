"""The offline store: point-in-time correct training sets.

Given rows of (profile_id, timestamp[, label]), each requested feature's value as it was at that
row's timestamp, computed only from events that had happened *and* been received by then
(`events.timestamp <= t AND events.received_at <= t`): a late-arriving event (happened before t,
received after) never reaches the row, nor does anything after t. One SQL over the engine seam for
all rows and features (no query per row or per timestamp):

    WITH ev AS (SELECT ep.profile_id AS _feature_profile, e.* FROM events e JOIN event_profiles ep ...
                WHERE ep.profile_id IN (SELECT profile_id FROM <request>)),
      agg AS (SELECT r.row_id, count(*) FILTER (WHERE <f1's filter, moment r.ts>) AS f1, ...
              FROM <request> r LEFT JOIN ev e ON e._feature_profile = r.profile_id
                   AND e.timestamp <= r.ts AND e.received_at <= r.ts
              GROUP BY r.row_id),
      mf_2 AS (...most frequent value per row...), sq_3 AS (... LATERAL (SQL feature as of r.ts) ...)
    SELECT r.row_id, agg.f1, mf_2.value AS f2, ... FROM <request> r LEFT JOIN agg ... ORDER BY r.row_id

Profiles are counted as they are now: an event belongs to the profile `event_profiles` gives it
today (after later merges and splits), and a requested profile id that was merged since is
answered by its surviving profile (`profile_id_now` in the result). Bad requests are refused with
what was wrong, how many rows, which, and the fix (see docs/features.md#errors).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import pyarrow as pa
import pyarrow.compute as pc
from sqlglot import exp

from refinery.features import registry
from refinery.features.compile import CompiledFeature, compile_feature
from refinery.features.definition import Feature, check_kind, check_name
from refinery.features.errors import FeatureError, TrainingSetError
from refinery.features.sql import as_of as sql_as_of
from refinery.segments.compile import CompileContext
from refinery.storage.engine import Engine

REQUEST = "_feature_request"
_INPUT = "_feature_input"
#: How many offending rows or profiles an error lists.
SHOWN = 10
#: Merge chains longer than this are a bug in the identity tables, not data.
MAX_MERGE_HOPS = 32
_COUNTS = ("count", "distinct_count", "sum")


@dataclass(frozen=True)
class TrainingSet:
    """The rows in request order (`row` is each one's index in the request) with one column per
    feature, and a report of what was done to the request (duplicates dropped, merged profiles)."""

    table: pa.Table
    report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"columns": self.table.column_names, "rows": [list(r.values()) for r in self.table.to_pylist()], **self.report}


@dataclass(frozen=True)
class FeatureRequest:
    """An unsaved feature for one request (exploration): a name and an expression, or SQL."""

    name: str
    definition: str
    kind: str = "expression"
    window: str | None = None


def training_set(engine: Engine, rows: pa.Table | Sequence[Mapping[str, Any]], features: Sequence[str | FeatureRequest], *,
                 label: str | None = "label", mode: str = "training", unknown: str = "refuse",
                 now: datetime | None = None, cursor: Any = None, context: CompileContext | None = None) -> TrainingSet:
    """Point-in-time feature values for `rows` (columns `profile_id`, `timestamp` and, for
    `mode='training'`, the label column `label`).

    mode: `training` (a label with at least two classes and no missing labels) or `retrieval`
    (labels optional, any). unknown: `refuse` (default) or `drop` rows whose profile the store does
    not know (reported with their ids). Exact duplicate rows are dropped and counted; rows of the
    same profile and time with different labels are refused. `context`: the segment compiler's
    context (default: this store's catalog, computed traits and tokeniser)."""
    if mode not in ("training", "retrieval"):
        raise TrainingSetError(f"Mode {mode!r} is unknown.", fix="Use 'training' (labels required) or 'retrieval'.", field="mode")
    if unknown not in ("refuse", "drop"):
        raise TrainingSetError(f"unknown={unknown!r} is not an option.", fix="Use 'refuse' or 'drop'.", field="unknown")
    now = (now or datetime.now(UTC)).astimezone(UTC)
    own = cursor is None
    cur = engine.fresh_reader() if own else cursor
    try:
        defs = _features(engine, features, cur)
        table = _input_table(rows, label, mode)
        labelled = label is not None and label in table.column_names
        if labelled and label != "label":
            table = table.rename_columns(["label" if c == label else ("_label_given" if c == "label" else c) for c in table.column_names])
        request, report = _prepare(engine, table, labelled, mode, unknown, now, cur)
        from refinery.segments import store

        ctx = context if context is not None else store.context(engine, cursor=cur)
        moment = exp.column("ts", table="r")
        compiled = [compile_feature(f, ctx, moment) for f in defs]
        engine.register(REQUEST, request, cursor=cur)
        try:
            values = engine.fetch_arrow(training_query(compiled), cursor=cur)
        finally:
            engine.unregister(REQUEST, cursor=cur)
    finally:
        if own:
            cur.close()
    names = [f.name if isinstance(f, FeatureRequest) else f for f in features]
    return TrainingSet(_assemble(request, values, compiled, names, label if labelled else None), report)


# --- the request -----------------------------------------------------------------------------
def _features(engine: Engine, features: Sequence[str | FeatureRequest], cur: Any) -> list[Feature]:
    if not features:
        raise TrainingSetError("No features were asked for.", fix="Name at least one feature (refinery features list).", field="features")
    out: list[Feature] = []
    for f in features:
        if isinstance(f, FeatureRequest):
            check_name(f.name)
            check_kind(f.kind)  # compiled with the others: an expression's error keeps its caret
            out.append(Feature(f.name, 0, "profile", f.kind, f.definition, f.window, None, None, "request", None, "request",
                               datetime.now(UTC)))
        else:
            out.append(registry.resolve(engine, f, cursor=cur))
    names = [f.name if isinstance(f, FeatureRequest) else f for f in features]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TrainingSetError(f"Feature(s) asked for twice: {', '.join(dup)}.", fix="Name each feature once.", field="features")
    return out


def _input_table(rows: pa.Table | Sequence[Mapping[str, Any]], label: str | None, mode: str) -> pa.Table:
    table = rows if isinstance(rows, pa.Table) else _from_dicts(rows)
    if table.num_rows == 0:
        raise TrainingSetError("The request has no rows.", fix="Send rows of profile_id, timestamp and label.", field="rows")
    for column in ("profile_id", "timestamp"):
        if column not in table.column_names:
            raise TrainingSetError(f"The rows have no {column!r} column (they have {', '.join(table.column_names)}).",
                                   fix="Send profile_id, timestamp and label for every row.", field=column)
    if mode == "training" and (label is None or label not in table.column_names):
        raise TrainingSetError(f"A training set needs the label column {label!r}; the rows have {', '.join(table.column_names)}.",
                               fix="Send the label with every row, name its column, or ask for mode 'retrieval'.", field="label")
    return table


def _from_dicts(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    try:
        return pa.Table.from_pylist([dict(r) for r in rows])
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
        raise TrainingSetError(f"The rows cannot be read as a table: {e}.",
                               fix="Send a list of objects with the same fields and one type per field.", field="rows") from None


def _listed(values: list[Any]) -> str:
    shown = ", ".join(str(v) for v in values[:SHOWN])
    return shown + (f" and {len(values) - SHOWN} more" if len(values) > SHOWN else "")


def _prepare(engine: Engine, table: pa.Table, labelled: bool, mode: str, unknown: str, now: datetime,
             cur: Any) -> tuple[pa.Table, dict[str, Any]]:
    """Checked request rows (row_id, profile_id as given, profile_id now, ts, label) and the report."""
    label = table.column("label") if labelled else pa.nulls(table.num_rows)
    given = pa.table({"row_id": pa.array(range(table.num_rows), pa.int64()), "profile_id": table.column("profile_id"),
                      "timestamp": table.column("timestamp"), "label": label})
    engine.register(_INPUT, given, cursor=cur)
    try:
        parsed = engine.fetch_arrow(
            f"SELECT row_id, CAST(profile_id AS VARCHAR) AS profile_id, TRY_CAST(timestamp AS TIMESTAMPTZ) AS ts, "  # noqa: S608 - constant text
            f"timestamp IS NULL AS missing, label FROM {_INPUT} ORDER BY row_id", cursor=cur)
    except Exception as e:  # noqa: BLE001 - e.g. a timestamp column of a type that cannot be cast at all
        raise TrainingSetError(f"The timestamp column cannot be read as times: {str(e).splitlines()[0]}.",
                               fix="Send ISO 8601 times such as 2026-01-31T12:00:00Z.", field="timestamp") from None
    finally:
        engine.unregister(_INPUT, cursor=cur)
    rows_of = parsed.column("row_id")
    bad_pid = pc.is_null(parsed.column("profile_id"))
    if pc.any(bad_pid).as_py():
        bad = pc.filter(rows_of, bad_pid).to_pylist()
        raise TrainingSetError(f"{len(bad)} row(s) have no profile_id: rows {_listed(bad)}.",
                               fix="Give every row the profile it is about.", field="profile_id", rows=bad[:SHOWN])
    bad_ts = pc.is_null(parsed.column("ts"))
    if pc.any(bad_ts).as_py():
        bad = pc.filter(rows_of, bad_ts).to_pylist()
        raise TrainingSetError(f"{len(bad)} row(s) have a missing or unreadable timestamp: rows {_listed(bad)}.",
                               fix="Send ISO 8601 times such as 2026-01-31T12:00:00Z (UTC unless they say otherwise).",
                               field="timestamp", rows=bad[:SHOWN])
    future = pc.greater(parsed.column("ts"), pa.scalar(now, pa.timestamp("us", tz="UTC")))
    if pc.any(future).as_py():
        bad = pc.filter(rows_of, future).to_pylist()
        raise TrainingSetError(f"{len(bad)} row(s) have a timestamp in the future (after {now.isoformat()}): rows {_listed(bad)}.",
                               fix="Ask for moments up to now: a feature's value at a moment that has not come is not known yet.",
                               field="timestamp", rows=bad[:SHOWN])
    report: dict[str, Any] = {"rows_requested": table.num_rows}
    parsed, report["duplicates_dropped"] = _dedupe(engine, parsed, cur)
    if mode == "training":
        _check_labels(parsed)
    parsed, merged, dropped = _resolve_profiles(engine, parsed, unknown, cur)
    report.update(profiles_merged=merged, unknown_profiles_dropped=dropped, rows_answered=parsed.num_rows)
    return parsed, report


def _dedupe(engine: Engine, parsed: pa.Table, cur: Any) -> tuple[pa.Table, int]:
    """Exact duplicates (profile, time, label) are dropped, keeping the first; the same profile and
    time with different labels is refused (no choice between them would be right)."""
    keyed = parsed.append_column("label_key", pc.cast(parsed.column("label"), pa.string()) if parsed.column("label").type != pa.null()
                                 else pa.nulls(parsed.num_rows, pa.string()))
    engine.register(_INPUT, keyed, cursor=cur)
    try:
        conflicts = engine.fetch_all(
            f"SELECT profile_id, ts, list(row_id ORDER BY row_id) FROM {_INPUT} GROUP BY profile_id, ts "  # noqa: S608 - constant text
            "HAVING count(DISTINCT coalesce(label_key, '\x00null')) > 1 ORDER BY min(row_id) LIMIT 11", cursor=cur)
        first = engine.fetch_arrow(
            f"SELECT min(row_id) AS row_id FROM {_INPUT} GROUP BY profile_id, ts, label_key ORDER BY 1", cursor=cur)  # noqa: S608
    finally:
        engine.unregister(_INPUT, cursor=cur)
    if conflicts:
        shown = "; ".join(f"{p} at {t.isoformat()} (rows {', '.join(map(str, r))})" for p, t, r in conflicts[:SHOWN])
        raise TrainingSetError(f"Rows for the same profile and time disagree on the label: {shown}.",
                               fix="Keep one label per profile and time (remove or correct the others).", field="label",
                               rows=[int(r) for _, _, rs in conflicts[:SHOWN] for r in rs])
    dropped = parsed.num_rows - first.num_rows
    if dropped:
        parsed = parsed.filter(pc.is_in(parsed.column("row_id"), value_set=first.column("row_id")))
    return parsed, dropped


def _check_labels(parsed: pa.Table) -> None:
    labels = parsed.column("label")
    missing = pc.is_null(labels)
    if pc.any(missing).as_py():
        bad = pc.filter(parsed.column("row_id"), missing).to_pylist()
        raise TrainingSetError(f"{len(bad)} row(s) have no label: rows {_listed(bad)}.",
                               fix="Give every row of a training set its label, or ask for mode 'retrieval'.", field="label", rows=bad[:SHOWN])
    classes = pc.unique(labels).to_pylist()
    if len(classes) < 2:
        raise TrainingSetError(f"The label has one class only ({classes[0]!r} in all {parsed.num_rows} rows): a model cannot learn from it.",
                               fix="Include rows of at least two classes (e.g. positives and negatives), or ask for mode 'retrieval'.",
                               field="label")


def _resolve_profiles(engine: Engine, parsed: pa.Table, unknown: str, cur: Any) -> tuple[pa.Table, int, list[str]]:
    """Each requested id as it is now: itself when live, else the profile it was merged into
    (following merges that were not undone); ids that are neither are unknown."""
    ids = pc.unique(parsed.column("profile_id"))
    engine.register(_INPUT, pa.table({"profile_id": ids}), cursor=cur)
    try:
        missing = engine.fetch_all(f"SELECT i.profile_id FROM {_INPUT} i ANTI JOIN profiles p ON p.profile_id = i.profile_id",  # noqa: S608
                                   cursor=cur)
    finally:
        engine.unregister(_INPUT, cursor=cur)
    now_of: dict[str, str] = {}
    pending = {str(r[0]): str(r[0]) for r in missing}  # requested id -> the id reached so far
    for _ in range(MAX_MERGE_HOPS):
        if not pending:
            break
        engine.register(_INPUT, pa.table({"profile_id": pa.array(sorted(set(pending.values())), pa.string())}), cursor=cur)
        try:
            hops = dict(engine.fetch_all(
                f"SELECT m.merged_profile_id, arg_max(m.surviving_profile_id, m.merged_at) FROM profile_merges m "  # noqa: S608
                f"JOIN {_INPUT} i ON i.profile_id = m.merged_profile_id WHERE m.undone_at IS NULL GROUP BY 1", cursor=cur))
            reached = {str(v) for v in hops.values()}
            engine.register(_INPUT, pa.table({"profile_id": pa.array(sorted(reached), pa.string())}), cursor=cur)
            live = {str(r[0]) for r in engine.fetch_all(
                f"SELECT i.profile_id FROM {_INPUT} i SEMI JOIN profiles p ON p.profile_id = i.profile_id", cursor=cur)}  # noqa: S608
        finally:
            engine.unregister(_INPUT, cursor=cur)
        following: dict[str, str] = {}
        for asked, at in pending.items():
            nxt = hops.get(at)
            if nxt is None:
                continue  # no merge: unknown
            if nxt in live:
                now_of[asked] = nxt
            else:
                following[asked] = nxt
        pending = following
    unknown_ids = sorted({str(r[0]) for r in missing} - set(now_of))
    dropped: list[str] = []
    if unknown_ids:
        rows = pc.filter(parsed.column("row_id"), pc.is_in(parsed.column("profile_id"), value_set=pa.array(unknown_ids))).to_pylist()
        if unknown == "refuse":
            raise TrainingSetError(f"{len(unknown_ids)} profile id(s) are not known to this store ({len(rows)} row(s)): {_listed(unknown_ids)}.",
                                   fix="Use profile ids from `refinery profiles`, remove those rows, or ask to drop unknown profiles (unknown='drop').",
                                   field="profile_id", profiles=unknown_ids[:SHOWN], rows=rows[:SHOWN])
        parsed = parsed.filter(pc.invert(pc.is_in(parsed.column("profile_id"), value_set=pa.array(unknown_ids))))
        dropped = unknown_ids
        if parsed.num_rows == 0:
            raise TrainingSetError("No row is left after dropping the unknown profiles.", fix="Use profile ids this store knows.",
                                   field="profile_id", profiles=unknown_ids[:SHOWN])
    current = parsed.column("profile_id")
    if now_of:
        keys = pa.array(list(now_of), pa.string())
        index = pc.index_in(current, value_set=keys)
        mapped = pc.take(pa.array(list(now_of.values()), pa.string()), index)
        current = pc.coalesce(mapped, current)
    merged = int(pc.sum(pc.not_equal(current, parsed.column("profile_id"))).as_py() or 0)
    out = pa.table({"row_id": parsed.column("row_id"), "requested": parsed.column("profile_id"), "profile_id": current,
                    "ts": parsed.column("ts"), "label": parsed.column("label")})
    return out, merged, dropped


# --- the query -------------------------------------------------------------------------------
def _col(name: str, table: str) -> exp.Column:
    return exp.column(name, table=table)


def training_query(features: Sequence[CompiledFeature], request: str = REQUEST) -> exp.Select:
    """One SELECT of `row_id, f1, f2, ...` (and `fN__rows` for SQL features) over the relation
    `request` (row_id, profile_id, ts): each feature's value as of its row's `ts`."""
    moment = _col("ts", "r")
    known = exp.and_(exp.EQ(this=_col("_feature_profile", "e"), expression=_col("profile_id", "r")),
                     exp.LTE(this=_col("timestamp", "e"), expression=moment.copy()),
                     exp.LTE(this=_col("received_at", "e"), expression=moment.copy()))
    ev = exp.select(exp.alias_(_col("profile_id", "ep"), "_feature_profile"), "e.*").from_(exp.to_table("events").as_("e")).join(
        exp.to_table("event_profiles").as_("ep"),
        on=exp.and_(exp.EQ(this=_col("source", "ep"), expression=_col("source", "e")),
                    exp.EQ(this=_col("message_id", "ep"), expression=_col("message_id", "e")))).where(
        exp.In(this=_col("profile_id", "ep"), query=exp.Subquery(this=exp.select("profile_id").from_(request))))
    out = exp.select(_col("row_id", "r")).from_(exp.to_table(request).as_("r"))
    ctes: list[tuple[str, exp.Expr]] = [("ev", ev)]
    aggs: list[exp.Expr] = []
    for i, f in enumerate(features, start=1):
        alias = f"f{i}"
        if f.func == "sql":
            assert f.query is not None
            inner = exp.select(exp.alias_(exp.Count(this=exp.Star()), "n"), exp.alias_(exp.Max(this=exp.column("value")), "value")).from_(
                exp.Subquery(this=sql_as_of(f.query, moment), alias="s0")).where(
                exp.EQ(this=_col("profile_id", "s0"), expression=_col("profile_id", "r")))
            body = exp.select(_col("row_id", "r"), _col("value", "s"), _col("n", "s")).from_(exp.to_table(request).as_("r")).join(
                exp.Lateral(this=exp.Subquery(this=inner), alias=exp.TableAlias(this=exp.to_identifier("s"))),
                join_type="LEFT", on=exp.true())
            name = f"sq_{i}"
            ctes.append((name, body))
            out = out.join(exp.to_table(name), on=exp.EQ(this=_col("row_id", name), expression=_col("row_id", "r")), join_type="LEFT")
            out = out.select(exp.alias_(_col("value", name), alias), exp.alias_(_col("n", name), f"{alias}__rows"))
        elif f.func == "most_frequent":
            assert f.value is not None and f.filter is not None
            value = f.value
            counts = exp.select(exp.alias_(_col("row_id", "r"), "row_id"), exp.alias_(value.copy(), "value"),
                                exp.alias_(exp.Window(this=exp.RowNumber(), partition_by=[_col("row_id", "r")],
                                                      order=exp.Order(expressions=[exp.Ordered(this=exp.Count(this=exp.Star()), desc=True),
                                                                                   exp.Ordered(this=value.copy())])), "rn")) \
                .from_(exp.to_table(request).as_("r")).join(exp.to_table("ev").as_("e"), on=known.copy()) \
                .where(exp.and_(exp.Paren(this=f.filter.copy()), exp.Not(this=exp.Is(this=value.copy(), expression=exp.Null())))) \
                .group_by(_col("row_id", "r"), value.copy())
            body = exp.select("row_id", "value").from_(exp.Subquery(this=counts, alias="t")).where(
                exp.EQ(this=exp.column("rn"), expression=exp.Literal.number(1)))
            name = f"mf_{i}"
            ctes.append((name, body))
            out = out.join(exp.to_table(name), on=exp.EQ(this=_col("row_id", name), expression=_col("row_id", "r")), join_type="LEFT")
            out = out.select(exp.alias_(_col("value", name), alias))
        else:
            assert f.aggregate is not None and f.filter is not None
            held: exp.Expr = exp.Not(this=exp.Is(this=_col("_feature_profile", "e"), expression=exp.Null()))
            if not (isinstance(f.filter, exp.Boolean) and f.filter.this is True):
                held = exp.and_(held, exp.Paren(this=f.filter.copy()))
            aggs.append(exp.alias_(exp.Filter(this=f.aggregate.copy(), expression=exp.Where(this=held)), alias))
            column: exp.Expr = _col(alias, "agg")
            if f.func in _COUNTS:
                column = exp.Coalesce(this=column, expressions=[exp.Literal.number(0)])
            out = out.select(exp.alias_(column, alias))
    if aggs:
        agg = exp.select(_col("row_id", "r"), *aggs).from_(exp.to_table(request).as_("r")).join(
            exp.to_table("ev").as_("e"), on=known, join_type="LEFT").group_by(_col("row_id", "r"))
        ctes.append(("agg", agg))
        out = out.join(exp.to_table("agg"), on=exp.EQ(this=_col("row_id", "agg"), expression=_col("row_id", "r")), join_type="LEFT")
    for cte_name, cte in ctes:
        out = cast(exp.Select, out.with_(cte_name, as_=cte))
    return cast(exp.Select, out.order_by(_col("row_id", "r")))


def _assemble(request: pa.Table, values: pa.Table, features: Sequence[CompiledFeature], names: Sequence[str],
              label: str | None) -> pa.Table:
    """Request columns and feature values side by side; a SQL feature with several rows for one
    profile is refused (its value would be an arbitrary one of them)."""
    for i, f in enumerate(features, start=1):
        if f.func != "sql":
            continue
        n = values.column(f"f{i}__rows")
        many = pc.greater(n, 1)
        if pc.any(many).as_py():
            rows = pc.filter(values.column("row_id"), many).to_pylist()
            raise FeatureError(f"SQL feature {f.feature.name!r} returns several rows for one profile ({len(rows)} request row(s), e.g. rows {_listed(rows)}).",
                               fix="GROUP BY the profile so the SELECT returns one row per profile_id.", field="sql")
    if values.column("row_id") != request.column("row_id"):
        raise FeatureError("The feature values came back for other rows than were asked for.",
                           fix="Report this with the request; it is a bug.")
    columns: dict[str, Any] = {"row": request.column("row_id"), "profile_id": request.column("requested"),
                               "profile_id_now": request.column("profile_id"), "timestamp": request.column("ts")}
    if label is not None:
        columns[label] = request.column("label")
    for i, name in enumerate(names, start=1):
        if name in columns:
            raise FeatureError(f"Feature {name!r} has the name of a request column.", fix="Rename the feature.", field="features")
        columns[name] = values.column(f"f{i}")
    return pa.table(columns)
