"""Replay: re-run quarantined events through the same plan checks and cleaning after a fix.

Replay never duplicates: an event whose messageId is already in the clean zone for its source is
marked `duplicate`; one that fails again keeps its row, with the new reason and a higher count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa

from refinery.ingest.store import insert_clean
from refinery.storage.engine import Engine, parse

if TYPE_CHECKING:
    from refinery.runtime import Runtime

_PENDING = "(replay_status IS NULL OR replay_status = 'failed_again')"


@dataclass
class ReplayResult:
    considered: int = 0
    loaded: int = 0
    duplicate: int = 0
    failed_again: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_failed(
    engine: Engine, *, source: str | None = None, reason: str | None = None, pending_only: bool = True, limit: int = 100
) -> list[dict[str, Any]]:
    rows = engine.fetch_dicts(
        "SELECT failure_id, source, message_id, stage, reason, message, field, received_at, failed_at, file, row_number, "
        "replay_status, replay_count FROM failed_events "
        f"WHERE (? IS NULL OR source = ?) AND (? IS NULL OR reason = ?) AND (NOT ? OR {_PENDING}) "
        "ORDER BY failure_id DESC LIMIT ?",
        [source, source, reason, reason, pending_only, limit],
        cursor=engine.reader(),
    )
    for r in rows:
        for k in ("received_at", "failed_at"):
            if r[k] is not None:
                r[k] = r[k].isoformat()
    return rows


def failure_counts(engine: Engine) -> list[dict[str, Any]]:
    return engine.fetch_dicts(
        f"SELECT source, stage, reason, count(*) AS count, count(*) FILTER (WHERE {_PENDING}) AS pending "
        "FROM failed_events GROUP BY ALL ORDER BY count DESC",
        cursor=engine.reader(),
    )


def replay(runtime: Runtime, *, source: str | None = None, reason: str | None = None, limit: int | None = None) -> ReplayResult:
    """Replay pending failed events (optionally of one source or reason) through the writer."""
    return runtime.writer.call(lambda engine: _replay(runtime, engine, source, reason, limit))


def _replay(runtime: Runtime, engine: Engine, source: str | None, reason: str | None, limit: int | None) -> ReplayResult:
    result = ReplayResult()
    rows = engine.fetch_all(
        "SELECT failure_id, raw_id, source, message_id, payload, received_at, import_id FROM failed_events "
        f"WHERE {_PENDING} AND payload IS NOT NULL AND message_id IS NOT NULL "
        "AND (? IS NULL OR source = ?) AND (? IS NULL OR reason = ?) ORDER BY failure_id LIMIT ?",
        [source, source, reason, reason, limit if limit is not None else 2**62],
    )
    if not rows:
        return result
    modes = {s.name: s.unplanned_events for s in runtime.sources.list()}
    ids, raw_ids, sources, mids, payloads, received, import_ids = ([] for _ in range(7))
    plan_fail: list[tuple[Any, ...]] = []
    for failure_id, raw_id, src, mid, payload, received_at, import_id in rows:
        event = orjson.loads(payload)
        failure = None
        if isinstance(event, dict):
            failure = runtime.plans.check(event, modes.get(src))
        else:
            failure = None
        # Protocol rules are re-checked too, so a replay never lets through what the collector refuses.
        if failure is None and isinstance(event, dict):
            from refinery.ingest.protocol import Limits, check_event

            failure = check_event(event, event, len(payload), Limits(max_event_bytes=10**9))
        if failure is not None:
            plan_fail.append((failure.reason, failure.message, failure.field, failure.stage, failure_id))
            result.failed_again += 1
            result.reasons[failure.reason] = result.reasons.get(failure.reason, 0) + 1
            continue
        ids.append(failure_id)
        raw_ids.append(raw_id)
        sources.append(src)
        mids.append(mid)
        payloads.append(payload)
        received.append(received_at)
        import_ids.append(import_id)
    result.considered = len(rows)

    if plan_fail:
        engine.execute(
            "UPDATE failed_events SET reason = t.reason, message = t.message, field = t.field, stage = t.stage, "
            "replay_status = 'failed_again', replayed_at = now(), replay_count = replay_count + 1 "
            "FROM (SELECT unnest(?) AS reason, unnest(?) AS message, unnest(?) AS field, unnest(?) AS stage, unnest(?) AS id) t "
            "WHERE failed_events.failure_id = t.id",
            [list(c) for c in zip(*plan_fail, strict=True)],
        )
    if not ids:
        return result

    table = pa.table(
        {
            "failure_id": pa.array(ids, pa.int64()),
            "raw_id": pa.array(raw_ids, pa.int64()),
            "source": sources,
            "message_id": mids,
            "received_at": pa.array(received, pa.timestamp("us", tz="UTC")),
            "payload": payloads,
            "import_id": pa.array(import_ids, pa.string()),
        }
    )
    engine.register("_replay", table)
    try:
        # Already clean (e.g. a retry that succeeded later): mark, do not load again.
        dup_ids = {
            r[0]
            for r in engine.fetch_all(
                "SELECT r.failure_id FROM _replay r JOIN events e ON e.source = r.source AND e.message_id = r.message_id"
            )
        }
        # Clean the rest; the rows cleaning rejects come back as new failed rows, which we fold into the old ones.
        candidates = parse(
            "SELECT raw_id, source, message_id, received_at, payload, import_id FROM _replay "
            "WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.source = _replay.source AND e.message_id = _replay.message_id)"
        )
        before = engine.fetch_all("SELECT COALESCE(max(failure_id), 0) FROM failed_events")[0][0]
        rejected = insert_clean(engine, candidates, runtime.clean_rules)
        rejected_keys = {(src, mid) for src, mid in engine.fetch_all(
            "SELECT source, message_id FROM failed_events WHERE failure_id > ?", [before]
        )}
        # Fold the new failure rows back into the originals.
        engine.execute(
            "UPDATE failed_events SET reason = n.reason, message = n.message, field = n.field, stage = n.stage, "
            "replay_status = 'failed_again', replayed_at = now(), replay_count = failed_events.replay_count + 1 "
            "FROM (SELECT r.failure_id AS id, f.reason, f.message, f.field, f.stage FROM failed_events f "
            "JOIN _replay r ON r.source = f.source AND r.message_id = f.message_id WHERE f.failure_id > ?) n "
            "WHERE failed_events.failure_id = n.id",
            [before],
        )
        engine.execute("DELETE FROM failed_events WHERE failure_id > ?", [before])
        for _, reason_code, _, _ in rejected:
            result.reasons[reason_code] = result.reasons.get(reason_code, 0) + 1
        done_ids: list[int] = []
        done_status: list[str] = []
        for fid, src, mid in zip(ids, sources, mids, strict=True):
            if fid in dup_ids:
                done_status.append("duplicate")
                result.duplicate += 1
            elif (src, mid) in rejected_keys:
                continue
            else:
                done_status.append("loaded")
                result.loaded += 1
            done_ids.append(fid)
        if done_ids:
            engine.execute(
                "UPDATE failed_events SET replay_status = t.status, replayed_at = now(), replay_count = replay_count + 1 "
                "FROM (SELECT unnest(?) AS id, unnest(?) AS status) t WHERE failed_events.failure_id = t.id",
                [done_ids, done_status],
            )
        result.failed_again += len(rejected_keys)
    finally:
        engine.unregister("_replay")
    return result
