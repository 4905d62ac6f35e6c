"""The identity graph's semantics, in engine-portable SQL: from identifiers and edges to profiles.

Input (temporary tables): `_idr_ids(kind, value, first_seen)` — identifiers that are not blocked —
and `_idr_pairs(a_kind, a_value, b_kind, b_value)` — distinct edges. Output: `_idr_final(node,
kind, value, g, status, reason)` where `g` is the node that keys the identifier's profile, and
`_idr_refused(...)` — every merge or link the rules refused, with the rule.

The result is a function of those two sets only (docs/decisions/0006-identity-resolution.md):

1. Nodes are numbered by (first_seen, type priority, type, value): the smallest node of a profile is
   its oldest identifier, and keys the profile id.
2. An edge joining two values of an *exclusive* type (limit 1, e.g. two user ids: an alias between
   known users) is refused (`conflicting_<type>`).
3. A *hub* — an identifier adjacent to more than `hub_max_user_ids` values of an exclusive type
   (a kiosk's anonymous id, a shared inbox) — links nobody (`shared_identifier`).
4. Connected components of what remains: min-label propagation with pointer jumping, iterated in
   SQL to a fixpoint.
5. For each exclusive type, highest priority first, a component holding more than one of its values
   is split: each identifier joins the value nearest to it (multi-source breadth-first search,
   in SQL); an identifier equally near to two or more (a shared family laptop's cookie) joins
   neither (`ambiguous`, the refusal names the candidates); ambiguous identifiers that touch form
   groups of their own.
6. For types with a limit above one, a profile keeps its oldest `limit` values; the rest are
   detached (`limit_exceeded`).
7. A profile that would hold more than `max_merges_per_profile + 1` identifiers is not formed: its
   identifiers stay apart (`profile_too_large`).

`reference.py` implements the same semantics in plain Python; property tests compare the two.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlglot import exp

from refinery.identity import sql
from refinery.identity.rules import IdentityRules
from refinery.storage.engine import Engine


@dataclass
class GraphStats:
    nodes: int = 0
    edges: int = 0
    iterations: int = 0
    conflicts: int = 0
    hubs: int = 0
    ambiguous: int = 0
    detached: int = 0


def _rank(rules: IdentityRules) -> exp.Expression:
    return sql.case_map(exp.column("kind"), {t: i for i, t in enumerate(rules.priority)}, len(rules.priority))


def components(engine: Engine, edges: str, out: str) -> int:
    """Connected components of the directed-both-ways edge table `edges(src, dst)`: writes
    `out(node, l)` with l the smallest node of each node's component. Returns the iterations.

    Min-label propagation (each node takes the smallest label among itself and its neighbours),
    then pointer jumping (a node takes its label's label), until no label changes. Labels only
    decrease, so the sum of labels is an exact change detector.
    """
    e, o = exp.to_table(edges), exp.to_table(out)
    sql.run(engine, "CREATE OR REPLACE TEMP TABLE __out AS SELECT src AS node, least(src, min(dst)) AS l FROM __edges GROUP BY src",
            out=o, edges=e)
    previous = sql.scalar(engine, "SELECT sum(l) FROM __out", out=o)
    iterations = 0
    while True:
        iterations += 1
        sql.run(engine, """
            CREATE OR REPLACE TEMP TABLE _idr_step AS
            SELECT o.node, least(o.l, coalesce(m.m, o.l)) AS l
            FROM __out o LEFT JOIN (SELECT e.src, min(x.l) AS m FROM __edges e JOIN __out x ON x.node = e.dst GROUP BY e.src) m
              ON m.src = o.node
        """, out=o, edges=e)
        sql.run(engine, "CREATE OR REPLACE TEMP TABLE __out AS SELECT s.node, p.l FROM _idr_step s JOIN _idr_step p ON p.node = s.l",
                out=o)
        current = sql.scalar(engine, "SELECT sum(l) FROM __out", out=o)
        if current == previous:
            break
        previous = current
    sql.run(engine, "DROP TABLE _idr_step")
    return iterations


def resolve_graph(engine: Engine, rules: IdentityRules) -> GraphStats:
    """Run steps 1-7 of the module docstring over `_idr_ids` and `_idr_pairs`."""
    stats = GraphStats()
    exclusive = list(rules.exclusive_types)
    excl = [sql.lit(t) for t in exclusive]

    # 1. Nodes, numbered oldest first; edges as node pairs.
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_n AS
        SELECT row_number() OVER (ORDER BY first_seen, rank, kind, value) AS node, kind, value, rank
        FROM (SELECT kind, value, first_seen, __rank AS rank FROM _idr_ids) t
    """, rank=_rank(rules))
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_e AS
        SELECT DISTINCT least(na.node, nb.node) AS a, greatest(na.node, nb.node) AS b
        FROM _idr_pairs p
        JOIN _idr_n na ON na.kind = p.a_kind AND na.value = p.a_value
        JOIN _idr_n nb ON nb.kind = p.b_kind AND nb.value = p.b_value
        WHERE na.node <> nb.node
    """)
    stats.nodes = int(sql.scalar(engine, "SELECT count(*) FROM _idr_n"))
    stats.edges = int(sql.scalar(engine, "SELECT count(*) FROM _idr_e"))
    excl_list = exp.Array(expressions=excl) if excl else sql.template("CAST([] AS VARCHAR[])")

    # 2. Edges between two values of one exclusive type.
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_conflict AS
        SELECT e.a, e.b, 'conflicting_' || na.kind AS reason
        FROM _idr_e e JOIN _idr_n na ON na.node = e.a JOIN _idr_n nb ON nb.node = e.b
        WHERE na.kind = nb.kind AND list_contains(__excl, na.kind)
    """, excl=excl_list)
    # 3. Hubs: identifiers adjacent to too many values of one exclusive type.
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_hub AS
        SELECT node, max(k) AS kind_of_many, max(c) AS linked FROM (
            SELECT x.node, o.kind AS k, count(DISTINCT x.other) AS c
            FROM (SELECT a AS node, b AS other FROM _idr_e UNION ALL SELECT b, a FROM _idr_e) x
            JOIN _idr_n o ON o.node = x.other JOIN _idr_n s ON s.node = x.node
            WHERE list_contains(__excl, o.kind) AND NOT list_contains(__excl, s.kind)
            GROUP BY x.node, o.kind
        ) t WHERE c > __max GROUP BY node
    """, excl=excl_list, max=sql.lit(rules.hub_max_user_ids))
    stats.conflicts = int(sql.scalar(engine, "SELECT count(*) FROM _idr_conflict"))
    stats.hubs = int(sql.scalar(engine, "SELECT count(*) FROM _idr_hub"))

    # 4. Components over the usable edges (both directions).
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_d AS
        WITH usable AS (
            SELECT e.a, e.b FROM _idr_e e
            WHERE NOT EXISTS (SELECT 1 FROM _idr_conflict c WHERE c.a = e.a AND c.b = e.b)
              AND NOT EXISTS (SELECT 1 FROM _idr_hub h WHERE h.node = e.a)
              AND NOT EXISTS (SELECT 1 FROM _idr_hub h WHERE h.node = e.b)
        )
        SELECT a AS src, b AS dst FROM usable UNION ALL SELECT b AS src, a AS dst FROM usable
    """)
    stats.iterations = components(engine, "_idr_d", "_idr_cc")
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_g AS
        SELECT n.node, coalesce(c.l, n.node) AS g FROM _idr_n n LEFT JOIN _idr_cc c ON c.node = n.node
    """)
    sql.run(engine, "CREATE OR REPLACE TEMP TABLE _idr_amb (node BIGINT, reason VARCHAR, candidates BIGINT[])")

    # 5. Split components holding two values of an exclusive type, highest priority first.
    for kind in exclusive:
        stats.iterations += _split(engine, kind)
    stats.ambiguous = int(sql.scalar(engine, "SELECT count(*) FROM _idr_amb"))

    # 6. Limits above one: keep the oldest `limit` values of the type per profile.
    sql.run(engine, "CREATE OR REPLACE TEMP TABLE _idr_detached (node BIGINT, reason VARCHAR, g BIGINT)")
    for kind, limit in sorted(rules.capped_types.items()):
        sql.run(engine, """
            INSERT INTO _idr_detached
            SELECT node, 'limit_exceeded', g FROM (
                SELECT g.node, g.g, row_number() OVER (PARTITION BY g.g ORDER BY g.node) AS k
                FROM _idr_g g JOIN _idr_n n ON n.node = g.node WHERE n.kind = __kind
            ) t WHERE k > __limit
        """, kind=sql.lit(kind), limit=sql.lit(limit))
    # 7. The merge cap: a profile larger than max_merges + 1 identifiers is not formed.
    sql.run(engine, """
        INSERT INTO _idr_detached
        SELECT g.node, 'profile_too_large', g.g FROM _idr_g g
        WHERE g.g IN (SELECT g FROM _idr_g GROUP BY g HAVING count(*) > __cap)
          AND g.node NOT IN (SELECT node FROM _idr_detached)
    """, cap=sql.lit(rules.max_merges_per_profile + 1))
    stats.detached = int(sql.scalar(engine, "SELECT count(*) FROM _idr_detached"))

    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_final AS
        SELECT n.node, n.kind, n.value,
               CASE WHEN d.node IS NOT NULL THEN n.node ELSE g.g END AS g,
               CASE WHEN h.node IS NOT NULL THEN 'shared' WHEN d.node IS NOT NULL THEN 'detached'
                    WHEN a.node IS NOT NULL THEN 'ambiguous' ELSE 'linked' END AS status,
               CASE WHEN h.node IS NOT NULL THEN 'shared_identifier' WHEN d.node IS NOT NULL THEN d.reason
                    WHEN a.node IS NOT NULL THEN a.reason END AS reason
        FROM _idr_n n JOIN _idr_g g ON g.node = n.node
        LEFT JOIN _idr_hub h ON h.node = n.node
        LEFT JOIN _idr_detached d ON d.node = n.node
        LEFT JOIN (SELECT node, min(reason) AS reason FROM _idr_amb GROUP BY node) a ON a.node = n.node
    """)
    return stats


