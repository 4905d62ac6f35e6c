"""Computed traits: `[name =] aggregate [window]` in the rule language's aggregate syntax, compiled
to `SELECT profile_id, value` (one row per profile with at least one event counted).

    lifetime_value = sum(total) of 'Order Completed'
    favourite_category = most frequent category of 'Product Viewed' in last 90 days

A segment names a computed trait like a trait (`lifetime_value > 500`); the compiler inlines its
aggregate into the segment's own scan, so a segment never reads a stale materialised value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlglot import exp

from refinery.segments import ast
from refinery.segments.check import check_trait
from refinery.segments.compile import CompileContext, Compiled, _Query, _utc
from refinery.segments.parse import parse_trait


@dataclass(frozen=True)
class CompiledTrait:
    definition: ast.TraitDefinition
    value_type: str  # number | string | boolean | timestamp | unknown
    ctx: CompileContext = field(repr=False, compare=False)

    @property
    def name(self) -> str | None:
        return self.definition.name

    def select(self, as_of: datetime) -> exp.Select:
        """SELECT profile_id, value as of `as_of`."""
        return _trait_query(self, _utc(as_of), None)

    def value_of(self, profile_id: str, as_of: datetime) -> exp.Select:
        """The one profile's row (none when it has no value)."""
        return _trait_query(self, _utc(as_of), profile_id)

    def sql(self, as_of: datetime, dialect: str = "duckdb") -> str:
        return self.select(as_of).sql(dialect=dialect, pretty=True)


def compile_trait(text: str, ctx: CompileContext) -> CompiledTrait:
    """Parse, check and compile a computed trait; raises SegmentError subclasses."""
    definition = check_trait(parse_trait(text), ctx)
    return CompiledTrait(definition, definition.aggregate.value_type or "unknown", ctx)


def _trait_query(trait: CompiledTrait, as_of: datetime, profile_id: str | None) -> exp.Select:
    rule = ast.Rule(ast.Or(()), None, trait.definition.text)
    query = _Query(Compiled(rule, (), frozenset(), False, None, trait.ctx), as_of, profile_id)  # type: ignore[arg-type]
    value = query._aggregate(trait.definition.aggregate, trait.definition.window, "value")
    agg = trait.definition.aggregate
    select = exp.select(exp.alias_(exp.column("profile_id", table="p"), "profile_id"), exp.alias_(value, "value"))
    # a row per profile with a value (counts and sums: every profile, 0 without events)
    held: exp.Expr = exp.Not(this=exp.Is(this=value.copy(), expression=exp.Null()))
    if agg.func in ("count", "distinct_count", "sum"):
        held = exp.true()
    return query._final(select, held)
