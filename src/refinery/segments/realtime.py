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
import json
import logging
import math
import re
import threading
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, cast

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


class Change(NamedTuple):
    """A membership change at the moment it happened (a named tuple: the evaluator makes many)."""

    kind: str  # segment_entered | segment_exited
    segment: str
    profile_id: str
    at: datetime


# --- windows -------------------------------------------------------------------------------------------
class _Bounds:
    """A window as integer-microsecond bounds on the event time. An event counts at `now` when
    lo(now) <= t <= hi(now), with lo(now) = max(flo, now - rlo) and hi(now) = min(fhi, now - rhi):
    fixed bounds (`flo`, `fhi`) and bounds that move with the clock (`rlo`: `in last`, `since N days
    ago`; `rhi`: `before N days ago`, and always `now` itself, rhi >= 0: happened by then)."""

    def __init__(self, window: ast.Window | None):
        t1, t2 = datetime(2000, 1, 1, tzinfo=UTC), datetime(2000, 1, 3, tzinfo=UTC)
        flo, fhi, rhi = -_NEVER, _NEVER, 0
        rlo: int | None = None
        for (op, x1), (_, x2) in zip(window_bounds(window, t1), window_bounds(window, t2), strict=True):
            shift = 0 if op in (">=", "<=") else (1 if op == ">" else -1)  # to inclusive integer bounds
            lower = op in (">", ">=")
            if x1 == x2:
                fixed = us(x1) + shift
                flo, fhi = (max(flo, fixed), fhi) if lower else (flo, min(fhi, fixed))
            else:
                offset = us(t1) - us(x1) - shift
                if lower:
                    rlo = offset if rlo is None else min(rlo, offset)
                else:
                    rhi = max(rhi, offset)
        self.flo, self.rlo, self.fhi, self.rhi = flo, rlo, fhi, rhi
        self.relative_upper = rhi > 0

    def lo(self, now: int) -> int:
        return self.flo if self.rlo is None else max(self.flo, now - self.rlo)

    def hi(self, now: int) -> int:
        return min(self.fhi, now - self.rhi)

    def crossing(self, times: list[int], now: int) -> int:
        """The earliest moment after `now` at which some stored time crosses a moving bound."""
        best = _NEVER
        if self.rlo is not None:
            i = bisect_left(times, now - self.rlo)
            if i < len(times):
                best = times[i] + self.rlo + 1
        i = bisect_right(times, now - self.rhi)
        if i < len(times):
            best = min(best, times[i] + self.rhi)
        return best if best > now else now + 1


# --- leaves: one condition's state per profile -----------------------------------------------------------
EventFn = Callable[[Mapping[str, Any]], bool]
#: A leaf's state per profile: [what it keeps (times...), its value now, the moment of its pending timer].
Slot = list[Any]


class _Leaf:
    """One condition. `refresh(state, profile, now)` gives its value at `now` and the next moment that
    value can change with time alone (`_NEVER`: not without a new event or new traits)."""

    default = False  # the value for a profile with no state (no matching events, no traits)
    key: tuple[Any, ...] = ()  # equal keys: the same condition, kept once for every segment that reads it

    def refresh(self, state: Any, profile: _Profile, now: int) -> tuple[bool, int]:
        raise NotImplementedError


