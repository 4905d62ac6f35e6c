"""Real-time segments in a running `refinery serve` (identity_incremental on): events sent with the
official Segment SDK are attributed by the identity follower, the real-time tail (`realtime.Follower`)
feeds them to the evaluator, and `record` writes the member's stay and the `segment_events` outbox
rows: the member enters within seconds of the event, and leaves when the window slides past it,
at exactly the moment it does."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import segment.analytics as analytics

from support import WRITE_KEY, start_server


def _until(check: Callable[[], Any], seconds: float) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    return check()


def test_a_member_enters_on_its_event_and_leaves_when_the_window_slides(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # the scheduled membership job off: every stay below is written by the real-time tail
    server = start_server(data_dir, env={"REFINERY_IDENTITY_INCREMENTAL": "true", "REFINERY_SEGMENTS_INTERVAL_MINUTES": "0"})
    try:
        with server.api() as api:
            assert api.post("/api/sources", json={"name": "web", "write_key": WRITE_KEY}).status_code == 201
            client = analytics.Client(server.write_key, host=server.url, sync_mode=True)
            # an old sign-in makes the event known to the catalog; it is outside the window
            client.track(user_id="old-timer", event="Signed In", timestamp=datetime.now(UTC) - timedelta(days=1))
            client.flush()
            assert _until(lambda: api.get("/api/profiles", params={"identifier": "user_id:old-timer"}).status_code == 200, 20)

            made = api.post("/api/segments", json={"name": "just_signed_in", "rule": "performed 'Signed In' in last 3 seconds"})
            assert made.status_code == 201, made.text
            assert made.json()["run"]["runs"][0]["entered"] == 0
            time.sleep(1.5)  # the tail sees the new definition at its next poll (every 0.5 s)

            client.track(user_id="alice", event="Signed In", properties={"method": "google"})
            client.flush()
            sent = time.monotonic()
            profile = _until(lambda: api.get("/api/profiles", params={"identifier": "user_id:alice"}).json().get("profile_id"), 20)
            assert profile

            def members() -> list[str]:
                r = api.get("/api/segments/just_signed_in/members")
                assert r.status_code == 200, r.text
                return [m["profile_id"] for m in r.json()["members"]]

            assert _until(lambda: members() == [profile], 10), members()
            entered_after = time.monotonic() - sent
            assert _until(lambda: members() == [], 10), members()
            left_after = time.monotonic() - sent
    finally:
        server.stop()
    assert entered_after < 3  # within the window: the tail followed the event, not a scheduled run
    assert left_after >= 2  # not before the window slid (the event was sent before `sent`)

    from refinery.runtime import Runtime
    from refinery.settings import Settings

    rt = Runtime.open(Settings(data_dir=data_dir, admin_token="t"))
    try:
        engine = rt.engine
        [(ts, received)] = engine.fetch_all("SELECT timestamp, received_at FROM events WHERE user_id = 'alice'")
        outbox = engine.fetch_all("SELECT kind, profile_id, occurred_at, run_id FROM segment_events "
                                  "WHERE segment = 'just_signed_in' ORDER BY event_id")
        stays = engine.fetch_all("SELECT profile_id, entered_at, exited_at, entered_run, exited_run FROM segment_members "
                                 "WHERE segment = 'just_signed_in'")
    finally:
        rt.close()
    assert [(k, p, r) for k, p, _, r in outbox] == [("segment_entered", profile, "realtime"), ("segment_exited", profile, "realtime")]
    entered_at, exited_at = outbox[0][2], outbox[1][2]
    assert received <= entered_at < exited_at
    assert exited_at == ts + timedelta(seconds=3)  # the moment the event left `in last 3 seconds`, to the microsecond
    assert stays == [(profile, entered_at, exited_at, "realtime", "realtime")]
