"""`refinery destinations` and `refinery syncs` as a user runs them on a data folder (no server: the
commands open the store and deliver in their own process), against the plug-in destination."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from activation_core_support import define_segment, membership, person, plugin_env
from ledger_destination import faults, members

from refinery.runtime import Runtime
from refinery.settings import Settings


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **plugin_env(tmp_path), "REFINERY_DATA_DIR": str(tmp_path / "data"), "REFINERY_ADMIN_TOKEN": "t"}
    return subprocess.run([sys.executable, "-m", "refinery", *args], env=env, capture_output=True, text=True, timeout=120)


def test_destinations_and_syncs_from_the_command_line(tmp_path: Path) -> None:
    with Runtime.open(Settings(data_dir=tmp_path / "data", admin_token="t")) as rt:
        for who in ("a", "b", "c"):
            person(rt, who, email=f"{who}@example.com")
        define_segment(rt, "vip")
        membership(rt, "vip", ["a", "b"])
    ledger = tmp_path / "ledger"

    made = _cli(tmp_path, "destinations", "create", "crm", "--kind", "ledger", "--purpose", "marketing",
                "--set", f"folder={ledger}", "--set", "token=cli-secret", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["config"]["token"] == "***" and "cli-secret" not in made.stdout
    kinds = _cli(tmp_path, "destinations", "kinds", "--json")
    assert "ledger" in [k["kind"] for k in json.loads(kinds.stdout)]

    typo = _cli(tmp_path, "syncs", "create", "vip-crm", "--segment", "vip", "--destination", "crm", "--map", "id=profile_id",
                "--map", "email=emial")
    assert typo.returncode == 2 and "did you mean 'email'" in " ".join(typo.stderr.split()) and "Fix:" in typo.stderr
    ok = _cli(tmp_path, "syncs", "create", "vip-crm", "--segment", "vip", "--destination", "crm", "--map", "id=profile_id",
              "--map", "email=email", "--schedule", "15", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["schedule_text"] == "every 15 minutes"

    faults(ledger, {"kind": "terminal"})
    run = _cli(tmp_path, "syncs", "run", "vip-crm", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["run"]["failed"] == 2 and members(ledger) == {}
    dead = json.loads(_cli(tmp_path, "syncs", "dead-letters", "--json").stdout)
    assert [d["reason"] for d in dead] == ["terminal"]
    replay = _cli(tmp_path, "syncs", "replay", dead[0]["batch_id"])
    assert replay.returncode == 0, replay.stderr
    assert members(ledger) == {"a": {"id": "a", "email": "a@example.com"}, "b": {"id": "b", "email": "b@example.com"}}
    runs = json.loads(_cli(tmp_path, "syncs", "runs", "vip-crm", "--json").stdout)
    assert [(r["status"], r["sent"], r["failed"]) for r in runs] == [("completed", 2, 0)]
    listed = json.loads(_cli(tmp_path, "destinations", "list", "--json").stdout)
    assert [(d["name"], d["outbox"]) for d in listed] == [("crm", {})]
    table = _cli(tmp_path, "syncs", "list")
    assert table.returncode == 0 and "vip-crm" in table.stdout
    refused = _cli(tmp_path, "destinations", "delete", "crm", "--yes")
    assert refused.returncode == 2 and "used by sync" in refused.stderr
    assert _cli(tmp_path, "syncs", "delete", "vip-crm", "--yes").returncode == 0
    assert _cli(tmp_path, "destinations", "delete", "crm", "--yes").returncode == 0
