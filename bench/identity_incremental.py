"""Incremental identity: how long until a committed event's profile is visible, beside a baseline.

Run it as `.venv/bin/python bench/identity_incremental.py` (options: `--help`). In one process,
twice on fresh data dirs with the same seeded events:

* **incremental**: a `Runtime` with the identity follower started as `refinery serve` starts it
  (`identity.incremental.start_follower`, setting `identity_incremental`), and
* **baseline**: the same runtime without the follower (`identity_incremental=false`).

Each run loads a background history (`--users` people: identify calls joining an anonymous id, a user
id and an email, then page/track events) and resolves it once; then it sends `--events` single events
one at a time (a 1 ms pause between them, so each is measured alone), through the collector's own
path from staging on (`protocol.stage` + `EventStore` group commit on the writer: what a
`/v1/track` request does once its body is read; no HTTP, because every HTTP read of profiles is
audited through the writer and would itself wake the follower). The mix: 80% track calls of known
people (every identifier and edge known: attach), 10% a known person on a new device (new anonymous
id: region), 10% a new anonymous visitor (new identifier: region).

Per event it records the time from submitting it to the writer until
* `ack`: the commit is done (when the collector would answer 200), and, for the incremental run,
* `visible`: a reader cursor sees the event in `event_profiles` (polled every 0.2 ms),
and prints p50/p99 of each, the follower's own processing time per event (its batch reports), and
the ratio of the incremental run's p99 `visible` to the baseline's p99 `ack`. Target: the part the
follower adds (`visible - ack`) has p99 below 5 ms.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from refinery.identity.incremental import BatchReport, Follower, run_batch, start_follower
from refinery.identity.rules import IdentityRules
from refinery.ingest.protocol import Limits, stage
from refinery.ingest.store import IngestItem
from refinery.profiles.policy import TraitPolicy
from refinery.runtime import Runtime
from refinery.settings import Settings

TARGET_P99_MS = 5.0
INGEST_GOAL = 0.8


def history(users: int, rnd: random.Random) -> list[dict[str, Any]]:
    base = datetime.now(UTC) - timedelta(days=30)
    out: list[dict[str, Any]] = []
    for u in range(users):
        at = base + timedelta(seconds=u * 37)
        anon = f"anon-{u}"
        out.append({"type": "page", "anonymousId": anon, "name": "Home", "timestamp": at.isoformat()})
        out.append({"type": "identify", "anonymousId": anon, "userId": f"user-{u}", "timestamp": (at + timedelta(seconds=5)).isoformat(),
                    "traits": {"email": f"person{u}@shop.io", "plan": rnd.choice(["free", "pro"])}})
        for k in range(rnd.randint(1, 6)):
            out.append({"type": "track", "anonymousId": anon, "userId": f"user-{u}", "event": "Viewed",
                        "timestamp": (at + timedelta(seconds=10 + k)).isoformat(), "properties": {"k": k}})
    for ev in out:
        ev["messageId"] = uuid.uuid4().hex
    return out


def live_events(n: int, users: int, rnd: random.Random) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        u = rnd.randrange(users)
        roll = rnd.random()
        if roll < 0.8:
            ev = {"type": "track", "anonymousId": f"anon-{u}", "userId": f"user-{u}", "event": "Clicked"}
        elif roll < 0.9:
            ev = {"type": "identify", "anonymousId": f"device-{i}", "userId": f"user-{u}"}
        else:
            ev = {"type": "page", "anonymousId": f"visitor-{i}", "name": "Landing"}
        ev["messageId"] = uuid.uuid4().hex
        out.append(ev)
    return out


def items(events: list[dict[str, Any]]) -> list[IngestItem]:
    now = datetime.now(UTC)
    return [IngestItem("web", "req", now, s) for s in stage("batch", {"batch": events}, Limits())]


@dataclass
class Run:
    ack_ms: list[float] = field(default_factory=list)
    visible_ms: list[float] = field(default_factory=list)
    acked_at: list[float] = field(default_factory=list)   # perf_counter when each event's commit was done
    visible_at: list[float] = field(default_factory=list)  # ... and when a reader saw its event_profiles row
    reports: list[BatchReport] = field(default_factory=list)
    done_at: list[float] = field(default_factory=list)    # perf_counter when each report came back
    lost: int = 0

    def settled_ms(self) -> list[float]:
        """Per event, from its commit until `profiles` counted it: the end of the first settle that began
        after the event was attached (0.5 ms of slack for the 0.2 ms polling), or of the batch that
        attached and settled it at once (region path)."""
        ends = [(t - r.seconds, t, r.phase) for t, r in zip(self.done_at, self.reports, strict=True)
                if r.phase != "attach" and r.mode != "none"]
        out = []
        for acked, seen in zip(self.acked_at, self.visible_at, strict=False):
            found = [t for start, t, phase in ends
                     if (start >= acked if phase == "both" else start >= seen - 0.0005) and t >= seen - 0.0005]
            if found:
                out.append((min(found) - acked) * 1000)
        return out


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def one_run(data_dir: Path, incremental: bool, hist: list[dict[str, Any]], live: list[dict[str, Any]]) -> Run:
    settings = Settings(data_dir=data_dir, admin_token="bench", identity_incremental=incremental)
    rt = Runtime.open(settings)
    run = Run()
    follower: Follower | None = None
    try:
        for i in range(0, len(hist), 2000):
            rt.writer.write_batch(rt.events, items(hist[i:i + 2000]))
        rules, policy = IdentityRules(), TraitPolicy()
        rt.writer.call(lambda e: run_batch(e, rules, policy))  # the history, resolved once (a full resolution)
        if incremental:
            follower = start_follower(rt)
            assert follower is not None
            recorded = follower.writer.submit

            def submit(fn: Any) -> Any:  # keep every batch report the follower gets back
                fut = recorded(fn)

                def keep(f: Any) -> None:
                    if not f.exception():
                        run.done_at.append(time.perf_counter())
                        run.reports.append(f.result())
                fut.add_done_callback(keep)
                return fut
            follower.writer = _Proxy(rt.writer, submit)  # type: ignore[assignment]
        reader = rt.engine.reader()
        for ev in live:
            ev = {**ev, "timestamp": datetime.now(UTC).isoformat()}
            batch = items([ev])
            t0 = time.perf_counter()
            outcome = rt.writer.write_batch(rt.events, batch)
            t1 = time.perf_counter()
            assert outcome[0].status == "loaded", outcome
            run.ack_ms.append((t1 - t0) * 1000)
            run.acked_at.append(t1)
            if incremental:
                deadline = t1 + 2.0
                while True:
                    if reader.execute("SELECT 1 FROM event_profiles WHERE source = 'web' AND message_id = ?",
                                      [ev["messageId"]]).fetchall():
                        seen = time.perf_counter()
                        run.visible_ms.append((seen - t0) * 1000)
                        run.visible_at.append(seen)
                        break
                    if time.perf_counter() > deadline:
                        run.lost += 1
                        break
                    time.sleep(0.0002)
            time.sleep(0.001)
    finally:
        if follower is not None:
            follower.stop()
        rt.close()
    return run


class _Proxy:
    """The writer as the follower sees it, with `submit` wrapped; everything else passes through."""

    def __init__(self, writer: Any, submit: Any):
        self._writer, self.submit = writer, submit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


def ingest_ratio(duration: float, warmup: float) -> int:
    """`bench/ingest.py --only refinery` with the follower off, then on (same arguments, fresh data dirs,
    one after the other), and the ratio on/off per scenario."""
    script = Path(__file__).with_name("ingest.py")
    got: dict[str, dict[str, tuple[int, float, float]]] = {}
    for flag in ("false", "true"):
        out = subprocess.run([sys.executable, str(script), "--duration", str(duration), "--warmup", str(warmup), "--only", "refinery",
                              "--env", f"REFINERY_IDENTITY_INCREMENTAL={flag}"], check=True, capture_output=True, text=True)
        print(out.stdout, end="", flush=True)
        got[flag] = {m.group(1): (int(m.group(2)), float(m.group(3)), float(m.group(4))) for m in re.finditer(
            r"refinery\s+(batch|single|fixed)\s+requests=\d+ events=(\d+) errors=\d+ p50=([\d.]+)ms p99=([\d.]+)ms", out.stdout)}
    print(f"{'scenario':10} {'off ev/s':>10} {'on ev/s':>10} {'on/off':>7} {'off p99':>8} {'on p99':>8}")
    for mode in ("batch", "single", "fixed"):
        off, on = got["false"][mode], got["true"][mode]
        print(f"{mode:10} {off[0] / duration:10,.0f} {on[0] / duration:10,.0f} {on[0] / max(1, off[0]):7.2f} {off[2]:8.1f} {on[2]:8.1f}")
    ratio = got["true"]["batch"][0] / max(1, got["false"]["batch"][0])
    print(f"/v1/batch events/s with the follower on / off: {ratio:.2f} (goal >= {INGEST_GOAL})")
    return 0 if ratio >= INGEST_GOAL else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=5000, help="people in the background history")
    ap.add_argument("--events", type=int, default=1000, help="single events measured")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--ingest", action="store_true",
                    help="instead: the collector's throughput with the follower on and off (bench/ingest.py, twice) and the ratio")
    ap.add_argument("--duration", type=float, default=5.0, help="with --ingest: measured seconds per scenario")
    ap.add_argument("--warmup", type=float, default=1.0, help="with --ingest: warm-up seconds per scenario")
    args = ap.parse_args()
    if args.ingest:
        return ingest_ratio(args.duration, args.warmup)
    rnd = random.Random(args.seed)
    hist = history(args.users, rnd)
    live = live_events(args.events, args.users, rnd)
    with tempfile.TemporaryDirectory(prefix="refinery-bench-inc-") as tmp:
        base = one_run(Path(tmp) / "baseline", False, hist, live)
        inc = one_run(Path(tmp) / "incremental", True, hist, live)
    added = [v - a for v, a in zip(inc.visible_ms, inc.ack_ms, strict=False)]
    known = [x for x, ev in zip(added, live, strict=False) if ev["type"] == "track"]  # known people: the attach path
    new = [x for x, ev in zip(added, live, strict=False) if ev["type"] != "track"]
    attach = [r for r in inc.reports if r.phase == "attach" and r.mode == "attach" and r.events]
    region = [r for r in inc.reports if r.mode == "region"]
    settles = [r for r in inc.reports if r.phase == "settle" and r.mode != "none"]
    modes: dict[str, int] = {}
    for r in inc.reports:
        key = f"{r.phase}:{r.mode}"
        modes[key] = modes.get(key, 0) + 1
    print(f"history: {len(hist)} events of {args.users} people; measured: {len(live)} single events (80% known people, 20% new identifiers)")
    print(f"{'':42} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, xs in (("baseline: commit (ack)", base.ack_ms), ("incremental: commit (ack)", inc.ack_ms),
                     ("incremental: profile visible", inc.visible_ms), ("  of which after the commit", added),
                     ("    known people (attach)", known), ("    new identifiers (region)", new),
                     ("commit -> settled (profiles counts it)", inc.settled_ms()),
                     ("follower: attach batch", [r.seconds * 1000 for r in attach]),
                     ("follower: region batch", [r.seconds * 1000 for r in region]),
                     ("follower: settle batch", [r.seconds * 1000 for r in settles])):
        print(f"{name:42} {pct(xs, 50):8.2f} {pct(xs, 99):8.2f} {max(xs) if xs else float('nan'):8.2f}")
    print(f"follower batches: {sum(modes.values())} ({', '.join(f'{k} {v}' for k, v in sorted(modes.items()))}); "
          f"events per settle: {statistics.mean([r.settled for r in settles] or [0]):.2f}; not visible within 2 s: {inc.lost}")
    ratio = pct(inc.visible_ms, 99) / pct(base.ack_ms, 99)
    print(f"ratio p99 visible (incremental) / p99 ack (baseline): {ratio:.2f}")
    ok = pct(known, 99) < TARGET_P99_MS and inc.lost == 0
    print(f"target p99 after commit < {TARGET_P99_MS} ms for known people (attach): {'met' if ok else 'NOT met'} ({pct(known, 99):.2f} ms); "
          f"all events: {pct(added, 99):.2f} ms")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
