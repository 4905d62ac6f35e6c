"""Housekeeping the server runs on a timer, each step a writer job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from refinery.storage.engine import Engine


def prune_message_ids(engine: Engine, window_days: int, *, now: datetime | None = None) -> int:
    """Forget message ids first seen before the dedup window; returns how many were dropped.

    Retries arrive within minutes or hours; the window (7 days by default) bounds the index that
    absorbs them. The clean zone itself is untouched.
    """
    cutoff = (now or datetime.now(UTC)) - timedelta(days=window_days)
    rows = engine.fetch_all("DELETE FROM message_ids WHERE first_seen < ? RETURNING 1", [cutoff])
    return len(rows)
