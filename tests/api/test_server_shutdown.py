"""`refinery serve` stopped with SIGTERM shuts down cleanly: exit 0, state file removed, data kept."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from support import Server, start_server


def test_sigterm_shuts_down_cleanly_and_keeps_data(server: Server) -> None:
    r = httpx.post(server.url + "/v1/track", json={"userId": "u", "event": "E", "messageId": "m-term"}, headers=server.basic)
    assert r.status_code == 200
    state = server.data_dir / "server.json"
    assert json.loads(state.read_text())["url"] == server.url
    server.proc.terminate()
    assert server.proc.wait(20) == 0
    assert not state.exists()
    again = start_server(Path(server.data_dir))
    try:
        with again.api() as api:
            rows = api.post("/api/query", json={"sql": "SELECT message_id FROM events"}).json()["rows"]
        assert rows == [["m-term"]]
    finally:
        again.stop()
