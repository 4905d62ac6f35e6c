"""A feature compiled for point-in-time retrieval: its event filter and aggregate as sqlglot
expressions in which the evaluated moment is a column (`r.ts`, one per request row), not a literal.

Expression features reuse the segment language's compiler unchanged (`segments.traits.compile_trait`:
grammar, checks, catalog names with suggestions, tokenised personal literals, regex guards), which
renders every moment as a literal timestamp computed from one `as_of`. To get a moment per row, the
aggregate is compiled at two far-apart moments; a timestamp literal that differs between the two
moved with the moment (`as_of - 90 days`), so it becomes `r.ts - INTERVAL '7776000' SECOND`, and one
that is the same in both is absolute (`since 2026-01-01`) and stays. The two trees must have the
same shape and every moved literal the same offset in both, else compilation stops (a compiler
change this module does not understand is an error, never a silent leak).

SQL features (`sql.py`) are checked and rewritten so they can only read events known by `$as_of`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlglot import exp

from refinery.features.definition import Feature, window_text
from refinery.features.errors import FeatureError
from refinery.segments import ast
from refinery.segments.compile import CompileContext, Compiled, _Query
from refinery.segments.traits import CompiledTrait, compile_trait

#: Two moments no real data is near; only their difference matters (see the module's docstring).
_MOMENT_A = datetime(2400, 1, 1, tzinfo=UTC)
_MOMENT_B = datetime(2700, 6, 15, 12, 30, tzinfo=UTC)


@dataclass(frozen=True)
class CompiledFeature:
    """One feature, ready for `offline.training_query`. For expression features, `filter` is the
    condition on one event `e` (name, window, `where`) and `aggregate` the aggregate over the events
    that pass it (`value`: the per-event value, for `most frequent`); the moment is `moment`."""

    feature: Feature
    func: str                       # count | distinct_count | sum | avg | min | max | first_time | last_time | most_frequent | sql
    value_type: str
    filter: exp.Expr | None = None
    aggregate: exp.Expr | None = None
    value: exp.Expr | None = None
    query: exp.Query | None = field(default=None, repr=False)  # SQL features: the checked SELECT, `$as_of` still in it

    @property
    def ref(self) -> str:
        return self.feature.ref


def expression_text(feature: Feature) -> str:
    """The expression with the definition's window, in the language's words (`... in last 90 days`)."""
    window = window_text(feature.window)
    return feature.definition if window is None else f"{feature.definition} in last {window}"


def compile_expression(text: str, window: str | None, ctx: CompileContext) -> CompiledTrait:
    """Parse and check an expression feature (the segment language's errors, with their caret).
    A `window` beside an expression that has its own is refused: which one would count is unclear."""
    trait = compile_trait(text, ctx)
    if trait.name is not None:
        raise FeatureError(f"The expression names itself {trait.name!r}; a feature's name is given apart.",
                           fix=f"Drop '{trait.name} =' from the expression.", field="expression")
    if window_text(window) is not None:
        if trait.definition.window is not None:
            raise FeatureError("The expression has its own window and the definition gives another.",
                               fix="Give the window once: in the expression (`in last 90 days`) or as the window field.",
                               field="window")
        trait = compile_trait(f"{text} in last {window_text(window)}", ctx)
    return trait


def compile_feature(feature: Feature, ctx: CompileContext, moment: exp.Expr) -> CompiledFeature:
    """Compile `feature` with the evaluated moment given by the expression `moment` (e.g. `r.ts`)."""
    if feature.kind == "sql":
        from refinery.features.sql import check_sql

        return CompiledFeature(feature, "sql", feature.value_type or "unknown", query=check_sql(feature.definition))
    trait = compile_expression(feature.definition, feature.window, ctx)
    agg = trait.definition.aggregate
    filter_a, value_a = _parts(trait, _MOMENT_A)
    filter_b, value_b = _parts(trait, _MOMENT_B)
    filter_ = _moved(filter_a, filter_b, moment)
    value = _moved(value_a, value_b, moment)
    if agg.func == "most_frequent":
        return CompiledFeature(feature, agg.func, trait.value_type, filter=filter_, value=value)
    return CompiledFeature(feature, agg.func, trait.value_type, filter=filter_, aggregate=value)


def _parts(trait: CompiledTrait, as_of: datetime) -> tuple[exp.Expr, exp.Expr]:
    """(the event filter, the aggregate, or for most frequent the value it counts) as the segment
    compiler builds them as of `as_of`, over `events e`."""
    definition = trait.definition
    agg = definition.aggregate
    rule = ast.Rule(ast.Or(()), None, definition.text)
    query = _Query(Compiled(rule, (), frozenset(), False, None, trait.ctx), as_of)  # type: ignore[arg-type]
    full, _, _ = query._event_condition(agg.event, agg.where, definition.window)
    query._aggregate(agg, definition.window, "value")
    if agg.func == "most_frequent":
        # freq_value AS (SELECT unit, value FROM (SELECT unit, <value> AS value, row_number() ...) t WHERE rn = 1)
        inner = query.ctes[0][1].find(exp.Subquery)
        assert inner is not None and isinstance(inner.this, exp.Select)
        return full, inner.this.expressions[1].this
    column = query.aggs[0].this
    return full, column.this if isinstance(column, exp.Filter) else column


def _moved(a: exp.Expr, b: exp.Expr, moment: exp.Expr) -> exp.Expr:
    """`a` with each timestamp literal that differs from its place in `b` replaced by `moment`
    minus the literal's distance from its moment (equal in both, else an error)."""
    a = a.copy()
    nodes_a, nodes_b = list(a.walk()), list(b.walk())
    if len(nodes_a) != len(nodes_b):
        raise _shape_error()
    swaps: list[tuple[exp.Expr, timedelta]] = []
    for x, y in zip(nodes_a, nodes_b, strict=True):
        if type(x) is not type(y):
            raise _shape_error()
        if isinstance(x, exp.Literal) and x.this != y.this:
            cast = x.parent
            if not (isinstance(cast, exp.Cast) and cast.to.is_type("timestamptz")):
                raise _shape_error()
            offset_a = _MOMENT_A - datetime.fromisoformat(x.this)
            offset_b = _MOMENT_B - datetime.fromisoformat(y.this)
            if offset_a != offset_b:
                raise _shape_error()
            swaps.append((cast, offset_a))
    for cast, offset in swaps:
        cast.replace(relative(moment, offset))
    return a


def relative(moment: exp.Expr, offset: timedelta) -> exp.Expr:
    """`moment - offset` as SQL (`r.ts - INTERVAL '7776000' SECOND`)."""
    if not offset:
        return moment.copy()
    us = abs(offset) // timedelta(microseconds=1)
    interval = exp.Interval(this=exp.Literal.string(str(us // 1_000_000)), unit=exp.Var(this="SECOND")) \
        if us % 1_000_000 == 0 else exp.Interval(this=exp.Literal.string(str(us)), unit=exp.Var(this="MICROSECOND"))
    op = exp.Sub if offset > timedelta(0) else exp.Add
    return op(this=moment.copy(), expression=interval)


def _shape_error() -> FeatureError:
    return FeatureError("The segment compiler built this aggregate differently at two moments, so the feature store "
                        "cannot tell which times move with the evaluated moment.",
                        fix="Report this with the expression; it is a bug, not a problem with the feature.")
