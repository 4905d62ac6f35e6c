"""Writing ingested events into the zones, inside the writer's transaction.

One group commit does, for every staged event: append it to the raw zone; absorb retries (same
source and messageId within the dedup window, same content); quarantine conflicting reuses of a
messageId and events that broke a protocol or plan rule; clean the rest with `clean_select` into
`events`, quarantining what cleaning rejects. Every event gets an outcome.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, NamedTuple

import orjson
import pyarrow as pa
from sqlglot import exp

from refinery.governance.ingest_consent import ConsentGate, minimise
from refinery.ingest.clean import EVENT_COLUMNS, CleanRules, clean_select
from refinery.ingest.protocol import Failure, StagedEvent
from refinery.privacy.tokens import PiiValue, subject_of
from refinery.privacy.vault import Vault
from refinery.storage.engine import ConstraintViolation, Engine, parse
from refinery.storage.writer import RetryGroup

Status = Literal["loaded", "duplicate", "failed", "suppressed"]


@dataclass(slots=True)
class IngestItem:
    source: str
    request_id: str
    received_at: datetime
    event: StagedEvent


class Outcome(NamedTuple):
    """What became of one event. A named tuple: a group commit makes one per event, and a frozen
    dataclass costs three times as much to build."""

    status: Status
    message_id: str
    reason: str | None = None
    message: str | None = None
    field: str | None = None


_STAGED_SCHEMA = pa.schema(
    [
        ("raw_id", pa.int64()),
        ("request_id", pa.string()),
        ("source", pa.string()),
        ("message_id", pa.string()),
        ("received_at", pa.timestamp("us", tz="UTC")),
        ("payload", pa.string()),
        ("envelope", pa.string()),
        ("key_id", pa.string()),
        ("sealed", pa.binary()),
        ("fail_sealed", pa.binary()),
        ("merged", pa.string()),
        ("payload_hash", pa.uint64()),
        ("pre_reason", pa.string()),
        ("pre_message", pa.string()),
        ("pre_field", pa.string()),
        ("pre_stage", pa.string()),
        ("is_new", pa.bool_()),
    ]
)

FAILED_COLUMNS = (
    "failure_id", "raw_id", "source", "message_id", "stage", "reason", "message", "field", "payload",
    "received_at", "failed_at", "import_id", "file", "row_number",
)

SUPPRESSED = Failure(
    "suppressed",
    "The person this event belongs to asked to be erased; their identifiers are on the suppression list, "
    "so the event was not stored.",
    None,
    "privacy",
)


class EventStore:
    """The writer's batch handler for collector events (see the module docstring)."""

    def __init__(self, rules: CleanRules, vault: Vault | None = None, gate: ConsentGate | None = None):
        self.rules = rules
        self.vault = vault
        self.gate = gate if gate is not None and gate.active else None
        self._next_raw_id: int | None = None
        #: Record message ids with a plain INSERT (cheap) rather than INSERT ... ON CONFLICT
        #: (~4x dearer in DuckDB). Switched off by a group that met an id already stored, and on
        #: again by the first careful group that meets none.
        self._optimistic = True

    def allocate_raw_ids(self, engine: Engine, n: int) -> int:
        """Reserve n raw ids; safe because only the writer thread calls it."""
        if self._next_raw_id is None:
            row = engine.fetch_all("SELECT COALESCE(max(raw_id), 0) FROM raw_events")
            self._next_raw_id = int(row[0][0]) + 1
        first = self._next_raw_id
        self._next_raw_id += n
        return first

    def write(self, engine: Engine, items: Sequence[IngestItem]) -> list[Outcome]:
        """Write a group: events of erased people (suppression list) are dropped first, the rest
        are protected (personal fields to tokens, payloads sealed) and written."""
        if self.vault is None:
            return self._write(engine, items, None)
        if self.gate is not None:
            self.gate.refresh(engine)
        protected = [protect_item(self.vault, it, self.gate) for it in items]
        if not self.vault.suppressed or not any(p.suppressed for p in protected):
            return self._write(engine, items, protected)
        kept = [i for i, p in enumerate(protected) if not p.suppressed]
        written = iter(self._write(engine, [items[i] for i in kept], [protected[i] for i in kept]) if kept else [])
        return [
            next(written) if not p.suppressed else Outcome("suppressed", it.event.message_id, SUPPRESSED.reason, SUPPRESSED.message)
            for it, p in zip(items, protected, strict=True)
        ]

    def _write(self, engine: Engine, items: Sequence[IngestItem], protected: list[Protected] | None) -> list[Outcome]:
        first = self.allocate_raw_ids(engine, len(items))
        outcomes: list[Outcome | None] = [None] * len(items)

        # Duplicates inside this group: the first occurrence decides; later ones are retries or conflicts.
        first_seen: dict[tuple[str, str], int] = {}
        failures: list[Failure | None] = [it.event.failure for it in items]
        is_candidate = [True] * len(items)
        for i, it in enumerate(items):
            key = (it.source, it.event.message_id)
            j = first_seen.setdefault(key, i)
            if j != i:
                is_candidate[i] = False
                if items[j].event.payload_hash == it.event.payload_hash:
                    outcomes[i] = Outcome("duplicate", it.event.message_id)
                    failures[i] = None
                else:
                    failures[i] = _conflict(it.event.message_id)

        table = pa.table(
            {
                "raw_id": pa.array(range(first, first + len(items)), pa.int64()),
                "request_id": [it.request_id for it in items],
                "source": [it.source for it in items],
                "message_id": [it.event.message_id for it in items],
                "received_at": pa.array(_micros([it.received_at for it in items]), pa.timestamp("us", tz="UTC")),
                "payload": [it.event.raw_json for it in items] if protected is None else [None] * len(items),
                "envelope": [it.event.envelope_json for it in items] if protected is None else [None] * len(items),
                "key_id": None if protected is None else [p.key_id for p in protected],
                "sealed": None if protected is None else _seal_raw(self.vault, items, protected),
                "fail_sealed": _seal_failed(self.vault, items, protected, failures),
                "merged": [it.event.merged_json for it in items] if protected is None else [p.merged_json for p in protected],
                "payload_hash": pa.array([it.event.payload_hash for it in items], pa.uint64()),
                "pre_reason": [f.reason if f else None for f in failures],
                "pre_message": [f.message if f else None for f in failures],
                "pre_field": [f.field if f else None for f in failures],
                "pre_stage": [f.stage if f else None for f in failures],
                "is_new": is_candidate,
            },
            schema=_STAGED_SCHEMA,
        )
        engine.stage("_staged", table)
        try:
            seen_before = self._record_ids(engine, items, is_candidate)
            if seen_before:
                known = self._known_hashes(engine, [items[i] for i in seen_before])
                for i in seen_before:
                    it = items[i]
                    is_candidate[i] = False
                    if known.get((it.source, it.event.message_id)) == it.event.payload_hash:
                        outcomes[i] = Outcome("duplicate", it.event.message_id)
                        failures[i] = None
                    else:
                        failures[i] = _conflict(it.event.message_id)
                table = _with_failures(table, failures, is_candidate, _seal_failed(self.vault, items, protected, failures))
                engine.stage("_staged", table)
            engine.execute_reused(_RAW_INSERT)
            if protected is not None:
                assert self.vault is not None
                self.vault.put_values(engine, [
                    (p.key_id, v) for i, p in enumerate(protected) if is_candidate[i] and failures[i] is None for v in p.values
                ])

            # Quarantine what broke a rule before cleaning (protocol, plan, dedup conflicts).
            if any(f is not None for f in failures):
                engine.execute_reused(_QUARANTINE_STAGED)
            for i, f in enumerate(failures):
                if f is not None and outcomes[i] is None:
                    outcomes[i] = Outcome("failed", items[i].event.message_id, f.reason, f.message, f.field)

            to_clean = sum(1 for i, f in enumerate(failures) if f is None and is_candidate[i])
            cleaned_failures = (
                insert_clean(engine, _TO_CLEAN, self.rules, expected=to_clean, reuse_plan=True) if to_clean else []
            )
            if cleaned_failures and protected is not None:
                # What cleaning rejected keeps the protected payload; its key says whose it is (erasure).
                engine.execute(_KEY_CLEAN_FAILURES, [first, first + len(items)])
        finally:
            engine.stage("_staged", table.slice(0, 0))  # let go of the rows
        for raw_id, reason, message, field in cleaned_failures:
            assert raw_id is not None  # the collector's rows always carry one
            i = raw_id - first
            outcomes[i] = Outcome("failed", items[i].event.message_id, reason, message, field)
        return [o if o is not None else Outcome("loaded", items[i].event.message_id) for i, o in enumerate(outcomes)]

    def _record_ids(self, engine: Engine, items: Sequence[IngestItem], is_candidate: list[bool]) -> list[int]:
        """Add the group's first occurrences to `message_ids`; return the indexes of those the
        dedup window already held (retries or conflicting reuses, for the caller to sort out).

        The primary key of `message_ids` decides, always. Optimistically, a plain INSERT: when an
        id is already there it fails, the transaction is aborted, and the writer runs the group
        again (`RetryGroup`) with INSERT ... ON CONFLICT, which reports the ids that were new.
        """
        if not any(is_candidate):
            return []
        if self._optimistic:
            try:
                engine.execute_reused(_RECORD_IDS)
            except ConstraintViolation as e:
                self._optimistic = False
                raise RetryGroup() from e
            return []
        fresh = set(engine.execute_reused(_RECORD_NEW_IDS).fetchall())
        seen_before = [
            i for i, it in enumerate(items) if is_candidate[i] and (it.source, it.event.message_id) not in fresh
        ]
        self._optimistic = not seen_before
        return seen_before

    @staticmethod
    def _known_hashes(engine: Engine, items: list[IngestItem]) -> dict[tuple[str, str], int]:
        known: dict[tuple[str, str], int] = {}
        by_source: dict[str, list[str]] = {}
        for it in items:
            by_source.setdefault(it.source, []).append(it.event.message_id)
        for source, ids in by_source.items():
            rows = engine.fetch_all(
                "SELECT message_id, payload_hash FROM message_ids "
                "WHERE source = ? AND message_id IN (SELECT unnest(CAST(? AS VARCHAR[])))",
                [source, ids],
            )
            known.update({(source, m): int(h) for m, h in rows})
        return known


