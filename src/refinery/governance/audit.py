"""The audit log: append-only and hash-chained, written by the one writer.

Each row holds a sequence number, the time, the actor (a token's id, name and role, never the
token), the action (`noun.verb`, e.g. `sources.create`, `profiles.read`), the object it touched
(`source:web`, `profile:p_...`) and details as JSON without personal values. Its `hash` is
SHA-256 over the canonical row (sorted-key JSON of every field, `prev_hash` included), and
`prev_hash` is the previous row's hash, so editing, deleting or reordering a row breaks the chain
at that row. `audit_head` keeps the last sequence number and hash, so removing rows from the end
is caught too; `verify(..., expect=...)` checks that a head noted elsewhere is still in the chain,
which catches a rewrite of the whole log.

Every stage records through `record(engine, actor, action, object, details)`, called inside the
writer (`runtime.writer.call`) in the same transaction as the change it records, so a change and
its audit row commit together or not at all. Reads of personal data record with `record_now`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from refinery.governance.errors import AuditError
from refinery.governance.principal import Principal
from refinery.privacy.pii import PII_FIELDS
from refinery.storage.engine import Engine
from refinery.storage.writer import Writer

#: The `prev_hash` of the first row.
GENESIS = "0" * 64

_SELECT = "SELECT seq, recorded_at, actor_id, actor_name, actor_role, action, object, details, prev_hash, hash FROM audit_log"
_ACTION = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
_EMAIL = re.compile(r"[^@\s\"']+@[^@\s\"']+\.[A-Za-z]{2,}")


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    recorded_at: str            # UTC, ISO 8601 with microseconds and 'Z'
    actor_id: str
    actor_name: str
    actor_role: str | None
    action: str
    object: str | None
    details: dict[str, Any]
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(seq: int, recorded_at: str, actor_id: str, actor_name: str, actor_role: str | None, action: str,
              obj: str | None, details: dict[str, Any], prev_hash: str) -> bytes:
    """The bytes a row's hash covers: every field but the hash, as sorted-key compact JSON."""
    row = {"seq": seq, "recorded_at": recorded_at, "actor_id": actor_id, "actor_name": actor_name, "actor_role": actor_role,
           "action": action, "object": obj, "details": details, "prev_hash": prev_hash}
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def row_hash(*fields: Any) -> str:
    return hashlib.sha256(canonical(*fields)).hexdigest()


def check_details(details: dict[str, Any], path: str = "details") -> None:
    """Refuse details that would put personal values in the log: PII field names, or emails in text.

    Record identifiers by type and profiles by id (`{"identifier_type": "email"}`), never values."""
    for key, value in details.items():
        where = f"{path}.{key}"
        if key in PII_FIELDS:
            raise AuditError(f"Audit {where} is a personal field.", fix="Record the field's name or a count, never its value.")
        if isinstance(value, dict):
            check_details(value, where)
        elif isinstance(value, str) and _EMAIL.search(value):
            raise AuditError(f"Audit {where} holds an email address.", fix="Record an identifier's type, never its value.")
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    check_details(item, where)
                elif isinstance(item, str) and _EMAIL.search(item):
                    raise AuditError(f"Audit {where} holds an email address.", fix="Record an identifier's type, never its value.")


