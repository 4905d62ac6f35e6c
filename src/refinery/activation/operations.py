"""The activation operations the admin API and the local client share, each audited as governance
asks (changes in the transaction that makes them; a manual run when it is planned).

The API routes and `refinery.activation.client.LocalActivation` are thin calls into these, with
their own principal, so both edges behave alike by construction.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from refinery.activation import outbox, runs, service, store
from refinery.activation.destination import kinds
from refinery.activation.errors import UnknownMappingSource
from refinery.activation.worker import Deliverer
from refinery.governance import audit
from refinery.governance.principal import Principal

if TYPE_CHECKING:
    from refinery.runtime import Runtime


def list_kinds() -> list[dict[str, Any]]:
    out = []
    for name, t in sorted(kinds().items()):
        out.append({"kind": name, "description": t.description, "fields": list(t.config_model.model_fields),
                    "secret_fields": list(store.secret_fields(t.config_model)), "needs_fields": list(t.needs_fields)})
    return out


def list_destinations(rt: Runtime) -> list[dict[str, Any]]:
    counts = outbox.pending_counts(rt.engine)
    return [{**d.to_dict(), "outbox": counts.get(d.name, {})} for d in store.list_destinations(rt.engine)]


def show_destination(rt: Runtime, name: str) -> dict[str, Any]:
    d = store.get_destination(rt.engine, name)
    syncs = [s.name for s in store.list_syncs(rt.engine) if s.destination == name]
    return {**d.to_dict(), "outbox": outbox.pending_counts(rt.engine).get(name, {}), "syncs": syncs}


def create_destination(rt: Runtime, actor: Principal, name: str, kind: str, purpose: str, config: Mapping[str, Any],
                       description: str | None = None) -> dict[str, Any]:
    made = rt.writer.call(lambda e: store.create_destination(e, rt.vault, actor, name, kind, purpose, config, description))
    _wake(rt, None)
    return made.to_dict()


def update_destination(rt: Runtime, actor: Principal, name: str, **changes: Any) -> dict[str, Any]:
    return rt.writer.call(lambda e: store.update_destination(e, rt.vault, actor, name, **changes)).to_dict()


def delete_destination(rt: Runtime, actor: Principal, name: str) -> dict[str, Any]:
    result: dict[str, Any] = rt.writer.call(lambda e: store.delete_destination(e, actor, name))
    return result


def list_syncs(rt: Runtime) -> list[dict[str, Any]]:
    return [{**s.to_dict(), "held": runs.held(rt.engine, s.name)} for s in store.list_syncs(rt.engine)]


def show_sync(rt: Runtime, name: str) -> dict[str, Any]:
    s = store.get_sync(rt.engine, name)
    return {**s.to_dict(), "held": runs.held(rt.engine, name), "last_run": runs.last_run(rt.engine, name)}


def _with_sources(rt: Runtime, fn: Any) -> Any:
    """`fn(sources)` with the cached catalog's traits, and once more with a fresh catalog if a name is unknown."""
    from refinery.segments.catalog import cached_catalog

    try:
        return fn(store.mapping_sources(rt.engine, cached_catalog(rt.engine)))
    except UnknownMappingSource:
        return fn(store.mapping_sources(rt.engine, cached_catalog(rt.engine, fresh=True)))


def create_sync(rt: Runtime, actor: Principal, name: str, segment: str, destination: str, mapping: Mapping[str, str], *,
                mode: str = "diff", schedule: str | int = "manual", batch_size: int | None = None) -> dict[str, Any]:
    made = _with_sources(rt, lambda src: rt.writer.call(lambda e: store.create_sync(
        e, actor, name, segment, destination, mapping, mode=mode, schedule=schedule, batch_size=batch_size, sources=src)))
    return dict(made.to_dict())


def update_sync(rt: Runtime, actor: Principal, name: str, **changes: Any) -> dict[str, Any]:
    made = _with_sources(rt, lambda src: rt.writer.call(lambda e: store.update_sync(e, actor, name, sources=src, **changes)))
    return dict(made.to_dict())


def delete_sync(rt: Runtime, actor: Principal, name: str) -> dict[str, Any]:
    result: dict[str, Any] = rt.writer.call(lambda e: store.delete_sync(e, actor, name))
    return result


def _wake(rt: Runtime, destination: str | None) -> bool:
    svc = service.running(rt)
    if svc is None:
        return False
    svc.wake(destination)
    return True


def deliver_now(rt: Runtime, destination: str, *, timeout: float = 60.0) -> dict[str, int]:
    """Deliver a destination's due batches in this process (no worker runs here)."""
    d = Deliverer(rt.engine, rt.writer, rt.settings, destination, rt.vault)
    try:
        return d.drain(deadline=time.monotonic() + timeout)
    finally:
        d.close()


def run_sync(rt: Runtime, actor: Principal, name: str, *, trigger: str = "cli", wait_seconds: float = 0.0) -> dict[str, Any]:
    """Plan `name` now (the whole segment against the sync's state), then deliver: by the destination's
    worker when `refinery serve` runs one (waiting up to `wait_seconds` for the run to finish), else here."""
    sync = store.get_sync(rt.engine, name)
    plan = service.plan(rt, sync, trigger=trigger, actor=actor)
    audit.record_now(rt.writer, actor, "syncs.run", f"sync:{name}",
                     {"run_id": plan.run_id, "added": plan.added, "removed": plan.removed, "batches": plan.batches})
    delivered_here: dict[str, int] | None = None
    if plan.batches:
        if _wake(rt, sync.destination):
            deadline = time.monotonic() + max(0.0, wait_seconds)
            while time.monotonic() < deadline:
                if runs.get_run(rt.engine, plan.run_id)["status"] not in ("planned", "delivering"):
                    break
                time.sleep(0.05)
        else:
            delivered_here = deliver_now(rt, sync.destination, timeout=max(wait_seconds, 60.0))
    out: dict[str, Any] = {"plan": plan.to_dict(), "run": runs.get_run(rt.engine, plan.run_id) if plan.recorded else None}
    if delivered_here is not None:
        out["delivered_in_process"] = delivered_here
    return out


def list_runs(rt: Runtime, sync: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    if sync is not None:
        store.get_sync(rt.engine, sync)
    return runs.list_runs(rt.engine, sync=sync, limit=limit)


def dead_letters(rt: Runtime, sync: str | None = None, destination: str | None = None, include_replayed: bool = False,
                 limit: int = 100) -> list[dict[str, Any]]:
    return outbox.dead_letters(rt.engine, sync=sync, destination=destination, include_replayed=include_replayed, limit=limit)


def replay(rt: Runtime, actor: Principal, batch_ids: list[str] | None = None, sync: str | None = None, *,
           deliver: bool = True) -> dict[str, Any]:
    """Put dead letters back in their outbox (same batch ids); delivered by the worker, or here when none runs."""
    result: dict[str, Any] = rt.writer.call(lambda e: outbox.replay(e, actor, batch_ids=batch_ids, sync=sync))
    if deliver:
        for dest in result["destinations"]:
            if not _wake(rt, dest):
                result.setdefault("delivered_in_process", {})[dest] = deliver_now(rt, dest)
    return result
