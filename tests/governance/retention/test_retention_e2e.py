"""Retention through a real server: the CLI talks to it (dry run, run, runs, set), the privacy
officer may run it and a marketer may not, and the server's own schedule runs it as the system."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from support import start_server


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REFINERY_DATA_DIR": str(data_dir), "REFINERY_ADMIN_TOKEN": "test-admin-token"}
    return subprocess.run([sys.executable, "-m", "refinery", *args], env=env, capture_output=True, text=True, timeout=120)


def test_retention_through_the_server_and_the_cli(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    # the schedule checks at once: the server runs retention on its own, as the system principal
    server = start_server(data, env={"REFINERY_RETENTION_FIRST_CHECK_MINUTES": "0"})
    try:
        with server.api() as api:
            assert api.post("/api/sources", json={"name": "web"}).status_code == 201
            deadline = time.monotonic() + 30
            while not (runs := api.get("/api/retention/runs").json()["runs"]) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert runs and runs[0]["trigger"] == "scheduled" and runs[0]["actor"] == "system:retention", runs
            dpo = api.post("/api/tokens", json={"name": "dpo", "role": "privacy_officer"}).json()["token"]
            marketer = api.post("/api/tokens", json={"name": "m", "role": "marketer"}).json()["token"]

        dry = _cli(data, "retention", "run", "--dry-run", "--json")
        assert dry.returncode == 0, dry.stderr
        assert json.loads(dry.stdout)["dry_run"] is True
        done = _cli(data, "retention", "run")
        assert done.returncode == 0 and "deleted" in done.stdout, done.stderr
        assert _cli(data, "retention", "set", "web", "events", "30").returncode == 0
        policy = json.loads(_cli(data, "retention", "policy", "--json").stdout)
        assert policy["overrides"] == {"web": {"events": 30}}
        bad = _cli(data, "retention", "set", "web", "everything", "30")
        assert bad.returncode == 2 and "Unknown retention zone" in bad.stderr
        listed = json.loads(_cli(data, "retention", "runs", "--json").stdout)
        assert [r["trigger"] for r in listed] == ["api", "scheduled"]   # the dry run recorded nothing

        r = httpx.post(server.url + "/api/retention/run", headers={"Authorization": f"Bearer {dpo}"}, timeout=30)
        assert r.status_code == 200 and r.json()["actor"] == "dpo"
        r = httpx.post(server.url + "/api/retention/run", headers={"Authorization": f"Bearer {marketer}"}, timeout=30)
        assert r.status_code == 403 and r.json()["required"] == ["retention:run"]
        with server.api() as api:
            actions = [(e["action"], e["actor_name"]) for e in api.get("/api/audit", params={"action": "retention"}).json()["entries"]]
        assert actions == [("retention.run", "system:retention"), ("retention.run", "bootstrap admin"),
                           ("retention.set", "bootstrap admin"), ("retention.run", "dpo")]
    finally:
        server.stop()
