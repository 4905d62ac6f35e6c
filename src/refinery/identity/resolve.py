"""Full resolution: events -> identifiers and edges -> profiles, written to the identity tables.

`resolve(engine, rules)` runs inside one writer transaction (`runtime.writer.call`). It rebuilds
`identities`, `identity_edges` and `identity_blocked` from the clean zone, which makes a re-run on
the same data a no-op, and appends to `profile_merges` only what changed since the previous run:
a profile id that no longer exists because its identifiers now belong to an older profile was
merged into it (with the edge that joined them as evidence); a merged id that exists again (the
merge was split apart by a rule or a removed edge) has its merge marked undone.

Profile ids: `prof_` + 24 hex of md5(type ':' value) of the profile's oldest identifier (smallest
first_seen, then type priority, type, value). The partition and the ids are therefore a function
of the set of events alone, in any order; an id survives new data as long as that identifier stays
the oldest in its profile. See docs/decisions/0006-identity-resolution.md.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlglot import exp

from refinery.identity import overrides as ov
from refinery.identity import sql
from refinery.identity.extract import extract
from refinery.identity.graph import GraphStats, node_id, resolve_graph
from refinery.identity.rules import IdentityRules
from refinery.storage.engine import Engine

_TEMP_TABLES = (
    "_idr_occ", "_idr_idstats", "_idr_ids", "_idr_star", "_idr_edges_full", "_idr_pairs", "_idr_n", "_idr_e", "_idr_conflict",
    "_idr_hub", "_idr_d", "_idr_cc", "_idr_g", "_idr_amb", "_idr_detached", "_idr_final", "_idr_prev", "_idr_mcand",
    "_idr_ovm", "_idr_cut",
)


@dataclass
class ResolveReport:
    resolution_id: str
    identifiers: int
    blocked_identifiers: int
    edges: int
    profiles: int
    merges: int
    unmerges: int
    blocked: int
    iterations: int
    graph: dict[str, int]
    blocked_by_reason: dict[str, int]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_inputs(engine: Engine, rules: IdentityRules, *, overrides: bool = True) -> None:
    """Identifier statistics, edges with their first evidence, and the graph's input tables.

    With `overrides`, the user's active removals and splits (`identity/overrides.py`) apply: removed
    identifiers are blocked, removed and split edges are left out of `_idr_pairs` (`_idr_cut`).
    """
    extract(engine, rules)
    active = overrides and ov.load(engine) > 0
    if active:
        ov.block_identifiers(engine)
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_idstats AS
        SELECT kind, value, first_seen, last_seen, n, message_id AS first_message_id, source AS first_source, reason FROM (
            SELECT kind, value, message_id, source, reason,
                   min(ts) OVER (PARTITION BY kind, value) AS first_seen,
                   max(ts) OVER (PARTITION BY kind, value) AS last_seen,
                   count(*) OVER (PARTITION BY kind, value) AS n,
                   row_number() OVER (PARTITION BY kind, value ORDER BY ts, source, message_id) AS rn
            FROM _idr_occ
        ) t WHERE rn = 1
    """)
    sql.run(engine, "CREATE OR REPLACE TEMP TABLE _idr_ids AS SELECT kind, value, first_seen FROM _idr_idstats WHERE reason IS NULL")
    # Each event links its identifiers as a star around the highest-priority one.
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_star AS
        SELECT source, message_id, ts, rule, kind, value,
               row_number() OVER (PARTITION BY source, message_id ORDER BY rank, kind, value) AS pos
        FROM (SELECT DISTINCT source, message_id, ts, rule, kind, value, __rank AS rank FROM _idr_occ WHERE reason IS NULL) t
    """, rank=sql.case_map(exp.column("kind"), {t: i for i, t in enumerate(rules.priority)}, len(rules.priority)))
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_edges_full AS
        SELECT a_kind, a_value, b_kind, b_value, rule, message_id, source, event_time, last_seen, n FROM (
            SELECT c.kind AS a_kind, c.value AS a_value, o.kind AS b_kind, o.value AS b_value, o.rule, o.message_id, o.source,
                   min(o.ts) OVER w AS event_time, max(o.ts) OVER w AS last_seen, count(*) OVER w AS n,
                   row_number() OVER (PARTITION BY c.kind, c.value, o.kind, o.value ORDER BY o.ts, o.source, o.message_id) AS rn
            FROM _idr_star c JOIN _idr_star o ON o.source = c.source AND o.message_id = c.message_id
            WHERE c.pos = 1 AND o.pos > 1
            WINDOW w AS (PARTITION BY c.kind, c.value, o.kind, o.value)
        ) t WHERE rn = 1
    """)
    if active:
        ov.cut_edges(engine)
    else:
        engine.execute(ov.EMPTY_CUT)
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_pairs AS
        SELECT a_kind, a_value, b_kind, b_value FROM _idr_edges_full e
        WHERE NOT EXISTS (SELECT 1 FROM _idr_cut c WHERE c.a_kind = e.a_kind AND c.a_value = e.a_value
                                                   AND c.b_kind = e.b_kind AND c.b_value = e.b_value)
    """)


def assign_profile_ids(engine: Engine) -> None:
    """`_idr_prof(kind, value, profile_id, status, reason, node, g)`: the graph's result with the
    identifiers' text (a view, for readers; the writes below join on node ids)."""
    sql.run(engine, """
        CREATE OR REPLACE TEMP VIEW _idr_prof AS
        SELECT n.kind, n.value, f.profile_id, f.status, f.reason, f.node, f.g FROM _idr_final f JOIN _idr_n n ON n.node = f.node
    """)


