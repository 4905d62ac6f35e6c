"""A real webhook receiver on loopback, for the tests, the demo and the benchmark.

It does what a careful receiver of Refinery's webhooks should do: verify `X-Refinery-Signature`
over the raw body (constant-time compare, timestamps older than `tolerance_seconds` refused),
apply each batch once by its `Idempotency-Key` (a repeat answers 200 and changes nothing), and keep
the members it holds per segment. It counts what it saw, and it can misbehave on demand: queue
`Fault`s and each request takes the next one (sleep past the client's timeout, answer 500 or 429
with Retry-After, close the connection without answering, answer slowly, redirect, or accept).

In process::

    with Receiver(secret) as rx:
        rx.inject(Fault.accept(), Fault.status(500))   # accept one batch, fail the next
        ... deliver to rx.url ...
        rx.members("vip")                               # {profile_id: fields}

As a process (`python -m refinery.activation.receiver --secret S [--port P]`) it prints one JSON
line `{"url": ...}` and serves until stopped; `GET /_receiver/state` returns its members and counts
and `POST /_receiver/faults` (a JSON list of faults) queues faults.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

FaultKind = Literal["accept", "timeout", "status", "close", "slow", "redirect"]
STATE_PATH = "/_receiver/state"
FAULTS_PATH = "/_receiver/faults"


def verify_signature(secret: str | bytes, timestamp: str | None, signature: str | None, body: bytes,
                     *, tolerance_seconds: float = 300.0, now: float | None = None) -> bool:
    """Whether `signature` is `sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>` and the
    timestamp is within `tolerance_seconds` of now (what every receiver should check)."""
    if not timestamp or not signature or not signature.startswith("sha256="):
        return False
    try:
        sent = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - sent) > tolerance_seconds:
        return False
    key = secret.encode() if isinstance(secret, str) else secret
    expected = hmac.new(key, timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature.removeprefix("sha256="))


@dataclass(frozen=True)
class Fault:
    """What the receiver does with one request. `apply` says whether a timeout or a slow answer
    applies the batch first (the worst case for the sender: applied, but no answer arrived)."""

    kind: FaultKind
    status: int = 500
    retry_after: str | None = None
    delay: float = 0.0
    location: str | None = None
    apply: bool = True

    @classmethod
    def accept(cls) -> Fault:
        return cls("accept")

    @classmethod
    def timeout(cls, delay: float, *, apply: bool = True) -> Fault:
        """Sleep `delay` seconds (past the client's timeout) before answering."""
        return cls("timeout", delay=delay, apply=apply)

    @classmethod
    def error(cls, status: int = 500, *, retry_after: str | None = None) -> Fault:
        """Answer `status` without applying the batch."""
        return cls("status", status=status, retry_after=retry_after)

    @classmethod
    def too_many(cls, retry_after: str = "1") -> Fault:
        return cls("status", status=429, retry_after=retry_after)

    @classmethod
    def close(cls) -> Fault:
        """Read the request, then close the connection without any answer."""
        return cls("close")

    @classmethod
    def slow(cls, delay: float) -> Fault:
        """Apply, then answer 200 after `delay` seconds (less than the client's timeout)."""
        return cls("slow", delay=delay)

    @classmethod
    def redirect(cls, location: str, status: int = 307) -> Fault:
        return cls("redirect", status=status, location=location)


@dataclass
class ReceiverStats:
    requests: int = 0
    batches: int = 0            # distinct batches applied
    duplicates: int = 0         # repeats of an applied batch (answered 200, not applied again)
    bad_signatures: int = 0
    bad_requests: int = 0
    faults: int = 0             # requests that got a fault other than "accept"
    added: int = 0
    removed: int = 0


@dataclass
class _State:
    members: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    applied: dict[str, int] = field(default_factory=dict)   # batch id -> order applied
    ever_added: set[str] = field(default_factory=set)        # every profile id any add carried
    stats: ReceiverStats = field(default_factory=ReceiverStats)


class Receiver:
    """A threaded HTTP server on loopback; see the module docstring."""

    def __init__(self, secret: str, *, host: str = "127.0.0.1", port: int = 0,
                 tolerance_seconds: float = 300.0, path: str = "/hook") -> None:
        self.secret = secret
        self.tolerance_seconds = tolerance_seconds
        self.path = path
        self._lock = threading.Lock()
        self._faults: deque[Fault] = deque()
        self._state = _State()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer((host, port), _handler_for(self))
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread: threading.Thread | None = None
        self.last_host: str | None = None  # the Host header of the last request (checks name pinning)

    # -- life --------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    def start(self) -> Receiver:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"receiver-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what it holds -----------------------------------------------------------------------

    def inject(self, *faults: Fault) -> None:
        """Queue faults; each following request takes the next one (then behaves normally)."""
        with self._lock:
            self._faults.extend(faults)

    def members(self, segment: str | None = None) -> dict[str, dict[str, Any]]:
        """{profile_id: fields} held for `segment` (all segments merged when None)."""
        with self._lock:
            if segment is not None:
                return {k: dict(v) for k, v in self._state.members.get(segment, {}).items()}
            merged: dict[str, dict[str, Any]] = {}
            for held in self._state.members.values():
                merged.update({k: dict(v) for k, v in held.items()})
            return merged

    @property
    def stats(self) -> ReceiverStats:
        with self._lock:
            return ReceiverStats(**asdict(self._state.stats))

    @property
    def batch_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._state.applied, key=self._state.applied.__getitem__)

    @property
    def ever_added(self) -> set[str]:
        with self._lock:
            return set(self._state.ever_added)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "members": {s: {k: dict(v) for k, v in m.items()} for s, m in self._state.members.items()},
                "batch_ids": sorted(self._state.applied, key=self._state.applied.__getitem__),
                "ever_added": sorted(self._state.ever_added),
                "stats": asdict(self._state.stats),
            }

    # -- handling (called from the server's threads) -------------------------------------------

    def _next_fault(self) -> Fault:
        with self._lock:
            self._state.stats.requests += 1
            fault = self._faults.popleft() if self._faults else Fault.accept()
            if fault.kind != "accept":
                self._state.stats.faults += 1
            return fault

    def _apply(self, key: str, payload: dict[str, Any]) -> bool:
        """Apply a batch once; False when it was applied before."""
        with self._lock:
            st = self._state
            if key in st.applied:
                st.stats.duplicates += 1
                return False
            st.applied[key] = len(st.applied)
            st.stats.batches += 1
            held = st.members.setdefault(str(payload["segment"]), {})
            for rec in payload["records"]:
                pid = str(rec["profile_id"])
                if rec["action"] == "add":
                    held[pid] = dict(rec.get("fields") or {})
                    st.ever_added.add(pid)
                    st.stats.added += 1
                else:
                    held.pop(pid, None)
                    st.stats.removed += 1
            return True

    def _count(self, what: str) -> None:
        with self._lock:
            setattr(self._state.stats, what, getattr(self._state.stats, what) + 1)

    def _sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)


