"""Activation through a real `refinery serve`: SDK-shaped events in, a segment over the API, a
destination and a real-time sync created by a marketer (an analyst may only read), delivery by the
server's own worker to a plug-in destination loaded through an entry point, consent honoured, and
the server killed with SIGKILL mid-delivery: after a restart the cut-off batch is delivered again
with the same id and the destination ends up holding exactly the allowed members."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from activation_core_support import plugin_env
from ledger_destination import calls, faults, members

from support import WRITE_KEY, start_server


def _identify(user: str, **traits: Any) -> dict[str, Any]:
    return {"type": "identify", "userId": user, "traits": traits, "messageId": uuid.uuid4().hex}


def _token(api: httpx.Client, name: str, role: str) -> dict[str, str]:
    r = api.post("/api/tokens", json={"name": name, "role": role, "expires": "1d"})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def _until(check: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_activation_over_the_api_with_a_crash_mid_delivery(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    env = plugin_env(tmp_path)
    srv = start_server(data, env=env)
    ledger = tmp_path / "ledger"
    try:
        with srv.api() as api:
            assert api.post("/api/sources", json={"name": "web", "write_key": WRITE_KEY}).status_code == 201
            batch = [_identify("alice", email="Alice@Example.com", plan="pro"), _identify("bob", email="bob@example.com", plan="pro"),
                     _identify("carol", email="carol@example.com", plan="pro"), _identify("dan", email="dan@example.com", plan="free")]
            assert httpx.post(srv.url + "/v1/batch", json={"batch": batch}, headers=srv.basic).status_code == 200
            assert api.post("/api/identity/resolve", timeout=60).status_code == 200
            for who in ("alice", "carol", "dan"):
                assert api.post("/api/consent", json={"identifier": f"user_id:{who}", "purposes": {"marketing": "granted"}}).status_code == 201
            assert api.post("/api/segments", json={"name": "pros", "rule": "plan = 'pro'"}, timeout=60).status_code == 201
            pid = {who: api.get("/api/profiles", params={"identifier": f"user_id:{who}"}).json()["profile_id"] for who in ("alice", "bob", "carol")}

            marketer, analyst = _token(api, "mia", "marketer"), _token(api, "ann", "analyst")
            config = {"folder": str(ledger), "token": "ledger-secret"}
            denied = httpx.post(srv.url + "/api/destinations", headers=analyst, json={"name": "crm", "kind": "ledger", "purpose": "marketing",
                                                                                      "config": config})
            assert denied.status_code == 403
            made = httpx.post(srv.url + "/api/destinations", headers=marketer, json={"name": "crm", "kind": "ledger", "purpose": "marketing",
                                                                                     "config": config})
            assert made.status_code == 201, made.text
            assert made.json()["config"]["token"] == "***" and "ledger-secret" not in made.text
            listed = httpx.get(srv.url + "/api/destinations", headers=analyst)
            assert listed.status_code == 200 and "ledger-secret" not in listed.text

            typo = httpx.post(srv.url + "/api/syncs", headers=marketer, json={"name": "pros-crm", "segment": "pros", "destination": "crm",
                                                                              "mapping": {"id": "profile_id", "email": "emali"}})
            assert typo.status_code == 400 and typo.json()["error"] == "unknown_mapping_source" and "'email'" in typo.json()["message"]
            sync = httpx.post(srv.url + "/api/syncs", headers=marketer, json={
                "name": "pros-crm", "segment": "pros", "destination": "crm", "schedule": "realtime",
                "mapping": {"id": "profile_id", "email": "email", "plan": "plan"}})
            assert sync.status_code == 201, sync.text

            # The server's worker delivers the real-time sync's first plan: the members consent allows.
            _until(lambda: sorted(members(ledger)) == sorted([pid["alice"], pid["carol"]]))
            assert members(ledger)[pid["alice"]] == {"id": pid["alice"], "email": "alice@example.com", "plan": "pro"}
            runs = httpx.get(srv.url + "/api/syncs/runs", headers=analyst, params={"sync": "pros-crm"}).json()["runs"]
            _until(lambda: httpx.get(srv.url + "/api/syncs/runs", headers=analyst).json()["runs"][0]["status"] == "completed")
            runs = httpx.get(srv.url + "/api/syncs/runs", headers=analyst).json()["runs"]
            assert [(r["trigger"], r["added"], r["skipped_consent"]) for r in runs] == [("realtime", 2, 1)]

            # Bob grants consent: a manual run adds him (consent is no membership change, so real time does not see it).
            assert api.post("/api/consent", json={"identifier": "user_id:bob", "purposes": {"marketing": "granted"}}).status_code == 201
            ran = httpx.post(srv.url + "/api/syncs/pros-crm/run", headers=marketer, json={"wait_seconds": 20}, timeout=30).json()
            assert (ran["run"]["status"], ran["run"]["added"]) == ("completed", 1)
            assert sorted(members(ledger)) == sorted(pid.values())

            # Alice withdraws; the next delivery is slow, and the server is killed in the middle of it.
            faults(ledger, {"kind": "slow", "seconds": 30})
            assert api.post("/api/consent", json={"identifier": "user_id:alice", "purposes": {"marketing": "denied"}}).status_code == 201
            started = httpx.post(srv.url + "/api/syncs/pros-crm/run", headers=marketer, json={"wait_seconds": 0}).json()
            cut = started["plan"]["run_id"]
            _until(lambda: len(calls(ledger)) == 3)
        srv.kill()
        srv = start_server(data, port=None, env=env)
        _until(lambda: pid["alice"] not in members(ledger))
        ids = [c["batch_id"] for c in calls(ledger)]
        assert ids[2] == ids[3] and ids[2].startswith("b_" + cut[4:]) and [c["attempt"] for c in calls(ledger)][2:4] == [1, 2]
        assert sorted(members(ledger)) == sorted([pid["bob"], pid["carol"]])
        with srv.api() as api:
            _until(lambda: api.get("/api/syncs/runs", params={"sync": "pros-crm"}).json()["runs"][0]["status"] == "completed")
            last = api.get("/api/syncs/runs").json()["runs"][0]
            assert (last["run_id"], last["removed"], last["sent"]) == (cut, 1, 1)
            audit = [(e["action"], e["actor_name"]) for e in api.get("/api/audit", params={"action": "destinations"}).json()["entries"]]
            assert ("destinations.create", "mia") in audit
            # the CLI reaches the same server
            out = subprocess.run([sys.executable, "-m", "refinery", "syncs", "list", "--json"], capture_output=True, text=True, timeout=60,
                                 env={**os.environ, **env, "REFINERY_DATA_DIR": str(data), "REFINERY_ADMIN_TOKEN": srv.admin_token})
            assert out.returncode == 0, out.stderr
            assert [(s["name"], s["held"]) for s in json.loads(out.stdout)] == [("pros-crm", 2)]
    finally:
        srv.stop()
