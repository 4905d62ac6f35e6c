"""Undo: removing an identifier or an edge, or splitting a profile, re-resolves and moves events and
traits; each override is recorded in identity_blocked (so explain shows it) and can be revoked."""

from __future__ import annotations

import json
from typing import Any

import pytest
from identity_helpers import Identity, event

from refinery.errors import ConflictError, NotFoundError
from refinery.identity import IdentityRules
from refinery.identity import overrides as ov
from refinery.identity.errors import OverrideError
from refinery.profiles.build import resolve_and_build
from refinery.profiles.explain import explain
from refinery.profiles.policy import TraitPolicy

RULES = IdentityRules()


def _override(ident: Identity, kind: str, identifiers: list[str], **kw: Any) -> ov.Override:
    policy = TraitPolicy.from_settings(ident.rt.settings)

    def work(e: Any) -> ov.Override:
        o = ov.create(e, RULES, kind, identifiers, actor="tester", **kw)
        resolve_and_build(e, RULES, policy)
        return o

    return ident.rt.writer.call(work)  # type: ignore[no-any-return]


def _revoke(ident: Identity, override_id: str) -> ov.Override:
    policy = TraitPolicy.from_settings(ident.rt.settings)

    def work(e: Any) -> ov.Override:
        o = ov.revoke(e, override_id, actor="tester")
        resolve_and_build(e, RULES, policy)
        return o

    return ident.rt.writer.call(work)  # type: ignore[no-any-return]


def _build(ident: Identity) -> None:
    policy = TraitPolicy.from_settings(ident.rt.settings)
    ident.rt.writer.call(lambda e: resolve_and_build(e, RULES, policy))


def _events_of(ident: Identity, profile_id: str | None) -> int:
    return int(ident.rows("SELECT count(*) AS n FROM event_profiles WHERE profile_id = ?", [profile_id])[0]["n"])


def _traits(ident: Identity, profile_id: str | None) -> dict[str, Any]:
    return json.loads(ident.rows("SELECT traits FROM profiles WHERE profile_id = ?", [profile_id])[0]["traits"])  # type: ignore[no-any-return]


@pytest.fixture
def merged(ident: Identity) -> Identity:
    """Jo's laptop cookie, Jo's login, and a shared-inbox email that wrongly joins Sam's CRM row."""
    ident.send(
        event("page", anonymousId="jo-laptop", minutes=0),
        event(anonymousId="jo-laptop", userId="jo", traits={"email": "team@shop.io", "plan": "pro"}, minutes=1),
        event("track", event="Viewed", anonymousId="jo-laptop", userId="jo", minutes=2),
        event(anonymousId="sam-phone", traits={"email": "team@shop.io", "name": "Sam"}, minutes=3),
        event("track", event="Viewed", anonymousId="sam-phone", minutes=4),
    )
    _build(ident)
    assert ident.profile("anonymous_id", "sam-phone") == ident.profile("user_id", "jo")
    return ident


def test_removing_an_identifier_blocks_it_and_moves_events_and_traits(merged: Identity) -> None:
    ident = merged
    jo = ident.profile("user_id", "jo")
    assert _events_of(ident, jo) == 5 and _traits(ident, jo)["name"] == "Sam"

    o = _override(ident, "remove_identifier", ["email:Team@Shop.io "], reason="shared inbox")
    assert o.identifiers == [{"type": "email", "value": ident.stored("email", "team@shop.io")}] and o.profile_id == jo
    email = ident.identity("email", "team@shop.io")
    assert (email["status"], email["reason"], email["profile_id"]) == ("blocked", "removed_by_user", None)
    sam = ident.profile("anonymous_id", "sam-phone")
    assert sam != ident.profile("user_id", "jo") == jo
    assert _events_of(ident, jo) == 3 and _events_of(ident, sam) == 2
    assert "name" not in _traits(ident, jo) and _traits(ident, sam)["name"] == "Sam"
    [row] = ident.blocked("removed_by_user")
    assert (row["kind"], row["profile_a"]) == ("identifier", jo)
    assert json.loads(row["evidence"])["override_id"] == o.override_id

    # Explain shows the removal, on the identifier and on the profile it was taken from.
    x = explain(ident.rt.engine, "email:team@shop.io", RULES)
    assert x["profile_id"] is None and x["refusals"][0]["reason"] == "removed_by_user"
    assert "removed_by_user" in {r["reason"] for r in explain(ident.rt.engine, "user_id:jo", RULES)["refusals"]}

    # Asking twice gives the same override; revoking brings the merge back (and records it).
    assert _override(ident, "remove_identifier", ["email:team@shop.io"]).override_id == o.override_id
    revoked = _revoke(ident, o.override_id)
    assert revoked.revoked_at is not None and revoked.revoked_by == "tester"
    assert ident.profile("anonymous_id", "sam-phone") == ident.profile("user_id", "jo") == jo
    assert _events_of(ident, jo) == 5 and not ident.blocked("removed_by_user")
    with pytest.raises(ConflictError):
        _revoke(ident, o.override_id)


