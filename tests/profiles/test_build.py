"""Profiles built from the identity graph: event attribution, trait policies, merges followed."""

from __future__ import annotations

from profile_helpers import World, event

from refinery.profiles import read
from refinery.profiles.policy import TraitPolicy


def test_anonymous_browsing_then_login_is_one_profile_with_all_events(world: World) -> None:
    world.send(
        event("page", anonymousId="cookie-1", name="Home"),
        event("track", anonymousId="cookie-1", event="Product Viewed", properties={"sku": "A1"}),
        event("identify", anonymousId="cookie-1", userId="u-1", traits={"email": " Jane@Acme.IO ", "plan": "free"}),
        event("track", userId="u-1", event="Order Completed", properties={"total": 30}),
    )
    world.resolve()
    pid = world.profile_of("user_id", "u-1")
    assert world.profile_of("anonymous_id", "cookie-1") == pid
    p = world.get(pid)
    assert p["event_count"] == 4 and p["sources"] == ["web"]
    assert p["identifiers"] == {"anonymous_id": ["cookie-1"], "user_id": ["u-1"], "email": ["jane@acme.io"]}
    # Personal trait values are kept in their normal form (as tokens; shown to pii:read in clear).
    assert p["traits"] == {"email": "jane@acme.io", "plan": "free"}
    timeline = world.timeline(pid)
    assert [e["type"] for e in timeline] == ["track", "identify", "track", "page"]
    assert {e["matched_by"] for e in timeline} == {"anonymous_id", "user_id"}
    # Looked up by the email as a person types it: normalised the way resolution normalises it.
    assert read.lookup(world.rt.engine, "email:JANE@acme.io  ", world.rules)["profile_id"] == pid


def test_trait_policies_latest_first_and_source_priority(world: World) -> None:
    world.send(event("identify", userId="u-2", minutes=1, traits={"plan": "free", "city": "Lyon", "nickname": "jo"}), source="web")
    world.send(event("identify", userId="u-2", minutes=2, traits={"plan": "pro", "city": "Paris"}), source="crm")
    world.send(event("identify", userId="u-2", minutes=3, traits={"plan": "team", "nickname": None}), source="web")

    world.resolve()
    p = read.lookup(world.rt.engine, "user_id:u-2", world.rules)
    # latest: the newest value wins, and an explicit null clears the trait.
    assert p["traits"] == {"plan": "team", "city": "Paris"}
    assert p["trait_sources"]["plan"]["source"] == "web" and p["trait_sources"]["plan"]["policy"] == "latest"

    world.resolve(TraitPolicy(default="first"))
    assert read.lookup(world.rt.engine, "user_id:u-2", world.rules)["traits"] == {"plan": "free", "city": "Lyon", "nickname": "jo"}

    world.resolve(TraitPolicy(default="latest", source_priority=("crm", "web"), per_trait={"plan": "source_priority"}))
    p = read.lookup(world.rt.engine, "user_id:u-2", world.rules)
    assert p["traits"] == {"plan": "pro", "city": "Paris"}
    assert p["trait_sources"]["plan"] | {"at": None} == {"source": "crm", "message_id": p["trait_sources"]["plan"]["message_id"], "at": None, "policy": "source_priority"}


def test_a_family_laptop_keeps_each_member_s_events_apart(world: World) -> None:
    world.send(
        event("identify", anonymousId="laptop", userId="mum", traits={"email": "mum@family.fr"}),
        event("track", anonymousId="laptop", userId="mum", event="Order Completed"),
        event("identify", anonymousId="laptop", userId="son", traits={"email": "son@family.fr"}),
        event("track", anonymousId="laptop", userId="son", event="Game Bought"),
        event("page", anonymousId="laptop", name="Home"),
    )
    world.resolve()
    mum, son = world.profile_of("user_id", "mum"), world.profile_of("user_id", "son")
    assert mum != son
    mum_events = {e["event"] for e in world.timeline(mum)}
    son_events = {e["event"] for e in world.timeline(son)}
    assert "Order Completed" in mum_events and "Game Bought" not in mum_events
    assert "Game Bought" in son_events and "Order Completed" not in son_events
    assert world.get(mum)["traits"]["email"] == "mum@family.fr"
    assert world.get(son)["traits"]["email"] == "son@family.fr"


def test_a_merged_profile_id_answers_with_the_survivor(world: World) -> None:
    world.send(event("identify", userId="u-3", minutes=10, traits={"email": "kim@shop.de"}))
    world.send(event("page", anonymousId="phone-cookie", minutes=5, name="Home"))
    world.resolve()
    old_anon_profile = world.profile_of("anonymous_id", "phone-cookie")
    assert old_anon_profile != world.profile_of("user_id", "u-3")

    # The cookie logs in: the two profiles merge; the older identifier (the cookie) keys the survivor.
    world.send(event("identify", anonymousId="phone-cookie", userId="u-3", minutes=20))
    world.resolve()
    live = world.profile_of("user_id", "u-3")
    assert world.profile_of("anonymous_id", "phone-cookie") == live
    gone = {old_anon_profile, read.survivor(world.rt.engine, old_anon_profile)}
    assert live in gone
    merges = world.rows("SELECT * FROM profile_merges WHERE undone_at IS NULL")
    assert len(merges) == 1 and merges[0]["surviving_profile_id"] == live
    absorbed = merges[0]["merged_profile_id"]
    p = world.get(absorbed)
    assert p["profile_id"] == live and p["merged_into"] == live and p["requested_id"] == absorbed
    assert p["event_count"] == 3
