"""Materialisation: the online store filled by the offline store's own computation.

One run takes one moment `as_of` (now) and asks `offline.training_query` (the very SQL training
sets use) for every profile at that moment: a request relation of (row, profile, `as_of`), so a
value served online is the value a training set would give for that profile at that moment (no
second implementation, no training-serving skew).

A run is **full** (every live profile; merged ids recorded with their survivors; values of deleted
features and gone profiles dropped) or **incremental**: only the profiles whose events arrived since
the last run, when that gives the same answer as a full run. That holds when, as segments'
`members.changed_profiles` checks for rules: the same features at the same versions as last time,
none that moves with time by itself (a window relative to now, `N days ago`, or a SQL feature, which
may read `$as_of` anyhow), no merge, split, link or override since, and the events and their
attributions only grew (counts and order-free hashes equal the last ones plus the new rows'). The
touched profiles are then those of events loaded since the last run, and those of events dated
between the two runs (future-dated events received earlier, which the last run could not count).
Everything else is a full run, and the result says why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from sqlglot import exp

from refinery.features import registry
from refinery.features.compile import CompiledFeature, compile_feature
from refinery.features.definition import Feature
from refinery.features.offline import MAX_MERGE_HOPS, REQUEST, training_query
from refinery.features.online import Entry, OnlineStore, jsonable
from refinery.storage.engine import Engine

log = logging.getLogger(__name__)

#: Profiles per request relation (one query each), so memory stays bounded on large stores.
CHUNK = 200_000


@dataclass
class MaterializeResult:
    mode: str                    # full | incremental
    reason: str                  # why this mode
    as_of: str
    features: dict[str, int]     # name -> version materialised
    profiles: int                # profiles computed
    values: int                  # values written
    removed: int = 0             # values of gone profiles or features dropped (full runs)
    aliases: int = 0             # merged ids recorded (full runs)
    seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_dependent(compiled: CompiledFeature) -> bool:
    """Whether the value can change with time alone (no new event): a SQL feature (it may read
    `$as_of` anywhere), or an expression whose filter or aggregate mentions the moment."""
    if compiled.func == "sql":
        return True
    for part in (compiled.filter, compiled.aggregate, compiled.value):
        if part is not None and any(c.name == "ts" and c.table == "r" for c in part.find_all(exp.Column)):
            return True
    return False


def materialize(engine: Engine, store: OnlineStore, names: Sequence[str] | None = None, *, incremental: bool = True,
                now: datetime | None = None) -> MaterializeResult:
    """Compute and write the features (`names`, default all) for the profiles that need it, as of now."""
    from refinery.segments import store as segment_store
    from refinery.segments.members import table_inputs

    started = time.monotonic()
    as_of = (now or datetime.now(UTC)).astimezone(UTC)
    since = time.time()
    cur = engine.fresh_reader()  # a snapshot taken after `as_of`: what arrives later is not known at as_of anyway
    try:
        defs = _features(engine, names, cur)
        ctx = segment_store.context(engine, cursor=cur)
        compiled = [compile_feature(f, ctx, exp.column("ts", table="r")) for f in defs]
        versions = {f.name: f.version for f in defs}
        tables = table_inputs(engine, cursor=cur)
        settled_now = settled(engine, cur)
        last = store.state(fresh=True)
        touched, reason = (None, "asked for a full run") if not incremental else _touched(engine, last, versions, compiled, tables,
                                                                                          names, as_of, cur)
        live = [str(r[0]) for r in engine.fetch_all("SELECT profile_id FROM profiles ORDER BY profile_id", cursor=cur)]
        if touched is not None:
            live_set = set(live)
            targets = sorted(p for p in touched if p in live_set)
        else:
            targets = live
        values: dict[str, dict[str, Entry]] = {}
        errors: dict[str, str] = {}
        moment = as_of.timestamp()
        for start in range(0, len(targets), CHUNK):
            chunk = targets[start:start + CHUNK]
            values.update(_compute(engine, compiled, chunk, as_of, moment, errors, cur))
        aliases = _aliases(engine, set(live), cur) if touched is None else None
    finally:
        cur.close()
    full_all = touched is None and names is None
    written = store.put(values, replace=names is None, since=since)
    result = MaterializeResult("full" if touched is None else "incremental", reason, as_of.isoformat(), versions, len(targets), written,
                               errors=errors)
    if full_all:
        result.removed = store.retain(set(live), set(versions))
    if aliases is not None:
        store.set_aliases(aliases)
        result.aliases = len(aliases)
    if names is None:
        confirmed = {n: [v, moment] for n, v in versions.items()}
        store.save_state({"as_of": as_of.isoformat(), "features": versions, "tables": tables, "settled": settled_now, "confirmed": confirmed,
                          "mode": result.mode})
    else:  # a run of some features confirms only them, and leaves the incremental watermark alone
        state = dict(last)
        state["confirmed"] = {**state.get("confirmed", {}), **{n: [v, moment] for n, v in versions.items()}}
        store.save_state(state)
    result.seconds = round(time.monotonic() - started, 3)
    log.info("features: %s materialisation of %d feature(s) for %d profile(s) (%s)", result.mode, len(versions), len(targets), reason)
    return result


def _features(engine: Engine, names: Sequence[str] | None, cur: Any) -> list[Feature]:
    if names:
        return [registry.get(engine, n, cursor=cur) for n in dict.fromkeys(names)]
    return registry.list_features(engine, cursor=cur)


def _touched(engine: Engine, last: dict[str, Any], versions: dict[str, int], compiled: list[CompiledFeature],
             tables: dict[str, list[Any]], names: Sequence[str] | None, as_of: datetime, cur: Any) -> tuple[set[str] | None, str]:
    """(the profiles to recompute, why) or (None, why a full run is needed)."""
    if names:
        return None, "some features asked for by name"
    if not last.get("as_of"):
        return None, "first materialisation"
    if last.get("features") != versions:
        return None, "features or their versions changed since the last run"
    moving = [c.feature.name for c in compiled if time_dependent(c)]
    if moving:
        return None, f"feature(s) whose value moves with time: {', '.join(moving)}"
    was = last.get("tables") or {}
    changed = [t for t in ("profile_merges", "identity_links", "identity_overrides") if was.get(t) != tables.get(t)]
    if changed:
        return None, f"identities changed ({', '.join(changed)})"
    before = last.get("settled")
    if not before or before.get("watermark") is None:
        return None, "the last run had no settled events to build on"
    watermark = before["watermark"]
    if _settled_summary(engine, watermark, cur) != before.get("summary"):
        return None, "events or their attributions changed other than by new events (retention, erasure, identity resolution)"
    rows = engine.fetch_all(
        "SELECT DISTINCT ep.profile_id FROM event_profiles ep JOIN events e ON e.source = ep.source AND e.message_id = ep.message_id "
        "WHERE e.loaded_at > ?::TIMESTAMPTZ OR (e.timestamp > ?::TIMESTAMPTZ AND e.timestamp <= ?::TIMESTAMPTZ)",
        [watermark, last["as_of"], as_of.isoformat()], cursor=cur)
    return {str(r[0]) for r in rows}, f"only new events since {last['as_of']}"


def settled(engine: Engine, cur: Any) -> dict[str, Any]:
    """The watermark the next incremental run builds on: the newest `loaded_at` before the first
    event not yet attributed to a profile (identity resolution may attribute it later, and its
    profile must then be recomputed), with a summary of the events and attributions up to it."""
    row = engine.fetch_all(
        "SELECT max(loaded_at)::VARCHAR FROM events WHERE loaded_at < coalesce((SELECT min(e.loaded_at) FROM events e "
        "WHERE NOT EXISTS (SELECT 1 FROM event_profiles ep WHERE ep.source = e.source AND ep.message_id = e.message_id)), "
        "'infinity'::TIMESTAMPTZ)", cursor=cur)[0]
    watermark = row[0]
    return {"watermark": watermark, "summary": None if watermark is None else _settled_summary(engine, watermark, cur)}


def _settled_summary(engine: Engine, watermark: str, cur: Any) -> list[str]:
    """Counts and order-free hashes of the events loaded by `watermark` and their attributions:
    equal summaries mean nothing loaded by then was deleted or attributed elsewhere."""
    row = engine.fetch_all(
        "SELECT (SELECT count(*) FROM events WHERE loaded_at <= ?::TIMESTAMPTZ), "
        "(SELECT bit_xor(hash(source, message_id)) FROM events WHERE loaded_at <= ?::TIMESTAMPTZ), "
        "(SELECT count(*) FROM event_profiles ep JOIN events e ON e.source = ep.source AND e.message_id = ep.message_id "
        " WHERE e.loaded_at <= ?::TIMESTAMPTZ), "
        "(SELECT bit_xor(hash(ep.source, ep.message_id, ep.profile_id)) FROM event_profiles ep JOIN events e "
        " ON e.source = ep.source AND e.message_id = ep.message_id WHERE e.loaded_at <= ?::TIMESTAMPTZ)",
        [watermark] * 4, cursor=cur)[0]
    return [str(v) for v in row]


def _compute(engine: Engine, compiled: list[CompiledFeature], profiles: list[str], as_of: datetime, moment: float,
             errors: dict[str, str], cur: Any) -> dict[str, dict[str, Entry]]:
    """Each profile's values at `as_of`, by the training-set SQL over rows (profile, as_of)."""
    if not profiles or not compiled:
        return {p: {} for p in profiles}
    request = pa.table({"row_id": pa.array(range(len(profiles)), pa.int64()), "profile_id": pa.array(profiles, pa.string()),
                        "ts": pa.array([as_of] * len(profiles), pa.timestamp("us", tz="UTC"))})
    engine.register(REQUEST, request, cursor=cur)
    try:
        table = engine.fetch_arrow(training_query(compiled), cursor=cur)
    finally:
        engine.unregister(REQUEST, cursor=cur)
    if table.column("row_id").to_pylist() != list(range(len(profiles))):
        raise RuntimeError("feature values came back for other rows than were asked for")  # the offline store's invariant
    out: dict[str, dict[str, Entry]] = {p: {} for p in profiles}
    for i, f in enumerate(compiled, start=1):
        column = table.column(f"f{i}").to_pylist()
        many: set[int] = set()
        if f.func == "sql":
            n = table.column(f"f{i}__rows")
            bad = pc.greater(n, 1)
            if pc.any(bad).as_py():
                many = set(pc.filter(table.column("row_id"), bad).to_pylist())
                errors[f.feature.name] = (f"SQL feature {f.feature.name!r} returns several rows for {len(many)} profile(s); "
                                          "those are not written. GROUP BY the profile.")
        entry_of = (f.feature.version, f.feature.ttl_seconds)
        for row, (p, value) in enumerate(zip(profiles, column, strict=True)):
            if row not in many:
                out[p][f.feature.name] = (entry_of[0], jsonable(value), moment, entry_of[1])
    return out


def _aliases(engine: Engine, live: set[str], cur: Any) -> dict[str, str]:
    """Every merged profile id (not undone) -> the live profile it ended in."""
    hops = {str(a): str(b) for a, b in engine.fetch_all(
        "SELECT merged_profile_id, arg_max(surviving_profile_id, merged_at) FROM profile_merges WHERE undone_at IS NULL GROUP BY 1",
        cursor=cur)}
    out: dict[str, str] = {}
    for start in hops:
        if start in live:
            continue
        at = start
        for _ in range(MAX_MERGE_HOPS):
            nxt = hops.get(at)
            if nxt is None:
                break
            at = nxt
            if at in live:
                out[start] = at
                break
    return out
