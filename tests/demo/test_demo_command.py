"""`refinery demo` end to end, as a user runs it: a real subprocess, a real server, the real SDK.

Expected numbers come from the generator itself (regenerated with the seed and clock the demo
recorded), never typed in here.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from refinery.demo import crm
from refinery.demo import privacy as demo_privacy
from refinery.demo.world import APP_SOURCE, CLEAN, CRM_SOURCE, WEB_SOURCE, World, generate
from support import start_server

# The SQL below names the demo's sources literally.
assert (WEB_SOURCE, APP_SOURCE, CRM_SOURCE) == ("demo-web", "demo-app", "demo-crm")

PEOPLE = 30


def refinery(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "refinery", *args], capture_output=True, text=True, timeout=240,
        env={**os.environ, **(env or {})},
    )
    if check:
        assert proc.returncode == 0, f"refinery {' '.join(args)} ended {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def query(data_dir: Path, sql: str) -> list[dict[str, Any]]:
    return json.loads(refinery("query", "--json", "--data-dir", str(data_dir), sql).stdout)  # type: ignore[no-any-return]


def recorded_world(data_dir: Path) -> World:
    manifest = json.loads((data_dir / "demo" / "world.json").read_text())
    return generate(manifest["people"], manifest["seed"], datetime.fromisoformat(manifest["now"]))


def crm_ids(data_dir: Path) -> tuple[set[str], int]:
    with open(data_dir / "demo" / "crm_export.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(crm.COLUMNS)
    return {r["customer_id"] for r in rows if r["customer_id"]}, sum(1 for r in rows if not r["customer_id"])


def check_zones(data_dir: Path, world: World) -> None:
    """The zones hold the world's events, less those of the person the demo erased."""
    erased = demo_privacy.erased_person(data_dir / "demo")
    assert erased is not None, "the demo erases one person"
    expected = world.expected_counts(exclude_person=erased)
    clean = query(data_dir, "SELECT count(*) AS n FROM events WHERE source IN ('demo-web', 'demo-app')")
    assert clean[0]["n"] == expected[CLEAN]
    stored = {r["message_id"] for r in query(data_dir, "SELECT message_id FROM events WHERE source IN ('demo-web', 'demo-app')")}
    assert stored == {e.message_id for e in world.events if e.expected == CLEAN and e.person_id != erased}

    failed = query(data_dir, "SELECT message_id, reason, stage, message FROM failed_events WHERE source IN ('demo-web', 'demo-app')")
    assert {(r["message_id"], r["reason"]) for r in failed} == {
        (e.message_id, e.expected) for e in world.events if e.expected != CLEAN and e.person_id != erased}
    assert all("timestamp" in r["message"] for r in failed)

    ids, missing = crm_ids(data_dir)
    identifies = query(data_dir, "SELECT user_id, type FROM events WHERE source = 'demo-crm'")
    assert {r["type"] for r in identifies} == {"identify"}
    # The erased person's CRM row went with them when resolution had joined it to their profile.
    erased_rows = {r.values["customer_id"] for r in world.crm_rows if r.person_id == erased}
    held = sorted(r["user_id"] for r in identifies)
    assert set(held) <= ids and ids - set(held) <= erased_rows and len(held) == len(set(held))
    crm_failed = query(data_dir, "SELECT reason, row_number, file FROM failed_events WHERE source = 'demo-crm'")
    assert len(crm_failed) == missing == 1
    truth = json.loads((data_dir / "demo" / "ground_truth.json").read_text())
    lost = [r["line"] for r in truth["crm_rows"] if r["expected"] == "missing_id"]
    assert [(r["row_number"], r["file"]) for r in crm_failed] == [(lost[0], "crm_export.csv")]
    assert crm_failed[0]["reason"]