def insert_clean(
    engine: Engine,
    relation: exp.Expression | str,
    rules: CleanRules,
    *,
    file: str | None = None,
    expected: int | None = None,
    reuse_plan: bool = False,
) -> list[tuple[int | None, str, str, str]]:
    """Clean `relation` into `events`; quarantine what cleaning rejects. Returns the rejected
    (raw_id, reason, message, field) rows (raw_id is NULL for imported rows). `relation` has raw_id, source, message_id, received_at,
    payload, import_id (and optionally row_number); a caller that runs the same relation on every
    commit passes it rendered (constant SQL text), as rendering a sqlglot tree copies it first.

    When the caller knows how many rows `relation` holds (`expected`) and all of them were clean,
    the second pass that quarantines rejects is skipped: it would find nothing, and planning the
    cleaning SQL costs more than running it on a group commit's rows. `reuse_plan` asks the engine
    to plan the statements once (for a relation whose text never changes, like the collector's).
    """
    to_events, to_failed = _clean_insert_sql(engine.render(relation), engine.dialect, rules, file)
    run = engine.execute_reused if reuse_plan else engine.execute
    inserted = run(to_events).fetchall()[0][0]
    if expected is not None and int(inserted) == expected:
        return []
    rows = run(to_failed).fetchall()
    return [(None if r[0] is None else int(r[0]), r[1], r[2], r[3]) for r in rows]


