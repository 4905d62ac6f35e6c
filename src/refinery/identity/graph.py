"""The identity graph's semantics, in engine-portable SQL: from identifiers and edges to profiles.

Input (temporary tables): `_idr_ids(kind, value, first_seen)` — identifiers that are not blocked —
and `_idr_pairs(a_kind, a_value, b_kind, b_value)` — distinct edges, each unordered pair once (the
stars of `resolve.py` give that). Output: `_idr_final(node, g, status, reason, profile_id)` where
`g` is the node that keys the identifier's profile, `_idr_n(node, kind, value, rank, first_seen)`
(`node_id(kind, value, stats.salt)` finds a node from its text), and the refusals with their rule:
`_idr_conflict`, `_idr_hub`, `_idr_amb`, `_idr_detached`.

The result is a function of those two sets only (docs/decisions/0006-identity-resolution.md):

1. Identifiers are ordered by (first_seen, type priority, type, value): a profile is keyed by its
   oldest identifier in that order. (Node ids are 63-bit hashes of (type, value), checked for
   collisions; they only name nodes, the order above decides.)
2. An edge joining two values of an *exclusive* type (limit 1, e.g. two user ids: an alias between
   known users) is refused (`conflicting_<type>`).
3. A *hub* — an identifier adjacent to more than `hub_max_user_ids` values of an exclusive type
   (a kiosk's anonymous id, a shared inbox) — links nobody (`shared_identifier`).
4. Connected components of what remains (in SQL: smallest-neighbour labels with pointer jumping,
   then the edges whose ends still disagree contracted into a graph of labels, recursively).
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

#: Salts tried, in order, for the 64-bit node ids (a collision between two identifiers, about one
#: chance in 10^5 at 10 million identifiers, is detected and the next salt is used).
_SALTS: tuple[str, ...] = ("", "refinery-1", "refinery-2", "refinery-3")


@dataclass
class GraphStats:
    nodes: int = 0
    edges: int = 0
    iterations: int = 0
    conflicts: int = 0
    hubs: int = 0
    ambiguous: int = 0
    detached: int = 0
    salt: str = ""


def _rank(rules: IdentityRules) -> exp.Expression:
    return _rank_of(rules, exp.column("kind"))


def _rank_of(rules: IdentityRules, kind: exp.Expression) -> exp.Expression:
    """The type's priority rank (0 = highest; unlisted types share the last rank)."""
    return sql.case_map(kind, {t: i for i, t in enumerate(rules.priority)}, len(rules.priority))


def node_id(kind: exp.Expression, value: exp.Expression, salt: str = "") -> exp.Expression:
    """The node id of an identifier: a 63-bit hash of (type, value[, salt]), as BIGINT."""
    args = [kind, value] + ([sql.lit(salt)] if salt else [])
    shifted = exp.BitwiseRightShift(this=exp.Anonymous(this="hash", expressions=args), expression=sql.lit(1))
    return exp.cast(exp.Paren(this=shifted), exp.DataType.build("BIGINT"))


def profile_id_of(key: exp.Expression) -> exp.Expression:
    """A profile's id from its oldest identifier `key` = type ':' value: `prof_` + 24 hex of md5(key)."""
    return sql.template("'prof_' || left(md5(__k), 24)", k=key)


def components(engine: Engine, edges: str, out: str, *, _depth: int = 0) -> int:
    """Connected components of the undirected edge table `edges(src, dst)` (either orientation,
    duplicates allowed): writes `out(node, l)` with l the smallest node of the node's component,
    for every node that has an edge to a smaller node or is the label of one (a node missing from
    `out` is the smallest of its component). Returns the rounds (contraction levels) it took.

    One round: each node takes the smallest of itself and its smaller neighbours, then the label of
    its label (pointer jumping). Stars and small trees are then done. The edges whose ends still
    disagree, written as edges between their labels, form a much smaller graph, solved the same way;
    its labels map back. Every label is a node of the same component, and the component's smallest
    node labels itself, so the result is exact.
    """
    e, o = exp.to_table(edges), exp.to_table(out)
    lab, lab2, x, sub = (exp.to_table(f"_idr_cc{_depth}_{n}") for n in ("lab", "lab2", "x", "sub"))
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE __lab AS
        SELECT greatest(src, dst) AS node, min(least(src, dst)) AS l FROM __edges WHERE src <> dst GROUP BY 1
    """, lab=lab, edges=e)
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE __lab2 AS
        SELECT s.node, coalesce(p.l, s.l) AS l FROM __lab s LEFT JOIN __lab p ON p.node = s.l
    """, lab=lab, lab2=lab2)
    sql.run(engine, "DROP TABLE __lab", lab=lab)
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE __x AS
        SELECT DISTINCT least(la, lb) AS src, greatest(la, lb) AS dst FROM (
            SELECT coalesce(p.l, e.src) AS la, coalesce(q.l, e.dst) AS lb
            FROM __edges e LEFT JOIN __lab2 p ON p.node = e.src LEFT JOIN __lab2 q ON q.node = e.dst
        ) t WHERE la <> lb
    """, x=x, edges=e, lab2=lab2)
    if not sql.scalar(engine, "SELECT count(*) FROM __x", x=x):
        sql.run(engine, "CREATE OR REPLACE TEMP TABLE __out AS SELECT node, l FROM __lab2", out=o, lab2=lab2)
        for t in (lab2, x):
            sql.run(engine, "DROP TABLE __t", t=t)
        return 1
    rounds = components(engine, x.name, sub.name, _depth=_depth + 1)
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE __out AS
        SELECT a.node, coalesce(s.l, a.l) AS l FROM __lab2 a LEFT JOIN __sub s ON s.node = a.l
        UNION ALL
        SELECT s.node, s.l FROM __sub s WHERE s.node NOT IN (SELECT node FROM __lab2)
    """, out=o, lab2=lab2, sub=sub)
    for t in (lab2, x, sub):
        sql.run(engine, "DROP TABLE __t", t=t)
    return rounds + 1


