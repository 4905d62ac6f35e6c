"""Commands that open the store themselves (no server running) are audited like the admin API:
configuration changes in their transaction, personal-data reads before the answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def _cli(data_dir: Path, *args: str) -> Any:
    env = {**os.environ, "REFINERY_DATA_DIR": str(data_dir)}
    out = subprocess.run([sys.executable, "-m", "refinery", *args], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_local_commands_leave_audit_rows_and_the_chain_verifies(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _cli(data, "sources", "create", "web", "--json")
    _cli(data, "query", "SELECT count(*) FROM events")
    _cli(data, "identity", "resolve", "--json")
    rows = json.loads(_cli(data, "query", "SELECT actor_id, action, object FROM audit_log ORDER BY seq", "--format", "json"))
    actions = [(r["action"], r["object"]) for r in rows]
    assert ("sources.create", "source:web") in actions
    assert ("query.run", None) in actions and ("identity.resolve", None) in actions
    assert {r["actor_id"] for r in rows} == {rows[0]["actor_id"]} and rows[0]["actor_id"].startswith("local")
    _cli(data, "audit", "verify")
