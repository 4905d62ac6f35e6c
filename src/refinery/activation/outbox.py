"""The outbox: batches waiting for (or done with) delivery, per destination, and their dead letters.

A batch moves `pending` -> `delivering` (an attempt began; `attempts` counted) -> `delivered`, or
back to `pending` with a later `next_attempt_at` after a transient failure, or to `dead` (a row in
`activation_dead_letters`) after a terminal failure or its last attempt. A batch found `delivering`
(the process died mid-delivery) is due again: delivered once more with the same id, which the
receiver recognises. Replaying a dead letter puts its batch back to `pending`, same id, attempts
from zero. Every state change runs inside the writer (call these from `writer.call`); reads take a
read cursor. Constant SQL, bound parameters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from refinery.activation.errors import ActivationError
from refinery.errors import NotFoundError
from refinery.governance import audit
from refinery.governance.principal import Principal
from refinery.storage.engine import Engine

#: Records of delivered batches are kept this long (the batch rows, with their counts, stay).
DELIVERED_RECORDS_KEPT = timedelta(days=1)
#: Most error entries kept on a run.
MAX_RUN_ERRORS = 20


@dataclass(frozen=True)
class BatchRow:
    batch_id: str
    seq: int
    destination: str
    sync: str
    segment: str
    mode: str
    run_id: str
    status: str
    attempts: int
    next_attempt_at: datetime
    created_at: datetime
    records: int
    last_error: str | None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("next_attempt_at", "created_at"):
            d[k] = d[k].astimezone(UTC).isoformat()
        return d


_COLUMNS = "batch_id, seq, destination, sync, segment, mode, run_id, status, attempts, next_attempt_at, created_at, records, last_error"


def _row(r: tuple[Any, ...]) -> BatchRow:
    return BatchRow(str(r[0]), int(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]), str(r[6]), str(r[7]), int(r[8]), r[9], r[10],
                    int(r[11]), r[12])


def due(engine: Engine, destination: str, now: datetime, *, cursor: Any = None) -> BatchRow | None:
    """The destination's next batch to deliver: due, in seq order (a `delivering` one was cut off: due again)."""
    found = due_many(engine, destination, now, 1, cursor=cursor)
    return found[0] if found else None


def due_many(engine: Engine, destination: str, now: datetime, limit: int, *, skip: Iterable[str] = (),
             cursor: Any = None) -> list[BatchRow]:
    """The destination's next `limit` batches to deliver, in seq order, leaving out the ids in `skip`."""
    rows = engine.fetch_all(
        f"SELECT {_COLUMNS} FROM activation_batches WHERE destination = ? AND status IN ('pending', 'delivering') "  # noqa: S608
        "AND next_attempt_at <= ? AND batch_id NOT IN (SELECT unnest(CAST(? AS VARCHAR[]))) ORDER BY seq LIMIT ?",
        [destination, now, sorted(skip), limit], cursor=cursor if cursor is not None else engine.reader())
    return [_row(r) for r in rows]


def next_due_at(engine: Engine, destination: str, *, cursor: Any = None) -> datetime | None:
    rows = engine.fetch_all("SELECT min(next_attempt_at) FROM activation_batches WHERE destination = ? AND status IN ('pending', 'delivering')",
                            [destination], cursor=cursor if cursor is not None else engine.reader())
    return rows[0][0] if rows else None


def get(engine: Engine, batch_id: str, *, cursor: Any = None) -> BatchRow:
    rows = engine.fetch_all(f"SELECT {_COLUMNS} FROM activation_batches WHERE batch_id = ?", [batch_id],  # noqa: S608 - constant text
                            cursor=cursor if cursor is not None else engine.reader())
    if not rows:
        raise NotFoundError(f"No batch {batch_id!r}.", fix="List dead letters with: refinery syncs dead-letters", field="batch_id")
    return _row(rows[0])


def records(engine: Engine, batch_id: str, *, cursor: Any = None) -> list[tuple[str, str]]:
    return records_many(engine, [batch_id], cursor=cursor).get(batch_id, [])


