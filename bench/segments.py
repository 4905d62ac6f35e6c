"""Benchmark: segments compiled from the rule language against hand-written DuckDB queries for the
same audiences, on a generated world, side by side in one run.

The world is generated in SQL straight into a Refinery store (the schema of `Runtime.open`):
`profiles` (traits: plan, age, country), `events` (page views with urls, product views, orders
with totals and categories, sign-ups) and `event_profiles`, spread over the last 120 days.

Scenarios (issue 5's proof):
1. preview: a three-condition rule (count, compiled), against its hand-written query;
2. recomputation: 20 segments, each compiled alone (`compile_rule`), against 20 hand-written queries;
3. the same 20 segments in one batch (`compile_many`: one scan of the events for all of them),
   against the same 20 hand-written queries;
each timed best-of-N, the result sets compared for equality, the ratio printed, and the peak RSS
of the process while the scenario ran (sampled every 10 ms) reported.

Usage: .venv/bin/python bench/segments.py [--profiles 1000000] [--events 10000000] [--repeat 3] [--repeat-many 2]
Targets: preview <= 1 s; 20 segments <= 30 s; compiled <= 1.5x hand-written; peak RSS < 4 GiB.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The hand-written queries below are constant text built from constants (no user input): S608 is moot.

NOW = datetime(2026, 11, 1, tzinfo=UTC)

GENERATE = [
    # Profiles: a plan, an age and a country as traits.
    """INSERT INTO profiles
    SELECT 'prof_' || lpad(p::VARCHAR, 9, '0'),
           json_object('user_id', ['u' || p]),
           json_object('plan', ['free', 'free', 'free', 'pro', 'enterprise'][1 + p % 5],
                       'age', 18 + (p * 7) % 60,
                       'country', ['GB', 'FR', 'DE', 'US', 'ES', 'IT'][1 + (p * 13) % 6],
                       'newsletter', p % 3 = 0),
           '{}', $now::TIMESTAMPTZ - INTERVAL 120 DAY, $now::TIMESTAMPTZ, 0, '["web"]', $now::TIMESTAMPTZ
    FROM range($profiles) t(p)""",
    # Events: e spread over profiles by a multiplicative hash (some people do a lot, most a little).
    """INSERT INTO events (message_id, source, type, event, name, user_id, timestamp, received_at, properties,
                           page_url, page_path, loaded_at)
    SELECT 'm' || e, 'web',
           CASE WHEN k < 55 THEN 'page' ELSE 'track' END,
           CASE WHEN k < 55 THEN 'page_view' WHEN k < 85 THEN 'Product Viewed' WHEN k < 95 THEN 'Added to Cart'
                WHEN k < 99 THEN 'Order Completed' ELSE 'Signed Up' END,
           NULL, 'u' || prof, ts, ts + INTERVAL 2 SECOND,
           CASE WHEN k < 55 THEN json_object('url', 'https://shop.example' || path, 'path', path)
                WHEN k BETWEEN 55 AND 98 THEN json_object(
               'sku', 'sku-' || (hash(e, 5) % 5000)::BIGINT,
               'category', ['shoes', 'shirts', 'bags', 'hats', 'socks', 'coats'][1 + (hash(e, 6) % 6)::BIGINT],
               'total', round(((hash(e, 7) % 40000)::BIGINT) / 100.0, 2)) END,
           CASE WHEN k < 55 THEN 'https://shop.example' || path END,
           CASE WHEN k < 55 THEN path END,
           ts + INTERVAL 3 SECOND
    FROM (SELECT e, (hash(e, 1) % $profiles)::BIGINT AS prof, (hash(e, 2) % 100)::BIGINT AS k,
                 $now::TIMESTAMPTZ - to_seconds((hash(e, 3) % (120 * 86400))::BIGINT) AS ts,
                 ['/', '/pricing', '/blog/post', '/products/a', '/products/b', '/pricing/enterprise', '/about',
                  '/docs', '/cart', '/'][1 + (hash(e, 4) % 10)::BIGINT] AS path
          FROM range($events) t(e)) x""",
    """INSERT INTO event_profiles
    SELECT source, message_id, 'prof_' || lpad(substr(user_id, 2), 9, '0'), 'user_id', timestamp FROM events""",
    "UPDATE profiles SET event_count = c.n FROM (SELECT profile_id, count(*) AS n FROM event_profiles GROUP BY 1) c "
    "WHERE profiles.profile_id = c.profile_id",
]

_EP = "events e JOIN event_profiles ep ON ep.message_id = e.message_id AND ep.source = e.source"
_AS_OF = "e.received_at <= TIMESTAMPTZ '2026-11-01 00:00:00+00' AND e.timestamp <= TIMESTAMPTZ '2026-11-01 00:00:00+00'"


def _since(days: int) -> str:
    return f"e.timestamp > TIMESTAMPTZ '2026-11-01 00:00:00+00' - INTERVAL {days} DAY"


def segments(days: int) -> list[tuple[str, str, str]]:
    """(name, rule, hand-written query returning the member profile ids), with windows of `days`."""
    return [
        (f"pricing_visitors_{days}d",
         f"count(event = 'page_view' and url contains 'pricing') >= 2 in last {days} days",
         f"SELECT ep.profile_id FROM {_EP} WHERE e.event = 'page_view' AND contains(e.properties->>'$.url', 'pricing') AND {_since(days)} "  # noqa: S608
         f"AND {_AS_OF} GROUP BY 1 HAVING count(*) >= 2"),
        (f"big_buyers_{days}d",
         f"performed 'Order Completed' where total > 100 at least 1 times in last {days} days",
         f"SELECT DISTINCT ep.profile_id FROM {_EP} WHERE e.event = 'Order Completed' "  # noqa: S608
         f"AND TRY_CAST(e.properties->>'$.total' AS DOUBLE) > 100 AND {_since(days)} AND {_AS_OF}"),
        (f"lapsed_pro_{days}d",
         f"plan = 'pro' and not performed 'Product Viewed' in last {days} days",
         f"SELECT profile_id FROM profiles WHERE traits->>'$.plan' = 'pro' AND profile_id NOT IN "  # noqa: S608
         f"(SELECT ep.profile_id FROM {_EP} WHERE e.event = 'Product Viewed' AND {_since(days)} AND {_AS_OF})"),
        (f"young_spenders_{days}d",
         f"age between 18 and 30 and sum(total) of 'Order Completed' > 200 in last {days} days",
         f"SELECT p.profile_id FROM profiles p JOIN (SELECT ep.profile_id, sum(TRY_CAST(e.properties->>'$.total' AS DOUBLE)) AS s "  # noqa: S608
         f"FROM {_EP} WHERE e.event = 'Order Completed' AND {_since(days)} AND {_AS_OF} GROUP BY 1) o ON o.profile_id = p.profile_id "
         f"WHERE TRY_CAST(p.traits->>'$.age' AS DOUBLE) BETWEEN 18 AND 30 AND o.s > 200"),
    ]


#: Twenty segments: four shapes, five windows.
SEGMENTS: list[tuple[str, str, str]] = [s for days in (7, 14, 30, 60, 90) for s in segments(days)]

#: The three-condition rule of the preview scenario, and its hand-written query.
PREVIEW = (
    "count(event = 'page_view' and url contains 'pricing') >= 1 in last 30 days "
    "and plan = 'pro' and not performed 'Order Completed' in last 30 days",
    f"""SELECT p.profile_id FROM profiles p
        JOIN (SELECT ep.profile_id FROM {_EP} WHERE e.event = 'page_view' AND contains(e.properties->>'$.url', 'pricing')
              AND {_since(30)} AND {_AS_OF} GROUP BY 1 HAVING count(*) >= 1) v ON v.profile_id = p.profile_id
        WHERE p.traits->>'$.plan' = 'pro'
          AND p.profile_id NOT IN (SELECT ep.profile_id FROM {_EP} WHERE e.event = 'Order Completed' AND {_since(30)} AND {_AS_OF})""",  # noqa: S608
)


def _params(statement: str, profiles: int, events: int) -> dict[str, Any] | None:
    """The named parameters a statement uses (DuckDB refuses extra ones)."""
    given = {"now": NOW, "profiles": profiles, "events": events}
    used = {k: v for k, v in given.items() if f"${k}" in statement}
    return used or None


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


class PeakRss:
    """The process's peak resident memory while a block runs, sampled from /proc every 10 ms
    (ru_maxrss only ever grows, so it cannot tell one scenario from the one before)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRss:
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", type=int, default=1_000_000)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs of the preview (the best counts)")
    ap.add_argument("--repeat-many", type=int, default=2, help="runs of each 20-segment scenario (the best counts)")
    ap.add_argument("--memory-limit", default="3GB", help="DuckDB memory limit (the target is a peak RSS under 4 GiB)")
    args = ap.parse_args()

    from refinery.runtime import Runtime
    from refinery.segments.compile import CompileContext, build_catalog, compile_many, compile_rule
    from refinery.settings import Settings

    with tempfile.TemporaryDirectory(prefix="refinery-bench-segments-") as tmp:
        settings = Settings(data_dir=Path(tmp) / "data", admin_token="bench", duckdb_memory_limit=args.memory_limit)
        with Runtime.open(settings, start_writer=False) as rt:
            engine = rt.engine
            t = time.perf_counter()
            for statement in GENERATE:
                engine.execute(statement, _params(statement, args.profiles, args.events))
            print(f"world: {args.profiles:,} profiles, {args.events:,} events, generated in {time.perf_counter() - t:.1f} s")
            print(f"load average before the runs: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

            catalog = build_catalog(engine)
            ctx = CompileContext(catalog=catalog, segments={}, computed_traits={})
            cursor = engine.reader()

            def ids(sql: str) -> set[str]:
                return {r[0] for r in engine.fetch_all(sql, cursor=cursor)}

            def by_segment(sql: str) -> list[set[str]]:
                out: dict[str, set[str]] = {name: set() for name, _, _ in SEGMENTS}
                for segment, profile_id in engine.fetch_all(sql, cursor=cursor):
                    out[segment].add(profile_id)
                return [out[name] for name, _, _ in SEGMENTS]

            rows = []
            rule, hand = PREVIEW
            compiled = compile_rule(rule, ctx).sql(NOW)
            with PeakRss() as rss:
                tc, got = _timed(lambda: ids(compiled), args.repeat)
                th, want = _timed(lambda: ids(hand), args.repeat)
            rows.append(("preview (3 conditions)", tc, th, got == want, len(got), rss.peak))

            sqls = [(compile_rule(r, ctx).sql(NOW), h) for _, r, h in SEGMENTS]
            with PeakRss() as rss:
                tc, got_all = _timed(lambda: [ids(c) for c, _ in sqls], args.repeat_many)
                th, want_all = _timed(lambda: [ids(h) for _, h in sqls], args.repeat_many)
            rows.append(("20 segments, one query each", tc, th, got_all == want_all, sum(len(g) for g in got_all), rss.peak))

            many = compile_many({name: r for name, r, _ in SEGMENTS}, ctx).sql(NOW)
            assert many is not None
            with PeakRss() as rss:
                tc, got_many = _timed(lambda: by_segment(many), args.repeat_many)
            rows.append(("20 segments, one batch (compile_many)", tc, th, got_many == want_all,
                         sum(len(g) for g in got_many), rss.peak))
            print(f"load average after the runs: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print("| scenario | compiled s | hand-written s | ratio | same members | members | peak RSS MiB |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for name, tc, th, same, n, rss_peak in rows:
        print(f"| {name} | {tc:.3f} | {th:.3f} | {tc / th:.2f} | {'yes' if same else 'NO'} | {n:,} | {rss_peak / 2**20:,.0f} |")
    print(f"\npeak RSS of this process (generation included): {peak:,.0f} MiB")
    ok = all(row[3] for row in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
