"""The incremental path gives what full resolutions give: the same random events, fed in random
batches and orders through `identity.incremental.run_batch`, leave identities, edges, refusals,
merges, event attribution and profiles exactly as a full resolution after every batch does, and
as one full resolution over all of them does (for everything but the merge history, which is a
history of the batches)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reference import RESET, T0, events_strategy, rows_of, rules_strategy, send  # helpers, not tests

from refinery.identity import IdentityRules
from refinery.identity.incremental import run_batch
from refinery.identity.working_set import WorkingSet
from refinery.profiles.build import resolve_and_build
from refinery.profiles.policy import TraitPolicy
from refinery.runtime import Runtime
from refinery.settings import Settings

POLICY = TraitPolicy()
#: The follower's working set, kept across batches and examples as the follower keeps it (a reset of
#: the tables between examples, a full resolution in between: it must notice and start again).
KEPT = WorkingSet()
TABLES = {
    "identities": "SELECT * FROM identities",
    "identity_edges": "SELECT * FROM identity_edges",
    "identity_blocked": "SELECT * FROM identity_blocked",
    "event_profiles": "SELECT * FROM event_profiles",
    "profiles": "SELECT * EXCLUDE (updated_at) FROM profiles",
}
MERGES = "SELECT surviving_profile_id, merged_profile_id, evidence, undone_at IS NULL AS live FROM profile_merges"


def canonical(value: Any) -> Any:
    """JSON objects with sorted keys: `profiles.build` groups them with json_group_object, whose key
    order follows the aggregation's row order, not the data."""
    if isinstance(value, str) and value.startswith("{"):
        return json.dumps(json.loads(value), sort_keys=True)
    return value


def snapshot(rt: Runtime, queries: dict[str, str]) -> dict[str, list[str]]:
    return {name: sorted(repr(tuple(canonical(v) for v in r.values())) for r in rows_of(rt, q)) for name, q in queries.items()}


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Runtime, Runtime, Runtime]]:
    base: Path = tmp_path_factory.mktemp("incremental")
    # One master key for the three stores: tokens (and the profile ids derived from them) are then comparable.
    key = base / "master.key"
    rts = tuple(Runtime.open(Settings(data_dir=base / name, admin_token="t", master_key_file=key)) for name in ("inc", "full_each", "full_once"))
    try:
        yield rts  # type: ignore[misc]
    finally:
        for rt in rts:
            rt.close()


def reset(*rts: Runtime) -> None:
    def clear(engine: Any) -> None:
        for t in RESET:
            engine.execute(f"DELETE FROM {t}")  # noqa: S608 - constant names
    for rt in rts:
        rt.writer.call(clear)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(events=events_strategy, rules=rules_strategy, seed=st.integers(0, 2**16), cuts=st.integers(1, 5),
       full_between=st.booleans(), keep=st.booleans())
def test_incremental_equals_full(runtimes: tuple[Runtime, Runtime, Runtime], events: list[dict[str, Any]], rules: IdentityRules,
                                 seed: int, cuts: int, full_between: bool, keep: bool) -> None:
    """`keep`: with the working set kept between batches (the follower's way), else read from the tables."""
    inc, each, once = runtimes
    ws = KEPT if keep else None
    reset(inc, each, once)
    shuffled = events[:]
    rnd = random.Random(seed)
    rnd.shuffle(shuffled)
    bounds = sorted({0, len(shuffled), *(rnd.randrange(len(shuffled) + 1) for _ in range(cuts))})
    batches = [shuffled[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    inc.writer.call(lambda e: run_batch(e, rules, POLICY, working_set=ws))  # nothing resolved yet: a full resolution of nothing
    modes = []
    for k, batch in enumerate(batches):
        send(inc, batch)
        send(each, batch)
        if full_between and k == len(batches) // 2:  # a full resolution in between, then incremental again
            inc.writer.call(lambda e: resolve_and_build(e, rules, POLICY))
        modes.append(inc.writer.call(lambda e: run_batch(e, rules, POLICY, working_set=ws)).mode)
        each.writer.call(lambda e: resolve_and_build(e, rules, POLICY))
        got, want = snapshot(inc, {**TABLES, "merges": MERGES}), snapshot(each, {**TABLES, "merges": MERGES})
        for name in want:
            assert got[name] == want[name], (name, k, modes)
    send(once, events)
    once.writer.call(lambda e: resolve_and_build(e, rules, POLICY))
    assert snapshot(inc, TABLES) == snapshot(once, TABLES)


def test_a_batch_of_known_identifiers_only_attaches(tmp_path: Path) -> None:
    """Every identifier and edge known: the batch only attributes its events (no region resolved)."""
    rules = IdentityRules()
    with Runtime.open(Settings(data_dir=tmp_path / "d", admin_token="t")) as rt:
        first = [{"type": "identify", "messageId": "m1", "userId": "u1", "anonymousId": "a1", "timestamp": T0.isoformat(),
                  "traits": {"plan": "free"}}]
        send(rt, first)
        assert rt.writer.call(lambda e: run_batch(e, rules, POLICY)).mode == "full"
        send(rt, [{**first[0], "messageId": "m2", "type": "track", "event": "Paid"},
                  {**first[0], "messageId": "m3", "traits": {"plan": "pro"}, "timestamp": "2026-01-02T00:00:00Z"}])
        report = rt.writer.call(lambda e: run_batch(e, rules, POLICY))
        assert (report.mode, report.events, report.region) == ("attach", 2, 0)
        [profile] = rows_of(rt, "SELECT * FROM profiles")
        assert profile["event_count"] == 3 and '"plan":"pro"' in profile["traits"]
        send(rt, [{**first[0], "messageId": "m4", "anonymousId": "a2"}])
        report = rt.writer.call(lambda e: run_batch(e, rules, POLICY))
        assert (report.mode, report.touched) == ("region", 2)
        assert {r["profile_id"] for r in rows_of(rt, "SELECT * FROM identities")} == {profile["profile_id"]}
        assert rt.writer.call(lambda e: run_batch(e, rules, POLICY)).mode == "none"
