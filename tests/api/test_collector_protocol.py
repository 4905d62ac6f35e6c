"""The collector speaks Segment's HTTP Tracking API: paths, write-key auth, envelopes, gzip, CORS,
dedup, rate limits, health and metrics, all against a real server on loopback."""

from __future__ import annotations

import gzip
import time
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest
from collector_helpers import (
    assert_healthy,
    basic,
    events_with,
    failed_with,
    metric,
    metrics_text,
    post,
    raw_with,
    select,
    shared_server_fixture,
    uid,
)

from support import WRITE_KEY, Server

srv = shared_server_fixture()

CALLS = {
    "identify": {"traits": {"plan": "pro"}},
    "track": {"event": "Order Completed", "properties": {"total": 12.5}},
    "page": {"name": "Home", "properties": {"path": "/"}},
    "screen": {"name": "Settings"},
    "group": {"groupId": "g-1", "traits": {"name": "Acme"}},
    "alias": {"previousId": "anon-1"},
}


@pytest.mark.parametrize("call", list(CALLS))
def test_each_call_type_is_stored_in_events(srv: Server, call: str) -> None:
    mid, user = uid(), uid("u")
    r = post(srv, f"/v1/{call}", {"userId": user, "messageId": mid, **CALLS[call]})
    assert r.status_code == 200, r.text
    assert r.json()["success"] is True
    rows = events_with(srv, mid, "type, user_id, event, name, group_id, previous_id")
    assert len(rows) == 1
    row = rows[0]
    assert (row["type"], row["user_id"]) == (call, user)
    if call == "track":
        assert row["event"] == "Order Completed"
    if call in ("page", "screen"):
        assert row["name"] == CALLS[call]["name"]
    if call == "group":
        assert row["group_id"] == "g-1"
    if call == "alias":
        assert row["previous_id"] == "anon-1"


@pytest.mark.parametrize("path", ["/v1/batch", "/v1/import"])
def test_batch_and_import_store_every_item(srv: Server, path: str) -> None:
    ids = [uid() for _ in range(3)]
    batch = [
        {"type": "identify", "userId": "u-b", "messageId": ids[0], "traits": {"a": 1}},
        {"type": "track", "anonymousId": "a-b", "event": "Clicked", "messageId": ids[1]},
        {"type": "page", "userId": "u-b", "name": "Docs", "messageId": ids[2]},
    ]
    r = post(srv, path, {"batch": batch})
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 3
    for mid, item in zip(ids, batch, strict=True):
        assert [row["type"] for row in events_with(srv, mid, "type")] == [item["type"]]


# --- write-key auth -------------------------------------------------------------------------

@pytest.mark.parametrize("colon", [True, False], ids=["with-colon", "without-colon"])
def test_basic_auth_with_and_without_trailing_colon(srv: Server, colon: bool) -> None:
    mid = uid()
    r = post(srv, "/v1/track", {"userId": "u", "event": "E", "messageId": mid}, headers=basic(WRITE_KEY, colon))
    assert r.status_code == 200, r.text
    assert len(events_with(srv, mid)) == 1


def test_write_key_in_the_body(srv: Server) -> None:
    mid = uid()
    r = post(srv, "/v1/track", {"writeKey": WRITE_KEY, "userId": "u", "event": "E", "messageId": mid}, headers={})
    assert r.status_code == 200, r.text
    rows = raw_with(srv, mid)
    assert len(rows) == 1
    assert "writeKey" not in orjson.loads(rows[0]["payload"]), "the write key must not be stored with the event"


@pytest.mark.parametrize(
    "headers,body_key",
    [
        (basic("wrong-key"), None),
        ({}, None),
        ({}, "wrong-key"),
        ({"Authorization": "Basic !!!not-base64"}, None),
        ({"Authorization": "Basic " + "Og=="}, None),  # ":" -> empty user name
    ],
    ids=["wrong-basic", "missing", "wrong-body-key", "garbled-basic", "empty-user"],
)
def test_wrong_or_missing_write_key_is_401(srv: Server, headers: dict[str, str], body_key: str | None) -> None:
    mid = uid()
    body = {"userId": "u", "event": "E", "messageId": mid}
    if body_key:
        body["writeKey"] = body_key
    r = post(srv, "/v1/track", body, headers=headers)
    assert r.status_code == 401, r.text
    err = r.json()
    assert err["error"] == "unauthorized" and err["fix"]
    assert events_with(srv, mid) == []


