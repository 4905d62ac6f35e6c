"""Benchmark: the online store's in-process lookup (`SqliteStore.lookup`: erased check, merge alias,
the profile's values, TTL decided per value) beside bare baselines on the same data, in one run:

- bare SQLite: one `SELECT feature, value FROM feature_values WHERE profile_id = ?` and json.loads
  of each value, on the same file (what any lookup must at least do);
- dict: a Python dict of profile -> values (the fastest thing a process could hold; no sharing).

The store is filled through the store's own `put` (what materialisation writes) with `--profiles`
profiles x `--features` features; lookups are of random profile ids, timed one by one.

Usage: .venv/bin/python bench/features_online.py [--profiles 200000] [--features 20] [--lookups 20000]
Target (issue 7): lookup p99 below 2 ms in-process.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from refinery.features.online import SqliteStore  # noqa: E402


def timed(fn: Callable[[str], object], ids: list[str]) -> list[float]:
    out = []
    for pid in ids:
        t = time.perf_counter()
        fn(pid)
        out.append((time.perf_counter() - t) * 1000)
    return sorted(out)


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", type=int, default=200_000)
    ap.add_argument("--features", type=int, default=20)
    ap.add_argument("--lookups", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    names = [f"f{i:02d}" for i in range(args.features)]
    now = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "online.sqlite")
        t = time.perf_counter()
        plain: dict[str, dict[str, object]] = {}
        for start in range(0, args.profiles, 20_000):
            chunk = {f"p_{i:08d}": {n: (1, round(rng.random() * 100, 2), now, 86_400) for n in names}
                     for i in range(start, min(args.profiles, start + 20_000))}
            store.put(chunk, replace=True, since=now)
            plain.update({p: {n: e[1] for n, e in v.items()} for p, v in chunk.items()})
        store.set_aliases({f"m_{i:08d}": f"p_{i:08d}" for i in range(0, args.profiles, 100)})
        fill = time.perf_counter() - t
        print(f"filled {args.profiles:,} profiles x {args.features} features ({store.count():,} values) in {fill:.1f} s")

        ids = [f"p_{rng.randrange(args.profiles):08d}" for _ in range(args.lookups)]
        bare = sqlite3.connect(Path(tmp) / "online.sqlite")

        def baseline(pid: str) -> object:
            return {n: json.loads(v) for n, v in bare.execute("SELECT feature, value FROM feature_values WHERE profile_id = ?", (pid,))}

        for pid in ids[:500]:  # warm both
            store.lookup(pid)
            baseline(pid)
        ours = timed(store.lookup, ids)
        base = timed(baseline, ids)
        dct = timed(plain.__getitem__, ids)
        assert {k: v.value for k, v in store.lookup(ids[0]).values.items()} == baseline(ids[0]) == plain[ids[0]]
        print(f"{'lookup':<28}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
        for label, xs in (("online store (ours)", ours), ("bare SQLite select", base), ("python dict", dct)):
            print(f"{label:<28}{pct(xs, 0.5):>10.4f}{pct(xs, 0.99):>10.4f}{xs[-1]:>10.3f}")
        print(f"ratio ours / bare SQLite: p50 {pct(ours, 0.5) / pct(base, 0.5):.2f}x, p99 {pct(ours, 0.99) / pct(base, 0.99):.2f}x")
        print(f"target: p99 below 2 ms: {'met' if pct(ours, 0.99) < 2 else 'NOT met'} ({pct(ours, 0.99):.3f} ms)")
        bare.close()
        store.close()


if __name__ == "__main__":
    main()
