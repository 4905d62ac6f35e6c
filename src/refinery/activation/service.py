"""`refinery serve`'s activation: one delivery worker per destination, and the syncs' schedules.

A scheduler thread, every `activation_poll_seconds`: starts a worker for each enabled destination
(and stops the workers of destinations deleted or disabled), plans each real-time sync from the
`segment_events` after its cursor (its first plan covers the whole segment), plans each interval
sync whose interval has passed since its last plan, wakes the workers whose outbox got batches, and
once an hour forgets the records of delivered batches. A failing sync is logged (its type only) and
the others carry on. Workers pick up `delivering` batches left by a crash on their first look.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from refinery.activation import outbox
from refinery.activation.plan import SYSTEM, Plan, plan_sync
from refinery.activation.store import SyncDef, get_destination, list_destinations, list_syncs
from refinery.activation.worker import Deliverer, DeliveryWorker
from refinery.governance.purposes import policy_from_settings

if TYPE_CHECKING:
    from refinery.runtime import Runtime

log = logging.getLogger(__name__)

_PRUNE_EVERY = timedelta(hours=1)
EXTRA = "activation"  # the key of the running service in Runtime.extras


def due_sync(sync: SyncDef, now: datetime) -> str | None:
    """How a sync is due now: 'realtime', 'full' (first plan of a real-time sync, or its interval passed), or None."""
    if not sync.enabled or sync.schedule == "manual":
        return None
    if sync.schedule == "realtime":
        return "full" if sync.last_planned_at is None else "realtime"
    if sync.last_planned_at is None or now - sync.last_planned_at >= timedelta(minutes=sync.interval_minutes or 0):
        return "full"
    return None


def plan(runtime: Runtime, sync: SyncDef, *, trigger: str, actor: Any = SYSTEM, realtime: bool = False) -> Plan:
    dest = get_destination(runtime.engine, sync.destination)
    return plan_sync(runtime.engine, runtime.writer, sync, dest, policy=policy_from_settings(runtime.settings),
                     batch_size=runtime.settings.activation_batch_size, trigger=trigger, actor=actor, realtime=realtime)


class ActivationService:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.workers: dict[str, DeliveryWorker] = {}
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pruned = datetime.min.replace(tzinfo=UTC)
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> ActivationService:
        self._thread = threading.Thread(target=self._run, name="refinery-activation", daemon=True)
        self._thread.start()
        self.runtime.extras[EXTRA] = self
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            workers = list(self.workers.values())
            self.workers.clear()
        for w in workers:
            w.stop()
        deadline = time.monotonic() + timeout
        for w in workers:
            w.join(max(0.1, deadline - time.monotonic()))
        if self.runtime.extras.get(EXTRA) is self:
            del self.runtime.extras[EXTRA]

    def wake(self, destination: str | None = None) -> None:
        """Look at the outbox now (a plan just wrote batches), instead of at the next poll."""
        with self._lock:
            targets = [self.workers[destination]] if destination in self.workers else list(self.workers.values()) if destination is None else []
        for w in targets:
            w.wake.set()
        if destination is not None and not targets:
            self._wake.set()  # its worker is not started yet: the scheduler starts it at once

    def _run(self) -> None:
        poll = self.runtime.settings.activation_poll_seconds
        while not self._stopping.is_set():
            try:
                self.tick()
            except Exception as e:  # never take the server down
                log.warning("activation: scheduler: %s", type(e).__name__)
            self._wake.wait(poll)
            self._wake.clear()

    def _reconcile_workers(self) -> None:
        rt = self.runtime
        wanted = {d.name for d in list_destinations(rt.engine) if d.enabled}
        with self._lock:
            for name in sorted(set(self.workers) - wanted):
                self.workers.pop(name).stop()
            for name in sorted(wanted - set(self.workers)):
                w = DeliveryWorker(Deliverer(rt.engine, rt.writer, rt.settings, name, rt.vault), rt.settings.activation_poll_seconds)
                self.workers[name] = w
                w.start()

    def tick(self, now: datetime | None = None, *, workers: bool = True) -> list[Plan]:
        """One round of the scheduler (also callable directly; `workers=False` plans without starting workers)."""
        at = now or datetime.now(UTC)
        if workers:
            self._reconcile_workers()
        plans = []
        for sync in list_syncs(self.runtime.engine):
            how = due_sync(sync, at)
            if how is None:
                continue
            try:
                p = plan(self.runtime, sync, trigger="realtime" if sync.schedule == "realtime" else "scheduled",
                         realtime=how == "realtime")
            except Exception as e:  # one sync's failure must not stop the others
                log.warning("activation: planning sync %s failed: %s", sync.name, type(e).__name__)
                continue
            plans.append(p)
            if p.batches:
                self.wake(sync.destination)
        if at - self._pruned >= _PRUNE_EVERY:
            self._pruned = at
            self.runtime.writer.call(lambda e: outbox.prune(e, at))
        return plans


def start(runtime: Runtime) -> ActivationService:
    return ActivationService(runtime).start()


def running(runtime: Runtime) -> ActivationService | None:
    svc = runtime.extras.get(EXTRA)
    return svc if isinstance(svc, ActivationService) and svc.running else None