class _Count(_Leaf):
    """A count of matching events inside a window, compared. Keeps the sorted times (`cap`: a count
    compared with N only needs to tell N+1 from more, so only the newest `cap` counted times are kept
    when the upper bound is `now`)."""

    def __init__(self, event: str | None, where: ast.Filter | None, match: EventFn | None, tokenise: ref.Tokenise | None,
                 window: ast.Window | None, test: Callable[[int], bool], cap: int):
        self.event, self.where, self.match, self.tokenise = event, where, match, tokenise
        self.bounds, self.cap = _Bounds(window), cap
        self.routes = _routes(event, where)
        values = [test(c) for c in range(cap + 2)]  # the test is constant from cap - 1 on
        self.table, self.last_value = tuple(values), values[-1]
        self.default = values[0]
        self.trim = not self.bounds.relative_upper
        b = self.bounds
        self.last = b.rlo is not None and b.flo == -_NEVER and b.fhi == _NEVER and b.rhi == 0  # `in last ...`
        self.key = ("count", self.routes, where, tokenise, (b.flo, b.rlo, b.fhi, b.rhi), cap, self.table)
        up, down = values == sorted(values), values == sorted(values, reverse=True)
        # `keep`: the value one more event can never change (a count only grows when an event is added):
        # `at least N` that holds, `at most N` that does not. The pending timer may then be early, never late.
        self.keep: bool | None = values[0] if up and down else (True if up else (False if down else None))
        # `flip`: with fewer stored times than this, a monotone test still gives its value for no events,
        # now and later (the count is at most the number of times kept)
        self.flip = next((c for c, v in enumerate(values) if v != values[0]), 0) if up or down else 0
        self.slack = cap + 8  # times kept between refreshes on that shortcut

    def refresh(self, times: list[int], profile: _Profile, now: int) -> tuple[bool, int]:
        b = self.bounds
        rlo = b.rlo
        if self.last and (not times or times[-1] <= now):
            return self._last(times, cast(int, rlo), now)
        lo = b.flo if rlo is None else max(b.flo, now - rlo)
        if times and times[0] < lo:
            del times[:bisect_left(times, lo)]  # below the lower bound: out for good (bounds only move forward)
        end = bisect_right(times, min(b.fhi, now - b.rhi))
        if end > self.cap and self.trim:
            del times[:end - self.cap]  # only the newest `cap` counted times matter
            end = self.cap
        table, last, size = self.table, self.last_value, len(self.table)
        value = table[end] if end < size else last
        n = len(times)
        if end == n:  # nothing still to come in: the count only falls, as times leave (oldest first)
            if rlo is None:
                return value, _NEVER
            c, i = end, 0
            while i < n:
                t = times[i]
                while i < n and times[i] == t:
                    i += 1
                    c -= 1
                if (table[c] if c < size else last) != value:
                    return value, t + rlo + 1
            return value, _NEVER
        moves = [(t + rlo + 1, -1) for t in times[:end]] if rlo is not None else []
        for t in times[end:]:  # future-dated, or before a moving upper bound: each enters, then perhaps leaves
            if t > b.fhi:
                break
            enter, leave = t + b.rhi, (t + rlo + 1 if rlo is not None else _NEVER)
            if leave > enter:
                moves.append((enter, 1))
                if leave < _NEVER:
                    moves.append((leave, -1))
        moves.sort()
        c, i, m = end, 0, len(moves)
        while i < m:
            when = moves[i][0]
            while i < m and moves[i][0] == when:
                c += moves[i][1]
                i += 1
            if (table[c] if c < size else last) != value:
                return value, when
        return value, _NEVER


    def _last(self, times: list[int], rlo: int, now: int) -> tuple[bool, int]:
        """`refresh` for a window `in last ...` with no time still to come: the same answer, fewer steps."""
        if times and times[0] < now - rlo:
            del times[:bisect_left(times, now - rlo)]
        end = len(times)
        if end > self.cap:
            del times[:end - self.cap]
            end = self.cap
        table, last, size = self.table, self.last_value, len(self.table)
        value = table[end] if end < size else last
        c, i = end, 0
        while i < end:
            t = times[i]
            while i < end and times[i] == t:
                i += 1
                c -= 1
            if (table[c] if c < size else last) != value:
                return value, t + rlo + 1
        return value, _NEVER


class _Sequence(_Leaf):
    def __init__(self, steps: list[tuple[str | None, EventFn | None]], within: timedelta, window: ast.Window | None,
                 key: tuple[Any, ...]):
        self.steps, self.within, self.bounds, self.key = steps, within // _US, _Bounds(window), key
        self.names = {name for name, _ in steps}

    def mask(self, ev: Mapping[str, Any], name: str | None) -> int:
        m = 0
        for k, (step_name, where) in enumerate(self.steps):
            if (step_name is None or step_name == name) and (where is None or where(ev)):
                m |= 1 << k
        return m

    @staticmethod
    def add(state: tuple[list[int], list[int]], t: int, mask: int) -> None:
        times, masks = state
        i = bisect_right(times, t)
        times.insert(i, t)
        masks.insert(i, mask)

    def refresh(self, state: tuple[list[int], list[int]], profile: _Profile, now: int) -> tuple[bool, int]:
        times, masks = state
        start = bisect_left(times, self.bounds.lo(now))
        if start:
            del times[:start]
            del masks[:start]
        if not times:
            return False, _NEVER
        return self.holds(times, masks, now), self.bounds.crossing(times, now)

    def holds(self, times: list[int], masks: list[int], now: int) -> bool:
        """Latest start per step, strictly later events, the last step within `within` of the start."""
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


class _Trait(_Leaf):
    def __init__(self, test: Callable[[Mapping[str, Any]], bool], key: tuple[Any, ...]):
        self.test, self.key = test, key
        self.default = test({})

    def refresh(self, state: Any, profile: _Profile, now: int) -> tuple[bool, int]:
        return self.test(profile.traits), _NEVER


