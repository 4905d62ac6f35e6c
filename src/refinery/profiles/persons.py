"""Identity policies: count people by the deterministic graph alone, or with probabilistic links.

Profiles come from deterministic evidence only. A consumer that accepts probabilistic links above a
threshold sees *persons*: groups of profiles joined by links (`identity_links`, not removed, score at
or above the threshold), computed on demand over the profile-level link graph, so both views exist
without re-resolving anything. Links never override merge protection: two profiles holding
different values of a type limited to one per profile (two user ids) are never joined; such a
link is reported as refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from refinery.errors import ConfigurationError
from refinery.identity.rules import IdentityRules
from refinery.storage.engine import Engine


@dataclass(frozen=True)
class IdentityPolicy:
    """`deterministic`, or `probabilistic` with the lowest link score accepted."""

    mode: str = "deterministic"
    threshold: float = 0.9
    methods: tuple[str, ...] = ()  # empty: every method

    def __post_init__(self) -> None:
        if self.mode not in ("deterministic", "probabilistic"):
            raise ConfigurationError(f"Unknown identity policy {self.mode!r}.", fix="Use 'deterministic' or 'probabilistic'.")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigurationError(f"Threshold {self.threshold} is outside (0, 1].", fix="Use a match probability such as 0.95.")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "threshold": self.threshold, "methods": list(self.methods)}


@dataclass
class Persons:
    """profile id -> person id (the smallest profile id of the group), and the refused links."""

    person_of: dict[str, str]
    refused: list[dict[str, Any]] = field(default_factory=list)
    links_used: int = 0

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for profile, person in sorted(self.person_of.items()):
            out.setdefault(person, []).append(profile)
        return out

    def to_arrow(self) -> pa.Table:
        items = sorted(self.person_of.items())
        return pa.table({"profile_id": [p for p, _ in items], "person_id": [q for _, q in items]})


def persons(engine: Engine, policy: IdentityPolicy, rules: IdentityRules) -> Persons:
    cur = engine.reader()
    profiles = [r[0] for r in engine.fetch_all("SELECT profile_id FROM profiles ORDER BY profile_id", cursor=cur)]
    parent = {p: p for p in profiles}
    if policy.mode == "deterministic":
        return Persons(dict(parent))

    exclusive = list(rules.exclusive_types)
    anchors: dict[str, dict[str, str]] = {p: {} for p in profiles}
    if exclusive:
        for profile_id, kind, value in engine.fetch_all(
            "SELECT profile_id, identifier_type, value FROM identities WHERE profile_id IS NOT NULL AND list_contains(?, identifier_type)",
            [exclusive], cursor=cur,
        ):
            anchors.setdefault(profile_id, {})[kind] = value

    links = engine.fetch_all(
        """
        SELECT l.link_id, l.score, l.method, a.profile_id, b.profile_id
        FROM identity_links l
        JOIN identities a ON a.identifier_type = l.a_type AND a.value = l.a_value
        JOIN identities b ON b.identifier_type = l.b_type AND b.value = l.b_value
        WHERE l.removed_at IS NULL AND l.score >= ? AND a.profile_id IS NOT NULL AND b.profile_id IS NOT NULL
          AND a.profile_id <> b.profile_id AND (len(?) = 0 OR list_contains(?, l.method))
        ORDER BY l.score DESC, l.link_id
        """,
        [policy.threshold, list(policy.methods), list(policy.methods)], cursor=cur,
    )

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    held = {p: dict(anchors.get(p, {})) for p in profiles}
    refused: list[dict[str, Any]] = []
    used = 0
    for link_id, score, method, pa_, pb_ in links:
        ra, rb = find(pa_), find(pb_)
        if ra == rb:
            continue
        clash = sorted(k for k in set(held[ra]) & set(held[rb]) if held[ra][k] != held[rb][k])
        if clash:
            refused.append({"link_id": link_id, "score": score, "method": method, "profiles": [pa_, pb_],
                            "reason": f"conflicting_{clash[0]}"})
            continue
        keep, drop = (ra, rb) if ra < rb else (rb, ra)
        parent[drop] = keep
        held[keep] = {**held[drop], **held[keep]}
        used += 1
    return Persons({p: find(p) for p in profiles}, refused, used)


def summary(result: Persons, policy: IdentityPolicy) -> dict[str, Any]:
    """What `GET /api/persons` answers: counts, the groups of more than one profile, refused links."""
    groups = {k: v for k, v in result.groups().items() if len(v) > 1}
    return {
        "policy": policy.to_dict(), "profiles": len(result.person_of), "persons": len(set(result.person_of.values())),
        "links_used": result.links_used, "joined": groups, "refused": result.refused,
    }
