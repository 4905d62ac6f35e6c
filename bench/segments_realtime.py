"""Real-time segments: 50 live segments over a generated event stream, event by event.

Measures events/s through `RealtimeSegments.on_event` and the latency of each call (the time from
an event's arrival at the evaluator to its membership changes being returned), p50/p99/max, with
a timer tick every 1,000 events. Baseline, in the same run: the same events through a trivial loop
that only bumps a per-(event name, profile) counter in a dict; the ratio is printed.

    .venv/bin/python bench/segments_realtime.py [--events 200000] [--profiles 20000] [--against REV]

`--against REV` also runs the evaluator as committed at git revision REV (read with `git show`)
on the same segments and events in the same process, first, so a change is measured before and
after side by side on the same machine load; the members of every segment must come out the same.

Rules are compiled against a fixed catalog (no store needed): the evaluator's cost does not
depend on where the events come from.
"""

from __future__ import annotations

import argparse
import gc
import random
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from refinery.segments.catalog import Catalog
from refinery.segments.compile import CompileContext, compile_rule
from refinery.segments.realtime import RealtimeSegments

EVENTS = {
    "Page Viewed": {"url": "string"},
    "Product Viewed": {"category": "string", "price": "number"},
    "Added To Cart": {"category": "string", "price": "number"},
    "Order Completed": {"total": "number", "category": "string"},
    "Login": {"method": "string"},
    "Signed Up": {"plan": "string"},
}
WEIGHTS = [40, 25, 10, 5, 15, 5]
CATEGORIES = ["shoes", "hats", "socks", "bags", "coats"]
TRAITS = {"plan": "string", "age": "number", "country": "string"}


def segments() -> dict[str, str]:
    """50 rules of the kinds the real-time evaluator keeps: counts over windows, sequences, traits, combinations."""
    rules: dict[str, str] = {}
    for i, cat in enumerate(CATEGORIES):
        rules[f"views_{cat}"] = f"performed 'Product Viewed' where category = '{cat}' at least {2 + i % 3} times in last 7 days"
        rules[f"cart_{cat}"] = f"'Added To Cart' where category = '{cat}' then 'Order Completed' within 1 day in last 30 days"
        rules[f"abandon_{cat}"] = (f"performed 'Added To Cart' where category = '{cat}' in last 2 days "
                                   f"and not performed 'Order Completed' in last 2 days")
        rules[f"buyer_{cat}"] = f"count(event = 'Order Completed' and category = '{cat}') >= 2 in last 90 days"
    for days in (1, 3, 7, 14, 30):
        rules[f"active_{days}d"] = f"performed any event at least 3 times in last {days} days"
        rules[f"dormant_{days}d"] = f"performed 'Login' and not performed 'Login' in last {days} days"
    for n in (1, 2, 5, 10, 20):
        rules[f"pricing_{n}"] = f"count(event = 'Page Viewed' and url contains 'pricing') > {n} in last 7 days"
    rules["pro"] = "plan = 'pro'"
    rules["pro_active"] = "plan = 'pro' and performed any event in last 1 days"
    rules["young_buyers"] = "age between 18 and 30 and performed 'Order Completed' in last 30 days"
    rules["de_fr"] = "country in ('DE', 'FR') and performed 'Login' at least 2 times in last 7 days"
    rules["signup_then_order"] = "'Signed Up' then 'Order Completed' within 7 days"
    rules["big_cart"] = "performed 'Added To Cart' where price > 100 in last 1 days"
    rules["google_login"] = "performed 'Login' where method = 'google' in last 14 days"
    rules["three_step"] = "'Product Viewed' then 'Added To Cart' then 'Order Completed' within 2 hours"
    rules["viewers_not_buyers"] = "performed 'Product Viewed' at least 5 times in last 7 days and not performed 'Order Completed'"
    rules["pro_or_buyer"] = "plan = 'pro' or count(event = 'Order Completed') >= 3"
    for n in (1, 3, 10):
        rules[f"logins_{n}"] = f"performed 'Login' at least {n} times in last 3 days"
    rules["cheap_carts"] = "count of 'Added To Cart' where price < 50 >= 2 in last 7 days"
    rules["docs_readers"] = "count(event = 'Page Viewed' and url starts with '/docs') >= 2 in last 14 days"
    assert len(rules) == 50, len(rules)
    return rules


