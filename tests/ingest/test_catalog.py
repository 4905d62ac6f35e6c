"""The catalog over events collected by a real server: names, counts, first/last seen, property and
trait types per source, through `GET /api/catalog` and `refinery catalog --json`."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from typing import Any

import httpx

from refinery.ingest import catalog
from refinery.runtime import Runtime
from support import Server


def _send(server: Server, batch: list[dict[str, Any]], headers: dict[str, str]) -> None:
    r = httpx.post(server.url + "/v1/batch", json={"batch": batch}, headers=headers)
    assert r.status_code == 200 and r.json()["failed"] == 0, r.text


def _entry(cat: dict[str, Any], source: str, event: str) -> dict[str, Any]:
    [entry] = [e for e in cat["events"] if e["source"] == source and e["event"] == event]
    return entry


def test_catalog_types_counts_and_times(server: Server) -> None:
    with server.api() as api:
        assert api.post("/api/sources", json={"name": "ios", "write_key": "ios-key"}).status_code == 201
    ios = {"Authorization": "Basic " + base64.b64encode(b"ios-key:").decode()}
    props = [
        {"s": "a", "i": 1, "n": 1.5, "b": True, "o": {"x": 1}, "a": [1], "mixed": 1, "a.b": "dot", "$": "dollar"},
        {"s": "b", "i": 2, "n": 2.0, "b": False, "o": {}, "a": [], "mixed": "one", "nul": None},
        {"s": "c", "i": -3, "n": 0.25, "b": True, "o": {"y": [1]}, "a": ["x"], "mixed": 2, "nul": None},
    ]
    times = ["2026-01-03T00:00:00Z", "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"]
    _send(server, [
        {"type": "track", "event": "Order Completed", "userId": "u1", "properties": p, "timestamp": t}
        for p, t in zip(props, times, strict=True)
    ], server.basic)
    _send(server, [{"type": "page", "name": "Home", "anonymousId": "a1", "properties": {"path": "/"}}], server.basic)
    _send(server, [
        {"type": "identify", "userId": "u1", "traits": {"plan": "pro", "age": 41}},
        {"type": "identify", "userId": "u2", "traits": {"plan": "free", "age": None}},
    ], server.basic)
    _send(server, [{"type": "track", "event": "Order Completed", "userId": "u2", "properties": {"s": 1}}], ios)

    with server.api() as api:
        cat = api.get("/api/catalog").json()
        only_ios = api.get("/api/catalog", params={"source": "ios"}).json()
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
    assert order["traits"] == {}

    assert _entry(cat, "web", "Home")["properties"]["path"]["type"] == "string"
    identify = _entry(cat, "web", "identify")
    assert identify["count"] == 2 and identify["properties"] == {}
    assert identify["traits"]["plan"] == {"types": {"string": 2}, "count": 2, "type": "string"}
    # A trait seen as null once and as an integer once is an integer.
    assert identify["traits"]["age"] == {"types": {"integer": 1, "null": 1}, "count": 2, "type": "integer"}

    ios_entry = _entry(cat, "ios", "Order Completed")
    assert ios_entry["count"] == 1
    assert ios_entry["properties"] == {"s": {"types": {"integer": 1}, "count": 1, "type": "integer"}}
    assert [(e["source"], e["event"]) for e in only_ios["events"]] == [("ios", "Order Completed")]

    # The CLI, run while the server holds the store, asks the server and prints the same document.
    env = {**os.environ, "REFINERY_DATA_DIR": str(server.data_dir), "REFINERY_ADMIN_TOKEN": server.admin_token}
    out = subprocess.run([sys.executable, "-m", "refinery", "catalog", "--json"], env=env, capture_output=True, check=True)
    assert json.loads(out.stdout) == cat


def test_an_empty_store_has_an_empty_catalog(runtime: Runtime) -> None:
    assert catalog.build(runtime.engine) == {"events": []}
