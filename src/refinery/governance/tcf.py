"""IAB TCF v2 TC strings: decode the core segment, refuse anything malformed or forged.

A TC string is one or more base64url segments joined by `.`; the first is the *core* segment
(the published "Consent string and vendor list formats v2", IAB Tech Lab). Its bits, in order:
version (6), created and last updated (36 each, deciseconds since the epoch), CMP id and version
(12 each), consent screen (6), consent language (2 letters of 6 bits), vendor list version (12),
TCF policy version (6), service specific (1), non-standard texts (1), special feature opt-ins (12),
purposes consent (24), purposes legitimate interest (24), purpose one treatment (1), publisher
country (2 letters), then the vendor consent and vendor legitimate-interest sections (a maximum
vendor id (16), then a bit field or a list of ranges), then the publisher restrictions.

Why not the `iab-tcf` package (0.2.2, last released 2022, see docs/decisions/0010-consent.md):
it reads past the end of a string as zeros, so a truncated or forged three-character string
decodes as a version-2 string that consents to *every* purpose. Here every read is bounds-checked
and every structural rule is checked; a bad string raises `TCFError` naming the field and bit
offset, never another exception.

`encode` writes a core segment back (tests build forged strings with it; a decoded real string
re-encodes to itself).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from refinery.errors import RefineryError

__all__ = ["TCFError", "TCString", "decode", "encode"]

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
#: The longest TC string accepted (a full vendor bit field over ~1,200 vendors is ~250 characters;
#: a string with every range and restriction imaginable stays well below this).
MAX_LENGTH = 16_384
#: How far in the future a string's `created`/`last_updated` may be (clock skew between CMP and us).
FUTURE_SKEW = timedelta(days=1)
#: The TCF launched in 2020 (v2.0); earlier timestamps in a v2 string are forged or broken.
EARLIEST = datetime(2019, 1, 1, tzinfo=UTC)
_RESTRICTION_TYPES = {0: "not_allowed", 1: "require_consent", 2: "require_legitimate_interest"}
_SEGMENT_TYPES = {1: "disclosed_vendors", 2: "allowed_vendors", 3: "publisher_tc"}


class TCFError(RefineryError):
    """A TC string that cannot be trusted: malformed, truncated, not version 2, or inconsistent."""

    http_status = 422
    code = "invalid_tc_string"


@dataclass(frozen=True)
class TCString:
    """The decoded core segment. Sets hold the ids whose bit is 1."""

    version: int
    created: datetime
    last_updated: datetime
    cmp_id: int
    cmp_version: int
    consent_screen: int
    consent_language: str
    vendor_list_version: int
    policy_version: int
    is_service_specific: bool
    use_non_standard_texts: bool
    special_feature_optins: frozenset[int]
    purposes_consent: frozenset[int]
    purposes_legitimate_interest: frozenset[int]
    purpose_one_treatment: bool
    publisher_cc: str
    max_vendor_consent: int
    vendor_consents: frozenset[int]
    vendor_consent_ranges: bool
    max_vendor_legitimate_interest: int
    vendor_legitimate_interests: frozenset[int]
    vendor_legitimate_interest_ranges: bool
    publisher_restrictions: tuple[tuple[int, str, frozenset[int]], ...] = ()
    other_segments: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (the evidence kept beside consent receipts)."""
        return {
            "version": self.version, "created": self.created.isoformat(), "last_updated": self.last_updated.isoformat(),
            "cmp_id": self.cmp_id, "cmp_version": self.cmp_version, "vendor_list_version": self.vendor_list_version,
            "policy_version": self.policy_version, "consent_language": self.consent_language, "publisher_cc": self.publisher_cc,
            "purposes_consent": sorted(self.purposes_consent),
            "purposes_legitimate_interest": sorted(self.purposes_legitimate_interest),
            "special_feature_optins": sorted(self.special_feature_optins),
            "vendor_consents": len(self.vendor_consents), "vendor_legitimate_interests": len(self.vendor_legitimate_interests),
            "other_segments": list(self.other_segments),
        }


