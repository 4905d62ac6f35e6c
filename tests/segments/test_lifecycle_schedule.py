"""`refinery serve` recomputes segments on its own every segments_interval_minutes, as the system
principal, and skips segments whose inputs did not change."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

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
    finally:
        server.stop()
