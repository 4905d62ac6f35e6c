"""Point-in-time training sets on a real store: planted future-dated and late-arriving events never
reach an earlier row, merged profiles answer by their survivor, and each bad request is refused with
the field and the fix."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from refinery.features import registry
from refinery.features.errors import FeatureError, TrainingSetError
from refinery.features.offline import FeatureRequest, training_set
from refinery.governance.principal import local_principal
from refinery.identity import IdentityRules
from refinery.profiles.build import resolve_and_build
from refinery.profiles.policy import TraitPolicy
from refinery.runtime import Runtime
from refinery.segments.errors import SegmentError
from support import fresh_runtime, write_events


def track(user: str, event: str, at: datetime, **props: Any) -> dict[str, Any]:
    return {"type": "track", "userId": user, "event": event, "properties": props, "messageId": uuid.uuid4().hex,
            "timestamp": at.isoformat()}


def build(rt: Runtime) -> None:
    rt.writer.call(lambda e: resolve_and_build(e, IdentityRules(), TraitPolicy()))


def profile_of(rt: Runtime, user: str) -> str:
    rows = rt.engine.fetch_all("SELECT profile_id FROM identities WHERE identifier_type = 'user_id' AND value = ?", [user],
                               cursor=rt.engine.fresh_reader())
    return str(rows[0][0])


class World:
    """u1 bought for 10 (10 days ago) and 20 (5 days ago) before the moment `cut`; after `cut` the store
    received a late purchase of 100 dated 3 days before `cut`, and before `cut` it received a
    purchase of 1000 dated a day after `cut` (a client clock ahead). u2 viewed shoes, hats, shoes."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        base = datetime.now(UTC) - timedelta(days=2)
        self.base = base
        write_events(rt, track("u1", "Order Completed", base - timedelta(days=10), total=10, category="shoes"),
                     track("u1", "Order Completed", base - timedelta(days=5), total=20, category="hats"),
                     track("u2", "Product Viewed", base - timedelta(days=4), category="shoes"),
                     track("u2", "Product Viewed", base - timedelta(days=3), category="hats"),
                     track("u2", "Product Viewed", base - timedelta(days=2), category="shoes"))
        time.sleep(0.002)
        self.cut = datetime.now(UTC)  # the moment rows are asked about; received_at of the above <= cut
        # ... but these were dated relative to `base`, two days before now: make `cut` a past moment that
        # sees the first batch. Every row below asks about `base` (timestamps) or `cut`.
        time.sleep(0.002)
        write_events(rt, track("u1", "Order Completed", self.cut - timedelta(days=3), total=100, category="socks"))  # late
        build(rt)
        self.u1, self.u2 = profile_of(rt, "u1"), profile_of(rt, "u2")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    path: Path = tmp_path_factory.mktemp("features")
    with fresh_runtime(path) as rt:
        w = World(rt)
        actor = local_principal()
        rt.writer.call(lambda e: registry.define(e, actor, "spend", "sum(total) of 'Order Completed'"))
        rt.writer.call(lambda e: registry.define(e, actor, "orders_7d", "count of 'Order Completed'", window="7 days"))
        rt.writer.call(lambda e: registry.define(e, actor, "top_category", "most frequent category of 'Product Viewed'"))
        rt.writer.call(lambda e: registry.define(
            e, actor, "distinct_days", kind="sql",
            definition="SELECT ep.profile_id AS profile_id, count(DISTINCT CAST(e.timestamp AS DATE)) AS value "
                       "FROM events e JOIN event_profiles ep ON ep.source = e.source AND ep.message_id = e.message_id "
                       "WHERE e.timestamp > $as_of - INTERVAL 7 DAY GROUP BY ep.profile_id"))
        yield w


def values(ts: Any, column: str) -> list[Any]:
    return ts.table.column(column).to_pylist()


def test_late_arriving_event_never_reaches_an_earlier_row(world: World) -> None:
    rows = [{"profile_id": world.u1, "timestamp": world.cut, "label": 0},
            {"profile_id": world.u1, "timestamp": datetime.now(UTC), "label": 1}]
    ts = training_set(world.rt.engine, rows, ["spend", "orders_7d", "distinct_days"])
    # at `cut` the late purchase (dated before `cut`, received after) is not known: 10 + 20
    assert values(ts, "spend") == [30.0, 130.0]
    # 7 days before `cut`: the purchase 5 days before `base` (= 7 days before cut, minus the two days
    # and the sleeps) is out of the window at cut; now the late one (3 days before cut) is in
    assert values(ts, "orders_7d")[1] == 1
    assert values(ts, "distinct_days")[1] == 1
    assert values(ts, "label") == [0, 1]
    assert ts.report["duplicates_dropped"] == 0


def test_future_dated_event_never_reaches_an_earlier_row(world: World) -> None:
    rt = world.rt
    at = datetime.now(UTC)
    write_events(rt, track("u2", "Product Viewed", at + timedelta(hours=6), category="hats"),
                 track("u2", "Product Viewed", at + timedelta(hours=7), category="hats"))
    build(rt)
    rows = [{"profile_id": world.u2, "timestamp": at + timedelta(milliseconds=50)}]
    time.sleep(0.06)
    ts = training_set(rt.engine, rows, ["top_category"], mode="retrieval", label=None)
    # received before the row's time, but dated six hours after it: not happened yet
    assert values(ts, "top_category") == ["shoes"]