def records_many(engine: Engine, batch_ids: list[str], *, cursor: Any = None) -> dict[str, list[tuple[str, str]]]:
    """Each batch's `(profile_id, action)` records: removes, then adds, each in profile order."""
    table = engine.fetch_arrow(
        "SELECT batch_id, profile_id, action FROM activation_records WHERE batch_id IN (SELECT unnest(CAST(? AS VARCHAR[]))) "
        "ORDER BY batch_id, action DESC, profile_id", [batch_ids], cursor=cursor if cursor is not None else engine.reader())
    out: dict[str, list[tuple[str, str]]] = {}
    for b, p, a in zip(table.column("batch_id").to_pylist(), table.column("profile_id").to_pylist(), table.column("action").to_pylist(),
                       strict=True):
        out.setdefault(b, []).append((p, a))
    return out


def pending_counts(engine: Engine, *, cursor: Any = None) -> dict[str, dict[str, int]]:
    """destination -> status -> batches (pending, delivering, dead)."""
    rows = engine.fetch_all("SELECT destination, status, count(*) FROM activation_batches WHERE status IN ('pending', 'delivering', 'dead') "
                            "GROUP BY ALL", cursor=cursor if cursor is not None else engine.reader())
    out: dict[str, dict[str, int]] = {}
    for d, s, n in rows:
        out.setdefault(str(d), {})[str(s)] = int(n)
    return out


# --- state changes (inside the writer) ----------------------------------------------------------------

def begin_attempt(engine: Engine, batch: BatchRow, now: datetime) -> int:
    """Count an attempt before it starts (so a crash mid-delivery still counts it); returns the attempt number."""
    engine.execute("UPDATE activation_batches SET status = 'delivering', attempts = attempts + 1, attempted_at = ? WHERE batch_id = ?",
                   [now, batch.batch_id])
    engine.execute("UPDATE sync_runs SET status = 'delivering' WHERE run_id = ? AND status = 'planned'", [batch.run_id])
    return batch.attempts + 1


def begin_attempts(engine: Engine, batches: list[BatchRow], now: datetime) -> dict[str, int]:
    """`begin_attempt` for several batches at once (a delivery group): batch id -> attempt number."""
    if not batches:
        return {}
    engine.execute("UPDATE activation_batches SET status = 'delivering', attempts = attempts + 1, attempted_at = ? "
                   "WHERE batch_id IN (SELECT unnest(CAST(? AS VARCHAR[])))", [now, [b.batch_id for b in batches]])
    engine.execute("UPDATE sync_runs SET status = 'delivering' WHERE run_id IN (SELECT unnest(CAST(? AS VARCHAR[]))) AND status = 'planned'",
                   [sorted({b.run_id for b in batches})])
    return {b.batch_id: b.attempts + 1 for b in batches}


def undo_attempts(engine: Engine, batches: list[BatchRow]) -> None:
    """Batches of a group whose attempt was counted but never started (the group stopped early): as they were."""
    for b in batches:
        engine.execute("UPDATE activation_batches SET status = ?, attempts = ? WHERE batch_id = ? AND status = 'delivering'",
                       [b.status, b.attempts, b.batch_id])


def _finish_run(engine: Engine, run_id: str, now: datetime) -> None:
    engine.execute(
        "UPDATE sync_runs SET status = CASE WHEN failed > 0 THEN 'completed_with_errors' ELSE 'completed' END, finished_at = ? "
        "WHERE run_id = ? AND status IN ('planned', 'delivering') AND NOT EXISTS "
        "(SELECT 1 FROM activation_batches WHERE run_id = ? AND status IN ('pending', 'delivering'))", [now, run_id, run_id])


def _add_error(engine: Engine, run_id: str, entry: dict[str, Any]) -> None:
    rows = engine.fetch_all("SELECT errors FROM sync_runs WHERE run_id = ?", [run_id])
    if not rows:
        return
    errors = json.loads(rows[0][0]) if isinstance(rows[0][0], str) else list(rows[0][0] or [])
    errors = [e for e in errors if e.get("batch_id") != entry["batch_id"]]
    errors.append(entry)
    engine.execute("UPDATE sync_runs SET errors = ? WHERE run_id = ?", [json.dumps(errors[-MAX_RUN_ERRORS:]), run_id])


