"""Planning a sync: who should the destination hold, what does it hold, and what must change.

- **Target**: the segment's open members (`segment_members.exited_at IS NULL`) whose consent for
  the destination's purpose the governance consent service allows (`ConsentService.allowed_filter`,
  the one consent check) and who are not on the suppression list. Computed on a read cursor, so a
  query over a million members never holds the writer; with `mirror`, each member's mapped fields
  are hashed in the same query.
- **State**: `sync_state`, what the destination holds (once its outbox is delivered).
- **Changes**, inside one writer transaction: `add` = target - state (`full`: every target member;
  `mirror`: also members whose fields hash changed), `remove` = state - target. They are cut into
  batches (ids are the idempotency keys), written to the destination's outbox, and the state is
  updated, together with the run's row (and, for a real-time sync, its cursor): all or nothing.

A real-time sync plans only the profiles named by `segment_entered`/`segment_exited` rows after its
cursor, with the same gates and the same state. Everything here is constant SQL with bound
parameters or sqlglot expressions; user text (trait names) enters only as sqlglot literals.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sqlglot import exp

from refinery.activation.store import PROFILE_ID, DestinationDef, SyncDef
from refinery.governance.consent import ConsentService
from refinery.governance.principal import Principal
from refinery.governance.purposes import ConsentPolicy
from refinery.identity import sql
from refinery.storage.engine import Engine
from refinery.storage.writer import Writer

log = logging.getLogger(__name__)

#: Who plans scheduled and real-time syncs inside `refinery serve` (the runs' actor).
SYSTEM = Principal("system", "system:activation", "admin")

_TARGET = "_activation_target"
_ONLY = "_activation_only"
_CHANGES = "_activation_changes"
_REVEAL = "_activation_reveal"


@dataclass
class Plan:
    """What one planning wrote (or would write): counts only, never personal values."""

    run_id: str
    sync: str
    destination: str
    trigger: str
    members: int = 0
    target: int = 0
    added: int = 0
    removed: int = 0
    batches: int = 0
    skipped_consent: int = 0
    skipped_suppressed: int = 0
    event_cursor: int | None = None
    recorded: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def planned(self) -> int:
        return self.added + self.removed

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "planned": self.planned}


# --- the target ----------------------------------------------------------------------------------------

def trait_value(source: str, traits: exp.Expression) -> exp.Expression:
    """The JSON value of trait `source` in a profile's `traits` (a sqlglot literal path)."""
    return exp.JSONExtract(this=traits, expression=exp.Literal.string('$."' + source + '"'))


def fields_hash(sync: SyncDef, computed_traits: set[str]) -> tuple[exp.Expression, list[exp.Expression]]:
    """A hash of the sync's mapped values per member (mirror mode), and the joins it needs."""
    parts: list[exp.Expression] = []
    joins: list[exp.Expression] = []
    for i, (out, source) in enumerate(sorted(sync.mapping.items())):
        if source == PROFILE_ID:
            continue
        if source in computed_traits:
            alias = f"c{i}"
            joins.append(sql.template(
                "SELECT 1 FROM x LEFT JOIN computed_trait_values __a ON __a.profile_id = m.profile_id AND __a.name = __name",
                a=exp.to_identifier(alias), name=exp.Literal.string(source)).args["joins"][0])
            value: exp.Expression = exp.column("value", table=alias)
        else:
            value = trait_value(source, exp.column("traits", table="p"))
        parts.append(exp.Coalesce(this=exp.cast(value, "VARCHAR"), expressions=[exp.Literal.string("\x00")]))
        parts.append(exp.Literal.string(out))
    if not parts:
        return exp.cast(exp.Literal.number(0), "UBIGINT"), []
    return exp.Anonymous(this="hash", expressions=parts), joins