class _Bits:
    """A bounds-checked big-endian bit reader; every read names the field it is for."""

    def __init__(self, data: bytes):
        self.value = int.from_bytes(data, "big") if data else 0
        self.length = len(data) * 8
        self.pos = 0

    def read(self, n: int, what: str) -> int:
        if self.pos + n > self.length:
            raise TCFError(
                f"The TC string ends inside {what}: it needs {n} bits at bit {self.pos}, but has only {self.length - self.pos} left.",
                fix="The string is truncated or forged; send the CMP's whole TC string (from __tcfapi getTCData: tcString).",
                field="tcString", bit=self.pos,
            )
        shift = self.length - self.pos - n
        self.pos += n
        return (self.value >> shift) & ((1 << n) - 1)

    def flag(self, what: str) -> bool:
        return self.read(1, what) == 1

    def bitset(self, n: int, what: str) -> frozenset[int]:
        bits = self.read(n, what) if n else 0
        return frozenset(i + 1 for i in range(n) if bits >> (n - 1 - i) & 1)

    def letters(self, what: str) -> str:
        a, b = self.read(6, what), self.read(6, what)
        if a > 25 or b > 25:
            raise TCFError(
                f"{what} is not two letters A-Z (6-bit values {a} and {b}).",
                fix="The string is malformed or forged; send the CMP's TC string unchanged.", field="tcString", bit=self.pos - 12,
            )
        return chr(65 + a) + chr(65 + b)

    def time(self, what: str) -> datetime:
        deciseconds = self.read(36, what)
        return datetime.fromtimestamp(deciseconds / 10, UTC)


def _b64(segment: str, index: int) -> bytes:
    bad = _B64URL.fullmatch(segment)
    if bad is None:
        where = next(i for i, ch in enumerate(segment) if not _B64URL.fullmatch(ch))
        raise TCFError(
            f"Segment {index + 1} of the TC string has {segment[where]!r} at character {where + 1}; TC strings are base64url (A-Z a-z 0-9 - _).",
            fix="Send the string exactly as the CMP gave it (no URL-encoding, quotes or padding).", field="tcString",
        )
    if not segment:
        raise TCFError(f"Segment {index + 1} of the TC string is empty.", fix="Send the CMP's TC string unchanged.", field="tcString")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as e:
        raise TCFError(
            f"Segment {index + 1} of the TC string is not valid base64url ({e}).",
            fix="Send the CMP's TC string unchanged.", field="tcString",
        ) from e


def _vendors(bits: _Bits, what: str) -> tuple[int, frozenset[int], bool]:
    max_id = bits.read(16, f"{what}: MaxVendorId")
    ranges = bits.flag(f"{what}: IsRangeEncoding")
    if not ranges:
        return max_id, bits.bitset(max_id, f"{what}: the vendor bit field ({max_id} bits)"), False
    return max_id, _ranges(bits, f"{what}: NumEntries", max_id, what), True


def _ranges(bits: _Bits, count_what: str, max_id: int | None, what: str) -> frozenset[int]:
    ids: set[int] = set()
    for i in range(bits.read(12, count_what)):
        is_range = bits.flag(f"{what}: entry {i + 1} IsARange")
        start = bits.read(16, f"{what}: entry {i + 1} StartOrOnlyVendorId")
        end = bits.read(16, f"{what}: entry {i + 1} EndVendorId") if is_range else start
        if start < 1 or end < start or (max_id is not None and end > max_id):
            raise TCFError(
                f"{what}: entry {i + 1} names vendors {start}-{end}, outside 1-{max_id if max_id is not None else 65535} "
                "or with the end before the start.",
                fix="The string is forged or built by a broken CMP; ask the CMP vendor, and do not rely on it.",
                field="tcString", bit=bits.pos,
            )
        ids.update(range(start, end + 1))
    return frozenset(ids)


