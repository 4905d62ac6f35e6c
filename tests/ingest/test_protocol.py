"""Segment's protocol rules as pure functions: bodies, write keys, staging, envelopes, limits."""

from __future__ import annotations

import base64
import gzip
import itertools
import zlib

import orjson
import pytest

from refinery.errors import AuthError, IngestError, PayloadTooLarge
from refinery.ingest import protocol
from refinery.ingest.protocol import Limits, decode_body, parse_body, stage, write_key_from

LIMITS = Limits()


def _ids() -> object:
    counter = itertools.count()
    return lambda: f"gen-{next(counter)}"


# --- bodies -----------------------------------------------------------------------------------

def test_gzip_and_deflate_bodies_are_decoded() -> None:
    data = b'{"a": 1}'
    assert decode_body(gzip.compress(data), "gzip", LIMITS) == data
    assert decode_body(zlib.compress(data), "deflate", LIMITS) == data
    assert decode_body(data, None, LIMITS) == data
    assert decode_body(data, "identity", LIMITS) == data


def test_gzip_bomb_is_refused_without_inflating_it_all() -> None:
    bomb = gzip.compress(b"0" * 50_000_000)
    with pytest.raises(PayloadTooLarge) as e:
        decode_body(bomb, "gzip", LIMITS)
    assert e.value.details["reason"] == "body_too_large"


def test_gzip_just_under_the_limit_is_accepted() -> None:
    data = b"x" * LIMITS.max_batch_bytes
    assert decode_body(gzip.compress(data), "gzip", LIMITS) == data
    with pytest.raises(PayloadTooLarge):
        decode_body(gzip.compress(data + b"x"), "gzip", LIMITS)


@pytest.mark.parametrize(
    "body,reason",
    [(b"", "empty_body"), (b"  ", "empty_body"), (b"{", "invalid_json"), (b"[]", "not_an_object"), (b"1", "not_an_object"),
     (b'{"a": "\xc3"}', "invalid_utf8"), (b'{"a": "\x00"}', "invalid_json"), (b"[" * 2000 + b"]" * 2000, "too_deep")],
)
def test_parse_body_refusals_name_the_reason(body: bytes, reason: str) -> None:
    with pytest.raises(IngestError) as e:
        parse_body(body)
    assert e.value.details["reason"] == reason
    assert e.value.field == "body" and e.value.fix


# --- write keys ---------------------------------------------------------------------------------

def _basic(user: str) -> str:
    return "Basic " + base64.b64encode(user.encode()).decode()


@pytest.mark.parametrize("header", [_basic("key:"), _basic("key"), _basic("key:ignored-password"), "Bearer key", "basic " + base64.b64encode(b"key:").decode()])
def test_write_key_from_header(header: str) -> None:
    assert write_key_from(header, None) == "key"


def test_write_key_from_body_when_no_header() -> None:
    assert write_key_from(None, {"writeKey": "body-key"}) == "body-key"
    assert write_key_from(_basic(":"), {"writeKey": "body-key"}) == "body-key"


def test_header_wins_over_body() -> None:
    assert write_key_from(_basic("header-key:"), {"writeKey": "body-key"}) == "header-key"


@pytest.mark.parametrize("header,body", [(None, None), (None, {}), (None, {"writeKey": 5}), ("Basic !!", None), ("Digest x", None)])
def test_missing_or_garbled_write_key_is_auth_error(header: str | None, body: dict[str, object] | None) -> None:
    with pytest.raises(AuthError):
        write_key_from(header, body)


# --- staging ------------------------------------------------------------------------------------

def test_single_call_gets_its_type_and_an_assigned_message_id() -> None:
    [ev] = stage("track", {"userId": "u", "event": "E", "writeKey": "k"}, LIMITS, new_id=_ids())
    assert ev.message_id == "gen-0"
    assert ev.failure is None
    raw = orjson.loads(ev.raw_json)
    assert raw["type"] == "track" and "writeKey" not in raw


def test_given_message_id_is_kept() -> None:
    [ev] = stage("track", {"userId": "u", "event": "E", "messageId": "mine"}, LIMITS, new_id=_ids())
    assert ev.message_id == "mine"


@pytest.mark.parametrize(
    "call,body,reason,field",
    [
        ("track", {"event": "E"}, "missing_identity", "/userId"),
        ("track", {"userId": "u"}, "missing_event", "/event"),
        ("track", {"userId": "u", "event": "  "}, "missing_event", "/event"),
        ("group", {"userId": "u", "groupId": " "}, "missing_group_id", "/groupId"),
        ("track", {"userId": "u", "event": 42}, "invalid_type", "/event"),
        ("track", {"userId": True, "event": "E"}, "invalid_type", "/userId"),
        ("group", {"userId": "u"}, "missing_group_id", "/groupId"),
        ("alias", {"userId": "u"}, "missing_previous_id", "/previousId"),
        ("identify", {"userId": "u", "traits": "vip"}, "invalid_type", "/traits"),
        ("track", {"userId": "u", "event": "E", "messageId": ["x"]}, "invalid_message_id", "/messageId"),
        ("track", {"userId": "u", "event": "E", "messageId": "x" * 256}, "invalid_message_id", "/messageId"),
        ("track", {"userId": "u", "event": "E", "properties": {"p": "x" * 40_000}}, "event_too_large", ""),
    ],
)
def test_single_call_rule_breaks_raise_with_field_and_fix(call: str, body: dict[str, object], reason: str, field: str) -> None:
    with pytest.raises(IngestError) as e:
        stage(call, body, LIMITS)
    assert e.value.details["reason"] == reason
    assert e.value.field == field
    assert e.value.fix
    assert (e.value.http_status == 413) == (reason == "event_too_large")


