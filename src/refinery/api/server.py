"""Running the server: uvicorn on one event loop, the writer on its own thread.

While it runs, the server records its address in `<data_dir>/server.json` so CLI commands can talk
to it (DuckDB lets one process at a time open the database for writing).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
import uvloop

from refinery.api.app import create_app
from refinery.api.collector import collector_first
from refinery.runtime import Runtime
from refinery.settings import Settings
from refinery.storage.duckdb_engine import batch_memory, steady_memory

log = logging.getLogger(__name__)


def state_file(settings: Settings) -> Path:
    return settings.data_dir / "server.json"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _batch_memory_for_identity_jobs(asgi: Any, runtime: Runtime) -> Any:
    """POSTs under /api/identity/ resolve identities (GBs for millions of edges): the batch limit while they run."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith("/api/identity/"):
            return await asgi(scope, receive, send)
        raised = batch_memory(runtime.engine)
        await asyncio.to_thread(raised.__enter__)
        try:
            await asgi(scope, receive, send)
        finally:
            await asyncio.to_thread(raised.__exit__, None, None, None)

    return app


def serve(settings: Settings, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Run until interrupted. `on_ready(url)` is called once the socket accepts connections."""
    runtime = Runtime.open(settings)
    # Memory policy (docs/decisions/0012-memory-policy.md): a steady DuckDB limit for the server's
    # life, raised to `duckdb_memory_limit` only while a batch job (identity resolution) runs.
    steady_memory(runtime.engine, settings.duckdb_steady_memory_limit)
    # identity_incremental (identity/incremental.py, owner: incremental identity): profiles follow commits.
    from refinery.identity.incremental import start_follower
    follower = start_follower(runtime)
    # Real-time segments (segments/realtime.py) follow the events the identity follower attributes.
    segments_live = None
    if settings.identity_incremental:
        from refinery.segments.realtime import follow
        segments_live = follow(runtime)
    # Activation (activation/service.py): a delivery worker per destination and the syncs' schedules.
    activation = None
    if settings.activation_workers:
        from refinery.activation.service import start as start_activation
        activation = start_activation(runtime)
    app = create_app(runtime)
    asgi = _batch_memory_for_identity_jobs(collector_first(app, app.router.routes), runtime)
    # Move start-up objects (imports, app, caches) out of the collector's way: otherwise every
    # full collection walks them all and stalls acknowledgements by 50-130 ms (p99 58 -> 26 ms at 1k req/s).
    gc.collect()
    gc.freeze()
    sock = _bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    config = uvicorn.Config(
        asgi,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level=settings.log_level.lower(),
        timeout_keep_alive=30,
        backlog=2048,
    )
    server = uvicorn.Server(config)
    path = state_file(settings)

    async def housekeeping() -> None:
        from refinery.ingest.maintenance import prune_message_ids

        while True:
            try:
                dropped = await asyncio.wrap_future(
                    runtime.writer.submit(lambda e: prune_message_ids(e, settings.dedup_window_days))
                )
                if dropped:
                    log.info("forgot %d message ids older than %d days", dropped, settings.dedup_window_days)
            except Exception as e:  # housekeeping must never take the server down
                log.warning("housekeeping failed: %s", type(e).__name__)
            await asyncio.sleep(3600)

    async def main() -> None:
        serving = asyncio.ensure_future(server.serve(sockets=[sock]))
        chores = asyncio.ensure_future(housekeeping())
        from refinery.governance.retention import scheduled  # retention: its own schedule (docs/retention.md)
        retention_job = asyncio.ensure_future(scheduled(runtime.engine, runtime.writer, settings))
        from refinery.segments.schedule import scheduled as segments_scheduled  # segments: docs/segments.md
        segments_job = asyncio.ensure_future(segments_scheduled(runtime.engine, runtime.writer, settings))
        from refinery.features.operations import scheduled as features_scheduled  # docs/features.md
        features_job = asyncio.ensure_future(features_scheduled(runtime))
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if server.started:
            path.write_text(json.dumps({"url": url, "pid": os.getpid()}))
            if on_ready:
                on_ready(url)
        try:
            await serving
        finally:
            chores.cancel()
            retention_job.cancel()  # retention
            segments_job.cancel()  # segments
            features_job.cancel()  # features

    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; with the default handlers that
    # kills the process before the finally below can checkpoint the store and remove server.json.
    # Handlers that only record the signal let the shutdown finish cleanly.
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: None)
    try:
        # uvloop, as the Config asks: asyncio.run() would ignore it and use the stdlib loop, whose
        # cross-thread wake-ups (the writer resolving futures) cut single-event throughput by 2.5x.
        uvloop.run(main())
    finally:
        try:
            if path.exists() and json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass
        if activation is not None:  # activation: stop the workers before the writer
            activation.stop()
        if segments_live is not None:  # real-time segments: stop the tail before the identity follower
            segments_live.stop()
        if follower is not None:  # identity_incremental: stop the follower before the writer
            follower.stop()
        runtime.close()


def running_server(settings: Settings) -> dict[str, Any] | None:
    """The address of a live server on this data dir, or None."""
    path = state_file(settings)
    try:
        info = json.loads(path.read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if isinstance(info, dict) else None