def record(engine: Engine, actor: Principal, action: str, obj: str | None = None,
           details: dict[str, Any] | None = None) -> AuditEntry:
    """Append one row. Call it inside the writer, in the transaction of the change it records."""
    if not _ACTION.match(action):
        raise AuditError(f"Audit action {action!r} is not 'noun.verb'.", fix="Name actions like 'sources.create'.")
    details = dict(details or {})
    check_details(details)
    details = json.loads(json.dumps(details, sort_keys=True, default=str))  # what the row will read back as
    head = engine.fetch_all("SELECT seq, hash FROM audit_head")
    if head:
        seq, prev = int(head[0][0]) + 1, str(head[0][1])
    else:  # a new log (or a head someone removed: continue after the last row, verify reports the rest)
        last = engine.fetch_all("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        seq, prev = (int(last[0][0]) + 1, str(last[0][1])) if last else (1, GENESIS)
    at = datetime.now(UTC)
    at_text = _iso(at)
    digest = row_hash(seq, at_text, actor.actor_id, actor.name, actor.role, action, obj, details, prev)
    engine.execute(
        "INSERT INTO audit_log (seq, recorded_at, actor_id, actor_name, actor_role, action, object, details, prev_hash, hash) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [seq, at, actor.actor_id, actor.name, actor.role, action, obj,
         json.dumps(details, sort_keys=True, separators=(",", ":")), prev, digest],
    )
    if head:
        engine.execute("UPDATE audit_head SET seq = ?, hash = ?", [seq, digest])
    else:
        engine.execute("DELETE FROM audit_head")
        engine.execute("INSERT INTO audit_head (seq, hash) VALUES (?, ?)", [seq, digest])
    return AuditEntry(seq, at_text, actor.actor_id, actor.name, actor.role, action, obj, details, prev, digest)


def record_now(writer: Writer, actor: Principal, action: str, obj: str | None = None,
               details: dict[str, Any] | None = None) -> AuditEntry:
    """Record a read (which has no transaction of its own) through the writer, and wait for the commit.

    Callers record before they answer, so a read that cannot be audited is not served."""
    return writer.call(lambda e: record(e, actor, action, obj, details))


def _entry(row: dict[str, Any]) -> AuditEntry:
    details = row["details"]
    if isinstance(details, str):
        details = json.loads(details)
    return AuditEntry(
        int(row["seq"]), _iso(row["recorded_at"]), row["actor_id"], row["actor_name"], row["actor_role"], row["action"],
        row["object"], details if isinstance(details, dict) else {"value": details}, row["prev_hash"], row["hash"],
    )


def entries(engine: Engine, *, limit: int = 100, after: int | None = None, action: str | None = None,
            actor: str | None = None, cursor: Any = None) -> list[AuditEntry]:
    """Rows in sequence order: the newest `limit`, or the first `limit` after sequence `after`.

    `action` matches a prefix (`sources` matches `sources.create`); `actor` an id or a name."""
    cur = cursor if cursor is not None else engine.reader()
    where = ("(CAST(? AS BIGINT) IS NULL OR seq > ?) AND (CAST(? AS VARCHAR) IS NULL OR action = ? OR starts_with(action, ? || '.')) "
             "AND (CAST(? AS VARCHAR) IS NULL OR actor_id = ? OR actor_name = ?)")
    params = [after, after, action, action, action, actor, actor, actor]
    order = "ASC" if after is not None else "DESC"
    rows = engine.fetch_dicts(f"{_SELECT} WHERE {where} ORDER BY seq {order} LIMIT ?", [*params, limit], cursor=cur)  # noqa: S608 - constant text
    found = [_entry(r) for r in rows]
    return sorted(found, key=lambda e: e.seq)


@dataclass
class Problem:
    seq: int
    kind: str        # edited | missing | duplicate | broken_link | head
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Verification:
    rows: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS
    problems: list[Problem] = field(default_factory=list)
    expected_found: bool | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and self.expected_found is not False

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "rows": self.rows, "head": {"seq": self.head_seq, "hash": self.head_hash},
                "expected_head_found": self.expected_found, "problems": [p.to_dict() for p in self.problems]}


def _rows(engine: Engine, cursor: Any) -> Iterator[dict[str, Any]]:
    reader = engine.stream_arrow(f"{_SELECT} ORDER BY seq, hash", batch_size=10_000, cursor=cursor)  # noqa: S608 - constant text
    for batch in reader:
        yield from batch.to_pylist()


