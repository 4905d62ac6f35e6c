"""Trait merge policies: which of a profile's identify calls decides each trait.

A policy is plain data compiled into one ORDER BY: for every (profile, trait) the first row in that
order wins. `latest` and `first` order by the event's corrected timestamp; `source_priority` orders by
the source's place in a trust list first. Ties are broken by source and message id, so the result
never depends on the order rows were written in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlglot import exp

Policy = Literal["latest", "first", "source_priority"]
POLICIES: tuple[str, ...] = ("latest", "first", "source_priority")


@dataclass(frozen=True)
class TraitPolicy:
    default: Policy = "latest"
    source_priority: tuple[str, ...] = ()
    per_trait: Mapping[str, Policy] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Any) -> TraitPolicy:
        return cls(settings.trait_policy, tuple(settings.trait_source_priority), dict(settings.trait_policies))

    def policy_of(self, trait: str) -> Policy:
        return self.per_trait.get(trait, self.default)

    def to_dict(self) -> dict[str, Any]:
        return {"default": self.default, "source_priority": list(self.source_priority), "per_trait": dict(self.per_trait)}

    def policy_expression(self, key: exp.Expression) -> exp.Expression:
        """CASE key WHEN 'trait' THEN 'policy' ... ELSE default END (literals only)."""
        if not self.per_trait:
            return exp.Literal.string(self.default)
        case = exp.Case(this=key.copy())
        for trait, policy in sorted(self.per_trait.items()):
            case = case.when(exp.Literal.string(trait), exp.Literal.string(policy))
        return case.else_(exp.Literal.string(self.default))

    def source_rank(self, source: exp.Expression) -> exp.Expression:
        """The source's place in the trust list (0 first); unlisted sources rank after all listed ones."""
        if not self.source_priority:
            return exp.Literal.number(0)
        case = exp.Case(this=source.copy())
        for i, name in enumerate(self.source_priority):
            case = case.when(exp.Literal.string(name), exp.Literal.number(i))
        return case.else_(exp.Literal.number(len(self.source_priority)))
