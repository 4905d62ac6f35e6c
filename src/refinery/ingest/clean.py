"""Cleaning: raw payloads -> the one clean schema for every call type, as SQL built with sqlglot.

`clean_select(relation)` is a pure function from an input relation (columns `raw_id, source,
message_id, received_at, payload, import_id`, where payload is the event JSON with any batch
envelope merged in) to a SELECT of every `events` column plus `_reason`, `_message`, `_field`:
NULL reason means clean, anything else goes to the failed zone. The collector, the batch importer
and replay all use it, so an event is cleaned the same way whichever door it came through.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlglot import exp

from refinery.privacy.pii import protect_expression
from refinery.storage.engine import parse

#: Columns of `events`, in table order.
EVENT_COLUMNS: tuple[str, ...] = (
    "message_id", "source", "type", "event", "name", "user_id", "anonymous_id", "group_id", "previous_id",
    "timestamp", "original_timestamp", "sent_at", "received_at", "properties", "traits", "context",
    "ip", "user_agent", "page_url", "page_path", "page_referrer", "device_id", "advertising_id", "locale",
    "library_name", "consent", "raw_id", "import_id", "loaded_at",
)

#: Column -> JSON path in the payload, for plain text fields (coalesced left to right).
_TEXT_FIELDS: dict[str, tuple[str, ...]] = {
    "type": ("$.type",),
    "event": ("$.event",),
    "name": ("$.name", "$.properties.name"),
    "user_id": ("$.userId",),
    "anonymous_id": ("$.anonymousId",),
    "group_id": ("$.groupId",),
    "previous_id": ("$.previousId",),
    "ip": ("$.context.ip",),
    "user_agent": ("$.context.userAgent",),
    "page_url": ("$.context.page.url", "$.properties.url"),
    "page_path": ("$.context.page.path", "$.properties.path"),
    "page_referrer": ("$.context.page.referrer", "$.properties.referrer"),
    "device_id": ("$.context.device.id",),
    "advertising_id": ("$.context.device.advertisingId",),
    "locale": ("$.context.locale",),
    "library_name": ("$.context.library.name",),
}

_JSON_FIELDS: dict[str, tuple[str, ...]] = {
    "properties": ("$.properties",),
    "traits": ("$.traits", "$.context.traits"),
    "context": ("$.context",),
    "consent": ("$.context.consent",),
}


@dataclass(frozen=True)
class CleanRules:
    """The plausibility window for corrected timestamps."""

    min_event_time: str = "2000-01-01T00:00:00Z"
    max_future_skew_seconds: int = 24 * 3600


_SKEW_RANGE = "TIMESTAMPTZ '0001-01-01 00:00:00+00' AND TIMESTAMPTZ '9999-12-31 23:59:59+00'"


def _text(path: str) -> exp.Expression:
    return parse(f"NULLIF(TRIM(payload ->> '{path}'), '')")


def _json(path: str) -> exp.Expression:
    return parse(f"payload -> '{path}'")


def _coalesce(parts: list[exp.Expression]) -> exp.Expression:
    return parts[0] if len(parts) == 1 else exp.func("COALESCE", *parts)


def _epoch(number_sql: str) -> str:
    # Epoch seconds below 1e11 (year 5138), milliseconds below 1e14; anything else is not a time.
    return (
        f"CASE WHEN abs({number_sql}) < 1e11 THEN to_timestamp({number_sql}) "
        f"WHEN abs({number_sql}) < 1e14 THEN to_timestamp({number_sql} / 1000.0) END"
    )


def _timestamp(field: str) -> str:
    """SQL parsing `payload.<field>` as an ISO-8601 string, an epoch number, or a string of digits."""
    text = f"(payload ->> '$.{field}')"
    number = f"TRY_CAST({text} AS DOUBLE)"
    return (
        f"(CASE json_type(payload, '$.{field}') "
        f"WHEN 'VARCHAR' THEN COALESCE(TRY_CAST({text} AS TIMESTAMPTZ), "
        f"CASE WHEN regexp_full_match(trim({text}), '-?[0-9]+(\\.[0-9]+)?') THEN {_epoch(number)} END) "
        f"WHEN 'NULL' THEN NULL "
        f"ELSE {_epoch(number)} END)"
    )


def _present(field: str) -> str:
    return f"(json_type(payload, '$.{field}') IS NOT NULL AND json_type(payload, '$.{field}') <> 'NULL')"


def clean_select(relation: str | exp.Expression, rules: CleanRules = CleanRules()) -> exp.Select:
    """The cleaning transformation over `relation`, as one SELECT (see the module docstring)."""
    source = exp.to_table(relation) if isinstance(relation, str) else relation
    parsed = parse(
        f"""
        SELECT *,
          {_timestamp('originalTimestamp')} AS _ts_original,
          {_timestamp('timestamp')} AS _ts_timestamp,
          {_timestamp('sentAt')} AS _ts_sent
        FROM _input
        """
    )
    replacement = source.copy() if isinstance(source, exp.Table) else exp.Subquery(this=source.copy(), alias=exp.TableAlias(this=exp.to_identifier("_input")))
    parsed.find(exp.Table).replace(replacement)
    staged = parsed.subquery("_parsed")

    columns: dict[str, exp.Expression] = {}
    for col in EVENT_COLUMNS:
        if col in _TEXT_FIELDS:
            columns[col] = _coalesce([_text(p) for p in _TEXT_FIELDS[col]])
        elif col in _JSON_FIELDS:
            columns[col] = _coalesce([_json(p) for p in _JSON_FIELDS[col]])
    columns["message_id"] = exp.column("message_id")
    columns["source"] = exp.column("source")
    columns["original_timestamp"] = parse("COALESCE(_ts_original, _ts_timestamp)")
    columns["sent_at"] = exp.column("_ts_sent")
    columns["received_at"] = exp.column("received_at")
    # Skew correction only between finite times of years 1-9999: beyond that (or with 'infinity')
    # the interval overflows and would abort the whole commit; such events fail the range checks.
    columns["timestamp"] = parse(
        "CASE WHEN COALESCE(_ts_original, _ts_timestamp) IS NULL THEN received_at "
        "WHEN _ts_sent IS NULL "
        f"OR NOT (_ts_sent BETWEEN {_SKEW_RANGE}) "
        f"OR NOT (COALESCE(_ts_original, _ts_timestamp) BETWEEN {_SKEW_RANGE}) "
        "THEN COALESCE(_ts_original, _ts_timestamp) "
        "ELSE received_at - (_ts_sent - COALESCE(_ts_original, _ts_timestamp)) END"
    )
    columns["raw_id"] = exp.column("raw_id")
    columns["import_id"] = exp.column("import_id")
    columns["loaded_at"] = parse("now()")
    for col, kind in (("ip", "ip"),):
        columns[col] = protect_expression(kind, columns[col])

    reason, message, field = _failure_columns(rules)
    inner = exp.select(*(e.as_(c) for c, e in ((c, columns[c]) for c in EVENT_COLUMNS))).from_(staged)
    inner = inner.select(
        parse("payload").as_("_payload"),
        parse("_ts_original").as_("_ts_original"),
        parse("_ts_timestamp").as_("_ts_timestamp"),
        parse("_ts_sent").as_("_ts_sent"),
        parse(f"{_present('originalTimestamp')}").as_("_has_original"),
        parse(f"{_present('timestamp')}").as_("_has_timestamp"),
        parse(f"{_present('sentAt')}").as_("_has_sent"),
        parse("payload ->> '$.originalTimestamp'").as_("_text_original"),
        parse("payload ->> '$.timestamp'").as_("_text_timestamp"),
        parse("payload ->> '$.sentAt'").as_("_text_sent"),
    )
    return exp.select("*", reason.as_("_reason"), message.as_("_message"), field.as_("_field")).from_(
        inner.subquery("_cleaned")
    )


def _failure_columns(rules: CleanRules) -> tuple[exp.Expression, exp.Expression, exp.Expression]:
    checks: list[tuple[str, str, str, str]] = [
        # (condition, reason, message SQL, field)
        (
            "_has_original AND _ts_original IS NULL",
            "invalid_timestamp",
            "'originalTimestamp ' || to_json(_text_original) || ' is not an ISO-8601 time or epoch number; send e.g. \"2026-01-31T12:00:00Z\".'",
            "/originalTimestamp",
        ),
        (
            "_has_timestamp AND _ts_timestamp IS NULL",
            "invalid_timestamp",
            "'timestamp ' || to_json(_text_timestamp) || ' is not an ISO-8601 time or epoch number; send e.g. \"2026-01-31T12:00:00Z\".'",
            "/timestamp",
        ),
        (
            "_has_sent AND _ts_sent IS NULL",
            "invalid_timestamp",
            "'sentAt ' || to_json(_text_sent) || ' is not an ISO-8601 time or epoch number; send e.g. \"2026-01-31T12:00:00Z\".'",
            "/sentAt",
        ),
        (
            f"timestamp > received_at + INTERVAL {int(rules.max_future_skew_seconds)} SECOND",
            "timestamp_in_future",
            f"'timestamp ' || strftime(timestamp, '%Y-%m-%dT%H:%M:%SZ') || ' is more than {int(rules.max_future_skew_seconds)} s after the event was received; fix the client clock or the timestamp field (or raise max_future_skew_seconds).'",
            "/timestamp",
        ),
        (
            f"timestamp < TIMESTAMPTZ '{_iso(rules.min_event_time)}'",
            "timestamp_too_old",
            f"'timestamp ' || strftime(timestamp, '%Y-%m-%dT%H:%M:%SZ') || ' is before {_iso(rules.min_event_time)}; fix the timestamp field (or lower min_event_time).'",
            "/timestamp",
        ),
    ]
    reason = exp.Case()
    message = exp.Case()
    field = exp.Case()
    for cond, code, msg, ptr in checks:
        c = parse(cond)
        reason = reason.when(c, exp.Literal.string(code))
        message = message.when(c.copy(), parse(msg))
        field = field.when(c.copy(), exp.Literal.string(ptr))
    return reason, message, field


def _iso(value: str) -> str:
    # Settings are validated text, but never let a quote through into SQL.
    if not all(ch.isalnum() or ch in "-:.+TZ " for ch in value):
        raise ValueError(f"min_event_time {value!r} is not an ISO-8601 time")
    return value