def _valid_batch(payload: Any, key: str) -> bool:
    if not isinstance(payload, dict) or payload.get("batch_id") != key or "segment" not in payload:
        return False
    records = payload.get("records")
    return isinstance(records, list) and all(
        isinstance(r, dict) and r.get("action") in ("add", "remove") and isinstance(r.get("profile_id"), str)
        for r in records
    )


def _handler_for(rx: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "refinery-test-receiver"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass  # bodies carry personal data; the receiver logs nothing

        def _answer(self, status: int, body: dict[str, Any] | None = None,
                    headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body or {}).encode()
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == STATE_PATH:
                self._answer(200, rx.snapshot())
            else:
                self._answer(404, {"error": "not found"})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == FAULTS_PATH:
                rx.inject(*(Fault(**f) for f in json.loads(body)))
                self._answer(200, {"queued": True})
                return
            rx.last_host = self.headers.get("Host")
            fault = rx._next_fault()
            if fault.kind == "close":
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault.kind == "status":
                headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
                self._answer(fault.status, {"error": "injected"}, headers)
                return
            if fault.kind == "redirect":
                self._answer(fault.status, {}, {"Location": fault.location or "/"})
                return
            if not verify_signature(rx.secret, self.headers.get("X-Refinery-Timestamp"),
                                    self.headers.get("X-Refinery-Signature"), body,
                                    tolerance_seconds=rx.tolerance_seconds):
                rx._count("bad_signatures")
                self._answer(401, {"error": "bad signature"})
                return
            key = self.headers.get("Idempotency-Key") or ""
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
            if not _valid_batch(payload, key):
                rx._count("bad_requests")
                self._answer(400, {"error": "not a batch, or batch_id differs from Idempotency-Key"})
                return
            if fault.kind in ("timeout", "slow") and not fault.apply:
                rx._sleep(fault.delay)
                self._answer(503, {"error": "injected"})
                return
            applied = rx._apply(key, payload)
            if fault.kind in ("timeout", "slow"):
                rx._sleep(fault.delay)
            with contextlib.suppress(OSError):
                self._answer(200, {"applied": applied})

    return Handler


@contextlib.contextmanager
def running(secret: str, **kw: Any) -> Iterator[Receiver]:
    rx = Receiver(secret, **kw).start()
    try:
        yield rx
    finally:
        rx.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A loopback webhook receiver for Refinery's activation tests and demo.")
    parser.add_argument("--secret", required=True, help="the destination's signing secret")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    rx = Receiver(args.secret, host=args.host, port=args.port)
    print(json.dumps({"url": rx.url, "state": f"http://{rx.host}:{rx.port}{STATE_PATH}"}), flush=True)
    try:
        rx._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        rx._server.server_close()


if __name__ == "__main__":
    main(sys.argv[1:])
