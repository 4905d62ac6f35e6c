"""A dry run of changed identity rules: resolve history with the rules in force and with the new
rules, into temporary tables only, and say which profiles would merge or split.

`plan(engine, current, proposed)` runs inside the writer (the temporary tables live on its
connection) and writes nothing to the store: it builds the graph twice and compares the two
partitions by their identifiers. Overrides apply to both runs, as they would after the change.
"""

from __future__ import annotations

import time
from typing import Any

from sqlglot import exp

from refinery.identity import sql
from refinery.identity.graph import resolve_graph
from refinery.identity.resolve import assign_profile_ids, build_inputs, drop_temp_tables
from refinery.identity.rules import IdentityRules
from refinery.storage.engine import Engine

_PLAN_TABLES = ("_idp_cur", "_idp_new", "_idp_blk_cur", "_idp_blk_new")


def _snapshot(engine: Engine, rules: IdentityRules, table: str, blocked: str) -> dict[str, int]:
    build_inputs(engine, rules)
    stats = resolve_graph(engine, rules)
    assign_profile_ids(engine)
    assert table in _PLAN_TABLES and blocked in _PLAN_TABLES  # constant names chosen above; no user text
    sql.run(engine, "CREATE OR REPLACE TEMP TABLE __t AS SELECT kind, value, profile_id, status, reason FROM _idr_prof", t=exp.to_table(table))
    sql.run(engine, "CREATE OR REPLACE TEMP TABLE __t AS SELECT kind, value, reason FROM _idr_idstats WHERE reason IS NOT NULL",
            t=exp.to_table(blocked))
    drop_temp_tables(engine)
    return {"identifiers": stats.nodes, "edges": stats.edges, "hubs": stats.hubs, "ambiguous": stats.ambiguous,
            "detached": stats.detached, "conflicts": stats.conflicts}


def _members(engine: Engine, table: str, profile_id: str, limit: int) -> list[dict[str, str]]:
    rows = engine.fetch_all(f"SELECT kind, value FROM {table} WHERE profile_id = ? ORDER BY kind, value LIMIT ?",  # noqa: S608
                            [profile_id, limit])
    return [{"type": k, "value": v} for k, v in rows]


def plan(engine: Engine, current: IdentityRules, proposed: IdentityRules, *, examples: int = 5, members: int = 8) -> dict[str, Any]:
    """What `proposed` would change against `current`, on the same history (call inside the writer)."""
    t0 = time.perf_counter()
    try:
        before = _snapshot(engine, current, "_idp_cur", "_idp_blk_cur")
        after = _snapshot(engine, proposed, "_idp_new", "_idp_blk_new")
        return _compare(engine, before, after, examples, members, time.perf_counter() - t0)
    finally:
        drop_temp_tables(engine)
        for t in _PLAN_TABLES:
            engine.execute(f"DROP TABLE IF EXISTS {t}")


def _compare(engine: Engine, before: dict[str, int], after: dict[str, int], examples: int, members: int, seconds: float) -> dict[str, Any]:
    # A merge: a proposed profile holding identifiers of two or more current profiles.
    merges = engine.fetch_all("""
        SELECT n.profile_id, list(DISTINCT c.profile_id ORDER BY c.profile_id) AS parts, count(*) AS ids
        FROM _idp_new n JOIN _idp_cur c ON c.kind = n.kind AND c.value = n.value
        GROUP BY n.profile_id HAVING count(DISTINCT c.profile_id) > 1 ORDER BY count(DISTINCT c.profile_id) DESC, n.profile_id
    """)
    # A split: a current profile whose identifiers (those still in the graph) end up in two or more proposed profiles.
    splits = engine.fetch_all("""
        SELECT c.profile_id, list(DISTINCT n.profile_id ORDER BY n.profile_id) AS parts, count(*) AS ids
        FROM _idp_cur c JOIN _idp_new n ON n.kind = c.kind AND n.value = c.value
        GROUP BY c.profile_id HAVING count(DISTINCT n.profile_id) > 1 ORDER BY count(DISTINCT n.profile_id) DESC, c.profile_id
    """)
    newly_blocked = engine.fetch_all("""
        SELECT b.reason, count(*) FROM _idp_blk_new b
        WHERE NOT EXISTS (SELECT 1 FROM _idp_blk_cur a WHERE a.kind = b.kind AND a.value = b.value) GROUP BY 1 ORDER BY 1
    """)
    unblocked = engine.fetch_all("""
        SELECT a.reason, count(*) FROM _idp_blk_cur a
        WHERE NOT EXISTS (SELECT 1 FROM _idp_blk_new b WHERE a.kind = b.kind AND a.value = b.value) GROUP BY 1 ORDER BY 1
    """)
    moved = engine.fetch_all("""
        SELECT count(*) FROM _idp_cur c JOIN _idp_new n ON n.kind = c.kind AND n.value = c.value
        WHERE c.status <> n.status OR c.reason IS DISTINCT FROM n.reason
    """)[0][0]
    stale = engine.fetch_all("""
        SELECT count(*) FROM _idp_cur c LEFT JOIN identities i ON i.identifier_type = c.kind AND i.value = c.value
        WHERE i.profile_id IS DISTINCT FROM c.profile_id
    """)[0][0]
    profiles = engine.fetch_all("SELECT (SELECT count(DISTINCT profile_id) FROM _idp_cur), (SELECT count(DISTINCT profile_id) FROM _idp_new)")[0]
    return {
        "profiles": {"current": int(profiles[0]), "proposed": int(profiles[1])},
        "merges": len(merges),
        "splits": len(splits),
        "identifiers_changing_status": int(moved),
        "newly_blocked": {str(r): int(n) for r, n in newly_blocked},
        "unblocked": {str(r): int(n) for r, n in unblocked},
        "merge_examples": [
            {"profile_id": pid, "from_profiles": [{"profile_id": p, "identifiers": _members(engine, "_idp_cur", p, members)} for p in parts],
             "identifiers": int(n)}
            for pid, parts, n in merges[:examples]
        ],
        "split_examples": [
            {"profile_id": pid, "into_profiles": [
                {"profile_id": p, "identifiers": _members(engine, "_idp_new", p, members)} for p in parts],
             "identifiers": int(n)}
            for pid, parts, n in splits[:examples]
        ],
        "graph": {"current": before, "proposed": after},
        "stored_differs": int(stale),
        "seconds": round(seconds, 3),
    }
