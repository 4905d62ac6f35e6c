"""Consent purposes, as data: the four Refinery asks about, how CMP categories and IAB TCF v2
purposes map onto them, and the one check that refuses anything else.

Why these mappings: docs/decisions/0010-consent.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from refinery.errors import RefineryError

#: The purposes, in the order they are shown. Every consumer asks about one of these.
PURPOSES: tuple[str, ...] = ("analytics", "personalisation", "marketing", "advertising")
STATES: tuple[str, ...] = ("granted", "denied", "unknown")

PURPOSE_HELP: dict[str, str] = {
    "analytics": "Measure and understand use of the product (events kept for analysis, reports, audiences by statistics).",
    "personalisation": "Tailor content and the product to the person (profiles used for content, recommendations).",
    "marketing": "Contact the person about offers (email, SMS, push campaigns; activation to marketing tools).",
    "advertising": "Select and measure advertising (ad audiences, advertising ids, ad platforms).",
}

#: IAB TCF v2 purposes (policy 2.2 names) and the Refinery purpose each belongs to. A Refinery purpose
#: is granted by a TC string when *every* TCF purpose listed for it, and purpose 1 (storing or
#: reading information on the device, without which no other purpose can be served on the web),
#: has consent; denied when any of them lacks it. Legitimate-interest bits never grant.
TCF_PURPOSES: dict[int, tuple[str, str | None]] = {
    1: ("Store and/or access information on a device", None),  # a precondition of every purpose
    2: ("Use limited data to select advertising", "advertising"),
    3: ("Create profiles for personalised advertising", "advertising"),
    4: ("Use profiles to select personalised advertising", "advertising"),
    5: ("Create profiles to personalise content", "personalisation"),
    6: ("Use profiles to select personalised content", "personalisation"),
    7: ("Measure advertising performance", "advertising"),
    8: ("Measure content performance", "analytics"),
    9: ("Understand audiences through statistics or combinations of data from different sources", "analytics"),
    10: ("Develop and improve services", "analytics"),
}
TCF_STORAGE_PURPOSE = 1


def tcf_requirements() -> dict[str, frozenset[int]]:
    """For each Refinery purpose, the TCF purposes a TC string must consent to (marketing: none -
    the TCF covers advertising vendors, not a publisher's own messages, so it says nothing about it)."""
    out: dict[str, set[int]] = {}
    for tcf_id, (_, purpose) in TCF_PURPOSES.items():
        if purpose is not None:
            out.setdefault(purpose, {TCF_STORAGE_PURPOSE}).add(tcf_id)
    return {p: frozenset(ids) for p, ids in out.items()}


def from_tcf(purposes_consent: Iterable[int]) -> dict[str, str]:
    """The Refinery purposes a TC string's purpose-consent bits decide: `granted` or `denied`."""
    consented = set(purposes_consent)
    return {p: ("granted" if need <= consented else "denied") for p, need in sorted(tcf_requirements().items())}


#: CMP category names (Segment's `categoryPreferences` keys) understood without configuration,
#: compared case-insensitively. Settings `consent_categories` adds or overrides names.
DEFAULT_CATEGORIES: dict[str, str] = {
    **{p: p for p in PURPOSES},
    "personalization": "personalisation",
    "ads": "advertising",
    "targeting": "advertising",
    "performance": "analytics",
    "statistics": "analytics",
}


class UnknownPurpose(RefineryError):
    """A consent choice names a purpose Refinery does not know (a typo would silently mean nothing)."""

    http_status = 422
    code = "unknown_purpose"


class InvalidConsent(RefineryError):
    """A consent request is malformed: a state other than granted/denied, no identifier, nothing to record."""

    http_status = 422
    code = "invalid_consent"


def check_purpose(purpose: str) -> str:
    if purpose not in PURPOSES:
        raise UnknownPurpose(
            f"Unknown consent purpose {purpose!r}.",
            fix=f"Use one of: {', '.join(PURPOSES)}.", field="purposes", purpose=purpose, valid=list(PURPOSES),
        )
    return purpose


@dataclass(frozen=True)
class CategoryMap:
    """CMP category name (lower-cased) -> purpose."""

    names: Mapping[str, str]

    @classmethod
    def build(cls, extra: Mapping[str, str] | None = None) -> CategoryMap:
        names = dict(DEFAULT_CATEGORIES)
        for name, purpose in (extra or {}).items():
            names[name.strip().lower()] = check_purpose(purpose)
        return cls(names)

    def purpose(self, category: str) -> str | None:
        return self.names.get(category.strip().lower())


@dataclass(frozen=True)
class ConsentPolicy:
    """How a consumer treats `unknown`: allowed for the purposes in `unknown_allowed` (an opt-out
    regime), refused for the rest (opt-in: the default for every purpose). Denied is always refused."""

    unknown_allowed: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for p in self.unknown_allowed:
            check_purpose(p)

    def allows(self, purpose: str, state: str) -> bool:
        check_purpose(purpose)
        if state == "granted":
            return True
        if state == "denied":
            return False
        return purpose in self.unknown_allowed


def policy_from_settings(settings: object) -> ConsentPolicy:
    """The server's default policy (`consent_unknown_allowed`)."""
    return ConsentPolicy(frozenset(getattr(settings, "consent_unknown_allowed", ())))
