"""End to end: events from the official Segment SDK into a real server, resolution through the
admin API, profiles read over HTTP and with the CLI (which talks to the running server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import segment.analytics as analytics

from support import Server


def _cli(server: Server, *args: str) -> Any:
    env = {**os.environ, "REFINERY_DATA_DIR": str(server.data_dir), "REFINERY_ADMIN_TOKEN": server.admin_token}
    out = subprocess.run([sys.executable, "-m", "refinery", *args, "--json"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_sdk_events_become_a_profile_readable_over_http_and_cli(server: Server) -> None:
    client = analytics.Client(server.write_key, host=server.url, sync_mode=True)
    client.page(anonymous_id="visitor-1", name="Pricing")
    client.track(anonymous_id="visitor-1", event="Trial Started")
    client.identify(user_id="cust-42", anonymous_id="visitor-1", traits={"email": "Lee@Shop.io", "plan": "trial"})
    client.identify(user_id="cust-42", traits={"plan": "pro"})
    client.track(user_id="cust-42", event="Order Completed", properties={"total": 99})
    client.flush()

    with server.api() as api:
        r = api.post("/api/identity/resolve")
        assert r.status_code == 200, r.text
        assert r.json()["profiles"]["events_attributed"] == 5
        p = api.get("/api/profiles", params={"identifier": "email:lee@shop.io"}).json()
        assert p["traits"] == {"email": "lee@shop.io", "plan": "pro"}  # personal values in normal form
        assert p["identifiers"]["anonymous_id"] == ["visitor-1"] and p["event_count"] == 5
        events = api.get(f"/api/profiles/{p['profile_id']}/events", params={"limit": 2}).json()["events"]
        assert [e["event"] for e in events] == ["Order Completed", None]
        assert api.get("/api/profiles/prof_nope").status_code == 404
        missing = api.get("/api/profiles", params={"identifier": "user_id:nobody"})
        assert missing.status_code == 404 and "nobody" in missing.json()["message"]
        # Reads need the token like every admin route.
        assert api.get("/api/profiles", params={"identifier": "user_id:cust-42"}, headers={"Authorization": ""}).status_code == 401

    shown = _cli(server, "profiles", "show", "user_id:cust-42")
    assert shown == p
    explained = _cli(server, "profiles", "explain", "anonymous_id:visitor-1")
    assert explained["profile_id"] == p["profile_id"]
    assert {s["identifier"]["type"] for s in explained["chain"]} == {"user_id", "email"}
    # No links yet: every profile is its own person under the probabilistic policy.
    persons = _cli(server, "profiles", "persons", "--threshold", "0.9")
    assert persons["persons"] == persons["profiles"] >= 1 and persons["links_used"] == 0
