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
import statistics
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
    reports: list[BatchReport] = field(default_factory=list)
    lost: int = 0


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
                fut.add_done_callback(lambda f: run.reports.append(f.result()) if not f.exception() else None)
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
            if incremental:
                deadline = t1 + 2.0
                while True:
                    if reader.execute("SELECT 1 FROM event_profiles WHERE source = 'web' AND message_id = ?",
                                      [ev["messageId"]]).fetchall():
                        run.visible_ms.append((time.perf_counter() - t0) * 1000)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=5000, help="people in the background history")
    ap.add_argument("--events", type=int, default=1000, help="single events measured")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    hist = history(args.users, rnd)
    live = live_events(args.events, args.users, rnd)
    with tempfile.TemporaryDirectory(prefix="refinery-bench-inc-") as tmp:
        base = one_run(Path(tmp) / "baseline", False, hist, live)
        inc = one_run(Path(tmp) / "incremental", True, hist, live)
    added = [v - a for v, a in zip(inc.visible_ms, inc.ack_ms, strict=False)]
    per_event = [r.seconds * 1000 / r.events for r in inc.reports if r.events]
    modes: dict[str, int] = {}
    for r in inc.reports:
        modes[r.mode] = modes.get(r.mode, 0) + 1
    print(f"history: {len(hist)} events of {args.users} people; measured: {len(live)} single events (80% attach, 20% new identifiers)")
    print(f"{'':32} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, xs in (("baseline: commit (ack)", base.ack_ms), ("incremental: commit (ack)", inc.ack_ms),
                     ("incremental: profile visible", inc.visible_ms), ("  of which after the commit", added),
                     ("follower time per event", per_event)):
        print(f"{name:32} {pct(xs, 50):8.2f} {pct(xs, 99):8.2f} {max(xs) if xs else float('nan'):8.2f}")
    print(f"follower batches: {sum(modes.values())} ({', '.join(f'{k} {v}' for k, v in sorted(modes.items()))}); "
          f"events per batch with events: {statistics.mean([r.events for r in inc.reports if r.events] or [0]):.2f}; not visible within 2 s: {inc.lost}")
    ratio = pct(inc.visible_ms, 99) / pct(base.ack_ms, 99)
    print(f"ratio p99 visible (incremental) / p99 ack (baseline): {ratio:.2f}")
    ok = pct(added, 99) < TARGET_P99_MS and inc.lost == 0
    print(f"target p99 after commit < {TARGET_P99_MS} ms: {'met' if ok else 'NOT met'} ({pct(added, 99):.2f} ms)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
