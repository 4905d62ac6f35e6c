"""The consent rule in plain Python: latest per identifier, most restrictive across a profile's identifiers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from consent_tc_strings import RANGE

from refinery.governance.consent import Signal, choices_from_request, latest_per_identifier, profile_state
from refinery.governance.purposes import PURPOSES, CategoryMap, ConsentPolicy, InvalidConsent, UnknownPurpose
from refinery.governance.tcf import TCFError

T = datetime(2026, 1, 1, tzinfo=UTC)


def sig(value: str, state: str, minutes: int, log_id: int, purpose: str = "marketing", kind: str = "anonymous_id") -> Signal:
    return Signal(kind, value, purpose, state, T + timedelta(minutes=minutes), log_id)


def test_a_newer_grant_of_the_same_identifier_replaces_its_denial() -> None:
    latest = latest_per_identifier([sig("a", "denied", 0, 1), sig("a", "granted", 5, 2)])
    assert profile_state("marketing", latest.values()).state == "granted"


def test_an_older_grant_does_not_replace_a_newer_denial_even_if_recorded_later() -> None:
    latest = latest_per_identifier([sig("a", "denied", 5, 1), sig("a", "granted", 0, 2)])
    assert profile_state("marketing", latest.values()).state == "denied"


def test_a_tie_in_time_goes_to_the_denial() -> None:
    latest = latest_per_identifier([sig("a", "granted", 0, 2), sig("a", "denied", 0, 1)])
    assert profile_state("marketing", latest.values()).state == "denied"


def test_across_identifiers_the_denial_wins_even_when_a_grant_is_newer_and_it_is_a_conflict() -> None:
    latest = latest_per_identifier([sig("a", "denied", 0, 1), sig("b", "granted", 10, 2)])
    state = profile_state("marketing", latest.values())
    assert (state.state, state.subject, state.conflict) == ("denied", "anonymous_id:a", True)


def test_agreeing_identifiers_are_no_conflict_and_the_newest_receipt_decides() -> None:
    latest = latest_per_identifier([sig("a", "granted", 0, 1), sig("b", "granted", 10, 2)])
    state = profile_state("marketing", latest.values())
    assert (state.state, state.log_id, state.conflict) == ("granted", 2, False)


def test_no_receipt_is_unknown_and_purposes_do_not_leak() -> None:
    latest = latest_per_identifier([sig("a", "denied", 0, 1, purpose="advertising")])
    assert profile_state("marketing", latest.values()).state == "unknown"
    assert profile_state("advertising", latest.values()).state == "denied"


def test_policy_unknown_is_refused_unless_the_purpose_is_opt_out() -> None:
    strict = ConsentPolicy()
    assert not strict.allows("analytics", "unknown") and strict.allows("analytics", "granted")
    opt_out = ConsentPolicy(frozenset({"analytics"}))
    assert opt_out.allows("analytics", "unknown") and not opt_out.allows("analytics", "denied")
    assert not opt_out.allows("marketing", "unknown")
    with pytest.raises(UnknownPurpose):
        ConsentPolicy(frozenset({"email"}))


def test_request_choices_refuse_unknown_purposes_naming_the_valid_ones() -> None:
    with pytest.raises(UnknownPurpose) as e:
        choices_from_request({"marketing": "granted", "newsletter": "granted"}, None)
    assert "'newsletter'" in e.value.message and all(p in (e.value.fix or "") for p in PURPOSES)
    assert e.value.http_status == 422


@pytest.mark.parametrize("bad", [{"marketing": "yes"}, {"marketing": None}, {}, None])
def test_request_choices_refuse_non_choices(bad: dict[str, object] | None) -> None:
    with pytest.raises(InvalidConsent):
        choices_from_request(bad, None)


def test_request_choices_from_tcf_and_purposes_combine_restrictively() -> None:
    choices, tcf = choices_from_request({"marketing": True, "analytics": "granted"}, RANGE)
    assert choices["marketing"] == "granted"       # TCF says nothing about marketing
    assert choices["analytics"] == "denied"        # the string refuses it; the request grants it: restrictive
    assert tcf is not None and tcf["cmp_id"] == 3
    with pytest.raises(TCFError):
        choices_from_request(None, "Clc")


def test_category_map_is_case_insensitive_and_configurable() -> None:
    cats = CategoryMap.build({"C0004": "advertising"})
    assert cats.purpose("Analytics") == "analytics" and cats.purpose("Personalization") == "personalisation"
    assert cats.purpose("c0004") == "advertising" and cats.purpose("Functional") is None
    with pytest.raises(UnknownPurpose):
        CategoryMap.build({"C0002": "statistics-ish"})
