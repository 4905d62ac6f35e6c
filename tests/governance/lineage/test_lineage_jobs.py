"""Lineage for the jobs that emitted none before: overrides, consent recorded or synced through the API,
and the incremental identity follower (one run per window of batches, not per batch)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from refinery.governance import lineage
from refinery.identity.incremental import Follower
from refinery.identity.rules import rules_from_settings
from refinery.profiles.policy import TraitPolicy
from refinery.runtime import Runtime
from refinery.settings import Settings
from support import Server, event, write_events


def _events(settings: Settings) -> list[dict[str, Any]]:
    path = settings.lineage_path
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()] if path.exists() else []


def _runs(settings: Settings, job: str) -> list[dict[str, Any]]:
    return [r for r in lineage.read_runs(settings.lineage_path) if r["job"] == job]


# -- a window of batches -----------------------------------------------------------------------------


def test_a_run_window_folds_batches_into_one_run_and_ends_it_when_the_window_passes(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    window = lineage.RunWindow(settings, lineage.INCREMENTAL, seconds=0.2)
    from datetime import UTC, datetime

    first = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    window.add(first, {"event_profiles": 3, "identities": 2}, {"events": 3})
    window.add(datetime.now(UTC), {"event_profiles": 4}, {"events": 4})
    window.tick()  # too early: still open
    assert [e["eventType"] for e in _events(settings)] == ["START"]
    assert _events(settings)[0]["eventTime"].startswith("2026-03-01T09:00:00")  # dated when its first batch began
    time.sleep(0.25)
    window.tick()
    [run] = _runs(settings, "identity.incremental")
    assert run["state"] == "COMPLETE" and run["counts"] == {"event_profiles": 7, "identities": 2}
    assert run["details"] == {"events": 7, "batches": 2}
    window.fail(datetime.now(UTC), RuntimeError("a value from the data: jane@example.com"))
    failed = _runs(settings, "identity.incremental")[0]
    assert failed["state"] == "FAIL" and failed["error"] == "RuntimeError"
    window.close()  # nothing open: nothing sent
    assert len(_events(settings)) == 4


def _wait(condition: Any, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_follower_emits_one_run_per_window_and_the_profile_trail_names_it(runtime: Runtime) -> None:
    settings = runtime.settings
    follower = Follower(runtime.writer, rules_from_settings(settings), TraitPolicy.from_settings(settings),
                        lineage=settings, lineage_seconds=60)
    follower.start()
    try:
        for i in range(6):  # six commits, each followed by a batch: one window
            write_events(runtime, event("identify", userId=f"u{i}", anonymousId=f"a{i}"), event("track", event="Viewed", anonymousId=f"a{i}"))
        _wait(lambda: follower.batches >= 6)
        assert [e["eventType"] for e in _events(settings)] == ["START"]  # six batches, one open run
        assert follower.window is not None
        follower.window.seconds = 0  # the window passes: the follower's loop sends its COMPLETE
        _wait(lambda: len(_events(settings)) == 2)
        write_events(runtime, event("track", event="Viewed", userId="u0"))  # a second window, ended at once
        _wait(lambda: len(_events(settings)) == 4)
    finally:
        follower.stop()
    runs = _runs(settings, "identity.incremental")
    assert len(runs) == 2 and all(r["state"] == "COMPLETE" for r in runs), [(r["state"], r["details"]) for r in runs]
    assert sum(r["details"]["batches"] for r in runs) <= follower.batches  # batches that found nothing new send nothing
    assert sum(r["counts"]["event_profiles"] for r in runs) == 13  # every event attributed once
    assert runs[-1]["details"]["full_resolutions"] == 1  # the first batch: nothing resolved yet
    assert "consent_log" in runs[-1]["outputs"] and "consent_log" not in runs[0]["outputs"]  # a full resolution syncs consent
    trail = lineage.trail(settings, runtime.engine, "user_id:u0")
    assert any(r["job"] == "identity.incremental" for r in trail["produced_by"])
    assert "identity.incremental" in {r["job"] for r in lineage.table_trail(settings, "profiles")["runs"]}


# -- jobs through the API ----------------------------------------------------------------------------


def test_overrides_and_consent_through_the_api_emit_runs_that_name_them(server: Server) -> None:
    batch = [{"type": "identify", "userId": "u-ann", "anonymousId": "a-ann", "traits": {"email": "ann@example.com"}},
             {"type": "track", "event": "Viewed", "anonymousId": "a-ann",
              "context": {"consent": {"categoryPreferences": {"analytics": True}}}}]
    assert httpx.post(server.url + "/v1/batch", json={"batch": batch}, headers=server.basic).status_code == 200
    settings = Settings(data_dir=server.data_dir)
    with server.api() as api:
        assert api.post("/api/identity/resolve").status_code == 200
        made = api.post("/api/identity/overrides", json={"kind": "remove_edge", "identifiers": ["user_id:u-ann", "anonymous_id:a-ann"]})
        assert made.status_code == 201, made.text
        override_id = made.json()["override"]["override_id"]
        assert api.post(f"/api/identity/overrides/{override_id}/revoke").status_code == 200
        bad = api.post("/api/identity/overrides", json={"kind": "remove_identifier", "identifiers": ["user_id:u-nobody-secret"]})
        assert bad.status_code == 404
        consent = api.post("/api/consent", json={"identifier": "user_id:u-ann", "purposes": {"marketing": "denied"}})
        assert consent.status_code == 201, consent.text
        synced = api.post("/api/consent/sync", params={"full": True})
        assert synced.status_code == 200
        assert api.post("/api/identity/match").status_code == 200
        assert api.post("/api/retention/run").status_code == 200

    runs = _runs(settings, "identity.override")
    assert [(r["state"], r["details"].get("action")) for r in runs] == [("FAIL", None), ("COMPLETE", "revoke"), ("COMPLETE", "create")]
    assert {r["details"]["override_id"] for r in runs[1:]} == {override_id} and runs[2]["details"]["kind"] == "remove_edge"
    assert runs[2]["counts"]["identity_overrides"] == 1 and runs[2]["counts"]["profiles"] >= 1
    assert runs[0]["error"] == "NotFoundError"  # the type only: the message would quote the identifier

    [record] = _runs(settings, "governance.consent_record")
    assert record["state"] == "COMPLETE" and record["counts"] == {"consent_log": 1}
    assert record["details"] == {"request_id": consent.json()["request_id"], "identifier_type": "user_id",
                                 "purposes": ["marketing"], "tcf": False}
    [sync] = _runs(settings, "governance.consent_sync")
    assert sync["details"]["consent_sync_id"] == synced.json()["sync_id"] and sync["counts"]["consent_syncs"] == 1
    # every job the API triggers leaves a run: resolution, matching and retention already did
    assert {"identity.resolve", "identity.match", "governance.retention"} <= {r["job"] for r in lineage.read_runs(settings.lineage_path)}

    text = settings.lineage_path.read_text("utf-8")
    for value in ("u-ann", "a-ann", "ann@example.com", "u-nobody-secret"):
        assert value not in text  # ids and counts only, never a person's identifier

    with server.api() as api:  # `refinery lineage identity_overrides` shows them
        trail = api.get("/api/lineage", params={"target": "identity_overrides"}).json()
    assert [r["job"] for r in trail["runs"]] == ["identity.override"] * 3 + ["identity.resolve"]
    with server.api() as api:
        consent_trail = api.get("/api/lineage", params={"target": "consent_log"}).json()
    assert {"governance.consent_record", "governance.consent_sync", "identity.resolve"} <= {r["job"] for r in consent_trail["runs"]}