def test_disabled_source_is_403_and_enabling_restores_it(srv: Server) -> None:
    with srv.api() as api:
        key = api.post("/api/sources", json={"name": "disabled-src"}).json()["write_key"]
        mid = uid()
        assert post(srv, "/v1/track", {"userId": "u", "event": "E", "messageId": mid}, headers=basic(key)).status_code == 200
        assert api.patch("/api/sources/disabled-src", json={"enabled": False}).status_code == 200
        r = post(srv, "/v1/track", {"userId": "u", "event": "E", "messageId": uid()}, headers=basic(key))
        assert r.status_code == 403, r.text
        assert "disabled" in r.json()["message"]
        assert api.patch("/api/sources/disabled-src", json={"enabled": True}).status_code == 200
    assert post(srv, "/v1/track", {"userId": "u", "event": "E", "messageId": uid()}, headers=basic(key)).status_code == 200


# --- Segment's rules -------------------------------------------------------------------------

def test_message_id_is_assigned_when_absent(srv: Server) -> None:
    user = uid("u")
    r = post(srv, "/v1/track", {"userId": user, "event": "No Id"})
    assert r.status_code == 200, r.text
    rows = select(srv, "events", "message_id", user_id=user)
    assert len(rows) == 1 and len(rows[0]["message_id"]) >= 32


def test_batch_envelope_is_merged_into_each_item(srv: Server) -> None:
    a, b = uid(), uid()
    body = {
        "batch": [
            {"type": "track", "userId": "u", "event": "A", "messageId": a, "context": {"locale": "fr-FR"}},
            {"type": "track", "userId": "u", "event": "B", "messageId": b},
        ],
        "context": {"library": {"name": "my-lib", "version": "1"}, "locale": "en-US"},
        "integrations": {"All": False},
        "sentAt": datetime.now(UTC).isoformat(),
    }
    assert post(srv, "/v1/batch", body).status_code == 200
    ra, rb = events_with(srv, a, "library_name, locale, sent_at, context")[0], events_with(srv, b, "library_name, locale, sent_at")[0]
    assert ra["library_name"] == rb["library_name"] == "my-lib"
    assert ra["locale"] == "fr-FR", "the item's own context wins over the envelope's"
    assert rb["locale"] == "en-US"
    assert ra["sent_at"] is not None and rb["sent_at"] is not None
    raw = raw_with(srv, b)[0]
    assert "library" not in orjson.loads(raw["payload"]).get("context", {}), "raw keeps the item as received"
    assert orjson.loads(raw["envelope"])["integrations"] == {"All": False}