def test_demo_generates_sends_imports_and_reruns(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = json.loads(refinery("demo", "--people", str(PEOPLE), "--data-dir", str(data_dir), "--json").stdout)
    world = recorded_world(data_dir)
    assert first["people"] == PEOPLE and first["rerun"] is False
    assert first["server"]["started_by_demo"] is True
    assert first["events"]["sent"] == len(world.events)
    erased = demo_privacy.erased_person(data_dir / "demo")
    assert first["events"]["clean"] == world.expected_counts(exclude_person=erased)[CLEAN]
    truth_file = Path(first["ground_truth"]["file"])
    assert truth_file.parent == data_dir / "demo"
    truth = json.loads(truth_file.read_text())
    assert truth["world"]["people"] == PEOPLE and truth["shared_devices"]
    assert not (data_dir / "server.json").exists(), "the server the demo started is stopped"
    check_zones(data_dir, world)

    # Identities were resolved into profiles, with the demo's rules file, and scored against the truth.
    ident = first["identity"]
    assert Path(ident["rules_file"]) == data_dir / "identity-rules.yaml" and Path(ident["rules_file"]).exists()
    # (Counted before the privacy step erased one person: their profile and events are gone since.)
    profiles = query(data_dir, "SELECT count(*) AS n FROM profiles")[0]["n"]
    assert ident["profiles"] - 1 == profiles > 0
    theirs_clean = sum(1 for e in world.events if e.person_id == erased and e.expected == CLEAN)
    their_crm_rows = sum(1 for r in world.crm_rows if r.person_id == erased)
    gone = ident["events_attributed"] - query(data_dir, "SELECT count(*) AS n FROM event_profiles")[0]["n"]
    assert theirs_clean <= gone <= theirs_clean + their_crm_rows  # their events, and their CRM row when it had joined them
    det = ident["accuracy"]["deterministic"]
    assert det["precision"] >= 0.999 and det["profiles_with_two_persons"] == 0
    assert det["recall"] >= 0.95
    # The shared family devices show up as refused merges, never as one profile for a family.
    assert ident["refusals"].get("conflicting_user_id", 0) > 0
    # Splink matched the CRM's person records; links stay apart and never lower precision.
    assert ident["matching"]["person_record"]["records"] > 0
    links = query(data_dir, "SELECT count(*) AS n FROM identity_links WHERE method = 'person_record' AND removed_at IS NULL")[0]["n"]
    assert ident["probabilistic_links"].get("person_record", 0) == links > 0
    # Consent was read from the events' categoryPreferences into receipts during resolution.
    # (The erasure took the erased person's receipts with them.)
    assert ident["consent"]["receipts"] > query(data_dir, "SELECT count(*) AS n FROM consent_log")[0]["n"] > 0
    prob = ident["accuracy"]["with_probabilistic_links"]
    assert prob["precision"] >= 0.99 and prob["recall_of_all_pairs"] >= det["recall_of_all_pairs"]

    # Segments: the demo's audiences were computed, and one member's membership explained.
    seg = first["segments"]
    assert not seg["failed"] and set(seg["sizes"]) == set(seg["rules"]) and sum(1 for n in seg["sizes"].values() if n) >= 4
    x = seg["explanation"]
    assert x["member"] and x["conditions"] and all(c["held"] for c in x["conditions"] if "." not in c["id"])
    open_members = query(data_dir, "SELECT segment, count(*) AS n FROM segment_members WHERE exited_at IS NULL GROUP BY 1")
    for row in open_members:  # (the erasure below may take one member away)
        assert seg["sizes"][row["segment"]] - row["n"] in (0, 1)

    # Activation: the segment reached the demo's webhook receiver (signatures verified, each batch
    # applied once) and a folder of files, members without marketing consent held back.
    act = first["activation"]
    wh, files = act["webhook"], act["files"]
    assert wh["run"]["status"] == "completed" and wh["run"]["failed"] == 0 and wh["received"] > 0
    assert wh["outside_segment"] == 0 and wh["received"] + wh["not_sent"] == act["members"]
    assert wh["run"]["skipped_consent"] == wh["not_sent"] and wh["run"]["added"] == wh["received"]
    lines = [json.loads(line) for f in Path(files["folder"]).glob("*.jsonl") for line in f.read_text().splitlines()]
    added = {r["profile_id"] for r in lines if r.get("action") == "add"}
    assert files["run"]["status"] == "completed" and len(added) == wh["received"]
    held = json.loads(refinery("syncs", "show", "repeat_buyers_to_files", "--json", "--data-dir", str(data_dir)).stdout)["held"]
    assert wh["received"] - held in (0, 1)  # (the demo's erasure, after this step, may take one person out)

    # Privacy: one person exported (with their consent), another erased with a receipt; an event
    # sent for the erased person afterwards is suppressed.
    priv = first["privacy"]
    exported, erased_person = demo_privacy.chosen(world)
    assert erased_person.person_id == erased and exported.person_id != erased
    assert priv["export"]["status"] == "completed" and priv["export"]["stores"]["events"] > 0 and priv["export"]["consent"]
    export_file = Path(priv["export"]["file"])
    assert export_file.stat().st_mode & 0o777 == 0o600 and exported.emails[0] in export_file.read_text()
    receipt = priv["erasure"]["receipt"]
    assert priv["erasure"]["status"] == "completed" and receipt["keys_destroyed"] > 0 and receipt["stores"]["events"] > 0
    assert priv["after_erasure"] == {"sent": 1, "suppressed": 1}
    assert not query(data_dir, f"SELECT 1 FROM events WHERE user_id = '{erased_person.user_id}'")  # noqa: S608 - a generated id

    again = json.loads(refinery("demo", "--people", str(PEOPLE), "--data-dir", str(data_dir), "--json").stdout)
    assert again["rerun"] is True
    # The erased person's events are sent again (they are not in the store) and suppressed.
    theirs = sum(1 for e in world.events if e.person_id == erased)
    assert again["events"]["sent"] == theirs and again["events"]["already_stored"] == len(world.events) - theirs
    assert again["privacy"]["erasure"]["request_id"] == priv["erasure"]["request_id"]
    assert again["crm"]["rows_loaded"] == 0
    # the new receiver gets the whole audience again (mode full); the files only what changed (diff)
    assert again["activation"]["webhook"]["received"] + again["activation"]["webhook"]["not_sent"] == again["activation"]["members"]
    assert again["activation"]["webhook"]["outside_segment"] == 0
    check_zones(data_dir, world)  # nothing doubled

    other = refinery("demo", "--people", str(PEOPLE + 1), "--data-dir", str(data_dir), check=False)
    assert other.returncode == 2
    assert f"--people {PEOPLE}" in other.stderr


def test_demo_uses_a_running_server_and_leaves_it_running(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    server = start_server(data_dir)
    try:
        out = refinery("demo", "--people", "12", "--seed", "3", "--data-dir", str(data_dir), "--json",
                       env={"REFINERY_ADMIN_TOKEN": server.admin_token})
        summary = json.loads(out.stdout)
        assert summary["server"] == {"url": server.url, "started_by_demo": False}
        assert server.proc.poll() is None
        world = recorded_world(data_dir)
        with server.api() as api:
            r = api.post("/api/query", json={"sql": "SELECT count(*) FROM events WHERE source IN ('demo-web', 'demo-app')"})
            assert r.status_code == 200, r.text
            erased = demo_privacy.erased_person(data_dir / "demo")
            assert r.json()["rows"][0][0] == world.expected_counts(exclude_person=erased)[CLEAN]
    finally:
        server.stop()
