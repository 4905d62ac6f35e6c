"""Bad input never crashes the collector: each case gets a clear 4xx (naming the field and the fix)
or lands in failed_events with a reason, and the server still answers /health afterwards."""

from __future__ import annotations

import gzip
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlparse

import orjson
import pytest
from collector_helpers import (
    assert_healthy,
    events_with,
    failed_with,
    post,
    raw_with,
    shared_server_fixture,
    uid,
)

from support import Server

srv = shared_server_fixture()


@pytest.fixture(autouse=True)
def _still_healthy(srv: Server) -> Iterator[None]:
    yield
    assert_healthy(srv)


def _error(r: object, status: int) -> dict[str, object]:
    assert r.status_code == status, r.text  # type: ignore[attr-defined]
    body = r.json()  # type: ignore[attr-defined]
    assert body["success"] is False
    assert body["message"] and body["fix"], body
    return body  # type: ignore[no-any-return]


# --- bodies that are not a JSON object -------------------------------------------------------

@pytest.mark.parametrize(
    "content,reason",
    [
        (b"{not json", "invalid_json"),
        (b'{"userId": "u", "event": "E"', "invalid_json"),
        (b"", "empty_body"),
        (b"[1, 2, 3]", "not_an_object"),
        (b"42", "not_an_object"),
        (b'"a string"', "not_an_object"),
        (b"null", "not_an_object"),
        (b'{"userId": "\xff\xfe", "event": "E"}', "invalid_utf8"),
        (b'{"userId": "u", "event": "line\x01break"}', "invalid_json"),  # raw control character
    ],
    ids=["garbage", "truncated", "empty", "array", "number", "string", "null", "bad-utf8", "raw-control-char"],
)
def test_body_that_is_not_a_json_object_is_400(srv: Server, content: bytes, reason: str) -> None:
    r = post(srv, "/v1/track", content=content, headers={**srv.basic, "Content-Type": "application/json"})
    body = _error(r, 400)
    assert body["reason"] == reason
    assert body["field"] == "body"


def test_escaped_control_characters_are_fine_and_preserved(srv: Server) -> None:
    mid = uid()
    r = post(srv, "/v1/track", {"userId": "u", "event": "tab\there", "messageId": mid, "properties": {"nl": "a\nb\u0001c"}})
    assert r.status_code == 200, r.text
    row = events_with(srv, mid, "event, properties")[0]
    assert row["event"] == "tab\there"
    assert orjson.loads(row["properties"])["nl"] == "a\nb\u0001c"


def test_unicode_is_preserved_exactly(srv: Server) -> None:
    mid = uid()
    name = "Commande passée 🎉 طلب 注文 \u200f"
    props = {"emoji": "👩‍👩‍👧‍👦", "rtl": "שלום עולם", "cjk": "你好，世界", "combining": "e\u0301"}
    r = post(srv, "/v1/track", {"userId": "用户-1", "event": name, "messageId": mid, "properties": props})
    assert r.status_code == 200, r.text
    row = events_with(srv, mid, "event, user_id, properties")[0]
    assert row["event"] == name
    assert row["user_id"] == "用户-1"
    assert orjson.loads(row["properties"]) == props
    assert orjson.loads(raw_with(srv, mid)[0]["payload"])["properties"] == props


# --- size limits ------------------------------------------------------------------------------

def test_event_over_32kb_is_413(srv: Server) -> None:
    mid = uid()
    r = post(srv, "/v1/track", {"userId": "u", "event": "Big", "messageId": mid, "properties": {"blob": "x" * 33_000}})
    body = _error(r, 413)
    assert body["reason"] == "event_too_large"
    assert events_with(srv, mid) == []


def test_event_over_32kb_in_a_batch_is_quarantined_and_the_rest_stored(srv: Server) -> None:
    big, small = uid(), uid()
    r = post(srv, "/v1/batch", {"batch": [
        {"type": "track", "userId": "u", "event": "Big", "messageId": big, "properties": {"blob": "x" * 33_000}},
        {"type": "track", "userId": "u", "event": "Small", "messageId": small},
    ]})
    assert r.status_code == 200, r.text
    assert r.json()["failures"] == [
        {"index": 0, "messageId": big, "reason": "event_too_large", "field": "", "message": r.json()["failures"][0]["message"]}
    ]
    assert [f["reason"] for f in failed_with(srv, big)] == ["event_too_large"]
    assert len(events_with(srv, small)) == 1