def target_query(sync: SyncDef, purpose: str, policy: ConsentPolicy, *, with_hash: bool, computed_traits: set[str],
                 only: bool = False) -> exp.Expression:
    """`(profile_id, allowed, h)` for every open member of the sync's segment (`only`: those in `_activation_only`)."""
    allowed = ConsentService.allowed_filter(exp.column("profile_id", table="m"), purpose, policy)
    query = sql.template(
        "SELECT m.profile_id, __allowed AS allowed, CAST(NULL AS UBIGINT) AS h FROM segment_members m "
        "WHERE m.segment = __segment AND m.exited_at IS NULL",
        allowed=allowed, segment=exp.Literal.string(sync.segment),
    )
    assert isinstance(query, exp.Select)
    if with_hash:
        h, joins = fields_hash(sync, computed_traits)
        query.expressions[2].replace(exp.alias_(h, "h"))
        query = query.join(sql.template("SELECT 1 FROM x LEFT JOIN profiles p ON p.profile_id = m.profile_id").args["joins"][0])
        for j in joins:
            query = query.join(j)
    if only:
        query = query.where(sql.template(f"SELECT 1 WHERE m.profile_id IN (SELECT profile_id FROM {_ONLY})").args["where"].this)  # noqa: S608
    return query


def suppressed_profiles(engine: Engine, profile_ids: list[str], *, cursor: Any = None, identities: pa.Table | None = None) -> set[str]:
    """The profiles among `profile_ids` one of whose identifiers is on the suppression list (an
    erased person's identifier seen again). Tokens are revealed to compute the list's keyed hashes;
    nothing is kept. Empty at once while the list is empty. `identities`: their `(identifier_type,
    value, profile_id)` rows (or more), when the caller has read them already."""
    from refinery.privacy.pii import vault_of
    from refinery.privacy.tokens import is_token

    vault = vault_of(engine)
    if vault is None or not vault.suppressed or not profile_ids:
        return set()
    if identities is not None:
        wanted = set(profile_ids)
        rows = [(p, k, v) for k, v, p in zip(identities.column("identifier_type").to_pylist(), identities.column("value").to_pylist(),
                                             identities.column("profile_id").to_pylist(), strict=True) if p in wanted]
    else:
        rows = engine.fetch_all(
            "SELECT profile_id, identifier_type, value FROM identities WHERE profile_id IN (SELECT unnest(CAST(? AS VARCHAR[])))",
            [profile_ids], cursor=cursor if cursor is not None else engine.reader(),
        )
    tokens = [str(v) for _, _, v in rows if isinstance(v, str) and is_token(v)]
    clear = reveal_on(engine, tokens, cursor=cursor) if tokens else {}
    out = set()
    for pid, kind, value in rows:
        normal = clear.get(value) if is_token(str(value)) else value
        if normal and vault.suppressed_identifier(str(kind), str(normal)):
            out.add(str(pid))
    return out


def reveal_on(engine: Engine, tokens: list[str] | set[str], *, cursor: Any = None) -> dict[str, str]:
    """`Vault.reveal` on the caller's read cursor (delivery threads must not touch the writer's
    connection): the values behind tokens whose keys still exist; erased people's are absent."""
    from refinery.privacy.pii import vault_of

    vault = vault_of(engine)
    if vault is None or not tokens:
        return {}
    cur = cursor if cursor is not None else engine.reader()
    # The tokens as a registered table, not a bound list: a list parameter costs Python work per element.
    engine.register(_REVEAL, pa.table({"token": pa.array(list(set(tokens)), pa.string())}), cursor=cur)
    try:
        rows = engine.fetch_arrow(f"SELECT token, key_id, sealed FROM vault_values WHERE token IN (SELECT token FROM {_REVEAL}) "  # noqa: S608
                                  "ORDER BY token, first_seen DESC", cursor=cur)
    finally:
        engine.unregister(_REVEAL, cursor=cur)
    found = rows.column("token").to_pylist()
    plain = vault.unseal_many(rows.column("key_id").to_pylist(), rows.column("sealed").to_pylist())
    out: dict[str, str] = {}
    for token, value in zip(found, plain, strict=True):
        if value is not None and token not in out:
            out[token] = value.decode()
    return out


