"""Benchmark: full identity resolution of N identifier edges against python-igraph's connected
components on the same edge list (the in-memory lower bound), side by side, with peak memory.

The edge list has the demo world's shape, generated in SQL (seeded, deterministic): people with a
user id (80%) or anonymous only, one to three cookies each, one or two emails, phones for half,
app device ids for half, families of three sharing a laptop cookie (one in ten), and a kiosk cookie
seen with 5,000 user ids. Each side runs in its own subprocess so peak RSS (ru_maxrss) is its own:

  igraph     int-encoded edge list (encoded by DuckDB beforehand, not timed) -> Graph -> components
  refinery   resolve_graph(): numbering, conflicting edges, hubs, label propagation to a fixpoint,
             merge protection (nearest user id, ambiguous cookies cut), limits, profile ids

Usage: .venv/bin/python bench/identity_scale.py [--edges 10000000] [--memory-limit 6GB]
Targets (issue 3): refinery <= 60 s for 10 million edges on 2 cores, peak RSS < 8 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Edges per person on average (see GENERATE); people = edges / EDGES_PER_PERSON.
EDGES_PER_PERSON = 3.85

GENERATE = """
CREATE OR REPLACE TABLE people AS
SELECT p, p % 5 <> 0 AS known, 1 + (p * 7919) % 3 AS cookies, p // 3 AS household FROM range(?) t(p);
CREATE OR REPLACE TABLE edges AS
WITH e AS (
    -- known people: a star around the user id
    SELECT 'user_id' AS a_kind, 'u' || p AS a_value, 'anonymous_id' AS b_kind, 'a' || p || '_' || j AS b_value
    FROM people, range(3) c(j) WHERE known AND j < cookies
    UNION ALL SELECT 'user_id', 'u' || p, 'email', 'e' || p || '@shop.io' FROM people WHERE known
    UNION ALL SELECT 'user_id', 'u' || p, 'email', 'old' || p || '@shop.io' FROM people WHERE known AND p % 7 = 0
    UNION ALL SELECT 'user_id', 'u' || p, 'phone', '+4477' || lpad(CAST(p AS VARCHAR), 8, '0') FROM people WHERE known AND p % 2 = 0
    UNION ALL SELECT 'user_id', 'u' || p, 'device_id', 'd' || p FROM people WHERE known AND p % 2 = 1
    -- anonymous people: cookies around their device
    UNION ALL SELECT 'device_id', 'd' || p, 'anonymous_id', 'a' || p || '_' || j FROM people, range(3) c(j) WHERE NOT known AND j < cookies
    -- a family laptop cookie in one household of ten, logged into by everyone in it
    UNION ALL SELECT 'user_id', 'u' || p, 'anonymous_id', 'fam' || household FROM people WHERE known AND household % 10 = 1
    -- a kiosk
    UNION ALL SELECT 'user_id', 'u' || p, 'anonymous_id', 'kiosk' FROM people WHERE known AND p < 25000 AND p % 5 = 1
)
SELECT DISTINCT * FROM e;
"""


def generate(db: Path, edges: int) -> dict[str, int]:
    import duckdb

    con = duckdb.connect(str(db), config={"threads": 2, "memory_limit": "4GB"})
    people = int(edges / EDGES_PER_PERSON)
    for statement in GENERATE.strip().split(";\n"):
        if statement.strip():
            con.execute(statement, [people] if "range(?)" in statement else None)
    con.execute("""
        CREATE OR REPLACE TABLE ids AS
        SELECT kind, value, TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_seconds(hash(kind || value) % 5000000) AS first_seen,
               row_number() OVER () - 1 AS i
        FROM (SELECT a_kind AS kind, a_value AS value FROM edges UNION SELECT b_kind, b_value FROM edges) t
    """)
    con.execute("""
        CREATE OR REPLACE TABLE int_edges AS
        SELECT x.i AS a, y.i AS b FROM edges e
        JOIN ids x ON x.kind = e.a_kind AND x.value = e.a_value JOIN ids y ON y.kind = e.b_kind AND y.value = e.b_value
    """)
    n_edges = con.execute("SELECT count(*) FROM edges").fetchone()[0]  # type: ignore[index]
    n_ids = con.execute("SELECT count(*) FROM ids").fetchone()[0]  # type: ignore[index]
    con.close()
    return {"people": people, "edges": int(n_edges), "identifiers": int(n_ids)}


def run_igraph(db: Path) -> dict[str, float]:
    import duckdb
    import igraph
    import numpy as np

    con = duckdb.connect(str(db), read_only=True)
    n = con.execute("SELECT count(*) FROM ids").fetchone()[0]  # type: ignore[index]
    arr = con.execute("SELECT a, b FROM int_edges").fetchnumpy()
    con.close()
    pairs = np.column_stack([arr["a"], arr["b"]]).astype(np.int64)
    del arr
    t0 = time.perf_counter()
    g = igraph.Graph(n=int(n), edges=pairs)
    components = g.connected_components()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "components": len(components)}


def _profiled(engine: Any) -> list[tuple[float, str]]:
    """Time every statement the engine runs (for --profile); returns the list it appends to."""
    timings: list[tuple[float, str]] = []
    for name in ("execute", "fetch_all"):
        inner = getattr(engine, name)

        def timed(sql: Any, *a: Any, _inner: Any = inner, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return _inner(sql, *a, **kw)
            finally:
                timings.append((time.perf_counter() - t, " ".join(engine.render(sql).split())[:150]))

        setattr(engine, name, timed)
    return timings


def run_refinery(db: Path, memory_limit: str, profile: bool = False) -> dict[str, Any]:
    from refinery.identity.graph import resolve_graph
    from refinery.identity.resolve import assign_profile_ids
    from refinery.identity.rules import IdentityRules
    from refinery.storage.duckdb_engine import DuckDBEngine

    engine = DuckDBEngine(db, memory_limit=memory_limit, threads=2)
    engine.execute("CREATE OR REPLACE TEMP TABLE _idr_ids AS SELECT kind, value, first_seen FROM ids")
    engine.execute("CREATE OR REPLACE TEMP TABLE _idr_pairs AS SELECT a_kind, a_value, b_kind, b_value FROM edges")
    timings = _profiled(engine) if profile else []
    t0 = time.perf_counter()
    stats = resolve_graph(engine, IdentityRules())
    assign_profile_ids(engine)
    seconds = time.perf_counter() - t0
    profiles = engine.fetch_all("SELECT count(DISTINCT profile_id) FROM _idr_prof")[0][0]
    shared = engine.fetch_all("SELECT count(*) FROM _idr_prof WHERE status <> 'linked'")[0][0]
    two_users = engine.fetch_all(
        "SELECT count(*) FROM (SELECT profile_id FROM _idr_prof WHERE kind = 'user_id' GROUP BY 1 HAVING count(*) > 1)"
    )[0][0]
    engine.close()
    for took, text in timings:
        if took >= 0.2:
            print(f"{took:7.2f}s  {text}", file=sys.stderr)
    return {"seconds": seconds, "profiles": profiles, "not_linked": shared, "profiles_with_two_user_ids": two_users,
            "iterations": stats.iterations, "hubs": stats.hubs, "ambiguous": stats.ambiguous}


EVENTS = """
INSERT INTO events (message_id, source, type, user_id, anonymous_id, timestamp, received_at, traits, context, device_id, loaded_at)
SELECT 'm' || row_number() OVER (), 'bench', 'identify',
       CASE WHEN a_kind = 'user_id' THEN a_value END,
       CASE WHEN b_kind = 'anonymous_id' THEN b_value END,
       least(x.first_seen, y.first_seen), least(x.first_seen, y.first_seen),
       CASE b_kind WHEN 'email' THEN json_object('email', b_value) WHEN 'phone' THEN json_object('phone', b_value) ELSE '{}' END,
       '{}',
       CASE WHEN a_kind = 'device_id' THEN a_value WHEN b_kind = 'device_id' THEN b_value END,
       least(x.first_seen, y.first_seen)
