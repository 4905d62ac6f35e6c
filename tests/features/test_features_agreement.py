"""The SQL training set and the plain-Python reference (features/reference.py) give the same values,
for generated features over generated event streams sent through the real pipeline.

Each example writes two batches. The second holds late arrivals (dated before the first batch's
moment `between`, received after it) and future-dated events; rows ask about every profile at
moments before, at and after `between`, so a leak of either into an earlier row shows as a
difference from the reference, which reads only events happened and received by each row's time.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from refinery.features import reference
from refinery.features.compile import compile_expression
from refinery.features.offline import FeatureRequest, training_set
from refinery.identity import IdentityRules
from refinery.privacy.pii import token_for
from refinery.profiles.build import resolve_and_build
from refinery.profiles.policy import TraitPolicy
from refinery.runtime import Runtime
from refinery.segments.catalog import Catalog, build_catalog
from refinery.segments.compile import CompileContext
from refinery.segments.errors import SegmentError
from support import fresh_runtime, write_events

EVENTS = {
    "Order Completed": {"total": "number", "category": "string"},
    "Product Viewed": {"category": "string", "price": "number"},
    "Login": {"method": "string"},
}
CATEGORIES = ["shoes", "hats", "socks"]
USERS = ["u0", "u1", "u2"]
#: Event times in days before the batch's base moment (negative: dated in the future).
OFFSETS = [-0.5, -0.1, 0.0, 0.3, 1.0, 2.0, 4.0, 6.5, 8.0, 12.0, 29.0, 31.0]
RESET = ("events", "raw_events", "message_ids", "failed_events", "identities", "identity_edges", "identity_blocked",
         "profile_merges", "identity_resolutions", "event_profiles", "profiles")

windows = st.sampled_from(["", " in last 7 days", " in last 36 hours", " between 30 days ago and 7 days ago",
                           " since 5 days ago", " before 2 days ago", " since 2020-01-01"])
wheres = st.sampled_from(["", " where total > 15", " where category = 'shoes'", " where timestamp > 3 days ago",
                          " where (category in ('hats', 'socks') or total >= 100)"])


@st.composite
def feature(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["count", "count_any", "agg", "distinct", "frequent", "time"]))
    window = draw(windows)
    if kind == "count":
        return f"count of 'Order Completed'{draw(wheres)}{window}"
    if kind == "count_any":
        return f"count of any event{window}"
    if kind == "agg":
        return f"{draw(st.sampled_from(['sum', 'avg', 'min', 'max']))}(total) of 'Order Completed'{draw(wheres)}{window}"
    if kind == "distinct":
        return f"count(distinct category) of {draw(st.sampled_from(['Order Completed', 'Product Viewed']))!r}{window}"
    if kind == "frequent":
        return f"most frequent category of 'Product Viewed'{window}"
    return f"{draw(st.sampled_from(['first', 'last']))} time of {draw(st.sampled_from(list(EVENTS)))!r}{window}"


@st.composite
def stream(draw: st.DrawFn) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(2, 12))):
        event = draw(st.sampled_from(list(EVENTS)))
        if event == "Order Completed":
            props: dict[str, Any] = {"total": draw(st.sampled_from([5, 10, 25, 120])), "category": draw(st.sampled_from(CATEGORIES))}
        elif event == "Product Viewed":
            props = {"category": draw(st.sampled_from(CATEGORIES)), "price": 10}
        else:
            props = {"method": "google"}
        out.append({"type": "track", "event": event, "properties": props, "userId": draw(st.sampled_from(USERS)),
                    "_days": draw(st.sampled_from(OFFSETS))})
    return out


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    path: Path = tmp_path_factory.mktemp("features_agreement")
    with fresh_runtime(path) as rt:
        yield rt


def reset(rt: Runtime) -> None:
    def clear(engine: Any) -> None:
        for t in RESET:
            engine.execute(f"DELETE FROM {t}")  # noqa: S608 - constant names
    rt.writer.call(clear)


def send(rt: Runtime, calls: list[dict[str, Any]], base: datetime) -> None:
    events = [{**{k: v for k, v in c.items() if k != "_days"}, "messageId": uuid.uuid4().hex,
               "timestamp": (base - timedelta(days=c["_days"])).isoformat()} for c in calls]
    outcomes = write_events(rt, *events)
    assert all(o.status == "loaded" for o in outcomes), outcomes


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    return bool(a == b)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(texts=st.lists(feature(), min_size=3, max_size=6, unique=True), first=stream(), second=stream(),
       late=st.sampled_from([0.5, 1.0, 3.0]))
def test_sql_and_reference_agree(runtime: Runtime, texts: list[str], first: list[dict[str, Any]], second: list[dict[str, Any]],
                                 late: float) -> None:
    engine = runtime.engine
    ctx = CompileContext(Catalog(EVENTS, {}, build_catalog(engine).personal_traits, frozenset()),
                         tokenise=lambda k, v: token_for(engine, k, v) or v)
    compiled = {}
    for i, text in enumerate(texts):
        try:
            compiled[f"f{i}"] = compile_expression(text, None, ctx)
        except SegmentError:  # e.g. a window that ends before it starts
            continue
    assume(compiled)
    reset(runtime)
    base = datetime.now(UTC) - timedelta(days=2)
    send(runtime, first, base)
    time.sleep(0.002)
    between = datetime.now(UTC)
    time.sleep(0.002)
    send(runtime, second, base - timedelta(days=late))  # dated before `between`: late arrivals (and some future-dated)
    runtime.writer.call(lambda e: resolve_and_build(e, IdentityRules(), TraitPolicy()))
    after = datetime.now(UTC)
    events = engine.fetch_dicts(
        "SELECT e.source, e.message_id, e.type, e.event, e.name, e.properties, e.traits, e.context, e.timestamp, "
        "e.received_at, ep.profile_id FROM events e JOIN event_profiles ep USING (source, message_id)", cursor=engine.fresh_reader())
    profiles = sorted({str(e["profile_id"]) for e in events})
    assume(profiles)
    moments = [base - timedelta(days=8), base - timedelta(hours=1), base, between, base + timedelta(days=1, hours=23), after]
    rows = [{"profile_id": p, "timestamp": m} for p in profiles for m in moments]
    result = training_set(engine, rows, [FeatureRequest(n, compiled[n].definition.text) for n in compiled],
                          label=None, mode="retrieval", context=ctx)
    table = result.table.to_pylist()
    assert [r["row"] for r in table] == list(range(len(rows)))
    for row, got in zip(rows, table, strict=True):
        for name, trait in compiled.items():
            want = reference.value(trait, events, row["profile_id"], row["timestamp"])
            assert same(got[name], want), (trait.definition.text, row, got[name], want)