def verify(engine: Engine, *, expect: tuple[int, str] | None = None, max_problems: int = 100,
           cursor: Any = None) -> Verification:
    """Walk the chain in sequence order and name every row that breaks it.

    A row whose hash does not match its content was edited (or moved: the sequence number is part
    of the content). A gap in the sequence means rows were deleted; a `prev_hash` that is not the
    previous row's hash means the row before it was changed or removed. `expect` (seq, hash) is a
    head noted earlier elsewhere: it must still be in the chain."""
    cur = cursor if cursor is not None else engine.reader()
    out = Verification()

    def problem(seq: int, kind: str, message: str) -> None:
        if len(out.problems) < max_problems:
            out.problems.append(Problem(seq, kind, message))

    expected_seq, prev = 1, GENESIS
    if expect is not None:
        out.expected_found = expect == (0, GENESIS)
    for row in _rows(engine, cur):
        out.rows += 1
        seq = int(row["seq"])
        try:
            e = _entry(row)
            recomputed = row_hash(e.seq, e.recorded_at, e.actor_id, e.actor_name, e.actor_role, e.action, e.object, e.details, e.prev_hash)
        except (ValueError, TypeError, AttributeError) as err:
            problem(seq, "edited", f"Row {seq} cannot be read back ({err}): it was edited.")
            recomputed = ""
        if seq < expected_seq:
            problem(seq, "duplicate", f"Row {seq} appears more than once (rows were inserted or renumbered).")
        elif seq > expected_seq:
            gap = f"row {expected_seq}" if seq == expected_seq + 1 else f"rows {expected_seq} to {seq - 1}"
            problem(expected_seq, "missing", f"{gap.capitalize()} of the audit log {'is' if seq == expected_seq + 1 else 'are'} missing (deleted).")
        if recomputed and recomputed != row["hash"]:
            problem(seq, "edited", f"Row {seq} does not match its hash: it was edited (or moved from another position).")
        elif row["prev_hash"] != prev:
            problem(seq, "broken_link", f"Row {seq} does not follow the row before it: its prev_hash is not that row's hash "
                    "(the row before was edited, deleted or reordered).")
        if expect is not None and (seq, row["hash"]) == expect:
            out.expected_found = True
        prev = row["hash"]
        expected_seq = max(expected_seq, seq + 1)
        out.head_seq, out.head_hash = seq, row["hash"]

    head = engine.fetch_all("SELECT seq, hash FROM audit_head", cursor=cur)
    if head:
        h_seq, h_hash = int(head[0][0]), str(head[0][1])
        if h_seq > out.head_seq:
            gap = f"row {h_seq}" if h_seq == out.head_seq + 1 else f"rows {out.head_seq + 1} to {h_seq}"
            problem(out.head_seq + 1, "missing", f"{gap.capitalize()} of the audit log {'is' if h_seq == out.head_seq + 1 else 'are'} "
                    f"missing: the log ends at row {out.head_seq}, its head says {h_seq} (rows deleted from the end).")
        elif (h_seq, h_hash) != (out.head_seq, out.head_hash):
            problem(out.head_seq, "head", f"The audit head (row {h_seq}) does not match the last row ({out.head_seq}): "
                    "the end of the log was changed.")
    elif out.rows:
        problem(out.head_seq, "head", "The audit head is missing (deleted): rows removed from the end cannot be ruled out.")
    return out


def parse_head(text: str) -> tuple[int, str]:
    """'SEQ:HASH' (as `refinery audit verify` prints the head) as a pair."""
    seq, sep, digest = text.strip().partition(":")
    if not sep or not seq.isdigit() or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise AuditError(f"Head {text!r} is not SEQ:HASH.", fix="Pass the head as printed by `refinery audit verify`, e.g. 42:9f86d0...", field="expect")
    return int(seq), digest


def counts(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a job's result (counts, flags), nested dicts kept: safe audit details by construction."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, bool | int | float):
            out[key] = value
        elif isinstance(value, dict):
            nested = counts(value)
            if nested:
                out[key] = nested
    return out
