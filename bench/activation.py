"""Activation benchmark: a diff sync of a large segment to a loopback webhook, beside a bare loop.

Issue 6 asks for a diff sync of a 1-million-member segment to a loopback webhook in batches of
1,000 at 50,000 profiles/s or more, compared in the same run with a bare loop that posts the same
batches without Refinery's bookkeeping, and for the diff itself within 2 s.

The world: N profiles written straight into `profiles` and `identities` (the benchmark measures
activation, not ingestion), each with a `plan` trait and a personal `email` trait stored the way the
collector stores it (a vault token; the sync reveals it at delivery), and a segment `plan = 'pro'`
computed by Refinery's own segment run (two profiles in three are on 'pro': 1,500,000 profiles make
the issue's 1,000,000-member segment). Consent: every profile has a marketing receipt on its user id
(one in 50 a denial; one in 10 also an older, opposite choice that the newer one replaces: 1.1
receipts per profile), and `consent_unknown_allowed=["marketing"]` (an opt-out regime), so the
consent relation runs over every receipt and the filter over every member. The receiver is a small
uvicorn app in its own process (`bench/_fast_receiver.py`) that checks every signature and applies
each batch once by its idempotency key: lighter than the test receiver, so the sender is measured.

Measured, in one process, one after the other:
1. **plan**: `refinery.activation.service.plan` of the diff sync (target with consent and
   suppression, diff against the sync's state, outbox and state written in one transaction);
2. **deliver**: the destination's outbox drained by `Deliverer.drain` (consent and suppression
   re-checked per batch, tokens revealed, signed, posted, recorded), in batches of 1,000;
3. **baseline**: the same number of batches with the same record count and field shapes, posted by
   a bare loop with httpx (one client, body built and signed per batch, nothing recorded).
Then a second plan with nothing changed (the diff finds nothing), and one after 1% of the members
left (those removes delivered too).

    .venv/bin/python bench/activation.py                 # 1,500,000 profiles: a 1,000,000-member segment
    .venv/bin/python bench/activation.py --profiles 100000
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pyarrow as pa

from refinery.activation import operations as ops
from refinery.activation import service
from refinery.activation.store import get_sync
from refinery.activation.worker import Deliverer
from refinery.governance.principal import Principal
from refinery.privacy.tokens import PiiValue
from refinery.runtime import Runtime
from refinery.segments import lifecycle
from refinery.settings import Settings

ACTOR = Principal("local", "local:bench", "admin")
SECRET = "bench-secret-" + uuid.uuid4().hex


def _world(rt: Runtime, n: int) -> None:
    """N profiles; two thirds on plan 'pro'; each with an email token whose value is in the vault and
    a marketing consent receipt on its user id (1 in 50 denied; 1 in 10 with an older opposite choice)."""
    emails = [f"person{i}@example.com" for i in range(n)]
    tokens, values = [], []
    for i, email in enumerate(emails):
        token, normal = rt.vault.tokens.tokenise("email", email, None)
        tokens.append(token)
        values.append((rt.vault.key_id(f"user{i}"), PiiValue(token, "email", normal)))
    table = pa.table({"i": pa.array(range(n), pa.int64()), "token": pa.array(tokens)})

    def write(engine: object) -> None:
        e = rt.engine
        e.register("_bench_world", table)
        try:
            e.execute("""
                INSERT INTO profiles SELECT 'prof_' || lpad(i::VARCHAR, 12, '0'),
                    to_json(map(['user_id'], [to_json(['user' || i::VARCHAR])])),
                    to_json(map(['email', 'plan'], [to_json(token), to_json(CASE WHEN i % 3 = 0 THEN 'free' ELSE 'pro' END)])),
                    '{}', now(), now(), 1, '["bench"]', now()
                FROM _bench_world""")
            e.execute("""
                INSERT INTO identities (identifier_type, value, profile_id, status, first_seen, last_seen, event_count)
                SELECT 'user_id', 'user' || i::VARCHAR, 'prof_' || lpad(i::VARCHAR, 12, '0'), 'linked', now(), now(), 1
                FROM _bench_world""")
            e.execute("""
                INSERT INTO consent_log (log_id, subject_type, subject_value, profile_id, purpose, state, origin, source,
                                         actor, chosen_at, recorded_at)
                SELECT nextval('consent_log_seq'), 'user_id', 'user' || i::VARCHAR, 'prof_' || lpad(i::VARCHAR, 12, '0'),
                       'marketing', state, 'api', 'api', 'bench', now() - to_days(CAST(age AS INTEGER)), now()
                FROM (SELECT i, CASE WHEN i % 50 = 7 THEN 'denied' ELSE 'granted' END AS state, 1 AS age FROM _bench_world
                      UNION ALL
                      SELECT i, CASE WHEN i % 50 = 7 THEN 'granted' ELSE 'denied' END, 30 FROM _bench_world WHERE i % 10 = 0)""")
        finally:
            e.unregister("_bench_world")
        rt.vault.put_values(e, values)

    rt.writer.call(write)


def _receiver() -> tuple[subprocess.Popen[bytes], str, str]:
    """The fast receiver (bench/_fast_receiver.py) in its own process, once it answers."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_fast_receiver.py")), SECRET, str(port)])
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(base + "/state", timeout=1)
            return proc, base + "/hook", base + "/state"
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the benchmark's receiver did not start")


