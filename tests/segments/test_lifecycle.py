"""Segments end to end in process, with the real compiler over real DuckDB: definitions and their
versions, runs that record who entered and left, skipping unchanged inputs, as-of answers from
history and by evaluation, preview, explain, and bad input refused before anything is written."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest

from refinery.errors import RefineryError
from refinery.governance.principal import Principal
from refinery.profiles.build import Refresh
from refinery.runtime import Runtime
from refinery.segments import lifecycle, members, store
from refinery.segments.errors import SegmentError
from support import event, write_events

ACTOR = Principal("local", "local:test", "admin")


def _order(user: str, total: float) -> dict[str, Any]:
    return event("track", userId=user, event="Order Completed", properties={"total": total})


def _resolve(rt: Runtime) -> None:
    rt.writer.call(Refresh.from_settings(rt.settings))


def _profile(rt: Runtime, user: str) -> str:
    return str(rt.engine.fetch_all("SELECT profile_id FROM identities WHERE identifier_type = 'user_id' AND value = ?", [user],
                                   cursor=rt.engine.reader())[0][0])


def _ids(body: dict[str, Any]) -> list[str]:
    return sorted(m if isinstance(m, str) else m["profile_id"] for m in body["members"])


def _create(rt: Runtime, name: str, rule: str) -> dict[str, Any]:
    return lifecycle.create(rt.engine, rt.writer, ACTOR, name, rule)


@pytest.fixture
def shop(runtime: Runtime) -> Runtime:
    write_events(runtime, _order("alice", 120), _order("alice", 80), _order("bob", 30),
                 event("identify", userId="alice", traits={"plan": "pro"}), event("identify", userId="bob", traits={"plan": "free"}))
    _resolve(runtime)
    return runtime


def test_create_run_change_and_read_the_past(shop: Runtime) -> None:
    rt = shop
    alice, bob = _profile(rt, "alice"), _profile(rt, "bob")
    made = _create(rt, "buyers", "performed 'Order Completed' at least 2 times")
    assert made["version"] == 1 and made["identity_policy"] == {"mode": "profiles"}
    assert made["run"]["runs"][0]["entered"] == 1
    assert _ids(lifecycle.read_members(rt.engine, rt.writer, ACTOR, "buyers")) == [alice]

    # nothing changed: the run is skipped; forced, it runs and changes nothing
    again = members.run_segments(rt.engine, rt.writer, ACTOR, ["buyers"])
    assert again.skipped == ["buyers"] and again.runs == []
    forced = members.run_segments(rt.engine, rt.writer, ACTOR, ["buyers"], force=True)
    assert (forced.runs[0].entered, forced.runs[0].exited, forced.runs[0].members) == (0, 0, 1)

    time.sleep(0.01)
    before_bob = datetime.now(UTC)
    time.sleep(0.01)
    write_events(rt, _order("bob", 45))
    _resolve(rt)
    ran = members.run_segments(rt.engine, rt.writer, ACTOR)
    assert ran.skipped == [] and (ran.runs[0].entered, ran.runs[0].members) == (1, 2)
    assert _ids(lifecycle.read_members(rt.engine, rt.writer, ACTOR, "buyers")) == sorted([alice, bob])

    # a new rule is a new version; both leave, and the outbox says so
    changed = lifecycle.update(rt.engine, rt.writer, ACTOR, "buyers", rule="performed 'Order Completed' at least 3 times")
    assert changed["version"] == 2 and changed["run"]["runs"][0]["exited"] == 2
    assert _ids(lifecycle.read_members(rt.engine, rt.writer, ACTOR, "buyers")) == []
    outbox = rt.engine.fetch_all("SELECT kind, profile_id FROM segment_events WHERE segment = 'buyers' ORDER BY event_id",
                                 cursor=rt.engine.reader())
    assert sorted(outbox) == sorted([("segment_entered", alice), ("segment_entered", bob), ("segment_exited", alice),
                                     ("segment_exited", bob)])

    # the past, two ways: what the runs recorded, and the rule then in force over the events received by then
    recorded = lifecycle.read_members(rt.engine, rt.writer, ACTOR, "buyers", as_of=before_bob.isoformat())
    evaluated = lifecycle.read_members(rt.engine, rt.writer, ACTOR, "buyers", as_of=before_bob.isoformat(), source="evaluated")
    assert _ids(recorded) == [alice] and _ids(evaluated) == [alice] and evaluated["version"] == 1
    history = lifecycle.read_history(rt.engine, "buyers")
    assert [v["version"] for v in history["versions"]] == [1, 2]
    assert [r["status"] for r in history["runs"]] == ["completed"] * 4
    # every read of members was audited, by segment, with counts
    reads = rt.engine.fetch_all("SELECT count(*) FROM audit_log WHERE action = 'segments.members' AND object = 'segment:buyers'",
                                cursor=rt.engine.reader())[0][0]
    assert reads == 5


def test_a_run_as_of_before_the_last_is_refused_with_the_way_to_read_the_past(shop: Runtime) -> None:
    _create(shop, "buyers", "performed 'Order Completed'")
    with pytest.raises(store.SegmentLifecycleError, match="members buyers --as-of"):
        members.run_segments(shop.engine, shop.writer, ACTOR, ["buyers"], as_of=datetime(2026, 1, 1, tzinfo=UTC))


def test_relative_windows_are_never_skipped(shop: Runtime) -> None:
    _create(shop, "recent", "performed 'Order Completed' in last 36500 days")
    assert members.run_segments(shop.engine, shop.writer, ACTOR).skipped == []
    _create(shop, "ever", "performed 'Order Completed'")
    _create(shop, "includes_recent", "in segment 'recent' and plan = 'pro'")  # a window inside an included segment counts too
    report = members.run_segments(shop.engine, shop.writer, ACTOR)
    assert report.skipped == ["ever"] and [r.segment for r in report.runs] == ["includes_recent", "recent"]


@pytest.mark.parametrize(("rule", "code"), [
    ("performed 'Order Completed' at least", "segment_syntax_error"),
    ("performed 'Order Complete'", "segment_unknown_name"),
    ("total contains 'x'", None),
    ("performed 'Order Completed' in last 0 days", "segment_limit"),
    ("in segment 'buyers'", "segment_cycle"),
])
def test_bad_rules_are_refused_and_nothing_is_written(shop: Runtime, rule: str, code: str | None) -> None:
    with pytest.raises(SegmentError) as caught:
        _create(shop, "buyers", rule)
    assert caught.value.http_status == 400 and caught.value.fix
    if code:
        assert caught.value.code == code, caught.value.to_dict()
    assert shop.engine.fetch_all("SELECT count(*) FROM segments", cursor=shop.engine.reader())[0][0] == 0
    assert shop.engine.fetch_all("SELECT count(*) FROM audit_log WHERE action LIKE 'segments.%'", cursor=shop.engine.reader())[0][0] == 0


def test_names_duplicates_cycles_and_deleting_what_is_used(shop: Runtime) -> None:
    with pytest.raises(store.SegmentLifecycleError, match="not allowed"):
        _create(shop, "Big Spenders; DROP TABLE events", "performed 'Order Completed'")
    _create(shop, "buyers", "performed 'Order Completed'")
    with pytest.raises(RefineryError) as dup:
        _create(shop, "buyers", "performed 'Order Completed'")
    assert dup.value.http_status == 409
    _create(shop, "pro_buyers", "in segment 'buyers' and plan = 'pro'")
    with pytest.raises(SegmentError) as cycle:
        lifecycle.update(shop.engine, shop.writer, ACTOR, "buyers", rule="in segment 'pro_buyers'")
    assert cycle.value.code == "segment_cycle"
    with pytest.raises(store.SegmentInUse, match="pro_buyers"):
        lifecycle.delete(shop.writer, ACTOR, "buyers")
    assert _ids(lifecycle.read_members(shop.engine, shop.writer, ACTOR, "pro_buyers")) == [_profile(shop, "alice")]
    gone = lifecycle.delete(shop.writer, ACTOR, "pro_buyers")
    assert gone["exited"] == 1
    with pytest.raises(RefineryError) as missing:
        lifecycle.show(shop.engine, "pro_buyers")
    assert missing.value.http_status == 404
    # the name can be taken again; its versions continue and its history stays
    again = _create(shop, "pro_buyers", "plan = 'pro'")
    assert again["version"] == 2
    assert len(lifecycle.read_history(shop.engine, "pro_buyers")["runs"]) == 3  # create, delete, create


def test_preview_counts_samples_and_shows_the_sql_without_saving(shop: Runtime) -> None:
    result = lifecycle.run_preview(shop.engine, shop.writer, ACTOR, "sum(total) of 'Order Completed' > 100", sample=5)
    assert result["count"] == 1 and result["sample"] == [_profile(shop, "alice")]
    assert "SELECT" in result["sql"] and result["conditions"][0]["kind"] == "event"
    hostile = lifecycle.run_preview(shop.engine, shop.writer, ACTOR, "plan = 'x''; DROP TABLE events; --'")
    assert hostile["count"] == 0
    assert shop.engine.fetch_all("SELECT count(*) FROM events", cursor=shop.engine.reader())[0][0] == 5
    assert shop.engine.fetch_all("SELECT count(*) FROM segments", cursor=shop.engine.reader())[0][0] == 0
    with pytest.raises(store.SegmentLifecycleError, match="sample"):
        lifecycle.run_preview(shop.engine, shop.writer, ACTOR, "plan = 'pro'", sample=10_000)


def test_explain_says_which_conditions_held_with_their_values(shop: Runtime) -> None:
    _create(shop, "valuable", "performed 'Order Completed' at least 2 times and plan = 'pro'")
    alice, bob = _profile(shop, "alice"), _profile(shop, "bob")
    yes = lifecycle.explain_profile(shop.engine, shop.writer, ACTOR, "valuable", alice)
    assert yes["member"] and yes["recorded_member"]
    assert [(c["kind"], c["held"]) for c in yes["conditions"]] == [("event", True), ("trait", True)]
    no = lifecycle.explain_profile(shop.engine, shop.writer, ACTOR, "valuable", bob)
    assert not no["member"] and [c["held"] for c in no["conditions"]] == [False, False]
    assert {c["value"] for c in no["conditions"]} >= {"free"}
    with pytest.raises(RefineryError) as unknown:
        lifecycle.explain_profile(shop.engine, shop.writer, ACTOR, "valuable", "prof_nobody")
    assert unknown.value.http_status == 404


def test_computed_traits_are_materialised_and_replaced(shop: Runtime) -> None:
    alice, bob = _profile(shop, "alice"), _profile(shop, "bob")
    lifecycle.define_trait(shop.writer, ACTOR, "lifetime_value", "sum(total) of 'Order Completed'")
    done = lifecycle.compute_trait(shop.engine, shop.writer, ACTOR, "lifetime_value")
    values = dict(shop.engine.fetch_all("SELECT profile_id, CAST(value AS DOUBLE) FROM computed_trait_values WHERE name = 'lifetime_value'",
                                        cursor=shop.engine.reader()))
    assert values == {alice: 200.0, bob: 30.0} and done["profiles"] == 2
    _create(shop, "valuable", "lifetime_value > 100")
    assert _ids(lifecycle.read_members(shop.engine, shop.writer, ACTOR, "valuable")) == [alice]
    with pytest.raises(RefineryError, match="valuable"):
        lifecycle.delete_trait(shop.writer, ACTOR, "lifetime_value")
    lifecycle.define_trait(shop.writer, ACTOR, "lifetime_value", "max(total) of 'Order Completed'")
    lifecycle.compute_trait(shop.engine, shop.writer, ACTOR, "lifetime_value")
    values = dict(shop.engine.fetch_all("SELECT profile_id, CAST(value AS DOUBLE) FROM computed_trait_values WHERE name = 'lifetime_value'",
                                        cursor=shop.engine.reader()))
    assert values == {alice: 120.0, bob: 30.0}


def test_as_of_evaluation_reads_traits_as_they_were_then(shop: Runtime) -> None:
    """A trait condition evaluated as of a past moment sees the traits the identify calls received by
    then gave (under the store's trait policy), not today's: the audience of that moment, reproduced."""
    rt = shop
    alice, bob = _profile(rt, "alice"), _profile(rt, "bob")
    _create(rt, "pro", "plan = 'pro'")
    _create(rt, "pro_persons", "plan = 'pro' counted by persons above 0.9")
    time.sleep(0.01)
    before = datetime.now(UTC)
    time.sleep(0.01)
    write_events(rt, event("identify", userId="bob", traits={"plan": "pro"}),
                 event("identify", userId="alice", traits={"plan": None}))  # an explicit null clears the trait
    _resolve(rt)
    members.run_segments(rt.engine, rt.writer, ACTOR)
    for name in ("pro", "pro_persons"):
        now = lifecycle.read_members(rt.engine, rt.writer, ACTOR, name)
        then = lifecycle.read_members(rt.engine, rt.writer, ACTOR, name, as_of=before.isoformat(), source="evaluated",
                                      settings=rt.settings)
        recorded = lifecycle.read_members(rt.engine, rt.writer, ACTOR, name, as_of=before.isoformat())
        assert _ids(now) == [bob], name
        assert _ids(then) == _ids(recorded) == [alice], name
        # without the settings (their trait policy) the evaluation can only read today's traits: the difference is real
        today = lifecycle.read_members(rt.engine, rt.writer, ACTOR, name, as_of=before.isoformat(), source="evaluated")
        assert _ids(today) == [bob], name
    told = lifecycle.explain_profile(rt.engine, rt.writer, ACTOR, "pro", alice, as_of=before.isoformat(), settings=rt.settings)
    assert told["member"] is True
    assert lifecycle.explain_profile(rt.engine, rt.writer, ACTOR, "pro", alice)["member"] is False
    past = lifecycle.run_preview(rt.engine, rt.writer, ACTOR, "plan = 'free'", as_of=before.isoformat(), settings=rt.settings)
    assert past["sample"] == [bob]


def test_segment_runs_and_computed_traits_leave_lineage(shop: Runtime) -> None:
    """Every job that writes membership or trait values is an OpenLineage run: named runs (the API's
    and the CLI's path), the schedule when it recomputed something (not when it skipped all), deletes."""
    from refinery.governance.lineage import read_runs
    from refinery.segments import schedule

    rt = shop
    path = rt.settings.lineage_path
    lifecycle.create(rt.engine, rt.writer, ACTOR, "buyers", "performed 'Order Completed' at least 2 times", settings=rt.settings)
    lifecycle.define_trait(rt.writer, ACTOR, "spend", "sum(total) of 'Order Completed'")
    lifecycle.compute_trait(rt.engine, rt.writer, ACTOR, "spend", settings=rt.settings)
    runs = {r["job"]: r for r in read_runs(path)}
    seg = runs["segments.run"]
    assert seg["state"] == "COMPLETE" and seg["counts"]["segment_events"] == 1
    assert seg["details"]["segments"]["buyers"]["entered"] == 1
    assert {"segment_members", "segment_events", "segment_runs"} <= {o.split(".")[-1] for o in seg["outputs"]}, seg["outputs"]
    assert runs["segments.computed_traits"]["counts"]["computed_trait_values"] == 2

    schedule.run_once(rt.engine, rt.writer, rt.settings)  # the trait values are new inputs: the segment runs again
    before = len(read_runs(path))
    schedule.run_once(rt.engine, rt.writer, rt.settings)  # nothing changed: every segment skipped, no run recorded
    assert len(read_runs(path)) == before
    write_events(rt, _order("bob", 45))
    _resolve(rt)
    schedule.run_once(rt.engine, rt.writer, rt.settings)
    newest = read_runs(path)[: len(read_runs(path)) - before]
    jobs = sorted(r["job"] for r in newest)
    assert jobs == ["segments.computed_traits", "segments.run"], jobs
    scheduled = next(r for r in newest if r["job"] == "segments.run")
    assert scheduled["details"]["trigger"] == "scheduled" and scheduled["details"]["segments"]["buyers"]["entered"] == 1

    lifecycle.delete(rt.writer, ACTOR, "buyers", settings=rt.settings)
    last = read_runs(path)[0]
    assert last["job"] == "segments.run" and last["details"]["trigger"] == "delete" and last["counts"]["segment_events"] == 2
