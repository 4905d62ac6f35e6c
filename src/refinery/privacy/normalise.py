"""Normalising one identifier value: the reference semantics, and the half SQL cannot do.

Every value is: Unicode NFKC-normalised, stripped of control and format characters (zero-width
spaces, BOMs, direction marks), trimmed; emails are lower-cased; phones are parsed with
`phonenumbers` and written as E.164 (the event's `traits.country`, else the default region, for
numbers without a country code). A value that ends up empty, or that is no phone number, is
blocked with a reason.

Printable-ASCII values of types other than phone are normalised in SQL (`extract.py`: trim, and
lower-case for emails), which gives exactly what `normalise` gives for them (a property test
checks it); only phones and values with other characters come here, once per distinct value.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import phonenumbers

#: Characters removed outright: C0/C1 controls, and format characters (Cf: zero-width space/joiner,
#: BOM, bidi marks, soft hyphen) which render as nothing and make two equal-looking values differ.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs", "Cn"})
_SPACES = re.compile(r"\s+")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


@dataclass(frozen=True, slots=True)
class Normalised:
    value: str                 # the normalised value (when blocked: the cleaned text, to show)
    reason: str | None = None  # why it is blocked (empty, invalid_phone), else None


def needs_python(kind: str, raw: str) -> bool:
    """Whether SQL cannot normalise `raw` itself (mirrors the SQL predicate in extract.py)."""
    return kind == "phone" or _PRINTABLE_ASCII.fullmatch(raw) is None


def clean_text(raw: str) -> str:
    text = unicodedata.normalize("NFKC", raw)
    text = "".join(ch for ch in text if unicodedata.category(ch) not in _INVISIBLE_CATEGORIES or ch in "\t\n\r")
    text = _SPACES.sub(" ", text) if any(ch in text for ch in "\t\n\r\x0b\x0c") else text
    return text.strip(" \t\n\r\x0b\x0c\x85\xa0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


def normalise(kind: str, raw: str, region: str | None = None, default_region: str = "US") -> Normalised:
    """The normalised form of one value of identifier type `kind` (see the module docstring)."""
    text = clean_text(raw)
    if kind == "email":
        text = text.lower()
    if kind == "phone":
        return normalise_phone(text, region, default_region)
    return Normalised(text) if text else Normalised(text, "empty")


def normalise_phone(text: str, region: str | None, default_region: str) -> Normalised:
    if not text:
        return Normalised(text, "empty")
    hint = (region or "").strip().upper()
    hint = hint if len(hint) == 2 and hint.isalpha() else default_region.upper()
    try:
        number = phonenumbers.parse(text, hint)
    except phonenumbers.NumberParseException:
        return Normalised(text, "invalid_phone")
    if not phonenumbers.is_possible_number(number):
        return Normalised(text, "invalid_phone")
    return Normalised(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))
