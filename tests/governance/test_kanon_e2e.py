"""k-anonymity through a running `refinery serve`: an analyst (no pii:read) gets aggregate answers
without the groups of fewer than min_group_size people; the admin (pii:read) gets them all."""

from __future__ import annotations

from typing import Any

import httpx

from support import Server


def _token(api: httpx.Client, name: str, role: str) -> dict[str, str]:
    r = api.post("/api/tokens", json={"name": name, "role": role, "expires": "1d"})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def _people(server: Server, name: str, people: int, each: int, **fields: Any) -> None:
    batch = [{"type": "track", "event": name, "userId": f"{name}-{i}", **fields} for i in range(people) for _ in range(each)]
    r = httpx.post(server.url + "/v1/batch", json={"batch": batch}, headers=server.basic, timeout=30)
    assert r.status_code == 200 and r.json()["failed"] == 0, r.text


_SQL = "SELECT event, count(*) AS events, count(DISTINCT _person) AS people FROM events GROUP BY event ORDER BY event"


def test_groups_of_9_people_are_suppressed_for_an_analyst_and_groups_of_10_are_shown(server: Server) -> None:
    _people(server, "Nine", 9, 3)  # 27 events from 9 people
    _people(server, "Ten", 10, 1)
    with server.api() as api:
        assert api.post("/api/identity/resolve").status_code == 200
        analyst = _token(api, "ana", "analyst")

    r = httpx.post(server.url + "/api/query", json={"sql": _SQL}, headers=analyst, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rows"] == [["Ten", 10, 10]]
    assert (body["suppressed_groups"], body["min_group_size"]) == (1, 10)

    # rows, not groups: refused, saying why
    r = httpx.post(server.url + "/api/query", json={"sql": "SELECT user_id FROM events"}, headers=analyst, timeout=60)
    assert r.status_code == 400 and "returns rows, not groups" in r.json()["message"] and r.json()["fix"]

    # pii:read (the admin; the only built-in role with query:read too): every group, and any read-only query
    with server.api() as api:
        r = api.post("/api/query", json={"sql": "SELECT event, count(*) FROM events GROUP BY 1 ORDER BY 1"})
    assert r.status_code == 200 and r.json()["rows"] == [["Nine", 27], ["Ten", 10]] and "suppressed_groups" not in r.json()

    # the catalog: the analyst's leaves out the event 9 people did
    r = httpx.get(server.url + "/api/catalog", headers=analyst, timeout=60)
    assert r.status_code == 200
    assert [e["event"] for e in r.json()["events"]] == ["Ten"] and r.json()["suppressed_groups"] == 1
    with server.api() as api:
        assert {e["event"] for e in api.get("/api/catalog").json()["events"]} == {"Nine", "Ten"}
        entries = api.get("/api/audit", params={"action": "query.run"}).json()["entries"]
    assert any((e["details"] or {}).get("suppressed_groups") == 1 and e["actor_name"] == "ana" for e in entries)