def resolve(engine: Engine, rules: IdentityRules, *, now: datetime | None = None, keep_occurrences: bool = False) -> ResolveReport:
    """Full resolution over the clean zone (see the module docstring). Call inside the writer.

    `keep_occurrences` leaves `_idr_occ` (every event's identifiers, as resolution saw them) for the
    profile build that follows in the same transaction (`profiles.build`), which then need not
    extract them again.
    """
    started = now or datetime.now(UTC)
    clock = datetime.now(UTC)
    resolution_id = "res_" + uuid.uuid4().hex[:16]
    build_inputs(engine, rules)
    stats = resolve_graph(engine, rules)
    assign_profile_ids(engine)
    merges, unmerges = _write(engine, resolution_id, started, stats.salt)
    report = _report(engine, resolution_id, stats, merges, unmerges, (datetime.now(UTC) - clock).total_seconds())
    engine.execute(
        "INSERT INTO identity_resolutions VALUES (?, 'full', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [resolution_id, json.dumps(rules.to_dict()), started, datetime.now(UTC), report.identifiers, report.edges,
         report.profiles, merges, unmerges, report.blocked, report.iterations],
    )
    drop_temp_tables(engine, keep=("_idr_occ",) if keep_occurrences else ())
    return report


def drop_temp_tables(engine: Engine, keep: tuple[str, ...] = ()) -> None:
    engine.execute("DROP VIEW IF EXISTS _idr_prof")
    for t in _TEMP_TABLES:
        if t in keep:
            continue
        engine.execute(f"DROP TABLE IF EXISTS {t}")  # constant names, no user text