@dataclass
class Outcome:
    """What one successful delivery did, for the run's counters."""

    added: int = 0
    removed: int = 0
    skipped_consent: int = 0
    skipped_suppressed: int = 0
    superseded: int = 0
    withheld: tuple[str, ...] = ()  # adds refused at delivery (consent, suppression): gone from the state too

    @property
    def sent(self) -> int:
        return self.added + self.removed


def delivered(engine: Engine, batch: BatchRow, outcome: Outcome, sync: str, now: datetime) -> None:
    engine.execute("UPDATE activation_batches SET status = 'delivered', delivered_at = ?, last_error = NULL WHERE batch_id = ?",
                   [now, batch.batch_id])
    engine.execute(
        "UPDATE sync_runs SET sent = sent + ?, added = added + ?, removed = removed + ?, skipped_consent = skipped_consent + ?, "
        "skipped_suppressed = skipped_suppressed + ?, superseded = superseded + ? WHERE run_id = ?",
        [outcome.sent, outcome.added, outcome.removed, outcome.skipped_consent, outcome.skipped_suppressed, outcome.superseded,
         batch.run_id])
    if outcome.withheld:
        engine.execute("DELETE FROM sync_state WHERE sync = ? AND profile_id IN (SELECT unnest(CAST(? AS VARCHAR[])))",
                       [sync, list(outcome.withheld)])
    _finish_run(engine, batch.run_id, now)


def delivered_many(engine: Engine, done: list[tuple[BatchRow, Outcome, str, datetime]]) -> None:
    """`delivered` for several batches (batch, outcome, sync, when) in one transaction: one statement per
    kind of change, the runs' counters summed per run."""
    if not done:
        return
    engine.execute(
        "UPDATE activation_batches SET status = 'delivered', delivered_at = d.at, last_error = NULL "
        "FROM (SELECT unnest(CAST(? AS VARCHAR[])) AS batch_id, unnest(CAST(? AS TIMESTAMPTZ[])) AS at) d "
        "WHERE activation_batches.batch_id = d.batch_id", [[b.batch_id for b, _, _, _ in done], [at for _, _, _, at in done]])
    runs: dict[str, list[int]] = {}
    withheld: dict[str, list[str]] = {}
    for b, o, sync, _ in done:
        c = runs.setdefault(b.run_id, [0] * 6)
        for i, n in enumerate((o.sent, o.added, o.removed, o.skipped_consent, o.skipped_suppressed, o.superseded)):
            c[i] += n
        if o.withheld:
            withheld.setdefault(sync, []).extend(o.withheld)
    for run_id, c in runs.items():
        engine.execute(
            "UPDATE sync_runs SET sent = sent + ?, added = added + ?, removed = removed + ?, skipped_consent = skipped_consent + ?, "
            "skipped_suppressed = skipped_suppressed + ?, superseded = superseded + ? WHERE run_id = ?", [*c, run_id])
    for sync, ids in withheld.items():
        engine.execute("DELETE FROM sync_state WHERE sync = ? AND profile_id IN (SELECT unnest(CAST(? AS VARCHAR[])))", [sync, ids])
    last = max(at for _, _, _, at in done)
    for run_id in runs:
        _finish_run(engine, run_id, last)


def retry_later(engine: Engine, batch: BatchRow, at: datetime, error: str) -> None:
    engine.execute("UPDATE activation_batches SET status = 'pending', next_attempt_at = ?, last_error = ? WHERE batch_id = ?",
                   [at, error, batch.batch_id])


