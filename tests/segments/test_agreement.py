"""The compiled SQL, the reference evaluator (segments/reference.py) and the real-time evaluator
(segments/realtime.py) select the same members at the same moments, for generated rules over
generated event streams sent through the real pipeline (staging, cleaning, identity, profiles).

Each example writes two batches of events; the members are compared as of a moment between the
batches (the second batch is not received yet), just after them, and days later (windows have slid,
future-dated events have become due). The real-time evaluator is fed the same events in the order
they were received, once from empty and once warmed with `load` from the store after the first batch.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from refinery.identity import IdentityRules
from refinery.privacy.pii import token_for
from refinery.profiles.build import resolve_and_build
from refinery.profiles.policy import TraitPolicy
from refinery.runtime import Runtime
from refinery.segments import reference
from refinery.segments.catalog import Catalog, build_catalog
from refinery.segments.compile import CompileContext, Compiled, compile_rule
from refinery.segments.errors import SegmentError
from refinery.segments.realtime import Change, NotRealtime, RealtimeSegments
from support import fresh_runtime, write_events

# --- the vocabulary ------------------------------------------------------------------------------------
EVENTS = {
    "Order Completed": {"total": "number", "category": "string", "is_gift": "boolean"},
    "Product Viewed": {"category": "string", "price": "number"},
    "Login": {"method": "string"},
}
TRAITS = {"plan": "string", "age": "number", "vip": "boolean", "email": "string"}
CATEGORIES = ["shoes", "hats", "socks"]
USERS = ["u0", "u1", "u2", "u3"]
#: Event times, in days before the moment the example is written (negative: in the future).
OFFSETS = [-0.9, -0.25, 0.0, 0.5, 1.0, 2.0, 4.0, 6.0, 7.0, 8.0, 12.0, 29.0, 31.0]
SEGMENTS = {"buyers": "performed 'Order Completed' at least 2 times", "pros": "plan = 'pro'"}
RESET = ("events", "raw_events", "message_ids", "failed_events", "identities", "identity_edges", "identity_blocked",
         "profile_merges", "identity_resolutions", "event_profiles", "profiles")


# --- rules ---------------------------------------------------------------------------------------------
def q(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


event_names = st.sampled_from(list(EVENTS))
windows = st.sampled_from(["", " in last 7 days", " in last 36 hours", " in last 3 days",
                           " between 30 days ago and 7 days ago", " since 5 days ago", " before 2 days ago"])
counts = st.integers(0, 3)
ops = st.sampled_from(["=", "!=", "<", "<=", ">", ">="])


@st.composite
def where(draw: st.DrawFn, event: str) -> str:
    props = EVENTS[event]
    name = draw(st.sampled_from(sorted(props)))
    kind = props[name]
    if kind == "number":
        one = f"{name} {draw(ops)} {draw(st.sampled_from([0, 10, 25, 50]))}"
    elif kind == "boolean":
        one = f"{name} = {draw(st.sampled_from(['true', 'false']))}"
    elif name == "category":
        one = draw(st.sampled_from([f"category = {q(draw(st.sampled_from(CATEGORIES)))}", "category in ('shoes', 'socks')",
                                    "category contains 'o'", "category matches '^s'", "category starts with 'h'",
                                    "category != 'hats'", "category is set", "category not in ('hats')"]))
    else:
        one = draw(st.sampled_from(["method = 'google'", "method is not set", "method ends with 'ail'"]))
    if draw(st.integers(0, 3)) == 0:
        return f"({one} or timestamp < 2000-01-01)"
    return one


@st.composite
def condition(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["performed", "performed", "not_performed", "count", "agg", "distinct", "frequent",
                                 "time", "sequence", "sequence", "trait", "trait", "segment"]))
    event = draw(event_names)
    window = draw(windows)
    if kind == "performed":
        w = f" where {draw(where(event))}" if draw(st.booleans()) else ""
        freq = draw(st.sampled_from(["", " at least {n} times", " at most {n} times", " exactly {n} times",
                                     " more than {n} times", " fewer than {n} times"])).format(n=draw(counts))
        return f"performed {q(event)}{w}{freq}{window}"
    if kind == "not_performed":
        return f"not performed {q(event)}{window}"
    if kind == "count":
        if draw(st.booleans()):
            return f"count(event = {q(event)} and {draw(where(event))}) {draw(ops)} {draw(counts)}{window}"
        return f"count of {q(event)} where {draw(where(event))} {draw(ops)} {draw(counts)}{window}"
    if kind == "agg":
        fn = draw(st.sampled_from(["sum", "avg", "min", "max"]))
        return f"{fn}(total) of 'Order Completed' {draw(ops)} {draw(st.sampled_from([0, 20, 45, 100]))}{window}"
    if kind == "distinct":
        return f"count(distinct category) of {q(draw(st.sampled_from(['Order Completed', 'Product Viewed'])))} {draw(ops)} {draw(counts)}{window}"
    if kind == "frequent":
        return f"most frequent category of 'Product Viewed' = {q(draw(st.sampled_from(CATEGORIES)))}{window}"
    if kind == "time":
        which = draw(st.sampled_from(["first", "last"]))
        return f"{which} time of {q(event)} {draw(st.sampled_from(['<', '>', '>=']))} {draw(st.sampled_from([3, 7, 10]))} days ago"
    if kind == "sequence":
        first, second = draw(event_names), draw(event_names)
        w = f" where {draw(where(second))}" if draw(st.integers(0, 2)) == 0 else ""
        third = f" then {q(draw(event_names))}" if draw(st.integers(0, 3)) == 0 else ""
        within = draw(st.sampled_from(["1 day", "2 days", "12 hours", "1 week"]))
        return f"{q(first)} then {q(second)}{w}{third} within {within}{window}"
    if kind == "trait":
        return draw(st.sampled_from(["plan = 'pro'", "plan != 'pro'", "plan in ('pro', 'team')", "plan is set",
                                     "age between 18 and 30", "age >= 40", "vip = true", "email is set",
                                     "email = 'U1@Example.com'", "plan starts with 'p'"]))
    return f"in segment {q(draw(st.sampled_from(sorted(SEGMENTS))))}"


@st.composite
def rule(draw: st.DrawFn, depth: int = 0) -> str:
    if depth >= 2 or draw(st.integers(0, 2)) == 0:
        c = draw(condition())
        return f"not ({c})" if draw(st.integers(0, 5)) == 0 else c
    joiner = draw(st.sampled_from([" and ", " or "]))
    parts = [draw(rule(depth + 1)) for _ in range(draw(st.integers(2, 3)))]
    return "(" + joiner.join(parts) + ")"


# --- event streams -------------------------------------------------------------------------------------
@st.composite
def stream(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Calls with `_days` (how long before the write they happened) instead of a timestamp."""
    out: list[dict[str, Any]] = []
    for user in USERS[:draw(st.integers(1, 4))]:
        traits: dict[str, Any] = {}
        if draw(st.booleans()):
            traits["plan"] = draw(st.sampled_from(["pro", "free", "team"]))
        if draw(st.booleans()):
            traits["age"] = draw(st.sampled_from([17, 18, 25, 30, 44]))
        if draw(st.booleans()):
            traits["vip"] = draw(st.booleans())
        if draw(st.integers(0, 2)) == 0:
            traits["email"] = f"{user.upper()}@example.com"
        out.append({"type": "identify", "userId": user, "traits": traits, "_days": 40.0})
    n = draw(st.integers(3, 14))
    for _ in range(n):
        event = draw(event_names)
        props: dict[str, Any] = {}
        if event == "Order Completed":
            props = {"total": draw(st.sampled_from([5, 10, 25, 40, 120])), "category": draw(st.sampled_from(CATEGORIES))}
            if draw(st.booleans()):
                props["is_gift"] = draw(st.booleans())
        elif event == "Product Viewed":
            props = {"category": draw(st.sampled_from(CATEGORIES)), "price": draw(st.sampled_from([10, 30]))}
        elif draw(st.booleans()):
            props = {"method": draw(st.sampled_from(["google", "email"]))}
        call: dict[str, Any] = {"type": "track", "event": event, "properties": props, "_days": draw(st.sampled_from(OFFSETS))}
        who = draw(st.sampled_from([*USERS, "anon"]))
        if who == "anon":
            call["anonymousId"] = "a-" + draw(st.sampled_from(["x", "y"]))
        else:
            call["userId"] = who
        out.append(call)
    return out


