"""Every decision about personal fields (email, phone, name, address, IP) lives here.

Personal fields are replaced by keyed tokens before cleaning (`privacy/tokens.py`, sealed values
in `privacy/vault.py`); `protect_identifier` gives a user-supplied identifier its stored form, so
lookups by email or phone find the token. `redact` keeps PII out of logs and error messages.
"""

from __future__ import annotations

import re
from typing import Any

from sqlglot import exp

from refinery.privacy.tokens import Tokeniser, is_token

#: Field names (in traits, properties and context) that hold personal data.
PII_FIELDS: frozenset[str] = frozenset(
    {
        "email", "phone", "name", "first_name", "last_name", "firstName", "lastName",
        "address", "street", "postal_code", "postalCode", "ip", "birthday",
    }
)


_EMAIL = re.compile(r"[^@\s\"']+@[^@\s\"']+\.[A-Za-z]{2,}")
_PHONE = re.compile(r"\+?\d[\d ()-]{7,}\d")
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")


_tokeniser: Tokeniser | None = None


def use_tokeniser(tokeniser: Tokeniser | None) -> None:
    """Install the process's tokeniser (the vault's; `Runtime.open` calls this). The token key is
    process configuration, like the engine's dialect: every store opened by this process shares it."""
    global _tokeniser
    _tokeniser = tokeniser


def tokenising() -> bool:
    """Whether personal values are stored as tokens in the clean and curated zones."""
    return _tokeniser is not None and _tokeniser.policy.enabled


def protect_identifier(kind: str, value: exp.Expression) -> exp.Expression:
    """The stored form of a normalised identifier literal of type `kind` (email, phone, ...) as
    the identity tables hold it: its token when pseudonymising, else the value. A value that is
    a token already is returned as is."""
    if not tokenising() or not (isinstance(value, exp.Literal) and value.is_string):
        if tokenising():
            raise TypeError("protect_identifier takes a string literal; tokens are computed in Python")
        return value
    text = value.this
    if is_token(text):
        return value
    assert _tokeniser is not None
    return exp.Literal.string(_tokeniser.token(kind, text))


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
