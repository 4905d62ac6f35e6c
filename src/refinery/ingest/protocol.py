"""The Segment HTTP Tracking API's rules, as pure functions from bytes to staged events.

No I/O here: the collector (refinery.api.collector) hands in the body and headers, gets back
either an `IngestError` (which becomes an HTTP status with a message naming the field and the
fix) or a list of `StagedEvent`s for the writer. Batch items that break a rule do not fail their
neighbours: they are staged with a `Failure` and land in the failed zone.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from refinery.errors import AuthError, IngestError, PayloadTooLarge

CALL_TYPES: tuple[str, ...] = ("identify", "track", "page", "screen", "group", "alias")
#: analytics.js posts to one-letter paths with a text/plain body, to avoid a CORS preflight.
SHORT_PATHS: dict[str, str] = {"i": "identify", "t": "track", "p": "page", "s": "screen", "g": "group", "a": "alias", "b": "batch"}
_ENVELOPE_KEYS = ("context", "integrations")
_HASH_EXCLUDED = frozenset({"sentAt", "writeKey", "receivedAt"})
_ID_FIELDS = ("userId", "anonymousId")
_OBJECT_FIELDS = ("properties", "traits", "context", "integrations")
_TIME_FIELDS = ("timestamp", "originalTimestamp", "sentAt")
#: The field each call type needs besides an identity.
_REQUIRED = {"track": "event", "group": "groupId", "alias": "previousId"}
#: How to fix each rule a single call can break (batch items carry the advice in their message).
_FIXES: dict[str, str] = {
    "event_too_large": "Keep each event under 32 KB: move large values out of properties and traits.",
    "unknown_type": "Post to /v1/identify, track, page, screen, group or alias, or set type to one of them.",
    "invalid_message_id": "Send messageId as a string of 1-255 characters, or leave it out to have one assigned.",
    "missing_identity": "Set userId for a known user, or anonymousId for an anonymous visitor.",
    "missing_event": "Set event to the action's name, e.g. \"Order Completed\".",
    "missing_group_id": "Set groupId to the account's id.",
    "missing_previous_id": "Set previousId to the id the user had before (e.g. the anonymousId).",
    "invalid_type": "Send the field with the JSON type named in the message.",
    "invalid_timestamp": "Send ISO-8601 text (e.g. \"2026-01-31T12:00:00Z\") or epoch seconds/milliseconds.",
    "too_deep": "Flatten the event; nest objects and arrays at most 64 levels.",
}


@dataclass(frozen=True, slots=True)
class Limits:
    max_event_bytes: int = 32 * 1024
    max_batch_bytes: int = 500 * 1024
    max_batch_events: int = 2500
    max_json_depth: int = 64


@dataclass(frozen=True, slots=True)
class Failure:
    """Why an event cannot be cleaned: a stable code, a message naming the field and fix, a JSON pointer."""

    reason: str
    message: str
    field: str | None = None
    stage: str = "collect"


@dataclass(slots=True)
class StagedEvent:
    """One event ready for the writer: its raw form, the form cleaning reads, and any failure."""

    index: int
    message_id: str
    raw_json: str                 # the item exactly as received (re-serialised JSON, same content)
    envelope_json: str | None     # batch-level fields merged into the item, as received
    merged_json: str              # what cleaning reads: the item with the envelope merged in
    payload_hash: int             # content hash, to tell an SDK retry from a conflicting reuse of an id
    failure: Failure | None = None
    merged: dict[str, Any] | None = None  # the parsed merged event, for plan checks (not stored)


# --- request level -------------------------------------------------------------------------

def decode_body(body: bytes, content_encoding: str | None, limits: Limits) -> bytes:
    """Undo gzip/deflate, refusing anything that inflates past the batch limit (gzip bombs)."""
    enc = (content_encoding or "").strip().lower()
    if enc in ("", "identity"):
        return body
    if enc not in ("gzip", "deflate", "x-gzip"):
        raise IngestError(
            f"Unsupported Content-Encoding {content_encoding!r}.",
            fix="Send the body uncompressed or with Content-Encoding: gzip or deflate.",
            field="Content-Encoding",
            reason="invalid_encoding",
        )
    wbits = 47 if enc in ("gzip", "x-gzip") else 15  # 47 = auto-detect gzip/zlib header
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limits.max_batch_bytes + 1)
        if len(out) > limits.max_batch_bytes or d.unconsumed_tail:
            raise PayloadTooLarge(
                f"The decompressed body exceeds {limits.max_batch_bytes} bytes.",
                fix=f"Split the batch; at most {limits.max_batch_bytes} bytes after decompression are accepted.",
                field="body",
                reason="body_too_large",
            )
        out += d.flush()
    except zlib.error as e:
        raise IngestError(
            f"The body is not valid {enc} data ({e}).",
            fix="Compress the body with gzip, or drop the Content-Encoding header.",
            field="Content-Encoding",
            reason="invalid_encoding",
        ) from e
    if not d.eof:
        raise IngestError(
            f"The {enc} stream is truncated.", fix="Send the complete compressed body.", field="Content-Encoding",
            reason="invalid_encoding",
        )
    return out


def parse_body(body: bytes) -> dict[str, Any]:
    """Parse a JSON object body; anything else is a 400 that says what was received."""
    if not body.strip():
        raise IngestError(
            "The request body is empty.", fix='Send a JSON object, e.g. {"userId": "u1", ...}.', field="body", reason="empty_body"
        )
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        msg = str(e)
        low = msg.lower()
        if "utf-8" in low or "surrogate" in low:
            raise IngestError(
                f"The body is not valid UTF-8 ({msg}).", fix="Encode the body as UTF-8 JSON.", field="body", reason="invalid_utf8"
            ) from e
        if "depth limit" in low or "recursion" in low:
            raise IngestError(
                "The body nests objects or arrays too deeply to parse.",
                fix="Flatten the event; nest at most 64 levels.",
                field="body",
                reason="too_deep",
            ) from e
        raise IngestError(
            f"The body is not valid JSON: {msg}.",
            fix="Send a JSON object; control characters inside strings must be escaped (e.g. \\n).",
            field="body",
            reason="invalid_json",
        ) from e
    if not isinstance(value, dict):
        raise IngestError(
            f"The body is a JSON {_json_kind(value)}, not an object.",
            fix='Send one JSON object per call, or {"batch": [...]} to /v1/batch.',
            field="body",
            reason="not_an_object",
        )
    return value


def write_key_from_header(authorization: str | None) -> str | None:
    """The write key in an Authorization header, or None when the header carries none.

    Segment's scheme is HTTP Basic with the key as user name and an empty password; the colon
    is optional (some clients send base64("key")). A Bearer token is taken as the key too."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError) as e:
            raise AuthError(
                "The Authorization header is not valid Basic credentials.",
                fix="Send 'Basic ' + base64('<write key>:').",
                field="Authorization",
                reason="invalid_authorization",
            ) from e
        return decoded.split(":", 1)[0] or None
    if scheme == "bearer" and value:
        return value
    return None


