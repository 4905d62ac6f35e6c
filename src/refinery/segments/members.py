"""Membership: recompute segments, keep their history, and tell activation who entered and who left.

A run evaluates a segment's rule (the version in force at the run's `as_of`) over the store, then,
in one writer transaction, diffs the new member set against the open rows of `segment_members`:
rows of profiles no longer in are closed (`exited_at` = the run's as-of), profiles newly in get an
open row (`entered_at` = the run's as-of), and a `segment_exited` / `segment_entered` row goes to
the `segment_events` outbox for each, with the run's row and its audit row. Either all of that
commits or none of it.

The rule is evaluated on a read cursor *before* the writer transaction (a query over millions of
events must not hold up the collector's commits); the writer is drained first, so the run sees
every event received before its as-of that had reached the writer. The diff itself always reads
the open rows inside the transaction, so two runs never double-count. A run whose as-of is older
than the segment's last completed run is recorded `superseded` and changes nothing: history only
moves forward.

Incremental: a run compares the fingerprint of everything a rule can read (its version, the
versions of the segments it reaches, the input tables' row counts and change marks, and the as-of
itself when the rule has a window relative to now) with the last completed run's; when equal,
the segment is skipped. See docs/decisions/0019-segment-membership.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import pyarrow as pa

from refinery.errors import RefineryError
from refinery.governance import audit
from refinery.governance.principal import Principal
from refinery.segments import store
from refinery.storage.engine import Engine
from refinery.storage.writer import Writer

log = logging.getLogger(__name__)

#: Who runs the scheduled recomputation inside `refinery serve` (the audit actor).
SYSTEM = Principal("system", "system:segments", "admin")

#: Summaries of the tables a rule can read; equal summaries mean nothing a rule reads has changed.
_INPUTS: dict[str, str] = {
    "events": "SELECT count(*), max(received_at)::VARCHAR, bit_xor(hash(source, message_id)), max(loaded_at)::VARCHAR FROM events",
    "event_profiles": "SELECT count(*), bit_xor(hash(source, message_id, profile_id)) FROM event_profiles",
    "profiles": "SELECT count(*), max(updated_at)::VARCHAR, bit_xor(hash(profile_id, updated_at)) FROM profiles",
    "profile_merges": "SELECT count(*), bit_xor(hash(merged_profile_id, surviving_profile_id, undone_at)) FROM profile_merges",
    "identity_links": "SELECT count(*), bit_xor(hash(link_id, removed_at)) FROM identity_links",
    "identity_overrides": "SELECT count(*), bit_xor(hash(override_id, revoked_at)) FROM identity_overrides",
    "computed_trait_values": "SELECT count(*), max(computed_at)::VARCHAR, bit_xor(hash(profile_id, name, computed_at)) FROM computed_trait_values",
}

_NEW = "_segment_new_members"
# The diff of a run, as constant text over the registered new member set (`_NEW`); values are bound.
_NEW_IDS = f"SELECT DISTINCT profile_id FROM {_NEW} WHERE profile_id IS NOT NULL"  # noqa: S608 - constant text
_LEAVING = f"FROM segment_members m WHERE m.segment = ? AND m.exited_at IS NULL AND m.profile_id NOT IN ({_NEW_IDS})"  # noqa: S608
_ENTERING = ("FROM (" + _NEW_IDS + ") n WHERE n.profile_id NOT IN "  # noqa: S608 - constant text
             "(SELECT profile_id FROM segment_members WHERE segment = ? AND exited_at IS NULL)")
_OUTBOX = ("INSERT INTO segment_events (event_id, kind, segment, profile_id, occurred_at, run_id, version, recorded_at) "
           "SELECT nextval('segment_event_seq'), ")
_CLOSE = ("UPDATE segment_members SET exited_at = ?, exited_run = ? WHERE segment = ? AND exited_at IS NULL "  # noqa: S608
          "AND profile_id NOT IN (" + _NEW_IDS + ")")
_OPEN = "INSERT INTO segment_members (segment, profile_id, entered_at, exited_at, entered_run, exited_run) SELECT ?, n.profile_id, ?, NULL, ?, NULL "


@dataclass
class SegmentRun:
    run_id: str
    segment: str
    version: int | None
    as_of: str
    trigger: str
    actor: str
    started_at: str
    finished_at: str | None = None
    members: int | None = None
    entered: int | None = None
    exited: int | None = None
    status: str = "completed"
    error: str | None = None
    #: An incremental run: how many profiles it evaluated (those whose inputs changed); None: every profile.
    incremental: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunReport:
    as_of: str
    trigger: str
    runs: list[SegmentRun] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [r.segment for r in self.runs if r.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        return {"as_of": self.as_of, "trigger": self.trigger, "runs": [r.to_dict() for r in self.runs],
                "skipped": self.skipped, "failed": self.failed}


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat()


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def table_inputs(engine: Engine, *, cursor: Any = None) -> dict[str, list[Any]]:
    """The summary of every input table (counts and change marks), read once per run of many segments."""
    cur = cursor if cursor is not None else engine.fresh_reader()
    return {name: [None if v is None else str(v) for v in engine.fetch_all(sql, cursor=cur)[0]] for name, sql in _INPUTS.items()}


def time_dependent(compiled: Any) -> bool:
    """Whether the rule's answer can change with time alone: a window `in last ...`, or a moment
    written `N days ago`, anywhere in it (segments it includes are compiled into it, so checked too)."""
    from refinery.segments import ast

    stack: list[Any] = [compiled.checked if compiled.checked is not None else compiled.rule]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Window) and node.last is not None:
            return True
        if isinstance(node, ast.Literal) and node.type == "ago":
            return True
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            for f in dataclasses.fields(node):
                if f.name != "span":
                    stack.append(getattr(node, f.name))
        elif isinstance(node, (tuple, list)):
            stack.extend(node)
        elif isinstance(node, Mapping):  # the checked rules of included segments
            stack.extend(node.values())
    return False


def fingerprint(engine: Engine, name: str, version: int, compiled: Any, tables: dict[str, list[Any]], as_of: datetime,
                *, cursor: Any = None) -> dict[str, Any]:
    """What a run of `name` reads, summarised: equal fingerprints give equal members."""
    refs = sorted(compiled.segments_referenced)
    ref_versions = {}
    for ref in refs:
        ref_versions[ref] = store.version_at(engine, ref, as_of, cursor=cursor).version
    fp: dict[str, Any] = {"version": version, "segments": ref_versions, "tables": tables}
    if time_dependent(compiled):
        fp["as_of"] = _iso(as_of)
    fp["digest"] = hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()
    return fp


def last_completed(engine: Engine, name: str, *, cursor: Any = None) -> dict[str, Any] | None:
    rows = engine.fetch_dicts(
        "SELECT run_id, as_of, inputs FROM segment_runs WHERE segment = ? AND status = 'completed' ORDER BY as_of DESC, started_at DESC LIMIT 1",
        [name], cursor=cursor if cursor is not None else engine.reader(),
    )
    if not rows:
        return None
    row = rows[0]
    row["inputs"] = json.loads(row["inputs"]) if isinstance(row["inputs"], str) else row["inputs"]
    return row


# --- evaluating and applying ----------------------------------------------------------------------

def register_persons(engine: Engine, compiled: Any, cursor: Any, rules: Any) -> None:
    """A rule `counted by persons above T` reads the profile -> person groups at T: register them
    on `cursor` (computed by refinery.profiles.persons from the links at or above T)."""
    threshold = compiled.persons_threshold
    if threshold is None:
        return
    from refinery.identity.rules import IdentityRules
    from refinery.profiles.persons import IdentityPolicy, persons
    from refinery.segments.compile import PERSONS_TABLE

    groups = persons(engine, IdentityPolicy("probabilistic", threshold), rules if rules is not None else IdentityRules())
    engine.register(PERSONS_TABLE, groups.to_arrow(), cursor=cursor)


def evaluate(engine: Engine, compiled: Any, as_of: datetime, *, rules: Any = None, among: pa.Table | None = None) -> pa.Table:
    """The member set of a compiled rule as of `as_of`: one `profile_id` column, distinct, on a fresh
    reader; `among` (a table of profile ids): only those profiles are evaluated."""
    cursor = engine.fresh_reader()
    try:
        register_persons(engine, compiled, cursor, rules)
        if among is not None:
            engine.register(_AMONG, among, cursor=cursor)
        table = engine.fetch_arrow(compiled.members(as_of, among=_AMONG if among is not None else None), cursor=cursor)
    finally:
        cursor.close()
    return table.select([0]).rename_columns(["profile_id"])


_AMONG = "_segment_among"


def _xor(a: Any, b: Any) -> int:
    return int(a or 0) ^ int(b or 0)


def changed_profiles(engine: Engine, compiled: Any, last: dict[str, Any] | None, current: dict[str, Any], *,
                     cursor: Any) -> pa.Table | None:
    """The profiles whose inputs changed since the last completed run, when the rule allows an
    incremental run; None when every profile must be evaluated.

    A rule allows it when each profile's answer depends on that profile's own events and traits
    only, and on nothing that moves by itself: not counted by persons, no window relative to now,
    the same version (and the same versions of the segments it includes). The store allows it when
    since the last run events were only added (the counts and order-free hashes of `events` and
    `event_profiles` then equal the last ones plus those of the rows loaded since: nothing deleted,
    no old event attributed elsewhere) and no merge, split, link or override changed. Then the
    changed profiles are those the new events belong to and those whose `profiles` row was
    rewritten (a trait changed); every other profile's answer is the one recorded."""
    if last is None or compiled.persons_threshold is not None or time_dependent(compiled):
        return None
    before = last.get("inputs") or {}
    if before.get("version") != current["version"] or before.get("segments") != current["segments"]:
        return None
    was, now = before.get("tables") or {}, current["tables"]
    if any(was.get(t) != now.get(t) for t in ("profile_merges", "identity_links", "identity_overrides")):
        return None
    try:
        events_was, ep_was, profiles_was = was["events"], was["event_profiles"], was["profiles"]
        watermark = events_was[3]
    except (KeyError, IndexError, TypeError):
        return None  # a run recorded before these summaries existed
    if watermark is None:
        return None
    new_events = engine.fetch_all("SELECT count(*), bit_xor(hash(source, message_id)) FROM events WHERE loaded_at > ?::TIMESTAMPTZ",
                                  [watermark], cursor=cursor)[0]
    new_ep = engine.fetch_all(
        "SELECT count(*), bit_xor(hash(ep.source, ep.message_id, ep.profile_id)) FROM event_profiles ep "
        "JOIN events e ON e.source = ep.source AND e.message_id = ep.message_id WHERE e.loaded_at > ?::TIMESTAMPTZ",
        [watermark], cursor=cursor)[0]
    if (int(events_was[0]) + int(new_events[0]) != int(now["events"][0]) or _xor(events_was[2], new_events[1]) != int(now["events"][2] or 0)
            or int(ep_was[0]) + int(new_ep[0]) != int(now["event_profiles"][0])
            or _xor(ep_was[1], new_ep[1]) != int(now["event_profiles"][1] or 0)):
        return None
    touched = engine.fetch_arrow(
        "SELECT DISTINCT ep.profile_id FROM event_profiles ep JOIN events e ON e.source = ep.source AND e.message_id = ep.message_id "
        "WHERE e.loaded_at > ?::TIMESTAMPTZ UNION SELECT profile_id FROM profiles WHERE updated_at > coalesce(?::TIMESTAMPTZ, '-infinity')",
        [watermark, profiles_was[1]], cursor=cursor)
    return touched.select([0]).rename_columns(["profile_id"])


