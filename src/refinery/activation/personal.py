"""What activation holds about a person, for subject requests (refinery.privacy.registry).

Per sync, `sync_state` says which destinations hold the person's profile, and the outbox
(`activation_records`) which batches named it. An **export** lists both (sync names, times,
actions; no values: fields are never stored). An **erasure** takes the person back from every
destination that holds them: in the erasure's own transaction, each such sync gets a run
(trigger `erasure`) with a `remove` batch for the person's profiles, and its state forgets them.
Batches still waiting with an `add` for the person are dropped at delivery (the profile no longer
exists), so nothing of theirs is sent again.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from refinery.governance.principal import Principal
from refinery.privacy.registry import Subject
from refinery.storage.engine import Engine

ERASURE = Principal("system", "system:privacy", "admin")
_BATCH = 1000

#: Activation tables that name no person: definitions, sealed configuration secrets, counts, errors.
NO_PERSONAL_DATA = {
    "destinations": "destination definitions: names, kinds, purposes, configuration without secrets",
    "destination_secrets": "destination secrets (passwords, signing keys), sealed under the master key; no personal data",
    "syncs": "sync definitions: segment, destination, mode, field mapping, schedule, cursor",
    "sync_runs": "one row per sync run: counts and batch errors (no personal values)",
    "activation_batches": "outbox batches: ids, destination, status, attempts and errors (their profiles are in activation_records)",
    "activation_dead_letters": "failed batches: ids, reason and error (no personal values)",
}


class ActivationStore:
    name = "activation"
    tables: tuple[str, ...] = ("sync_state", "activation_records")

    def export(self, engine: Engine, subject: Subject) -> Any:
        pids = list(subject.profile_ids)
        held = engine.fetch_dicts("SELECT sync, profile_id, since FROM sync_state WHERE profile_id IN (SELECT unnest(CAST(? AS VARCHAR[]))) "
                                  "ORDER BY sync", [pids], cursor=engine.reader())
        sent = engine.fetch_dicts(
            "SELECT r.batch_id, r.profile_id, r.action, b.sync, b.destination, b.status, b.created_at, b.delivered_at "
            "FROM activation_records r JOIN activation_batches b ON b.batch_id = r.batch_id "
            "WHERE r.profile_id IN (SELECT unnest(CAST(? AS VARCHAR[]))) ORDER BY b.created_at", [pids], cursor=engine.reader())
        for rows in (held, sent):
            for r in rows:
                for k, v in list(r.items()):
                    if isinstance(v, datetime):
                        r[k] = v.astimezone(UTC).isoformat()
        return {"held_by_syncs": held, "outbox_records": sent}

    def erase(self, engine: Engine, subject: Subject) -> int:
        from refinery.activation.plan import Plan, _write
        from refinery.activation.store import find_sync

        pids = list(subject.profile_ids)
        if not pids:
            return 0
        rows = engine.fetch_all("SELECT sync, profile_id FROM sync_state WHERE profile_id IN (SELECT unnest(CAST(? AS VARCHAR[]))) "
                                "ORDER BY sync, profile_id", [pids])
        by_sync: dict[str, list[str]] = {}
        for s, p in rows:
            by_sync.setdefault(str(s), []).append(str(p))
        now = datetime.now(UTC)
        for name, ids in by_sync.items():
            sync = find_sync(engine, name)
            if sync is None:
                continue
            changes = pa.table({"profile_id": pa.array(ids, pa.string()), "action": pa.array(["remove"] * len(ids), pa.string()),
                                "h": pa.array([None] * len(ids), pa.uint64())})
            plan = Plan("run_" + uuid.uuid4().hex[:20], name, sync.destination, "erasure")
            _write(engine, sync, plan, changes, _BATCH, "erasure", ERASURE, now)
        return len(rows)


def register() -> None:
    """Replace the placeholder section subject requests were given for activation with this store."""
    from refinery.privacy.registry import REGISTRY

    current = REGISTRY.stores.get("activation")
    if not isinstance(current, ActivationStore):
        REGISTRY.stores.pop("activation", None)
        REGISTRY.register(ActivationStore())
    for table, reason in NO_PERSONAL_DATA.items():
        if table not in REGISTRY.no_personal_data:
            REGISTRY.declare_no_personal_data(table, reason)
