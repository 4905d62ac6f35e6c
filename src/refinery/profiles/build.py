"""Build the curated profiles from the identity graph: attribute events, merge traits.

`build(engine, rules, policy)` runs inside the writer, after a resolution, and rebuilds
`event_profiles` and `profiles` from the clean zone and `identities` (a re-run on the same data
gives the same rows). An event belongs to the profile of its highest-priority identifier that is
linked to one: a family member's `identify` carrying their user id and the shared laptop's cookie
belongs to that member, whoever the cookie ended up with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlglot import exp

from refinery.identity import sql
from refinery.identity.extract import extract
from refinery.identity.rules import IdentityRules
from refinery.profiles.policy import TraitPolicy
from refinery.storage.engine import Engine

_TEMP_TABLES = ("_prf_attr", "_prf_traits")


@dataclass
class BuildReport:
    profiles: int
    events_attributed: int
    events_unattributed: int
    traits: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def attribute_events(engine: Engine, rules: IdentityRules) -> None:
    """`event_profiles`: each event's profile, from the identifiers `_idr_occ` found in it."""
    rank = sql.case_map(exp.column("kind", table="o"), {t: i for i, t in enumerate(rules.priority)}, len(rules.priority))
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _prf_attr AS
        SELECT source, message_id, profile_id, kind AS identifier_type, ts FROM (
            SELECT o.source, o.message_id, i.profile_id, o.kind, o.ts,
                   row_number() OVER (PARTITION BY o.source, o.message_id ORDER BY __rank, o.kind, o.value) AS rn
            FROM _idr_occ o JOIN identities i ON i.identifier_type = o.kind AND i.value = o.value
            WHERE o.reason IS NULL AND i.profile_id IS NOT NULL
        ) t WHERE rn = 1
    """, rank=rank)
    engine.execute("DELETE FROM event_profiles")
    engine.execute("INSERT INTO event_profiles SELECT source, message_id, profile_id, identifier_type, ts FROM _prf_attr")


_WINNING_TRAITS = """
    SELECT profile_id, key, value, source, message_id, ts, policy FROM (
        SELECT a.profile_id, j.key, j.value, e.source, e.message_id, e.timestamp AS ts, __policy AS policy,
               row_number() OVER (
                   PARTITION BY a.profile_id, j.key
                   ORDER BY CASE WHEN __policy = 'source_priority' THEN __srank ELSE 0 END,
                            CASE WHEN __policy = 'first' THEN epoch_us(e.timestamp) ELSE -epoch_us(e.timestamp) END,
                            e.source, e.message_id
               ) AS rn
        FROM events e
        JOIN event_profiles a ON a.source = e.source AND a.message_id = e.message_id,
        json_each(CASE WHEN json_type(e.traits) = 'OBJECT' THEN e.traits END) j
        WHERE e.type = 'identify' AND __where
    ) t WHERE rn = 1
"""

_TRAITS_OBJECT = """
    SELECT profile_id,
           to_json(map(list(key ORDER BY key), list(value ORDER BY key))) AS traits,
           to_json(map(list(key ORDER BY key),
                       list(json_object('source', source, 'message_id', message_id, 'at', ts, 'policy', policy) ORDER BY key)))
               AS trait_sources
    FROM __winners WHERE json_type(value) <> 'NULL'  -- a winning null clears the trait
    GROUP BY profile_id
