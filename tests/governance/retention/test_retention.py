"""Retention on a real store: exactly the expired rows go (per zone, per source), what hangs off them
goes too, counts are recorded and audited, a dry run changes nothing, batches are bounded."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from retention_helpers import count, write_at

from refinery.governance import audit, retention
from refinery.governance.principal import local_principal
from refinery.profiles.build import resolve_and_build
from refinery.profiles.policy import TraitPolicy
from refinery.runtime import Runtime
from refinery.settings import Settings
from support import WRITE_KEY

NOW = datetime.now(UTC).replace(microsecond=0)
TABLES = ("raw_events", "events", "event_profiles", "failed_events", "message_ids", "profiles", "identities",
          "audit_log", "retention_runs", "retention_overrides")


@pytest.fixture
def rt(tmp_path: Path) -> Runtime:
    settings = Settings(data_dir=tmp_path / "data", admin_token="x", retention_batch_rows=100)
    runtime = Runtime.open(settings)
    runtime.writer.call(lambda e: runtime.sources.create(e, "web", write_key=WRITE_KEY))
    runtime.writer.call(lambda e: runtime.sources.create(e, "crm", kind="import"))
    yield runtime
    runtime.close()


def _world(rt: Runtime) -> dict[str, list[str]]:
    """Events received 400 days ago (past every default), 40 days ago (raw expired, events kept) and
    2 days ago (everything kept), on two sources; identities resolved so event_profiles exist."""
    ids = {
        "old": write_at(rt, NOW - timedelta(days=400), 150, prefix="old"),          # > batch size: several batches
        "mid": write_at(rt, NOW - timedelta(days=40), 20, prefix="mid"),
        "crm_mid": write_at(rt, NOW - timedelta(days=40), 10, source="crm", prefix="crm"),
        "new": write_at(rt, NOW - timedelta(days=2), 5, prefix="new"),
    }
    rt.writer.call(lambda e: resolve_and_build(e, _rules(rt), TraitPolicy.from_settings(rt.settings)))
    return ids


def _rules(rt: Runtime):  # type: ignore[no-untyped-def]
    from refinery.identity import rules_from_settings

    return rules_from_settings(rt.settings)


def _snapshot(rt: Runtime) -> dict[str, int]:
    return {t: count(rt, f"SELECT count(*) FROM {t}") for t in TABLES}  # noqa: S608 - constant names


def _ids(rt: Runtime, table: str) -> set[str]:
    return {r[0] for r in rt.engine.fetch_all(f"SELECT message_id FROM {table}", cursor=rt.engine.reader())}  # noqa: S608


def test_exactly_the_expired_rows_go_and_the_run_is_recorded_and_audited(rt: Runtime) -> None:
    ids = _world(rt)
    assert count(rt, "SELECT count(*) FROM event_profiles") == 185
    report = retention.run(rt.engine, rt.writer, rt.settings, local_principal(), as_of=NOW)

    everything = set().union(*ids.values())
    kept_events = set(ids["mid"]) | set(ids["crm_mid"]) | set(ids["new"])
    assert _ids(rt, "events") == kept_events                       # 395 days: only the 400-day-old go
    assert _ids(rt, "event_profiles") == kept_events               # and what hangs off them
    assert _ids(rt, "raw_events") == set(ids["new"])               # 30 days: 400- and 40-day-old go
    assert _ids(rt, "message_ids") == set(ids["new"])              # the 7-day dedup window, reused
    assert everything >= _ids(rt, "events")
    assert report.status == "completed" and not report.dry_run
    assert report.counts == {"raw_events": 180, "raw_files": 0, "events": 150, "event_profiles": 150,
                             "failed_events": 0, "failed_resolved": 0, "message_ids": 180}

    (row,) = retention.runs(rt.engine)
    assert row["run_id"] == report.run_id and row["counts"] == report.counts and row["trigger"] == "cli"
    assert row["policy"]["defaults"] == {"raw": 30, "events": 395, "failed": 90, "failed_resolved": 7}
    entry = audit.entries(rt.engine)[-1]
    assert entry.action == "retention.run" and entry.object == f"retention_run:{report.run_id}"
    assert entry.actor_id == "local" and entry.details["events"] == 150 and entry.details["raw_events"] == 180
    assert audit.verify(rt.engine).ok

    again = retention.run(rt.engine, rt.writer, rt.settings, local_principal(), as_of=NOW)
    assert sum(again.counts.values()) == 0                        # nothing left to delete
    assert len(retention.runs(rt.engine)) == 2


def test_a_dry_run_counts_what_a_run_deletes_and_changes_nothing(rt: Runtime) -> None:
    _world(rt)
    before = _snapshot(rt)
    head = audit.verify(rt.engine).head_seq
    dry = retention.run(rt.engine, rt.writer, rt.settings, local_principal(), dry_run=True, as_of=NOW)
    assert _snapshot(rt) == before and audit.verify(rt.engine).head_seq == head
    assert dry.dry_run and dry.counts["events"] == 150 and dry.counts["raw_events"] == 180
    real = retention.run(rt.engine, rt.writer, rt.settings, local_principal(), as_of=NOW)
    assert dry.counts == real.counts


def test_a_source_keeps_its_own_days(rt: Runtime) -> None:
    ids = _world(rt)
    rt.writer.call(lambda e: retention.set_override(e, "crm", "events", 30, actor="t", known_sources=["web", "crm"]))
    rt.writer.call(lambda e: retention.set_override(e, "web", "raw", 0, actor="t", known_sources=["web", "crm"]))
    report = retention.run(rt.engine, rt.writer, rt.settings, local_principal(), as_of=NOW)
    # crm's 40-day-old events are past its 30 days; web's are not; web keeps its raw zone forever
    assert _ids(rt, "events") == set(ids["mid"]) | set(ids["new"])
    assert _ids(rt, "raw_events") == set(ids["old"]) | set(ids["mid"]) | set(ids["new"])
    assert report.counts["events"] == 160 and report.counts["raw_events"] == 10
    assert report.policy["overrides"] == {"crm": {"events": 30}, "web": {"raw": 0}}
    with pytest.raises(retention.RetentionError):
        retention.set_override(rt.engine, "web", "everything", 3, actor="t", known_sources=["web"])
    with pytest.raises(retention.UnknownSource):
        retention.set_override(rt.engine, "nope", "raw", 3, actor="t", known_sources=["web"])


def test_zero_keeps_forever_and_the_newest_raw_row_stays(rt: Runtime) -> None:
    old = write_at(rt, NOW - timedelta(days=400), 3, prefix="old")
    settings = rt.settings.model_copy(update={"retention_events_days": 0})
    report = retention.run(rt.engine, rt.writer, settings, local_principal(), as_of=NOW)
    assert _ids(rt, "events") == set(old)
    # ingest allocates raw ids from max(raw_id): the newest raw row is kept until a newer one arrives
    assert _ids(rt, "raw_events") == {old[-1]} and report.counts["raw_events"] == 2


def test_quarantined_events_pending_and_resolved(rt: Runtime) -> None:
    import base64

    from starlette.testclient import TestClient

    from refinery.api.app import create_app
    from refinery.ingest import replay

    rt.plans.check_interval = 0
    rt.settings.plans_dir.mkdir(parents=True, exist_ok=True)
    plan = rt.settings.plans_dir / "Order Completed.json"
    plan.write_text(json.dumps({"type": "object", "required": ["total"], "properties": {"total": {"type": "number"}}}))
    basic = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}
    with TestClient(create_app(rt)) as client:
        for i in range(4):  # break the plan: quarantined, and loaded by a replay once the plan is fixed
            body = {"userId": f"p{i}", "event": "Order Completed", "messageId": f"bad-{i}", "properties": {"total": "12"}}
            assert client.post("/v1/track", json=body, headers=basic).status_code == 200
        body = {"event": "Order Completed", "messageId": "no-id", "properties": {"total": 1}}  # no userId: stays quarantined
        assert client.post("/v1/batch", json={"batch": [{"type": "track", **body}]}, headers=basic).status_code == 200
    assert count(rt, "SELECT count(*) FROM failed_events") == 5
    plan.write_text(json.dumps({"type": "object"}))
    rt.plans.check_interval = 0
    done = replay.replay(rt, source="web")
    resolved = count(rt, "SELECT count(*) FROM failed_events WHERE replay_status IN ('loaded', 'duplicate')")
    assert resolved == 4, done.to_dict()

    # 8 days later: resolved ones (7 days) go, the pending one (90 days) stays; 91 days later it goes too
    week = retention.run(rt.engine, rt.writer, rt.settings, local_principal(), as_of=datetime.now(UTC) + timedelta(days=8))
    assert week.counts["failed_resolved"] == 4 and week.counts["failed_events"] == 0
    assert count(rt, "SELECT count(*) FROM failed_events") == 1
    quarter = retention.run(rt.engine, rt.writer, rt.settings, local_principal(), as_of=datetime.now(UTC) + timedelta(days=91))
    assert quarter.counts["failed_events"] == 1 and count(rt, "SELECT count(*) FROM failed_events") == 0


def test_raw_files_go_when_old_and_unused(rt: Runtime) -> None:
    from refinery.ingest.importer import run_import
    from refinery.ingest.mapping import load_mapping_file

    data = Path(__file__).resolve().parents[2] / "ingest" / "data"
    job = run_import(rt, data / "crm_contacts.csv", source="crm", mapping=load_mapping_file(data / "crm_contacts.yaml"))
    stored = Path(job.stored_path or "")
    assert stored.exists()
    orphan = rt.settings.raw_files_dir / ".incoming-left-by-a-crash"
    orphan.write_bytes(b"x")
    old = (NOW - timedelta(days=60)).timestamp()
    import os

    os.utime(orphan, (old, old))
    os.utime(stored, (old, old))  # the file is old, but its import started today: kept
    report = retention.run(rt.engine, rt.writer, rt.settings, local_principal(), as_of=NOW)
    assert stored.exists() and not orphan.exists() and report.counts["raw_files"] == 1
    later = retention.run(rt.engine, rt.writer, rt.settings, local_principal(), as_of=datetime.now(UTC) + timedelta(days=31))
    assert not stored.exists() and later.counts["raw_files"] == 1


def test_the_scheduled_job_runs_when_due_as_the_system(rt: Runtime) -> None:
    assert retention.due(rt.engine, rt.settings)
    report = retention.run_if_due(rt.engine, rt.writer, rt.settings)
    assert report is not None and report.trigger == "scheduled" and report.actor == "system:retention"
    assert audit.entries(rt.engine)[-1].actor_id == "system"
    assert not retention.due(rt.engine, rt.settings)             # not again within the interval
    assert retention.run_if_due(rt.engine, rt.writer, rt.settings) is None
    assert retention.due(rt.engine, rt.settings, now=datetime.now(UTC) + timedelta(hours=25))
    off = rt.settings.model_copy(update={"retention_interval_hours": 0})
    assert not retention.due(rt.engine, off, now=datetime.now(UTC) + timedelta(days=9))