def _carried_over(engine: Engine, name: str, touched: pa.Table, evaluated: pa.Table) -> pa.Table:
    """Inside the writer: an incremental run's member set: the open members it did not evaluate, and
    those it found among the profiles it did."""
    import pyarrow.compute as pc

    open_ids = engine.fetch_arrow("SELECT profile_id FROM segment_members WHERE segment = ? AND exited_at IS NULL", [name]).column(0)
    kept = pc.filter(open_ids, pc.invert(pc.is_in(open_ids, value_set=touched.column(0))))
    return pa.table({"profile_id": pa.concat_arrays([kept.combine_chunks().cast(pa.string()),
                                                     evaluated.column(0).combine_chunks().cast(pa.string())])})


def _apply(engine: Engine, run: SegmentRun, new_members: pa.Table, as_of: datetime, inputs: dict[str, Any], actor: Principal) -> SegmentRun:
    """Inside the writer: diff `new_members` against the open rows, write history, outbox, run row, audit row."""
    last = engine.fetch_all(
        "SELECT max(as_of) FROM segment_runs WHERE segment = ? AND status = 'completed'", [run.segment]
    )[0][0]
    now = datetime.now(UTC)
    if last is not None and _utc(last) > as_of:
        run.status, run.error = "superseded", f"a run as of {_iso(last)} completed first; history only moves forward"
        _record_run(engine, run, as_of, now, inputs)
        return run
    engine.register(_NEW, new_members)
    try:
        params = [run.segment, as_of, run.run_id, run.version, now, run.segment]
        engine.execute(_OUTBOX + "'segment_exited', ?, m.profile_id, ?, ?, ?, ? " + _LEAVING, params)
        exited = engine.fetch_all(_CLOSE, [as_of, run.run_id, run.segment])
        entered = engine.fetch_all(_OUTBOX + "'segment_entered', ?, n.profile_id, ?, ?, ?, ? " + _ENTERING, params)
        engine.execute(_OPEN + _ENTERING, [run.segment, as_of, run.run_id, run.segment])
        members = engine.fetch_all("SELECT count(*) FROM segment_members WHERE segment = ? AND exited_at IS NULL", [run.segment])
    finally:
        engine.unregister(_NEW)
    run.entered, run.exited, run.members = _n(entered), _n(exited), _n(members)
    _record_run(engine, run, as_of, now, inputs)
    audit.record(engine, actor, "segments.run", f"segment:{run.segment}",
                 {"run_id": run.run_id, "version": run.version, "trigger": run.trigger, "members": run.members,
                  "entered": run.entered, "exited": run.exited})
    return run


