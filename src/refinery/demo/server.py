"""A Refinery server for the demo: the one already running on the data dir, or a child process.

The demo talks to the real server over HTTP, as any customer would. When none is running it
starts `python -m refinery serve` on a free loopback port with the same data dir, waits for
`/health`, and stops it afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx

from refinery.api.server import running_server
from refinery.errors import RefineryError, ServerUnavailable
from refinery.settings import Settings


@dataclass(frozen=True)
class DemoServer:
    url: str
    started_by_demo: bool
    pid: int


@contextmanager
def demo_server(settings: Settings, log_path: Path, *, timeout: float = 60.0) -> Iterator[DemoServer]:
    """Yield a live server for `settings.data_dir`; stop it at the end only if we started it."""
    info = running_server(settings)
    if info is not None:
        _wait_healthy(info["url"], None, log_path, timeout)
        yield DemoServer(info["url"], False, int(info["pid"]))
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "REFINERY_DATA_DIR": str(settings.data_dir.resolve())}
    # The demo's activation step delivers to a webhook receiver it runs on loopback, which
    # destinations may not reach by default (server-side request forgery): allow it for this server.
    allowed = list(settings.activation_allowed_networks)
    if "127.0.0.1/32" not in allowed:
        env["REFINERY_ACTIVATION_ALLOWED_NETWORKS"] = json.dumps([*allowed, "127.0.0.1/32"])
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "refinery", "serve", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(settings.data_dir.resolve())],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        url = _wait_for_address(settings, proc, log_path, timeout)
        _wait_healthy(url, proc, log_path, timeout)
        yield DemoServer(url, True, proc.pid)
    finally:
        _stop(proc)


def _wait_for_address(settings: Settings, proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> str:
    """The server writes its address to <data_dir>/server.json once its socket accepts connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _exited(proc, log_path)
        info = running_server(settings)
        if info is not None and int(info.get("pid", -1)) == proc.pid:
            return str(info["url"])
        time.sleep(0.05)
    raise ServerUnavailable(
        f"The demo's server did not start within {timeout:.0f} s.", fix=f"See {log_path}, or start `refinery serve` yourself and re-run."
    )


def _wait_healthy(url: str, proc: subprocess.Popen[bytes] | None, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise _exited(proc, log_path)
        try:
            r = httpx.get(url + "/health", timeout=2)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = type(e).__name__
        time.sleep(0.1)
    raise ServerUnavailable(f"The server at {url} is not healthy ({last}).", fix=f"See {log_path}, or restart `refinery serve`.")


def _exited(proc: subprocess.Popen[bytes], log_path: Path) -> RefineryError:
    tail = ""
    with suppress(OSError, IndexError):
        tail = log_path.read_text("utf-8", "replace").strip().splitlines()[-1]
    return ServerUnavailable(
        f"The demo's server exited with status {proc.returncode}" + (f": {tail}" if tail else "."),
        fix=f"See {log_path}. If another process holds the database, stop it or run `refinery serve` and re-run the demo.",
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop like Ctrl-C: uvicorn re-raises SIGTERM after shutdown, which skips the server's own
    clean-up (server.json, closing the database); SIGINT lets it run. Escalate if it hangs."""
    for stop, wait in ((lambda: proc.send_signal(signal.SIGINT), 20.0), (proc.terminate, 10.0), (proc.kill, 5.0)):
        if proc.poll() is not None:
            return
        stop()
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