def dead(engine: Engine, batch: BatchRow, attempts: int, reason: str, error: str, now: datetime) -> None:
    engine.execute("UPDATE activation_batches SET status = 'dead', last_error = ? WHERE batch_id = ?", [error, batch.batch_id])
    engine.execute(
        "INSERT INTO activation_dead_letters (batch_id, destination, sync, run_id, reason, error, attempts, dead_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [batch.batch_id, batch.destination, batch.sync, batch.run_id, reason, error, attempts, now])
    engine.execute("UPDATE sync_runs SET failed = failed + ? WHERE run_id = ?", [batch.records, batch.run_id])
    _add_error(engine, batch.run_id, {"batch_id": batch.batch_id, "kind": reason, "message": error, "attempts": attempts})
    _finish_run(engine, batch.run_id, now)


def dead_letters(engine: Engine, *, sync: str | None = None, destination: str | None = None, include_replayed: bool = False,
                 limit: int = 100) -> list[dict[str, Any]]:
    rows = engine.fetch_dicts(
        "SELECT d.batch_id, d.destination, d.sync, d.run_id, d.reason, d.error, d.attempts, d.dead_at, d.replayed_at, d.replayed_by, "
        "b.records, b.status FROM activation_dead_letters d LEFT JOIN activation_batches b ON b.batch_id = d.batch_id "
        "WHERE (? IS NULL OR d.sync = ?) AND (? IS NULL OR d.destination = ?) AND (? OR d.replayed_at IS NULL) "
        "ORDER BY d.dead_at DESC LIMIT ?", [sync, sync, destination, destination, include_replayed, limit], cursor=engine.reader())
    for r in rows:
        for k in ("dead_at", "replayed_at"):
            r[k] = r[k].astimezone(UTC).isoformat() if r[k] is not None else None
    return rows


def replay(engine: Engine, actor: Principal, *, batch_ids: Iterable[str] | None = None, sync: str | None = None) -> dict[str, Any]:
    """Put dead batches back in their outbox (same id, attempts from zero); inside the writer."""
    now = datetime.now(UTC)
    ids = list(batch_ids or [])
    if not ids and sync is None:
        raise ActivationError("Nothing to replay was named.", fix="Name batch ids, or a sync to replay all its dead letters.")
    rows = engine.fetch_all(
        "SELECT DISTINCT d.batch_id, b.run_id, b.records, b.destination FROM activation_dead_letters d JOIN activation_batches b "
        "ON b.batch_id = d.batch_id WHERE d.replayed_at IS NULL AND b.status = 'dead' AND "
        "(d.batch_id IN (SELECT unnest(CAST(? AS VARCHAR[]))) OR (? IS NOT NULL AND d.sync = ?))", [ids, sync, sync])
    missing = sorted(set(ids) - {str(r[0]) for r in rows})
    if missing:
        raise NotFoundError(f"No dead letter waiting for replay with batch id {missing[0]!r}.",
                            fix="List them with: refinery syncs dead-letters", field="batch_id")
    for batch_id, run_id, n, _ in rows:
        engine.execute("UPDATE activation_batches SET status = 'pending', attempts = 0, next_attempt_at = ?, last_error = NULL "
                       "WHERE batch_id = ?", [now, batch_id])
        engine.execute("UPDATE activation_dead_letters SET replayed_at = ?, replayed_by = ? WHERE batch_id = ? AND replayed_at IS NULL",
                       [now, actor.name, batch_id])
        engine.execute("UPDATE sync_runs SET failed = greatest(failed - ?, 0), status = 'delivering', finished_at = NULL WHERE run_id = ?",
                       [n, run_id])
    replayed = sorted(str(r[0]) for r in rows)
    audit.record(engine, actor, "syncs.replay", f"sync:{sync}" if sync else None, {"batches": len(replayed)})
    return {"replayed": replayed, "destinations": sorted({str(r[3]) for r in rows})}


def prune(engine: Engine, now: datetime) -> int:
    """Forget the records (profile ids) of batches delivered or cancelled more than DELIVERED_RECORDS_KEPT ago."""
    rows = engine.fetch_all(
        "DELETE FROM activation_records WHERE batch_id IN (SELECT batch_id FROM activation_batches WHERE "
        "(status = 'delivered' AND delivered_at < ?) OR status = 'cancelled')", [now - DELIVERED_RECORDS_KEPT])
    return int(rows[0][0]) if rows else 0