def write_key_from_body(body: dict[str, Any]) -> str | None:
    """The `writeKey` field analytics.js puts in text/plain bodies."""
    key = body.get("writeKey")
    return key if isinstance(key, str) and key else None


def write_key_from(authorization: str | None, body: dict[str, Any] | None) -> str:
    """Segment's write-key auth: the Authorization header first, then `writeKey` in the body."""
    key = write_key_from_header(authorization) or (write_key_from_body(body) if body is not None else None)
    if key is None:
        raise missing_write_key()
    return key


def missing_write_key() -> AuthError:
    return AuthError(
        "No write key was sent.",
        fix="Authenticate with HTTP Basic auth (the write key as user name, empty password) or put writeKey in the body.",
        field="Authorization",
        reason="missing_write_key",
    )


# --- event level ---------------------------------------------------------------------------

def stage(call: str, body: dict[str, Any], limits: Limits, *, new_id: Any = uuid.uuid4) -> list[StagedEvent]:
    """Split a request into staged events: one for a single call, one per item for a batch.

    Single calls that break a rule raise `IngestError` (the client is told, nothing is stored).
    Batch items that break a rule are staged with a `Failure`, so the rest of the batch is kept.
    """
    if call == "batch":
        return _stage_batch(body, limits, new_id)
    if call not in CALL_TYPES:
        raise IngestError(
            f"Unknown call type {call!r}.", fix=f"Use one of: {', '.join(CALL_TYPES)}, batch.", field="type"
        )
    item = dict(body)
    item.pop("writeKey", None)
    declared = item.get("type")
    if declared is not None and declared != call:
        raise IngestError(
            f"The body says type {declared!r} but was posted to /v1/{call}.",
            fix=f"Post it to /v1/{declared} or remove the type field.",
            field="type",
            reason="type_mismatch",
        )
    item["type"] = call
    staged = _stage_item(0, item, None, limits, new_id)
    if staged.failure is not None:
        f = staged.failure
        error = PayloadTooLarge if f.reason == "event_too_large" else IngestError
        raise error(f.message, field=f.field, fix=_FIXES.get(f.reason, "Correct the field named and resend."), reason=f.reason)
    return [staged]


