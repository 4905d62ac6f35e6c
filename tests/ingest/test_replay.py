"""Replay: loads fixed events exactly once, folds failures into the original rows, never duplicates.

The in-process tests drive the real app (collector included) through Starlette's test client;
`test_replay_end_to_end` drives a real server with the real CLI.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from refinery.api.app import create_app
from refinery.ingest.replay import replay
from refinery.runtime import Runtime
from support import WRITE_KEY, Server

BASIC = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}
PLAN = {"type": "object", "required": ["total"], "properties": {"total": {"type": "number"}}}


@pytest.fixture
def app(runtime: Runtime) -> Iterator[TestClient]:
    runtime.plans.check_interval = 0
    with TestClient(create_app(runtime)) as client:
        yield client


def _write_plan(rt: Runtime, schema: dict[str, Any], event: str = "Order Completed") -> None:
    rt.settings.plans_dir.mkdir(parents=True, exist_ok=True)
    (rt.settings.plans_dir / f"{event}.json").write_text(json.dumps(schema))


def _track(client: TestClient, mid: str, total: Any, **extra: Any) -> dict[str, Any]:
    body = {"userId": "u1", "event": "Order Completed", "messageId": mid, "properties": {"total": total}, **extra}
    r = client.post("/v1/track", json=body, headers=BASIC)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _failed(rt: Runtime) -> list[tuple[Any, ...]]:
    return rt.engine.fetch_all(
        "SELECT message_id, reason, field, replay_status, replay_count FROM failed_events ORDER BY failure_id",
        cursor=rt.engine.reader(),
    )


def _clean_ids(rt: Runtime) -> list[str]:
    return [r[0] for r in rt.engine.fetch_all("SELECT message_id FROM events ORDER BY message_id", cursor=rt.engine.reader())]


def test_fixed_plan_loads_each_event_once(runtime: Runtime, app: TestClient) -> None:
    _write_plan(runtime, PLAN | {"properties": {"total": {"type": "number"}}})
    for i in range(3):
        assert _track(app, f"m{i}", str(i))["reason"] == "plan_violation"
    _track(app, "ok", 5)
    assert _clean_ids(runtime) == ["ok"]

    assert replay(runtime).to_dict()["failed_again"] == 3  # plan not fixed yet: still failing, counted
    assert [r[3:] for r in _failed(runtime)] == [("failed_again", 1)] * 3

    _write_plan(runtime, {"properties": {"total": {"type": ["number", "string"]}}})
    result = replay(runtime, chunk_size=2)  # chunks: each row is still seen exactly once
    assert (result.considered, result.loaded, result.failed_again, result.duplicate) == (3, 3, 0, 0)
    assert _clean_ids(runtime) == ["m0", "m1", "m2", "ok"]
    # The outcome is folded into the original rows: no new rows, the reason kept as history.
    assert _failed(runtime) == [(f"m{i}", "plan_violation", "/properties/total", "loaded", 2) for i in range(3)]

    again = replay(runtime)
    assert again.considered == 0 and _clean_ids(runtime) == ["m0", "m1", "m2", "ok"]


def test_an_unfixable_failure_stays_failed_with_a_count(runtime: Runtime, app: TestClient) -> None:
    out = _track(app, "bad-ts", 1, timestamp="yesterday-ish")
    assert out["reason"] == "invalid_timestamp"
    for n in (1, 2):
        result = replay(runtime)
        assert (result.considered, result.failed_again, result.reasons) == (1, 1, {"invalid_timestamp": 1})
        assert _failed(runtime) == [("bad-ts", "invalid_timestamp", "/timestamp", "failed_again", n)]
    assert _clean_ids(runtime) == []


def test_a_new_reason_replaces_the_old_one(runtime: Runtime, app: TestClient) -> None:
    _write_plan(runtime, PLAN)
    _track(app, "m1", "12", timestamp="not a time")
    assert _failed(runtime)[0][1] == "plan_violation"
    (runtime.settings.plans_dir / "Order Completed.json").unlink()
    replay(runtime)
    assert _failed(runtime) == [("m1", "invalid_timestamp", "/timestamp", "failed_again", 1)]


def test_a_reused_message_id_loads_only_the_first_event(runtime: Runtime, app: TestClient) -> None:
    _write_plan(runtime, PLAN)
    assert _track(app, "same", "1")["reason"] == "plan_violation"
    assert _track(app, "same", "2")["reason"] == "duplicate_message_id_conflict"
    _write_plan(runtime, {})
    result = replay(runtime)
    assert (result.loaded, result.failed_again, result.reasons) == (1, 1, {"duplicate_message_id_conflict": 1})
    assert _clean_ids(runtime) == ["same"]
    props = runtime.engine.fetch_all("SELECT properties->>'$.total' FROM events", cursor=runtime.engine.reader())
    assert props == [("1",)]
    # Replaying again: the conflict can never load (it needs its own messageId) and stays visible.
    result = replay(runtime)
    assert (result.considered, result.loaded, result.failed_again) == (1, 0, 1)
    assert _clean_ids(runtime) == ["same"]


def test_an_event_already_clean_is_marked_duplicate(runtime: Runtime, app: TestClient) -> None:
    _write_plan(runtime, PLAN)
    _track(app, "m1", "1")
    # The same messageId got clean some other way (e.g. a corrected re-import).
    runtime.writer.call(lambda e: e.execute(
        "INSERT INTO events (message_id, source, type, event, user_id, timestamp, received_at, loaded_at) "
        "VALUES ('m1', 'web', 'track', 'Order Completed', 'u1', now(), now(), now())"
    ))
    _write_plan(runtime, {})
    result = replay(runtime)
    assert (result.loaded, result.duplicate) == (0, 1)
    assert _clean_ids(runtime) == ["m1"]
    assert _failed(runtime)[0][3] == "duplicate"


def test_filters_and_limit(runtime: Runtime, app: TestClient) -> None:
    _write_plan(runtime, PLAN)
    for i in range(4):
        _track(app, f"m{i}", "x")
    _track(app, "ts", 1, timestamp="nope")
    _write_plan(runtime, {})
    assert replay(runtime, reason="invalid_timestamp").considered == 1
    assert replay(runtime, source="other").considered == 0
    assert replay(runtime, limit=3, reason="plan_violation").loaded == 3
    assert replay(runtime).loaded == 1
    assert _clean_ids(runtime) == ["m0", "m1", "m2", "m3"]


# --- end to end: a real server, plan files edited while it runs, the real CLI ------------------------

def _cli(server: Server, *args: str) -> Any:
    env = {**os.environ, "REFINERY_DATA_DIR": str(server.data_dir), "REFINERY_ADMIN_TOKEN": server.admin_token}
    out = subprocess.run(
        [sys.executable, "-m", "refinery", *args, "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _send(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    import httpx

    r = httpx.post(server.url + "/v1/track", json={"userId": "u1", **body}, headers=server.basic, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _wait_for(condition: Any, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_replay_end_to_end(server: Server) -> None:
    plans_dir = server.data_dir / "tracking-plans"
    plans_dir.mkdir()
    (plans_dir / "Order Completed.json").write_text(json.dumps(PLAN))
    # The server re-reads the folder within a second: send until the plan is in force.
    sent = iter(range(100))
    first = _wait_for(
        lambda: (r := _send(server, {"event": "Order Completed", "messageId": f"v{next(sent)}", "properties": {"total": "12"}})).get("quarantined") and r
    )
    assert first["reason"] == "plan_violation" and first["field"] == "/properties/total"
    quarantined_id = f"v{next(sent) - 1}"
    _send(server, {"event": "Order Completed", "messageId": "late", "properties": {"total": 1}, "timestamp": "not-a-time"})

    failed = {r["message_id"]: r for r in _cli(server, "events", "failed")}
    row = failed[quarantined_id]
    assert (row["stage"], row["reason"], row["field"]) == ("plan", "plan_violation", "/properties/total")
    assert "rule 'type'" in row["message"]
    assert failed["late"]["reason"] == "invalid_timestamp"

    (plans_dir / "Order Completed.json").write_text(json.dumps({"properties": {"total": {"type": ["number", "string"]}}}))
    time.sleep(1.2)
    result = _cli(server, "events", "replay")
    assert result["loaded"] == 1 and result["failed_again"] == 1 and result["reasons"] == {"invalid_timestamp": 1}

    again = _cli(server, "events", "replay")
    assert (again["loaded"], again["failed_again"]) == (0, 1)
    counts = {r["message_id"]: r["n"] for r in _cli(server, "query", "SELECT message_id, count(*) AS n FROM events GROUP BY 1")}
    assert counts[quarantined_id] == 1 and "late" not in counts
    late = [r for r in _cli(server, "events", "failed") if r["message_id"] == "late"]
    assert late[0]["replay_status"] == "failed_again" and late[0]["replay_count"] == 2

    # Unplanned events: quarantine per source, then accept and replay.
    _cli(server, "sources", "set", "web", "--unplanned", "quarantine")
    out = _send(server, {"event": "Brand New", "messageId": "u-1", "properties": {}})
    assert out["reason"] == "unplanned_event"
    _cli(server, "sources", "set", "web", "--unplanned", "accept")
    assert _cli(server, "events", "replay", "--reason", "unplanned_event")["loaded"] == 1
    assert _cli(server, "query", "SELECT count(*) AS n FROM events WHERE message_id = 'u-1'") == [{"n": 1}]