class _Profile:
    __slots__ = ("slots", "traits")

    def __init__(self, traits: dict[str, Any] | None = None):
        self.traits: dict[str, Any] = traits if traits is not None else {}
        self.slots: dict[int, Slot] = {}  # leaf id -> [state, value, pending timer]; absent: the leaf's default


# --- compiling a checked rule into leaves and a boolean function ------------------------------------------------
Expr = Callable[[dict[int, Slot]], bool]
_ORDER = ref._ORDER
_PLACEHOLDER = datetime(2000, 1, 1, tzinfo=UTC)  # literals never need as_of here: `ago` is refused


def _no_ago(values: tuple[ast.Literal, ...], what: str) -> None:
    if any(v.type == "ago" for v in values):
        raise NotRealtime(f"{what} compares with a moment `N ... ago`, which moves for every stored event",
                          fix="use a window instead (`in last 30 days`), or let the scheduled runs keep this segment.")


def _filter_fn(node: ast.Filter, tokenise: ref.Tokenise | None) -> EventFn:
    if isinstance(node, (ast.And, ast.Or)):
        parts = [_filter_fn(cast(ast.Filter, i), tokenise) for i in node.items]
        if len(parts) == 2:
            a, b = parts
            if isinstance(node, ast.And):
                return lambda ev: a(ev) and b(ev)
            return lambda ev: a(ev) or b(ev)
        if isinstance(node, ast.And):
            return lambda ev: all(p(ev) for p in parts)
        return lambda ev: any(p(ev) for p in parts)
    if isinstance(node, ast.Not):
        inner = _filter_fn(cast(ast.Filter, node.item), tokenise)
        return lambda ev: not inner(ev)
    return _compare_fn(node, tokenise)


_TEXT_TESTS: dict[str, Callable[[str, Any], bool]] = {
    "=": lambda s, x: s == x, "!=": lambda s, x: s != x, "contains": lambda s, x: x in s,
    "starts_with": lambda s, x: s.startswith(x), "ends_with": lambda s, x: s.endswith(x),
    "in": lambda s, x: s in x, "not_in": lambda s, x: s not in x, "matches": lambda s, x: x.search(s) is not None,
}


def _text_operand(op: str, values: tuple[ast.Literal, ...]) -> Any:
    if op in ("in", "not_in"):
        return frozenset(v.value for v in values)
    return re.compile(cast(str, values[0].value)) if op == "matches" else values[0].value


def _count_test(op: str, values: tuple[ast.Literal, ...]) -> Callable[[int], bool]:
    """A count compared with literals, as reference.compare does it."""
    if values and all(v.type == "number" for v in values):
        numbers = [float(cast(float, v.value)) for v in values]
        if op in _ORDER:
            order, n = _ORDER[op], numbers[0]
            return lambda c: order(c, n)
        if op == "between":
            low, high = numbers[0], numbers[1]
            return lambda c: low <= c <= high
    return lambda c: ref.compare(c, op, values, _PLACEHOLDER)


def _routes(event: str | None, where: ast.Filter | None) -> tuple[str | None, ...]:
    """The event names a count can match: its event, or the names its filter requires
    (`count(event = 'Page Viewed' and ...)`), or None: any event."""
    if event is not None:
        return (event,)
    items = where.items if isinstance(where, ast.And) else (where,) if where is not None else ()
    for item in items:
        if (isinstance(item, ast.Compare) and item.path.parts == ("event",) and item.op in ("=", "in")
                and item.values and all(v.type == "string" for v in item.values)):
            return tuple(sorted({cast(str, v.value) for v in item.values}))
    return (None,)


