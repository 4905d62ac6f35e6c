"""Sync runs: one row per planning, with the counts its batches' deliveries add up to.

`planned` records went to the outbox; of those, `added` and `removed` were delivered (`sent` is
their sum), `failed` are in dead-lettered batches, `superseded` were made moot by a later plan
before delivery. `skipped_consent` / `skipped_suppressed` count members held back: at planning
(open members whose consent does not allow the purpose, adds on the suppression list) and at
delivery (adds whose consent was withdrawn, or who were erased, while their batch waited; those
are sent as removes). `errors` names batches and errors, never personal values.
"""

from __future__ import annotations

import json
from datetime import UTC
from typing import Any

from refinery.errors import NotFoundError
from refinery.storage.engine import Engine

COLUMNS = ("run_id, sync, destination, segment, mode, trigger, actor, started_at, planned_at, finished_at, status, planned, batches, "
           "sent, added, removed, failed, skipped_consent, skipped_suppressed, superseded, errors")


def _clean(r: dict[str, Any]) -> dict[str, Any]:
    for k in ("started_at", "planned_at", "finished_at"):
        r[k] = r[k].astimezone(UTC).isoformat() if r[k] is not None else None
    r["errors"] = json.loads(r["errors"]) if isinstance(r["errors"], str) else (r["errors"] or [])
    return r


def list_runs(engine: Engine, *, sync: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    rows = engine.fetch_dicts(f"SELECT {COLUMNS} FROM sync_runs WHERE (? IS NULL OR sync = ?) ORDER BY started_at DESC LIMIT ?",  # noqa: S608
                              [sync, sync, limit], cursor=engine.reader())
    return [_clean(r) for r in rows]


def get_run(engine: Engine, run_id: str) -> dict[str, Any]:
    rows = engine.fetch_dicts(f"SELECT {COLUMNS} FROM sync_runs WHERE run_id = ?", [run_id], cursor=engine.reader())  # noqa: S608
    if not rows:
        raise NotFoundError(f"No sync run {run_id!r}.", fix="List runs with: refinery syncs runs", field="run_id")
    return _clean(rows[0])


def last_run(engine: Engine, sync: str) -> dict[str, Any] | None:
    found = list_runs(engine, sync=sync, limit=1)
    return found[0] if found else None


def held(engine: Engine, sync: str) -> int:
    """How many profiles the sync's destination holds (or will, once its outbox is delivered)."""
    return int(engine.fetch_all("SELECT count(*) FROM sync_state WHERE sync = ?", [sync], cursor=engine.reader())[0][0])
