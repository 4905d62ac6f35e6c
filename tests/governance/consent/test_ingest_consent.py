"""Events from a person who denied analytics are stored as `analytics_denied_events` says."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from consent_tc_strings import RANGE

from refinery.governance.ingest_consent import ConsentGate, minimise
from refinery.identity import IdentityRules
from refinery.profiles.build import resolve_and_build
from refinery.profiles.policy import TraitPolicy
from refinery.runtime import Runtime
from refinery.settings import Settings
from support import event, write_events

PAGE = {"url": "https://shop.io/pricing?utm_source=mail", "referrer": "https://mail.example", "title": "Pricing"}
DENIED = {"consent": {"categoryPreferences": {"analytics": False, "marketing": True}}}


def _open(tmp_path: Path, mode: str) -> Runtime:
    rt = Runtime.open(Settings(data_dir=tmp_path / mode, admin_token="t", analytics_denied_events=mode))  # type: ignore[arg-type]
    if rt.events.gate is not None:
        rt.events.gate.refresh_seconds = 0  # the test reads the consent log at once
    return rt


@pytest.fixture
def minimising(tmp_path: Path) -> Iterator[Runtime]:
    rt = _open(tmp_path, "minimise")
    try:
        yield rt
    finally:
        rt.close()


def _stored(rt: Runtime, message_id: str) -> dict[str, Any]:
    [row] = rt.engine.fetch_dicts(
        "SELECT event, user_id, page_url AS url, ip, user_agent, CAST(properties AS VARCHAR) AS properties, CAST(traits AS VARCHAR) AS traits, "
        "CAST(context AS VARCHAR) AS context FROM events WHERE message_id = ?", [message_id], cursor=rt.engine.reader())
    for k in ("properties", "traits", "context"):
        row[k] = json.loads(row[k]) if row[k] is not None else None
    return row


def test_an_event_that_denies_analytics_keeps_only_type_name_time_identifiers_and_consent(minimising: Runtime) -> None:
    rt = minimising
    denied = event("track", userId="u1", event="Order Completed", properties={"total": 99, "sku": "A-1"},
                   context={**DENIED, "page": PAGE, "ip": "203.0.113.9", "userAgent": "Mozilla/5.0"})
    allowed = event("track", userId="u2", event="Order Completed", properties={"total": 12},
                    context={"consent": {"categoryPreferences": {"analytics": True}}, "page": PAGE, "ip": "203.0.113.9"})
    assert [o.status for o in write_events(rt, denied, allowed)] == ["loaded", "loaded"]

    kept = _stored(rt, denied["messageId"])
    assert kept["event"] == "Order Completed" and kept["user_id"] == "u1"
    assert kept["properties"] in (None, {}) and kept["url"] is None and kept["ip"] is None and kept["user_agent"] is None
    assert kept["context"]["consent"] == DENIED["consent"]
    assert kept["context"]["refinery"] == {"minimised": "analytics_denied:event_consent"}
    full = _stored(rt, allowed["messageId"])
    assert full["properties"] == {"total": 12} and full["url"] == PAGE["url"] and full["ip"]

    # The denial itself reaches the consent log, so it applies to the profile.
    rt.writer.call(lambda e: resolve_and_build(e, IdentityRules(), TraitPolicy()))
    states = rt.engine.fetch_all("SELECT subject_value, state FROM consent_log WHERE purpose = 'analytics' ORDER BY 1")
    assert states == [("u1", "denied"), ("u2", "granted")]


def test_a_person_who_denied_is_minimised_on_every_device_afterwards(minimising: Runtime) -> None:
    rt = minimising
    write_events(rt, event("identify", userId="u1", anonymousId="laptop", context=DENIED),
                 event("identify", userId="u1", anonymousId="phone"))
    rt.writer.call(lambda e: resolve_and_build(e, IdentityRules(), TraitPolicy()))
    # From the phone, with no consent in the event: the profile's denial applies.
    later = event("page", anonymousId="phone", properties={"path": "/pricing"}, context={"page": PAGE})
    stranger = event("page", anonymousId="someone-else", properties={"path": "/pricing"}, context={"page": PAGE})
    write_events(rt, later, stranger)
    assert _stored(rt, later["messageId"])["context"]["refinery"] == {"minimised": "analytics_denied:person_consent"}
    assert _stored(rt, stranger["messageId"])["properties"] == {"path": "/pricing"}


def test_a_tcf_string_without_the_analytics_purposes_counts_as_a_denial(minimising: Runtime) -> None:
    ev = event("track", userId="u9", event="Viewed", properties={"x": 1}, context={"consent": {"tcString": RANGE}})
    write_events(minimising, ev)
    assert _stored(minimising, ev["messageId"])["properties"] in (None, {})
    assert ConsentGate().reason({"context": {"gdpr_consent": "not a tc string"}}) is None  # a bad string decides nothing


def test_keep_stores_the_event_as_sent(tmp_path: Path) -> None:
    rt = _open(tmp_path, "keep")
    try:
        assert rt.events.gate is None
        ev = event("track", userId="u1", event="Order Completed", properties={"total": 99}, context={**DENIED, "page": PAGE})
        write_events(rt, ev)
        assert _stored(rt, ev["messageId"])["properties"] == {"total": 99}
    finally:
        rt.close()


def test_minimise_keeps_identifier_traits_and_drops_the_rest() -> None:
    out = minimise({"type": "identify", "userId": "u", "traits": {"email": "pii:email:" + "0" * 32, "plan": "pro", "age": 40},
                    "context": {"consent": {}, "location": {"city": "York"}, "traits": {"phone": "x", "name": "y"}}}, "event_consent")
    assert out["traits"] == {"email": "pii:email:" + "0" * 32}
    assert out["context"] == {"consent": {}, "traits": {"phone": "x"}, "refinery": {"minimised": "analytics_denied:event_consent"}}
