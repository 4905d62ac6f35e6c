"""Real-time segments: rules kept up to date event by event, and windows that slide out on a timer.

`RealtimeSegments` holds, per (condition, profile), only what the condition needs to be answered
at any later moment:
- counts (`performed ...`, `count(...)`, computed traits that count): the sorted times of the
  matching events still inside the window's reach, at most `cap` of those already counted (a count
  compared with N only needs to tell N+1 from more), so memory per profile is bounded;
- sequences: the times of events matching any step, with which steps they match, inside the
  window's reach; the chain is found again (latest start per step, strictly later steps) when asked;
- traits: the profile's traits as the `profiles` table has them (`set_traits`).

Each change of state re-evaluates the segments it touches for that profile at the moment of
ingestion (the event's `received_at`), and computes the next moment its answer can change with
time alone (an event leaving a window, a future-dated event becoming due); a min-heap of those
moments drives `on_tick(now)`. Membership changes come out as `Change` values (`segment_entered`,
`segment_exited`) with the exact moment they happened; `record(engine, changes)` writes them to the
`segment_events` outbox and `segment_members`, as membership runs do (members.py).

Semantics are the reference evaluator's (reference.py) at every moment; tests/segments/test_agreement.py
checks that against it and the compiled SQL. Rules with a moment written `N days ago` inside a
`where`, a trait comparison or an aggregate's comparison are refused (`NotRealtime`): their
filters change with time for every stored event; windows with `ago` bounds are fine.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import threading
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from refinery.errors import RefineryError
from refinery.segments import ast
from refinery.segments import reference as ref
from refinery.segments.check import Checked, event_field, trait_parts
from refinery.segments.compile import Compiled, window_bounds
from refinery.storage.engine import Engine

log = logging.getLogger(__name__)

__all__ = ["Change", "NotRealtime", "RealtimeSegments", "follow", "record"]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_NEVER = 1 << 62


def us(moment: datetime) -> int:
    """An aware datetime as integer microseconds since the epoch (DuckDB's precision)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - EPOCH) // _US


def at(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


class NotRealtime(RefineryError):
    """A rule the real-time evaluator cannot keep up to date event by event."""

    http_status = 400
    code = "segment_not_realtime"


@dataclass(frozen=True)
class Change:
    kind: str  # segment_entered | segment_exited
    segment: str
    profile_id: str
    at: datetime


# --- windows -------------------------------------------------------------------------------------------
class _Bounds:
    """A window as integer-microsecond bounds on the event time: fixed, or `now - offset`. An event
    counts at `now` when lo(now) <= t <= hi(now); the implicit upper bound is `now` (happened by then)."""

    def __init__(self, window: ast.Window | None):
        t1, t2 = datetime(2000, 1, 1, tzinfo=UTC), datetime(2000, 1, 3, tzinfo=UTC)
        self.lower: list[tuple[int | None, int]] = []  # (fixed threshold, or None and offset): t >= now - offset
        self.upper: list[tuple[int | None, int]] = [(None, 0)]  # t <= now - offset
        for (op, x1), (_, x2) in zip(window_bounds(window, t1), window_bounds(window, t2), strict=True):
            shift = 0 if op in (">=", "<=") else (1 if op == ">" else -1)  # to inclusive integer bounds
            if x1 == x2:
                spec: tuple[int | None, int] = (us(x1) + shift, 0)
            else:
                spec = (None, us(t1) - us(x1) - shift)
            (self.lower if op in (">", ">=") else self.upper).append(spec)
        self.relative_upper = any(f is None and off for f, off in self.upper)

    def lo(self, now: int) -> int:
        return max((f if f is not None else now - off for f, off in self.lower), default=-_NEVER)

    def hi(self, now: int) -> int:
        return min(f if f is not None else now - off for f, off in self.upper)

    def next_change(self, times: list[int], now: int) -> int:
        """The earliest moment after `now` at which some stored time crosses a moving bound."""
        best = _NEVER
        for f, off in self.lower:
            if f is None:
                i = bisect_left(times, now - off)
                if i < len(times):
                    best = min(best, times[i] + off + 1)
        for f, off in self.upper:
            if f is None:
                i = bisect_right(times, now - off)
                if i < len(times):
                    best = min(best, times[i] + off)
        return best if best > now else now + 1


# --- leaves: one condition's state per profile -----------------------------------------------------------
EventFn = Callable[[Mapping[str, Any]], bool]


class _Leaf:
    event: str | None = None  # the event name it reads (None: any event); traits leaves read none
    reads_events = True

    def matches(self, ev: Mapping[str, Any]) -> bool:
        return False

    def add(self, state: Any, t: int, ev: Mapping[str, Any]) -> Any:
        return state

    def holds(self, state: Any, profile: _Profile, now: int) -> bool:
        raise NotImplementedError

    def next_change(self, state: Any, now: int) -> int:
        return _NEVER


class _Count(_Leaf):
    def __init__(self, event: str | None, where: EventFn | None, window: ast.Window | None, test: Callable[[int], bool],
                 cap: int):
        self.event, self.where, self.bounds, self.test, self.cap = event, where, _Bounds(window), test, cap

    def matches(self, ev: Mapping[str, Any]) -> bool:
        return self.where is None or self.where(ev)

    def add(self, state: list[int] | None, t: int, ev: Mapping[str, Any]) -> list[int]:
        times = state if state is not None else []
        if not times or t >= times[-1]:
            times.append(t)
        else:
            insort(times, t)
        return times

    def count(self, times: list[int] | None, now: int) -> int:
        if not times:
            return 0
        lo = self.bounds.lo(now)
        start = bisect_left(times, lo)
        if start:
            del times[:start]  # below the lower bound: out for good (bounds only move forward)
        end = bisect_right(times, self.bounds.hi(now))
        if end > self.cap and not self.bounds.relative_upper:
            del times[:end - self.cap]  # only the newest `cap` counted times matter
            end = self.cap
        return end

    def holds(self, state: list[int] | None, profile: _Profile, now: int) -> bool:
        return self.test(self.count(state, now))

    def next_change(self, state: list[int] | None, now: int) -> int:
        return self.bounds.next_change(state, now) if state else _NEVER


class _Sequence(_Leaf):
    def __init__(self, steps: list[tuple[str | None, EventFn | None]], within: timedelta, window: ast.Window | None):
        self.steps, self.within, self.bounds = steps, within // _US, _Bounds(window)
        names = {name for name, _ in steps}
        self.event = names.pop() if len(names) == 1 else None

    def matches(self, ev: Mapping[str, Any]) -> bool:
        return self.mask(ev) != 0

    def mask(self, ev: Mapping[str, Any]) -> int:
        name = ref.event_name(ev)
        m = 0
        for k, (step_name, where) in enumerate(self.steps):
            if (step_name is None or step_name == name) and (where is None or where(ev)):
                m |= 1 << k
        return m

    def add(self, state: tuple[list[int], list[int]] | None, t: int, ev: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        times, masks = state if state is not None else ([], [])
        i = bisect_right(times, t)
        times.insert(i, t)
        masks.insert(i, self.mask(ev))
        return times, masks

    def holds(self, state: tuple[list[int], list[int]] | None, profile: _Profile, now: int) -> bool:
        if not state:
            return False
        times, masks = state
        start = bisect_left(times, self.bounds.lo(now))
        if start:
            del times[:start]
            del masks[:start]
        end = bisect_right(times, self.bounds.hi(now))
        n = len(self.steps)
        best: list[int | None] = [None] * n  # latest start of a chain completing step k, strictly earlier events
        i = 0
        while i < end:
            t = times[i]
            new = list(best)
            while i < end and times[i] == t:
                m = masks[i]
                for k in range(n):
                    if not m >> k & 1:
                        continue
                    s = t if k == 0 else best[k - 1]
                    if s is None:
                        continue
                    if k == n - 1 and t - s <= self.within:
                        return True
                    if new[k] is None or s > cast(int, new[k]):
                        new[k] = s
                i += 1
            best = new
        return False

    def next_change(self, state: tuple[list[int], list[int]] | None, now: int) -> int:
        return self.bounds.next_change(state[0], now) if state else _NEVER


class _Trait(_Leaf):
    reads_events = False

    def __init__(self, test: Callable[[Mapping[str, Any]], bool]):
        self.test = test

    def holds(self, state: Any, profile: _Profile, now: int) -> bool:
        return self.test(profile.traits)


@dataclass
class _Profile:
    traits: dict[str, Any] = field(default_factory=dict)
    states: dict[int, Any] = field(default_factory=dict)


# --- compiling a checked rule into leaves and a boolean function ------------------------------------------------
Expr = Callable[[_Profile, int], bool]
_ORDER = ref._ORDER
_PLACEHOLDER = datetime(2000, 1, 1, tzinfo=UTC)  # literals never need as_of here: `ago` is refused


def _no_ago(values: tuple[ast.Literal, ...], what: str) -> None:
    if any(v.type == "ago" for v in values):
        raise NotRealtime(f"{what} compares with a moment `N ... ago`, which moves for every stored event",
                          fix="use a window instead (`in last 30 days`), or let the scheduled runs keep this segment.")


def _filter_fn(node: ast.Filter, tokenise: ref.Tokenise | None) -> EventFn:
    if isinstance(node, (ast.And, ast.Or)):
        parts = [_filter_fn(cast(ast.Filter, i), tokenise) for i in node.items]
        if isinstance(node, ast.And):
            return lambda ev: all(p(ev) for p in parts)
        return lambda ev: any(p(ev) for p in parts)
    if isinstance(node, ast.Not):
        inner = _filter_fn(cast(ast.Filter, node.item), tokenise)
        return lambda ev: not inner(ev)
    _no_ago(node.values, f"`where {node.path.text()} ...`")
    f = event_field(node.path)
    kind = ref.operand_kind(node.path, node.values, bool(f.json))
    values = ref.tokenised(node.values, node.personal, tokenise)
    op, path, keys, column = node.op, node.path, f.json, f.column
    compare = ref.compare
    if keys:
        def json_test(ev: Mapping[str, Any]) -> bool:
            return compare(ref.typed(ref.json_text(ref.json_at(ev.get(column), keys)), kind or "string"), op, values,
                           _PLACEHOLDER)
        return json_test
    return lambda ev: compare(ref.event_value(ev, path, None), op, values, _PLACEHOLDER)


class _Builder:
    def __init__(self, leaves: list[_Leaf], base: int, tokenise: ref.Tokenise | None):
        self.leaves, self.base, self.tokenise = leaves, base, tokenise

    def leaf(self, leaf: _Leaf) -> Expr:
        gid = self.base + len(self.leaves)  # global leaf id: the evaluator's leaves so far, then these
        self.leaves.append(leaf)
        return lambda p, now: leaf.holds(p.states.get(gid), p, now)

    def where(self, node: ast.Filter | None) -> EventFn | None:
        return _filter_fn(node, self.tokenise) if node is not None else None

    def count(self, event: ast.EventRef, where: ast.Filter | None, window: ast.Window | None,
              test: Callable[[int], bool], cap: int) -> Expr:
        return self.leaf(_Count(event.name, self.where(where), window, test, cap))

    def node(self, checked: Checked, node: ast.Node) -> Expr:
        if isinstance(node, (ast.And, ast.Or)):
            parts = [self.node(checked, i) for i in node.items]
            if isinstance(node, ast.And):
                return lambda p, now: all(x(p, now) for x in parts)
            return lambda p, now: any(x(p, now) for x in parts)
        if isinstance(node, ast.Not):
            inner = self.node(checked, node.item)
            return lambda p, now: not inner(p, now)
        if isinstance(node, ast.Performed):
            op, n = node.frequency.op, node.frequency.count
            return self.count(node.event, node.where, node.window, lambda c: _ORDER[op](c, n), n + 1)
        if isinstance(node, (ast.AggregateCondition, ast.ComputedTraitCondition)):
            agg = node.aggregate
            if agg.func != "count":
                raise NotRealtime(f"`{agg.func.replace('_', ' ')}` needs every value, not a count",
                                  fix="use counts, sequences and traits for real-time segments; scheduled runs keep the others.")
            _no_ago(node.values, "the count")
            op, values = node.op, node.values
            numbers = [float(cast(float, v.value)) for v in values if v.type == "number"]
            cap = max(0, int(max(numbers, default=0))) + 2
            return self.count(agg.event, agg.where, node.window,
                              lambda c: ref.compare(c, op, values, _PLACEHOLDER), cap)
        if isinstance(node, ast.Sequence):
            steps = [(s.event.name, self.where(s.where)) for s in node.steps]
            return self.leaf(_Sequence(steps, node.within.delta, node.window))
        if isinstance(node, ast.TraitCondition):
            cmp = node.compare
            _no_ago(cmp.values, f"the trait '{cmp.path.text()}'")
            keys = trait_parts(cmp.path)
            kind = ref.operand_kind(cmp.path, cmp.values, True) or "string"
            literals = ref.tokenised(cmp.values, cmp.personal, self.tokenise)
            cop = cmp.op
            return self.leaf(_Trait(lambda traits: ref.compare(ref.typed(ref.json_text(ref.json_at(traits, keys)), kind),
                                                                cop, literals, _PLACEHOLDER)))
        if isinstance(node, ast.SegmentRef):
            included = checked.segments[node.name]
            return self.node(included, included.rule.expr)
        raise NotRealtime(f"{type(node).__name__} is not a condition the real-time evaluator knows")


@dataclass
class _Segment:
    name: str
    compiled: Compiled
    expr: Expr
    leaves: list[int]
    members: set[str] = field(default_factory=set)


# --- the evaluator ---------------------------------------------------------------------------------------------
class RealtimeSegments:
    """Live segments over a stream of attributed events. Not thread-safe: one feeder at a time."""

    def __init__(self) -> None:
        self.segments: list[_Segment] = []
        self.leaves: list[_Leaf] = []
        self.owner: list[int] = []          # leaf -> segment index
        self.by_event: dict[str | None, list[int]] = {}
        self.trait_segments: set[int] = set()
        self.profiles: dict[str, _Profile] = {}
        self.heap: list[tuple[int, int, int, str]] = []
        self.due: dict[tuple[int, str], int] = {}
        self.seq = itertools.count()
        self.now = -_NEVER

    @classmethod
    def of(cls, segments: Mapping[str, Compiled]) -> RealtimeSegments:
        live = cls()
        for name, compiled in segments.items():
            live.add(name, compiled)
        return live

    def add(self, name: str, compiled: Compiled) -> None:
        """Start keeping `name` (raises NotRealtime for rules it cannot keep). Profiles already
        known are evaluated at the current clock."""
        if compiled.persons_threshold is not None:
            raise NotRealtime("rules counted by persons pool profiles joined by probabilistic links, which change in "
                              "batch resolutions", fix="count by profiles, or let the scheduled runs keep this segment.")
        index = len(self.segments)
        leaves: list[_Leaf] = []
        tokenise = compiled.ctx.tokenise if compiled.ctx is not None else None
        base = len(self.leaves)
        expr = _Builder(leaves, base, tokenise).node(compiled.checked, compiled.checked.rule.expr)
        ids = list(range(base, base + len(leaves)))
        self.leaves.extend(leaves)
        self.owner.extend([index] * len(leaves))
        for gid, leaf in zip(ids, leaves, strict=True):
            if leaf.reads_events:
                self.by_event.setdefault(leaf.event, []).append(gid)
            else:
                self.trait_segments.add(index)
        self.segments.append(_Segment(name, compiled, expr, ids))
        for pid, p in self.profiles.items():
            self._evaluate(index, pid, p, max(self.now, 0))

    # --- feeding ---------------------------------------------------------------------------------------
    def on_event(self, ev: Mapping[str, Any]) -> list[Change]:
        """Ingest one attributed event (`profile_id`, `timestamp`, `received_at`, fields as in `events`),
        at the moment it was received; returns the membership changes up to and including it."""
        now = max(self.now, us(ev["received_at"]))
        changes = self.on_tick(at(now)) if self.heap and self.heap[0][0] <= now else []
        self.now = now
        pid = str(ev["profile_id"])
        p = self.profiles.get(pid)
        dirty: Iterable[int]
        if p is None:
            p = self.profiles[pid] = _Profile()
            dirty = range(len(self.segments))
            self._ingest(p, ev, set())
        else:
            dirty = self._ingest(p, ev, set())
        for index in sorted(dirty):
            changes.extend(self._evaluate(index, pid, p, now))
        return changes

    def _ingest(self, p: _Profile, ev: Mapping[str, Any], dirty: set[int]) -> set[int]:
        name = ref.event_name(ev)
        t = -1
        for gids in (self.by_event.get(name), self.by_event.get(None)):
            for gid in gids or ():
                leaf = self.leaves[gid]
                if leaf.matches(ev):
                    if t < 0:
                        t = us(ev["timestamp"])
                    p.states[gid] = leaf.add(p.states.get(gid), t, ev)
                    dirty.add(self.owner[gid])
        return dirty

    def set_traits(self, profile_id: str, traits: Mapping[str, Any] | str, now: datetime | None = None) -> list[Change]:
        """A profile's traits as the `profiles` table has them (dict or JSON text)."""
        clock = max(self.now, us(now)) if now is not None else max(self.now, 0)
        value = json.loads(traits) if isinstance(traits, str) else dict(traits)
        p = self.profiles.get(profile_id)
        if p is None:
            p = self.profiles[profile_id] = _Profile(value)
            targets: Iterable[int] = range(len(self.segments))
        else:
            if p.traits == value:
                return []
            p.traits = value
            targets = sorted(self.trait_segments)
        changes: list[Change] = []
        for index in targets:
            changes.extend(self._evaluate(index, profile_id, p, clock))
        return changes

    def on_tick(self, now: datetime) -> list[Change]:
        """Windows that slid and future-dated events that fell due by `now`: their membership changes."""
        limit = us(now)
        changes: list[Change] = []
        while self.heap and self.heap[0][0] <= limit:
            when, _, index, pid = heapq.heappop(self.heap)
            if self.due.get((index, pid)) != when:
                continue  # superseded by a later evaluation
            del self.due[(index, pid)]
            self.now = max(self.now, when)
            changes.extend(self._evaluate(index, pid, self.profiles[pid], when))
        self.now = max(self.now, limit)
        return changes

    # --- evaluation --------------------------------------------------------------------------------------
    def _evaluate(self, index: int, pid: str, p: _Profile, now: int) -> list[Change]:
        seg = self.segments[index]
        held = seg.expr(p, now)
        out: list[Change] = []
        if held != (pid in seg.members):
            if held:
                seg.members.add(pid)
            else:
                seg.members.discard(pid)
            out.append(Change("segment_entered" if held else "segment_exited", seg.name, pid, at(now)))
        nxt = _NEVER
        for gid in seg.leaves:
            state = p.states.get(gid)
            if state is not None:
                nxt = min(nxt, self.leaves[gid].next_change(state, now))
        key = (index, pid)
        if nxt < _NEVER and self.due.get(key) != nxt:
            self.due[key] = nxt
            heapq.heappush(self.heap, (nxt, next(self.seq), index, pid))
        elif nxt >= _NEVER:
            self.due.pop(key, None)
        return out

    def members(self, name: str) -> set[str]:
        return set(next(s for s in self.segments if s.name == name).members)

    # --- warming from the store ------------------------------------------------------------------------------
    @classmethod
    def load(cls, engine: Engine, as_of: datetime, segments: Mapping[str, Compiled] | None = None) -> RealtimeSegments:
        """An evaluator warmed from the store as of `as_of`: every profile's traits, every event received
        by then with its profile, then membership evaluated at `as_of` (no changes reported).
        `segments`: the rules to keep (default: every live segment whose rule can be kept in real time)."""
        if segments is None:
            segments = live_rules(engine, as_of)
        live = cls.of(segments)
        cur = engine.fresh_reader()
        try:
            for pid, traits in engine.fetch_all("SELECT profile_id, traits FROM profiles", cursor=cur):
                live.profiles[str(pid)] = _Profile(json.loads(traits) if isinstance(traits, str) else dict(traits or {}))
            rows = engine.fetch_dicts(_EVENTS_SQL + " WHERE e.received_at <= ? ORDER BY e.received_at", [as_of], cursor=cur)
        finally:
            cur.close()
        for row in rows:
            p = live.profiles.setdefault(str(row["profile_id"]), _Profile())
            live._ingest(p, row, set())
        now = us(as_of)
        live.now = now
        for pid, p in live.profiles.items():
            for index in range(len(live.segments)):
                live._evaluate(index, pid, p, now)
        return live


_EVENTS_SQL = ("SELECT e.type, e.event, e.name, e.source, e.properties, e.traits, e.context, e.timestamp, e.received_at, "
               "ep.profile_id FROM events e JOIN event_profiles ep ON ep.source = e.source AND ep.message_id = e.message_id")


def live_rules(engine: Engine, as_of: datetime | None = None) -> dict[str, Compiled]:
    """Every live segment whose rule the real-time evaluator can keep, compiled against the store."""
    from refinery.segments import store

    out: dict[str, Compiled] = {}
    cur = engine.fresh_reader()
    try:
        for seg in store.list_segments(engine, cursor=cur):
            compiled = store.compile_text(engine, seg.rule, name=seg.name, as_of=as_of, cursor=cur)
            if compiled.realtime:
                out[seg.name] = compiled
    finally:
        cur.close()
    return out


# --- the store and `refinery serve` ---------------------------------------------------------------------------
def record(engine: Engine, changes: list[Change]) -> None:
    """Inside the writer: each change as a `segment_events` outbox row (run_id `realtime`) and an
    opened or closed `segment_members` stay, as a membership run writes them."""
    now = datetime.now(UTC)
    for c in changes:
        engine.execute("INSERT INTO segment_events (event_id, kind, segment, profile_id, occurred_at, run_id, version, "
                       "recorded_at) VALUES (nextval('segment_event_seq'), ?, ?, ?, ?, 'realtime', NULL, ?)",
                       [c.kind, c.segment, c.profile_id, c.at, now])
        if c.kind == "segment_entered":
            engine.execute("INSERT INTO segment_members (segment, profile_id, entered_at, exited_at, entered_run, exited_run) "
                           "SELECT ?, ?, ?, NULL, 'realtime', NULL WHERE NOT EXISTS (SELECT 1 FROM segment_members "
                           "WHERE segment = ? AND profile_id = ? AND exited_at IS NULL)",
                           [c.segment, c.profile_id, c.at, c.segment, c.profile_id])
        else:
            engine.execute("UPDATE segment_members SET exited_at = ?, exited_run = 'realtime' WHERE segment = ? "
                           "AND profile_id = ? AND exited_at IS NULL", [c.at, c.segment, c.profile_id])


class Follower:
    """Tails attributed events (the identity follower writes `event_profiles` and `profiles` as batches
    commit) and feeds them to a `RealtimeSegments`, writing its changes through the writer."""

    def __init__(self, runtime: Any, interval: float = 0.5):
        self.runtime = runtime
        self.interval = interval
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, name="segments-realtime", daemon=True)
        self.live: RealtimeSegments | None = None
        self.mark: datetime | None = None

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(10)

    def _run(self) -> None:
        engine = self.runtime.engine
        while not self.stop_flag.is_set():
            try:
                self.poll(engine)
            except Exception as e:  # the tail must not take the server down; the log says why
                log.warning("real-time segments: poll failed: %s", type(e).__name__)
            self.stop_flag.wait(self.interval)

    def poll(self, engine: Engine) -> list[Change]:
        """One step: events attributed since the last step (up to the identity follower's watermark),
        their profiles' traits, then the timers; the changes are recorded and returned."""
        mark = engine.fetch_all("SELECT max(finished_at) FROM identity_resolutions", cursor=engine.fresh_reader())[0][0]
        if mark is None:
            return []
        if self.live is None:
            self.live, self.mark = RealtimeSegments.load(engine, mark), mark
            return []
        cur = engine.fresh_reader()
        try:
            rows = engine.fetch_dicts(_EVENTS_SQL + " WHERE e.loaded_at > ? AND e.loaded_at <= ? ORDER BY e.received_at",
                                      [self.mark, mark], cursor=cur)
            ids = sorted({str(r["profile_id"]) for r in rows})
            traits = engine.fetch_all("SELECT profile_id, traits FROM profiles WHERE list_contains(?, profile_id)",
                                      [ids], cursor=cur) if ids else []
        finally:
            cur.close()
        changes: list[Change] = []
        for pid, t in traits:
            changes.extend(self.live.set_traits(str(pid), t))
        for row in rows:
            changes.extend(self.live.on_event(row))
        changes.extend(self.live.on_tick(datetime.now(UTC)))
        self.mark = mark
        if changes:
            self.runtime.writer.call(lambda e: record(e, changes))
        return changes


def follow(runtime: Any, interval: float = 0.5) -> Follower:
    """Start the real-time tail for `refinery serve` (call after the identity follower starts; stop before it)."""
    follower = Follower(runtime, interval)
    follower.start()
    return follower
