"""An import cut off by a killed server is reported as interrupted when the store opens again, and
importing the file again finishes it with every row exactly once."""

from __future__ import annotations

import csv
import time
from pathlib import Path

from support import Server, start_server

MAPPING = {"type": "identify", "user_id": "id", "row_key": ["id"], "traits": {"email": "email", "plan": "plan"}}
ROWS = 400_000


def _write(path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "email", "plan"])
        for i in range(ROWS):
            w.writerow([f"c-{i}", f"user{i}@shop.io", ("free", "pro")[i % 2]])


def _wait(server: Server, import_id: str, until: tuple[str, ...], timeout: float = 120) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    with server.api() as api:
        while True:
            job: dict[str, object] = api.get(f"/api/imports/{import_id}").json()
            if job["status"] in until or time.monotonic() > deadline:
                return job
            time.sleep(0.02)


def test_a_killed_import_is_marked_interrupted_and_finishes_on_reimport(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "customers.csv"
    _write(path)
    with server.api() as api:
        job = api.post("/api/imports", json={"path": str(path), "source": "crm", "mapping": MAPPING}).json()
    server.kill()  # mid-import: the file takes seconds to load

    restarted = start_server(server.data_dir)
    try:
        with restarted.api() as api:
            first = api.get(f"/api/imports/{job['import_id']}").json()
            assert first["status"] == "interrupted" and "again" in str(first["error"]), first
            again = api.post("/api/imports", json={"path": str(path), "source": "crm", "mapping": MAPPING}).json()
            done = _wait(restarted, str(again["import_id"]), ("completed", "failed"))
            assert done["status"] == "completed", done
            counts = api.post("/api/query", json={
                "sql": "SELECT count(*), count(DISTINCT message_id) FROM events WHERE source = 'crm'"}).json()["rows"][0]
            assert counts == [ROWS, ROWS]
            assert api.post("/api/query", json={
                "sql": "SELECT count(*) FROM imports WHERE status IN ('new', 'started')"}).json()["rows"][0] == [0]
    finally:
        restarted.stop()