FROM bench.edges e
JOIN bench.ids x ON x.kind = e.a_kind AND x.value = e.a_value
JOIN bench.ids y ON y.kind = e.b_kind AND y.value = e.b_value
"""


def run_full(db: Path, memory_limit: str, profile: bool = False) -> dict[str, Any]:
    """The whole `refinery identity resolve` path: one event per edge in a fresh data dir's `events`
    (not timed), then `profiles.build.resolve_and_build` inside the writer (timed): extraction and
    normalisation, the graph, writing identities, identity_edges, identity_blocked, profile_merges,
    event_profiles and profiles."""
    import shutil

    from refinery.identity.rules import IdentityRules
    from refinery.profiles.build import resolve_and_build
    from refinery.profiles.policy import TraitPolicy
    from refinery.runtime import Runtime
    from refinery.settings import Settings

    data_dir = db.parent / "full-data"
    shutil.rmtree(data_dir, ignore_errors=True)  # a fresh data dir every run (--keep keeps only the edge list)
    settings = Settings(data_dir=data_dir, admin_token="bench", duckdb_memory_limit=memory_limit, duckdb_threads=2)
    rt = Runtime.open(settings)
    try:
        def load(e: Any) -> None:
            e.execute(f"ATTACH '{db}' AS bench (READ_ONLY)")  # the benchmark's own file path, no user text
            e.execute(EVENTS)

        rt.writer.call(load)
        rt.engine.execute("DETACH bench")
        timings = _profiled(rt.engine) if profile else []
        t0 = time.perf_counter()
        result = rt.writer.call(lambda e: resolve_and_build(e, IdentityRules(), TraitPolicy.from_settings(settings)))
        seconds = time.perf_counter() - t0
        events = rt.engine.fetch_all("SELECT count(*) FROM events")[0][0]
    finally:
        rt.close()
    for took, text in timings:
        if took >= 0.2:
            print(f"{took:7.2f}s  {text}", file=sys.stderr)
    ident = result["identity"]
    return {"seconds": seconds, "events": events, "profiles": ident["profiles"], "identifiers": ident["identifiers"],
            "edges": ident["edges"], "resolve_seconds": ident["seconds"], "events_attributed": result["profiles"]["events_attributed"]}


def _side(which: str, db: Path, memory_limit: str, profile: bool = False) -> dict[str, Any]:
    extra = ["--profile"] if profile else []
    out = subprocess.run([sys.executable, __file__, "--side", which, "--db", str(db), "--memory-limit", memory_limit, *extra],
                         stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edges", type=int, default=10_000_000)
    ap.add_argument("--memory-limit", default="6GB", help="DuckDB memory limit for the refinery side.")
    ap.add_argument("--profile", action="store_true", help="Print every statement of the refinery side taking >= 0.2 s.")
    ap.add_argument("--keep", type=Path, help="Keep the generated edge list in this DuckDB file and reuse it next time.")
    ap.add_argument("--only", choices=("igraph", "refinery"), help="Run one side only (no ratio).")
    ap.add_argument("--full", action="store_true",
                    help="Also time the whole path from `events` (one event per edge): extraction, graph, writing every table, profiles.")
    ap.add_argument("--side", choices=("igraph", "refinery", "full"), help=argparse.SUPPRESS)
    ap.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        if args.side == "full":
            result = run_full(args.db, args.memory_limit, args.profile)
        else:
            result = run_igraph(args.db) if args.side == "igraph" else run_refinery(args.db, args.memory_limit, args.profile)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="identity-bench-") as tmp:
        db = args.keep or Path(tmp) / "edges.duckdb"
        t0 = time.perf_counter()
        shape_file = db.with_suffix(".shape.json")
        if args.keep and shape_file.exists() and json.loads(shape_file.read_text())["requested"] == args.edges:
            shape = json.loads(shape_file.read_text())
        else:
            db.unlink(missing_ok=True)
            shape = {**generate(db, args.edges), "requested": args.edges}
            if args.keep:
                shape_file.write_text(json.dumps(shape))
        print(f"edge list: {shape['edges']:,} edges over {shape['identifiers']:,} identifiers "
              f"({shape['people']:,} people), ready in {time.perf_counter() - t0:.1f}s")
        base = _side("igraph", db, args.memory_limit) if args.only != "refinery" else None
        ours = _side("refinery", db, args.memory_limit, args.profile) if args.only != "igraph" else None
        full = _side("full", db, args.memory_limit, args.profile) if args.full else None
    if base:
        print(f"igraph connected_components : {base['seconds']:8.2f} s  peak RSS {base['peak_rss_mib']:8.0f} MiB  "
              f"({base['components']:,} components)")
    if ours:
        print(f"refinery resolve_graph      : {ours['seconds']:8.2f} s  peak RSS {ours['peak_rss_mib']:8.0f} MiB  "
              f"({ours['profiles']:,} profiles, {ours['iterations']} SQL rounds, {ours['hubs']} hubs, "
              f"{ours['ambiguous']:,} ambiguous, {ours['profiles_with_two_user_ids']} profiles with two user ids)")
    if base and ours:
        print(f"ratio refinery / igraph     : {ours['seconds'] / base['seconds']:8.1f}x")
    if ours:
        ok_time, ok_mem = ours["seconds"] <= 60, ours["peak_rss_mib"] < 8 * 1024
        print(f"targets: <= 60 s {'met' if ok_time else 'MISSED'}; peak RSS < 8 GiB {'met' if ok_mem else 'MISSED'}")
    if full:
        print(f"refinery full path          : {full['seconds']:8.2f} s  peak RSS {full['peak_rss_mib']:8.0f} MiB  "
              f"({full['events']:,} events -> {full['profiles']:,} profiles; resolution alone {full['resolve_seconds']:.1f} s)")
    print(json.dumps({"shape": shape, "igraph": base, "refinery": ours, "full": full}))

if __name__ == "__main__":
    main()