def _n(rows: list[tuple[Any, ...]]) -> int:
    return int(rows[0][0]) if rows and rows[0][0] is not None else 0


def _record_run(engine: Engine, run: SegmentRun, as_of: datetime, now: datetime, inputs: dict[str, Any] | None) -> None:
    run.finished_at = _iso(now)
    engine.execute(
        "INSERT INTO segment_runs (run_id, segment, version, as_of, trigger, actor, started_at, finished_at, members, entered, "
        "exited, status, error, inputs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [run.run_id, run.segment, run.version, as_of, run.trigger, run.actor, datetime.fromisoformat(run.started_at), now,
         run.members, run.entered, run.exited, run.status, run.error,
         json.dumps(inputs, sort_keys=True, default=str) if inputs is not None else None],
    )


def close_all(engine: Engine, name: str, version: int, at: datetime, actor: Principal) -> int:
    """Inside the writer: every open membership of `name` ends at `at` (the segment is deleted), with
    segment_exited rows in the outbox and a run row (trigger `delete`)."""
    run = SegmentRun(f"segrun_{uuid.uuid4().hex[:16]}", name, version, _iso(at), "delete", actor.name, _iso(at))
    done = _apply(engine, run, pa.table({"profile_id": pa.array([], pa.string())}), at, {}, actor)
    return done.exited or 0