def test_removing_an_edge_stops_using_it(merged: Identity) -> None:
    ident = merged
    jo = ident.profile("user_id", "jo")
    o = _override(ident, "remove_edge", ["anonymous_id:sam-phone", "email:team@shop.io"])
    sam = ident.profile("anonymous_id", "sam-phone")
    assert sam != jo and ident.profile("email", "team@shop.io") == jo
    team = ident.stored("email", "team@shop.io")
    [edge] = ident.rows("SELECT * FROM identity_edges WHERE (a_value = ? OR b_value = ?) AND "
                        "(a_value = 'sam-phone' OR b_value = 'sam-phone')", [team, team])
    assert (edge["status"], edge["reason"]) == ("blocked", "removed_by_user")
    [row] = ident.blocked("removed_by_user")
    assert row["kind"] == "edge" and {row["profile_a"], row["profile_b"]} == {jo, sam}
    assert json.loads(row["evidence"])["override_id"] == o.override_id
    # Sam's events go with Sam's cookie; the email stays with Jo (who logged in with it).
    assert _events_of(ident, sam) == 1 and _events_of(ident, jo) == 4
    assert [x.override_id for x in ov.list_overrides(ident.rt.engine)] == [o.override_id]


def test_an_edge_that_does_not_exist_is_refused_with_a_fix(merged: Identity) -> None:
    with pytest.raises(OverrideError, match="No edge joins") as e:
        _override(merged, "remove_edge", ["anonymous_id:sam-phone", "user_id:jo"])
    assert "split" in (e.value.fix or "")
    with pytest.raises(NotFoundError):
        _override(merged, "remove_identifier", ["user_id:nobody"])
    assert not ov.list_overrides(merged.rt.engine)


def test_a_split_separates_the_side_even_when_new_events_repeat_the_link(merged: Identity) -> None:
    ident = merged
    jo = ident.profile("user_id", "jo")
    o = _override(ident, "split", ["anonymous_id:sam-phone"], reason="Sam is not Jo")
    assert o.profile_id == jo and {(i["type"], i["value"]) for i in o.other_identifiers or []} == {
        ("anonymous_id", "jo-laptop"), ("user_id", "jo"), ("email", ident.stored("email", "team@shop.io"))}
    sam = ident.profile("anonymous_id", "sam-phone")
    assert sam != jo and ident.profile("email", "team@shop.io") == jo
    assert {r["reason"] for r in ident.blocked("split_by_user")} == {"split_by_user"}
    # The same link again in a new event is still cut; a merge that had been recorded is undone.
    ident.send(event(anonymousId="sam-phone", traits={"email": "team@shop.io"}, minutes=10))
    _build(ident)
    assert ident.profile("anonymous_id", "sam-phone") == sam != jo
    _revoke(ident, o.override_id)
    assert ident.profile("anonymous_id", "sam-phone") == jo


def test_a_split_must_leave_something_on_each_side(merged: Identity) -> None:
    everyone = ["anonymous_id:jo-laptop", "user_id:jo", "email:team@shop.io", "anonymous_id:sam-phone"]
    with pytest.raises(OverrideError, match="one side"):
        _override(merged, "split", everyone)
    merged.send(event(anonymousId="loner", minutes=20))
    _build(merged)
    with pytest.raises(OverrideError, match="not in profile"):
        _override(merged, "split", ["anonymous_id:loner"], profile=merged.profile("user_id", "jo"))


def test_overrides_survive_a_restart_and_apply_to_every_later_resolution(merged: Identity) -> None:
    o = _override(merged, "remove_identifier", ["email:team@shop.io"])
    merged.resolve()  # a plain resolution (CLI, API) applies overrides too
    assert merged.identity("email", "team@shop.io")["reason"] == "removed_by_user"
    rows = merged.rows("SELECT * FROM identity_overrides")
    assert [(r["override_id"], r["kind"], r["actor"], r["revoked_at"]) for r in rows] == [(o.override_id, "remove_identifier", "tester", None)]