# --- the store -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    path: Path = tmp_path_factory.mktemp("agreement")
    with fresh_runtime(path) as rt:
        yield rt


def reset(rt: Runtime) -> None:
    def clear(engine: Any) -> None:
        for t in RESET:
            engine.execute(f"DELETE FROM {t}")  # noqa: S608 - constant names
    rt.writer.call(clear)


def context(rt: Runtime) -> CompileContext:
    engine = rt.engine
    store = build_catalog(engine)
    catalog = Catalog(EVENTS, TRAITS, store.personal_traits, store.personal_properties)
    return CompileContext(catalog, segments=SEGMENTS, tokenise=lambda k, v: token_for(engine, k, v) or v)


def send(rt: Runtime, calls: list[dict[str, Any]], base: datetime) -> None:
    events = []
    for c in calls:
        ev = {k: v for k, v in c.items() if k != "_days"}
        ev["messageId"] = uuid.uuid4().hex
        ev["timestamp"] = (base - timedelta(days=c["_days"])).isoformat()
        events.append(ev)
    outcomes = write_events(rt, *events)
    assert all(o.status == "loaded" for o in outcomes), outcomes


def event_rows(rt: Runtime) -> list[dict[str, Any]]:
    """The stored events with their profiles, in the order they were received."""
    return rt.engine.fetch_dicts(
        "SELECT e.source, e.message_id, e.type, e.event, e.name, e.properties, e.traits, e.context, e.timestamp, "
        "e.received_at, ep.profile_id FROM events e JOIN event_profiles ep USING (source, message_id) "
        "ORDER BY e.received_at, e.message_id", cursor=rt.engine.reader())


