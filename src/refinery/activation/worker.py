"""Delivery: one thread per destination takes its outbox's due batches in order and delivers them.

For each batch, at delivery time (not at planning time, which may be long ago):

1. **Still wanted?** An `add` whose profile the sync's state no longer holds, or a `remove` whose
   profile it holds again, was made moot by a later plan: dropped (`superseded`). So a retried or
   replayed old batch can never undo a newer one.
2. **Still allowed?** Adds are checked again against consent for the destination's purpose
   (`ConsentService.allowed_filter`) and the suppression list; a profile that is gone (erased) or
   whose mapped personal values no longer reveal (its keys were destroyed) is suppressed. A
   forbidden add is never sent: it becomes a `remove` (profile id only; the destination may hold
   it from before) and leaves the state, counted `skipped_consent` / `skipped_suppressed`.
3. **Fields.** The sync's mapped fields are read now and personal tokens revealed
   (from the vault, on the worker's own read cursor); clear values exist only in this call.
4. `Destination.deliver(batch)`. Success: delivered. `TransientDeliveryError` (or any unexpected
   error): retried after `min(max, base * 2**(n-1))` seconds with full jitter, or after the
   receiver's `Retry-After` (capped by the maximum). `TerminalDeliveryError`, or the last of
   `activation_max_attempts`: dead letter.

The attempt is counted before `deliver` is called, so a process killed mid-delivery leaves the
batch `delivering`; it is due again at start-up and delivered with the same id.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

import orjson
import pyarrow as pa
from sqlglot import exp

from refinery.activation import outbox
from refinery.activation.destination import (
    Batch,
    Destination,
    DestinationContext,
    Record,
    TerminalDeliveryError,
    TransientDeliveryError,
    get_type,
)
from refinery.activation.plan import reveal_on, suppressed_profiles
from refinery.activation.store import (
    PROFILE_ID,
    DestinationDef,
    SyncDef,
    find_destination,
    find_sync,
    live_config,
)
from refinery.governance.consent import ConsentService
from refinery.governance.purposes import ConsentPolicy, policy_from_settings
from refinery.privacy.pii import redact_text
from refinery.privacy.tokens import is_token
from refinery.settings import Settings
from refinery.storage.engine import Engine
from refinery.storage.writer import Writer

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 300


def error_text(e: BaseException) -> str:
    """An error as recorded: its type and message with anything personal-looking masked, shortened."""
    message = getattr(e, "message", None) or str(e)
    return redact_text(f"{type(e).__name__}: {message}")[:MAX_ERROR_CHARS]


def backoff(attempt: int, base: float, cap: float, retry_after: float | None = None, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before attempt `attempt + 1`: the receiver's `Retry-After` when given (capped),
    else full jitter over `min(cap, base * 2**(attempt - 1))`."""
    if retry_after is not None and retry_after >= 0:
        return min(float(retry_after), cap)
    return rand() * min(cap, base * 2 ** max(attempt - 1, 0))


# --- building a batch at delivery time --------------------------------------------------------------------

#: Most batches checked together (one set of queries for the group: each scans the big tables once, so a
#: group of 100 pays a hundredth of it per batch), then delivered one by one in order.
GROUP_BATCHES = 100
#: A group's checks serve deliveries that start within this long of them; the rest are checked again. Consent
#: receipts and the suppression list are looked at again before every batch (`Deliverer._marks`): a change
#: stops the group at once, so this bounds only how old other facts may be (membership state, merges, values).
#: A group cut short wastes the checks of the batches it did not reach: on a busy machine the checks of 100
#: batches of a 1M-member world alone took 3-6 s.
FRESH_SECONDS = 10.0
#: The consent receipts' sequence's last value (`Deliverer._receipt_sequence`).
_RECEIPT_SEQUENCE = "SELECT max(last_value) FROM duckdb_sequences() WHERE sequence_name = 'consent_log_seq'"
_GATE_IDS = "_activation_gate_ids"
_GATE_IDENTITIES = "_activation_gate_identities"


