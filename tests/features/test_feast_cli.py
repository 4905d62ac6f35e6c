"""`refinery features export-feast` on a data folder (no server): writes a repository `feast apply`
accepts, audits the export, refuses a SQL feature by name with its fix, and an occupied folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from refinery.identity import IdentityRules
from refinery.profiles.build import resolve_and_build
from refinery.profiles.policy import TraitPolicy
from support import fresh_runtime, write_events


def run(data_dir: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REFINERY_DATA_DIR": str(data_dir), "REFINERY_ADMIN_TOKEN": "t", "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "refinery", *args], env=env, capture_output=True, text=True, timeout=300)
    assert (out.returncode == 0) == ok, f"refinery {' '.join(args)}: {out.stdout} {out.stderr}"
    return out


def test_export_feast_cli(tmp_path: Path) -> None:
    at = datetime.now(UTC) - timedelta(days=2)
    with fresh_runtime(tmp_path) as rt:
        write_events(rt, *[{"type": "track", "userId": u, "event": "Order Completed", "properties": {"total": n},
                            "messageId": uuid.uuid4().hex, "timestamp": at.isoformat()} for u, n in (("a", 4), ("b", 6))])
        rt.writer.call(lambda e: resolve_and_build(e, IdentityRules(), TraitPolicy()))
    data = tmp_path / "data"
    run(data, "features", "create", "spend", "sum(total) of 'Order Completed'", "--ttl", "1 day")
    run(data, "features", "create", "days", "--sql",
        "SELECT ep.profile_id AS profile_id, count(*) AS value FROM events e JOIN event_profiles ep "
        "ON ep.source = e.source AND ep.message_id = e.message_id GROUP BY ep.profile_id")
    repo = tmp_path / "repo"
    refused = run(data, "features", "export-feast", str(repo), ok=False)
    assert "'days' is a SQL feature" in refused.stderr and "Fix:" in refused.stderr

    done = json.loads(run(data, "features", "export-feast", str(repo), "-f", "spend", "--json").stdout)
    assert done["features"] == {"spend": 1} and done["profiles"] == 2
    assert [(v["name"], v["ttl_seconds"], v["features"]) for v in done["views"]] == \
        [("refinery_features_ttl_86400s", 86_400, {"spend": "Float64"})]
    assert {p.name for p in repo.iterdir()} == {"feature_store.yaml", "refinery_features.py", "refinery_export.json", "data"}
    feast = Path(sys.executable).with_name("feast")
    applied = subprocess.run([str(feast), "apply"], cwd=repo, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "FEAST_USAGE": "False"}, check=False)
    assert applied.returncode == 0, applied.stderr[-2000:]
    listed = subprocess.run([str(feast), "feature-views", "list"], cwd=repo, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "FEAST_USAGE": "False"}, check=False)
    assert "refinery_features_ttl_86400s" in listed.stdout, listed.stderr[-2000:]

    again = run(data, "features", "export-feast", str(repo), "-f", "spend", ok=False)
    assert "earlier export" in again.stderr and "--replace" in again.stderr
    assert "Feast repository written" in run(data, "features", "export-feast", str(repo), "-f", "spend", "--replace").stdout
    with fresh_runtime(tmp_path) as rt:
        rows = rt.engine.fetch_all("SELECT action, details FROM audit_log WHERE action = 'features.export_feast'",
                                   cursor=rt.engine.fresh_reader())
    assert len(rows) == 2 and json.loads(rows[0][1])["profiles"] == 2
