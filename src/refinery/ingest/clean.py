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

_TIMESTAMP_FIELDS = ("originalTimestamp", "timestamp", "sentAt")


def _unique(paths: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(paths))


#: Every path read as text, and every path read as JSON: each list is extracted with one parse of
#: the payload per row (`json_extract_string(payload, [...])`), instead of one parse per field.
_TEXT_PATHS = _unique([p for ps in _TEXT_FIELDS.values() for p in ps] + [f"$.{f}" for f in _TIMESTAMP_FIELDS])
_JSON_PATHS = _unique([p for ps in _JSON_FIELDS.values() for p in ps] + [f"$.{f}" for f in _TIMESTAMP_FIELDS])


def _path_list(paths: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{p}'" for p in paths) + "]"


def _text_at(path: str) -> str:
    """`payload ->> path`, read from the row's pre-extracted text list."""
    return f"list_extract(_texts, {_TEXT_PATHS.index(path) + 1})"


def _json_at(path: str) -> str:
    """`payload -> path`, read from the row's pre-extracted JSON list."""
    return f"list_extract(_jsons, {_JSON_PATHS.index(path) + 1})"


def _text(path: str) -> str:
    return f"NULLIF(TRIM({_text_at(path)}), '')"


def _coalesce(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else f"COALESCE({', '.join(parts)})"


def _epoch(number: str) -> str:
    # Epoch seconds below 1e11 (year 5138), milliseconds below 1e14; anything else is not a time.
    return (
        f"CASE WHEN abs({number}) < 1e11 THEN to_timestamp({number}) "
        f"WHEN abs({number}) < 1e14 THEN to_timestamp({number} / 1000.0) END"
    )


#: Short names of the three time fields, as used in the column names of the stages below.
_TIME_FIELDS = {"original": "originalTimestamp", "timestamp": "timestamp", "sent": "sentAt"}


def _stages(rules: CleanRules) -> list[list[str]]:
    """The cleaning as a chain of projections, each computing a value once for the next to read.

    Keeping every intermediate value in its own column (rather than repeating its expression where
    it is used) keeps the statement small: DuckDB's parse, bind and optimise time grows with the
    text, and for a group commit of a few hundred rows it costs more than running the query.
    """
    extracted = [
        f"json_extract_string(payload, {_path_list(_TEXT_PATHS)}) AS _texts",
        f"json_extract(payload, {_path_list(_JSON_PATHS)}) AS _jsons",
    ]
    # The JSON type, the text and the number of each time field.
    typed = [
        item
        for s, f in _TIME_FIELDS.items()
        for item in (
            f"json_type({_json_at('$.' + f)}) AS _kind_{s}",
            f"{_text_at('$.' + f)} AS _text_{s}",
            f"TRY_CAST({_text_at('$.' + f)} AS DOUBLE) AS _num_{s}",
        )
    ]
    # Each time field parsed as an ISO-8601 string, an epoch number, or a string of digits.
    parsed = [
        item
        for s in _TIME_FIELDS
        for item in (
            f"(CASE _kind_{s} WHEN 'VARCHAR' THEN COALESCE(TRY_CAST(_text_{s} AS TIMESTAMPTZ), "
            f"CASE WHEN regexp_full_match(trim(_text_{s}), '-?[0-9]+(\\.[0-9]+)?') THEN {_epoch('_num_' + s)} END) "
            f"WHEN 'NULL' THEN NULL ELSE {_epoch('_num_' + s)} END) AS _ts_{s}",
            f"(_kind_{s} IS NOT NULL AND _kind_{s} <> 'NULL') AS _has_{s}",
        )
    ]
    event_time = ["COALESCE(_ts_original, _ts_timestamp) AS _ts_event"]
    columns: dict[str, str] = {}
    for col in EVENT_COLUMNS:
        if col in _TEXT_FIELDS:
            columns[col] = _coalesce([_text(p) for p in _TEXT_FIELDS[col]])
        elif col in _JSON_FIELDS:
            columns[col] = _coalesce([_json_at(p) for p in _JSON_FIELDS[col]])
    columns.update(
        message_id="message_id",
        source="source",
        original_timestamp="_ts_event",
        sent_at="_ts_sent",
        received_at="received_at",
        # Skew correction only between finite times of years 1-9999: beyond that (or with 'infinity')
        # the interval overflows and would abort the whole commit; such events fail the range checks.
        timestamp=(
            "CASE WHEN _ts_event IS NULL THEN received_at "
            f"WHEN _ts_sent IS NULL OR NOT (_ts_sent BETWEEN {_SKEW_RANGE}) OR NOT (_ts_event BETWEEN {_SKEW_RANGE}) "
            "THEN _ts_event ELSE received_at - (_ts_sent - _ts_event) END"
        ),
        raw_id="raw_id",
        import_id="import_id",
        loaded_at="now()",
    )
    cleaned = [f"{columns[c]} AS {c}" for c in EVENT_COLUMNS] + ["payload AS _payload", *_CHECKED]
    checked = ["*", f"{_check(rules)} AS _check"]
    stages: list[list[str]] = [["*", *extracted], ["*", *typed], ["*", *parsed], ["*", *event_time], cleaned, checked]
    return stages


#: Intermediate columns the checks read, carried from the stages into the cleaned row.
_CHECKED = [f"_{kind}_{s}" for s in _TIME_FIELDS for kind in ("text", "has", "ts")]


def clean_select(relation: str | exp.Expression, rules: CleanRules = CleanRules()) -> exp.Select:
    """The cleaning transformation over `relation`, as one SELECT (see the module docstring).

    Each row's payload is parsed twice (once for the text fields, once for the JSON ones), then
    every column reads the extracted lists: JSON parsing dominates the cost of running it.
    """
    source = exp.to_table(relation) if isinstance(relation, str) else relation
    inner: exp.Expression = source.copy() if isinstance(source, exp.Table) else exp.Subquery(
        this=source.copy(), alias=exp.TableAlias(this=exp.to_identifier("_input"))
    )
    query = exp.select("*").from_(inner)
    for i, projection in enumerate(_stages(rules)):
        query = exp.select(*projection, dialect="duckdb").from_(query.subquery(f"_stage{i}"))
    reasons, messages, fields = _failure_columns(rules)
    return exp.select(
        *EVENT_COLUMNS, "_payload", *_CHECKED,
        f"list_extract({reasons}, _check) AS _reason", f"CASE _check {messages} END AS _message",
        f"list_extract({fields}, _check) AS _field",
        dialect="duckdb",
    ).from_(query.subquery("_cleaned"))


def _checks(rules: CleanRules) -> list[tuple[str, str, str, str]]:
    """The cleaning checks, first match wins: (condition, reason, message SQL, field)."""
    skew = int(rules.max_future_skew_seconds)
    oldest = _iso(rules.min_event_time)
    return [
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
            f"timestamp > received_at + INTERVAL {skew} SECOND",
            "timestamp_in_future",
            f"'timestamp ' || strftime(timestamp, '%Y-%m-%dT%H:%M:%SZ') || ' is more than {skew} s after the event was received; fix the client clock or the timestamp field (or raise max_future_skew_seconds).'",
            "/timestamp",
        ),
        (
            f"timestamp < TIMESTAMPTZ '{oldest}'",
            "timestamp_too_old",
            f"'timestamp ' || strftime(timestamp, '%Y-%m-%dT%H:%M:%SZ') || ' is before {oldest}; fix the timestamp field (or lower min_event_time).'",
            "/timestamp",
        ),
    ]


def _check(rules: CleanRules) -> str:
    """The 1-based number of the first failed check, NULL when the row is clean."""
    whens = " ".join(f"WHEN {cond} THEN {i}" for i, (cond, _, _, _) in enumerate(_checks(rules), 1))
    return f"CASE {whens} END"


def _failure_columns(rules: CleanRules) -> tuple[str, str, str]:
    """SQL for the reason list, the message CASE arms, and the field list, indexed by `_check`."""
    checks = _checks(rules)
    reasons = "[" + ", ".join(f"'{code}'" for _, code, _, _ in checks) + "]"
    messages = " ".join(f"WHEN {i} THEN {msg}" for i, (_, _, msg, _) in enumerate(checks, 1))
    fields = "[" + ", ".join(f"'{ptr}'" for _, _, _, ptr in checks) + "]"
    return reasons, messages, fields


def _iso(value: str) -> str:
    # Settings are validated text, but never let a quote through into SQL.
    if not all(ch.isalnum() or ch in "-:.+TZ " for ch in value):
        raise ValueError(f"min_event_time {value!r} is not an ISO-8601 time")
    return value
