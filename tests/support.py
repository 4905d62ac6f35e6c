"""Shared test support, imported by name (`from support import ...`): the write key of the test
source and a real `refinery serve` process on loopback. Kept out of conftest.py because several
test folders have a conftest.py of their own, and only one module can be called `conftest`."""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from refinery.runtime import Runtime

WRITE_KEY = "test-write-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A real `refinery serve` process on loopback."""

    url: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    write_key: str = WRITE_KEY
    admin_token: str = "test-admin-token"

    @property
    def basic(self) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{self.write_key}:".encode()).decode()}

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.admin, timeout=30)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_server(data_dir: Path, port: int | None = None, env: dict[str, str] | None = None) -> Server:
    port = port or free_port()
    full_env = {**os.environ, "REFINERY_DATA_DIR": str(data_dir), "REFINERY_ADMIN_TOKEN": "test-admin-token", **(env or {})}
    log = open(data_dir.parent / f"server-{port}.log", "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "refinery", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=full_env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return Server(url, data_dir, proc)
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not become healthy in 30 s")


# --- events into a runtime, through the real staging and cleaning path ----------------------------

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
_clock = itertools.count()


def event(type_: str = "identify", *, minutes: int | None = None, **fields: Any) -> dict[str, Any]:
    """A Segment call; `minutes` after T0 sets its timestamp (default: a fresh, later minute)."""
    at = T0 + timedelta(minutes=next(_clock) if minutes is None else minutes)
    return {"type": type_, "messageId": uuid.uuid4().hex, "timestamp": at.isoformat(), **fields}


def write_events(rt: Runtime, *events: dict[str, Any], source: str = "web") -> list[Any]:
    """Stage each call as the collector does and write it through the writer; returns the outcomes."""
    from refinery.ingest.protocol import Limits, stage
    from refinery.ingest.store import IngestItem

    items = []
    for ev in events:
        items.extend(IngestItem(source, "req", datetime.now(UTC), s) for s in stage("batch", {"batch": [ev]}, Limits()))
    outcomes: list[Any] = rt.writer.call(lambda e: rt.events.write(e, items))
    return outcomes


@contextlib.contextmanager
def fresh_runtime(tmp_path: Path) -> Iterator[Runtime]:
    """A runtime on a new data dir under `tmp_path` (admin token 't'), closed afterwards."""
    from refinery.runtime import Runtime
    from refinery.settings import Settings

    rt = Runtime.open(Settings(data_dir=tmp_path / "data", admin_token="t"))
    try:
        yield rt
    finally:
        rt.close()