def profile_traits(rt: Runtime) -> dict[str, Any]:
    return dict(rt.engine.fetch_all("SELECT profile_id, traits FROM profiles", cursor=rt.engine.reader()))


def sql_members(rt: Runtime, compiled: Compiled, as_of: datetime) -> set[str]:
    return {str(r[0]) for r in rt.engine.fetch_all(compiled.members(as_of), cursor=rt.engine.fresh_reader())}


def stream_into(live: RealtimeSegments, rows: list[dict[str, Any]], traits: dict[str, Any]) -> list[Change]:
    """Traits first (as the profiles table has them), then the events; the changes the events caused."""
    for profile, t in traits.items():
        live.set_traits(profile, t)
    return [c for row in rows for c in live.on_event(row)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(texts=st.lists(rule(), min_size=5, max_size=5), first=stream(), second=stream())
def test_sql_reference_and_realtime_agree(runtime: Runtime, texts: list[str], first: list[dict[str, Any]],
                                          second: list[dict[str, Any]]) -> None:
    ctx = context(runtime)
    rules: dict[str, Compiled] = {}
    for i, text in enumerate(texts):
        with contextlib.suppress(SegmentError):  # a generated rule can be refused (e.g. `between` bounds reversed)
            rules[f"s{i}"] = compile_rule(text, ctx)
    assume(rules)
    reset(runtime)
    base = datetime.now(UTC)
    send(runtime, first, base)
    between = datetime.now(UTC)
    time.sleep(0.002)
    send(runtime, second, base)
    runtime.writer.call(lambda e: resolve_and_build(e, IdentityRules(), TraitPolicy()))
    after = datetime.now(UTC)
    rows, traits = event_rows(runtime), profile_traits(runtime)
    moments = [between, after, after + timedelta(hours=30), after + timedelta(days=3, hours=1)]

    expected: dict[tuple[str, datetime], set[str]] = {}
    for name, compiled in rules.items():
        for at in moments:
            expected[name, at] = reference.members(compiled, rows, traits, at)
            assert sql_members(runtime, compiled, at) == expected[name, at], (compiled.rule.text, at)

    live_rules = {}
    for name, compiled in rules.items():
        try:
            RealtimeSegments.of({name: compiled})
        except NotRealtime:
            assert not compiled.realtime, compiled.rule.text  # the generator writes `ago` only in windows and first/last time
            event("sql and reference only")
            continue
        assert compiled.realtime, compiled.rule.text
        event("sql, reference and real time")
        live_rules[name] = compiled
    if not live_rules:
        return
    live = RealtimeSegments.of(live_rules)
    # from empty, event by event
    changes = stream_into(live, [r for r in rows if r["received_at"] <= between], traits)
    changes += live.on_tick(between)
    for name in live_rules:
        assert live.members(name) == expected[name, between], (rules[name].rule.text, "realtime", between)
    changes += stream_into(live, [r for r in rows if r["received_at"] > between], {})
    for at in moments[1:]:
        changes += live.on_tick(at)
        for name in live_rules:
            assert live.members(name) == expected[name, at], (rules[name].rule.text, "realtime", at)
    # every change happened exactly when it says: the reference differs just before it and agrees at it
    for c in changes:
        entered, compiled = c.kind == "segment_entered", rules[c.segment]
        assert (c.profile_id in reference.members(compiled, rows, traits, c.at)) == entered, (compiled.rule.text, c)
        before = reference.members(compiled, rows, traits, c.at - timedelta(microseconds=1))
        assert (c.profile_id in before) != entered, (compiled.rule.text, c)
    event(f"changes: {'some' if changes else 'none'}")
    # warmed from the store as of `between`, then the second batch
    warm = RealtimeSegments.load(runtime.engine, between, live_rules)
    for name in live_rules:
        assert warm.members(name) == expected[name, between], (rules[name].rule.text, "loaded", between)
    stream_into(warm, [r for r in rows if r["received_at"] > between], {})
    for at in moments[1:]:
        warm.on_tick(at)
        for name in live_rules:
            assert warm.members(name) == expected[name, at], (rules[name].rule.text, "loaded", at)