def _split(engine: Engine, kind: str) -> int:
    """Step 5 for one exclusive type; returns the breadth-first rounds it took."""
    k = sql.lit(kind)
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_cg AS
        SELECT g.g FROM _idr_g g JOIN _idr_n n ON n.node = g.node WHERE n.kind = __kind GROUP BY g.g HAVING count(*) > 1
    """, kind=k)
    if not sql.scalar(engine, "SELECT count(*) FROM _idr_cg"):
        return 0
    # Usable edges inside conflicted components (never across: earlier splits stand).
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_sub AS
        SELECT d.src, d.dst, gs.g FROM _idr_d d
        JOIN _idr_g gs ON gs.node = d.src JOIN _idr_g gd ON gd.node = d.dst
        WHERE gs.g = gd.g AND gs.g IN (SELECT g FROM _idr_cg)
    """)
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_reach AS
        SELECT g.node, g.node AS anchor, 0 AS dist FROM _idr_g g JOIN _idr_n n ON n.node = g.node
        WHERE n.kind = __kind AND g.g IN (SELECT g FROM _idr_cg)
    """, kind=k)
    rounds = 0
    while True:
        sql.run(engine, """
            INSERT INTO _idr_reach
            SELECT DISTINCT s.dst, r.anchor, __d + 1 FROM _idr_reach r JOIN _idr_sub s ON s.src = r.node
            WHERE r.dist = __d AND s.dst NOT IN (SELECT node FROM _idr_reach)
        """, d=sql.lit(rounds))
        rounds += 1
        if not sql.scalar(engine, "SELECT count(*) FROM _idr_reach WHERE dist = __d", d=sql.lit(rounds)):
            break
    # Nearest anchor, or ambiguous (several at the same distance, or none).
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_asg AS
        SELECT g.node, g.g, r.anchor, r.candidates
        FROM _idr_g g JOIN _idr_cg c ON c.g = g.g
        LEFT JOIN (SELECT node, CASE WHEN count(DISTINCT anchor) = 1 THEN min(anchor) END AS anchor,
                          list(DISTINCT anchor ORDER BY anchor) AS candidates
                   FROM _idr_reach GROUP BY node) r ON r.node = g.node
    """)
    sql.run(engine, """
        INSERT INTO _idr_amb SELECT node, __reason, coalesce(candidates, CAST([] AS BIGINT[])) FROM _idr_asg WHERE anchor IS NULL
    """, reason=sql.lit(f"conflicting_{kind}"))
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_ambd AS
        SELECT s.src, s.dst FROM _idr_sub s
        JOIN _idr_asg x ON x.node = s.src JOIN _idr_asg y ON y.node = s.dst
        WHERE x.anchor IS NULL AND y.anchor IS NULL
    """)
    components(engine, "_idr_ambd", "_idr_ambcc")
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_newg AS
        SELECT a.node, CASE WHEN a.anchor IS NOT NULL THEN min(a.node) OVER (PARTITION BY a.anchor)
                            ELSE coalesce(c.l, a.node) END AS g
        FROM _idr_asg a LEFT JOIN _idr_ambcc c ON c.node = a.node
    """)
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_g AS
        SELECT g.node, coalesce(n.g, g.g) AS g FROM _idr_g g LEFT JOIN _idr_newg n ON n.node = g.node
    """)
    for t in ("_idr_sub", "_idr_reach", "_idr_asg", "_idr_ambd", "_idr_ambcc", "_idr_newg", "_idr_cg"):
        sql.run(engine, "DROP TABLE __t", t=exp.to_table(t))
    return rounds
