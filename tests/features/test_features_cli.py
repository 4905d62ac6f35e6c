"""`refinery features` on a data folder (no server): create, refuse a bad expression with its caret
and fix, version, list as JSON, and a training set from a CSV of labels."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from refinery.identity import IdentityRules
from refinery.profiles.build import resolve_and_build
from refinery.profiles.policy import TraitPolicy
from support import fresh_runtime, write_events


def run(data_dir: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REFINERY_DATA_DIR": str(data_dir), "REFINERY_ADMIN_TOKEN": "t", "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "refinery", *args], env=env, capture_output=True, text=True, timeout=120)
    assert (out.returncode == 0) == ok, f"refinery {' '.join(args)}: {out.stdout} {out.stderr}"
    return out


def test_features_cli(tmp_path: Path) -> None:
    at = datetime.now(UTC) - timedelta(days=1)
    with fresh_runtime(tmp_path) as rt:
        calls: list[dict[str, Any]] = [{"type": "track", "userId": u, "event": "Order Completed", "properties": {"total": n},
                                        "messageId": uuid.uuid4().hex, "timestamp": at.isoformat()} for u, n in (("a", 4), ("b", 6))]
        write_events(rt, *calls)
        rt.writer.call(lambda e: resolve_and_build(e, IdentityRules(), TraitPolicy()))
        pids = dict(rt.engine.fetch_all("SELECT value, profile_id FROM identities WHERE identifier_type = 'user_id'",
                                        cursor=rt.engine.fresh_reader()))
    data = tmp_path / "data"
    created = json.loads(run(data, "features", "create", "spend", "sum(total) of 'Order Completed'", "--ttl", "1 day", "--json").stdout)
    assert created["version"] == 1 and created["ttl_seconds"] == 86_400
    bad = run(data, "features", "create", "oops", "sum(totl) of 'Order Completed'", ok=False)
    assert "did you mean 'total'" in bad.stderr and "^^^^" in bad.stderr and "Fix:" in bad.stderr
    assert "version 2" in run(data, "features", "update", "spend", "max(total) of 'Order Completed'").stdout
    listed = json.loads(run(data, "features", "list", "--json").stdout)
    assert [(f["name"], f["version"]) for f in listed] == [("spend", 2)]
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["profile_id", "timestamp", "churned"])
        w.writerow([pids["a"], datetime.now(UTC).isoformat(), "yes"])
        w.writerow([pids["b"], datetime.now(UTC).isoformat(), "no"])
        w.writerow([pids["b"], (at - timedelta(hours=1)).isoformat(), "no"])
    result = json.loads(run(data, "features", "training-set", str(labels), "-f", "spend@1", "-f", "spend", "--label", "churned",
                            "--json").stdout)
    assert result["columns"][-3:] == ["churned", "spend@1", "spend"]
    assert [r[-2:] for r in result["rows"]] == [[4.0, 4.0], [6.0, 6.0], [0, None]]
    future = tmp_path / "future.csv"
    future.write_text(f"profile_id,timestamp,churned\n{pids['a']},{(datetime.now(UTC) + timedelta(days=3)).isoformat()},1\n")
    refused = run(data, "features", "training-set", str(future), "-f", "spend", "--label", "churned", ok=False)
    assert "in the future" in refused.stderr and "Fix:" in refused.stderr