def test_gzip_request_body(srv: Server) -> None:
    mid = uid()
    data = gzip.compress(orjson.dumps({"batch": [{"type": "track", "userId": "u", "event": "Zipped", "messageId": mid}]}))
    r = post(srv, "/v1/batch", content=data, headers={**srv.basic, "Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert events_with(srv, mid, "event") == [{"event": "Zipped"}]


@pytest.mark.parametrize("short,call", [("t", "track"), ("i", "identify"), ("p", "page"), ("s", "screen"), ("g", "group"), ("a", "alias")])
def test_analytics_js_short_paths_with_text_plain_and_cors(srv: Server, short: str, call: str) -> None:
    mid = uid()
    body = {"writeKey": WRITE_KEY, "type": call, "userId": "u", "messageId": mid, **CALLS[call]}
    r = httpx.post(
        f"{srv.url}/v1/{short}", content=orjson.dumps(body),
        headers={"Content-Type": "text/plain", "Origin": "https://shop.example"}, timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == "*"
    assert [row["type"] for row in events_with(srv, mid, "type")] == [call]


def test_short_batch_path(srv: Server) -> None:
    mid = uid()
    body = {"writeKey": WRITE_KEY, "batch": [{"type": "track", "userId": "u", "event": "E", "messageId": mid}]}
    r = httpx.post(f"{srv.url}/v1/b", content=orjson.dumps(body), headers={"Content-Type": "text/plain"}, timeout=10)
    assert r.status_code == 200, r.text
    assert len(events_with(srv, mid)) == 1


@pytest.mark.parametrize("path", ["/v1/t", "/v1/track", "/v1/batch"])
def test_options_preflight(srv: Server, path: str) -> None:
    r = httpx.options(
        srv.url + path,
        headers={"Origin": "https://shop.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type, authorization"},
        timeout=10,
    )
    assert r.status_code in (200, 204)
    assert r.headers["access-control-allow-origin"] == "*"
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed = r.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed


def test_collector_paths_with_other_methods_and_the_rest_of_the_app_still_route(srv: Server) -> None:
    """The server hands POST/OPTIONS on collector paths straight to the collector; everything else
    still goes through the application's routing."""
    assert httpx.get(srv.url + "/v1/track", timeout=10).status_code == 405
    assert httpx.post(srv.url + "/v1/nope", content=b"{}", timeout=10).status_code == 404
    assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
    with srv.api() as api:
        assert api.get("/api/sources").status_code == 200


def test_errors_carry_cors_headers_so_browsers_can_read_them(srv: Server) -> None:
    r = post(srv, "/v1/track", {"userId": "u", "event": "E"}, headers={"Origin": "https://shop.example"})
    assert r.status_code == 401
    assert r.headers["access-control-allow-origin"] == "*"


# --- dedup ----------------------------------------------------------------------------------

def test_duplicates_inside_one_batch_are_stored_once(srv: Server) -> None:
    mid = uid()
    item = {"type": "track", "userId": "u", "event": "E", "messageId": mid}
    r = post(srv, "/v1/batch", {"batch": [item, dict(item), dict(item)]})
    assert r.status_code == 200, r.text
    assert (r.json()["accepted"], r.json()["duplicates"]) == (1, 2)
    assert len(events_with(srv, mid)) == 1
    assert failed_with(srv, mid) == []


def test_identical_retry_across_batches_is_absorbed(srv: Server) -> None:
    mid = uid()
    item = {"type": "track", "userId": "u", "event": "E", "messageId": mid, "properties": {"x": 1}}
    first = post(srv, "/v1/batch", {"batch": [item], "sentAt": "2026-01-01T00:00:00Z"})
    retry = post(srv, "/v1/batch", {"batch": [item], "sentAt": "2026-01-01T00:00:05Z"})  # SDK retries re-stamp sentAt
    assert first.status_code == retry.status_code == 200
    assert retry.json()["duplicates"] == 1
    assert len(events_with(srv, mid)) == 1
    assert failed_with(srv, mid) == []


def test_single_call_retry_is_absorbed(srv: Server) -> None:
    mid = uid()
    body = {"userId": "u", "event": "E", "messageId": mid}
    assert post(srv, "/v1/track", body).status_code == 200
    assert post(srv, "/v1/track", {**body, "sentAt": datetime.now(UTC).isoformat()}).status_code == 200
    assert len(events_with(srv, mid)) == 1


def test_same_message_id_with_different_payload_is_quarantined(srv: Server) -> None:
    mid = uid()
    assert post(srv, "/v1/batch", {"batch": [{"type": "track", "userId": "u", "event": "First", "messageId": mid}]}).status_code == 200
    r = post(srv, "/v1/batch", {"batch": [{"type": "track", "userId": "u", "event": "Second", "messageId": mid}]})
    assert r.status_code == 200
    assert r.json()["failed"] == 1 and r.json()["failures"][0]["reason"] == "duplicate_message_id_conflict"
    assert events_with(srv, mid, "event") == [{"event": "First"}]
    failed = failed_with(srv, mid)
    assert [f["reason"] for f in failed] == ["duplicate_message_id_conflict"]
    assert orjson.loads(failed[0]["payload"])["event"] == "Second"


def test_conflict_inside_one_batch(srv: Server) -> None:
    mid = uid()
    r = post(srv, "/v1/batch", {"batch": [
        {"type": "track", "userId": "u", "event": "A", "messageId": mid},
        {"type": "track", "userId": "u", "event": "B", "messageId": mid},
    ]})
    assert r.status_code == 200
    assert events_with(srv, mid, "event") == [{"event": "A"}]
    assert [f["reason"] for f in failed_with(srv, mid)] == ["duplicate_message_id_conflict"]


def test_retry_and_conflict_mixed_with_new_events_across_batches(srv: Server) -> None:
    """A batch holding new events, a retry and a conflicting reuse of stored ids: each gets its own
    outcome (the writer falls back from its cheap dedup INSERT to the careful one), and so does the
    plain batch after it."""
    old, clash = uid(), uid()
    stored = [{"type": "track", "userId": "u", "event": "E", "messageId": m} for m in (old, clash)]
    assert post(srv, "/v1/batch", {"batch": stored}).json()["accepted"] == 2
    fresh = [uid() for _ in range(3)]
    mixed = [
        {"type": "track", "userId": "u", "event": "E", "messageId": fresh[0]},
        stored[0],
        {"type": "track", "userId": "u", "event": "Other", "messageId": clash},
        *({"type": "track", "userId": "u", "event": "E", "messageId": m} for m in fresh[1:]),
    ]
    r = post(srv, "/v1/batch", {"batch": mixed})
    assert r.status_code == 200, r.text
    assert (r.json()["accepted"], r.json()["duplicates"], r.json()["failed"]) == (3, 1, 1)
    assert [f["index"] for f in r.json()["failures"]] == [2]
    for m in (old, clash, *fresh):
        assert len(events_with(srv, m)) == 1
    assert [f["reason"] for f in failed_with(srv, clash)] == ["duplicate_message_id_conflict"]
    after = uid()
    r = post(srv, "/v1/batch", {"batch": [{"type": "track", "userId": "u", "event": "E", "messageId": after}]})
    assert r.json()["accepted"] == 1 and len(events_with(srv, after)) == 1
    assert len(select(srv, "raw_events", "message_id", message_id=fresh[0])) == 1  # the aborted try left no raw row


def test_dedup_is_per_source(srv: Server) -> None:
    with srv.api() as api:
        key = api.post("/api/sources", json={"name": "second-src"}).json()["write_key"]
    mid = uid()
    item = {"userId": "u", "event": "E", "messageId": mid}
    assert post(srv, "/v1/track", item).status_code == 200
    assert post(srv, "/v1/track", item, headers=basic(key)).status_code == 200
    assert sorted(r["source"] for r in events_with(srv, mid, "source")) == ["second-src", "web"]


# --- rate limit -----------------------------------------------------------------------------

def test_rate_limit_answers_429_with_retry_after(srv: Server) -> None:
    """The limit counts events: a source limited to 1/s takes one batch of 5, then not another at once."""
    with srv.api() as api:
        r = api.post("/api/sources", json={"name": "limited", "rate_limit_per_second": 1})
        assert r.status_code == 201, r.text
        key = r.json()["write_key"]

    def batch() -> list[dict[str, str]]:
        return [{"type": "track", "userId": "u", "event": "E", "messageId": uid()} for _ in range(5)]

    assert post(srv, "/v1/batch", {"batch": batch()}, headers=basic(key)).status_code == 200
    refused = batch()
    limited = post(srv, "/v1/batch", {"batch": refused}, headers=basic(key))
    assert limited.status_code == 429, limited.text
    assert 1 <= int(limited.headers["retry-after"]) <= 5
    assert limited.json()["error"] == "rate_limited" and limited.json()["fix"]
    assert events_with(srv, refused[0]["messageId"]) == [], "a refused request stores nothing"
    # Other sources are not affected.
    assert post(srv, "/v1/track", {"userId": "u", "event": "E", "messageId": uid()}).status_code == 200
    # Waiting as told lets the next request through.
    mid = uid()
    for _ in range(3):
        r = post(srv, "/v1/track", {"userId": "u", "event": "E", "messageId": mid}, headers=basic(key))
        if r.status_code != 429:
            break
        time.sleep(int(r.headers["retry-after"]))
    assert r.status_code == 200, r.text
    assert len(events_with(srv, mid)) == 1


# --- ops --------------------------------------------------------------------------------------

def test_health(srv: Server) -> None:
    r = httpx.get(srv.url + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_metrics_move_when_events_arrive(srv: Server) -> None:
    before = metrics_text(srv)
    ok = [uid() for _ in range(3)]
    post(srv, "/v1/batch", {"batch": [{"type": "track", "userId": "u", "event": "E", "messageId": m} for m in ok]
                            + [{"type": "track", "userId": "u", "event": "Old", "timestamp": "1990-01-01T00:00:00Z", "messageId": uid()}]})
    post(srv, "/v1/track", {"userId": "u", "event": "E"}, headers=basic("nope"))
    post(srv, "/v1/track", content=b"{not json")
    after = metrics_text(srv)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("refinery_events_accepted_total", source="web") == 3
    assert delta("refinery_events_failed_total", source="web", reason="timestamp_too_old") == 1
    assert delta("refinery_requests_rejected_total", reason="invalid_write_key") == 1
    assert delta("refinery_requests_rejected_total", reason="invalid_json") == 1
    assert delta("refinery_ack_latency_seconds_count", call="batch") == 1
    assert delta("refinery_ack_latency_seconds_bucket", call="batch", le="+Inf") == 1
    assert_healthy(srv)


def test_sent_at_must_not_break_a_single_call_retry_with_timestamp_in_future(srv: Server) -> None:
    """A client whose clock is an hour ahead: skew correction brings the event back to server time."""
    mid = uid()
    ahead = datetime.now(UTC) + timedelta(hours=1)
    r = post(srv, "/v1/track", {"userId": "u", "event": "E", "messageId": mid,
                               "originalTimestamp": (ahead - timedelta(seconds=30)).isoformat(), "sentAt": ahead.isoformat()})
    assert r.status_code == 200
    row = events_with(srv, mid, "timestamp, received_at")[0]
    ts, received = datetime.fromisoformat(row["timestamp"]), datetime.fromisoformat(row["received_at"])
    assert abs((received - ts).total_seconds() - 30) < 0.01