class _CollectorPause:
    """Pauses Python's cyclic garbage collector while a group's checks build their records.

    A group of 100 batches allocates some 300,000 tracked objects (records, their fields, the values
    read) that form no cycles and live until the group is delivered; each allocation burst makes the
    collector traverse them (and, in a full collection, the whole heap) again and again: 15-20% of a
    delivery's time in the benchmark. Reference counting still frees everything; the collector runs
    again, as configured, when the last delivery thread leaves (several destinations' threads share one
    pause: the first in turns it off, the last out back on, if it was on)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._was_enabled = False

    def __enter__(self) -> None:
        with self._lock:
            if self._inside == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._inside += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0 and self._was_enabled:
                gc.enable()


_collector_pause = _CollectorPause()


@dataclass
class Gated:
    records: list[Record] = field(default_factory=list)
    outcome: outbox.Outcome = field(default_factory=outbox.Outcome)


#: The profiles a group's checks read (registered on the reader cursor while they run) and the identities of its adds.
_GATE_IDS = "_activation_gate_ids"
_GATE_ADDS = "_activation_gate_adds"
_GATE_IDENTITIES = "_activation_gate_identities"


@lru_cache(maxsize=64)
def _allowed_sql(dialect: str, purpose: str, policy: ConsentPolicy) -> str:
    """The consent check of a group's adds, rendered once per purpose and policy (constant text: the ids
    and their identities are registered tables)."""
    query = exp.select(exp.column("profile_id", table="u")).from_(exp.to_table(_GATE_ADDS).as_("u")).where(
        ConsentService.allowed_filter(exp.column("profile_id", table="u"), purpose, policy, identities=exp.to_table(_GATE_IDENTITIES)))
    return query.sql(dialect=dialect)


def _column(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist()


def _allowed(engine: Engine, purpose: str, policy: ConsentPolicy, cursor: Any, identities: pa.Table) -> set[str]:
    """The adds (`_GATE_ADDS`) consent allows for `purpose`; `identities`: their identities rows."""
    engine.register(_GATE_IDENTITIES, identities, cursor=cursor)
    try:
        return set(_column(engine.fetch_arrow(_allowed_sql(engine.dialect, purpose, policy), cursor=cursor), "profile_id"))
    finally:
        engine.unregister(_GATE_IDENTITIES, cursor=cursor)


def _identities(engine: Engine, cursor: Any) -> pa.Table:
    return engine.fetch_arrow(f"SELECT identifier_type, value, profile_id FROM identities WHERE profile_id IN (SELECT profile_id FROM {_GATE_ADDS})",  # noqa: S608
                              cursor=cursor)


def _in_state(engine: Engine, syncs: list[str], cursor: Any) -> dict[str, set[str]]:
    """sync -> the profiles of the group (`_GATE_IDS`) its state holds."""
    rows = engine.fetch_arrow(f"SELECT sync, profile_id FROM sync_state WHERE sync IN (SELECT unnest(CAST(? AS VARCHAR[]))) "  # noqa: S608
                              f"AND profile_id IN (SELECT profile_id FROM {_GATE_IDS})", [syncs], cursor=cursor)
    out: dict[str, set[str]] = {s: set() for s in syncs}
    for s, p in zip(_column(rows, "sync"), _column(rows, "profile_id"), strict=True):
        out[s].add(p)
    return out


def _existing(engine: Engine, ids: list[str], cursor: Any) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """(profile -> traits) of the group's profiles (`_GATE_IDS`) that exist, and the ids merged into another profile."""
    table = engine.fetch_arrow(f"SELECT profile_id, traits FROM profiles WHERE profile_id IN (SELECT profile_id FROM {_GATE_IDS})",  # noqa: S608
                               cursor=cursor)
    traits = {p: (orjson.loads(t) if isinstance(t, str) else dict(t or {}))
              for p, t in zip(_column(table, "profile_id"), _column(table, "traits"), strict=True)}
    gone = [i for i in ids if i not in traits]
    merged: set[str] = set()
    if gone:
        merged = {str(r[0]) for r in engine.fetch_all(
            "SELECT merged_profile_id FROM profile_merges WHERE undone_at IS NULL AND merged_profile_id IN (SELECT unnest(CAST(? AS VARCHAR[])))",
            [gone], cursor=cursor)}
    return traits, merged


def _computed(engine: Engine, ids: list[str], names: list[str], cursor: Any) -> dict[tuple[str, str], Any]:
    if not ids or not names:
        return {}
    rows = engine.fetch_all(
        "SELECT profile_id, name, value FROM computed_trait_values WHERE profile_id IN (SELECT unnest(CAST(? AS VARCHAR[]))) "
        "AND name IN (SELECT unnest(CAST(? AS VARCHAR[])))", [ids, names], cursor=cursor)
    return {(str(p), str(n)): (json.loads(v) if isinstance(v, str) else v) for p, n, v in rows}