@functools.lru_cache(maxsize=64)
def _clean_insert_sql(relation_sql: str, dialect: str, rules: CleanRules, file: str | None) -> tuple[str, str]:
    """The two INSERTs of `insert_clean`, rendered once per relation: building the cleaning SQL with
    sqlglot costs tens of milliseconds, more than running it on a group commit's rows."""
    cleaned = clean_select(parse(relation_sql, dialect), rules)
    to_events = exp.insert(
        exp.select(*EVENT_COLUMNS).from_(cleaned.subquery("_c")).where("_reason IS NULL"),
        "events",
        columns=list(EVENT_COLUMNS),
    )
    failed = exp.select(
        "nextval('failed_event_seq')", "raw_id", "source", "message_id", "'clean'", "_reason", "_message", "_field",
        "_payload", "received_at", "now()", "import_id", exp.Literal.string(file) if file else "NULL", "NULL",
    ).from_(cleaned.subquery("_c")).where("_reason IS NOT NULL")
    to_failed = exp.insert(failed, "failed_events", columns=list(FAILED_COLUMNS))
    return to_events.sql(dialect), to_failed.sql(dialect) + " RETURNING raw_id, reason, message, field"


_RAW_INSERT = (
    "INSERT INTO raw_events (raw_id, request_id, source, message_id, received_at, payload, envelope, key_id, sealed) "
    "SELECT raw_id, request_id, source, message_id, received_at, payload, envelope, key_id, sealed FROM _staged"
)
_KEY_CLEAN_FAILURES = (
    "UPDATE failed_events SET key_id = s.key_id FROM _staged s "
    "WHERE failed_events.raw_id = s.raw_id AND failed_events.raw_id >= ? AND failed_events.raw_id < ? "
    "AND failed_events.stage = 'clean' AND failed_events.key_id IS NULL"
)
#: First occurrences into the dedup window: the plain form fails on an id already there.
_RECORD_IDS = "INSERT INTO message_ids SELECT source, message_id, payload_hash, received_at FROM _staged WHERE is_new"
_RECORD_NEW_IDS = _RECORD_IDS + " ON CONFLICT DO NOTHING RETURNING source, message_id"

