"""The online store on a real store (SQLite file, and a real Redis server): values materialised at a
moment equal the training set's values at that moment (no training-serving skew, windows included),
time-to-live reported as stale, incremental runs recompute only touched profiles and agree with a
full run, merged ids are answered by their survivor, erased profiles are gone and stay gone."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from refinery.features import registry
from refinery.features.materialize import materialize
from refinery.features.offline import training_set
from refinery.features.online import (
    OnlineStore,
    ProfileErased,
    ProfileNotServed,
    RedisStore,
    SqliteStore,
    jsonable,
)
from refinery.governance.principal import local_principal
from refinery.identity import IdentityRules
from refinery.profiles.build import resolve_and_build
from refinery.profiles.policy import TraitPolicy
from refinery.runtime import Runtime
from services import RedisServer
from support import fresh_runtime, write_events

FEATURES = ["spend", "orders_7d", "last_order", "top_category", "views_3d", "days_sql"]


def track(user: str, event: str, at: datetime, **props: Any) -> dict[str, Any]:
    return {"type": "track", "userId": user, "event": event, "properties": props, "messageId": uuid.uuid4().hex,
            "timestamp": at.isoformat()}


def build(rt: Runtime) -> None:
    rt.writer.call(lambda e: resolve_and_build(e, IdentityRules(), TraitPolicy()))


def profile_of(rt: Runtime, user: str) -> str:
    rows = rt.engine.fetch_all("SELECT profile_id FROM identities WHERE identifier_type = 'user_id' AND value = ?", [user],
                               cursor=rt.engine.fresh_reader())
    return str(rows[0][0])


def define_features(rt: Runtime, ttl: str | None = None) -> None:
    actor = local_principal()
    rt.writer.call(lambda e: registry.define(e, actor, "spend", "sum(total) of 'Order Completed'", ttl=ttl))
    rt.writer.call(lambda e: registry.define(e, actor, "orders_7d", "count of 'Order Completed'", window="7 days"))
    rt.writer.call(lambda e: registry.define(e, actor, "last_order", "last time of 'Order Completed'"))
    rt.writer.call(lambda e: registry.define(e, actor, "top_category", "most frequent category of 'Product Viewed'"))
    rt.writer.call(lambda e: registry.define(e, actor, "views_3d", "count of 'Product Viewed' where category = 'hats' in last 3 days"))
    rt.writer.call(lambda e: registry.define(
        e, actor, "days_sql", kind="sql",
        definition="SELECT ep.profile_id AS profile_id, count(DISTINCT CAST(e.timestamp AS DATE)) AS value "
                   "FROM events e JOIN event_profiles ep ON ep.source = e.source AND ep.message_id = e.message_id "
                   "WHERE e.timestamp > $as_of - INTERVAL 7 DAY GROUP BY ep.profile_id"))


def seed(rt: Runtime) -> None:
    now = datetime.now(UTC)
    write_events(rt, track("u1", "Order Completed", now - timedelta(days=10), total=10),
                 track("u1", "Order Completed", now - timedelta(days=5), total=20),
                 track("u1", "Order Completed", now - timedelta(hours=2), total=7.5),
                 track("u2", "Product Viewed", now - timedelta(days=4), category="shoes"),
                 track("u2", "Product Viewed", now - timedelta(days=2), category="hats"),
                 track("u2", "Product Viewed", now - timedelta(days=1), category="shoes"),
                 track("u2", "Product Viewed", now + timedelta(hours=3), category="hats"),  # a client clock ahead
                 track("u3", "Order Completed", now - timedelta(days=30), total=99))
    build(rt)


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    with fresh_runtime(tmp_path) as runtime:
        seed(runtime)
        define_features(runtime)
        yield runtime


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OnlineStore]:
    if request.param == "sqlite":
        s: OnlineStore = SqliteStore(tmp_path / "online.sqlite")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        s = RedisStore(f"redis://:{server.password}@127.0.0.1:{server.port}/0", prefix=f"t{uuid.uuid4().hex[:8]}:")
    try:
        yield s
    finally:
        s.close()


def offline_at(rt: Runtime, profile: str, at: datetime, features: list[str] = FEATURES) -> dict[str, Any]:
    ts = training_set(rt.engine, [{"profile_id": profile, "timestamp": at}], features, label=None, mode="retrieval", now=at)
    row = ts.table.to_pylist()[0]
    return {f: jsonable(row[f]) for f in features}


def online(store: OnlineStore, profile: str) -> dict[str, Any]:
    return {name: v.value for name, v in store.lookup(profile).values.items()}


def test_online_value_at_t_equals_offline_value_at_t(rt: Runtime, store: OnlineStore) -> None:
    at = datetime.now(UTC)
    result = materialize(rt.engine, store, now=at)
    assert result.mode == "full" and result.profiles == 3 and result.values == 3 * len(FEATURES)
    for user in ("u1", "u2", "u3"):
        pid = profile_of(rt, user)
        served = online(store, pid)
        assert served == offline_at(rt, pid, at), user
    u1, u2 = online(store, profile_of(rt, "u1")), online(store, profile_of(rt, "u2"))
    # windows and planted data really shape the values (the test would catch a second, different computation)
    assert u1["spend"] == 37.5 and u1["orders_7d"] == 2 and u1["last_order"] is not None
    assert u2["views_3d"] == 1 and u2["top_category"] == "shoes" and u2["spend"] == 0
    assert online(store, profile_of(rt, "u3"))["orders_7d"] == 0


def test_ttl_makes_old_values_stale_not_served(rt: Runtime, store: OnlineStore) -> None:
    rt.writer.call(lambda e: registry.define(e, local_principal(), "spend", "sum(total) of 'Order Completed'", ttl="1 hour"))
    at = datetime.now(UTC)
    materialize(rt.engine, store, now=at)
    pid = profile_of(rt, "u1")
    fresh = store.lookup(pid, now=at.timestamp() + 1800).values["spend"]
    assert fresh.status == "fresh" and fresh.value == 37.5 and fresh.ttl_seconds == 3600
    stale = store.lookup(pid, now=at.timestamp() + 3601)
    assert stale.values["spend"].status == "stale" and stale.values["spend"].value is None
    assert stale.values["orders_7d"].status == "fresh"  # no TTL: never stale


def test_incremental_run_recomputes_only_touched_profiles_and_agrees_with_full(rt: Runtime, store: OnlineStore) -> None:
    # time-independent features only (windows relative to now force full runs)
    for name in ("orders_7d", "views_3d", "days_sql"):
        rt.writer.call(lambda e, n=name: registry.delete(e, local_principal(), n))
    first = materialize(rt.engine, store)
    assert first.mode == "full"
    write_events(rt, track("u1", "Order Completed", datetime.now(UTC) - timedelta(minutes=5), total=100))
    unattributed = materialize(rt.engine, store)  # not attributed to a profile yet: counts for nobody, offline too
    assert unattributed.mode == "incremental" and unattributed.profiles == 0
    build(rt)
    second = materialize(rt.engine, store)
    assert second.mode == "incremental" and second.profiles == 1, second
    u1 = profile_of(rt, "u1")
    assert online(store, u1)["spend"] == 137.5
    # the same as the offline store now (the untouched profiles' values were left as they were)
    for user in ("u1", "u2", "u3"):
        pid = profile_of(rt, user)
        assert online(store, pid) == offline_at(rt, pid, datetime.now(UTC), ["spend", "last_order", "top_category"]), user
    # a window relative to now makes every run full, and says why
    rt.writer.call(lambda e: registry.define(e, local_principal(), "views_3d", "count of 'Product Viewed' in last 3 days"))
    third = materialize(rt.engine, store)
    assert third.mode == "full" and "versions changed" in third.reason
    fourth = materialize(rt.engine, store)
    assert fourth.mode == "full" and "views_3d" in fourth.reason


def test_merged_id_is_answered_by_its_survivor(tmp_path: Path) -> None:
    with fresh_runtime(tmp_path) as rt:
        now = datetime.now(UTC)
        write_events(rt, {"type": "track", "anonymousId": "anon-1", "event": "Order Completed", "properties": {"total": 5},
                          "messageId": uuid.uuid4().hex, "timestamp": (now - timedelta(days=1)).isoformat()},
                     track("known", "Order Completed", now - timedelta(hours=1), total=10))
        build(rt)
        before = {str(r[0]) for r in rt.engine.fetch_all("SELECT profile_id FROM profiles", cursor=rt.engine.fresh_reader())}
        assert len(before) == 2
        write_events(rt, {"type": "identify", "anonymousId": "anon-1", "userId": "known", "messageId": uuid.uuid4().hex,
                          "timestamp": now.isoformat()})
        build(rt)
        merged = rt.engine.fetch_all("SELECT merged_profile_id, surviving_profile_id FROM profile_merges", cursor=rt.engine.fresh_reader())
        assert len(merged) == 1
        gone, survivor = str(merged[0][0]), str(merged[0][1])
        rt.writer.call(lambda e: registry.define(e, local_principal(), "spend", "sum(total) of 'Order Completed'"))
        store = SqliteStore(tmp_path / "online.sqlite")
        materialize(rt.engine, store)
        got = store.lookup(gone)
        assert got.profile_id == gone and got.profile_id_now == survivor
        assert got.values["spend"].value == 15
        assert store.lookup(survivor).values["spend"].value == 15
        store.close()


def test_erased_profile_is_gone_and_a_materialisation_cannot_bring_it_back(rt: Runtime, store: OnlineStore) -> None:
    materialize(rt.engine, store)
    u1 = profile_of(rt, "u1")
    assert store.export([u1]) and {r["feature"] for r in store.export([u1])} == set(FEATURES)
    since = time.time() - 60  # a run that read the database before the erasure
    assert store.erase([u1]) == len(FEATURES)
    with pytest.raises(ProfileErased) as e:
        store.lookup(u1)
    assert e.value.http_status == 404 and "erased" in e.value.message
    store.put({u1: {"spend": (1, 1.0, time.time(), None)}}, replace=True, since=since)
    with pytest.raises(ProfileErased):
        store.lookup(u1)
    assert store.export([u1]) == []
    with pytest.raises(ProfileNotServed):
        store.lookup("p_does_not_exist")