def _check_plausible(created: datetime, last_updated: datetime, cmp_id: int, now: datetime) -> None:
    for name, value in (("Created", created), ("LastUpdated", last_updated)):
        if value < EARLIEST or value > now + FUTURE_SKEW:
            raise TCFError(
                f"The TC string's {name} is {value.isoformat()}, outside {EARLIEST.date()} .. now; "
                "the string is forged or its CMP's clock is broken.",
                fix="Send a string the CMP produced for this visit.", field="tcString",
            )
    if last_updated < created:
        raise TCFError(
            f"The TC string was last updated ({last_updated.isoformat()}) before it was created ({created.isoformat()}).",
            fix="The string is forged or built by a broken CMP; do not rely on it.", field="tcString",
        )
    if cmp_id < 2:
        raise TCFError(
            f"The TC string names CMP id {cmp_id}; registered CMP ids start at 2.",
            fix="The string is forged or was built by a test tool; use one from a registered CMP.", field="tcString",
        )


def decode(tc_string: str, *, now: datetime | None = None, plausible: bool = True) -> TCString:
    """Decode and check a TC string; raise `TCFError` (HTTP 422) saying what is wrong with a bad one.

    The structure is always checked. `plausible=False` skips the checks of times and CMP id (for
    inspecting test strings); consent is never recorded from a string that fails them."""
    if not isinstance(tc_string, str) or not tc_string.strip():
        raise TCFError("The TC string is empty.", fix="Send the CMP's TC string (from __tcfapi getTCData: tcString).", field="tcString")
    if len(tc_string) > MAX_LENGTH:
        raise TCFError(
            f"The TC string is {len(tc_string)} characters long; the most accepted is {MAX_LENGTH}.",
            fix="Send one TC string, not a concatenation or a payload.", field="tcString",
        )
    segments = tc_string.strip().split(".")
    core = _b64(segments[0], 0)
    bits = _Bits(core)
    version = bits.read(6, "Version")
    if version != 2:
        raise TCFError(
            f"The TC string is version {version}; only TCF v2 strings are accepted"
            + (" (v1.1 consent strings start with 'B' and are no longer valid under the framework)." if version == 1 else "."),
            fix="Upgrade the CMP to TCF v2.2, or record the choice through /api/consent with purposes instead.",
            field="tcString", version=version,
        )
    created = bits.time("Created")
    last_updated = bits.time("LastUpdated")
    cmp_id = bits.read(12, "CmpId")
    cmp_version = bits.read(12, "CmpVersion")
    consent_screen = bits.read(6, "ConsentScreen")
    language = bits.letters("ConsentLanguage")
    vendor_list_version = bits.read(12, "VendorListVersion")
    policy_version = bits.read(6, "TcfPolicyVersion")
    service_specific = bits.flag("IsServiceSpecific")
    non_standard = bits.flag("UseNonStandardTexts")
    special = bits.bitset(12, "SpecialFeatureOptIns")
    purposes = bits.bitset(24, "PurposesConsent")
    purposes_li = bits.bitset(24, "PurposesLITransparency")
    p1_treatment = bits.flag("PurposeOneTreatment")
    publisher_cc = bits.letters("PublisherCC")
    max_vc, vendor_consents, vc_ranges = _vendors(bits, "Vendor consents")
    max_vli, vendor_li, vli_ranges = _vendors(bits, "Vendor legitimate interests")
    restrictions = []
    for i in range(bits.read(12, "NumPubRestrictions")):
        purpose = bits.read(6, f"publisher restriction {i + 1}: PurposeId")
        kind = bits.read(2, f"publisher restriction {i + 1}: RestrictionType")
        if not 1 <= purpose <= 24 or kind not in _RESTRICTION_TYPES:
            raise TCFError(
                f"Publisher restriction {i + 1} names purpose {purpose} with restriction type {kind}; "
                "purposes are 1-24 and types 0-2 (type 3 is reserved).",
                fix="The string is forged or built by a broken CMP; do not rely on it.", field="tcString", bit=bits.pos,
            )
        vendors = _ranges(bits, f"publisher restriction {i + 1}: NumEntries", None, f"publisher restriction {i + 1}")
        restrictions.append((purpose, _RESTRICTION_TYPES[kind], vendors))

    if plausible:
        _check_plausible(created, last_updated, cmp_id, now or datetime.now(UTC))

    others = []
    for i, segment in enumerate(segments[1:], start=1):
        seg = _Bits(_b64(segment, i))
        kind = seg.read(3, f"segment {i + 1}: SegmentType")
        if kind not in _SEGMENT_TYPES:
            raise TCFError(
                f"Segment {i + 1} of the TC string has segment type {kind}; only 1 (disclosed vendors), "
                "2 (allowed vendors) and 3 (publisher TC) may follow the core string.",
                fix="Send the CMP's TC string unchanged.", field="tcString",
            )
        others.append(_SEGMENT_TYPES[kind])

    return TCString(
        version, created, last_updated, cmp_id, cmp_version, consent_screen, language, vendor_list_version, policy_version,
        service_specific, non_standard, special, purposes, purposes_li, p1_treatment, publisher_cc,
        max_vc, vendor_consents, vc_ranges, max_vli, vendor_li, vli_ranges, tuple(restrictions), tuple(others),
    )