def test_row_before_every_event_has_empty_values(world: World) -> None:
    rows = [{"profile_id": world.u1, "timestamp": world.base - timedelta(days=30), "label": "a"},
            {"profile_id": world.u2, "timestamp": world.base - timedelta(days=30), "label": "b"}]
    ts = training_set(world.rt.engine, rows, ["spend", "top_category", "distinct_days"])
    assert values(ts, "spend") == [0, 0]
    assert values(ts, "top_category") == [None, None]
    assert values(ts, "distinct_days") == [None, None]


def test_future_timestamps_are_refused(world: World) -> None:
    rows = [{"profile_id": world.u1, "timestamp": world.cut, "label": 0},
            {"profile_id": world.u1, "timestamp": datetime.now(UTC) + timedelta(days=1), "label": 1}]
    with pytest.raises(TrainingSetError) as e:
        training_set(world.rt.engine, rows, ["spend"])
    assert e.value.field == "timestamp" and "1 row(s)" in e.value.message and "rows 1" in e.value.message
    assert e.value.fix and "up to now" in e.value.fix


def test_unknown_profiles_are_reported_not_dropped(world: World) -> None:
    rows = [{"profile_id": world.u1, "timestamp": world.cut, "label": 0},
            {"profile_id": "p_nobody", "timestamp": world.cut, "label": 1},
            {"profile_id": "p_ghost", "timestamp": world.cut, "label": 1}]
    with pytest.raises(TrainingSetError) as e:
        training_set(world.rt.engine, rows, ["spend"])
    assert e.value.field == "profile_id" and "2 profile id(s)" in e.value.message
    assert e.value.details["profiles"] == ["p_ghost", "p_nobody"] and e.value.details["rows"] == [1, 2]
    ts = training_set(world.rt.engine, rows, ["spend"], unknown="drop", mode="retrieval")
    assert values(ts, "row") == [0] and ts.report["unknown_profiles_dropped"] == ["p_ghost", "p_nobody"]


def test_duplicates_dropped_with_a_count_and_conflicts_refused(world: World) -> None:
    row = {"profile_id": world.u1, "timestamp": world.cut, "label": 0}
    other = {"profile_id": world.u2, "timestamp": world.cut, "label": 1}
    ts = training_set(world.rt.engine, [row, other, dict(row), dict(row)], ["spend"])
    assert ts.report["duplicates_dropped"] == 2 and values(ts, "row") == [0, 1]
    with pytest.raises(TrainingSetError) as e:
        training_set(world.rt.engine, [row, other, {**row, "label": 1}], ["spend"])
    assert e.value.field == "label" and "disagree" in e.value.message and e.value.details["rows"] == [0, 2]


def test_label_with_one_class_is_refused_for_training_only(world: World) -> None:
    rows = [{"profile_id": world.u1, "timestamp": world.cut, "churned": True},
            {"profile_id": world.u2, "timestamp": world.cut, "churned": True}]
    with pytest.raises(TrainingSetError) as e:
        training_set(world.rt.engine, rows, ["spend"], label="churned")
    assert e.value.field == "label" and "one class" in e.value.message and "retrieval" in (e.value.fix or "")
    ts = training_set(world.rt.engine, rows, ["spend"], label="churned", mode="retrieval")
    assert values(ts, "churned") == [True, True]


def test_feature_that_does_not_compile_gives_the_caret(world: World) -> None:
    rows = [{"profile_id": world.u1, "timestamp": world.cut, "label": 0}, {"profile_id": world.u2, "timestamp": world.cut, "label": 1}]
    with pytest.raises(SegmentError) as e:
        training_set(world.rt.engine, rows, [FeatureRequest("bad", "sum(totl) of 'Order Completed'")])
    assert "did you mean 'total'" in e.value.message
    assert "^^^^" in e.value.caret
    with pytest.raises(SegmentError):
        world.rt.writer.call(lambda e: registry.define(e, local_principal(), "bad", "sum(totl) of 'Order Completed'"))
    with pytest.raises(FeatureError) as f:
        training_set(world.rt.engine, rows, ["spnd"])
    assert "Did you mean 'spend'" in f.value.message


def test_missing_columns_and_bad_times(world: World) -> None:
    with pytest.raises(TrainingSetError) as e:
        training_set(world.rt.engine, [{"profile_id": world.u1, "label": 1}], ["spend"])
    assert e.value.field == "timestamp"
    with pytest.raises(TrainingSetError) as e:
        training_set(world.rt.engine, [{"profile_id": world.u1, "timestamp": "yesterday", "label": 1}], ["spend"])
    assert e.value.field == "timestamp" and "unreadable" in e.value.message
    with pytest.raises(TrainingSetError) as e:
        training_set(world.rt.engine, pa.table({"profile_id": [world.u1], "timestamp": [world.cut]}), ["spend"])
    assert e.value.field == "label"
    with pytest.raises(TrainingSetError) as e:
        training_set(world.rt.engine, [], ["spend"])
    assert e.value.field == "rows"