def _plan(sync: SyncDef, computed_names: set[str]) -> tuple[tuple[str, str, int], ...]:
    """How to read each of the sync's mapped fields: (target, source, 0 profile id | 1 computed or trait | 2 trait)."""
    return tuple((target, source, 0 if source == PROFILE_ID else 1 if source in computed_names else 2)
                 for target, source in sync.mapping.items())


def _fields(plan: tuple[tuple[str, str, int], ...], pid: str, traits: dict[str, Any], computed: dict[tuple[str, str], Any],
            tokens: set[str]) -> _Raw:
    """One profile's mapped fields (`plan`, from `_plan`), as stored (tokens not revealed), and which of
    them may hold tokens; the tokens are added to `tokens`."""
    out: dict[str, Any] = {}
    marked: list[str] | None = None
    for target, source, how in plan:
        if how == 2:
            value: Any = traits.get(source)
        elif how == 0:
            value = pid
        elif (pid, source) in computed:
            value = computed[(pid, source)]
        else:
            value = traits.get(source)
        out[target] = value
        if type(value) is str:
            if value.startswith(_TOKEN_PREFIX):
                tokens.add(value)
                marked = [target] if marked is None else [*marked, target]
        elif isinstance(value, dict | list):
            _tokens_in(value, tokens)
            marked = [target] if marked is None else [*marked, target]  # nested: revealed by walking it
    return _Raw(out, () if marked is None else tuple(marked))


_TOKEN_PREFIX = "pii:"


@dataclass(slots=True)
class _Raw:
    """One profile's mapped fields for one sync, and the fields that may hold tokens (`marked`);
    `reveal` replaces those in place, once (`state`: None before, True revealed, False not revealable)."""

    fields: dict[str, Any]
    marked: tuple[str, ...]
    state: bool | None = None

    def reveal(self, clear: dict[str, str]) -> dict[str, Any] | None:
        """The fields with their tokens revealed; None when one does not reveal (its person was erased)."""
        if self.state is None:
            self.state = _reveal_in_place(self.fields, self.marked, clear)
        return self.fields if self.state else None


def _reveal_in_place(fields: dict[str, Any], marked: tuple[str, ...], clear: dict[str, str]) -> bool:
    """Replace the tokens of the `marked` fields by their values; False when one does not reveal."""
    for k in marked:
        v = fields[k]
        if type(v) is str:
            c = clear.get(v)
            if c is None:
                if is_token(v):
                    return False
            else:
                fields[k] = c
        else:
            fields[k], ok = _revealed(v, clear)
            if not ok:
                return False
    return True


def _tokens_in(value: Any, into: set[str]) -> None:
    """Every string in `value` that may be a token (the vault decides which are)."""
    if isinstance(value, str):
        if value.startswith(_TOKEN_PREFIX):
            into.add(value)
    elif isinstance(value, dict):
        for v in value.values():
            _tokens_in(v, into)
    elif isinstance(value, list):
        for v in value:
            _tokens_in(v, into)


def _revealed(value: Any, clear: dict[str, str]) -> tuple[Any, bool]:
    """`value` with its tokens revealed, and whether every token revealed."""
    if isinstance(value, str):
        if value.startswith(_TOKEN_PREFIX):
            if value in clear:
                return clear[value], True
            if is_token(value):
                return None, False
        return value, True
    if isinstance(value, dict):
        ok = True
        out = {}
        for k, v in value.items():
            out[k], good = _revealed(v, clear)
            ok = ok and good
        return out, ok
    if isinstance(value, list):
        items = [_revealed(v, clear) for v in value]
        return [v for v, _ in items], all(g for _, g in items)
    return value, True


@dataclass
class _Seen:
    """What a group's checks read, once for all its batches."""

    held: dict[str, set[str]]
    traits: dict[str, dict[str, Any]]
    merged: set[str]
    allowed: set[str]
    suppressed: set[str]
    raw: dict[str, dict[str, _Raw]]  # sync -> profile -> fields
    clear: dict[str, str]


