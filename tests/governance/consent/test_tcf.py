"""TCF v2 decoding on real TC strings, and refusal of malformed and forged ones.

The real strings and their expected contents are those published as test vectors with the CPAN
module GDPR::IAB::TCFv2 (t/01-parse.t), written by CMPs with registered ids (3, 11, 21, 125, 888);
the expectations were stated there independently of this decoder.
"""

from __future__ import annotations

import contextlib
import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from consent_tc_strings import BITFIELD, PUBLISHER_TC, RANGE, RESTRICTION_1, RESTRICTION_2, RESTRICTION_3, V1

from refinery.governance.purposes import TCF_PURPOSES, from_tcf, tcf_requirements
from refinery.governance.tcf import TCFError, TCString, decode, encode

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_bitfield_string_decodes_every_core_field() -> None:
    tc = decode(BITFIELD, plausible=False)
    assert tc.version == 2
    assert tc.created == datetime.fromtimestamp(1228644257.7, UTC)
    assert tc.last_updated == datetime.fromtimestamp(1326215413.4, UTC)
    assert (tc.cmp_id, tc.cmp_version, tc.consent_screen) == (21, 7, 2)
    assert (tc.consent_language, tc.publisher_cc) == ("EN", "KM")
    assert (tc.vendor_list_version, tc.policy_version) == (23, 2)
    assert tc.is_service_specific and not tc.use_non_standard_texts and not tc.purpose_one_treatment
    assert tc.purposes_consent == {1, 3, 9, 10}
    assert tc.purposes_legitimate_interest == {3, 4, 5, 8, 9, 10}
    assert tc.special_feature_optins == {2}
    assert not tc.vendor_consent_ranges and tc.max_vendor_consent == 115
    assert tc.vendor_consents == {
        2, 3, 6, 7, 8, 10, 12, 13, 14, 15, 16, 21, 25, 27, 30, 31, 34, 35, 37, 38, 39, 42, 43, 49, 52, 54, 55, 56, 57, 59,
        60, 63, 64, 65, 66, 67, 68, 69, 73, 74, 76, 78, 83, 86, 87, 89, 90, 92, 96, 99, 100, 106, 109, 110, 114, 115,
    }
    assert tc.max_vendor_legitimate_interest == 113
    assert tc.vendor_legitimate_interests == {1, 9, 26, 27, 30, 36, 37, 43, 86, 97, 110, 113}
    assert tc.publisher_restrictions == ()


def test_range_encoded_vendors() -> None:
    tc = decode(RANGE, now=NOW)
    assert tc.created == tc.last_updated == datetime.fromtimestamp(1587946020, UTC)
    assert (tc.cmp_id, tc.cmp_version, tc.consent_screen, tc.vendor_list_version) == (3, 2, 7, 48)
    assert tc.publisher_cc == "AA" and not tc.is_service_specific
    assert tc.purposes_consent == frozenset() and tc.special_feature_optins == frozenset()
    assert tc.vendor_consent_ranges and tc.max_vendor_consent == 626
    assert tc.vendor_consents == {23, 42, 126, 127, 128, 587, 613, 626}
    assert tc.max_vendor_legitimate_interest == 628
    assert tc.vendor_legitimate_interests == {24, 44, 129, 130, 131, 591, 614, 628}


def _restrictions(tc: TCString, vendor: int) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for purpose, kind, vendors in tc.publisher_restrictions:
        if vendor in vendors:
            out.setdefault(purpose, set()).add(kind)
    return out


def test_publisher_restrictions() -> None:
    one = decode(RESTRICTION_1, now=NOW)
    assert _restrictions(one, 32) == {7: {"require_consent"}}
    assert _restrictions(one, 7) == {} and _restrictions(one, 284) == {}
    two = decode(RESTRICTION_2, now=NOW)
    assert _restrictions(two, 32) == {
        1: {"not_allowed"}, 2: {"not_allowed", "require_consent"}, 7: {"not_allowed", "require_consent"},
        10: {"not_allowed", "require_consent"},
    }
    assert {"not_allowed"} <= _restrictions(two, 5)[2] and {"not_allowed"} <= _restrictions(two, 11)[2]
    assert 2 not in _restrictions(two, 44) and 2 not in _restrictions(two, 500)
    assert _restrictions(decode(RESTRICTION_3, now=NOW), 284) == {}


def test_other_segments_are_recognised() -> None:
    assert decode(PUBLISHER_TC, plausible=False).other_segments == ("publisher_tc",)


