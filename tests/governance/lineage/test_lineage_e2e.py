"""`refinery lineage` as a user runs it: after an import and a resolution, a table shows the runs
that wrote it, and a profile shows the import file and the resolution run that produced it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from support import Server

DATA = Path(__file__).parents[2] / "ingest" / "data"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "refinery", *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def lineage(data: Path, target: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    r = cli("lineage", target, "--data-dir", str(data), "--json", env=env)
    assert r.returncode == 0, r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def test_lineage_of_a_table_and_a_profile_after_import_and_resolve(tmp_path: Path) -> None:
    data = tmp_path / "data"
    r = cli("import", str(DATA / "crm_contacts.csv"), "--source", "crm", "--mapping", str(DATA / "crm_contacts.yaml"), "--data-dir", str(data), "--json")
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert cli("identity", "resolve", "--data-dir", str(data)).returncode == 0

    events = lineage(data, "events")
    assert [(run["job"], run["state"]) for run in events["runs"]] == [("identity.resolve", "COMPLETE"), ("ingest.import", "COMPLETE")]
    imported = events["runs"][1]
    assert imported["inputs"] == [f"file:{DATA / 'crm_contacts.csv'}"]
    assert imported["counts"]["events"] == 3 and imported["details"]["import_id"] == job["import_id"]
    assert f"file:{job['stored_path']}" in imported["outputs"]
    resolve = events["runs"][0]
    assert "events" in resolve["inputs"] and "profiles" in resolve["outputs"] and resolve["counts"]["profiles"] == 3

    profile = lineage(data, "user_id:c-001")
    assert profile["kind"] == "profile" and profile["profile_id"].startswith("prof_")
    assert [run["run_id"] for run in profile["produced_by"]] == [resolve["run_id"]]
    assert profile["files"] == [job["stored_path"]] and Path(job["stored_path"]).is_file()
    [source] = profile["sources"]
    assert (source["source"], source["import_id"], source["events"]) == ("crm", job["import_id"], 1)
    assert [m["import_id"] for m in profile["messages"]] == [job["import_id"]]
    assert lineage(data, profile["profile_id"])["messages"] == profile["messages"]  # by id, the same trail

    r = cli("lineage", "user_id:nobody", "--data-dir", str(data))
    assert r.returncode != 0 and "neither a table with lineage nor a known profile" in " ".join(r.stderr.split())
    r = cli("lineage", "events", "--data-dir", str(data))  # the table view a person reads
    assert r.returncode == 0 and "Runs that read or wrote events (2 in all" in r.stdout and r.stdout.count("COMPLETE") == 2


def test_lineage_through_a_running_server(server: Server, tmp_path: Path) -> None:
    from refinery.ingest.mapping import load_mapping_file

    mapping = load_mapping_file(DATA / "crm_contacts.yaml")
    with server.api() as api:
        job = api.post("/api/imports", json={"path": str(DATA / "crm_contacts.csv"), "source": "crm", "mapping": mapping}).json()
        deadline = time.monotonic() + 60
        while job["status"] in ("new", "started") and time.monotonic() < deadline:
            time.sleep(0.1)
            job = api.get(f"/api/imports/{job['import_id']}").json()
        assert api.post("/api/identity/resolve").status_code == 200
        assert api.post("/api/identity/match").status_code == 200
        runs = api.get("/api/lineage", params={"target": "identity_links"}).json()["runs"]
        assert [(r["job"], r["state"]) for r in runs] == [("identity.match", "COMPLETE")]
        profile = api.get("/api/lineage", params={"target": "user_id:c-002"}).json()
        assert profile["files"] == [job["stored_path"]] and len(profile["produced_by"]) == 1
        rows = api.get("/api/audit", params={"action": "lineage"}).json()["entries"]
    assert any(r["action"] == "lineage.read" and "c-002" not in json.dumps(r) for r in rows)
    # the CLI goes through the server while it runs
    via_server = lineage(server.data_dir, "identity_links", env={"REFINERY_ADMIN_TOKEN": server.admin_token})
    assert via_server["runs"][0]["job"] == "identity.match"