# --- the diff, inside the writer --------------------------------------------------------------------

# Constant texts, one per mode; the sync's name is bound, the target and the restriction are registered tables.
_ADDS = {
    "diff": f"SELECT t.profile_id, t.h FROM {_TARGET} t WHERE t.profile_id NOT IN (SELECT profile_id FROM sync_state WHERE sync = ?)",  # noqa: S608
    "full": f"SELECT t.profile_id, t.h FROM {_TARGET} t WHERE ? IS NOT NULL",  # noqa: S608
    "mirror": (f"SELECT t.profile_id, t.h FROM {_TARGET} t LEFT JOIN (SELECT profile_id, fields_hash FROM sync_state WHERE sync = ?) s "  # noqa: S608
               "ON s.profile_id = t.profile_id WHERE s.profile_id IS NULL OR s.fields_hash IS DISTINCT FROM t.h"),
}
_REMOVES = f"SELECT s.profile_id, CAST(NULL AS UBIGINT) AS h FROM sync_state s WHERE s.sync = ? AND s.profile_id NOT IN (SELECT profile_id FROM {_TARGET})"  # noqa: S608
_REMOVES_ONLY = _REMOVES + f" AND s.profile_id IN (SELECT profile_id FROM {_ONLY})"  # noqa: S608


def _changes(engine: Engine, sync: SyncDef, only: bool) -> pa.Table:
    """`(profile_id, action, h)`: the removes, then the adds (a batch holds one kind more often than not).
    Batches are cut in this order; each batch's records are read back in profile order at delivery."""
    adds = engine.fetch_arrow(_ADDS[sync.mode], [sync.name])
    removes = engine.fetch_arrow(_REMOVES_ONLY if only else _REMOVES, [sync.name])
    action = pa.concat_arrays([pa.array(["remove"] * removes.num_rows, pa.string()), pa.array(["add"] * adds.num_rows, pa.string())]) \
        if adds.num_rows + removes.num_rows else pa.array([], pa.string())
    ids = pa.concat_arrays([removes.column("profile_id").combine_chunks().cast(pa.string()),
                            adds.column("profile_id").combine_chunks().cast(pa.string())])
    hashes = pa.concat_arrays([removes.column("h").combine_chunks().cast(pa.uint64()), adds.column("h").combine_chunks().cast(pa.uint64())])
    return pa.table({"profile_id": ids, "action": action, "h": hashes})


# Adds enter the state. In `diff` mode they are target - state, computed in this transaction, so none is held
# yet; `mirror` deleted its changed ones first; `full` re-sends members the state holds: only those not held.
_STATE_INSERT = f"INSERT INTO sync_state (sync, profile_id, fields_hash, since) SELECT ?, c.profile_id, c.h, ? FROM {_CHANGES} c WHERE c.action = 'add'"  # noqa: S608
_STATE_INSERT_NEW = _STATE_INSERT + " AND c.profile_id NOT IN (SELECT profile_id FROM sync_state WHERE sync = ?)"  # noqa: S608 - constant text


