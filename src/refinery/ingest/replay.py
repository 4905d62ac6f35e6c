"""Replay: re-run quarantined events through the same checks and cleaning after a fix.

Each pending row of `failed_events` (never replayed, or `failed_again`) goes through the plan
check, the protocol rules and `clean_select`, exactly as a new event would. Its outcome is folded
into the *same* row, never a new one:

- `loaded`: it is now in `events` (the original reason stays, as history);
- `duplicate`: an event with its source and messageId is already clean (nothing is loaded twice);
- `failed_again`: it still fails; the row gets the new reason and `replay_count` goes up;
- `erased`: its payload was sealed under a key that has been destroyed (the person was erased):
  nothing can be read, nothing is loaded;
- `suppressed`: its user id, anonymous id, email or phone is on the suppression list (the person
  was erased after it was quarantined): it is not loaded, and its payload is dropped.

Payloads are sealed under their subject's key (`failed_events.key_id/sealed`, `payload` NULL);
replay opens them, checks the event as the collector would (plans and protocol rules see the
values), then protects it as the collector does (`Tokeniser.protect_event`: personal fields to
tokens, the values sealed into `vault_values` under the subject's key) before cleaning.

Work runs through the writer in chunks (each chunk one transaction, a handful of set-based
statements), so a large failed zone never blocks the collector for long. Each replay is an
OpenLineage run (`ingest.replay`: failed_events in; events, failed_events and vault_values out).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa
from sqlglot import exp

from refinery.governance import lineage
from refinery.ingest.clean import EVENT_COLUMNS, clean_select
from refinery.ingest.protocol import Failure, Limits, check_event
from refinery.privacy.tokens import PiiValue, subject_of
from refinery.privacy.vault import Vault
from refinery.storage.engine import Engine, parse

if TYPE_CHECKING:
    from refinery.runtime import Runtime

_CONFLICT = "duplicate_message_id_conflict"
#: Replayed payloads already had the envelope merged in, so only the size rule is relaxed.
_LIMITS = Limits(max_event_bytes=1 << 40)
CHUNK_SIZE = 5_000
#: The one definition of "still pending replay" (never replayed, or failed again), over
#: failed_events' columns; the importer uses it too when a re-import resolves old failures.
PENDING = parse("replay_status IS NULL OR replay_status = 'failed_again'")


def with_pending(sql: str) -> exp.Expression:
    """A constant SQL template with `__pending` standing for the PENDING condition."""
    tree = parse(sql)
    for col in list(tree.find_all(exp.Column)):
        if col.name == "__pending":
            col.replace(exp.Paren(this=PENDING.copy()))
    return tree


@dataclass
class ReplayResult:
    considered: int = 0
    loaded: int = 0
    duplicate: int = 0
    failed_again: int = 0
    not_replayable: int = 0  # no payload or messageId was kept (e.g. unreadable import rows)
    erased: int = 0  # sealed under a destroyed key: the person was erased, nothing can be read
    suppressed: int = 0  # the person is on the suppression list: not loaded, payload dropped
    reasons: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _failed(self, reason: str) -> None:
        self.failed_again += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


def list_failed(
    engine: Engine, *, source: str | None = None, reason: str | None = None, pending_only: bool = True, limit: int = 100
) -> list[dict[str, Any]]:
    rows = engine.fetch_dicts(
        with_pending(
            "SELECT failure_id, source, message_id, stage, reason, message, field, received_at, failed_at, file, row_number, "
            "replay_status, replay_count FROM failed_events "
            "WHERE (? IS NULL OR source = ?) AND (? IS NULL OR reason = ?) AND (NOT ? OR __pending) "
            "ORDER BY failure_id DESC LIMIT ?"
        ),
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
        with_pending(
            "SELECT source, stage, reason, count(*) AS count, count(*) FILTER (WHERE __pending) AS pending "
            "FROM failed_events GROUP BY ALL ORDER BY count DESC"
        ),
        cursor=engine.reader(),
    )


def replay(
    runtime: Runtime, *, source: str | None = None, reason: str | None = None, limit: int | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> ReplayResult:
    """Replay pending failed events (optionally of one source or reason), oldest first, as one
    lineage run (`ingest.replay`)."""
    with lineage.run(runtime.settings, job="ingest.replay", inputs=["failed_events"],
                     outputs=["events", "failed_events", "vault_values"]) as run:
        result = _replay(runtime, source=source, reason=reason, limit=limit, chunk_size=chunk_size)
        run.note(source=source, reason=reason, considered=result.considered, duplicate=result.duplicate,
                 failed_again=result.failed_again, erased=result.erased, suppressed=result.suppressed)
        run.count("events", result.loaded)
        run.count("failed_events", result.considered)
    return result


def _replay(runtime: Runtime, *, source: str | None, reason: str | None, limit: int | None, chunk_size: int) -> ReplayResult:
    result = ReplayResult()
    result.not_replayable = int(
        runtime.engine.fetch_all(
            with_pending(
            "SELECT count(*) FROM failed_events WHERE __pending AND (? IS NULL OR source = ?) AND (? IS NULL OR reason = ?) "
            "AND ((payload IS NULL AND sealed IS NULL) OR message_id IS NULL)"
        ),
            [source, source, reason, reason],
            cursor=runtime.engine.reader(),
        )[0][0]
    )
    after = 0  # rows that fail again stay pending: walk by id so each is seen once per replay
    while limit is None or result.considered < limit:
        n = chunk_size if limit is None else min(chunk_size, limit - result.considered)
        last = runtime.writer.call(partial(_replay_chunk, runtime, result=result, source=source, reason=reason, after=after, n=n))
        if last is None:
            break
        after = last
    return result


def _replay_chunk(
    runtime: Runtime, engine: Engine, *, result: ReplayResult, source: str | None, reason: str | None, after: int, n: int
) -> int | None:
    """Replay up to n pending rows with failure_id > after in the writer's transaction; return the last id."""
    rows = engine.fetch_all(
        with_pending(
            "SELECT failure_id, raw_id, source, message_id, CAST(payload AS VARCHAR), received_at, import_id, reason, "
            "key_id, sealed FROM failed_events "
            "WHERE __pending AND (payload IS NOT NULL OR sealed IS NOT NULL) AND message_id IS NOT NULL "
            "AND (? IS NULL OR source = ?) AND (? IS NULL OR reason = ?) AND failure_id > ? "
            "ORDER BY failure_id LIMIT ?"
        ),
        [source, source, reason, reason, after, n],
    )
    if not rows:
        return None
    result.considered += len(rows)
    modes = {s.name: s.unplanned_events for s in runtime.sources.list()}
    vault: Vault = runtime.vault
    opened = vault.unseal_many([r[8] if r[9] is not None else None for r in rows], [r[9] for r in rows])

    outcomes: dict[int, tuple[str, Failure | None]] = {}  # failure_id -> (status, new failure)
    first: dict[tuple[str, str], tuple[int, str]] = {}    # (source, messageId) -> (failure_id, payload)
    candidates: list[tuple[Any, ...]] = []
    protected: dict[int, tuple[str, list[PiiValue]]] = {}  # failure_id -> (key id, the values its tokens stand for)
    for (failure_id, raw_id, src, mid, stored, received_at, import_id, old_reason, _key, sealed), plain in zip(rows, opened, strict=True):
        if sealed is not None and plain is None:
            outcomes[failure_id] = ("erased", None)  # its key was destroyed: the person was erased
            continue
        payload = plain.decode() if plain is not None else stored
        failure = _check(runtime, payload, modes.get(src))
        if failure is None:
            event = orjson.loads(payload)
            if _suppressed(vault, event):
                outcomes[failure_id] = ("suppressed", None)
                continue
            safe, values = vault.tokens.protect_event(event)
            subject = subject_of(event)
            protected[failure_id] = (vault.key_id(subject) if subject else vault.event_key_id(src, mid), values)
        key = (src, mid)
        if failure is None and key in first:
            # Two quarantined rows share a messageId (an event and a conflicting reuse): load one only.
            failure = None if first[key][1] == payload else _conflict(mid)
            if failure is None:
                outcomes[failure_id] = ("duplicate", None)
                continue
        if failure is not None:
            outcomes[failure_id] = ("failed_again", failure)
            continue
        first[key] = (failure_id, payload)
        clean_payload = orjson.dumps(safe).decode() if values else payload
        candidates.append((failure_id, raw_id, src, mid, received_at, clean_payload, import_id, old_reason == _CONFLICT))

    if candidates:
        _clean_candidates(runtime, engine, candidates, outcomes)
        # The values behind the loaded events' tokens, sealed under their subject's key.
        vault.put_values(engine, [
            (key_id, v) for fid, (key_id, values) in protected.items() if outcomes.get(fid, ("",))[0] == "loaded" for v in values
        ])

    ids, statuses, reasons, messages, fields, stages = [], [], [], [], [], []
    for fid, (status, failure) in outcomes.items():
        ids.append(fid)
        statuses.append(status)
        reasons.append(failure.reason if failure else None)
        messages.append(failure.message if failure else None)
        fields.append(failure.field if failure else None)
        stages.append(failure.stage if failure else None)
        if status == "loaded":
            result.loaded += 1
        elif status == "duplicate":
            result.duplicate += 1
        elif status == "erased":
            result.erased += 1
        elif status == "suppressed":
            result.suppressed += 1
        else:
            assert failure is not None
            result._failed(failure.reason)
    engine.register(
        "_replay_out",
        pa.table({"failure_id": pa.array(ids, pa.int64()), "status": statuses, "reason": pa.array(reasons, pa.string()),
                  "message": pa.array(messages, pa.string()), "field": pa.array(fields, pa.string()),
                  "stage": pa.array(stages, pa.string())}),
    )
    try:
        # One statement folds every outcome into its original row; a loaded row keeps why it had failed.
        engine.execute(
            "UPDATE failed_events SET replay_status = o.status, replayed_at = now(), replay_count = failed_events.replay_count + 1, "
            "reason = COALESCE(o.reason, failed_events.reason), message = COALESCE(o.message, failed_events.message), "
            "field = CASE WHEN o.reason IS NULL THEN failed_events.field ELSE o.field END, "
            "stage = COALESCE(o.stage, failed_events.stage), "
            # an erased person's row: nothing of theirs is kept (their key is gone or they are suppressed)
            "payload = CASE WHEN o.status = 'suppressed' THEN NULL ELSE failed_events.payload END, "
            "sealed = CASE WHEN o.status = 'suppressed' THEN NULL ELSE failed_events.sealed END "
            "FROM _replay_out o WHERE failed_events.failure_id = o.failure_id"
        )
    finally:
        engine.unregister("_replay_out")
    return int(rows[-1][0])