def _compare_fn(node: ast.Compare, tokenise: ref.Tokenise | None) -> EventFn:
    """One comparison on an event, as reference.filter_holds reads it; a property compared with
    strings or numbers is read straight from the parsed dict (same answers, fewer steps)."""
    _no_ago(node.values, f"`where {node.path.text()} ...`")
    f = event_field(node.path)
    kind = ref.operand_kind(node.path, node.values, bool(f.json))
    values = ref.tokenised(node.values, node.personal, tokenise)
    op, path, keys, column = node.op, node.path, f.json, f.column
    compare = ref.compare
    if not keys:
        def column_value(ev: Mapping[str, Any]) -> bool:
            return compare(ref.event_value(ev, path, None), op, values, _PLACEHOLDER)

        if op not in _TEXT_TESTS or not values or any(v.type != "string" for v in values):
            return column_value
        column_test, column_operand = _TEXT_TESTS[op], _text_operand(op, values)
        read = ref.event_name if column == "event" else (lambda ev: ev.get(column))

        def column_text(ev: Mapping[str, Any]) -> bool:
            v = read(ev)
            if v is None:
                return False
            return column_test(v, column_operand) if type(v) is str else column_value(ev)
        return column_text

    def general(ev: Mapping[str, Any]) -> bool:
        return compare(ref.typed(ref.json_text(ref.json_at(ev.get(column), keys)), kind or "string"), op, values,
                       _PLACEHOLDER)

    if len(keys) != 1 or not isinstance(keys[0], str) or not values:
        return general
    key = keys[0]
    if op in _TEXT_TESTS and kind == "string" and all(v.type == "string" for v in values):
        text_test, operand = _TEXT_TESTS[op], _text_operand(op, values)

        def text(ev: Mapping[str, Any]) -> bool:
            obj = ev.get(column)
            if type(obj) is not dict:
                return general(ev)
            v = obj.get(key)
            if v is None:
                return False
            return text_test(v if type(v) is str else cast(str, ref.json_text(v)), operand)
        return text
    if (op in _ORDER or op == "between") and kind == "number" and all(v.type == "number" for v in values):
        numbers = [float(cast(float, v.value)) for v in values]
        order = _ORDER.get(op)

        def number(ev: Mapping[str, Any]) -> bool:
            obj = ev.get(column)
            if type(obj) is not dict:
                return general(ev)
            v = obj.get(key)
            tv = type(v)
            if tv is not float and tv is not int:
                return general(ev)  # text, booleans, nested values: read as DuckDB would
            try:
                x = float(cast(float, v))
            except OverflowError:
                return False
            if not math.isfinite(x):
                return False
            if order is not None:
                return order(x, numbers[0])
            return numbers[0] <= x <= numbers[1]
        return number
    return general


def _personal(node: ast.Filter | None) -> bool:
    """Whether a filter compares a personal field (its literals are tokens of the rule's context)."""
    if isinstance(node, (ast.And, ast.Or)):
        return any(_personal(cast(ast.Filter, i)) for i in node.items)
    if isinstance(node, ast.Not):
        return _personal(cast(ast.Filter, node.item))
    return node is not None and node.personal is not None


class _Builder:
    """Leaves and the boolean function over their values; `ids[k]` becomes the k-th leaf's id in the
    evaluator once the whole rule is built (a leaf equal to one kept already is shared)."""

    def __init__(self, tokenise: ref.Tokenise | None):
        self.leaves: list[_Leaf] = []
        self.ids: list[int] = []
        self.tokenise = tokenise

    def leaf(self, leaf: _Leaf) -> Expr:
        k, ids = len(self.leaves), self.ids
        self.leaves.append(leaf)
        default = leaf.default

        def value(slots: dict[int, Slot]) -> bool:
            slot = slots.get(ids[k])
            return default if slot is None else bool(slot[1])
        return value

    def where(self, node: ast.Filter | None) -> EventFn | None:
        return _filter_fn(node, self.tokenise) if node is not None else None

    def count(self, event: ast.EventRef, where: ast.Filter | None, window: ast.Window | None,
              test: Callable[[int], bool], cap: int) -> Expr:
        tokenise = self.tokenise if _personal(where) else None
        return self.leaf(_Count(event.name, where, self.where(where), tokenise, window, test, cap))

    def node(self, checked: Checked, node: ast.Node) -> Expr:
        if isinstance(node, (ast.And, ast.Or)):
            parts = [self.node(checked, i) for i in node.items]
            if len(parts) == 2:
                a, b = parts
                if isinstance(node, ast.And):
                    return lambda s: a(s) and b(s)
                return lambda s: a(s) or b(s)
            if isinstance(node, ast.And):
                return lambda s: all(x(s) for x in parts)
            return lambda s: any(x(s) for x in parts)
        if isinstance(node, ast.Not):
            inner = self.node(checked, node.item)
            return lambda s: not inner(s)
        if isinstance(node, ast.Performed):
            op, n = node.frequency.op, node.frequency.count
            order = _ORDER[op]
            return self.count(node.event, node.where, node.window, lambda c: order(c, n), n + 1)
        if isinstance(node, (ast.AggregateCondition, ast.ComputedTraitCondition)):
            agg = node.aggregate
            if agg.func != "count":
                raise NotRealtime(f"`{agg.func.replace('_', ' ')}` needs every value, not a count",
                                  fix="use counts, sequences and traits for real-time segments; scheduled runs keep the others.")
            _no_ago(node.values, "the count")
            values = node.values
            numbers = [float(cast(float, v.value)) for v in values if v.type == "number"]
            cap = max(0, int(max(numbers, default=0))) + 2
            return self.count(agg.event, agg.where, node.window, _count_test(node.op, values), cap)
        if isinstance(node, ast.Sequence):
            steps = [(s.event.name, self.where(s.where)) for s in node.steps]
            tokens = self.tokenise if any(_personal(s.where) for s in node.steps) else None
            return self.leaf(_Sequence(steps, node.within.delta, node.window,
                                       ("sequence", tuple((s.event.name, s.where) for s in node.steps), tokens,
                                        node.within.delta, node.window)))
        if isinstance(node, ast.TraitCondition):
            cmp = node.compare
            _no_ago(cmp.values, f"the trait '{cmp.path.text()}'")
            keys = trait_parts(cmp.path)
            kind = ref.operand_kind(cmp.path, cmp.values, True) or "string"
            literals = ref.tokenised(cmp.values, cmp.personal, self.tokenise)
            cop = cmp.op
            return self.leaf(_Trait(lambda traits: ref.compare(ref.typed(ref.json_text(ref.json_at(traits, keys)), kind),
                                                                cop, literals, _PLACEHOLDER),
                                    ("trait", cmp, self.tokenise if cmp.personal else None)))
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
    default: bool  # whether a profile with no events and no traits is a member
    members: set[str] = field(default_factory=set)