# --- runs -------------------------------------------------------------------------------------------

def run_segments(engine: Engine, writer: Writer, actor: Principal, names: Iterable[str] | None = None, *,
                 as_of: datetime | None = None, trigger: str = "cli", force: bool = False, rules: Any = None,
                 on_progress: Callable[[SegmentRun], None] | None = None) -> RunReport:
    """Recompute `names` (default: every live segment) as of `as_of` (default: now).

    Segments whose inputs did not change since their last completed run are skipped (listed in
    `skipped`) unless `force`. A segment whose rule fails is recorded `failed` with the reason and
    the others still run. A named as-of older than a segment's last run is refused (history only
    moves forward; read a past audience with `members(..., as_of=...)`)."""
    explicit_as_of = as_of is not None
    at = _utc(as_of) if as_of is not None else datetime.now(UTC)
    if at > datetime.now(UTC):
        raise store.SegmentLifecycleError(f"As-of {_iso(at)} is in the future.", fix="Give a past moment, or leave --as-of out for now.",
                                          field="as_of")
    writer.call(lambda e: None)  # drain: everything queued before this moment is committed
    cur = engine.fresh_reader()
    try:
        wanted = list(names) if names is not None else [s.name for s in store.list_segments(engine, cursor=cur)]
        for n in wanted:
            store.get(engine, n, cursor=cur)
        report = RunReport(_iso(at), trigger)
        tables = table_inputs(engine, cursor=cur)
        catalog = _catalog(engine) if wanted else None
        shared = _Inputs(tables, catalog, rules)
        ready: list[_Ready] = []
        for name in wanted:
            prepared = _prepare(engine, writer, actor, name, at, shared, trigger, force, explicit_as_of, cur)
            if prepared is None:
                report.skipped.append(name)
            elif isinstance(prepared, SegmentRun):  # its rule failed; recorded already
                report.runs.append(prepared)
                if on_progress:
                    on_progress(prepared)
            else:
                ready.append(prepared)
        for done in _evaluate_and_apply(engine, writer, actor, ready, at, shared):
            report.runs.append(done)
            if on_progress:
                on_progress(done)
    finally:
        cur.close()
    return report