def _write(engine: Engine, resolution_id: str, now: datetime, salt: str) -> tuple[int, int]:
    def node(kind: str, value: str) -> exp.Expression:
        return node_id(exp.column(kind), exp.column(value), salt)

    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_prev AS
        SELECT identifier_type AS kind, value, profile_id, __node AS node FROM identities WHERE profile_id IS NOT NULL
    """, node=node("identifier_type", "value"))
    sql.run(engine, "DELETE FROM identities")
    sql.run(engine, """
        INSERT INTO identities
        SELECT s.kind, s.value, p.profile_id, coalesce(p.status, 'blocked'), coalesce(p.reason, s.reason),
               s.first_seen, s.last_seen, s.n, s.first_message_id, s.first_source
        FROM _idr_idstats s LEFT JOIN _idr_final p ON p.node = __node AND s.reason IS NULL
    """, node=node("kind", "value"))
    sql.run(engine, "DELETE FROM identity_edges")
    sql.run(engine, """
        INSERT INTO identity_edges
        SELECT e.a_kind, e.a_value, e.b_kind, e.b_value, e.rule, e.message_id, e.source, e.event_time, e.last_seen, e.n,
               CASE WHEN c.okind IS NULL AND pa.profile_id = pb.profile_id THEN 'active' ELSE 'blocked' END,
               CASE WHEN c.okind = 'split' THEN 'split_by_user' WHEN c.okind IS NOT NULL THEN 'removed_by_user'
                    WHEN pa.profile_id = pb.profile_id THEN NULL
                    ELSE coalesce(pa.reason, pb.reason,
                                  CASE WHEN e.a_kind = e.b_kind THEN 'conflicting_' || e.a_kind END, 'nearer_other_profile') END
        FROM _idr_edges_full e
        JOIN _idr_final pa ON pa.node = __a
        JOIN _idr_final pb ON pb.node = __b
        LEFT JOIN _idr_cut c ON c.a_kind = e.a_kind AND c.a_value = e.a_value AND c.b_kind = e.b_kind AND c.b_value = e.b_value
    """, a=node("a_kind", "a_value"), b=node("b_kind", "b_value"))
    _write_blocked(engine, salt)
    return _write_merges(engine, resolution_id, now)


def _write_blocked(engine: Engine, salt: str) -> None:
    sql.run(engine, "DELETE FROM identity_blocked")
    # Identifiers refused outright (junk, too long, not a phone number).
    sql.run(engine, """
        INSERT INTO identity_blocked
        SELECT 'identifier', s.reason, s.kind, s.value, NULL, NULL, o.profile_id, NULL, s.first_message_id, s.first_source, s.first_seen,
               CASE WHEN o.override_id IS NULL THEN json_object('events', s.n)
                    ELSE json_object('events', s.n, 'override_id', o.override_id, 'actor', o.actor, 'note', o.note,
                                     'profile_id', o.profile_id) END
        FROM _idr_idstats s
        LEFT JOIN (SELECT kind, value, min(override_id) AS override_id, min(actor) AS actor, min(note) AS note, min(profile_id) AS profile_id
                   FROM _idr_ovm WHERE okind = 'remove_identifier' GROUP BY kind, value) o
          ON s.reason = 'removed_by_user' AND o.kind = s.kind AND o.value = s.value
        WHERE s.reason IS NOT NULL
    """)
    # Edges a user removed, or cut by a split.
    sql.run(engine, """
        INSERT INTO identity_blocked
        SELECT 'edge', CASE WHEN c.okind = 'split' THEN 'split_by_user' ELSE 'removed_by_user' END,
               c.a_kind, c.a_value, c.b_kind, c.b_value, pa.profile_id, pb.profile_id, e.message_id, e.source, e.event_time,
               json_object('override_id', c.override_id, 'kind', c.okind, 'actor', c.actor, 'note', c.note, 'rule', e.rule, 'events', e.n)
        FROM _idr_cut c
        JOIN _idr_edges_full e ON e.a_kind = c.a_kind AND e.a_value = c.a_value AND e.b_kind = c.b_kind AND e.b_value = c.b_value
        LEFT JOIN _idr_final pa ON pa.node = __a
        LEFT JOIN _idr_final pb ON pb.node = __b
    """, a=node_id(exp.column("a_kind", table="c"), exp.column("a_value", table="c"), salt),
         b=node_id(exp.column("b_kind", table="c"), exp.column("b_value", table="c"), salt))
    # Shared identifiers (hubs): they link nobody.
    sql.run(engine, """
        INSERT INTO identity_blocked
        SELECT 'identifier', 'shared_identifier', n.kind, n.value, NULL, NULL, p.profile_id, NULL,
               s.first_message_id, s.first_source, s.first_seen,
               json_object('linked_type', h.kind_of_many, 'linked_values', h.linked)
        FROM _idr_hub h JOIN _idr_n n ON n.node = h.node
        JOIN _idr_final p ON p.node = h.node
        JOIN _idr_idstats s ON s.kind = n.kind AND s.value = n.value
    """)
    # Edges joining two values of an exclusive type (an alias between two known users).
    sql.run(engine, """
        INSERT INTO identity_blocked
        SELECT 'merge', c.reason, na.kind, na.value, nb.kind, nb.value, pa.profile_id, pb.profile_id,
               e.message_id, e.source, e.event_time, json_object('rule', e.rule, 'events', e.n)
        FROM _idr_conflict c
        JOIN _idr_n na ON na.node = c.a JOIN _idr_n nb ON nb.node = c.b
        JOIN _idr_final pa ON pa.node = c.a JOIN _idr_final pb ON pb.node = c.b
        JOIN _idr_edges_full e ON (e.a_kind = na.kind AND e.a_value = na.value AND e.b_kind = nb.kind AND e.b_value = nb.value)
                               OR (e.a_kind = nb.kind AND e.a_value = nb.value AND e.b_kind = na.kind AND e.b_value = na.value)
    """)
    # Identifiers equally near two anchors (a shared family laptop): the merge they would cause.
    sql.run(engine, """
        INSERT INTO identity_blocked
        SELECT 'merge', a.reason, n.kind, n.value, NULL, NULL,
               (SELECT p.profile_id FROM _idr_final p WHERE p.node = a.candidates[1]),
               (SELECT p.profile_id FROM _idr_final p WHERE p.node = a.candidates[2]),
               s.first_message_id, s.first_source, s.first_seen,
               json_object('candidates', (SELECT list(json_object('type', cn.kind, 'value', cn.value, 'profile_id', cp.profile_id)
                                                      ORDER BY cn.first_seen, cn.rank, cn.kind, cn.value)
                                          FROM unnest(a.candidates) AS u(c) JOIN _idr_n cn ON cn.node = u.c
                                          JOIN _idr_final cp ON cp.node = u.c))
        FROM _idr_amb a JOIN _idr_n n ON n.node = a.node
        JOIN _idr_idstats s ON s.kind = n.kind AND s.value = n.value
    """)
    # Values detached by a limit, and profiles too large to form.
    sql.run(engine, """
        INSERT INTO identity_blocked
        SELECT 'identifier', d.reason, n.kind, n.value, NULL, NULL, p.profile_id, NULL,
               s.first_message_id, s.first_source, s.first_seen, json_object('would_join', gp.profile_id)
        FROM _idr_detached d JOIN _idr_n n ON n.node = d.node JOIN _idr_final p ON p.node = d.node
        JOIN _idr_n gn ON gn.node = d.g
        JOIN (SELECT DISTINCT g, 'prof_' || left(md5(k.kind || ':' || k.value), 24) AS profile_id
              FROM _idr_detached x JOIN _idr_n k ON k.node = x.g) gp ON gp.g = d.g
        JOIN _idr_idstats s ON s.kind = n.kind AND s.value = n.value
    """)


def _write_merges(engine: Engine, resolution_id: str, now: datetime) -> tuple[int, int]:
    # A previous profile id that no longer exists and whose identifiers now sit in another profile.
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_mcand AS
        WITH c AS (
            SELECT p.node, p.profile_id, v.profile_id AS old, v.kind, v.value
            FROM _idr_final p JOIN _idr_prev v ON v.node = p.node WHERE v.profile_id <> p.profile_id
        )
        SELECT DISTINCT c.profile_id AS survivor, c.old AS merged
        FROM c JOIN _idr_n n ON n.node = c.node AND n.kind = c.kind AND n.value = c.value  -- the same identifier, not a hash twin
        WHERE c.old NOT IN (SELECT profile_id FROM _idr_final)
    """)
    merges = int(sql.scalar(engine, "SELECT count(*) FROM _idr_mcand"))
    if merges:
        # Evidence: the first active edge inside the survivor between an identifier that was in the
        # merged profile and one that was not.
        sql.run(engine, """
            INSERT INTO profile_merges
            SELECT 'mrg_' || left(md5(m.survivor || '>' || m.merged || '@' || __rid), 20), m.survivor, m.merged,
                   coalesce(ev.evidence, json_object('note', 'no single edge: the profiles were joined through identifiers new to this run')),
                   __now, __rid, NULL, NULL
            FROM _idr_mcand m LEFT JOIN (
                SELECT survivor, merged, evidence FROM (
                    SELECT m.survivor, m.merged,
                           json_object('a_type', e.a_type, 'a_value', e.a_value, 'b_type', e.b_type, 'b_value', e.b_value,
                                       'message_id', e.message_id, 'source', e.source, 'time', e.event_time, 'rule', e.rule) AS evidence,
                           row_number() OVER (PARTITION BY m.survivor, m.merged ORDER BY e.event_time, e.message_id, e.a_value, e.b_value) AS rn
                    FROM _idr_mcand m
                    JOIN identities ia ON ia.profile_id = m.survivor
                    JOIN identity_edges e ON e.status = 'active' AND e.a_type = ia.identifier_type AND e.a_value = ia.value
                    LEFT JOIN _idr_prev va ON va.kind = e.a_type AND va.value = e.a_value
                    LEFT JOIN _idr_prev vb ON vb.kind = e.b_type AND vb.value = e.b_value
                    WHERE (va.profile_id IS NOT DISTINCT FROM m.merged) <> (vb.profile_id IS NOT DISTINCT FROM m.merged)
                ) t WHERE rn = 1
            ) ev ON ev.survivor = m.survivor AND ev.merged = m.merged
        """, rid=sql.lit(resolution_id), now=exp.cast(sql.lit(now.isoformat()), exp.DataType.build("TIMESTAMPTZ", dialect="duckdb")))
    unmerges = int(sql.scalar(engine, """
        SELECT count(*) FROM profile_merges WHERE undone_at IS NULL AND merged_profile_id IN (SELECT profile_id FROM _idr_final)
    """))
    if unmerges:
        engine.execute(
            "UPDATE profile_merges SET undone_at = ?, undone_reason = 'split: the merged profile exists again' "
            "WHERE undone_at IS NULL AND merged_profile_id IN (SELECT profile_id FROM _idr_final)",
            [now],
        )
    return merges, unmerges


def _report(engine: Engine, resolution_id: str, stats: GraphStats, merges: int, unmerges: int, seconds: float) -> ResolveReport:
    counts = engine.fetch_all("""
        SELECT count(*), count(*) FILTER (WHERE status = 'blocked'), count(DISTINCT profile_id) FROM identities
    """)[0]
    by_reason = dict(engine.fetch_all("SELECT reason, count(*) FROM identity_blocked GROUP BY reason ORDER BY reason"))
    edges = int(engine.fetch_all("SELECT count(*) FROM identity_edges")[0][0])
    return ResolveReport(
        resolution_id=resolution_id, identifiers=int(counts[0]), blocked_identifiers=int(counts[1]), edges=edges,
        profiles=int(counts[2]), merges=merges, unmerges=unmerges, blocked=sum(by_reason.values()),
        iterations=stats.iterations, graph=asdict(stats), blocked_by_reason={str(k): int(v) for k, v in by_reason.items()},
        seconds=round(seconds, 3),
    )