def test_body_over_500kb_is_413(srv: Server) -> None:
    batch = [{"type": "track", "userId": "u", "event": "E", "messageId": uid(), "properties": {"p": "y" * 20_000}} for _ in range(30)]
    r = post(srv, "/v1/batch", {"batch": batch})
    _error(r, 413)
    assert events_with(srv, batch[0]["messageId"]) == []


def test_chunked_body_over_500kb_is_413(srv: Server) -> None:
    import httpx

    def chunks() -> Iterator[bytes]:
        yield b'{"batch": ['
        for _ in range(60):
            yield orjson.dumps({"type": "track", "userId": "u", "event": "E", "properties": {"p": "z" * 10_000}}) + b","
        yield b"{}]}"

    r = httpx.post(srv.url + "/v1/batch", content=chunks(), headers=srv.basic, timeout=30)
    _error(r, 413)


def test_more_than_2500_events_is_413(srv: Server) -> None:
    batch = [{"type": "track", "userId": "u", "event": "E"} for _ in range(2501)]
    r = post(srv, "/v1/batch", {"batch": batch})
    body = _error(r, 413)
    assert body["field"] == "/batch"


def test_huge_content_length_is_refused_before_the_body_is_read(srv: Server) -> None:
    url = urlparse(srv.url)
    with socket.create_connection((url.hostname, url.port), timeout=5) as s:
        s.sendall(
            b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: " + srv.basic["Authorization"].encode() + b"\r\nContent-Length: 10000000\r\n\r\n"
        )
        started = time.monotonic()
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        elapsed = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert elapsed < 2, f"the 413 took {elapsed:.1f}s: the server waited for the body"


def test_gzip_bomb_is_413(srv: Server) -> None:
    inner = b'{"batch": [{"type": "track", "userId": "u", "event": "E", "properties": {"p": "' + b"0" * 5_000_000 + b'"}}]}'
    bomb = gzip.compress(inner, 9)
    assert len(bomb) < 20_000
    r = post(srv, "/v1/batch", content=bomb, headers={**srv.basic, "Content-Encoding": "gzip"})
    body = _error(r, 413)
    assert "decompress" in str(body["message"])


@pytest.mark.parametrize("content", [b"\x1f\x8b\x08\x00garbage", gzip.compress(b'{"batch": []}')[:-10]], ids=["garbage", "truncated"])
def test_broken_gzip_is_400(srv: Server, content: bytes) -> None:
    r = post(srv, "/v1/batch", content=content, headers={**srv.basic, "Content-Encoding": "gzip"})
    assert _error(r, 400)["field"] == "Content-Encoding"


def test_unknown_content_encoding_is_400(srv: Server) -> None:
    r = post(srv, "/v1/batch", content=b"{}", headers={**srv.basic, "Content-Encoding": "br"})
    assert _error(r, 400)["field"] == "Content-Encoding"


