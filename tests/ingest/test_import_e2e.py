"""Import as a user runs it: the `refinery import` command, and `POST /api/imports` on a live server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from support import Server

DATA = Path(__file__).parent / "data"
REFINERY = [sys.executable, "-m", "refinery"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*REFINERY, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def test_cli_import_then_reimport(tmp_path: Path) -> None:
    data = tmp_path / "data"
    args = ["import", str(DATA / "crm_contacts.csv"), "--source", "crm", "--mapping", str(DATA / "crm_contacts.yaml"), "--data-dir", str(data)]
    r = cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert (job["status"], job["rows_read"], job["rows_loaded"], job["rows_duplicate"]) == ("completed", 3, 3, 0)
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert "0 loaded, 3 already imported, 0 failed" in " ".join(r.stdout.split())
    r = cli("query", "SELECT user_id FROM events ORDER BY 1", "--format", "csv", "--data-dir", str(data))
    assert r.stdout.split() == ["user_id", "c-001", "c-002", "c-003"]


def test_cli_reports_a_missing_column_with_the_fix(tmp_path: Path) -> None:
    mapping = tmp_path / "m.yaml"
    mapping.write_text("type: identify\nuser_id: customer\nrow_key: [customer]\n")
    r = cli("import", str(DATA / "crm_contacts.csv"), "-s", "crm", "-m", str(mapping), "--data-dir", str(tmp_path / "data"))
    assert r.returncode == 2
    err = " ".join(r.stderr.split())
    assert "'customer' (mapped by user_id) is not in crm_contacts.csv" in err
    assert "Did you mean 'customer_id'?" in err and "Fix:" in err


def test_import_through_a_running_server(server: Server, tmp_path: Path) -> None:
    from refinery.ingest.mapping import load_mapping_file

    mapping = load_mapping_file(DATA / "crm_contacts.yaml")
    with server.api() as api:
        r = api.post("/api/imports", json={"path": str(DATA / "crm_contacts.csv"), "source": "crm", "mapping": mapping})
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["status"] == "started" and job["import_id"]
        deadline = time.monotonic() + 60
        while job["status"] in ("new", "started") and time.monotonic() < deadline:
            time.sleep(0.1)
            job = api.get(f"/api/imports/{job['import_id']}").json()
        assert (job["status"], job["rows_loaded"], job["rows_failed"]) == ("completed", 3, 0), job
        rows = api.post("/api/query", json={"sql": "SELECT user_id, type FROM events WHERE source = 'crm' ORDER BY 1"}).json()["rows"]
        assert rows == [["c-001", "identify"], ["c-002", "identify"], ["c-003", "identify"]]

        bad = api.post("/api/imports", json={"path": str(DATA / "crm_contacts.csv"), "source": "crm",
                                             "mapping": {**mapping, "user_id": "customerid"}})
        assert bad.status_code == 400 and bad.json()["field"] == "user_id" and "customer_id" in bad.json()["message"]
        assert api.get("/api/imports/imp_nope").status_code == 404


def test_cli_import_goes_through_the_running_server(server: Server) -> None:
    r = cli("import", str(DATA / "crm_contacts.csv"), "-s", "crm", "-m", str(DATA / "crm_contacts.yaml"),
            "--data-dir", str(server.data_dir), "--json", env={"REFINERY_ADMIN_TOKEN": server.admin_token})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows_loaded"] == 3
