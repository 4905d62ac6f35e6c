"""Every decision about personal fields (email, phone, name, address, IP) lives here.

Personal fields are replaced by keyed tokens before cleaning (`privacy/tokens.py`, sealed values
in `privacy/vault.py`); `protect_identifier` gives a user-supplied identifier its stored form, so
lookups by email or phone find the token. `redact` keeps PII out of logs and error messages.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from sqlglot import exp

from refinery.privacy.tokens import TOKEN_PATTERN, is_token

if TYPE_CHECKING:
    from refinery.privacy.vault import Vault
    from refinery.storage.engine import Engine

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


T = TypeVar("T")
_TOKEN_IN_TEXT = re.compile(TOKEN_PATTERN)

#: Each open store's vault, by its engine: two stores open in one process (tests, tools) keep
#: their own keys. `Runtime.open` installs it.
_vaults: weakref.WeakKeyDictionary[Engine, Vault] = weakref.WeakKeyDictionary()


def install(engine: Engine, vault: Vault) -> None:
    """Make `vault` the vault of the store `engine` opens (`Runtime.open` calls this)."""
    _vaults[engine] = vault


def vault_of(engine: Engine) -> Vault | None:
    return _vaults.get(engine)


def tokenising(engine: Engine) -> bool:
    """Whether the store stores personal values as tokens in its clean and curated zones."""
    vault = _vaults.get(engine)
    return vault is not None and vault.policy.enabled


def reveal(engine: Engine, tokens: Iterable[str]) -> dict[str, str]:
    """The values behind tokens (those whose person was not erased); {} without a vault."""
    vault = _vaults.get(engine)
    return {} if vault is None else vault.reveal(engine, tokens)


def reveal_in(engine: Engine, value: T) -> T:
    """A copy of a JSON-like `value` with every token inside its strings (JSON text included)
    replaced by its value from the vault: what a principal with `pii:read` sees. Tokens of
    erased people stay tokens."""
    tokens: set[str] = set()
    _collect(value, tokens)
    if not tokens:
        return value
    clear = reveal(engine, tokens)
    return _replace(value, clear) if clear else value


def _collect(value: Any, into: set[str]) -> None:
    if isinstance(value, str):
        if "pii:" in value:
            into.update(_TOKEN_IN_TEXT.findall(value))
    elif isinstance(value, dict):
        for v in value.values():
            _collect(v, into)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _collect(v, into)


def _replace(value: Any, clear: dict[str, str]) -> Any:
    if isinstance(value, str):
        if "pii:" not in value:
            return value
        if value in clear:
            return clear[value]
        return _TOKEN_IN_TEXT.sub(lambda m: _json_text(clear[m.group(0)]) if m.group(0) in clear else m.group(0), value)
    if isinstance(value, dict):
        return {k: _replace(v, clear) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace(v, clear) for v in value]
    if isinstance(value, tuple):
        return tuple(_replace(v, clear) for v in value)
    return value


def _json_text(value: str) -> str:
    """A value put inside JSON text in place of a token (tokens never need escaping; values may)."""
    return orjson.dumps(value).decode()[1:-1]


def token_for(engine: Engine, kind: str, normal: str) -> str | None:
    """The token of a value in normal form, or None when the store does not pseudonymise."""
    vault = _vaults.get(engine)
    return vault.tokens.token(kind, normal) if vault is not None and vault.policy.enabled else None


def protect_identifier(engine: Engine, kind: str, value: exp.Expression) -> exp.Expression:
    """The stored form of a normalised identifier literal of type `kind` (email, phone, ...) as
    the store's identity tables hold it: its token when pseudonymising, else the value. A value
    that is a token already is returned as is."""
    if not tokenising(engine):
        return value
    if not (isinstance(value, exp.Literal) and value.is_string):
        raise TypeError("protect_identifier takes a string literal; tokens are computed in Python")
    text = value.this
    if is_token(text):
        return value
    return exp.Literal.string(token_for(engine, kind, text) or text)


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
