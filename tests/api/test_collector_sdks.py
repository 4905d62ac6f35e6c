"""The official SDKs, unmodified, pointed at a real collector: every call type lands in the zones.

segment-analytics-python posts `/v1/batch` with Basic auth ("key:"), writeKey and sentAt in the
body, optionally gzipped; rudder-sdk-python posts `/v1/batch` gzipped by default with Basic auth.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import rudderstack.analytics as rudder_analytics
import segment.analytics as segment_analytics
from collector_helpers import select, shared_server_fixture, uid

from support import WRITE_KEY, Server

srv = shared_server_fixture()


def _send_all(client: Any, user: str, anon: str, prefix: str, when: datetime) -> dict[str, str]:
    """Send one of each call type with explicit messageIds; returns messageId -> type."""
    ids = {f"{prefix}-{t}": t for t in ("identify", "track", "page", "screen", "group", "alias")}
    client.identify(user, {"email": "ada@example.com", "plan": "pro"}, message_id=f"{prefix}-identify", anonymous_id=anon)
    client.track(user, "Order Completed", {"revenue": 42.5, "currency": "EUR"}, message_id=f"{prefix}-track", timestamp=when)
    client.page(user, "Docs", "Getting Started", {"path": "/docs"}, message_id=f"{prefix}-page")
    client.screen(user, "Settings", "Profile", {"tab": "privacy"}, message_id=f"{prefix}-screen")
    client.group(user, "acme-inc", {"name": "Acme"}, message_id=f"{prefix}-group")
    client.alias(anon, user, message_id=f"{prefix}-alias")
    return ids


def _check_zones(server: Server, ids: dict[str, str], user: str, anon: str, when: datetime, library: str) -> None:
    rows = {
        r["message_id"]: r
        for r in select(server, "events", "message_id, type, user_id, event, name, group_id, previous_id, properties, traits, "
                        "library_name, timestamp, sent_at", user_id=user)
    }
    assert set(rows) == set(ids), f"missing {set(ids) - set(rows)}"
    for mid, call in ids.items():
        assert rows[mid]["type"] == call
        assert rows[mid]["library_name"] == library
        assert rows[mid]["sent_at"] is not None
    prefix = next(iter(ids)).rsplit("-", 1)[0]
    track = rows[f"{prefix}-track"]
    assert track["event"] == "Order Completed"
    assert orjson.loads(track["properties"]) == {"revenue": 42.5, "currency": "EUR"}
    # The SDK stamps `timestamp` on the client; with sentAt a moment later, skew correction keeps it.
    assert abs((datetime.fromisoformat(track["timestamp"]) - when).total_seconds()) < 5
    assert orjson.loads(rows[f"{prefix}-identify"]["traits"])["plan"] == "pro"
    assert rows[f"{prefix}-page"]["name"] == "Getting Started"
    assert rows[f"{prefix}-screen"]["name"] == "Profile"
    assert rows[f"{prefix}-group"]["group_id"] == "acme-inc"
    assert rows[f"{prefix}-alias"]["previous_id"] == anon
    assert select(server, "failed_events", "reason", source="web") == []


@pytest.fixture
def errors() -> list[Any]:
    return []


@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
def test_segment_client_every_call_type(srv: Server, errors: list[Any], gzip: bool) -> None:
    client = segment_analytics.Client(
        WRITE_KEY, host=srv.url, gzip=gzip, upload_interval=0.05, max_retries=2,
        on_error=lambda e, batch: errors.append(e),
    )
    user, anon = uid("user"), uid("anon")
    when = datetime.now(UTC) - timedelta(hours=2)
    ids = _send_all(client, user, anon, uid("seg"), when)
    client.flush()
    client.shutdown()
    assert errors == []
    _check_zones(srv, ids, user, anon, when, "analytics-python")


@pytest.fixture
def segment_module(srv: Server) -> Iterator[Any]:
    """The module-level API, as its README shows it; reset afterwards so other tests start clean."""
    segment_analytics.write_key = WRITE_KEY
    segment_analytics.host = srv.url
    segment_analytics.sync_mode = True
    segment_analytics.default_client = None
    try:
        yield segment_analytics
    finally:
        # shutdown() fails in sync mode (the SDK has no consumer threads to join); nothing is queued.
        segment_analytics.default_client = None
        segment_analytics.sync_mode = False


def test_segment_module_api_sync_mode(srv: Server, segment_module: Any) -> None:
    user, anon = uid("user"), uid("anon")
    when = datetime.now(UTC) - timedelta(minutes=10)
    prefix = uid("segmod")
    segment_module.identify(user, {"plan": "pro"}, message_id=f"{prefix}-identify", anonymous_id=anon)
    segment_module.track(user, "Order Completed", {"revenue": 42.5, "currency": "EUR"}, message_id=f"{prefix}-track", timestamp=when)
    segment_module.page(user, "Docs", "Getting Started", {"path": "/docs"}, message_id=f"{prefix}-page")
    segment_module.screen(user, "Settings", "Profile", {}, message_id=f"{prefix}-screen")
    segment_module.group(user, "acme-inc", {"name": "Acme"}, message_id=f"{prefix}-group")
    segment_module.alias(anon, user, message_id=f"{prefix}-alias")
    ids = {f"{prefix}-{t}": t for t in ("identify", "track", "page", "screen", "group", "alias")}
    _check_zones(srv, ids, user, anon, when, "analytics-python")


def test_segment_client_resend_is_deduplicated(srv: Server, errors: list[Any]) -> None:
    client = segment_analytics.Client(WRITE_KEY, host=srv.url, sync_mode=True, on_error=lambda e, b: errors.append(e))
    user, mid = uid("user"), uid()
    when = datetime.now(UTC)
    for _ in range(3):  # an app that retries a call with the same messageId and timestamp
        client.track(user, "Clicked", {"n": 1}, message_id=mid, timestamp=when)
    assert errors == []
    assert len(select(srv, "events", "message_id", message_id=mid)) == 1
    assert select(srv, "failed_events", "reason", message_id=mid) == []


def test_segment_client_sees_a_wrong_write_key(srv: Server) -> None:
    errors: list[Any] = []
    client = segment_analytics.Client("not-a-key", host=srv.url, max_retries=1, on_error=lambda e, b: errors.append(e))
    client.track("u", "E")
    client.flush()
    client.shutdown()
    assert len(errors) == 1
    assert getattr(errors[0], "status", None) == 401
    assert getattr(errors[0], "code", None) == "unauthorized"


@pytest.fixture
def rudder(srv: Server) -> Iterator[Any]:
    rudder_analytics.write_key = WRITE_KEY
    rudder_analytics.dataPlaneUrl = srv.url
    rudder_analytics.default_client = None
    try:
        yield rudder_analytics
    finally:
        rudder_analytics.shutdown()
        rudder_analytics.default_client = None


def test_rudder_sdk_every_call_type_gzipped(srv: Server, rudder: Any) -> None:
    errors: list[Any] = []
    rudder.on_error = lambda e, batch: errors.append(e)
    assert rudder.gzip is True, "rudder-sdk-python gzips by default; this test relies on it"
    user, anon = uid("user"), uid("anon")
    when = datetime.now(UTC) - timedelta(hours=1)
    prefix = uid("rud")
    rudder.identify(user, {"plan": "pro"}, message_id=f"{prefix}-identify", anonymous_id=anon)
    rudder.track(user, "Order Completed", {"revenue": 42.5, "currency": "EUR"}, message_id=f"{prefix}-track", timestamp=when)
    rudder.page(user, "Docs", "Getting Started", {"path": "/docs"}, message_id=f"{prefix}-page")
    rudder.screen(user, "Settings", "Profile", {}, message_id=f"{prefix}-screen")
    rudder.group(user, "acme-inc", {"name": "Acme"}, message_id=f"{prefix}-group")
    rudder.alias(anon, user, message_id=f"{prefix}-alias")
    rudder.flush()
    assert errors == []
    ids = {f"{prefix}-{t}": t for t in ("identify", "track", "page", "screen", "group", "alias")}
    _check_zones(srv, ids, user, anon, when, "analytics-python")