@pytest.mark.parametrize("depth", [100, 5_000], ids=["over-our-limit", "over-the-parser-limit"])
def test_deeply_nested_payload_is_refused(srv: Server, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    content = ('{"userId": "u", "event": "Deep", "properties": {"p": ' + nested + "}}").encode()
    r = post(srv, "/v1/track", content=content)
    body = _error(r, 400)
    assert body["reason"] in ("too_deep", "invalid_json")
    assert "deep" in str(body["message"]).lower() or "nest" in str(body["message"]).lower()


def test_many_keys_within_the_limit_are_stored(srv: Server) -> None:
    mid = uid()
    props = {f"k{i}": i for i in range(2_000)}
    r = post(srv, "/v1/track", {"userId": "u", "event": "Wide", "messageId": mid, "properties": props})
    assert r.status_code == 200, r.text
    assert len(orjson.loads(events_with(srv, mid, "properties")[0]["properties"])) == 2_000


# --- protocol errors on single calls: 400 naming the field and the fix ------------------------

@pytest.mark.parametrize(
    "path,body,reason,field",
    [
        ("/v1/track", {"event": "E"}, "missing_identity", "/userId"),
        ("/v1/track", {"userId": "", "anonymousId": "  ", "event": "E"}, "missing_identity", "/userId"),
        ("/v1/track", {"userId": "u"}, "missing_event", "/event"),
        ("/v1/track", {"userId": "u", "event": 42}, "invalid_type", "/event"),
        ("/v1/track", {"userId": {"id": 1}, "event": "E"}, "invalid_type", "/userId"),
        ("/v1/track", {"userId": "u", "event": "E", "properties": [1, 2]}, "invalid_type", "/properties"),
        ("/v1/group", {"userId": "u"}, "missing_group_id", "/groupId"),
        ("/v1/alias", {"userId": "u"}, "missing_previous_id", "/previousId"),
        ("/v1/page", {"userId": "u", "name": 7}, "invalid_type", "/name"),
        ("/v1/track", {"userId": "u", "event": "E", "messageId": 12}, "invalid_message_id", "/messageId"),
        ("/v1/track", {"userId": "u", "event": "E", "timestamp": True}, "invalid_timestamp", "/timestamp"),
        ("/v1/track", {"userId": "u", "event": "E", "type": "identify"}, "type_mismatch", "type"),
    ],
    ids=["no-ids", "blank-ids", "no-event", "event-42", "userId-object", "properties-array", "no-groupId",
         "no-previousId", "name-number", "messageId-number", "timestamp-bool", "type-mismatch"],
)
def test_single_call_protocol_errors_are_400(srv: Server, path: str, body: dict[str, object], reason: str, field: str) -> None:
    user = uid("u")
    if body.get("userId") == "u":
        body = {**body, "userId": user}
    r = post(srv, path, body)
    err = _error(r, 400)
    assert err["reason"] == reason
    assert err["field"] == field
    assert err["code"] == err["error"] == "invalid_request"


def test_bad_batch_items_are_quarantined_and_the_rest_stored(srv: Server) -> None:
    ids = [uid() for _ in range(7)]
    batch: list[object] = [
        {"type": "track", "userId": "u", "event": "Good", "messageId": ids[0]},
        {"type": "bogus", "userId": "u", "messageId": ids[1]},
        {"type": "track", "event": "No id", "messageId": ids[2]},
        {"type": "track", "userId": "u", "event": 42, "messageId": ids[3]},
        {"type": "group", "userId": "u", "messageId": ids[4]},
        {"type": "alias", "userId": "u", "messageId": ids[5]},
        {"type": "identify", "anonymousId": "a", "messageId": ids[6]},
        "not an object",
    ]
    r = post(srv, "/v1/batch", {"batch": batch})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["accepted"], body["failed"]) == (2, 6)
    by_index = {f["index"]: f for f in body["failures"]}
    assert {i: f["reason"] for i, f in by_index.items()} == {
        1: "unknown_type", 2: "missing_identity", 3: "invalid_type", 4: "missing_group_id", 5: "missing_previous_id", 7: "not_an_object",
    }
    assert all(f["message"] for f in body["failures"])
    assert len(events_with(srv, ids[0])) == 1 and len(events_with(srv, ids[6])) == 1
    for i, reason in ((1, "unknown_type"), (2, "missing_identity"), (3, "invalid_type"), (4, "missing_group_id"), (5, "missing_previous_id")):
        failed = failed_with(srv, ids[i])
        assert [f["reason"] for f in failed] == [reason]
        assert orjson.loads(failed[0]["payload"])["messageId"] == ids[i], "the original payload is kept for replay"


@pytest.mark.parametrize("batch", [None, {"a": 1}, "x", 5], ids=["missing", "object", "string", "number"])
def test_batch_without_an_array_is_400(srv: Server, batch: object) -> None:
    body = {} if batch is None else {"batch": batch}
    assert _error(post(srv, "/v1/batch", body), 400)["field"] == "/batch"


def test_unknown_path_is_404(srv: Server) -> None:
    r = post(srv, "/v1/bogus", {"userId": "u"})
    assert r.status_code == 404