def _stage_batch(body: dict[str, Any], limits: Limits, new_id: Any) -> list[StagedEvent]:
    items = body.get("batch")
    if not isinstance(items, list):
        raise IngestError(
            "A batch needs a 'batch' array of events." if items is None else f"'batch' is a JSON {_json_kind(items)}, not an array.",
            fix="Send {\"batch\": [{\"type\": \"track\", ...}, ...]}.",
            field="/batch",
            reason="invalid_batch",
        )
    if len(items) > limits.max_batch_events:
        raise PayloadTooLarge(
            f"The batch holds {len(items)} events; at most {limits.max_batch_events} are accepted.",
            fix="Split it into smaller batches.",
            field="/batch",
            reason="too_many_events",
        )
    envelope = {k: body[k] for k in (*_ENVELOPE_KEYS, "sentAt") if k in body}
    for k in _ENVELOPE_KEYS:
        if k in envelope and not isinstance(envelope[k], dict):
            raise IngestError(
                f"The batch's '{k}' is a JSON {_json_kind(envelope[k])}, not an object.", fix=f"Send '{k}' as an object.", field=f"/{k}",
                reason="invalid_type",
            )
    envelope_json = orjson.dumps(envelope).decode() if envelope else None
    return [_stage_item(i, item, envelope or None, limits, new_id, envelope_json) for i, item in enumerate(items)]


def _stage_item(
    index: int, item: Any, envelope: dict[str, Any] | None, limits: Limits, new_id: Any, envelope_json: str | None = None
) -> StagedEvent:
    if not isinstance(item, dict):
        raw = orjson.dumps(item).decode()
        return StagedEvent(
            index, str(new_id()), raw, None, raw, _hash(raw.encode()),
            Failure("not_an_object", f"Batch item {index} is a JSON {_json_kind(item)}, not an event object.", f"/batch/{index}"),
        )
    raw_bytes = orjson.dumps(item)
    raw_json = raw_bytes.decode()
    if envelope:
        merged = _merge(item, envelope)
        merged_json = orjson.dumps(merged).decode()
    else:
        merged, merged_json = item, raw_json
    mid = item.get("messageId")
    failure = None
    if isinstance(mid, str) and mid.strip() and len(mid) <= 255:
        message_id = mid
    elif mid is None or mid == "":
        message_id = str(new_id())
    else:
        message_id = str(new_id())
        failure = Failure(
            "invalid_message_id",
            f"messageId must be a string of 1-255 characters, got {_describe(mid)}.",
            "/messageId",
        )
    failure = failure or check_event(item, merged, len(raw_bytes), limits, raw_bytes)
    return StagedEvent(index, message_id, raw_json, envelope_json, merged_json, content_hash(item), failure, merged)


def content_hash(item: dict[str, Any]) -> int:
    """The event's content, ignoring what an SDK re-stamps on a retry (sentAt, writeKey,
    receivedAt) and the order of keys, as a 64-bit hash: equal for a retry, different for a
    reused messageId with other content."""
    if _HASH_EXCLUDED.isdisjoint(item):
        return _hash(orjson.dumps(item, option=orjson.OPT_SORT_KEYS))
    return _hash(orjson.dumps({k: v for k, v in item.items() if k not in _HASH_EXCLUDED}, option=orjson.OPT_SORT_KEYS))


