"""Device signals over the clean events table: shared IP + user agent close in time, scored low, NAT-guarded."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from refinery.identity.matching import (
    DEVICE_SIGNAL,
    DeviceSignalConfig,
    MatchingError,
    device_signal_links,
    save_links,
)
from refinery.ingest.protocol import Limits, stage
from refinery.ingest.store import IngestItem
from refinery.runtime import Runtime

T0 = datetime(2026, 2, 2, 9, 0, tzinfo=UTC)
PHONE = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148 Safari/604.1"
DESKTOP = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/122.0 Safari/537.36"


def event(anonymous_id: str | None, ip: str, ua: str, at: datetime, device_id: str | None = None) -> dict[str, Any]:
    """A Segment `page` call as a browser or app sends it."""
    context: dict[str, Any] = {"ip": ip, "userAgent": ua}
    if device_id:
        context["device"] = {"id": device_id}
    body: dict[str, Any] = {"type": "page", "messageId": uuid.uuid4().hex, "timestamp": at.isoformat(), "context": context}
    if anonymous_id:
        body["anonymousId"] = anonymous_id
    return body


def load(rt: Runtime, events: list[dict[str, Any]]) -> None:
    """Through the real staging and cleaning path, into the clean `events` table."""
    staged = stage("batch", {"batch": events}, Limits())
    items = [IngestItem("web", "req", datetime.now(UTC), s) for s in staged]
    outcomes = rt.writer.call(lambda e: rt.events.write(e, items))
    assert all(o.status == "loaded" for o in outcomes), outcomes


def pairs(table) -> dict[tuple[str, str], dict[str, object]]:  # type: ignore[no-untyped-def]
    return {(r["a_value"], r["b_value"]): r for r in table.to_pylist()}


def test_a_cleared_cookie_on_the_same_phone_is_linked_with_low_confidence(runtime: Runtime) -> None:
    home = "192.0.2.10"
    load(runtime, [
        event("cookie-1", home, PHONE, T0),
        event("cookie-1", home, PHONE, T0 + timedelta(minutes=12)),
        event("cookie-2", home, PHONE, T0 + timedelta(minutes=20)),  # cookies cleared: a new anonymous id, same phone
        event("laptop", home, DESKTOP, T0 + timedelta(minutes=15)),  # same house, other browser: no link
        event("cookie-9", home, PHONE, T0 + timedelta(hours=6)),  # same phone model, hours later: no link
    ])  # fmt: skip
    found = pairs(device_signal_links(runtime.engine, now=T0))
    assert set(found) == {("cookie-1", "cookie-2")}
    link = found[("cookie-1", "cookie-2")]
    assert link["method"] == DEVICE_SIGNAL and link["model_version"] == DeviceSignalConfig().model_version
    # cap 0.6 * (1 - 0.5 ** 1 day together) * 2 / 4 devices seen on that IP that day
    assert link["score"] == pytest.approx(0.15)
    evidence = json.loads(str(link["evidence"]))
    assert evidence["days_together"] == 1 and evidence["closest_seconds"] == 480.0
    assert home not in str(link["evidence"]) and "iPhone" not in str(link["evidence"])  # no IP or user agent in evidence


def test_more_days_together_score_higher_but_never_above_the_cap(runtime: Runtime) -> None:
    ip = "198.51.100.7"
    load(runtime, [e for d in range(6) for e in (
        event("a1", ip, DESKTOP, T0 + timedelta(days=d)),
        event("a2", ip, DESKTOP, T0 + timedelta(days=d, minutes=5)),
    )])  # fmt: skip
    link = pairs(device_signal_links(runtime.engine))[("a1", "a2")]
    assert json.loads(str(link["evidence"]))["days_together"] == 6
    assert 0.55 < link["score"] <= 0.6
    capped = pairs(device_signal_links(runtime.engine, DeviceSignalConfig(score_cap=0.4)))[("a1", "a2")]
    assert capped["score"] <= 0.4 and capped["model_version"] != link["model_version"]


def test_an_ip_shared_by_many_devices_links_nothing(runtime: Runtime) -> None:
    office = "203.0.113.50"
    load(runtime, [event(f"desk-{i}", office, DESKTOP, T0 + timedelta(minutes=i)) for i in range(8)])
    assert device_signal_links(runtime.engine).num_rows == 0  # eight browsers of one make behind one NAT
    assert device_signal_links(runtime.engine, DeviceSignalConfig(max_devices_per_ip=10)).num_rows == 28  # the guard is what stops it


def test_ids_sent_together_are_left_to_the_deterministic_graph(runtime: Runtime) -> None:
    ip = "192.0.2.99"
    load(runtime, [
        event("app-anon", ip, PHONE, T0, device_id="dev-1"),  # one event carries both: an edge, not a signal
        event("web-anon", ip, PHONE, T0 + timedelta(minutes=3)),
    ])  # fmt: skip
    found = pairs(device_signal_links(runtime.engine))
    assert ("app-anon", "dev-1") not in found
    assert ("app-anon", "web-anon") in found
    assert ("web-anon", "dev-1") in found  # the app's device id and the browser cookie on the same phone
    assert all(r["score"] <= 0.6 for r in found.values())


def test_device_links_are_written_and_rewritten_idempotently(runtime: Runtime) -> None:
    home = "192.0.2.10"
    load(runtime, [event("c1", home, PHONE, T0), event("c2", home, PHONE, T0 + timedelta(minutes=10))])
    config = DeviceSignalConfig()
    first = save_links(runtime.writer, device_signal_links(runtime.engine, config, now=T0), method=DEVICE_SIGNAL, model_version=config.model_version)
    again = save_links(runtime.writer, device_signal_links(runtime.engine, config), method=DEVICE_SIGNAL, model_version=config.model_version)
    assert (first.inserted, again.inserted, again.refreshed, again.superseded, again.active) == (1, 0, 0, 0, 1)


def test_a_cap_above_the_device_ceiling_is_refused() -> None:
    with pytest.raises(MatchingError, match="0.6"):
        DeviceSignalConfig(score_cap=0.9)
    with pytest.raises(MatchingError, match="at least 2"):
        DeviceSignalConfig(max_devices_per_ip=1)
