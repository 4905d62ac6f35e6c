"""Incremental segment runs: when only events were added since the last run (no merge, split, link,
override or deletion) and the rule looks at each profile alone with no window relative to now, a
run evaluates only the profiles whose inputs changed and carries the others over. The result must
be the member set a full evaluation gives, round after round; anything else falls back to a full run."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from refinery.governance.principal import Principal
from refinery.profiles.build import Refresh
from refinery.runtime import Runtime
from refinery.segments import lifecycle, members, store
from support import event, write_events

ACTOR = Principal("local", "local:test", "admin")
RULES = {
    "buyers": "performed 'Order Completed' at least 2 times",
    "big": "sum(total) of 'Order Completed' > 150",
    "pro": "plan = 'pro'",
    "journey": "'Product Viewed' then 'Order Completed' within 1 day",
    "pro_buyers": "in segment 'buyers' and plan = 'pro'",
    "not_pro": "not plan = 'pro' and performed 'Product Viewed'",
    "recent": "performed 'Product Viewed' in last 7 days",  # relative to now: always a full run
}


def _round(rt: Runtime, rng: random.Random, users: list[str]) -> None:
    calls = []
    for _ in range(rng.randint(3, 12)):
        user = rng.choice(users)
        kind = rng.random()
        if kind < 0.4:
            calls.append(event("track", userId=user, event="Order Completed", properties={"total": rng.choice([20, 90, 200])}))
        elif kind < 0.8:
            calls.append(event("track", userId=user, event="Product Viewed", properties={"sku": "s1"}))
        else:
            calls.append(event("identify", userId=user, traits={"plan": rng.choice(["pro", "free", None])}))
    write_events(rt, *calls)
    rt.writer.call(Refresh.from_settings(rt.settings))


def _full(rt: Runtime, name: str) -> list[str]:
    cur = rt.engine.fresh_reader()
    try:
        version = store.version_at(rt.engine, name, datetime.now(UTC), cursor=cur)
        compiled = store.compile_text(rt.engine, version.rule, name=name, cursor=cur)
    finally:
        cur.close()
    return sorted(p for p in members.evaluate(rt.engine, compiled, datetime.now(UTC)).column(0).to_pylist() if p)


def _recorded(rt: Runtime, name: str) -> list[str]:
    return sorted(m["profile_id"] for m in members.members_from_history(rt.engine, name))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_incremental_runs_give_what_a_full_evaluation_gives(runtime: Runtime, seed: int) -> None:
    rt, rng = runtime, random.Random(seed)
    users = [f"u{i}" for i in range(12)]
    _round(rt, rng, users)
    for name, rule in RULES.items():
        lifecycle.create(rt.engine, rt.writer, ACTOR, name, rule)
    incremental = 0
    for _ in range(6):
        _round(rt, rng, users + [f"new{rng.randint(0, 99)}"])
        report = members.run_segments(rt.engine, rt.writer, ACTOR)
        for run in report.runs:
            assert run.status == "completed", run
            if run.segment == "recent":
                assert run.incremental is None  # a window relative to now moves by itself
            elif run.incremental is not None:
                incremental += 1
                assert 0 < run.incremental < rt.engine.fetch_all("SELECT count(*) FROM profiles", cursor=rt.engine.reader())[0][0]
        for name in RULES:
            assert _recorded(rt, name) == _full(rt, name), name
    assert incremental >= 20  # most runs were incremental: the test exercises the path it checks


def test_a_merge_or_a_deletion_falls_back_to_a_full_run(runtime: Runtime) -> None:
    rt = runtime
    write_events(rt, event("track", anonymousId="a1", event="Order Completed", properties={"total": 10}),
                 event("track", anonymousId="a1", event="Order Completed", properties={"total": 10}),
                 event("track", userId="u1", event="Order Completed", properties={"total": 10}),
                 event("track", userId="u2", event="Order Completed", properties={"total": 10}))
    rt.writer.call(Refresh.from_settings(rt.settings))
    lifecycle.create(rt.engine, rt.writer, ACTOR, "buyers", RULES["buyers"])
    write_events(rt, event("track", userId="u2", event="Order Completed", properties={"total": 10}))
    rt.writer.call(Refresh.from_settings(rt.settings))
    step = members.run_segments(rt.engine, rt.writer, ACTOR).runs[0]
    assert step.incremental == 1 and step.entered == 1  # only u2's profile was evaluated

    # a1 becomes u1: the two profiles merge, and the run evaluates everyone
    write_events(rt, event("identify", anonymousId="a1", userId="u1"))
    rt.writer.call(Refresh.from_settings(rt.settings))
    merged = members.run_segments(rt.engine, rt.writer, ACTOR).runs[0]
    assert merged.incremental is None
    assert _recorded(rt, "buyers") == _full(rt, "buyers")

    # a deleted event (retention, erasure) is not "only added": a full run
    rt.writer.call(lambda e: e.execute("DELETE FROM events WHERE message_id = (SELECT min(message_id) FROM events WHERE user_id = 'u2')"))
    rt.writer.call(Refresh.from_settings(rt.settings))
    after = members.run_segments(rt.engine, rt.writer, ACTOR).runs[0]
    assert after.incremental is None
    assert _recorded(rt, "buyers") == _full(rt, "buyers")


def test_full_runs_of_many_segments_are_evaluated_together_with_the_same_members(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of several segments in full evaluates those counted by profiles in one query over the
    events (compile_many); each gets the members its own evaluation gives."""
    rt, rng = runtime, random.Random(7)
    _round(rt, rng, [f"u{i}" for i in range(15)])
    _round(rt, rng, [f"u{i}" for i in range(15)])
    for name, rule in RULES.items():
        lifecycle.create(rt.engine, rt.writer, ACTOR, name, rule, run=False)
    lifecycle.create(rt.engine, rt.writer, ACTOR, "pro_persons", "plan = 'pro' counted by persons above 0.9", run=False)
    together: list[list[str]] = []
    real = members._evaluate_together

    def spy(engine: object, ready: list[members._Ready], at: datetime) -> object:
        out = real(engine, ready, at)  # type: ignore[arg-type]
        together.append(sorted(out) if out else [])
        return out

    monkeypatch.setattr(members, "_evaluate_together", spy)
    report = members.run_segments(rt.engine, rt.writer, ACTOR, force=True)
    assert together == [sorted(RULES)]  # every rule counted by profiles, in one query; the persons rule alone
    assert {r.segment for r in report.runs} == {*RULES, "pro_persons"} and not report.failed
    for name in [*RULES, "pro_persons"]:
        assert _recorded(rt, name) == _full(rt, name), name