def test_a_merged_profile_is_answered_by_its_survivor(tmp_path: Path) -> None:
    with fresh_runtime(tmp_path) as rt:
        at = datetime.now(UTC) - timedelta(hours=1)
        write_events(rt, {"type": "track", "anonymousId": "x9", "event": "Order Completed", "properties": {"total": 7},
                          "messageId": uuid.uuid4().hex, "timestamp": at.isoformat()})
        build(rt)
        write_events(rt, track("u9", "Order Completed", at, total=3))
        build(rt)
        ids = [str(r[0]) for r in rt.engine.fetch_all("SELECT profile_id FROM profiles ORDER BY profile_id", cursor=rt.engine.fresh_reader())]
        assert len(ids) == 2
        write_events(rt, {"type": "identify", "userId": "u9", "anonymousId": "x9", "messageId": uuid.uuid4().hex,
                          "timestamp": at.isoformat()})
        build(rt)
        live = [str(r[0]) for r in rt.engine.fetch_all("SELECT profile_id FROM profiles", cursor=rt.engine.fresh_reader())]
        assert len(live) == 1 and live[0] in ids
        rows = [{"profile_id": p, "timestamp": datetime.now(UTC)} for p in ids]
        ts = training_set(rt.engine, rows, [FeatureRequest("spend", "sum(total) of 'Order Completed'")], label=None, mode="retrieval")
        assert values(ts, "profile_id") == ids and values(ts, "profile_id_now") == [live[0], live[0]]
        assert values(ts, "spend") == [10.0, 10.0] and ts.report["profiles_merged"] == 1


@pytest.mark.parametrize(("sql", "says"), [
    ("DELETE FROM events", "read-only"),
    ("SELECT profile_id, traits AS value FROM profiles", "cannot read 'profiles'"),
    ("SELECT ep.profile_id, count(*) AS value FROM event_profiles ep WHERE ep.timestamp > now() - INTERVAL 1 DAY GROUP BY 1", "now()"),
    ("SELECT ep.profile_id, count(*) AS n FROM event_profiles ep GROUP BY 1", "returns the columns profile_id and value"),
    ("SELECT ep.profile_id, count(*) AS value FROM event_profiles ep WHERE ep.timestamp > $since GROUP BY 1", "Unknown parameter"),
    ("SELECT ep.profile_id, count(nope) AS value FROM event_profiles ep GROUP BY 1", "does not run"),
    ("SELECT 1; SELECT 2", "exactly one statement"),
])
def test_sql_features_are_checked_before_they_are_saved(world: World, sql: str, says: str) -> None:
    with pytest.raises(FeatureError) as e:
        world.rt.writer.call(lambda eng: registry.define(eng, local_principal(), "sqlf", sql, kind="sql"))
    assert says in e.value.message and e.value.field == "sql", e.value.message
    assert e.value.fix


def test_sql_feature_with_several_rows_per_profile_is_refused(world: World) -> None:
    many = FeatureRequest("per_event", "SELECT ep.profile_id AS profile_id, 1 AS value FROM event_profiles ep", kind="sql")
    rows = [{"profile_id": world.u1, "timestamp": world.cut}]
    with pytest.raises(FeatureError) as e:
        training_set(world.rt.engine, rows, [many], label=None, mode="retrieval")
    assert "several rows for one profile" in e.value.message and "GROUP BY" in (e.value.fix or "")


def test_versions_are_kept_and_can_be_asked_for(world: World) -> None:
    actor = local_principal()
    rt = world.rt
    first = rt.writer.call(lambda e: registry.define(e, actor, "spend_v", "sum(total) of 'Order Completed'"))
    same = rt.writer.call(lambda e: registry.define(e, actor, "spend_v", "sum(total) of 'Order Completed'"))
    second = rt.writer.call(lambda e: registry.define(e, actor, "spend_v", "max(total) of 'Order Completed'", ttl="2 hours"))
    assert (first["version"], same["version"], same["changed"], second["version"]) == (1, 1, False, 2)
    assert second["ttl_seconds"] == 7200
    rows = [{"profile_id": world.u1, "timestamp": world.cut}]
    ts = training_set(rt.engine, rows, ["spend_v@1", "spend_v"], label=None, mode="retrieval")
    assert values(ts, "spend_v@1") == [30.0] and values(ts, "spend_v") == [20.0]
    rt.writer.call(lambda e: registry.delete(e, actor, "spend_v"))
    assert values(training_set(rt.engine, rows, ["spend_v@2"], label=None, mode="retrieval"), "spend_v@2") == [20.0]
    with pytest.raises(FeatureError) as e:
        registry.resolve(rt.engine, "spend_v@7")
    assert "1, 2" in (e.value.fix or "")
    with pytest.raises(FeatureError) as e:
        rt.writer.call(lambda eng: registry.define(eng, actor, "w", "count of 'Order Completed' in last 3 days", window="7 days"))
    assert e.value.field == "window"
