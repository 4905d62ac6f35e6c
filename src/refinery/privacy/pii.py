"""Every decision about personal fields (email, phone, name, address, IP) lives here.

Today fields pass through unchanged into the clean zone; the governance work replaces
`protect_expression` with keyed HMAC tokens, so changing how PII is stored touches this module
only. `redact` keeps PII out of logs and error messages.
"""

from __future__ import annotations

import re
from typing import Any

from sqlglot import exp

#: Field names (in traits, properties and context) that hold personal data.
PII_FIELDS: frozenset[str] = frozenset(
    {
        "email", "phone", "name", "first_name", "last_name", "firstName", "lastName",
        "address", "street", "postal_code", "postalCode", "ip", "birthday",
    }
)

#: Clean-zone columns that hold personal data, with the kind of data each holds.
PII_COLUMNS: dict[str, str] = {"ip": "ip"}

_EMAIL = re.compile(r"[^@\s\"']+@[^@\s\"']+\.[A-Za-z]{2,}")
_PHONE = re.compile(r"\+?\d[\d ()-]{7,}\d")
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")


def protect_expression(column: str, value: exp.Expression) -> exp.Expression:
    """The SQL that stores `value` in clean-zone `column`. Identity until pseudonymisation lands."""
    return value


def protect_identifier(kind: str, value: exp.Expression) -> exp.Expression:
    """The SQL that stores a normalised identifier `value` of type `kind` (email, phone, ...) in the
    identity tables. Identity resolution calls it for every value of a PII type, after normalising
    and before comparing, so tokenising identifiers (issue 4) changes this function only.
    Identity until pseudonymisation lands."""
    return value


def redact(value: Any) -> Any:
    """A copy of `value` safe for logs: PII fields masked, emails/phones/IPs inside strings masked."""
    if isinstance(value, dict):
        return {k: ("[redacted]" if k in PII_FIELDS else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_text(text: str) -> str:
    text = _EMAIL.sub("[email]", text)
    text = _IPV4.sub("[ip]", text)
    return _PHONE.sub("[phone]", text)