def stream(n: int, profiles: int, start: datetime, seed: int = 7) -> list[dict[str, Any]]:
    """n events spread over 10 days of event time, arriving in order (event times up to a minute earlier)."""
    rnd = random.Random(seed)
    names = list(EVENTS)
    span = timedelta(days=10) / n
    out = []
    for i in range(n):
        name = rnd.choices(names, WEIGHTS)[0]
        props: dict[str, Any] = {}
        if name == "Page Viewed":
            props = {"url": rnd.choice(["/", "/pricing", "/docs", "/blog/pricing-2026"])}
        elif name in ("Product Viewed", "Added To Cart"):
            props = {"category": rnd.choice(CATEGORIES), "price": rnd.choice([20, 60, 150])}
        elif name == "Order Completed":
            props = {"total": rnd.choice([30, 90, 400]), "category": rnd.choice(CATEGORIES)}
        elif name == "Login":
            props = {"method": rnd.choice(["google", "email"])}
        else:
            props = {"plan": rnd.choice(["free", "pro"])}
        at = start + span * i
        out.append({"type": "track", "event": name, "name": None, "properties": props, "context": {}, "traits": None,
                    "source": "web", "timestamp": at - timedelta(seconds=rnd.choice([0, 1, 5, 60])), "received_at": at,
                    "profile_id": f"prof_{rnd.randrange(profiles):06d}"})
    return out


def percentile(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


@dataclass
class Run:
    label: str
    seconds: float
    latencies: list[float]
    changes: int
    ticks: int
    members: dict[str, set[str]]


def evaluator_at(rev: str) -> Any:
    """The RealtimeSegments class as committed at `rev`, loaded as a module of its own."""
    root = Path(__file__).resolve().parent.parent
    text = subprocess.run(["git", "show", f"{rev}:src/refinery/segments/realtime.py"], cwd=root, check=True,
                          capture_output=True, text=True).stdout
    name = f"realtime_at_{rev.replace('~', '_').replace('^', '_')}"
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(text, f"{rev}:realtime.py", "exec"), module.__dict__)  # noqa: S102 - our own committed source
    return module.RealtimeSegments


def run(label: str, evaluator: Any, compiled: dict[str, Any], events: list[dict[str, Any]], profiles: int,
        start: datetime) -> Run:
    rnd = random.Random(3)
    live = evaluator.of(compiled)
    for p in range(profiles):
        live.set_traits(f"prof_{p:06d}", {"plan": rnd.choice(["free", "pro"]), "age": rnd.choice([17, 25, 40]),
                                           "country": rnd.choice(["DE", "FR", "US"])}, start)
    gc.collect()
    gc.freeze()
    latencies: list[float] = []
    changes = ticks = 0
    clock = time.perf_counter
    t0 = clock()
    for i, ev in enumerate(events):
        a = clock()
        changes += len(live.on_event(ev))
        latencies.append(clock() - a)
        if i % 1000 == 999:
            ticks += len(live.on_tick(ev["received_at"]))
    seconds = clock() - t0
    ticks += len(live.on_tick(events[-1]["received_at"] + timedelta(days=40)))
    latencies.sort()
    members = {name: live.members(name) for name in compiled}
    gc.unfreeze()
    return Run(label, seconds, latencies, changes, ticks, members)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--profiles", type=int, default=20_000)
    parser.add_argument("--against", metavar="REV", help="also run the evaluator as committed at this git revision")
    args = parser.parse_args()

    catalog = Catalog(EVENTS, TRAITS)
    ctx = CompileContext(catalog)
    compiled = {name: compile_rule(text, ctx) for name, text in segments().items()}
    assert all(c.realtime for c in compiled.values())
    start = datetime(2026, 1, 1, tzinfo=UTC)
    events = stream(args.events, args.profiles, start)
    runs = []
    if args.against:
        runs.append(run(f"evaluator at {args.against}", evaluator_at(args.against), compiled, events, args.profiles, start))
    runs.append(run("evaluator now", RealtimeSegments, compiled, events, args.profiles, start))
    clock = time.perf_counter

    # baseline: a dict counter per (event name, profile), the least any per-event evaluator must do
    counts: dict[tuple[str, str], int] = {}
    b0 = clock()
    for ev in events:
        key = (ev["event"], ev["profile_id"])
        counts[key] = counts.get(key, 0) + 1
    base = clock() - b0

    n = len(events)
    print(f"segments: {len(compiled)} live; profiles: {args.profiles:,}; events: {n:,} over 10 days of event time")
    for r in runs:
        lat = r.latencies
        print(f"{r.label}: {n / r.seconds:,.0f} events/s ({r.seconds:.2f} s); latency per event p50 "
              f"{percentile(lat, 0.5) * 1e3:.3f} ms, p99 {percentile(lat, 0.99) * 1e3:.3f} ms, max {lat[-1] * 1e3:.3f} ms; "
              f"membership changes: {r.changes:,} on events, {r.ticks:,} from timers; "
              f"ratio to the baseline's time: {r.seconds / base:.1f}x")
    if len(runs) == 2:
        same = runs[0].members == runs[1].members
        print(f"speed-up now vs {args.against}: {runs[0].seconds / runs[1].seconds:.2f}x; same members in every segment: {same}")
        assert same, "the two evaluators disagree"
    print(f"baseline dict-update loop: {n / base:,.0f} events/s ({base:.3f} s)")
    sizes = sorted(((len(m), name) for name, m in runs[-1].members.items()), reverse=True)
    print("largest segments at the end:", ", ".join(f"{name} {size:,}" for size, name in sizes[:5]))


if __name__ == "__main__":
    main()
