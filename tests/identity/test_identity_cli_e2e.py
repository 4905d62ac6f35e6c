"""End to end: events into a real server, then `refinery identity ...` from the CLI, which talks to the
running server's admin API; and the same commands in process when no server runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

from support import Server

EVENTS = [
    {"type": "identify", "anonymousId": "jo-laptop", "userId": "jo", "traits": {"email": "team@shop.io", "plan": "pro"}},
    {"type": "track", "event": "Viewed", "anonymousId": "jo-laptop", "userId": "jo"},
    {"type": "identify", "anonymousId": "sam-phone", "traits": {"email": "team@shop.io", "name": "Sam"}},
    {"type": "track", "event": "Viewed", "anonymousId": "sam-phone"},
    {"type": "identify", "anonymousId": "lee-tablet", "traits": {"email": "lee@test.com"}},
    {"type": "identify", "anonymousId": "kim-tablet", "traits": {"email": "lee@test.com"}},
]


def _cli(data_dir: Path, *args: str, token: str | None = None, ok: bool = True) -> Any:
    env = {**os.environ, "REFINERY_DATA_DIR": str(data_dir)}
    if token:
        env["REFINERY_ADMIN_TOKEN"] = token
    out = subprocess.run([sys.executable, "-m", "refinery", *args, "--json"], env=env, capture_output=True, text=True)
    if not ok:
        assert out.returncode != 0
        return out.stderr
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _profile(api: httpx.Client, identifier: str) -> str:
    r = api.get("/api/profiles", params={"identifier": identifier})
    assert r.status_code == 200, r.text
    return str(r.json()["profile_id"])


def test_undo_and_plan_through_a_running_server(server: Server, tmp_path: Path) -> None:
    batch = [{**e, "messageId": uuid.uuid4().hex, "timestamp": f"2026-01-01T12:0{i}:00Z"} for i, e in enumerate(EVENTS)]
    assert httpx.post(server.url + "/v1/batch", json={"batch": batch}, headers=server.basic).status_code == 200

    def cli(*args: str, ok: bool = True) -> Any:
        return _cli(server.data_dir, *args, token=server.admin_token, ok=ok)

    resolved = cli("identity", "resolve")
    assert resolved["profiles"]["events_attributed"] == 6
    with server.api() as api:
        jo = _profile(api, "user_id:jo")
        assert _profile(api, "anonymous_id:sam-phone") == jo

        made = cli("identity", "remove-identifier", "email:Team@Shop.io", "--reason", "shared inbox")
        override = made["override"]
        assert override["kind"] == "remove_identifier" and override["actor"] == "bootstrap admin"
        assert made["resolution"]["identity"]["blocked_by_reason"]["removed_by_user"] == 1
        assert _profile(api, "user_id:jo") == jo != _profile(api, "anonymous_id:sam-phone")
        assert api.get("/api/profiles", params={"identifier": "email:team@shop.io"}).status_code == 404
        assert [o["override_id"] for o in cli("identity", "overrides")] == [override["override_id"]]
        explained = cli("profiles", "explain", "email:team@shop.io")
        assert [r["reason"] for r in explained["refusals"]] == ["removed_by_user"]

        # A dry run of a rule change writes nothing: blocking no test domains would merge Lee and Kim.
        rules = tmp_path / "rules.yaml"
        rules.write_text("version: 1\nblocked:\n  disable_defaults: [test_email_domain]\n")
        before = api.post("/api/query", json={"sql": "SELECT * FROM identities ORDER BY ALL"}).json()["rows"]
        planned = cli("identity", "plan", "--rules", str(rules))
        assert (planned["merges"], planned["splits"]) == (1, 0)
        assert planned["profiles"]["proposed"] == planned["profiles"]["current"] - 1
        [merge] = planned["merge_examples"]
        assert sorted(i["value"] for p in merge["from_profiles"] for i in p["identifiers"]) == ["kim-tablet", "lee-tablet"]
        assert planned["unblocked"] == {"blocked_pattern:test_email_domain": 1}
        assert api.post("/api/query", json={"sql": "SELECT * FROM identities ORDER BY ALL"}).json()["rows"] == before
        assert "not valid YAML" in cli("identity", "plan", "--rules", str(_bad(tmp_path)), ok=False)

        revoked = cli("identity", "revoke", override["override_id"])
        assert revoked["override"]["revoked_at"] is not None
        assert _profile(api, "anonymous_id:sam-phone") == jo
        assert cli("identity", "overrides") == [] and len(cli("identity", "overrides", "--all")) == 1
        assert "already revoked" in cli("identity", "revoke", override["override_id"], ok=False)

        # Writes need identity:write; reads of overrides need the token too.
        assert httpx.get(server.url + "/api/identity/overrides").status_code == 401
        r = httpx.post(server.url + "/api/identity/overrides", json={"kind": "split", "identifiers": ["user_id:jo"]},
                       headers={"Authorization": "Bearer nope"})
        assert r.status_code in (401, 403)


def _bad(tmp_path: Path) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text("types: [user_id\n")
    return p


def test_the_same_commands_work_in_process_without_a_server(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from refinery.ingest.protocol import Limits, stage
    from refinery.ingest.store import IngestItem
    from refinery.runtime import Runtime
    from refinery.settings import Settings

    data_dir = tmp_path / "data"
    rt = Runtime.open(Settings(data_dir=data_dir))
    try:
        items = []
        for i, e in enumerate(EVENTS):
            ev = {**e, "messageId": uuid.uuid4().hex, "timestamp": f"2026-01-01T12:0{i}:00Z"}
            items.extend(IngestItem("web", "req", datetime.now(UTC), s) for s in stage("batch", {"batch": [ev]}, Limits()))
        rt.writer.call(lambda e: rt.events.write(e, items))
    finally:
        rt.close()
    _cli(data_dir, "identity", "resolve")
    made = _cli(data_dir, "identity", "split", "anonymous_id:sam-phone", "--reason", "not Jo")
    assert made["override"]["actor"].startswith("local:")
    assert made["resolution"]["identity"]["blocked_by_reason"]["split_by_user"] >= 1
    shown = _cli(data_dir, "profiles", "show", "anonymous_id:sam-phone")
    assert shown["identifiers"] == {"anonymous_id": ["sam-phone"]}
    assert _cli(data_dir, "identity", "plan")["merges"] == 0