def gate(engine: Engine, sync: SyncDef, dest: DestinationDef, records: list[tuple[str, str]], policy: ConsentPolicy,
         needs_fields: bool, cursor: Any) -> Gated:
    """The batch as it may be delivered now (see the module docstring)."""
    return gate_many(engine, dest, [(sync, records)], policy, needs_fields, cursor)[0]


def gate_many(engine: Engine, dest: DestinationDef, batches: list[tuple[SyncDef, list[tuple[str, str]]]], policy: ConsentPolicy,
              needs_fields: bool, cursor: Any) -> list[Gated]:
    """Several batches of one destination as they may be delivered now, in order: one set of reads for all
    of them, then each batch decided as `gate` would decide it after the ones before it were delivered (an
    add withheld by an earlier batch has left the state by the time a later batch is looked at)."""
    from refinery.segments import computed as computed_traits

    ids = sorted({p for _, recs in batches for p, _ in recs})
    adds = sorted({p for _, recs in batches for p, a in recs if a == "add"})
    engine.register(_GATE_IDS, pa.table({"profile_id": pa.array(ids, pa.string())}), cursor=cursor)
    engine.register(_GATE_ADDS, pa.table({"profile_id": pa.array(adds, pa.string())}), cursor=cursor)
    try:
        held = _in_state(engine, sorted({s.name for s, _ in batches}), cursor)
        traits, merged = _existing(engine, ids, cursor)
        allowed: set[str] = set()
        suppressed: set[str] = set()
        if adds:
            identities = _identities(engine, cursor)
            allowed = _allowed(engine, dest.purpose, policy, cursor, identities)
            suppressed = suppressed_profiles(engine, [p for p in adds if p in allowed and p in traits], cursor=cursor, identities=identities)
    finally:
        engine.unregister(_GATE_IDS, cursor=cursor)
        engine.unregister(_GATE_ADDS, cursor=cursor)
    names = set(computed_traits.expressions(engine, cursor=cursor))
    # The values to read and reveal: adds that may go out, and (for kinds that need them) removes.
    wanted: dict[str, set[str]] = {}
    for sync, recs in batches:
        h = held[sync.name]
        mine = wanted.setdefault(sync.name, set())
        for p, a in recs:
            if p not in traits:
                continue
            if (a == "add" and p in h and p in allowed and p not in suppressed) or (a == "remove" and needs_fields):
                mine.add(p)
    syncs = {s.name: s for s, _ in batches}
    computed_names = names & {src for s in syncs.values() for src in s.mapping.values()}
    computed = _computed(engine, sorted({p for ps in wanted.values() for p in ps}), sorted(computed_names), cursor)
    tokens: set[str] = set()
    raw: dict[str, dict[str, _Raw]] = {}
    for name, ps in wanted.items():
        plan = _plan(syncs[name], computed_names)
        raw[name] = {p: _fields(plan, p, traits[p], computed, tokens) for p in ps}
    clear = reveal_on(engine, tokens, cursor=cursor) if tokens else {}
    seen = _Seen(held, traits, merged, allowed, suppressed, raw, clear)
    out = []
    for sync, recs in batches:
        g = _decide(sync, recs, seen)
        held[sync.name].difference_update(g.outcome.withheld)
        out.append(g)
    return out


def _decide(sync: SyncDef, records: list[tuple[str, str]], seen: _Seen) -> Gated:
    out = Gated()
    o = out.outcome
    held, raw, clear = seen.held[sync.name], seen.raw.get(sync.name, {}), seen.clear
    allowed, traits, suppressed, merged = seen.allowed, seen.traits, seen.suppressed, seen.merged
    adds = [p for p, a in records if a == "add" and p in held]
    removes = [p for p, a in records if a == "remove" and p not in held]
    superseded = len(records) - len(adds) - len(removes)
    added = removed = skipped_consent = skipped_suppressed = 0
    withheld: list[str] = []
    sent = out.records
    send = sent.append
    for p in adds:
        if p in merged:  # merged into another profile: the segment's next run moves the membership
            superseded += 1
            continue
        if p not in allowed:
            skipped_consent += 1
        elif p in traits and p not in suppressed:
            r = raw[p]
            revealed = r.fields if r.state else r.reveal(clear)
            if revealed is not None:
                send(Record(p, "add", revealed))
                added += 1
                continue
            skipped_suppressed += 1  # a personal value that no longer reveals: the person was erased
        else:
            skipped_suppressed += 1
        withheld.append(p)
        send(Record(p, "remove", {}))  # the destination may hold it from before: take it back
        removed += 1
    for p in removes:
        fields = raw.get(p)
        send(Record(p, "remove", (fields.reveal(clear) or {}) if fields is not None else {}))
        removed += 1
    o.superseded, o.added, o.removed, o.skipped_consent, o.skipped_suppressed = superseded, added, removed, skipped_consent, skipped_suppressed
    o.withheld = tuple(withheld)
    return out


