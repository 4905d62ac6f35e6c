from __future__ import annotations

from support import Server


def test_server_accepts_a_track_call_and_stores_it(server: Server) -> None:
    import httpx

    r = httpx.post(server.url + "/v1/track", json={"userId": "u1", "event": "Signed Up", "messageId": "m-1"}, headers=server.basic)
    assert r.status_code == 200, r.text
    with server.api() as api:
        rows = api.post("/api/query", json={"sql": "SELECT message_id, event, user_id FROM events"}).json()["rows"]
    assert rows == [["m-1", "Signed Up", "u1"]]