def _write(engine: Engine, sync: SyncDef, plan: Plan, changes: pa.Table, batch_size: int, trigger: str, actor: Principal,
           started: datetime, mode_note: str | None = None) -> None:
    """Outbox batches, state, run row and cursor: in the caller's (writer) transaction."""
    now = datetime.now(UTC)
    n = changes.num_rows
    plan.added = n and int(pc.sum(pc.equal(changes.column("action"), "add")).as_py() or 0)
    plan.removed = n - plan.added
    if n:
        changes = changes.append_column("batch_no", pa.array(np.arange(n, dtype=np.int64) // batch_size))
        engine.register(_CHANGES, changes)
        try:
            base = int(engine.fetch_all("SELECT coalesce(max(seq), 0) FROM activation_batches")[0][0])
            prefix = f"b_{plan.run_id[4:]}_"
            engine.execute(
                f"INSERT INTO activation_records (batch_id, profile_id, action) "  # noqa: S608 - constant text
                f"SELECT ? || lpad(CAST(batch_no AS VARCHAR), 6, '0'), profile_id, action FROM {_CHANGES}", [prefix])
            engine.execute(
                "INSERT INTO activation_batches (batch_id, seq, destination, sync, segment, mode, run_id, status, attempts, "  # noqa: S608
                "next_attempt_at, created_at, records) "
                f"SELECT ? || lpad(CAST(batch_no AS VARCHAR), 6, '0'), ? + batch_no + 1, ?, ?, ?, ?, ?, 'pending', 0, ?, ?, count(*) "
                f"FROM {_CHANGES} GROUP BY batch_no",
                [prefix, base, sync.destination, sync.name, sync.segment, sync.mode, plan.run_id, now, now])
            if plan.removed:
                engine.execute(f"DELETE FROM sync_state WHERE sync = ? AND profile_id IN "  # noqa: S608 - constant text
                               f"(SELECT profile_id FROM {_CHANGES} WHERE action = 'remove')", [sync.name])
            if sync.mode == "mirror" and plan.added:
                engine.execute(f"DELETE FROM sync_state WHERE sync = ? AND profile_id IN "  # noqa: S608 - constant text
                               f"(SELECT profile_id FROM {_CHANGES} WHERE action = 'add')", [sync.name])
            if plan.added:
                if sync.mode == "full":
                    engine.execute(_STATE_INSERT_NEW, [sync.name, now, sync.name])
                else:
                    engine.execute(_STATE_INSERT, [sync.name, now])
        finally:
            engine.unregister(_CHANGES)
        plan.batches = (n + batch_size - 1) // batch_size
    if n or trigger not in ("realtime",):
        status = "planned" if n else "completed"
        engine.execute(
            "INSERT INTO sync_runs (run_id, sync, destination, segment, mode, trigger, actor, started_at, planned_at, finished_at, "
            "status, planned, batches, skipped_consent, skipped_suppressed, errors) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '[]')",
            [plan.run_id, sync.name, sync.destination, sync.segment, sync.mode, trigger, actor.name, started, now,
             None if n else now, status, n, plan.batches, plan.skipped_consent, plan.skipped_suppressed])
        plan.recorded = True
    if plan.event_cursor is not None:
        engine.execute("UPDATE syncs SET event_cursor = ?, last_planned_at = ? WHERE name = ?", [plan.event_cursor, now, sync.name])
    else:
        engine.execute("UPDATE syncs SET last_planned_at = ? WHERE name = ?", [now, sync.name])


def plan_sync(engine: Engine, writer: Writer, sync: SyncDef, dest: DestinationDef, *, policy: ConsentPolicy, batch_size: int,
              trigger: str, actor: Principal = SYSTEM, realtime: bool = False) -> Plan:
    """Plan one run of `sync`: the target on a read cursor, then the diff, outbox and state in one writer transaction.

    `realtime`: only the profiles named by segment_events after the sync's cursor (none: nothing is recorded)."""
    import time

    from refinery.segments import computed

    started = datetime.now(UTC)
    plan = Plan("run_" + uuid.uuid4().hex[:20], sync.name, sync.destination, trigger)
    size = min(batch_size, sync.batch_size or batch_size)
    cur = engine.reader()
    t0 = time.perf_counter()
    only_ids: pa.Table | None = None
    if realtime:
        newest = _newest_event(engine, cur)
        ev = engine.fetch_arrow(
            "SELECT DISTINCT profile_id FROM segment_events WHERE segment = ? AND event_id > ? AND event_id <= ?",
            [sync.segment, sync.event_cursor, newest], cursor=cur)
        plan.event_cursor = newest
        if ev.num_rows == 0:
            if plan.event_cursor != sync.event_cursor:
                writer.call(lambda e: e.execute("UPDATE syncs SET event_cursor = ? WHERE name = ? AND event_cursor = ?",
                                                [plan.event_cursor, sync.name, sync.event_cursor]))
            return plan
        only_ids = ev
    computed_traits = set(computed.expressions(engine, cursor=cur)) if sync.mode == "mirror" else set()
    query = target_query(sync, dest.purpose, policy, with_hash=sync.mode == "mirror", computed_traits=computed_traits,
                         only=only_ids is not None)
    if only_ids is not None:
        engine.register(_ONLY, only_ids, cursor=cur)
    try:
        members = engine.fetch_arrow(query, cursor=cur)
    finally:
        if only_ids is not None:
            engine.unregister(_ONLY, cursor=cur)
    plan.members = members.num_rows
    allowed = pc.fill_null(members.column("allowed"), False)
    target = members.filter(allowed).select(["profile_id", "h"])
    plan.skipped_consent = plan.members - target.num_rows
    # The suppression list: only who would be added is looked up (everyone else is at the destination already
    # or leaving it); an erased person's memberships are gone with the erasure.
    if target.num_rows:
        suppressed = _suppressed_adds(engine, sync, target, cur)
        if suppressed:
            target = target.filter(pc.invert(pc.is_in(target.column("profile_id"), value_set=pa.array(sorted(suppressed), pa.string()))))
            plan.skipped_suppressed = len(suppressed)
    plan.target = target.num_rows
    plan.timings_ms["target"] = round((time.perf_counter() - t0) * 1000, 1)

    def write(e: Engine) -> None:
        t1 = time.perf_counter()
        fresh = _current(e, sync)
        if fresh is None:  # deleted meanwhile
            return
        e.register(_TARGET, target)
        if only_ids is not None:
            e.register(_ONLY, only_ids)
        try:
            changes = _changes(e, fresh, only_ids is not None)
            _write(e, fresh, plan, changes, size, trigger, actor, started)
        finally:
            e.unregister(_TARGET)
            if only_ids is not None:
                e.unregister(_ONLY)
        plan.timings_ms["diff_and_write"] = round((time.perf_counter() - t1) * 1000, 1)

    writer.call(write)
    if plan.recorded:
        log.info("activation: sync %s planned %d adds, %d removes in %d batches (%s)", sync.name, plan.added, plan.removed,
                 plan.batches, trigger)
    return plan


def _newest_event(engine: Engine, cursor: Any) -> int:
    return int(engine.fetch_all("SELECT coalesce(max(event_id), 0) FROM segment_events", cursor=cursor)[0][0])


def _current(engine: Engine, sync: SyncDef) -> SyncDef | None:
    from refinery.activation.store import find_sync

    found = find_sync(engine, sync.name, cursor=engine.reader())
    if found is None:
        return None
    # The mode and mapping in force now; the cursor this plan read from.
    return SyncDef(**{**asdict(found), "event_cursor": sync.event_cursor})


def _suppressed_adds(engine: Engine, sync: SyncDef, target: pa.Table, cursor: Any) -> set[str]:
    from refinery.privacy.pii import vault_of

    vault = vault_of(engine)
    if vault is None or not vault.suppressed:
        return set()
    engine.register(_TARGET, target, cursor=cursor)
    try:
        new = [str(r[0]) for r in engine.fetch_all(
            f"SELECT profile_id FROM {_TARGET} WHERE profile_id NOT IN (SELECT profile_id FROM sync_state WHERE sync = ?)",  # noqa: S608
            [sync.name], cursor=cursor)]
    finally:
        engine.unregister(_TARGET, cursor=cursor)
    return suppressed_profiles(engine, new, cursor=cursor)
