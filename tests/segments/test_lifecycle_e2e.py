"""Segments through a real `refinery serve`: events in through the collector, profiles resolved,
a marketer defines a segment over the API, an analyst reads its members and an explanation
(audited), the CLI lists it through the server, and a person's erasure takes their memberships,
outbox rows and computed trait values with it (the `segments` personal store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import httpx

from support import Server


def _track(user: str, name: str, **props: Any) -> dict[str, Any]:
    return {"type": "track", "userId": user, "event": name, "properties": props, "messageId": uuid.uuid4().hex}


def _token(api: httpx.Client, name: str, role: str) -> dict[str, str]:
    r = api.post("/api/tokens", json={"name": name, "role": role, "expires": "1d"})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def test_segments_over_the_api_the_cli_and_an_erasure(server: Server) -> None:
    batch = [_track("alice", "Order Completed", total=120), _track("alice", "Order Completed", total=80),
             _track("bob", "Order Completed", total=30),
             {"type": "identify", "userId": "alice", "traits": {"email": "alice@example.com"}, "messageId": uuid.uuid4().hex}]
    r = httpx.post(server.url + "/v1/batch", json={"batch": batch}, headers=server.basic)
    assert r.status_code == 200, r.text
    with server.api() as api:
        assert api.post("/api/identity/resolve").status_code == 200
        marketer, analyst = _token(api, "mia", "marketer"), _token(api, "ann", "analyst")

        bad = httpx.post(server.url + "/api/segments", headers=marketer, json={"name": "buyers", "rule": "performed 'Order Complete'"})
        assert bad.status_code == 400 and "Order Completed" in bad.json()["message"] + bad.json().get("fix", "")
        made = httpx.post(server.url + "/api/segments", headers=marketer, timeout=60,
                          json={"name": "buyers", "rule": "performed 'Order Completed' at least 2 times and email is set"})
        assert made.status_code == 201, made.text
        assert made.json()["run"]["runs"][0]["entered"] == 1
        assert httpx.post(server.url + "/api/segments", headers=analyst, json={"name": "x", "rule": "plan = 'pro'"}).status_code == 403

        members = httpx.get(server.url + "/api/segments/buyers/members", headers=analyst).json()
        assert members["count"] == 1
        alice = members["members"][0]["profile_id"]
        why = httpx.get(server.url + "/api/segments/buyers/explain", headers=analyst, params={"profile": "user_id:alice"}).json()
        assert why["profile_id"] == alice and why["member"] and [c["held"] for c in why["conditions"]] == [True, True]
        audit = api.get("/api/audit", params={"action": "segments"}).json()
        actions = [(e["action"], e["actor_name"]) for e in audit["entries"]]
        assert ("segments.create", "mia") in actions and ("segments.members", "ann") in actions and ("segments.explain", "ann") in actions

        # the CLI goes through the running server
        env = {**os.environ, "REFINERY_DATA_DIR": str(server.data_dir), "REFINERY_ADMIN_TOKEN": server.admin_token}
        out = subprocess.run([sys.executable, "-m", "refinery", "segments", "list", "--json"], env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert [(s["name"], s["members"]) for s in json.loads(out.stdout)] == [("buyers", 1)]

        # the person's export holds their stay and outbox row; the erasure removes them
        assert api.post("/api/computed-traits", json={"name": "lifetime_value", "expression": "sum(total) of 'Order Completed'"}).status_code == 201
        assert api.post("/api/computed-traits/lifetime_value/compute").json()["profiles"] == 2
        export = api.post("/api/privacy/requests", json={"kind": "export", "identifier": "user_id:alice"}, timeout=120)
        assert export.status_code == 201, export.text
        section = export.json()["document"]["stores"]["segments"]
        assert [r["profile_id"] for r in section["segment_members"]] == [alice]
        assert [r["kind"] for r in section["segment_events"]] == ["segment_entered"]
        assert [r["name"] for r in section["computed_trait_values"]] == ["lifetime_value"]
        erased = api.post("/api/privacy/requests", json={"kind": "erase", "identifier": "user_id:alice"}, timeout=120)
        assert erased.status_code == 201, erased.text
        assert erased.json()["receipt"]["stores"]["segments"] == 3
        assert api.get("/api/segments/buyers/members").json()["count"] == 0
