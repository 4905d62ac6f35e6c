"""`refinery serve` recomputes segments on its own every segments_interval_minutes, as the system
principal, and skips segments whose inputs did not change."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from support import WRITE_KEY, start_server


def test_the_server_recomputes_segments_on_a_schedule(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    server = start_server(data_dir, env={"REFINERY_SEGMENTS_INTERVAL_MINUTES": "0.02"})  # every 1.2 s
    try:
        with server.api() as api:
            assert api.post("/api/sources", json={"name": "web", "write_key": WRITE_KEY}).status_code == 201
            batch = [{"type": "track", "userId": u, "event": "Order Completed", "properties": {"total": 5}, "messageId": uuid.uuid4().hex}
                     for u in ("alice", "bob")]
            assert httpx.post(server.url + "/v1/batch", json={"batch": batch}, headers=server.basic).status_code == 200
            assert api.post("/api/identity/resolve").status_code == 200
            made = api.post("/api/segments", json={"name": "buyers", "rule": "performed 'Order Completed'", "run": False})
            assert made.status_code == 201 and "run" not in made.json()
            deadline = time.monotonic() + 30
            runs: list[dict[str, object]] = []
            while time.monotonic() < deadline and not runs:
                runs = api.get("/api/segments/buyers/history").json()["runs"]
                time.sleep(0.3)
            assert runs and runs[0]["trigger"] == "scheduled" and runs[0]["actor"] == "system:segments" and runs[0]["entered"] == 2
            time.sleep(3)  # more intervals pass: nothing changed, so nothing more is recorded
            assert len(api.get("/api/segments/buyers/history").json()["runs"]) == 1
            assert api.get("/api/segments/buyers/members").json()["count"] == 2

            # A computed trait defined without computing it is materialised by the job, then kept
            # until something changes: a new order makes the job compute it again.
            trait = api.post("/api/computed-traits", json={"name": "spent", "expression": "sum(total) of 'Order Completed'"})
            assert trait.status_code == 201, trait.text
            first = _trait(api, "spent", lambda t: t["profiles"] == 2)
            more = [{"type": "track", "userId": "carol", "event": "Order Completed", "properties": {"total": 7},
                     "messageId": uuid.uuid4().hex}]
            assert httpx.post(server.url + "/v1/batch", json={"batch": more}, headers=server.basic).status_code == 200
            assert api.post("/api/identity/resolve").status_code == 200
            again = _trait(api, "spent", lambda t: t["profiles"] == 3)
            assert again["computed_at"] > first["computed_at"]
    finally:
        server.stop()


def _trait(api: httpx.Client, name: str, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        [trait] = [t for t in api.get("/api/computed-traits").json()["computed_traits"] if t["name"] == name]
        if trait["computed_at"] is not None and ready(trait):
            return trait
        time.sleep(0.3)
    raise AssertionError(f"the scheduled job did not compute {name}: {trait}")