_QUARANTINE_STAGED = exp.insert(
    parse(
        "SELECT nextval('failed_event_seq'), raw_id, source, message_id, pre_stage, pre_reason, pre_message, "
        "pre_field, CASE WHEN fail_sealed IS NULL THEN merged END, received_at, now(), NULL, NULL, NULL, "
        "key_id, fail_sealed FROM _staged WHERE pre_reason IS NOT NULL"
    ),
    "failed_events",
    columns=[*FAILED_COLUMNS, "key_id", "sealed"],
).sql("duckdb")

_TO_CLEAN = parse(
    "SELECT raw_id, source, message_id, received_at, merged AS payload, "
    "CAST(NULL AS VARCHAR) AS import_id FROM _staged WHERE is_new AND pre_reason IS NULL"
).sql("duckdb")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(times: list[datetime]) -> list[int]:
    """Microseconds since the epoch, converting each distinct object once (a request's events share
    one): pyarrow converts aware datetimes one by one, at half the cost of the whole staging."""
    out: list[int] = []
    last: datetime | None = None
    us = 0
    for t in times:
        if t is not last:
            last = t
            us = ((t if t.tzinfo is not None else t.replace(tzinfo=UTC)) - _EPOCH) // _MICROSECOND
        out.append(us)
    return out


_MICROSECOND = timedelta(microseconds=1)


def _conflict(message_id: str) -> Failure:
    return Failure(
        "duplicate_message_id_conflict",
        f"messageId {message_id!r} was already used for an event with different content; "
        "give each distinct event its own messageId (retries must resend the same content).",
        "/messageId",
        "dedup",
    )


def _with_failures(
    table: pa.Table, failures: list[Failure | None], is_new: list[bool], fail_sealed: list[bytes | None] | None
) -> pa.Table:
    table = table.set_column(table.schema.get_field_index("fail_sealed"), "fail_sealed", pa.array(fail_sealed, pa.binary()))
    cols = {
        "pre_reason": [f.reason if f else None for f in failures],
        "pre_message": [f.message if f else None for f in failures],
        "pre_field": [f.field if f else None for f in failures],
        "pre_stage": [f.stage if f else None for f in failures],
    }
    for name, values in cols.items():
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return table.set_column(table.schema.get_field_index("is_new"), "is_new", pa.array(is_new, pa.bool_()))


# --- protection (privacy/vault.py): tokens before cleaning, sealed payloads, suppression ---------------

@dataclass(slots=True)
class Protected:
    """One event as the vault wants it written: its key, the cleaned form with tokens, the values
    the tokens replace (to seal into the vault), and whether its person was erased."""

    key_id: str
    merged_json: str
    values: list[PiiValue]
    suppressed: bool


def protect_item(vault: Vault, item: IngestItem, gate: ConsentGate | None = None) -> Protected:
    ev = item.event
    merged = ev.merged
    subject = subject_of(merged) if merged is not None else None
    key_id = vault.key_id(subject) if subject else vault.event_key_id(item.source, ev.message_id)
    if merged is None or ev.failure is not None:
        return Protected(key_id, ev.merged_json, [], False)
    denied = gate.reason(merged) if gate is not None else None
    out, values = vault.tokens.protect_event(minimise(merged, denied) if denied else merged)
    merged_json = orjson.dumps(out).decode() if out is not merged else ev.merged_json
    return Protected(key_id, merged_json, values, vault.suppressed_event(merged, values))


def _seal_raw(vault: Vault | None, items: Sequence[IngestItem], protected: list[Protected]) -> list[bytes | None]:
    """Each raw event (the item as received and its batch envelope) sealed under its subject's key."""
    assert vault is not None
    plain = [
        b'{"payload":' + it.event.raw_json.encode() + b',"envelope":' + (it.event.envelope_json or "null").encode() + b"}"
        for it in items
    ]
    return vault.seal_many([p.key_id for p in protected], plain)


def _seal_failed(
    vault: Vault | None, items: Sequence[IngestItem], protected: list[Protected] | None, failures: list[Failure | None]
) -> list[bytes | None] | None:
    """The payload of each event quarantined before cleaning, sealed like its raw form (None elsewhere)."""
    if vault is None or protected is None:
        return None
    idx = [i for i, f in enumerate(failures) if f is not None]
    out: list[bytes | None] = [None] * len(items)
    if idx:
        sealed = vault.seal_many([protected[i].key_id for i in idx], [items[i].event.merged_json.encode() for i in idx])
        for i, data in zip(idx, sealed, strict=True):
            out[i] = data
    return out