@dataclass(frozen=True)
class _Inputs:
    """What every segment of one run shares: the input tables' summary, the catalog, the identity rules."""

    tables: dict[str, list[Any]]
    catalog: Any
    rules: Any


def _catalog(engine: Engine) -> Any:
    from refinery.segments.catalog import cached_catalog

    return cached_catalog(engine)


@dataclass
class _Ready:
    """A segment whose run will happen: its compiled rule, input fingerprint, and (incremental
    runs) the profiles to evaluate."""

    run: SegmentRun
    compiled: Any
    inputs: dict[str, Any]
    touched: pa.Table | None


def _prepare(engine: Engine, writer: Writer, actor: Principal, name: str, at: datetime, shared: _Inputs,
             trigger: str, force: bool, explicit_as_of: bool, cur: Any) -> _Ready | SegmentRun | None:
    """Compile `name`'s rule in force at `at` and decide: skip (None), failed (the recorded run), or
    run, in full or among the profiles whose inputs changed."""
    started = datetime.now(UTC)
    last = last_completed(engine, name, cursor=cur)
    if explicit_as_of and last is not None and _utc(last["as_of"]) > at:
        raise store.SegmentLifecycleError(
            f"Segment {name!r} has membership history up to {_iso(last['as_of'])}; a run as of {_iso(at)} would rewrite it.",
            fix=f"Read the audience of that moment instead: refinery segments members {name} --as-of {_iso(at)}",
            field="as_of",
        )
    run = SegmentRun(f"segrun_{uuid.uuid4().hex[:16]}", name, None, _iso(at), trigger, actor.name, _iso(started))
    try:
        version = store.version_at(engine, name, at, cursor=cur)
        run.version = version.version
        compiled = store.compile_text(engine, version.rule, name=name, as_of=at, catalog=shared.catalog, cursor=cur)
        inputs = fingerprint(engine, name, version.version, compiled, shared.tables, at, cursor=cur)
        if not force and last is not None and (last["inputs"] or {}).get("digest") == inputs["digest"]:
            return None
        touched = None if force else changed_profiles(engine, compiled, last, inputs, cursor=cur)
    except RefineryError as e:
        return _failed(writer, run, at, e)
    return _Ready(run, compiled, inputs, touched)


def _failed(writer: Writer, run: SegmentRun, at: datetime, e: RefineryError) -> SegmentRun:
    run.status, run.error = "failed", f"{type(e).__name__}: {e.message}"
    log.warning("segment run %s failed: %s", run.run_id, type(e).__name__)
    writer.call(lambda eng: _record_run(eng, run, at, datetime.now(UTC), None))
    return run


def _evaluate_together(engine: Engine, ready: list[_Ready], at: datetime) -> dict[str, pa.Table] | None:
    """The member sets of full runs counted by profiles, from one query over the events for all of
    them (`compile_many`); None when fewer than two, or when the query fails (then each runs alone,
    so a failure is the failing segment's)."""
    from refinery.segments.compile import CompiledMany

    batched = [r for r in ready if r.touched is None and r.compiled.persons_threshold is None]
    if len(batched) < 2:
        return None
    many = CompiledMany({r.run.segment: r.compiled for r in batched}, tuple(r.run.segment for r in batched), ())
    query = many.members(at)
    assert query is not None
    cursor = engine.fresh_reader()
    try:
        table = engine.fetch_arrow(query, cursor=cursor)
    except RefineryError as e:
        log.warning("segments evaluated together failed (%s); evaluating each alone", type(e).__name__)
        return None
    finally:
        cursor.close()
    import pyarrow.compute as pc

    segment = table.column(0)
    return {r.run.segment: table.filter(pc.equal(segment, r.run.segment)).select([1]).rename_columns(["profile_id"])
            for r in batched}


