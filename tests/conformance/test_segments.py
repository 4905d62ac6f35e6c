"""Segment rules on every engine: the compiled SQL (one query for many rules, as scheduled runs
evaluate them, and each rule alone) selects the reference evaluator's members at several moments,
and computed traits take the same values."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from conftest import World
from refinery.privacy.pii import token_for
from refinery.segments import reference
from refinery.segments.catalog import build_catalog
from refinery.segments.compile import CompileContext, compile_many, compile_rule
from refinery.segments.traits import compile_trait
from refinery.storage.engine import Engine

#: Every kind of condition, operator and window the language has (profiles, not persons).
RULES: dict[str, str] = {
    "buyers": "performed 'Order Completed' at least 2 times",
    "recent_buyers": "performed 'Order Completed' in last 7 days",
    "lapsed": "performed 'Order Completed' and not performed 'Order Completed' in last 10 days",
    "big_spenders": "sum(total) of 'Order Completed' > 150",
    "avg_basket": "avg(total) of 'Order Completed' between 20 and 200",
    "min_max": "min(total) of 'Order Completed' >= 8 and max(total) of 'Order Completed' < 300",
    "browsers": "count(distinct category) of 'Product Viewed' >= 2 in last 30 days",
    "shoe_fans": "most frequent category of 'Product Viewed' = 'shoes'",
    "first_last": "first time of 'Order Completed' < 5 days ago or last time of 'Login' > 3 days ago",
    "funnel": "'Product Viewed' where category in ('shoes', 'hats') then 'Order Completed' within 10 days",
    "funnel3": "'Product Viewed' then 'Login' then 'Order Completed' within 20 days",
    "pros": "plan = 'pro' and age between 18 and 40",
    "vip_or_team": "vip = true or plan in ('team')",
    "not_free": "not plan = 'free' and age is set",
    "gifts": "performed 'Order Completed' where (is_gift = true and total > 20)",
    "strings": "performed 'Product Viewed' where (category contains 'o' and category starts with 's') "
               "or performed 'Login' where method ends with 'il'",
    "regex": "performed 'Pricing' where url matches '^https://[a-z.]+/pricing'",
    "counts": "count of 'Login' where method != 'sso' >= 2 in last 20 days",
    "windows": "performed 'Product Viewed' between 30 days ago and 7 days ago and performed any event since 3 days ago",
    "nested": "in segment 'buyers' and not in segment 'pros'",
    "not_both": "performed 'Login' and not (plan = 'pro' and age between 18 and 40)",
    "not_in": "performed 'Order Completed' where category not in ('hats', 'coats') exactly 1 times",
}
MOMENTS = (timedelta(0), timedelta(days=2, hours=5), timedelta(days=25))


def context(world: World) -> CompileContext:
    engine = world.rt.engine
    return CompileContext(build_catalog(engine), segments=RULES, tokenise=lambda k, v: token_for(engine, k, v) or v)


@pytest.fixture(scope="module")
def expected(world: World) -> dict[tuple[str, int], set[str]]:
    """The reference evaluator's members of every rule at every moment."""
    ctx = context(world)
    out = {}
    for name, text in RULES.items():
        compiled = compile_rule(text, ctx, name=name)
        for i, d in enumerate(MOMENTS):
            out[name, i] = reference.members(compiled, world.rows, world.traits, world.written_at + d)
    return out


def test_the_world_is_not_trivial(expected: dict[tuple[str, int], set[str]], world: World) -> None:
    """Most rules select some profiles and not all (a suite where every answer is empty proves nothing)."""
    middling = [n for n in RULES if 0 < len(expected[n, 0]) < len(world.profiles)]
    assert len(middling) >= len(RULES) - 3, {n: len(expected[n, 0]) for n in RULES}


def test_many_rules_in_one_query(engine: Engine, world: World, expected: dict[tuple[str, int], set[str]]) -> None:
    many = compile_many(RULES, context(world))
    assert set(many.batched) == set(RULES)
    for i, d in enumerate(MOMENTS):
        query = many.members(world.written_at + d)
        assert query is not None
        got: dict[str, set[str]] = {name: set() for name in RULES}
        for segment, profile in engine.fetch_all(query):
            got[segment].add(profile)
        for name in RULES:
            assert got[name] == expected[name, i], (name, RULES[name], d, engine.dialect)


@pytest.mark.parametrize("name", ["funnel3", "shoe_fans", "nested", "regex"])
def test_one_rule_alone(engine: Engine, world: World, expected: dict[tuple[str, int], set[str]], name: str) -> None:
    compiled = compile_rule(RULES[name], context(world), name=name)
    got = {str(r[0]) for r in engine.fetch_all(compiled.members(world.written_at))}
    assert got == expected[name, 0]


TRAITS = {
    "lifetime_value": "sum(total) of 'Order Completed'",
    "orders_30d": "count of 'Order Completed' in last 30 days",
    "favourite": "most frequent category of 'Product Viewed'",
    "last_login": "last time of 'Login'",
    "categories": "count(distinct category) of 'Product Viewed'",
}


@pytest.mark.parametrize("name", sorted(TRAITS))
def test_computed_traits(engine: Engine, world: World, name: str) -> None:
    """A computed trait's SELECT (profile_id, value) gives the reference's value per profile."""
    ctx = context(world)
    trait = compile_trait(TRAITS[name], ctx)
    at = world.written_at
    got = {str(p): v for p, v in engine.fetch_all(trait.select(at))}
    by_profile: dict[str, list[dict[str, Any]]] = {p: [] for p in world.profiles}
    for row in reference.received(world.rows, at):
        by_profile[row["profile_id"]].append(row)
    assert any(v not in (None, 0) for v in got.values())
    for p, rows in by_profile.items():
        want = reference.aggregate(trait.definition.aggregate, trait.definition.window, rows, at, None)
        if isinstance(want, float):
            assert got.get(p) == pytest.approx(want), (name, p)
        else:
            assert got.get(p) == want, (name, p)
