"""`identity.plan`: a changed rule set against history, as a dry run that writes nothing."""

from __future__ import annotations

from typing import Any

from identity_helpers import Identity, event

from refinery.identity import IdentityRules, parse_rules
from refinery.identity.plan import plan

TABLES = ("identities", "identity_edges", "identity_blocked", "profile_merges", "identity_resolutions")


def _state(ident: Identity) -> dict[str, list[str]]:
    return {t: sorted(map(str, ident.rows(f"SELECT * FROM {t}"))) for t in TABLES}  # noqa: S608 - constant names


def _plan(ident: Identity, current: IdentityRules, proposed: IdentityRules) -> dict[str, Any]:
    return ident.rt.writer.call(lambda e: plan(e, current, proposed))  # type: ignore[no-any-return]


def test_a_stricter_rule_shows_the_split_with_examples_and_writes_nothing(ident: Identity) -> None:
    # One email on two devices joins them; blocking that email would split them again.
    ident.send(
        event(anonymousId="ann-laptop", traits={"email": "ann@shop.io"}, minutes=0),
        event(anonymousId="ann-phone", traits={"email": "ann@shop.io"}, minutes=1),
        event(anonymousId="bo-laptop", traits={"email": "bo@shop.io"}, minutes=2),
    )
    ident.resolve()
    before = _state(ident)
    stricter = parse_rules({"blocked": {"values": ["ann@shop.io"]}})
    result = _plan(ident, IdentityRules(), stricter)
    assert (result["merges"], result["splits"]) == (0, 1)
    assert result["profiles"] == {"current": 2, "proposed": 3}
    assert result["newly_blocked"] == {"blocked_value": 1} and result["unblocked"] == {}
    [split] = result["split_examples"]
    assert split["profile_id"] == ident.profile("email", "ann@shop.io")
    assert sorted(i["value"] for p in split["into_profiles"] for i in p["identifiers"]) == ["ann-laptop", "ann-phone"]
    assert result["stored_differs"] == 0
    assert _state(ident) == before
    assert not ident.rows("SELECT table_name FROM duckdb_tables() WHERE temporary AND table_name LIKE '\\_id%' ESCAPE '\\'")


def test_the_same_rules_change_nothing_and_new_data_is_told_apart(ident: Identity) -> None:
    ident.send(event(anonymousId="a1", userId="u1", minutes=0))
    ident.resolve()
    ident.send(event(anonymousId="a2", userId="u1", minutes=1))  # arrived after the last resolution
    result = _plan(ident, IdentityRules(), IdentityRules())
    assert (result["merges"], result["splits"], result["identifiers_changing_status"]) == (0, 0, 0)
    assert result["stored_differs"] == 1
