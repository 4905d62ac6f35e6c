"""A rule's error shows the line and a caret under the fault everywhere: in the API's body, and in
the CLI whether it runs in process or through a running server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support import start_server

RULE = "plan = 'pro' and\nperformed 'Order Completed' whre total > 1"


def _preview(data_dir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "refinery", "segments", "preview", "--data-dir", str(data_dir), RULE],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def _shows_caret(out: str) -> bool:
    lines = out.splitlines()
    at = next((i for i, line in enumerate(lines) if line.strip().startswith("2 | performed")), None)
    return at is not None and at + 1 < len(lines) and "^" in lines[at + 1]


def test_the_cli_shows_the_caret_in_process(tmp_path: Path) -> None:
    done = _preview(tmp_path / "data")
    assert done.returncode == 2 and _shows_caret(done.stderr), done.stderr


def test_the_api_and_the_cli_through_a_server_show_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    server = start_server(data)
    try:
        with server.api() as api:
            r = api.post("/api/segments/preview", json={"rule": RULE})
        assert r.status_code == 400, r.text
        body = r.json()
        assert body["line"] == 2 and "^" in body["caret"]
        done = _preview(data, {"REFINERY_ADMIN_TOKEN": server.admin_token})
        assert done.returncode == 2 and _shows_caret(done.stderr), done.stderr
    finally:
        server.stop()