@pytest.mark.parametrize("real", [BITFIELD, RANGE, RESTRICTION_1, RESTRICTION_2, RESTRICTION_3])
def test_real_strings_re_encode_to_themselves(real: str) -> None:
    assert encode(decode(real, plausible=False)) == real


# --- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("", "empty"),
        ("Clc", "ends inside Created"),
        (RANGE[:-3] + "!A", "'!' at character"),
        (RANGE.replace("C", "%43", 1), "'%' at character 1"),
        ("COvcSpYOvcSpYC9AAAENAPCAAAAAAAAAAAAAAFAAAAA", "ends inside Vendor legitimate interests"),
        ("COvcSpYOvcSpYC9AAAENAPCAAAAAAAAAAAAAAFQBgAAgABAACAAEAAQAAgAA", "ends inside Vendor legitimate interests"),
        (RANGE[:40], "ends inside"),
        (RANGE + ".", "Segment 2 of the TC string is empty"),
        (RANGE + ".AAAA", "segment type 0"),
        ("C" * 20_000, "characters long"),
    ],
)
def test_malformed_strings_are_refused_with_the_reason(bad: str, says: str) -> None:
    with pytest.raises(TCFError) as e:
        decode(bad, now=NOW)
    assert says in e.value.message
    assert e.value.http_status == 422 and e.value.fix


def test_version_1_and_3_strings_are_refused() -> None:
    with pytest.raises(TCFError, match="version 1"):
        decode(V1, now=NOW)
    v3 = encode(decode(RANGE, now=NOW), version=3)
    with pytest.raises(TCFError, match="version 3; only TCF v2"):
        decode(v3, now=NOW)


def _forge(**changes: object) -> str:
    return encode(dataclasses.replace(decode(RANGE, now=NOW), **changes))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"created": NOW + timedelta(days=30), "last_updated": NOW + timedelta(days=30)}, "Created is 2026-01-31"),
        ({"created": datetime(2010, 1, 1, tzinfo=UTC)}, "Created is 2010"),
        ({"last_updated": datetime(2020, 1, 1, tzinfo=UTC)}, "last updated (2020-01-01"),
        ({"cmp_id": 0}, "CMP id 0"),
        ({"publisher_restrictions": ((25, "not_allowed", frozenset({1})),)}, "purpose 25"),
    ],
)
def test_forged_strings_are_refused(changes: dict[str, object], says: str) -> None:
    with pytest.raises(TCFError) as e:
        decode(_forge(**changes), now=NOW)
    assert says in e.value.message


def test_a_vendor_range_beyond_the_maximum_is_refused() -> None:
    forged = _forge(vendor_consents=frozenset({5, 900}))  # max_vendor_consent stays 626
    with pytest.raises(TCFError, match="vendors 900-900, outside 1-626"):
        decode(forged, now=NOW)


def test_the_2008_test_string_is_implausible_but_structurally_sound() -> None:
    with pytest.raises(TCFError, match="Created is 2008"):
        decode(BITFIELD, now=NOW)


def test_garbage_never_raises_anything_but_tcf_error() -> None:
    import random

    rng = random.Random(4)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    for _ in range(2000):
        text = "C" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 120)))
        with contextlib.suppress(TCFError):
            decode(text, now=NOW)


# --- mapping to purposes -------------------------------------------------------------------

def test_every_tcf_purpose_1_to_10_is_mapped_and_marketing_is_not_decided_by_tcf() -> None:
    assert sorted(TCF_PURPOSES) == list(range(1, 11))
    need = tcf_requirements()
    assert set(need) == {"analytics", "personalisation", "advertising"}
    assert all(1 in ids for ids in need.values())


def test_purposes_from_a_real_string() -> None:
    # purposes 1, 3, 9, 10: storage and analytics-related 9, 10 but not 8 -> analytics denied
    assert from_tcf(decode(BITFIELD, plausible=False).purposes_consent) == {
        "advertising": "denied", "analytics": "denied", "personalisation": "denied",
    }
    assert from_tcf({1, 8, 9, 10}) == {"advertising": "denied", "analytics": "granted", "personalisation": "denied"}
    assert from_tcf(range(1, 11)) == {"advertising": "granted", "analytics": "granted", "personalisation": "granted"}
    assert from_tcf({8, 9, 10, 5, 6}) == {"advertising": "denied", "analytics": "denied", "personalisation": "denied"}