def _check(runtime: Runtime, payload: str, unplanned_mode: str | None) -> Failure | None:
    """The plan and protocol rules a new event would meet at the collector."""
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return Failure("invalid_json", "The stored payload is not JSON and cannot be replayed.", "", "collect")
    if not isinstance(event, dict):
        return Failure("not_an_object", "The stored payload is not an event object.", "", "collect")
    return check_event(event, event, 0, _LIMITS) or runtime.plans.check(event, unplanned_mode)


def _suppressed(vault: Vault, event: dict[str, Any]) -> bool:
    """Whether the event's user id, anonymous id, email or phone is on the suppression list."""
    return bool(vault.suppressed) and vault.suppressed_event(event, vault.tokens.protect_event(event)[1])


def _clean_candidates(
    runtime: Runtime, engine: Engine, candidates: list[tuple[Any, ...]], outcomes: dict[int, tuple[str, Failure | None]]
) -> None:
    """Clean candidates set-wise: already clean -> duplicate; clean -> loaded into events; else failed_again."""
    cols = list(zip(*candidates, strict=True))
    engine.register(
        "_replay_in",
        pa.table({
            "failure_id": pa.array(cols[0], pa.int64()), "raw_id": pa.array(cols[1], pa.int64()),
            "source": pa.array(cols[2], pa.string()), "message_id": pa.array(cols[3], pa.string()),
            "received_at": pa.array(cols[4], pa.timestamp("us", tz="UTC")), "payload": pa.array(cols[5], pa.string()),
            "import_id": pa.array(cols[6], pa.string()), "was_conflict": pa.array(cols[7], pa.bool_()),
        }),
    )
    try:
        for fid, was_conflict in engine.fetch_all(
            "SELECT failure_id, was_conflict FROM _replay_in r "
            "WHERE EXISTS (SELECT 1 FROM events e WHERE e.source = r.source AND e.message_id = r.message_id)"
        ):
            # A reused messageId whose first event is clean can never load: it needs its own messageId.
            outcomes[fid] = ("failed_again", _conflict_from(candidates, fid)) if was_conflict else ("duplicate", None)
        cleaned = clean_select(
            parse(
                "SELECT raw_id, source, message_id, received_at, payload, import_id FROM _replay_in r "
                "WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.source = r.source AND e.message_id = r.message_id)"
            ),
            runtime.clean_rules,
        )
        create = parse("CREATE OR REPLACE TEMP TABLE _replay_clean AS SELECT 1")
        create.set("expression", cleaned)
        engine.execute(create)
        engine.execute(
            exp.insert(
                exp.select(*EVENT_COLUMNS).from_("_replay_clean").where("_reason IS NULL"), "events", columns=list(EVENT_COLUMNS)
            )
        )
        by_key = {(c[2], c[3]): c[0] for c in candidates}
        for src, mid, reason, message, fld in engine.fetch_all(
            "SELECT source, message_id, _reason, _message, _field FROM _replay_clean"
        ):
            fid = by_key[(src, mid)]
            outcomes[fid] = ("loaded", None) if reason is None else ("failed_again", Failure(reason, message, fld, "clean"))
        engine.execute("DROP TABLE _replay_clean")
    finally:
        engine.unregister("_replay_in")


def _conflict(message_id: str) -> Failure:
    return Failure(
        _CONFLICT,
        f"messageId {message_id!r} was already used for an event with different content; "
        "give each distinct event its own messageId (retries must resend the same content).",
        "/messageId",
        "dedup",
    )


def _conflict_from(candidates: list[tuple[Any, ...]], failure_id: int) -> Failure:
    mid = next(c[3] for c in candidates if c[0] == failure_id)
    return _conflict(mid)
