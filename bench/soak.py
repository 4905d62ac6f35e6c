"""Soak benchmark: the collector's memory under sustained load, beside a bare server's.

Run it as `.venv/bin/python bench/soak.py` (10 minutes; `--duration 60` for a quick look). It
starts, each in its own process on a free loopback port, the same two servers as
`bench/ingest.py`:

* `refinery serve` on a fresh temporary data dir (rate limit off, everything else default), and
* the baseline: the same HTTP stack with the collector's routes, answering 200 without any work;

and drives both at the same time with the same open-loop load (a fixed rate of single-event
`/v1/track` requests plus a fixed rate of 100-event `/v1/batch` requests, unique messageIds), each
from its own load process. Every few seconds it samples both servers' resident memory (RSS, from
/proc) and prints a line. At the end it prints a summary and checks, for Refinery:

* the peak RSS stays under the limit (500 MiB by default), and
* memory is flat: over the second half of the run RSS grows by less than `--max-growth` MiB per
  minute (least-squares slope), so the first half is allowed to warm up (caches, buffers);
* every acknowledged event is in `events` afterwards, and the load kept up (few errors).

The exit status is 0 when all checks pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import (  # noqa: E402 - the sibling benchmark holds the servers and the HTTP client
    BATCH_SIZE,
    WRITE_KEY,
    _Conn,
    _event,
    count_events,
    start_baseline,
    start_refinery,
    stop,
)

MIB = 1024 * 1024


# --- the load generator (runs in its own process) --------------------------------------------

async def _soak_load(url: str, duration: float, single_rate: float, batch_rate: float, run_id: str) -> dict[str, Any]:
    """Open loop: `single_rate` single events/s and `batch_rate` batches/s until `duration` ends."""
    import base64

    host, port = url.removeprefix("http://").split(":")
    auth = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()

    def head(path: str) -> bytes:
        return (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Basic {auth}\r\n"
            "Content-Type: application/json\r\n"
        ).encode()

    heads = {"single": head("/v1/track"), "batch": head("/v1/batch")}
    now_iso = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    totals = {"requests": 0, "acknowledged": 0, "errors": 0, "late": 0}
    counter = 0

    def body(kind: str) -> bytes:
        nonlocal counter
        if kind == "batch":
            events = []
            for _ in range(BATCH_SIZE):
                counter += 1
                events.append(_event(f"{run_id}-{counter}", counter % 10_000, now_iso))
            return b'{"batch":[' + b",".join(events) + b"]}"
        counter += 1
        return _event(f"{run_id}-{counter}", counter % 10_000, now_iso)

    free: asyncio.Queue[_Conn] = asyncio.Queue()
    for _ in range(64):
        free.put_nowait(await _Conn.open(host, int(port)))
    pending: set[asyncio.Task[None]] = set()
    start = time.perf_counter()

    async def one(kind: str, scheduled: float) -> None:
        conn = await free.get()
        try:
            data = body(kind)
            status, payload = await conn.post(heads[kind], data)
            totals["requests"] += 1
            if status == 200:
                totals["acknowledged"] += json.loads(payload).get("accepted", BATCH_SIZE) if kind == "batch" else 1
            else:
                totals["errors"] += 1
            if time.perf_counter() - scheduled > 1.0:
                totals["late"] += 1
        finally:
            free.put_nowait(conn)

    # One schedule for both kinds: the next send is whichever kind is due first.
    due = {"single": start, "batch": start}
    step = {"single": 1.0 / single_rate if single_rate > 0 else None, "batch": 1.0 / batch_rate if batch_rate > 0 else None}
    kinds = [k for k in due if step[k] is not None]
    while kinds:
        kind = min(kinds, key=lambda k: due[k])
        scheduled = due[kind]
        if scheduled - start >= duration:
            break
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(one(kind, scheduled))
        pending.add(task)
        task.add_done_callback(pending.discard)
        due[kind] = scheduled + step[kind]  # type: ignore[operator]
    if pending:
        await asyncio.wait(pending, timeout=60)
    while not free.empty():
        free.get_nowait().close()
    return totals


def run_load(args: argparse.Namespace) -> None:
    import uvloop

    print(json.dumps(uvloop.run(_soak_load(args.url, args.duration, args.single_rate, args.batch_rate, args.run_id))))


# --- memory sampling -------------------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` (VmRSS), or 0 once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def slope_mib_per_min(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time, in MiB per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mx = sum(t for t, _ in samples) / n
    my = sum(r for _, r in samples) / n
    var = sum((t - mx) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    cov = sum((t - mx) * (r - my) for t, r in samples)
    return cov / var * 60.0 / MIB


@dataclass
class Verdict:
    peak_mib: float
    start_mib: float
    end_mib: float
    slope: float

    def line(self, name: str) -> str:
        return (f"{name:9} RSS start {self.start_mib:6.1f} MiB, end {self.end_mib:6.1f} MiB, peak {self.peak_mib:6.1f} MiB, "
                f"second-half slope {self.slope:+.2f} MiB/min")


def verdict(samples: list[tuple[float, int]]) -> Verdict:
    half = [s for s in samples if s[0] >= samples[-1][0] / 2]
    return Verdict(
        peak_mib=max(r for _, r in samples) / MIB,
        start_mib=samples[0][1] / MIB,
        end_mib=samples[-1][1] / MIB,
        slope=slope_mib_per_min(half),
    )


# --- orchestration ---------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="Seconds of sustained load (default 600 = 10 minutes).")
    p.add_argument("--interval", type=float, default=5.0, help="Seconds between RSS samples (default 5).")
    p.add_argument("--single-rate", type=float, default=500.0, help="Single-event requests/s to each server (default 500).")
    p.add_argument("--batch-rate", type=float, default=20.0, help="100-event batches/s to each server (default 20).")
    p.add_argument("--limit-mib", type=float, default=500.0, help="Most RSS Refinery may reach (default 500 MiB).")
    p.add_argument("--max-growth", type=float, default=2.0,
                   help="Most RSS growth over the second half, in MiB per minute (default 2).")
    p.add_argument("--env", action="append", default=[], help="Extra KEY=VALUE for refinery serve (repeatable).")
    # internal mode: the load generator
    p.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--run-id", default="s", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.load:
        run_load(args)
        return

    offered = args.single_rate + args.batch_rate * BATCH_SIZE
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; {args.duration:.0f} s of load, "
          f"{args.single_rate:.0f} single requests/s + {args.batch_rate:.0f} batches/s ({offered:,.0f} events/s) "
          "to each server at once; RSS every "
          f"{args.interval:.0f} s", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="refinery-soak-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        data_dir = tmp / "data"
        data_dir.mkdir()
        ref_url, ref = start_refinery(data_dir, dict(kv.split("=", 1) for kv in args.env))
        procs.append(ref)
        base_url, base = start_baseline()
        procs.append(base)
        loads = {
            name: subprocess.Popen(
                [sys.executable, __file__, "--load", "--url", url, "--duration", str(args.duration),
                 "--single-rate", str(args.single_rate), "--batch-rate", str(args.batch_rate), "--run-id", name],
                stdout=subprocess.PIPE, text=True,
            )
            for name, url in (("refinery", ref_url), ("baseline", base_url))
        }
        samples: dict[str, list[tuple[float, int]]] = {"refinery": [], "baseline": []}
        started = time.monotonic()
        print(f"{'t (s)':>7} {'refinery MiB':>13} {'baseline MiB':>13}", flush=True)
        while any(lp.poll() is None for lp in loads.values()):
            t = time.monotonic() - started
            for name, proc in (("refinery", ref), ("baseline", base)):
                samples[name].append((t, rss_bytes(proc.pid)))
            print(f"{t:7.0f} {samples['refinery'][-1][1] / MIB:13.1f} {samples['baseline'][-1][1] / MIB:13.1f}", flush=True)
            time.sleep(args.interval)
        totals = {name: json.loads((lp.communicate()[0] or "{}").strip().splitlines()[-1]) for name, lp in loads.items()}
        stored = count_events(ref_url)
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)

    ours, theirs = verdict(samples["refinery"]), verdict(samples["baseline"])
    print()
    print(ours.line("refinery"))
    print(theirs.line("baseline"))
    print(f"RSS ratio at the end (refinery / baseline): {ours.end_mib / theirs.end_mib:.1f}")
    for name, t in totals.items():
        print(f"{name:9} requests={t['requests']} acknowledged events={t['acknowledged']} errors={t['errors']} "
              f"answered >1 s late={t['late']}")
    acked = totals["refinery"]["acknowledged"]
    checks = {
        f"peak RSS {ours.peak_mib:.0f} MiB < {args.limit_mib:.0f} MiB": ours.peak_mib < args.limit_mib,
        f"flat: second-half slope {ours.slope:+.2f} MiB/min < {args.max_growth:.1f}": ours.slope < args.max_growth,
        f"stored {stored:,} >= acknowledged {acked:,}": stored >= acked,
        f"errors {totals['refinery']['errors']} == 0": totals["refinery"]["errors"] == 0,
    }
    for label, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {label}")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
