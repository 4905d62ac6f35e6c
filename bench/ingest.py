"""Ingest benchmark: a real `refinery serve` against a bare server on the same HTTP stack.

Run it as `.venv/bin/python bench/ingest.py` (options: `--help`). It starts two servers on free
loopback ports, each in its own process:

* `refinery serve` on a fresh temporary data dir (rate limit off, everything else default), and
* a baseline: uvicorn (uvloop + httptools, the same config as `refinery serve`) with a FastAPI app
  holding the same collector routes, which reads each body and answers 200 without doing any work;

then drives both with the same load generator (a separate process: raw HTTP/1.1 keep-alive over
asyncio + uvloop, so the client costs as little CPU as possible on a small machine):

1. events/s through `/v1/batch` (100 events a batch, several concurrent connections);
2. single-event `/v1/track` requests/s, with p50/p99 acknowledgement latency;
3. p99 latency at a fixed 1,000 requests/s (open loop: latency counts from the scheduled send
   time, so a stalled server cannot hide its queue).

Afterwards it checks that Refinery's `events` table holds exactly the events it acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

WRITE_KEY = "bench-write-key"
ADMIN_TOKEN = "bench-admin-token"
BATCH_SIZE = 100

TARGETS = {
    "batch_events_per_s": 50_000,
    "single_requests_per_s": 3_000,
    "fixed_rate_p99_ms": 50.0,
}


# --- the baseline server ---------------------------------------------------------------------

def baseline_app() -> Any:
    """A FastAPI app with the collector's routes that reads each body and acknowledges it, nothing more."""
    import orjson
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from refinery.api.collector import CORS_HEADERS
    from refinery.ingest import protocol

    async def ack(request: Request) -> Response:
        await request.body()
        return Response(orjson.dumps({"success": True}), media_type="application/json", headers=CORS_HEADERS)

    app = FastAPI()
    paths = [*protocol.CALL_TYPES, "batch", "import", *protocol.SHORT_PATHS]
    app.router.routes.extend(Route(f"/v1/{p}", ack, methods=["POST", "OPTIONS"]) for p in paths)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def run_baseline(port: int) -> None:
    import uvicorn

    config = uvicorn.Config(
        baseline_app(), host="127.0.0.1", port=port, loop="uvloop", http="httptools", lifespan="off",
        access_log=False, log_level="warning", timeout_keep_alive=30, backlog=2048,
    )
    uvicorn.Server(config).run()


# --- the load generator (runs in its own process) --------------------------------------------

def _event(message_id: str, user: int, now_iso: str) -> bytes:
    return (
        b'{"type":"track","event":"Product Viewed","messageId":"%s","userId":"user-%d",'
        b'"anonymousId":"anon-%d","timestamp":"%s","properties":{"product_id":"sku-%d","price":19.99,'
        b'"currency":"EUR","category":"shoes","position":3},"context":{"library":{"name":"bench","version":"1.0"},'
        b'"page":{"path":"/products/sku","url":"https://shop.example/products/sku"},'
        b'"userAgent":"Mozilla/5.0 (X11; Linux x86_64) bench","locale":"en-GB","ip":"203.0.113.9"}}'
    ) % (message_id.encode(), user, user, now_iso.encode(), user % 500)