# --- timestamps -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "timestamp,reason",
    [("1970-01-02T00:00:00Z", "timestamp_too_old"), ("2090-01-01T00:00:00Z", "timestamp_in_future"), ("next tuesday", "invalid_timestamp")],
    ids=["past", "future", "garbage"],
)
def test_implausible_timestamps_are_quarantined(srv: Server, timestamp: str, reason: str) -> None:
    mid = uid()
    r = post(srv, "/v1/track", {"userId": "u", "event": "E", "messageId": mid, "timestamp": timestamp})
    assert r.status_code == 200, r.text
    assert r.json()["quarantined"] is True and r.json()["reason"] == reason
    assert events_with(srv, mid) == []
    failed = failed_with(srv, mid)
    assert [f["reason"] for f in failed] == [reason]
    assert failed[0]["field"] == "/timestamp" and "timestamp" in failed[0]["message"]


def test_far_timestamps_in_a_batch(srv: Server) -> None:
    old, future, ok = uid(), uid(), uid()
    r = post(srv, "/v1/batch", {"batch": [
        {"type": "track", "userId": "u", "event": "E", "messageId": old, "timestamp": "1999-12-31T23:59:59Z"},
        {"type": "track", "userId": "u", "event": "E", "messageId": future, "originalTimestamp": "2100-01-01T00:00:00Z"},
        {"type": "track", "userId": "u", "event": "E", "messageId": ok, "timestamp": "2020-06-01T12:00:00Z"},
    ]})
    assert r.status_code == 200
    assert [f["reason"] for f in failed_with(srv, old)] == ["timestamp_too_old"]
    assert [f["reason"] for f in failed_with(srv, future)] == ["timestamp_in_future"]
    assert events_with(srv, ok, "timestamp")[0]["timestamp"].startswith("2020-06-01T12:00:00")


@pytest.mark.parametrize(
    "fields,reason",
    [
        ({"originalTimestamp": "0001-01-01T00:00:00Z", "sentAt": "294000-01-01T00:00:00Z"}, "timestamp_too_old"),
        ({"timestamp": "-infinity", "sentAt": "infinity"}, "timestamp_too_old"),
        ({"timestamp": "infinity"}, "timestamp_in_future"),
        ({"timestamp": 1e20}, "invalid_timestamp"),
        ({"timestamp": "99999999999999999999"}, "invalid_timestamp"),
    ],
    ids=["year-294000-sentAt", "infinities", "infinity", "epoch-1e20", "digits-1e20"],
)
def test_extreme_timestamps_do_not_poison_their_batch(srv: Server, fields: dict[str, object], reason: str) -> None:
    """Times that overflow date arithmetic are quarantined; the batch's other events are stored."""
    bad, good = uid(), uid()
    r = post(srv, "/v1/batch", {"batch": [
        {"type": "track", "userId": "u", "event": "E", "messageId": bad, **fields},
        {"type": "track", "userId": "u", "event": "E", "messageId": good},
    ]})
    assert r.status_code == 200, r.text
    assert [f["reason"] for f in failed_with(srv, bad)] == [reason]
    assert len(events_with(srv, good)) == 1


@pytest.mark.parametrize("scale", [1, 1000], ids=["seconds", "milliseconds"])
def test_epoch_number_timestamps(srv: Server, scale: int) -> None:
    mid = uid()
    when = datetime(2024, 3, 5, 6, 7, 8, tzinfo=UTC)
    r = post(srv, "/v1/track", {"userId": "u", "event": "E", "messageId": mid, "timestamp": int(when.timestamp()) * scale})
    assert r.status_code == 200
    row = events_with(srv, mid, "timestamp")
    assert row, failed_with(srv, mid)
    assert datetime.fromisoformat(row[0]["timestamp"]) == when


def test_clock_skew_correction(srv: Server) -> None:
    """timestamp = receivedAt - (sentAt - originalTimestamp): a device clock 3 days behind."""
    mid = uid()
    device_now = datetime.now(UTC) - timedelta(days=3)
    original = device_now - timedelta(minutes=5)
    r = post(srv, "/v1/batch", {"sentAt": device_now.isoformat(), "batch": [
        {"type": "track", "userId": "u", "event": "E", "messageId": mid, "originalTimestamp": original.isoformat()}
    ]})
    assert r.status_code == 200
    row = events_with(srv, mid, "timestamp, original_timestamp, sent_at, received_at")[0]
    received = datetime.fromisoformat(row["received_at"])
    assert datetime.fromisoformat(row["timestamp"]) == received - timedelta(minutes=5)
    assert datetime.fromisoformat(row["original_timestamp"]) == original
    assert datetime.fromisoformat(row["sent_at"]) == device_now
