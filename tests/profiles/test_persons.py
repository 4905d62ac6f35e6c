"""Identity policies: probabilistic links join profiles into persons above a threshold, never across
merge protection, and the deterministic view is unchanged."""

from __future__ import annotations

from datetime import UTC, datetime

from profile_helpers import World, event

from refinery.identity.matching.links import build_links
from refinery.identity.matching.store import write_links
from refinery.profiles.persons import IdentityPolicy, persons


def _link(world: World, rows: list[dict[str, object]]) -> None:
    """Links between identifiers as the identity tables hold them (emails as their tokens)."""
    rows = [{**r, "a_value": world.stored(str(r["a_type"]), str(r["a_value"])),
             "b_value": world.stored(str(r["b_type"]), str(r["b_value"]))} for r in rows]
    table = build_links(rows, method="person_record", model_version="test-v1", created_at=datetime.now(UTC))
    world.rt.writer.call(lambda e: write_links(e, table, method="person_record", model_version="test-v1"))


def test_links_above_the_threshold_join_profiles_into_persons(world: World) -> None:
    world.send(
        event("identify", userId="web-1", traits={"email": "ann@acme.io"}),
        event("identify", anonymousId="crm-row-7", traits={"email": "a.smith@post.io"}),
        event("identify", userId="web-2", traits={"email": "bob@acme.io"}),
        event("identify", anonymousId="crm-row-9", traits={"email": "b.jones@post.io"}),
    )
    world.resolve()
    _link(world, [
        {"a_type": "email", "a_value": "ann@acme.io", "b_type": "email", "b_value": "a.smith@post.io", "score": 0.97, "evidence": {}},
        {"a_type": "email", "a_value": "bob@acme.io", "b_type": "email", "b_value": "b.jones@post.io", "score": 0.7, "evidence": {}},
    ])
    ann, ann_crm = world.profile_of("user_id", "web-1"), world.profile_of("anonymous_id", "crm-row-7")
    bob, bob_crm = world.profile_of("user_id", "web-2"), world.profile_of("anonymous_id", "crm-row-9")

    strict = persons(world.rt.engine, IdentityPolicy("deterministic"), world.rules)
    assert len(set(strict.person_of.values())) == 4

    at_90 = persons(world.rt.engine, IdentityPolicy("probabilistic", 0.9), world.rules)
    assert at_90.person_of[ann] == at_90.person_of[ann_crm] and at_90.links_used == 1
    assert at_90.person_of[bob] != at_90.person_of[bob_crm]

    at_60 = persons(world.rt.engine, IdentityPolicy("probabilistic", 0.6), world.rules)
    assert at_60.person_of[bob] == at_60.person_of[bob_crm] and at_60.links_used == 2
    assert len(set(at_60.person_of.values())) == 2


def test_a_link_never_joins_two_user_ids(world: World) -> None:
    world.send(
        event("identify", userId="twin-a", traits={"email": "twin.a@acme.io"}),
        event("identify", userId="twin-b", traits={"email": "twin.b@acme.io"}),
    )
    world.resolve()
    _link(world, [{"a_type": "email", "a_value": "twin.a@acme.io", "b_type": "email", "b_value": "twin.b@acme.io", "score": 0.99, "evidence": {}}])
    result = persons(world.rt.engine, IdentityPolicy("probabilistic", 0.5), world.rules)
    a, b = world.profile_of("user_id", "twin-a"), world.profile_of("user_id", "twin-b")
    assert result.person_of[a] != result.person_of[b]
    assert [r["reason"] for r in result.refused] == ["conflicting_user_id"]
