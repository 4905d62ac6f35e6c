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

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

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
from refinery.identity import sql
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

@dataclass
class Gated:
    records: list[Record] = field(default_factory=list)
    outcome: outbox.Outcome = field(default_factory=outbox.Outcome)


def _ids_param() -> exp.Expression:
    return sql.template("SELECT u.profile_id FROM (SELECT unnest(CAST(? AS VARCHAR[])) AS profile_id) u")


def _allowed(engine: Engine, ids: list[str], purpose: str, policy: ConsentPolicy, cursor: Any) -> set[str]:
    if not ids:
        return set()
    query = _ids_param()
    assert isinstance(query, exp.Select)
    query = query.where(ConsentService.allowed_filter(exp.column("profile_id", table="u"), purpose, policy))
    return {str(r[0]) for r in engine.fetch_all(query, [ids], cursor=cursor)}


def _in_state(engine: Engine, sync: str, ids: list[str], cursor: Any) -> set[str]:
    rows = engine.fetch_all("SELECT profile_id FROM sync_state WHERE sync = ? AND profile_id IN (SELECT unnest(CAST(? AS VARCHAR[])))",
                            [sync, ids], cursor=cursor)
    return {str(r[0]) for r in rows}


def _existing(engine: Engine, ids: list[str], cursor: Any) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """(profile -> traits) of the profiles that exist, and the ids merged into another profile."""
    rows = engine.fetch_all("SELECT profile_id, traits FROM profiles WHERE profile_id IN (SELECT unnest(CAST(? AS VARCHAR[])))",
                            [ids], cursor=cursor)
    traits = {str(p): (json.loads(t) if isinstance(t, str) else dict(t or {})) for p, t in rows}
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


