"""Attach and settle as separate transactions give what full resolutions give.

The same random events in random batches and orders go through `run_batch(phase="attach")`; after
each batch the attribution (`event_profiles`) and every identifier's profile, status and reason
already equal a full resolution's; settles come at random points (with the follower's working set,
or with a fresh one as after a restart, which reads the unsettled events back from the tables), and
after a settle every table equals a full resolution's. Also the follower itself: it attaches known
people's events alone, settles later, and a follower started over unsettled events settles them."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_incremental import MERGES, POLICY, TABLES, reset, snapshot  # helpers, not tests
from test_reference import T0, events_strategy, rows_of, rules_strategy, send  # helpers, not tests

from refinery.identity import IdentityRules
from refinery.identity.incremental import Follower, run_batch
from refinery.identity.working_set import WorkingSet
from refinery.profiles.build import resolve_and_build
from refinery.runtime import Runtime
from refinery.settings import Settings

#: What an attach alone must already leave as a full resolution does.
ATTACHED = {
    "event_profiles": "SELECT * FROM event_profiles",
    "identities": "SELECT identifier_type, value, profile_id, status, reason FROM identities",
}
KEPT = WorkingSet()


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Runtime, Runtime, Runtime]]:
    base: Path = tmp_path_factory.mktemp("settle")
    key = base / "master.key"
    rts = tuple(Runtime.open(Settings(data_dir=base / name, admin_token="t", master_key_file=key)) for name in ("inc", "full_each", "full_once"))
    try:
        yield rts
    finally:
        for rt in rts:
            rt.close()


def again(ev: dict[str, Any]) -> dict[str, Any]:
    """The same identifiers at the same time, in a track call with a new message id (an identify's
    traits move to the context: they carry its email and phone, and change no profile traits there)."""
    out = {k: v for k, v in ev.items() if k not in ("traits", "event")}
    out.update(type="track", event="Again", messageId=uuid.uuid4().hex)
    if ev.get("traits"):
        out["context"] = {**ev.get("context", {}), "traits": ev["traits"]}
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(events=events_strategy, rules=rules_strategy, seed=st.integers(0, 2**16), cuts=st.integers(1, 6),
       plan=st.lists(st.sampled_from(["attach", "settle", "settle_fresh", "both"]), min_size=5, max_size=5))
def test_attach_then_settle_equals_full(runtimes: tuple[Runtime, Runtime, Runtime], events: list[dict[str, Any]],
                                        rules: IdentityRules, seed: int, cuts: int, plan: list[str]) -> None:
    """`plan[k]` after batch k: attach only, attach then settle (kept working set, or a fresh one:
    a restart), or both in one transaction."""
    inc, each, once = runtimes
    reset(inc, each, once)
    KEPT.clear()
    shuffled = events[:]
    rnd = random.Random(seed)
    rnd.shuffle(shuffled)
    bounds = sorted({0, len(shuffled), *(rnd.randrange(len(shuffled) + 1) for _ in range(cuts))})
    batches: list[list[dict[str, Any]]] = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        batches.append(shuffled[a:b])
        # Known people again (what the attach path is for): copies of events sent so far, as track calls.
        batches.append([again(ev) for ev in rnd.sample(shuffled[:b], min(b, rnd.randint(1, 4))) if ev["type"] != "alias"])
    inc.writer.call(lambda e: run_batch(e, rules, POLICY, working_set=KEPT))  # nothing resolved yet: a full resolution of nothing
    modes: list[str] = []
    for k, batch in enumerate(batches):
        if not batch:
            continue
        send(inc, batch)
        send(each, batch)
        step = plan[k % len(plan)]
        phase = "both" if step == "both" else "attach"
        modes.append(inc.writer.call(lambda e, p=phase: run_batch(e, rules, POLICY, working_set=KEPT, phase=p)).mode)
        each.writer.call(lambda e: resolve_and_build(e, rules, POLICY))
        got, want = snapshot(inc, ATTACHED), snapshot(each, ATTACHED)
        for name in want:
            assert got[name] == want[name], ("attached", name, k, modes)
        if step in ("settle", "settle_fresh"):
            ws = KEPT if step == "settle" else WorkingSet()
            modes.append(inc.writer.call(lambda e, w=ws: run_batch(e, rules, POLICY, working_set=w, phase="settle")).mode)
            if step == "settle_fresh":
                KEPT.clear()  # the follower's set is gone with the process
        if step != "attach":
            got, want = snapshot(inc, {**TABLES, "merges": MERGES}), snapshot(each, {**TABLES, "merges": MERGES})
            for name in want:
                assert got[name] == want[name], ("settled", name, k, modes)
    inc.writer.call(lambda e: run_batch(e, rules, POLICY, working_set=KEPT, phase="settle"))
    send(once, [ev for batch in batches for ev in batch])
    once.writer.call(lambda e: resolve_and_build(e, rules, POLICY))
    assert snapshot(inc, TABLES) == snapshot(once, TABLES)


def test_known_people_are_attached_alone_then_settled(tmp_path: Path) -> None:
    """An event of a known person: `attach` writes its event_profiles row and moves the attach
    watermark only; the profile's counts and the identifier's statistics change at `settle`."""
    rules = IdentityRules()
    with Runtime.open(Settings(data_dir=tmp_path / "d", admin_token="t")) as rt:
        first = {"type": "identify", "messageId": "m1", "userId": "u1", "anonymousId": "a1", "timestamp": T0.isoformat()}
        send(rt, [first])
        assert rt.writer.call(lambda e: run_batch(e, rules, POLICY)).mode == "full"
        send(rt, [{**first, "messageId": "m2", "type": "track", "event": "Paid", "timestamp": "2026-01-02T00:00:00Z"}])
        report = rt.writer.call(lambda e: run_batch(e, rules, POLICY, phase="attach"))
        assert (report.mode, report.phase, report.events, report.settled) == ("attach", "attach", 1, 0)
        assert [r["message_id"] for r in rows_of(rt, "SELECT message_id FROM event_profiles ORDER BY 1")] == ["m1", "m2"]
        [profile] = rows_of(rt, "SELECT * FROM profiles")
        assert profile["event_count"] == 1  # not settled yet
        marks = {r["resolution_id"]: r["finished_at"] for r in rows_of(rt, "SELECT * FROM identity_resolutions")}
        assert marks["incremental"] > marks["incremental_settled"]
        report = rt.writer.call(lambda e: run_batch(e, rules, POLICY, phase="settle"))
        assert (report.mode, report.phase, report.settled) == ("settle", "settle", 1)
        [profile] = rows_of(rt, "SELECT * FROM profiles")
        assert profile["event_count"] == 2 and str(profile["last_seen"].date()) == "2026-01-02"
        assert {r["event_count"] for r in rows_of(rt, "SELECT * FROM identities")} == {2}
        assert rt.writer.call(lambda e: run_batch(e, rules, POLICY, phase="settle")).mode == "none"
        # A new device of a known person: the region path, attached and settled at once.
        send(rt, [{**first, "messageId": "m3", "anonymousId": "a2"}])
        report = rt.writer.call(lambda e: run_batch(e, rules, POLICY, phase="attach"))
        assert (report.mode, report.phase) == ("region", "both")
        marks = {r["resolution_id"]: r["finished_at"] for r in rows_of(rt, "SELECT * FROM identity_resolutions")}
        assert marks["incremental"] == marks["incremental_settled"]


def _wait(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_follower_settles_what_it_attached_and_what_a_previous_run_left(tmp_path: Path) -> None:
    rules = IdentityRules()
    events = [{"type": "identify", "messageId": f"i{u}", "userId": f"u{u}", "anonymousId": f"a{u}", "timestamp": T0.isoformat()}
              for u in range(5)]
    key = tmp_path / "master.key"  # one key for both stores: the same tokens and profile ids
    with Runtime.open(Settings(data_dir=tmp_path / "d", admin_token="t", master_key_file=key)) as rt, \
            Runtime.open(Settings(data_dir=tmp_path / "full", admin_token="t", master_key_file=key)) as full:
        send(rt, events)
        send(full, events)
        rt.writer.call(lambda e: run_batch(e, rules, POLICY))
        # A previous run attached these and stopped before settling them.
        more = [{"type": "track", "event": "Viewed", "messageId": f"t{u}", "userId": f"u{u}", "anonymousId": f"a{u}",
                 "timestamp": T0.isoformat()} for u in range(5)]
        send(rt, more)
        send(full, more)
        assert rt.writer.call(lambda e: run_batch(e, rules, POLICY, phase="attach")).mode == "attach"
        follower = Follower(rt.writer, rules, POLICY, settle_after=0.05, settle_within=0.5)
        follower.start()
        try:
            _wait(lambda: follower.settles >= 1)  # at start it settles what it finds
            later = [{**ev, "messageId": "x" + ev["messageId"]} for ev in more]
            send(rt, later)
            send(full, later)
            _wait(lambda: rows_of(rt, "SELECT count(*) AS n FROM event_profiles")[0]["n"] == 15)
            _wait(lambda: follower.settles >= 2)
        finally:
            follower.stop()
        full.writer.call(lambda e: resolve_and_build(e, rules, POLICY))
        assert snapshot(rt, TABLES) == snapshot(full, TABLES)