# --- delivering ------------------------------------------------------------------------------------------

@dataclass
class _Done:
    """What became of one attempt, recorded with the rest of its group."""

    batch: outbox.BatchRow
    result: str  # delivered, retry, dead
    attempt: int
    outcome: outbox.Outcome | None = None
    sync: str = ""
    at: datetime | None = None
    error: str = ""
    reason: str = ""


class Deliverer:
    """Delivers one destination's batches: builds the destination from its configuration (again
    when it changes), checks a group of due batches at once and delivers them one at a time, in
    order, recording the group's outcomes together. Used by its worker thread, and in-process by
    `refinery syncs run` when no worker runs."""

    def __init__(self, engine: Engine, writer: Writer, settings: Settings, destination: str, vault: Any):
        self.engine, self.writer, self.settings, self.name, self.vault = engine, writer, settings, destination, vault
        self._live: Destination | None = None
        self._version: datetime | None = None
        self.policy = policy_from_settings(settings)
        self.group_size = GROUP_BATCHES

    def _destination(self, dest: DestinationDef) -> Destination:
        if self._live is None or self._version != dest.updated_at:
            self._close_destination()
            dtype = get_type(dest.kind)
            config = live_config(self.engine, self.vault, dest)
            ctx = DestinationContext(dest.name, self.settings.data_dir, self.settings.activation_timeout_seconds,
                                     tuple(self.settings.activation_allowed_networks))
            self._live = dtype.factory(config, ctx)
            self._version = dest.updated_at
        return self._live

    def close(self) -> None:
        self._close_destination()

    def _close_destination(self) -> None:
        if self._live is not None:
            try:
                self._live.close()
            except Exception as e:  # closing must not stop delivery of the others
                log.warning("activation: closing destination %s failed: %s", self.name, type(e).__name__)
            self._live = None

    def next_due(self, now: datetime | None = None) -> outbox.BatchRow | None:
        return outbox.due(self.engine, self.name, now or datetime.now(UTC))

    def next_group(self, now: datetime | None = None, *, skip: set[str] | frozenset[str] = frozenset()) -> list[outbox.BatchRow]:
        return outbox.due_many(self.engine, self.name, now or datetime.now(UTC), self.group_size, skip=skip)

    def deliver_one(self, batch: outbox.BatchRow) -> str:
        """One attempt at `batch`; returns what became of it: delivered, retry, dead (or cancelled)."""
        return self.deliver_group([batch])[0][1]

    def deliver_group(self, batches: list[outbox.BatchRow], *, deadline: float | None = None,
                      stop: threading.Event | None = None) -> list[tuple[outbox.BatchRow, str]]:
        """One attempt at each of `batches` (in seq order), checked together; returns what became of those
        attempted. The group stops early - the rest left as they were, due again - when its checks are
        older than FRESH_SECONDS, when consent receipts or the suppression list changed since them, or at
        `deadline` / `stop`. At least the first batch is attempted."""
        return self._deliver_checked(self._check(batches), deadline=deadline, stop=stop)

    def _check(self, batches: list[outbox.BatchRow]) -> _Checked:
        """A group's checks (reads only, on this thread's reader cursor): the destination, the syncs, and
        each batch gated."""
        cur = self.engine.reader()
        dest = find_destination(self.engine, self.name, cursor=cur)
        syncs = {n: find_sync(self.engine, n, cursor=cur) for n in sorted({b.sync for b in batches})}
        gone = [b for b in batches if dest is None or syncs[b.sync] is None]
        live = [b for b in batches if b not in gone]
        checked = _Checked(dest, syncs, gone, live, time.monotonic(), self._marks(cur))
        if not live or dest is None:
            return checked
        try:
            needs_fields = bool(get_type(dest.kind).needs_fields)
            with _collector_pause:
                recs = outbox.records_many(self.engine, [b.batch_id for b in live], cursor=cur)
                checked.gated = list(gate_many(self.engine, dest, [(syncs[b.sync], recs.get(b.batch_id, [])) for b in live],  # type: ignore[misc]
                                               self.policy, needs_fields, cur))
        except Exception as e:
            if len(live) > 1:  # one batch the checks cannot read must not hold up the others: each alone
                checked.failed = True
            else:
                log.warning("activation: checking batch %s to %s failed: %s", live[0].batch_id, self.name, type(e).__name__)
                checked.gated = [e]
        return checked

    def _deliver_checked(self, checked: _Checked, *, deadline: float | None = None,
                         stop: threading.Event | None = None) -> list[tuple[outbox.BatchRow, str]]:
        """Deliver a checked group (see `deliver_group`)."""
        gone, live, dest, syncs = checked.gone, checked.live, checked.dest, checked.syncs
        results: list[tuple[outbox.BatchRow, str]] = []
        if gone:  # deleted meanwhile (deleting cancels; this is the race)
            self.writer.call(lambda e: e.execute("UPDATE activation_batches SET status = 'cancelled' WHERE batch_id IN "
                                                 "(SELECT unnest(CAST(? AS VARCHAR[])))", [[b.batch_id for b in gone]]))
            results += [(b, "cancelled") for b in gone]
        if not live or dest is None:
            return results
        if checked.failed:
            for b in live:
                results += self.deliver_group([b], deadline=deadline, stop=stop)
            return results
        cur = self.engine.reader()
        now = datetime.now(UTC)
        attempts = self.writer.call(lambda e: outbox.begin_attempts(e, live, now))
        done: list[_Done] = []
        for i, (b, g) in enumerate(zip(live, checked.gated, strict=True)):
            if i and self._stale(checked.checked_at, checked.marks, cur, deadline, stop):
                break
            done.append(self._attempt(b, syncs[b.sync], dest, g, attempts[b.batch_id]))  # type: ignore[arg-type]
        unreached = live[len(done):]
        # Too many to deliver while the checks were fresh: fewer next time; all of them: more, up to the most.
        self.group_size = max(1, self.group_size // 2) if unreached else min(GROUP_BATCHES, self.group_size * 2)
        self.writer.call(lambda e: self._record(e, done, unreached))
        return results + [(d.batch, d.result) for d in done]

    def _marks(self, cursor: Any) -> tuple[Any, Any, int]:
        """What tells a group's checks are out of date: the newest consent receipt committed, the receipt
        sequence's last value, and the suppression list's size."""
        newest = self.engine.fetch_all("SELECT max(log_id) FROM consent_log", cursor=cursor)[0][0]
        return newest, self._receipt_sequence(cursor), len(getattr(self.vault, "suppressed", ()) or ())

    def _receipt_sequence(self, cursor: Any) -> Any:
        """The consent receipts' sequence's last value: every receipt takes its id from it, and it moves
        when one is taken (before its transaction commits), so an unchanged value means no new receipt.
        A catalog read, not a scan of the receipts."""
        return self.engine.fetch_all(_RECEIPT_SEQUENCE, cursor=cursor)[0][0]

    def _stale(self, checked_at: float, marks: tuple[Any, Any, int], cursor: Any, deadline: float | None,
               stop: threading.Event | None) -> bool:
        now = time.monotonic()
        if (stop is not None and stop.is_set()) or (deadline is not None and now >= deadline) or now - checked_at > FRESH_SECONDS:
            return True
        newest, sequence, suppressed = marks
        if len(getattr(self.vault, "suppressed", ()) or ()) != suppressed or self._receipt_sequence(cursor) != sequence:
            return True
        if sequence != newest:  # a receipt was being written when the checks ran (or one rolled back): look at the receipts
            return bool(self.engine.fetch_all("SELECT max(log_id) FROM consent_log", cursor=cursor)[0][0] != newest)
        return False

    def _attempt(self, batch: outbox.BatchRow, sync: SyncDef, dest: DestinationDef, gated: Gated | BaseException, attempt: int) -> _Done:
        try:
            if isinstance(gated, BaseException):
                raise gated
            if gated.records:
                live = self._destination(dest)
                live.deliver(Batch(batch.batch_id, sync.name, sync.segment, dest.name, sync.mode,  # type: ignore[arg-type]
                                   tuple(gated.records), batch.created_at, attempt))
        except TerminalDeliveryError as e:
            return self._dead(batch, attempt, "terminal", error_text(e))
        except TransientDeliveryError as e:
            return self._retry(batch, attempt, error_text(e), e.retry_after)
        except Exception as e:  # a bug or an unexpected failure must not lose the batch: transient
            log.warning("activation: batch %s to %s failed unexpectedly: %s", batch.batch_id, self.name, type(e).__name__)
            return self._retry(batch, attempt, error_text(e), None)
        return _Done(batch, "delivered", attempt, gated.outcome, sync.name, datetime.now(UTC))

    def _retry(self, batch: outbox.BatchRow, attempt: int, error: str, retry_after: float | None) -> _Done:
        s = self.settings
        if attempt >= s.activation_max_attempts:
            return self._dead(batch, attempt, "attempts_exhausted", error)
        wait = backoff(attempt, s.activation_backoff_base_seconds, s.activation_backoff_max_seconds, retry_after)
        at = datetime.now(UTC) + timedelta(seconds=wait)
        log.info("activation: batch %s to %s failed (attempt %d), retry in %.1f s: %s", batch.batch_id, self.name, attempt, wait, error)
        return _Done(batch, "retry", attempt, at=at, error=error)

    def _dead(self, batch: outbox.BatchRow, attempt: int, reason: str, error: str) -> _Done:
        log.warning("activation: batch %s to %s dead-lettered (%s after %d attempts): %s", batch.batch_id, self.name, reason, attempt, error)
        return _Done(batch, "dead", attempt, at=datetime.now(UTC), error=error, reason=reason)

    @staticmethod
    def _record(engine: Engine, done: list[_Done], unreached: list[outbox.BatchRow]) -> None:
        """A group's outcomes, in one writer transaction."""
        outbox.delivered_many(engine, [(d.batch, d.outcome, d.sync, d.at) for d in done
                                       if d.result == "delivered" and d.outcome is not None and d.at is not None])
        for d in done:
            if d.result == "retry" and d.at is not None:
                outbox.retry_later(engine, d.batch, d.at, d.error)
            elif d.result == "dead" and d.at is not None:
                outbox.dead(engine, d.batch, d.attempt, d.reason, d.error, d.at)
        outbox.undo_attempts(engine, unreached)

    def drain(self, *, deadline: float | None = None, stop: threading.Event | None = None) -> dict[str, int]:
        """Deliver every batch due now, in order (one attempt each), until none is due."""
        seen: dict[str, int] = {}
        tried: set[str] = set()
        while not (stop is not None and stop.is_set()):
            if deadline is not None and time.monotonic() >= deadline:
                break
            group = self.next_group(skip=tried)
            if not group:
                break
            for batch, result in self.deliver_group(group, deadline=deadline, stop=stop):
                if result != "delivered":  # due again later (a retry): not in this drain
                    tried.add(batch.batch_id)
                seen[result] = seen.get(result, 0) + 1
        return seen


@dataclass
class _Checked:
    """A group's checks: what `Deliverer._check` read, for `_deliver_checked` to act on."""

    dest: DestinationDef | None
    syncs: dict[str, SyncDef | None]
    gone: list[outbox.BatchRow]
    live: list[outbox.BatchRow]
    checked_at: float
    marks: tuple[Any, Any, int]
    gated: list[Gated | BaseException] = field(default_factory=list)
    failed: bool = False


class DeliveryWorker(threading.Thread):
    """The thread that owns one destination's outbox."""

    def __init__(self, deliverer: Deliverer, poll_seconds: float):
        super().__init__(name=f"refinery-activation-{deliverer.name}", daemon=True)
        self.deliverer = deliverer
        self.poll = poll_seconds
        self.wake = threading.Event()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                group = self.deliverer.next_group()
                if group:
                    self.deliverer.deliver_group(group, stop=self.stopping)
                    continue
                nxt = outbox.next_due_at(self.deliverer.engine, self.deliverer.name)
                wait = self.poll
                if nxt is not None:
                    wait = max(0.0, min(wait, (nxt - datetime.now(UTC)).total_seconds()))
            except Exception as e:  # the worker must never die: a store error waits and tries again
                log.warning("activation: worker %s: %s", self.deliverer.name, type(e).__name__)
                wait = self.poll
            self.wake.wait(wait)
            self.wake.clear()
        self.deliverer.close()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
