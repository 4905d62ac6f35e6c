"""Sending the world's behavioural events the way a customer's backend would: with the official
Segment Python SDK (`segment-analytics-python`), over HTTP, to Refinery's collector.

One SDK `Client` per source (its write key), events enqueued in time order, flushed chunk by chunk
so progress counts acknowledged events; any batch the SDK reports through `on_error` fails the demo.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from typing import Any

from refinery.demo.world import DemoEvent
from refinery.errors import RefineryError

CHUNK = 500


class SendError(RefineryError):
    code = "demo_send_failed"


def send_events(
    url: str, write_keys: dict[str, str], events: Sequence[DemoEvent], on_progress: Callable[[int], None] | None = None
) -> int:
    """Send `events` with the SDK; return how many were acknowledged. Raises SendError if any batch failed."""
    from segment.analytics import Client

    failures: list[str] = []
    lock = threading.Lock()

    def on_error(error: Exception, batch: list[dict[str, Any]]) -> None:
        with lock:  # the SDK's message only: it names the status and code, never the payload
            failures.append(f"{len(batch)} events: {error}")

    clients = {
        source: Client(
            write_key=key, host=url, on_error=on_error, gzip=True, upload_size=200, upload_interval=0.05,
            max_retries=3, timeout=30, max_total_backoff_duration=30, max_rate_limit_duration=60,
        )
        for source, key in write_keys.items()
    }
    sent = 0
    try:
        for start in range(0, len(events), CHUNK):
            chunk = events[start:start + CHUNK]
            for e in chunk:
                client = clients.get(e.source)
                if client is None:
                    raise SendError(f"No write key for source {e.source!r}.", fix="Re-run `refinery demo`; it creates its sources.")
                queued, _ = _dispatch(client, e.message)
                if not queued:
                    failures.append(f"event {e.message_id}: the SDK queue was full")
            for client in clients.values():
                client.flush()
            if failures:
                break
            sent += len(chunk)
            if on_progress:
                on_progress(len(chunk))
    finally:
        for client in clients.values():
            client.shutdown()
    if failures:
        raise SendError(
            f"The collector at {url} did not accept every batch: {failures[0]}"
            + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else "") + ".",
            fix="Check the server log (<data_dir>/demo/server.log when the demo started it) and re-run; events already stored are skipped.",
        )
    return sent


def _dispatch(client: Any, message: dict[str, Any]) -> tuple[bool, Any]:
    """One SDK call for one world message (the SDK mutates context, so it gets a copy)."""
    m = copy.deepcopy(message)
    common = {
        "user_id": m.get("userId"), "anonymous_id": m.get("anonymousId"), "context": m.get("context") or {},
        "timestamp": m["timestamp"], "message_id": m["messageId"],
    }
    call = m["type"]
    if call == "track":
        return client.track(event=m["event"], properties=m.get("properties") or {}, **common)
    if call == "identify":
        return client.identify(traits=m.get("traits") or {}, **common)
    if call == "page":
        return client.page(name=m.get("name"), properties=m.get("properties") or {}, **common)
    if call == "screen":
        return client.screen(name=m.get("name"), properties=m.get("properties") or {}, **common)
    raise SendError(f"The demo world has no sender for call type {call!r}.", fix="Add it to refinery.demo.send._dispatch.")