_JSON_FIELDS = ("properties", "context", "traits")


def _parsed(ev: Mapping[str, Any]) -> Mapping[str, Any]:
    """The event with its JSON columns parsed once (rows from the store carry JSON text)."""
    if any(isinstance(ev.get(k), str) for k in _JSON_FIELDS):
        ev = dict(ev)
        for k in _JSON_FIELDS:
            if isinstance(ev.get(k), str):
                ev[k] = json.loads(ev[k])
    return ev


# --- the evaluator ---------------------------------------------------------------------------------------------
class RealtimeSegments:
    """Live segments over a stream of attributed events. Not thread-safe: one feeder at a time.

    Per profile and condition it caches the condition's value and keeps one pending timer, at the
    first moment that value can change with time alone; a segment is evaluated again only when one
    of its conditions changes value (by an event, by traits, or by its timer)."""

    def __init__(self) -> None:
        self.segments: list[_Segment] = []
        self.leaves: list[_Leaf] = []
        self.owners: list[list[int]] = []  # leaf -> the segments reading it (a condition shared by segments is kept once)
        self._interned: dict[tuple[Any, ...], int] = {}  # a leaf's key -> its id
        # event name (None: any event) -> (filter, the counts sharing that event and filter): a filter runs once per event
        self.counts: dict[str | None, list[tuple[EventFn | None, list[int]]]] = {}
        self._count_groups: dict[tuple[Any, ...], list[int]] = {}
        self.sequences: dict[str | None, list[int]] = {}  # a step's event name -> sequences (None: a step on any event)
        self.trait_leaves: list[int] = []
        self.default_members: list[int] = []  # segments a profile with nothing known is in
        self.profiles: dict[str, _Profile] = {}
        self.heap: list[tuple[int, str, int]] = []  # (moment, profile, leaf): timers, stale ones skipped
        self.now = -_NEVER

    @classmethod
    def of(cls, segments: Mapping[str, Compiled]) -> RealtimeSegments:
        live = cls()
        for name, compiled in segments.items():
            live.add(name, compiled)
        return live

    def add(self, name: str, compiled: Compiled) -> None:
        """Start keeping `name` (raises NotRealtime for rules it cannot keep). Profiles already
        known are evaluated on their traits (their past events were not kept for it)."""
        if compiled.persons_threshold is not None:
            raise NotRealtime("rules counted by persons pool profiles joined by probabilistic links, which change in "
                              "batch resolutions", fix="count by profiles, or let the scheduled runs keep this segment.")
        index = len(self.segments)
        builder = _Builder(compiled.ctx.tokenise if compiled.ctx is not None else None)
        expr = builder.node(compiled.checked, compiled.checked.rule.expr)
        for leaf in builder.leaves:
            builder.ids.append(self._intern(leaf, index))
        ids = builder.ids
        segment = _Segment(name, compiled, expr, ids, expr({}))
        self.segments.append(segment)
        if segment.default:
            self.default_members.append(index)
        for pid, p in self.profiles.items():
            self._trait_values(p, ids)
            if expr(p.slots):
                segment.members.add(pid)

    def _intern(self, leaf: _Leaf, index: int) -> int:
        """The id of a leaf equal to `leaf` (now read by segment `index` too), or of `leaf` itself, registered."""
        gid = self._interned.get(leaf.key)
        if gid is not None:
            if index not in self.owners[gid]:
                self.owners[gid].append(index)
            return gid
        gid = len(self.leaves)
        self.leaves.append(leaf)
        self.owners.append([index])
        self._interned[leaf.key] = gid
        if isinstance(leaf, _Count):
            key = (leaf.routes, leaf.where, leaf.tokenise)
            group = self._count_groups.get(key)
            if group is None:
                group = self._count_groups[key] = []
                for route in leaf.routes:
                    self.counts.setdefault(route, []).append((leaf.match, group))
            group.append(gid)
        elif isinstance(leaf, _Sequence):
            for step_name in ({None} if None in leaf.names else leaf.names):
                self.sequences.setdefault(step_name, []).append(gid)
        else:
            self.trait_leaves.append(gid)
        return gid

    # --- feeding ---------------------------------------------------------------------------------------
    def on_event(self, ev: Mapping[str, Any]) -> list[Change]:
        """Ingest one attributed event (`profile_id`, `timestamp`, `received_at`, fields as in `events`),
        at the moment it was received; returns the membership changes up to and including it."""
        now = max(self.now, us(ev["received_at"]))
        heap = self.heap
        changes = self._advance(now - 1) if heap and heap[0][0] < now else []
        self.now = now
        dirty: set[tuple[str, int]] = set()
        if heap and heap[0][0] == now:
            self._pop(now, dirty)  # timers due at this very moment count with the event
        pid = str(ev["profile_id"])
        p = self.profiles.get(pid)
        if p is None:
            p = self.profiles[pid] = _Profile()
            dirty.update((pid, i) for i in self.default_members)
        ev = _parsed(ev)
        self._feed(pid, p, ev, us(ev["timestamp"]), now, dirty)
        if dirty:
            changes.extend(self._evaluate(dirty, now))
        return changes

    def _feed(self, pid: str, p: _Profile, ev: Mapping[str, Any], t: int, now: int, dirty: set[tuple[str, int]] | None) -> None:
        """Add the event to the state of every condition it matches; `dirty` None: only store it
        (warming up), else refresh those conditions at `now` and note the segments whose condition changed."""
        name = ref.event_name(ev)
        slots, leaves = p.slots, self.leaves
        for key in ((name, None) if name is not None else (None,)):
            for match, gids in self.counts.get(key, ()):
                if match is not None and not match(ev):
                    continue
                for gid in gids:
                    leaf = cast(_Count, leaves[gid])
                    slot = slots.get(gid)
                    if slot is None:
                        slot = slots[gid] = [[t], leaf.default, _NEVER]
                        if leaf.flip > 1:
                            continue  # one event cannot change its value, now or later
                    else:
                        times = slot[0]
                        if not times or t >= times[-1]:
                            times.append(t)
                        else:
                            insort(times, t)
                        if slot[1] is leaf.keep and len(times) <= leaf.slack:
                            continue  # one more event cannot change its value; its timer can only be early
                        if len(times) < leaf.flip and slot[1] == leaf.default:
                            continue  # too few events to change its value, now or later
                    if dirty is not None:
                        self._refresh(leaf, slot, p, pid, gid, now, dirty)
            for gid in self.sequences.get(key, ()):
                seq = cast(_Sequence, leaves[gid])
                mask = seq.mask(ev, name)
                if not mask:
                    continue
                slot = slots.get(gid)
                if slot is None:
                    slot = slots[gid] = [([], []), False, _NEVER]
                seq.add(slot[0], t, mask)
                if dirty is not None:
                    self._refresh(seq, slot, p, pid, gid, now, dirty)

    def _refresh(self, leaf: Any, slot: list[Any], p: _Profile, pid: str, gid: int, now: int,
                 dirty: set[tuple[str, int]]) -> None:
        """A condition's value at `now` after an event changed its state: an earlier timer if its value
        can next change sooner, and its segments noted when the value changed."""
        value, nxt = leaf.refresh(slot[0], p, now)
        if nxt < slot[2]:
            slot[2] = nxt
            heapq.heappush(self.heap, (nxt, pid, gid))
        if value != slot[1]:
            slot[1] = value
            for i in self.owners[gid]:
                dirty.add((pid, i))

    def set_traits(self, profile_id: str, traits: Mapping[str, Any] | str, now: datetime | None = None) -> list[Change]:
        """A profile's traits as the `profiles` table has them (dict or JSON text)."""
        clock = max(self.now, us(now)) if now is not None else max(self.now, 0)
        changes = self._advance(clock - 1) if self.heap and self.heap[0][0] < clock else []
        self.now = clock
        dirty: set[tuple[str, int]] = set()
        if self.heap and self.heap[0][0] == clock:
            self._pop(clock, dirty)
        value = json.loads(traits) if isinstance(traits, str) else dict(traits)
        p = self.profiles.get(profile_id)
        if p is None:
            p = self.profiles[profile_id] = _Profile(value)
            dirty.update((profile_id, i) for i in self.default_members)
        elif p.traits == value:
            return changes + self._evaluate(dirty, clock) if dirty else changes
        else:
            p.traits = value
        dirty.update((profile_id, i) for gid in self._trait_values(p, self.trait_leaves) for i in self.owners[gid])
        return changes + self._evaluate(dirty, clock) if dirty else changes

    def _trait_values(self, p: _Profile, gids: Iterable[int]) -> list[int]:
        """Refresh the trait conditions among `gids` from the profile's traits; the ones that changed."""
        changed = []
        for gid in gids:
            leaf = self.leaves[gid]
            if not isinstance(leaf, _Trait):
                continue
            value = leaf.test(p.traits)
            slot = p.slots.get(gid)
            before = leaf.default if slot is None else slot[1]
            if slot is None:
                if value != leaf.default:
                    p.slots[gid] = [None, value, _NEVER]
            else:
                slot[1] = value
            if value != before:
                changed.append(gid)
        return changed

    def on_tick(self, now: datetime) -> list[Change]:
        """Windows that slid and future-dated events that fell due by `now`: their membership changes."""
        return self._advance(us(now))

    def _advance(self, limit: int) -> list[Change]:
        """Run the timers due by `limit`, one moment at a time (the conditions changing at the same
        moment are all refreshed before their segments are evaluated)."""
        heap = self.heap
        changes: list[Change] = []
        while heap and heap[0][0] <= limit:
            when = heap[0][0]
            dirty: set[tuple[str, int]] = set()
            self._pop(when, dirty)
            if when > self.now:
                self.now = when
            if dirty:
                changes.extend(self._evaluate(dirty, when))
        if limit > self.now:
            self.now = limit
        return changes

    def _pop(self, when: int, dirty: set[tuple[str, int]]) -> None:
        """Refresh the conditions whose timers are due at `when`; note the segments whose condition changed."""
        heap, profiles, leaves, owners = self.heap, self.profiles, self.leaves, self.owners
        heappop, heapreplace = heapq.heappop, heapq.heapreplace
        while heap and heap[0][0] == when:
            _, pid, gid = heap[0]
            p = profiles[pid]
            slot = p.slots.get(gid)
            if slot is None or slot[2] != when:
                heappop(heap)  # superseded by an earlier timer for the same condition
                continue
            value, nxt = leaves[gid].refresh(slot[0], p, when)  # nxt > when: never this group again
            slot[2] = nxt
            if nxt < _NEVER:
                heapreplace(heap, (nxt, pid, gid))  # pop and push in one pass
            else:
                heappop(heap)
            if value != slot[1]:
                slot[1] = value
                for i in owners[gid]:
                    dirty.add((pid, i))

    # --- evaluation --------------------------------------------------------------------------------------
    def _evaluate(self, dirty: Iterable[tuple[str, int]], now: int) -> list[Change]:
        out: list[Change] = []
        segments, profiles = self.segments, self.profiles
        moment: datetime | None = None
        for pid, index in sorted(dirty):
            seg = segments[index]
            held = seg.expr(profiles[pid].slots)
            if held != (pid in seg.members):
                if held:
                    seg.members.add(pid)
                else:
                    seg.members.discard(pid)
                if moment is None:
                    moment = at(now)
                out.append(Change("segment_entered" if held else "segment_exited", seg.name, pid, moment))
        return out

    def members(self, name: str) -> set[str]:
        return set(next(s for s in self.segments if s.name == name).members)

    # --- warming from the store ------------------------------------------------------------------------------
    @classmethod
    def load(cls, engine: Engine, as_of: datetime, segments: Mapping[str, Compiled] | None = None, *,
             loaded_before: datetime | None = None) -> RealtimeSegments:
        """An evaluator warmed from the store as of `as_of`: every profile's traits, every event received
        by then with its profile, then membership evaluated at `as_of` (no changes reported).
        `segments`: the rules to keep (default: every live segment whose rule can be kept in real time);
        `loaded_before`: only events committed before then (the identity follower's watermark)."""
        if segments is None:
            segments = live_rules(engine, as_of)
        live = cls.of(segments)
        cur = engine.fresh_reader()
        try:
            for pid, traits in engine.fetch_all("SELECT profile_id, traits FROM profiles", cursor=cur):
                live.profiles[str(pid)] = _Profile(json.loads(traits) if isinstance(traits, str) else dict(traits or {}))
            if loaded_before is None:
                rows = engine.fetch_dicts(_EVENTS_SQL + " WHERE e.received_at <= ? ORDER BY e.received_at", [as_of], cursor=cur)
            else:
                rows = engine.fetch_dicts(_EVENTS_SQL + " WHERE e.received_at <= ? AND e.loaded_at < ? ORDER BY e.received_at",
                                          [as_of, loaded_before], cursor=cur)
        finally:
            cur.close()
        for row in rows:
            pid = str(row["profile_id"])
            p = live.profiles.get(pid)
            if p is None:
                p = live.profiles[pid] = _Profile()
            ev = _parsed(row)
            live._feed(pid, p, ev, us(ev["timestamp"]), 0, None)
        now = us(as_of)
        live.now = now
        for pid, p in live.profiles.items():
            live._trait_values(p, live.trait_leaves)
            for gid, slot in p.slots.items():
                if slot[0] is None:
                    continue  # a trait
                value, nxt = live.leaves[gid].refresh(slot[0], p, now)
                slot[1], slot[2] = value, nxt
                if nxt < _NEVER:
                    heapq.heappush(live.heap, (nxt, pid, gid))
            for seg in live.segments:
                if seg.expr(p.slots):
                    seg.members.add(pid)
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
            try:
                compiled = store.compile_text(engine, seg.rule, name=seg.name, as_of=as_of, cursor=cur)
                if compiled.realtime:
                    RealtimeSegments.of({seg.name: compiled})  # Compiled.realtime lets some `ago` comparisons through
                    out[seg.name] = compiled
            except RefineryError as e:  # one rule that cannot be kept must not stop the others; scheduled runs keep it
                log.info("real-time segments: %s is left to scheduled runs: %s", seg.name, type(e).__name__)
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


