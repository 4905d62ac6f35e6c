"""Through a real server and the real CLI: personal-data reads and configuration changes land in the
audit log with the token's id and name (never the token or the personal values), and
`refinery audit verify` names a row tampered with in DuckDB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import httpx

from support import Server

EMAIL = "jane.audit@refinery-mail.net"


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REFINERY_DATA_DIR": str(data_dir), "REFINERY_ADMIN_TOKEN": "test-admin-token", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "refinery", *args], env=env, capture_output=True, text=True, timeout=120)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_reads_and_changes_are_audited_and_verifiable(server: Server) -> None:
    d = server.data_dir
    r = httpx.post(server.url + "/v1/identify", headers=server.basic,
                   json={"userId": "u-audit", "messageId": "m-audit", "traits": {"email": EMAIL, "name": "Jane Audit"}})
    assert r.status_code == 200, r.text
    with server.api() as api:
        assert api.post("/api/identity/resolve").status_code == 200
        assert api.patch("/api/sources/web", json={"rate_limit_per_second": 50}).status_code == 200

    created = _cli(d, "tokens", "create", "dpo", "--role", "privacy_officer", "--expires", "7d", "--json")
    assert created.returncode == 0, created.stderr
    dpo = json.loads(created.stdout)
    analyst = json.loads(_cli(d, "tokens", "create", "ann", "--role", "analyst", "--json").stdout)
    assert {t["name"] for t in json.loads(_cli(d, "tokens", "list", "--json").stdout)} == {"dpo", "ann"}
    assert dpo["token"] not in _cli(d, "tokens", "list", "--json").stdout

    # a privacy officer reads a profile with its values (audited as such); an analyst reads it
    # pseudonymised (tokens, audited too), and may not read the audit log
    profile = httpx.get(server.url + "/api/profiles", params={"identifier": f"email:{EMAIL}"}, headers=_bearer(dpo["token"]))
    assert profile.status_code == 200, profile.text
    assert EMAIL.lower() in profile.text
    pid = profile.json()["profile_id"]
    seen = httpx.get(server.url + f"/api/profiles/{pid}", headers=_bearer(analyst["token"]))
    assert seen.status_code == 200 and EMAIL.lower() not in seen.text.lower() and "pii:email:" in seen.text
    assert httpx.get(server.url + "/api/audit", headers=_bearer(analyst["token"])).status_code == 403

    log = httpx.get(server.url + "/api/audit", params={"limit": 1000}, headers=_bearer(dpo["token"]))
    assert log.status_code == 200
    entries: list[dict[str, Any]] = log.json()["entries"]
    actions = [(e["action"], e["actor_name"]) for e in entries]
    assert actions == [
        ("sources.create", "bootstrap admin"),    # the test server's fixture
        ("identity.resolve", "bootstrap admin"),
        ("sources.update", "bootstrap admin"),
        ("tokens.create", "bootstrap admin"),     # the CLI goes through the running server
        ("tokens.create", "bootstrap admin"),
        ("profiles.lookup", "dpo"),
        ("profiles.read", "ann"),
    ]
    lookup, read = entries[-2], entries[-1]
    assert lookup["actor_id"] == dpo["token_id"] and lookup["object"] == f"profile:{pid}"
    assert lookup["details"] == {"identifier_type": "email", "pii": True}
    assert read["object"] == f"profile:{pid}" and read["details"]["pii"] is False
    assert entries[2]["details"] == {"rate_limit_per_second": 50.0} and entries[2]["object"] == "source:web"
    text = log.text
    for secret in (EMAIL, "Jane Audit", dpo["token"], analyst["token"], server.write_key, "test-admin-token"):
        assert secret not in text

    ok = _cli(d, "audit", "verify", "--json")
    assert ok.returncode == 0, ok.stderr
    head = json.loads(ok.stdout)["head"]
    assert json.loads(ok.stdout)["ok"] and head["seq"] == len(entries)
    listed = _cli(d, "audit", "list", "--action", "tokens", "--json")
    assert [e["action"] for e in json.loads(listed.stdout)] == ["tokens.create", "tokens.create"]

    server.stop()
    con = duckdb.connect(str(d / "refinery.duckdb"))
    con.execute("UPDATE audit_log SET object = 'profile:someone-else' WHERE seq = 6")
    con.close()
    broken = _cli(d, "audit", "verify")
    assert broken.returncode == 1
    assert "Row 6" in broken.stderr and "edited" in broken.stderr

    con = duckdb.connect(str(d / "refinery.duckdb"))
    con.execute("DELETE FROM audit_log WHERE seq = 3")
    con.close()
    broken = json.loads(_cli(d, "audit", "verify", "--json", "--expect", f"{head['seq']}:{head['hash']}").stdout)
    assert not broken["ok"]
    assert {(p["seq"], p["kind"]) for p in broken["problems"]} == {(3, "missing"), (4, "broken_link"), (6, "edited")}

    # the local CLI (no server) records its own changes as local:<user>
    revoked = _cli(d, "tokens", "revoke", "ann", "--json")
    assert revoked.returncode == 0 and json.loads(revoked.stdout)["state"] == "revoked"
    last = json.loads(_cli(d, "audit", "list", "--limit", "1", "--json").stdout)[0]
    assert last["action"] == "tokens.revoke" and last["actor_name"].startswith("local:")