def _number(engine: Engine, rules: IdentityRules) -> tuple[int, str]:
    """`_idr_n(node, kind, value, rank, first_seen)` with node = a hash of (kind, value), unique:
    two identifiers with one id (about one chance in 10^5 at 10 million identifiers) are detected,
    and the next salt is used. Returns the node count and the salt."""
    for salt in _SALTS:
        sql.run(engine, """
            CREATE OR REPLACE TEMP TABLE _idr_n AS
            SELECT __node AS node, kind, value, __rank AS rank, first_seen FROM _idr_ids
        """, node=node_id(exp.column("kind"), exp.column("value"), salt), rank=_rank(rules))
        n, distinct = engine.fetch_all(sql.template("SELECT count(*), count(DISTINCT node) FROM _idr_n"))[0]
        if n == distinct:
            return int(n), salt
    raise RuntimeError("identity graph: node ids collide under every salt; this should not happen")  # pragma: no cover


def resolve_graph(engine: Engine, rules: IdentityRules) -> GraphStats:
    """Run steps 1-7 of the module docstring over `_idr_ids` and `_idr_pairs`."""
    stats = GraphStats()
    exclusive = list(rules.exclusive_types)

    # 1. Nodes (a hash of type and value); edges as node pairs with their types, each once.
    stats.nodes, stats.salt = _number(engine, rules)
    na = node_id(exp.column("a_kind"), exp.column("a_value"), stats.salt)
    nb = node_id(exp.column("b_kind"), exp.column("b_value"), stats.salt)
    # Exclusive types are listed in the priority, so each has a rank of its own.
    excl_ranks = [sql.lit(rules.rank(t)) for t in exclusive]
    ranks = exp.Array(expressions=excl_ranks) if excl_ranks else sql.template("CAST([] AS INTEGER[])")
    kind_of_rank = exp.Case(this=exp.column("r"), ifs=[exp.If(this=sql.lit(rules.rank(t)), true=sql.lit(t)) for t in exclusive])
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_e AS
        SELECT a, b, ak, bk, ar, br, list_contains(__ranks, ar) AS ax, list_contains(__ranks, br) AS bx FROM (
            SELECT CASE WHEN na < nb THEN na ELSE nb END AS a, CASE WHEN na < nb THEN nb ELSE na END AS b,
                   CASE WHEN na < nb THEN a_kind ELSE b_kind END AS ak, CASE WHEN na < nb THEN b_kind ELSE a_kind END AS bk,
                   CASE WHEN na < nb THEN ra ELSE rb END AS ar, CASE WHEN na < nb THEN rb ELSE ra END AS br
            FROM (SELECT __na AS na, __nb AS nb, a_kind, b_kind, __ra AS ra, __rb AS rb FROM _idr_pairs) p
            WHERE na <> nb
        ) t
    """, na=na, nb=nb, ranks=ranks, ra=_rank_of(rules, exp.column("a_kind")), rb=_rank_of(rules, exp.column("b_kind")))
    stats.edges = int(sql.scalar(engine, "SELECT count(*) FROM _idr_e"))

    # 2. Edges between two values of one exclusive type (older identifier first).
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_conflict AS
        SELECT CASE WHEN older THEN a ELSE b END AS a, CASE WHEN older THEN b ELSE a END AS b, reason FROM (
            SELECT e.a, e.b, 'conflicting_' || e.ak AS reason,
                   ROW(x.first_seen, x.rank, x.kind, x.value) < ROW(y.first_seen, y.rank, y.kind, y.value) AS older
            FROM _idr_e e JOIN _idr_n x ON x.node = e.a JOIN _idr_n y ON y.node = e.b
            WHERE e.ax AND e.bx AND e.ak = e.bk
        ) t
    """)
    # 3. Hubs: identifiers adjacent to too many values of one exclusive type.
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_hub AS
        SELECT node, max(__kind) AS kind_of_many, max(c) AS linked FROM (
            SELECT node, r, count(*) AS c FROM (
                SELECT a AS node, br AS r FROM _idr_e WHERE bx AND NOT ax
                UNION ALL
                SELECT b AS node, ar AS r FROM _idr_e WHERE ax AND NOT bx
            ) x GROUP BY node, r
        ) t WHERE c > __max GROUP BY node
    """, kind=kind_of_rank, max=sql.lit(rules.hub_max_user_ids))
    stats.conflicts = int(sql.scalar(engine, "SELECT count(*) FROM _idr_conflict"))
    stats.hubs = int(sql.scalar(engine, "SELECT count(*) FROM _idr_hub"))

    # 4. Components over the usable edges.
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_d AS
        SELECT a AS src, b AS dst FROM _idr_e
        WHERE NOT (ax AND bx AND ak = bk)
          AND a NOT IN (SELECT node FROM _idr_hub) AND b NOT IN (SELECT node FROM _idr_hub)
    """)
    stats.iterations = components(engine, "_idr_d", "_idr_cc")
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_g AS
        SELECT n.node, n.rank, n.first_seen, coalesce(c.l, n.node) AS g FROM _idr_n n LEFT JOIN _idr_cc c ON c.node = n.node
    """)
    sql.run(engine, "CREATE OR REPLACE TEMP TABLE _idr_amb (node BIGINT, reason VARCHAR, candidates BIGINT[])")

    # 5. Split components holding two values of an exclusive type, highest priority first.
    for kind in exclusive:
        stats.iterations += _split(engine, kind, rules.rank(kind))
    stats.ambiguous = int(sql.scalar(engine, "SELECT count(*) FROM _idr_amb"))

    # 6. Limits above one: keep the oldest `limit` values of the type per profile.
    sql.run(engine, "CREATE OR REPLACE TEMP TABLE _idr_detached (node BIGINT, reason VARCHAR, g BIGINT)")
    for kind, limit in sorted(rules.capped_types.items()):
        sql.run(engine, """
            INSERT INTO _idr_detached
            SELECT node, 'limit_exceeded', g FROM (
                SELECT g.node, g.g, row_number() OVER (PARTITION BY g.g ORDER BY n.first_seen, n.rank, n.kind, n.value) AS k
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
    if stats.detached:
        # `g` of a detached identifier: the oldest identifier of the profile it would have joined.
        sql.run(engine, """
            CREATE OR REPLACE TEMP TABLE _idr_dkey AS
            SELECT g.g AS label, arg_min(n.node, (n.first_seen, n.rank, n.kind, n.value)) AS key
            FROM _idr_g g JOIN _idr_n n ON n.node = g.node WHERE g.g IN (SELECT g FROM _idr_detached) GROUP BY g.g
        """)
        sql.run(engine, "UPDATE _idr_detached SET g = k.key FROM _idr_dkey k WHERE _idr_detached.g = k.label")
        sql.run(engine, "DROP TABLE _idr_dkey")

    # Group labels so far are arbitrary members; a profile is keyed by its oldest identifier.
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_fg AS
        SELECT g.node, g.rank, g.first_seen, CASE WHEN d.node IS NOT NULL THEN g.node ELSE g.g END AS fg,
               CASE WHEN h.node IS NOT NULL THEN 'shared' WHEN d.node IS NOT NULL THEN 'detached'
                    WHEN a.node IS NOT NULL THEN 'ambiguous' ELSE 'linked' END AS status,
               CASE WHEN h.node IS NOT NULL THEN 'shared_identifier' WHEN d.node IS NOT NULL THEN d.reason
                    WHEN a.node IS NOT NULL THEN a.reason END AS reason
        FROM _idr_g g
        LEFT JOIN _idr_hub h ON h.node = g.node
        LEFT JOIN _idr_detached d ON d.node = g.node
        LEFT JOIN (SELECT node, min(reason) AS reason FROM _idr_amb GROUP BY node) a ON a.node = g.node
    """)
    # The oldest: earliest (first_seen, priority); ties there (rare) are broken by type and value.
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_key AS
        SELECT fg, arg_min(node, (first_seen, rank, node)) AS g, arg_min(node, (first_seen, rank, -node)) AS g2
        FROM _idr_fg GROUP BY fg
    """)
    if sql.scalar(engine, "SELECT count(*) FROM _idr_key WHERE g <> g2"):
        sql.run(engine, """
            UPDATE _idr_key SET g = t.g FROM (
                SELECT f.fg, arg_min(f.node, (n.kind, n.value)) AS g
                FROM _idr_fg f JOIN _idr_key k ON k.fg = f.fg AND k.g <> k.g2
                JOIN _idr_fg m ON m.node = k.g
                JOIN _idr_n n ON n.node = f.node
                WHERE f.first_seen = m.first_seen AND f.rank = m.rank
                GROUP BY f.fg
            ) t WHERE _idr_key.fg = t.fg
        """)
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_pid AS
        SELECT k.fg, k.g, __pid AS profile_id FROM _idr_key k JOIN _idr_n n ON n.node = k.g
    """, pid=profile_id_of(sql.template("n.kind || ':' || n.value")))
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_final AS
        SELECT f.node, k.g, f.status, f.reason, k.profile_id FROM _idr_fg f JOIN _idr_pid k ON k.fg = f.fg
    """)
    sql.run(engine, "DROP TABLE _idr_pid")
    sql.run(engine, "DROP TABLE _idr_fg")
    sql.run(engine, "DROP TABLE _idr_key")
    return stats


