from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx

from refinery.ingest.maintenance import prune_message_ids
from refinery.runtime import Runtime
from support import Server


def _track(server: Server, mid: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/track", json={"userId": "u", "event": "E", "messageId": mid}, headers=server.basic)


def test_prune_drops_only_ids_older_than_the_window(runtime: Runtime) -> None:
    old = datetime.now(UTC) - timedelta(days=8)
    recent = datetime.now(UTC) - timedelta(days=6)
    runtime.writer.call(
        lambda e: e.execute(
            "INSERT INTO message_ids VALUES ('web', 'old', 1, ?), ('web', 'recent', 2, ?)", [old, recent]
        )
    )
    dropped = runtime.writer.call(lambda e: prune_message_ids(e, 7))
    assert dropped == 1
    left = runtime.engine.fetch_all("SELECT message_id FROM message_ids ORDER BY 1", cursor=runtime.engine.reader())
    assert left == [("recent",)]


def test_a_retry_within_the_window_is_absorbed(server: Server) -> None:
    assert _track(server, "retry-1").status_code == 200
    assert _track(server, "retry-1").status_code == 200
    with server.api() as api:
        rows = api.post("/api/query", json={"sql": "SELECT count(*) FROM events WHERE message_id = 'retry-1'"}).json()["rows"]
    assert rows == [[1]]