def _fields(sync: SyncDef, pid: str, traits: dict[str, Any], computed: dict[tuple[str, str], Any], computed_names: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for target, source in sync.mapping.items():
        if source == PROFILE_ID:
            out[target] = pid
        elif source in computed_names and (pid, source) in computed:
            out[target] = computed[(pid, source)]
        else:
            out[target] = traits.get(source)
    return out


def _tokens_in(value: Any, into: set[str]) -> None:
    if isinstance(value, str) and is_token(value):
        into.add(value)
    elif isinstance(value, dict):
        for v in value.values():
            _tokens_in(v, into)
    elif isinstance(value, list):
        for v in value:
            _tokens_in(v, into)


def _revealed(value: Any, clear: dict[str, str]) -> tuple[Any, bool]:
    """`value` with its tokens revealed, and whether every token revealed."""
    if isinstance(value, str) and is_token(value):
        return (clear[value], True) if value in clear else (None, False)
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


def gate(engine: Engine, sync: SyncDef, dest: DestinationDef, records: list[tuple[str, str]], policy: ConsentPolicy,
         needs_fields: bool, cursor: Any) -> Gated:
    """The batch as it may be delivered now (see the module docstring)."""
    from refinery.segments import computed as computed_traits

    out = Gated()
    ids = sorted({p for p, _ in records})
    held = _in_state(engine, sync.name, ids, cursor)
    adds = [p for p, a in records if a == "add" and p in held]
    removes = [p for p, a in records if a == "remove" and p not in held]
    out.outcome.superseded = len(records) - len(adds) - len(removes)
    traits, merged = _existing(engine, adds + removes, cursor)
    allowed = _allowed(engine, adds, dest.purpose, policy, cursor)
    suppressed = suppressed_profiles(engine, [p for p in adds if p in allowed and p in traits], cursor=cursor)
    names = sorted(computed_traits.expressions(engine, cursor=cursor))
    computed_names = set(names) & set(sync.mapping.values())
    wanted = [p for p in adds if p in allowed and p in traits and p not in suppressed]
    with_fields = wanted + ([p for p in removes if p in traits] if needs_fields else [])
    computed = _computed(engine, with_fields, sorted(computed_names), cursor)
    raw = {p: _fields(sync, p, traits[p], computed, computed_names) for p in with_fields}
    tokens: set[str] = set()
    for f in raw.values():
        _tokens_in(f, tokens)
    clear = reveal_on(engine, tokens, cursor=cursor) if tokens else {}
    withheld: list[str] = []
    for p in adds:
        if p in merged:  # merged into another profile: the segment's next run moves the membership
            out.outcome.superseded += 1
            continue
        reason = None
        if p not in allowed:
            reason = "consent"
        elif p not in traits or p in suppressed:
            reason = "suppressed"
        else:
            revealed, ok = _revealed(raw[p], clear)
            if not ok:
                reason = "suppressed"  # a personal value that no longer reveals: the person was erased
            else:
                out.records.append(Record(p, "add", revealed))
                out.outcome.added += 1
                continue
        if reason == "consent":
            out.outcome.skipped_consent += 1
        else:
            out.outcome.skipped_suppressed += 1
        withheld.append(p)
        out.records.append(Record(p, "remove", {}))  # the destination may hold it from before: take it back
        out.outcome.removed += 1
    for p in removes:
        fields: dict[str, Any] = {}
        if p in raw:
            value, ok = _revealed(raw[p], clear)
            fields = value if ok else {}
        out.records.append(Record(p, "remove", fields))
        out.outcome.removed += 1
    out.outcome.withheld = tuple(withheld)
    return out


# --- delivering ------------------------------------------------------------------------------------------

class Deliverer:
    """Delivers one destination's batches: builds the destination from its configuration (again
    when it changes) and runs one batch at a time. Used by its worker thread, and in-process by
    `refinery syncs run` when no worker runs."""

    def __init__(self, engine: Engine, writer: Writer, settings: Settings, destination: str, vault: Any):
        self.engine, self.writer, self.settings, self.name, self.vault = engine, writer, settings, destination, vault
        self._live: Destination | None = None
        self._version: datetime | None = None
        self.policy = policy_from_settings(settings)

    def _destination(self, dest: DestinationDef) -> Destination:
        if self._live is None or self._version != dest.updated_at:
            self.close()
            dtype = get_type(dest.kind)
            config = live_config(self.engine, self.vault, dest)
            ctx = DestinationContext(dest.name, self.settings.data_dir, self.settings.activation_timeout_seconds,
                                     tuple(self.settings.activation_allowed_networks))
            self._live = dtype.factory(config, ctx)
            self._version = dest.updated_at
        return self._live

    def close(self) -> None:
        if self._live is not None:
            try:
                self._live.close()
            except Exception as e:  # closing must not stop delivery of the others
                log.warning("activation: closing destination %s failed: %s", self.name, type(e).__name__)
            self._live = None

    def next_due(self, now: datetime | None = None) -> outbox.BatchRow | None:
        return outbox.due(self.engine, self.name, now or datetime.now(UTC))

    def deliver_one(self, batch: outbox.BatchRow) -> str:
        """One attempt at `batch`; returns what became of it: delivered, retry, dead (or cancelled)."""
        cur = self.engine.reader()
        now = datetime.now(UTC)
        attempt = self.writer.call(lambda e: outbox.begin_attempt(e, batch, now))
        dest = find_destination(self.engine, self.name, cursor=cur)
        sync = find_sync(self.engine, batch.sync, cursor=cur)
        if dest is None or sync is None:  # deleted meanwhile (deleting cancels; this is the race)
            self.writer.call(lambda e: e.execute("UPDATE activation_batches SET status = 'cancelled' WHERE batch_id = ?", [batch.batch_id]))
            return "cancelled"
        try:
            dtype = get_type(dest.kind)
            gated = gate(self.engine, sync, dest, outbox.records(self.engine, batch.batch_id, cursor=cur), self.policy,
                         bool(dtype.needs_fields), cur)
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
        done = datetime.now(UTC)
        self.writer.call(lambda e: outbox.delivered(e, batch, gated.outcome, sync.name, done))
        return "delivered"

    def _retry(self, batch: outbox.BatchRow, attempt: int, error: str, retry_after: float | None) -> str:
        s = self.settings
        if attempt >= s.activation_max_attempts:
            return self._dead(batch, attempt, "attempts_exhausted", error)
        wait = backoff(attempt, s.activation_backoff_base_seconds, s.activation_backoff_max_seconds, retry_after)
        at = datetime.now(UTC) + timedelta(seconds=wait)
        log.info("activation: batch %s to %s failed (attempt %d), retry in %.1f s: %s", batch.batch_id, self.name, attempt, wait, error)
        self.writer.call(lambda e: outbox.retry_later(e, batch, at, error))
        return "retry"

    def _dead(self, batch: outbox.BatchRow, attempt: int, reason: str, error: str) -> str:
        log.warning("activation: batch %s to %s dead-lettered (%s after %d attempts): %s", batch.batch_id, self.name, reason, attempt, error)
        now = datetime.now(UTC)
        self.writer.call(lambda e: outbox.dead(e, batch, attempt, reason, error, now))
        return "dead"

    def drain(self, *, deadline: float | None = None, stop: threading.Event | None = None) -> dict[str, int]:
        """Deliver every batch due now, in order (one attempt each pass), until none is due."""
        seen: dict[str, int] = {}
        tried: set[str] = set()
        while not (stop is not None and stop.is_set()):
            if deadline is not None and time.monotonic() >= deadline:
                break
            batch = self.next_due()
            if batch is None or batch.batch_id in tried:
                break
            tried.add(batch.batch_id)
            result = self.deliver_one(batch)
            seen[result] = seen.get(result, 0) + 1
        return seen


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
                batch = self.deliverer.next_due()
                if batch is not None:
                    self.deliverer.deliver_one(batch)
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