def _split(engine: Engine, kind: str, rank: int) -> int:
    """Step 5 for one exclusive type (of priority `rank`); returns the breadth-first rounds it took."""
    k, r = sql.lit(kind), sql.lit(rank)
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_cg AS
        SELECT g FROM _idr_g WHERE rank = __rank GROUP BY g HAVING count(*) > 1
    """, rank=r)
    if not sql.scalar(engine, "SELECT count(*) FROM _idr_cg"):
        sql.run(engine, "DROP TABLE _idr_cg")
        return 0
    sql.run(engine, "CREATE OR REPLACE TEMP TABLE _idr_cn AS SELECT node, rank, g FROM _idr_g WHERE g IN (SELECT g FROM _idr_cg)")
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_anchor AS
        SELECT n.node, n.first_seen, n.rank, n.kind, n.value FROM _idr_n n
        WHERE n.kind = __kind AND n.node IN (SELECT node FROM _idr_cn WHERE rank = __rank)
    """, kind=k, rank=r)
    # Usable edges inside conflicted components (never across: earlier splits stand), both ways.
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_sub AS
        WITH s AS (
            SELECT d.src, d.dst FROM _idr_d d JOIN _idr_cn gs ON gs.node = d.src JOIN _idr_cn gd ON gd.node = d.dst
            WHERE gs.g = gd.g
        )
        SELECT src, dst FROM s UNION ALL SELECT dst, src FROM s
    """)
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_reach AS
        SELECT node, node AS anchor, 0 AS dist FROM _idr_anchor
    """)
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
    # Nearest anchor, or ambiguous (several at the same distance, or none); candidates oldest first.
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_asg AS
        WITH r0 AS (SELECT node, CASE WHEN count(DISTINCT anchor) = 1 THEN min(anchor) END AS anchor FROM _idr_reach GROUP BY node)
        SELECT c.node, c.g, r0.anchor, r.candidates
        FROM _idr_cn c
        LEFT JOIN r0 ON r0.node = c.node
        LEFT JOIN (SELECT r.node, list(r.anchor ORDER BY a.first_seen, a.rank, a.kind, a.value) AS candidates
                   FROM (SELECT DISTINCT node, anchor FROM _idr_reach WHERE node IN (SELECT node FROM r0 WHERE anchor IS NULL)) r
                   JOIN _idr_anchor a ON a.node = r.anchor
                   GROUP BY r.node) r ON r.node = c.node
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
        SELECT a.node, CASE WHEN a.anchor IS NOT NULL THEN a.anchor ELSE coalesce(c.l, a.node) END AS g
        FROM _idr_asg a LEFT JOIN _idr_ambcc c ON c.node = a.node
    """)
    sql.run(engine, "UPDATE _idr_g SET g = n.g FROM _idr_newg n WHERE _idr_g.node = n.node AND _idr_g.g <> n.g")
    for t in ("_idr_sub", "_idr_reach", "_idr_asg", "_idr_ambd", "_idr_ambcc", "_idr_newg", "_idr_cg", "_idr_cn", "_idr_anchor"):
        sql.run(engine, "DROP TABLE __t", t=exp.to_table(t))
    return rounds
