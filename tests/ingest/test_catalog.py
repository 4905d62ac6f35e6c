"""The catalog over real collected events: names, counts, first/last seen, property types per source."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from conftest import WRITE_KEY
from refinery.api.app import create_app
from refinery.ingest import catalog
from refinery.runtime import Runtime


def _basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


@pytest.fixture
def app(runtime: Runtime) -> Iterator[TestClient]:
    runtime.writer.call(lambda e: runtime.sources.create(e, "ios", write_key="ios-key"))
    with TestClient(create_app(runtime)) as client:
        yield client


def _send(app: TestClient, batch: list[dict[str, Any]], key: str = WRITE_KEY) -> None:
    r = app.post("/v1/batch", json={"batch": batch}, headers=_basic(key))
    assert r.status_code == 200 and r.json()["failed"] == 0, r.text


def _entry(cat: dict[str, Any], source: str, event: str) -> dict[str, Any]:
    [entry] = [e for e in cat["events"] if e["source"] == source and e["event"] == event]
    return entry


def test_catalog_types_counts_and_times(runtime: Runtime, app: TestClient) -> None:
    props = [
        {"s": "a", "i": 1, "n": 1.5, "b": True, "o": {"x": 1}, "a": [1], "mixed": 1, "a.b": "dot", "$": "dollar"},
        {"s": "b", "i": 2, "n": 2.0, "b": False, "o": {}, "a": [], "mixed": "one", "nul": None},
        {"s": "c", "i": -3, "n": 0.25, "b": True, "o": {"y": [1]}, "a": ["x"], "mixed": 2, "nul": None},
    ]
    times = ["2026-01-03T00:00:00Z", "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"]
    _send(app, [
        {"type": "track", "event": "Order Completed", "userId": "u1", "properties": p, "timestamp": t}
        for p, t in zip(props, times, strict=True)
    ])
    _send(app, [{"type": "page", "name": "Home", "anonymousId": "a1", "properties": {"path": "/"}}])
    _send(app, [{"type": "track", "event": "Order Completed", "userId": "u2", "properties": {"s": 1}}], key="ios-key")

    cat = app.get("/api/catalog", headers={"Authorization": "Bearer test-admin-token"}).json()
    assert cat == catalog.build(runtime.engine)
    order = _entry(cat, "web", "Order Completed")
    assert order["type"] == "track" and order["count"] == 3
    assert order["first_seen"].startswith("2026-01-01") and order["last_seen"].startswith("2026-01-03")
    p = order["properties"]
    assert {k: v["type"] for k, v in p.items()} == {
        "s": "string", "i": "integer", "n": "number", "b": "boolean", "o": "object", "a": "array",
        "mixed": "integer", "a.b": "string", "$": "string", "nul": "null",
    }
    assert p["mixed"]["types"] == {"integer": 2, "string": 1} and p["mixed"]["count"] == 3
    assert p["a.b"]["count"] == 1 and p["nul"]["count"] == 2
    # A 2.0 sent as JSON is a number, not an integer: the type follows the JSON, every value counted.
    assert p["n"]["types"] == {"number": 3}

    assert _entry(cat, "web", "Home")["properties"]["path"]["type"] == "string"
    ios = _entry(cat, "ios", "Order Completed")
    assert ios["count"] == 1 and ios["properties"] == {"s": {"types": {"integer": 1}, "count": 1, "type": "integer"}}

    only_ios = app.get("/api/catalog", params={"source": "ios"}, headers={"Authorization": "Bearer test-admin-token"}).json()
    assert [(e["source"], e["event"]) for e in only_ios["events"]] == [("ios", "Order Completed")]


def test_an_empty_store_has_an_empty_catalog(runtime: Runtime) -> None:
    assert catalog.build(runtime.engine) == {"events": []}
