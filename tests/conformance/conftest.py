"""Engine conformance: the same cases on every engine, the same answers.

A generated world (people browsing anonymously, then identifying, so profiles merge; orders,
views and logins over forty days; traits) goes through the real pipeline into a DuckDB store,
which is resolved and then exported to a Parquet lake (`refinery.storage.lake.export_store`, what
`refinery lake export` runs). The `engine` fixture gives each test the DuckDB store's engine and a
Spark engine (local mode) over that lake in turn; the cases compare both with the plain-Python
references of each stage and with each other. One SparkSession serves the whole test session
(Spark takes seconds to start); the suite never skips Spark (the `[spark]` extra and Java are
installed wherever the tests run).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from refinery.identity import IdentityRules
from refinery.profiles.build import resolve_and_build
from refinery.profiles.policy import TraitPolicy
from refinery.runtime import Runtime
from refinery.storage.engine import Engine
from refinery.storage.lake import Lake, export_store
from refinery.storage.spark import SparkEngine, spark_session
from support import fresh_runtime, write_events

ENGINES = ("duckdb", "spark")
CATEGORIES = ("shoes", "hats", "socks", "coats")
PLANS = ("free", "pro", "team")


@dataclass
class World:
    rt: Runtime
    lake: Lake
    written_at: datetime                  # every event was received by then
    rows: list[dict[str, Any]]            # events with their profile, as the references read them
    traits: dict[str, Any]                # profile id -> traits (JSON text)
    profiles: list[str]


def generate(seed: int, people: int, now: datetime) -> list[dict[str, Any]]:
    """Tracking calls of `people` people: anonymous browsing, then (for most) an identify that
    links the anonymous id to a user id, orders with totals and categories, logins; some events
    slightly in the future (a clock ahead), properties sometimes missing or of another type."""
    rnd = random.Random(seed)
    calls: list[dict[str, Any]] = []

    def at(days: float) -> str:
        return (now - timedelta(days=days)).isoformat()

    for i in range(people):
        anon = f"anon-{seed}-{i}"
        user = f"user-{i}" if rnd.random() < 0.8 else None
        start = rnd.uniform(0.5, 40)
        for _ in range(rnd.randint(0, 4)):
            calls.append({"type": "track", "anonymousId": anon, "event": "Product Viewed", "timestamp": at(rnd.uniform(0, start)),
                          "properties": {"category": rnd.choice(CATEGORIES), "price": rnd.choice([5, 12.5, 30, 99])}})
        if rnd.random() < 0.3:
            calls.append({"type": "page", "anonymousId": anon, "name": "Pricing", "timestamp": at(rnd.uniform(0, start)),
                          "properties": {"url": rnd.choice(["https://shop.example/pricing", "https://shop.example/", "http://x.example/pricing"])}})
        if user is None:
            continue
        traits: dict[str, Any] = {"plan": rnd.choice(PLANS), "age": rnd.randint(16, 70)}
        if rnd.random() < 0.5:
            traits["vip"] = rnd.random() < 0.5
        calls.append({"type": "identify", "userId": user, "anonymousId": anon, "traits": traits, "timestamp": at(start)})
        for _ in range(rnd.randint(0, 5)):
            props: dict[str, Any] = {"total": rnd.choice([0, 8, 25, 49.5, 120, 300]), "category": rnd.choice(CATEGORIES)}
            if rnd.random() < 0.2:
                props["is_gift"] = True
            if rnd.random() < 0.1:
                props["total"] = "n/a"  # not a number: read as missing
            calls.append({"type": "track", "userId": user, "event": "Order Completed", "properties": props,
                          "timestamp": at(rnd.uniform(-0.2, start))})
        for _ in range(rnd.randint(0, 3)):
            calls.append({"type": "track", "userId": user, "event": "Login", "timestamp": at(rnd.uniform(0, start)),
                          "properties": {"method": rnd.choice(["google", "email", "sso"])}})
    for c in calls:
        c["messageId"] = uuid.UUID(int=rnd.getrandbits(128)).hex
    return calls


def build_world(root: Path, *, seed: int = 7, people: int = 60) -> Iterator[World]:
    with fresh_runtime(root) as rt:
        now = datetime.now(UTC)
        calls = generate(seed, people, now)
        outcomes = write_events(rt, *calls)
        assert all(o.status == "loaded" for o in outcomes), [o for o in outcomes if o.status != "loaded"][:3]
        rt.writer.call(lambda e: resolve_and_build(e, IdentityRules(), TraitPolicy()))
        written_at = datetime.now(UTC)
        lake = Lake.at(root / "lake")
        export_store(rt.engine, lake)
        rows = rt.engine.fetch_dicts(
            "SELECT e.source, e.message_id, e.type, e.event, e.name, e.properties, e.traits, e.context, e.timestamp, "
            "e.received_at, ep.profile_id FROM events e JOIN event_profiles ep USING (source, message_id) "
            "ORDER BY e.received_at, e.message_id", cursor=rt.engine.reader())
        traits = dict(rt.engine.fetch_all("SELECT profile_id, traits FROM profiles", cursor=rt.engine.reader()))
        yield World(rt, lake, written_at, rows, traits, sorted(traits))


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield from build_world(tmp_path_factory.mktemp("conformance"))


@pytest.fixture(scope="session")
def spark(world: World) -> Iterator[SparkEngine]:
    engine = SparkEngine(world.lake.root, session=spark_session("local[2]", shuffle_partitions=2))
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, world: World) -> Engine:
    if request.param == "spark":
        return request.getfixturevalue("spark")  # type: ignore[no-any-return]
    return world.rt.engine
