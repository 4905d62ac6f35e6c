"""Explain: the chain of evidence inside a profile, and what was kept apart from it, by which rule."""

from __future__ import annotations

import pytest
from profile_helpers import World, event

from refinery.errors import NotFoundError


def test_the_chain_names_the_events_that_joined_each_identifier(world: World) -> None:
    login = event("identify", anonymousId="c-1", userId="u-7", traits={"email": "ann@acme.io"})
    app_open = event("track", userId="u-7", event="App Opened", context={"device": {"id": "dev-9"}})
    world.send(event("page", anonymousId="c-1", name="Home"), login, app_open)
    world.resolve()

    x = world.explain("email:ANN@acme.io", world.rules)
    assert x["identifier"] == {"type": "email", "value": "ann@acme.io", "status": "linked", "reason": None}
    assert {(i["type"], i["value"]) for i in x["identifiers"]} == {
        ("anonymous_id", "c-1"), ("user_id", "u-7"), ("email", "ann@acme.io"), ("device_id", "dev-9"),
    }
    steps = {(s["identifier"]["type"], s["identifier"]["value"]): s for s in x["chain"]}
    # From the email, every other identifier is reached, each through the event that linked it.
    assert set(steps) == {("user_id", "u-7"), ("anonymous_id", "c-1"), ("device_id", "dev-9")}
    assert steps[("user_id", "u-7")]["message_id"] == login["messageId"]
    assert steps[("device_id", "dev-9")]["message_id"] == app_open["messageId"]
    assert steps[("device_id", "dev-9")]["joined_to"] == {"type": "user_id", "value": "u-7"}
    assert x["refusals"] == [] and x["merges"] == []


def test_an_alias_between_two_known_users_is_shown_as_kept_apart(world: World) -> None:
    world.send(event("identify", userId="alice"), event("identify", userId="bob"))
    alias = event("alias", userId="alice", previousId="bob")
    world.send(alias)
    world.resolve()
    alice, bob = world.profile_of("user_id", "alice"), world.profile_of("user_id", "bob")
    assert alice != bob

    x = world.explain("user_id:alice", world.rules)
    [refusal] = [r for r in x["refusals"] if r["kind"] == "merge"]
    assert refusal["reason"] == "conflicting_user_id"
    assert refusal["message_id"] == alias["messageId"]
    assert set(refusal["profiles_kept_apart"]) == {alice, bob}


def test_a_blocked_identifier_explains_why_it_links_nobody(world: World) -> None:
    world.send(event("identify", anonymousId="undefined", userId="u-8"), event("identify", anonymousId="undefined", userId="u-9"))
    world.resolve()
    assert world.profile_of("user_id", "u-8") != world.profile_of("user_id", "u-9")
    x = world.explain("anonymous_id:undefined", world.rules)
    assert x["profile_id"] is None and x["identifier"]["status"] == "blocked"
    assert [r["reason"] for r in x["refusals"]] == ["blocked_value"]


def test_an_unknown_identifier_is_a_clear_error(world: World) -> None:
    world.resolve()
    with pytest.raises(NotFoundError, match="No identifier"):
        world.explain("email:nobody@acme.io", world.rules)