def _baseline(url: str, batches: int, size: int, segment: str) -> float:
    """The same batches, posted by a bare loop: a body like the sync's, signed, nothing recorded."""
    with httpx.Client(timeout=30.0) as client:
        started = time.perf_counter()
        for b in range(batches):
            records = [{"action": "add", "profile_id": f"prof_base{b:06d}{i:04d}", "fields": {"email": f"person{i}@example.com", "plan": "pro"}}
                       for i in range(size)]
            batch_id = uuid.uuid4().hex
            body = json.dumps({"batch_id": batch_id, "sync": "baseline", "segment": segment, "destination": "baseline",
                               "sent_at": datetime.now(UTC).isoformat(), "records": records}).encode()
            ts = str(int(time.time()))
            sig = hmac.new(SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
            r = client.post(url, content=body, headers={"Content-Type": "application/json", "Idempotency-Key": batch_id,
                                                        "X-Refinery-Timestamp": ts, "X-Refinery-Signature": f"sha256={sig}"})
            r.raise_for_status()
        return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", type=int, default=1_500_000)
    ap.add_argument("--batch-size", type=int, default=1000)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="refinery-bench-activation-") as tmp:
        settings = Settings(data_dir=Path(tmp) / "data", activation_workers=False, consent_unknown_allowed=["marketing"],
                           activation_allowed_networks=["127.0.0.1/32"], activation_batch_size=args.batch_size,
                           segments_interval_minutes=0)
        rt = Runtime.open(settings)
        proc, url, state_url = _receiver()
        try:
            t = time.perf_counter()
            _world(rt, args.profiles)
            receipts = rt.engine.fetch_all("SELECT count(*) FROM consent_log", cursor=rt.engine.reader())[0][0]
            print(f"world: {args.profiles:,} profiles, {receipts:,} consent receipts in {time.perf_counter() - t:.1f} s", flush=True)
            t = time.perf_counter()
            lifecycle.create(rt.engine, rt.writer, ACTOR, "pro", "plan = 'pro'")
            members = rt.engine.fetch_all("SELECT count(*) FROM segment_members WHERE segment = 'pro' AND exited_at IS NULL",
                                          cursor=rt.engine.reader())[0][0]
            print(f"segment 'pro': {members:,} members in {time.perf_counter() - t:.1f} s", flush=True)
            ops.create_destination(rt, ACTOR, "hook", "webhook", "marketing", {"url": url, "secret": SECRET})
            ops.create_sync(rt, ACTOR, "pro_to_hook", "pro", "hook", {"email": "email", "plan": "plan"}, mode="diff")
            sync = get_sync(rt.engine, "pro_to_hook")

            t = time.perf_counter()
            plan = service.plan(rt, sync, trigger="bench")
            plan_s = time.perf_counter() - t
            print(f"plan (diff of {members:,} members): {plan_s:.2f} s; {plan.added:,} adds in {plan.batches:,} batches, "
                  f"{plan.skipped_consent:,} without consent; {plan.timings_ms}", flush=True)

            deliverer = Deliverer(rt.engine, rt.writer, settings, "hook", rt.vault)
            t = time.perf_counter()
            if os.environ.get("BENCH_PROFILE") == "pyinstrument":  # a sampling profile (pip install pyinstrument; not a dependency)
                from pyinstrument import Profiler

                profiler = Profiler(interval=0.002)
                profiler.start()
                seen = deliverer.drain()
                profiler.stop()
                print(profiler.output_text(show_all=False, short_mode=False, unicode=False, color=False), file=sys.stderr, flush=True)
            elif os.environ.get("BENCH_PROFILE"):
                import cProfile
                import pstats

                prof = cProfile.Profile()
                seen = prof.runcall(deliverer.drain)
                pstats.Stats(prof).sort_stats(os.environ.get("BENCH_SORT", "cumulative")).print_stats(30)
            else:
                seen = deliverer.drain()
            deliver_s = time.perf_counter() - t
            state = httpx.get(state_url, timeout=30).json()
            held = len(state.get("pro", []))
            rate = plan.added / deliver_s
            print(f"deliver: {plan.added:,} profiles in {deliver_s:.2f} s = {rate:,.0f} profiles/s ({seen}); receiver holds {held:,}",
                  flush=True)

            base_s = _baseline(url, plan.batches, args.batch_size, "baseline")
            base_rate = plan.batches * args.batch_size / base_s
            print(f"baseline: {plan.batches * args.batch_size:,} profiles in {base_s:.2f} s = {base_rate:,.0f} profiles/s", flush=True)

            t = time.perf_counter()
            again = service.plan(rt, get_sync(rt.engine, "pro_to_hook"), trigger="bench")
            again_s = time.perf_counter() - t
            rt.writer.call(lambda e: e.execute("UPDATE profiles SET traits = json_object('plan', 'free'), updated_at = now() "
                                               "WHERE profile_id IN (SELECT profile_id FROM segment_members WHERE segment = 'pro' "
                                               "AND exited_at IS NULL ORDER BY profile_id LIMIT ?)", [max(1, members // 100)]))
            lifecycle.run(rt.engine, rt.writer, ACTOR, "pro")
            t = time.perf_counter()
            leave = service.plan(rt, get_sync(rt.engine, "pro_to_hook"), trigger="bench")
            leave_s = time.perf_counter() - t
            deliverer.drain()
            final = httpx.get(state_url, timeout=30).json()
            held_after = set(final.get("pro", []))
            # The members whose consent the world did not deny (see _world): what the receiver must hold.
            expected = {r[0] for r in rt.engine.fetch_all(
                "SELECT profile_id FROM segment_members WHERE segment = 'pro' AND exited_at IS NULL", cursor=rt.engine.reader())
                if int(r[0].removeprefix("prof_")) % 50 != 7}
            deliverer.close()
        finally:
            proc.terminate()
            proc.wait(10)
            rt.close()

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print("| measure | value |\n|---|---|")
    print(f"| members | {members:,} |")
    print(f"| plan, first diff (all adds) | {plan_s:.2f} s |")
    print(f"| plan, nothing changed | {again_s:.2f} s ({again.planned} changes) |")
    print(f"| plan, 1% left | {leave_s:.2f} s ({leave.removed:,} removes) |")
    print(f"| deliver, Refinery | {rate:,.0f} profiles/s |")
    print(f"| deliver, bare loop | {base_rate:,.0f} profiles/s |")
    print(f"| ratio Refinery / bare loop | {rate / base_rate:.2f} |")
    print(f"| receiver equals the consented members after the removes | {held_after == expected} ({len(held_after):,}) |")
    print(f"| peak RSS (this process) | {peak:,.0f} MiB |")
    print(f"\ntargets: deliver >= 50,000 profiles/s: {'met' if rate >= 50_000 else 'NOT met'}; "
          f"diff <= 2 s: {'met' if plan_s <= 2 else 'NOT met'}; cpu count {os.cpu_count()}")
    if held_after != expected:
        raise SystemExit("the receiver does not hold the segment's consented members")


if __name__ == "__main__":
    main()