def test_numeric_user_id_and_group_id_are_accepted() -> None:
    [ev] = stage("group", {"userId": 12, "groupId": 7}, LIMITS)
    assert ev.failure is None


def test_too_deep_event_fails() -> None:
    nested: object = "leaf"
    for _ in range(70):
        nested = {"n": nested}
    with pytest.raises(IngestError) as e:
        stage("track", {"userId": "u", "event": "E", "properties": nested}, LIMITS)
    assert e.value.details["reason"] == "too_deep"


def test_batch_items_that_break_rules_are_staged_with_failures() -> None:
    staged = stage("batch", {"batch": [
        {"type": "track", "userId": "u", "event": "E"},
        {"type": "bogus", "userId": "u"},
        {"userId": "u"},
        7,
    ]}, LIMITS, new_id=_ids())
    assert [s.failure.reason if s.failure else None for s in staged] == [None, "unknown_type", "unknown_type", "not_an_object"]
    assert len({s.message_id for s in staged}) == 4


def test_batch_envelope_is_merged_item_keys_win_and_raw_is_kept() -> None:
    [a, b] = stage("batch", {
        "batch": [
            {"type": "track", "userId": "u", "event": "A", "context": {"ip": "10.0.0.1"}},
            {"type": "track", "userId": "u", "event": "B", "integrations": {"Mixpanel": True}},
        ],
        "context": {"ip": "1.1.1.1", "library": {"name": "lib"}},
        "integrations": {"All": False},
        "sentAt": "2026-01-01T00:00:00Z",
        "writeKey": "secret",
    }, LIMITS)
    ma, mb = orjson.loads(a.merged_json), orjson.loads(b.merged_json)
    assert ma["context"] == {"ip": "10.0.0.1", "library": {"name": "lib"}}
    assert mb["context"] == {"ip": "1.1.1.1", "library": {"name": "lib"}}
    assert mb["integrations"] == {"All": False, "Mixpanel": True}
    assert ma["sentAt"] == mb["sentAt"] == "2026-01-01T00:00:00Z"
    assert "writeKey" not in ma and "writeKey" not in (a.envelope_json or "")
    assert "library" not in orjson.loads(a.raw_json)["context"]
    assert orjson.loads(a.envelope_json or "{}")["integrations"] == {"All": False}


def test_payload_hash_ignores_sent_at_and_key_order_but_not_content() -> None:
    def h(body: dict[str, object]) -> int:
        return stage("track", body, LIMITS)[0].payload_hash

    base = {"userId": "u", "event": "E", "messageId": "m"}
    assert h(base) == h({**base, "sentAt": "2026-01-01T00:00:00Z"})
    assert h(base) == h(dict(reversed(list(base.items()))))
    assert h(base) != h({**base, "event": "F"})


@pytest.mark.parametrize("batch", [None, {}, "x", 3])
def test_batch_needs_an_array(batch: object) -> None:
    with pytest.raises(IngestError) as e:
        stage("batch", {} if batch is None else {"batch": batch}, LIMITS)
    assert e.value.field == "/batch"


def test_batch_event_count_limit() -> None:
    with pytest.raises(PayloadTooLarge):
        stage("batch", {"batch": [{}] * (LIMITS.max_batch_events + 1)}, LIMITS)
    assert len(stage("batch", {"batch": [{}] * LIMITS.max_batch_events}, LIMITS)) == LIMITS.max_batch_events


def test_envelope_context_must_be_an_object() -> None:
    with pytest.raises(IngestError) as e:
        stage("batch", {"batch": [], "context": "x"}, LIMITS)
    assert e.value.field == "/context"


def test_short_paths_cover_every_call() -> None:
    assert set(protocol.SHORT_PATHS.values()) == {*protocol.CALL_TYPES, "batch"}


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    [ev] = stage("track", {"userId": "u", "event": "E", "properties": {"s": "{[" * 200}}, LIMITS)
    assert ev.failure is None


def test_depth_exactly_at_the_limit_is_accepted() -> None:
    nested: object = 1
    for _ in range(LIMITS.max_json_depth - 2):  # the event object and properties are two levels
        nested = [nested]
    [ev] = stage("track", {"userId": "u", "event": "E", "properties": {"p": nested}}, LIMITS)
    assert ev.failure is None
    with pytest.raises(IngestError):
        stage("track", {"userId": "u", "event": "E", "properties": {"p": [nested]}}, LIMITS)