# --- encoding (the core segment) ------------------------------------------------------------

class _Writer:
    def __init__(self) -> None:
        self.value = 0
        self.length = 0

    def put(self, value: int, n: int) -> None:
        if value < 0 or value >= 1 << n:
            raise ValueError(f"{value} does not fit in {n} bits")
        self.value = (self.value << n) | value
        self.length += n

    def bitset(self, ids: frozenset[int], n: int) -> None:
        for i in range(1, n + 1):
            self.put(1 if i in ids else 0, 1)

    def letters(self, text: str) -> None:
        for ch in text.upper():
            self.put(ord(ch) - 65, 6)

    def time(self, value: datetime) -> None:
        self.put(round(value.timestamp() * 10), 36)

    def ranges(self, ids: frozenset[int]) -> None:
        runs: list[tuple[int, int]] = []
        for i in sorted(ids):
            if runs and runs[-1][1] == i - 1:
                runs[-1] = (runs[-1][0], i)
            else:
                runs.append((i, i))
        self.put(len(runs), 12)
        for start, end in runs:
            self.put(1 if end > start else 0, 1)
            self.put(start, 16)
            if end > start:
                self.put(end, 16)

    def text(self) -> str:
        pad = -self.length % 8
        data = (self.value << pad).to_bytes((self.length + pad) // 8, "big")
        return base64.urlsafe_b64encode(data).decode().rstrip("=")


def encode(tc: TCString, *, version: int | None = None) -> str:
    """The core segment of `tc` as a TC string (`version` overrides the version field, for tests)."""
    w = _Writer()
    w.put(tc.version if version is None else version, 6)
    w.time(tc.created)
    w.time(tc.last_updated)
    w.put(tc.cmp_id, 12)
    w.put(tc.cmp_version, 12)
    w.put(tc.consent_screen, 6)
    w.letters(tc.consent_language)
    w.put(tc.vendor_list_version, 12)
    w.put(tc.policy_version, 6)
    w.put(int(tc.is_service_specific), 1)
    w.put(int(tc.use_non_standard_texts), 1)
    w.bitset(tc.special_feature_optins, 12)
    w.bitset(tc.purposes_consent, 24)
    w.bitset(tc.purposes_legitimate_interest, 24)
    w.put(int(tc.purpose_one_treatment), 1)
    w.letters(tc.publisher_cc)
    for max_id, ids, ranged in (
        (tc.max_vendor_consent, tc.vendor_consents, tc.vendor_consent_ranges),
        (tc.max_vendor_legitimate_interest, tc.vendor_legitimate_interests, tc.vendor_legitimate_interest_ranges),
    ):
        w.put(max_id, 16)
        w.put(int(ranged), 1)
        if ranged:
            w.ranges(ids)
        else:
            w.bitset(ids, max_id)
    w.put(len(tc.publisher_restrictions), 12)
    codes = {v: k for k, v in _RESTRICTION_TYPES.items()}
    for purpose, kind, vendors in tc.publisher_restrictions:
        w.put(purpose, 6)
        w.put(codes[kind], 2)
        w.ranges(vendors)
    return w.text()