#: The identity follower's watermark: every event committed before it is attributed (identity/incremental.py).
_WATERMARK_SQL = ("SELECT CASE WHEN resolution_id = 'incremental' THEN finished_at ELSE started_at END AS covered "
                  "FROM identity_resolutions WHERE mode IN ('full', 'incremental') ORDER BY covered DESC NULLS LAST LIMIT 1")
_DEFINITIONS_SQL = "SELECT name, version FROM segments WHERE deleted_at IS NULL ORDER BY name"


class Follower:
    """Tails attributed events (the identity follower writes `event_profiles` and `profiles` as batches
    commit) and feeds them to a `RealtimeSegments`, writing its changes through the writer. When the
    segment definitions change (created, updated, deleted), the evaluator is warmed again from the store."""

    def __init__(self, runtime: Any, interval: float = 0.5):
        self.runtime = runtime
        self.interval = interval
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, name="segments-realtime", daemon=True)
        self.live: RealtimeSegments | None = None
        self.mark: datetime | None = None
        self.definitions: list[tuple[Any, ...]] = []

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
        cur = engine.fresh_reader()
        try:
            found = engine.fetch_all(_WATERMARK_SQL, cursor=cur)
            definitions = [tuple(r) for r in engine.fetch_all(_DEFINITIONS_SQL, cursor=cur)]
        finally:
            cur.close()
        mark = found[0][0] if found else None
        if mark is None:
            return []
        if self.live is None or definitions != self.definitions:
            self.live = RealtimeSegments.load(engine, mark, loaded_before=mark)
            self.mark, self.definitions = mark, definitions
            fixes = self._reconcile(engine, self.live)
            if fixes:
                self.runtime.writer.call(lambda e: record(e, fixes))
            return fixes
        cur = engine.fresh_reader()
        try:
            rows = engine.fetch_dicts(_EVENTS_SQL + " WHERE e.loaded_at >= ? AND e.loaded_at < ? ORDER BY e.received_at",
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


    @staticmethod
    def _reconcile(engine: Engine, live: RealtimeSegments) -> list[Change]:
        """After warming up: the evaluator brought to now, and its members compared with the open stays
        (a membership run or an earlier tail recorded them); the differences, as changes at now."""
        now = datetime.now(UTC)
        live.on_tick(now)
        open_stays: dict[str, set[str]] = {}
        for segment, profile_id in engine.fetch_all("SELECT segment, profile_id FROM segment_members WHERE exited_at IS NULL",
                                                    cursor=engine.fresh_reader()):
            open_stays.setdefault(str(segment), set()).add(str(profile_id))
        changes: list[Change] = []
        for seg in live.segments:
            recorded = open_stays.get(seg.name, set())
            changes += [Change("segment_entered", seg.name, pid, now) for pid in sorted(seg.members - recorded)]
            changes += [Change("segment_exited", seg.name, pid, now) for pid in sorted(recorded - seg.members)]
        return changes


def follow(runtime: Any, interval: float = 0.5) -> Follower:
    """Start the real-time tail for `refinery serve` (call after the identity follower starts; stop before it)."""
    follower = Follower(runtime, interval)
    follower.start()
    return follower
