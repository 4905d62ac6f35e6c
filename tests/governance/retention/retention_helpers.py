"""Events received in the past: `support.write_events`' path (staging as the collector does, the
writer, cleaning) with the receipt time given, since retention ages rows from their receipt."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from refinery.runtime import Runtime


def write_at(rt: Runtime, received_at: datetime, n: int, *, source: str = "web", prefix: str = "u") -> list[str]:
    """`n` identify calls received at `received_at` (timestamped a minute earlier); returns their message ids."""
    from refinery.ingest.protocol import Limits, stage
    from refinery.ingest.store import IngestItem

    ids, items = [], []
    for i in range(n):
        mid = f"{prefix}-{uuid.uuid4().hex[:10]}"
        ev: dict[str, Any] = {"type": "identify", "messageId": mid, "userId": f"{prefix}{i}",
                              "timestamp": (received_at - timedelta(minutes=1)).isoformat(), "traits": {"plan": "pro"}}
        items.extend(IngestItem(source, "req", received_at, s) for s in stage("batch", {"batch": [ev]}, Limits()))
        ids.append(mid)
    outcomes = rt.writer.call(lambda e: rt.events.write(e, items))
    assert all(o.status == "loaded" for o in outcomes), outcomes
    return ids


def count(rt: Runtime, sql: str, params: list[Any] | None = None) -> int:
    return int(rt.engine.fetch_all(sql, params, cursor=rt.engine.reader())[0][0])