def check_event(
    item: dict[str, Any], merged: dict[str, Any], size: int, limits: Limits, raw: bytes | None = None
) -> Failure | None:
    """Segment's per-event rules. Returns the first rule broken, or None."""
    if size > limits.max_event_bytes:
        return Failure(
            "event_too_large", f"The event is {size} bytes; at most {limits.max_event_bytes} are accepted.", "", "collect"
        )
    call = item.get("type")
    if not isinstance(call, str) or call not in CALL_TYPES:
        what = "missing" if call is None else f"{_describe(call)}"
        return Failure("unknown_type", f"type is {what}; expected one of {', '.join(CALL_TYPES)}.", "/type")
    has_id = False
    for f in _ID_FIELDS:
        v = item.get(f)
        if v is None or v == "":
            continue
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            return Failure("invalid_type", f"{f} must be a string, got {_describe(v)}.", f"/{f}")
        if isinstance(v, str) and not v.strip():
            continue
        has_id = True
    if not has_id:
        return Failure(
            "missing_identity",
            "userId or anonymousId is required: set userId for a known user, or anonymousId for a visitor.",
            "/userId",
        )
    required = _REQUIRED.get(call)
    if required is not None:
        v = item.get(required)
        if v is None or (isinstance(v, str) and not v.strip()):
            return Failure(f"missing_{_snake(required)}", f"A {call} call needs a non-blank {required}.", f"/{required}")
        ok_types: tuple[type, ...] = (str,) if required == "event" else (str, int)
        if isinstance(v, bool) or not isinstance(v, ok_types):
            return Failure("invalid_type", f"{required} must be a string, got {_describe(v)}.", f"/{required}")
    for name_field in ("name", "category"):
        v = item.get(name_field)
        if v is not None and not isinstance(v, str):
            return Failure("invalid_type", f"{name_field} must be a string, got {_describe(v)}.", f"/{name_field}")
    for f in _OBJECT_FIELDS:
        v = merged.get(f)
        if v is not None and not isinstance(v, dict):
            return Failure("invalid_type", f"{f} must be a JSON object, got {_describe(v)}.", f"/{f}")
    for f in _TIME_FIELDS:
        v = merged.get(f)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (str, int, float))):
            return Failure(
                "invalid_timestamp", f"{f} must be an ISO-8601 string or epoch number, got {_describe(v)}.", f"/{f}", "collect"
            )
    # Counting brackets in the serialised event is an upper bound on its depth (brackets inside
    # strings only add to it), so the walk runs only for the rare event that could be too deep.
    may_be_deep = raw is None or raw.count(b"{") + raw.count(b"[") > limits.max_json_depth
    if may_be_deep and _depth(item, limits.max_json_depth) > limits.max_json_depth:
        return Failure("too_deep", f"The event nests deeper than {limits.max_json_depth} levels.", "")
    return None


def _merge(item: dict[str, Any], envelope: dict[str, Any]) -> dict[str, Any]:
    """Batch-level context/integrations/sentAt apply to each item; the item's own keys win."""
    merged = dict(item)
    for k, v in envelope.items():
        mine = merged.get(k)
        if mine is None:
            merged[k] = v
        elif isinstance(mine, dict) and isinstance(v, dict):
            merged[k] = {**v, **mine}
    return merged


def _depth(value: Any, limit: int) -> int:
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > deepest:
            deepest = d
            if deepest > limit:
                return deepest
        children = v.values() if isinstance(v, dict) else v
        for c in children:
            if isinstance(c, (dict, list)):
                stack.append((c, d + 1))
    return deepest


def _hash(data: bytes, _blake2b: Any = hashlib.blake2b, _from_bytes: Any = int.from_bytes) -> int:
    return _from_bytes(_blake2b(data, digest_size=8).digest(), "big")


def _json_kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _describe(v: Any) -> str:
    text = orjson.dumps(v).decode() if not isinstance(v, (dict, list)) else _json_kind(v)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{_json_kind(v)} {text}" if not isinstance(v, (dict, list)) else f"a JSON {text}"


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)