class _Conn:
    """One keep-alive HTTP/1.1 connection; enough of the protocol for the collector's answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> _Conn:
        r, w = await asyncio.open_connection(host, port)
        return cls(r, w)

    async def post(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        self.writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        length = 0
        for line in raw.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        payload = await self.reader.readexactly(length) if length else b""
        return status, payload

    def close(self) -> None:
        self.writer.close()


@dataclass
class LoadResult:
    requests: int
    events: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    accepted: int

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] * 1000.0


async def _load(mode: str, url: str, duration: float, warmup: float, concurrency: int, rate: float, run_id: str) -> LoadResult:
    host, port = url.removeprefix("http://").split(":")
    auth = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    path = "/v1/batch" if mode == "batch" else "/v1/track"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Basic {auth}\r\n"
        "Content-Type: application/json\r\n"
    ).encode()
    now_iso = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    counter = 0

    def body() -> tuple[bytes, int]:
        nonlocal counter
        if mode == "batch":
            events = []
            for _ in range(BATCH_SIZE):
                counter += 1
                events.append(_event(f"{run_id}-{counter}", counter % 10_000, now_iso))
            return b'{"batch":[' + b",".join(events) + b"]}", BATCH_SIZE
        counter += 1
        return _event(f"{run_id}-{counter}", counter % 10_000, now_iso), 1

    conns = [await _Conn.open(host, int(port)) for _ in range(concurrency)]
    latencies: list[float] = []
    totals = {"requests": 0, "events": 0, "errors": 0, "accepted": 0}
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration

    async def send(conn: _Conn, scheduled: float) -> None:
        data, n = body()
        status, payload = await conn.post(head, data)
        done = time.perf_counter()
        if status == 200:
            totals["accepted"] += json.loads(payload).get("accepted", n) if mode == "batch" else n
        if scheduled >= measure_from and done <= stop_at:
            totals["requests"] += 1
            latencies.append(done - scheduled)
            if status == 200:
                totals["events"] += n
            else:
                totals["errors"] += 1
        elif status != 200:
            totals["errors"] += 1

    if mode in ("batch", "single"):
        async def closed_loop(conn: _Conn) -> None:
            while True:
                t = time.perf_counter()
                if t >= stop_at:
                    return
                await send(conn, t)

        await asyncio.gather(*(closed_loop(c) for c in conns))
    else:  # open loop at a fixed rate
        free: asyncio.Queue[_Conn] = asyncio.Queue()
        for c in conns:
            free.put_nowait(c)
        pending: set[asyncio.Task[None]] = set()

        async def one(scheduled: float) -> None:
            conn = await free.get()
            try:
                await send(conn, scheduled)
            finally:
                free.put_nowait(conn)

        i = 0
        while True:
            scheduled = start + i / rate
            if scheduled >= stop_at:
                break
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(one(scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
        if pending:
            await asyncio.wait(pending, timeout=30)
    for c in conns:
        c.close()
    latencies.sort()
    return LoadResult(
        totals["requests"], totals["events"], totals["errors"], duration,
        _pct(latencies, 0.50), _pct(latencies, 0.99), totals["accepted"],
    )


def run_load(args: argparse.Namespace) -> None:
    import uvloop

    result = uvloop.run(
        _load(args.mode, args.url, args.duration, args.warmup, args.concurrency, args.rate, args.run_id)
    )
    print(json.dumps(result.to_dict()))


# --- orchestration -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server {url} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"server {url} did not become healthy in {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def load(mode: str, url: str, args: argparse.Namespace, run_id: str, *, concurrency: int, rate: float = 0.0) -> LoadResult:
    cmd = [
        sys.executable, __file__, "--load", mode, "--url", url, "--duration", str(args.duration),
        "--warmup", str(args.warmup), "--concurrency", str(concurrency), "--rate", str(rate), "--run-id", run_id,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=args.duration + args.warmup + 120)
    return LoadResult(**json.loads(out.stdout.strip().splitlines()[-1]))


def start_refinery(data_dir: Path, env_extra: dict[str, str]) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    env = {
        **os.environ, "REFINERY_DATA_DIR": str(data_dir), "REFINERY_ADMIN_TOKEN": ADMIN_TOKEN,
        "REFINERY_RATE_LIMIT_PER_SECOND": "0", "REFINERY_LOG_LEVEL": "WARNING", **env_extra,
    }
    log = open(data_dir.parent / "refinery-serve.log", "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "refinery", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    import httpx

    r = httpx.post(
        url + "/api/sources", json={"name": "bench", "write_key": WRITE_KEY},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30,
    )
    r.raise_for_status()
    return url, proc


def start_baseline() -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--baseline-server", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    return url, proc


def count_events(url: str) -> int:
    import httpx

    r = httpx.post(
        url + "/api/query", json={"sql": "SELECT count(*) FROM events"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60,
    )
    r.raise_for_status()
    return int(r.json()["rows"][0][0])


def measure(name: str, url: str, args: argparse.Namespace) -> dict[str, LoadResult]:
    results = {
        "batch": load("batch", url, args, f"{name}-b", concurrency=args.batch_clients),
        "single": load("single", url, args, f"{name}-s", concurrency=args.single_clients),
        "fixed": load("fixed", url, args, f"{name}-f", concurrency=64, rate=args.rate),
    }
    for mode, r in results.items():
        print(f"  {name:9} {mode:6} requests={r.requests} events={r.events} errors={r.errors} "
              f"p50={r.p50_ms:.1f}ms p99={r.p99_ms:.1f}ms", flush=True)
    return results


def report(ours: dict[str, LoadResult], base: dict[str, LoadResult], args: argparse.Namespace) -> str:
    rows = [
        ("events/s via /v1/batch (100/batch)", ours["batch"].events / args.duration, base["batch"].events / args.duration,
         f">= {TARGETS['batch_events_per_s']:,}", ours["batch"].events / args.duration >= TARGETS["batch_events_per_s"]),
        ("single-event requests/s", ours["single"].requests / args.duration, base["single"].requests / args.duration,
         f">= {TARGETS['single_requests_per_s']:,}", ours["single"].requests / args.duration >= TARGETS["single_requests_per_s"]),
        ("single-event p50 ms", ours["single"].p50_ms, base["single"].p50_ms, "", None),
        ("single-event p99 ms", ours["single"].p99_ms, base["single"].p99_ms, "", None),
        (f"p99 ms at {args.rate:,.0f} req/s", ours["fixed"].p99_ms, base["fixed"].p99_ms,
         f"< {TARGETS['fixed_rate_p99_ms']:.0f}", ours["fixed"].p99_ms < TARGETS["fixed_rate_p99_ms"]),
        (f"p50 ms at {args.rate:,.0f} req/s", ours["fixed"].p50_ms, base["fixed"].p50_ms, "", None),
    ]
    lines = [
        "| measure | Refinery | baseline | ratio | target | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    for label, mine, theirs, target, met in rows:
        fmt = "{:,.0f}" if mine > 100 else "{:.1f}"
        ratio = mine / theirs if theirs else float("nan")
        lines.append(
            f"| {label} | {fmt.format(mine)} | {fmt.format(theirs)} | {ratio:.2f} | {target} | "
            f"{'' if met is None else ('yes' if met else 'no')} |"
        )
    half = [ours[m].events / max(1, base[m].events) >= 0.5 for m in ("batch", "single")]
    lines.append("")
    lines.append(
        f"Throughput ratios (>= 0.50 of baseline): batch {'met' if half[0] else 'NOT met'}, "
        f"single {'met' if half[1] else 'NOT met'}. Errors: Refinery "
        f"{sum(r.errors for r in ours.values())}, baseline {sum(r.errors for r in base.values())}."
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="Measured seconds per scenario (default 10).")
    p.add_argument("--warmup", type=float, default=2.0, help="Unmeasured seconds before each scenario (default 2).")
    p.add_argument("--batch-clients", type=int, default=8, help="Concurrent connections posting batches.")
    p.add_argument("--single-clients", type=int, default=64, help="Concurrent connections posting single events.")
    p.add_argument("--rate", type=float, default=1000.0, help="Requests/s for the fixed-rate latency scenario.")
    p.add_argument("--only", choices=["refinery", "baseline", "both"], default="both")
    p.add_argument("--env", action="append", default=[], help="Extra KEY=VALUE for refinery serve (repeatable).")
    # internal modes
    p.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--load", choices=["batch", "single", "fixed"], help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--run-id", default="r", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.baseline_server:
        run_baseline(args.port)
        return
    if args.load:
        args.mode = args.load
        run_load(args)
        return

    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; "
          f"{args.duration:.0f} s per scenario after {args.warmup:.0f} s warm-up", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="refinery-bench-"))
    ours = base = None
    try:
        if args.only in ("refinery", "both"):
            data_dir = tmp / "data"
            data_dir.mkdir()
            env_extra = dict(kv.split("=", 1) for kv in args.env)
            url, proc = start_refinery(data_dir, env_extra)
            try:
                ours = measure("refinery", url, args)
                stored = count_events(url)
                acked = sum(r.accepted for r in ours.values())
                # Every acknowledged event must be stored; a request still in flight when a scenario
                # ended may be stored without its acknowledgement having been counted.
                verdict = "every acknowledged event is stored" if stored >= acked else "ACKNOWLEDGED EVENTS MISSING"
                print(f"  refinery stored {stored:,} events; acknowledged {acked:,}: {verdict}", flush=True)
            finally:
                stop(proc)
        if args.only in ("baseline", "both"):
            url, proc = start_baseline()
            try:
                base = measure("baseline", url, args)
            finally:
                stop(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if ours and base:
        print()
        print(report(ours, base, args))


if __name__ == "__main__":
    main()