"""


def winning_traits(policy: TraitPolicy, where: exp.Expression | None = None) -> exp.Expression:
    """SELECT profile_id, key, value, source, message_id, ts, policy: the winning value of every
    (profile, trait) under the trait policy, over the identify calls `where` lets through
    (columns of `events e` and `event_profiles a`; every identify call when None)."""
    key = exp.column("key", table="j")
    return sql.template(_WINNING_TRAITS, policy=policy.policy_expression(key),
                        srank=policy.source_rank(exp.column("source", table="e")), where=where if where is not None else exp.true())


def traits_objects(winners: exp.Expression) -> exp.Expression:
    """SELECT profile_id, traits, trait_sources: one JSON object per profile from `winning_traits`
    rows (keys sorted, so the same data always gives the same text; a winning null clears the trait)."""
    return sql.template(_TRAITS_OBJECT, winners=exp.Subquery(this=winners, alias=exp.TableAlias(this=exp.to_identifier("w"))))


def merge_traits(engine: Engine, policy: TraitPolicy) -> None:
    """`_prf_traits`: the winning value of every (profile, trait) under the trait policy."""
    engine.execute(exp.Create(this=exp.to_table("_prf_traits"), kind="TABLE", replace=True,
                              properties=exp.Properties(expressions=[exp.TemporaryProperty()]),
                              expression=winning_traits(policy)))


_CONTENT_COLUMNS = ("identifiers", "traits", "trait_sources", "first_seen", "last_seen", "event_count", "sources")


def _content(table: str = "") -> str:
    return "hash(" + ", ".join(f"{table}{c}" for c in _CONTENT_COLUMNS) + ")"


def write_profiles(engine: Engine, now: datetime) -> None:
    """Rewrite `profiles`; a row whose content did not change keeps its `updated_at`, so readers that
    follow changes (segment runs: which profiles changed since the last run) see only real ones."""
    engine.execute(f"CREATE OR REPLACE TEMP TABLE _prf_old AS SELECT profile_id, updated_at, {_content()} AS h FROM profiles")  # noqa: S608 - constant
    engine.execute("DELETE FROM profiles")
    engine.execute(sql.template("""
        INSERT INTO profiles
        -- JSON objects are built with their keys sorted, so the same data always gives the same text.
        WITH ids AS (
            SELECT profile_id, identifier_type, list(value ORDER BY first_seen, value) AS vals
            FROM identities WHERE profile_id IS NOT NULL GROUP BY ALL
        ), idj AS (
            SELECT profile_id, to_json(map(list(identifier_type ORDER BY identifier_type), list(to_json(vals) ORDER BY identifier_type))) AS identifiers
            FROM ids GROUP BY profile_id
        ), act AS (
            SELECT profile_id, min(timestamp) AS first_seen, max(timestamp) AS last_seen, count(*) AS n,
                   to_json(list(DISTINCT source ORDER BY source)) AS sources
            FROM event_profiles GROUP BY profile_id
        )
        SELECT idj.profile_id, idj.identifiers, coalesce(tr.traits, '{}'), coalesce(tr.trait_sources, '{}'),
               act.first_seen, act.last_seen, coalesce(act.n, 0), coalesce(act.sources, '[]'), ?
        FROM idj LEFT JOIN __traits tr ON tr.profile_id = idj.profile_id LEFT JOIN act ON act.profile_id = idj.profile_id
    """, traits=exp.Subquery(this=traits_objects(exp.select("*").from_("_prf_traits")))), [now])
    engine.execute(f"UPDATE profiles SET updated_at = o.updated_at FROM _prf_old o "  # noqa: S608 - constant
                   f"WHERE o.profile_id = profiles.profile_id AND o.h = {_content('profiles.')}")
    engine.execute("DROP TABLE IF EXISTS _prf_old")


def build(engine: Engine, rules: IdentityRules, policy: TraitPolicy, *, now: datetime | None = None,
          reuse_occurrences: bool = False) -> BuildReport:
    """Rebuild `event_profiles` and `profiles` (call inside the writer, after a resolution).

    `reuse_occurrences`: the resolution just before, in the same transaction, kept `_idr_occ`
    (`resolve(..., keep_occurrences=True)`); use it instead of extracting the identifiers again.
    """
    if not reuse_occurrences:
        extract(engine, rules)
    attribute_events(engine, rules)
    merge_traits(engine, policy)
    write_profiles(engine, now or datetime.now(UTC))
    profiles, attributed, traits = engine.fetch_all(
        "SELECT (SELECT count(*) FROM profiles), (SELECT count(*) FROM event_profiles), (SELECT count(*) FROM _prf_traits)"
    )[0]
    total = engine.fetch_all("SELECT count(*) FROM events")[0][0]
    # On failure the writer rolls the transaction back, and the temporary tables with it.
    for t in (*_TEMP_TABLES, "_idr_occ", "_idr_raw", "_idr_norm"):
        engine.execute(f"DROP TABLE IF EXISTS {t}")  # constant names, no user text
    return BuildReport(profiles, attributed, total - attributed, traits)


@dataclass(frozen=True)
class Refresh:
    """A resolution + profile build with everything it needs from the settings, taken once: the
    identity rules, the trait policy and the consent category names. Call it inside the writer."""

    rules: IdentityRules
    policy: TraitPolicy
    consent_categories: Mapping[str, str]

    @classmethod
    def from_settings(cls, settings: Any) -> Refresh:
        from refinery.identity import rules_from_settings

        return cls(rules_from_settings(settings), TraitPolicy.from_settings(settings), dict(settings.consent_categories))

    def __call__(self, engine: Engine) -> dict[str, Any]:
        return resolve_and_build(engine, self.rules, self.policy, consent_categories=self.consent_categories)


def resolve_and_build(
    engine: Engine, rules: IdentityRules, policy: TraitPolicy, *, consent_categories: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A full identity resolution, the profiles it implies, and the consent receipts of the new
    events (call inside the writer). `consent_categories`: the `consent_categories` setting."""
    from refinery.governance import consent_sync
    from refinery.governance.purposes import CategoryMap
    from refinery.identity import resolve

    identity = resolve(engine, rules, keep_occurrences=True)
    profiles = build(engine, rules, policy, reuse_occurrences=True)
    consent = consent_sync.sync(engine, CategoryMap.build(consent_categories))
    return {"identity": identity.to_dict(), "profiles": profiles.to_dict(), "consent": consent.to_dict()}