def _evaluate_and_apply(engine: Engine, writer: Writer, actor: Principal, ready: list[_Ready], at: datetime,
                        shared: _Inputs) -> Iterator[SegmentRun]:
    together = _evaluate_together(engine, ready, at) or {}
    for r in ready:
        name = r.run.segment
        try:
            new_members = together.pop(name, None)
            if new_members is None:
                new_members = evaluate(engine, r.compiled, at, rules=shared.rules, among=r.touched)
        except RefineryError as e:
            yield _failed(writer, r.run, at, e)
            continue
        yield writer.call(partial(_apply_ready, ready=r, found=new_members, at=at, actor=actor))


def _apply_ready(engine: Engine, *, ready: _Ready, found: pa.Table, at: datetime, actor: Principal) -> SegmentRun:
    """Inside the writer: a full run's members are those found; an incremental run's are carried over
    for the profiles it did not evaluate."""
    if ready.touched is None:
        return _apply(engine, ready.run, found, at, ready.inputs, actor)
    ready.run.incremental = ready.inputs["incremental"] = ready.touched.num_rows
    return _apply(engine, ready.run, _carried_over(engine, ready.run.segment, ready.touched, found), at, ready.inputs, actor)


# --- reads ----------------------------------------------------------------------------------------

def members_from_history(engine: Engine, name: str, at: datetime | None = None, *, limit: int | None = None,
                         cursor: Any = None) -> list[dict[str, Any]]:
    """Members as recorded: rows open at `at` (default: now), i.e. as the runs up to then found them."""
    store.get(engine, name, include_deleted=at is not None, cursor=cursor)
    cur = cursor if cursor is not None else engine.reader()
    if at is None:
        sql = "SELECT profile_id, entered_at FROM segment_members WHERE segment = ? AND exited_at IS NULL ORDER BY profile_id"
        params: list[Any] = [name]
    else:
        sql = ("SELECT profile_id, entered_at FROM segment_members WHERE segment = ? AND entered_at <= ? "
               "AND (exited_at IS NULL OR exited_at > ?) ORDER BY profile_id")
        params = [name, _utc(at), _utc(at)]
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [{"profile_id": p, "entered_at": _iso(e)} for p, e in engine.fetch_all(sql, params, cursor=cur)]


def members_evaluated(engine: Engine, name: str, at: datetime, *, limit: int | None = None, rules: Any = None,
                      trait_policy: Any = None) -> dict[str, Any]:
    """Members by evaluation: the rule version in force at `at` over events received by `at`, and
    (given the store's `trait_policy`) traits as the identify calls received by `at` made them."""
    at = _utc(at)
    cur = engine.fresh_reader()
    try:
        version = store.version_at(engine, name, at, cursor=cur)
        compiled = store.compile_text(engine, version.rule, name=name, as_of=at, cursor=cur, traits_as_of=trait_policy)
    finally:
        cur.close()
    ids = sorted(str(p) for p in evaluate(engine, compiled, at, rules=rules).column(0).to_pylist() if p is not None)
    return {"segment": name, "as_of": _iso(at), "version": version.version, "source": "evaluated", "count": len(ids),
            "members": ids[:limit] if limit is not None else ids}


def history(engine: Engine, name: str, *, limit: int = 50, cursor: Any = None) -> dict[str, Any]:
    """A segment's versions and its latest runs (newest first)."""
    cur = cursor if cursor is not None else engine.reader()
    seg = store.get(engine, name, include_deleted=True, cursor=cur)
    runs = engine.fetch_dicts(
        "SELECT run_id, version, as_of, trigger, actor, started_at, finished_at, members, entered, exited, status, error "
        "FROM segment_runs WHERE segment = ? ORDER BY started_at DESC LIMIT ?", [name, limit], cursor=cur,
    )
    for r in runs:
        for k in ("as_of", "started_at", "finished_at"):
            r[k] = _iso(r[k]) if r[k] is not None else None
    return {"segment": seg.to_dict(), "versions": [v.to_dict() for v in store.versions(engine, name, cursor=cur)], "runs": runs}


def profile_history(engine: Engine, name: str, profile_id: str, *, cursor: Any = None) -> list[dict[str, Any]]:
    """Every stay of one profile in a segment (entered, exited)."""
    rows = engine.fetch_all(
        "SELECT entered_at, exited_at, entered_run, exited_run FROM segment_members WHERE segment = ? AND profile_id = ? ORDER BY entered_at",
        [name, profile_id], cursor=cursor if cursor is not None else engine.reader(),
    )
    return [{"entered_at": _iso(a), "exited_at": _iso(b) if b is not None else None, "entered_run": c, "exited_run": d}
            for a, b, c, d in rows]
