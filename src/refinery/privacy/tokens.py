"""Pseudonymisation: which fields are personal, their normal form, and their keyed tokens.

A token is `pii:<kind>:<32 hex>`: the first 128 bits of HMAC-SHA256(token key, kind 0x1f value)
over the value's normal form (emails trimmed and lower-cased, phones in E.164, other text
NFKC-cleaned and trimmed, objects as canonical JSON). Equal values give equal tokens, so joins,
counts and identity resolution work on tokens; the value itself lives only in the vault. The
kind is in the token so a reader knows what it stands for without seeing it.

Pure: no I/O. `protect_event` rewrites one Segment event (a dict) and reports the values it
replaced, for the vault to seal under the event's subject key.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import orjson

from refinery.privacy.normalise import clean_text, normalise_phone

TOKEN_PATTERN = r"pii:[a-z0-9_]{1,32}:[0-9a-f]{32}"
_TOKEN = re.compile(TOKEN_PATTERN)
_SEP = b"\x1f"

IpHandling = Literal["tokenise", "truncate", "keep"]

DEFAULT_TRAIT_FIELDS: tuple[str, ...] = (
    "email", "phone", "name", "first_name", "last_name", "firstName", "lastName",
    "address", "street", "postal_code", "postalCode", "birthday",
)
DEFAULT_PROPERTY_FIELDS: tuple[str, ...] = ("email", "phone")
_KIND_ALIASES = {"firstName": "first_name", "lastName": "last_name", "postalCode": "postal_code"}


@functools.lru_cache(maxsize=1024)
def kind_of(field_name: str) -> str:
    """The token kind of a field name: `firstName` and `first_name` are one kind."""
    name = _KIND_ALIASES.get(field_name, field_name)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def is_token(value: object) -> bool:
    return isinstance(value, str) and _TOKEN.fullmatch(value) is not None


class PiiValue(NamedTuple):
    """A value `protect_event` replaced: its token, kind and normal form (what the vault keeps)."""

    token: str
    kind: str
    value: str


@dataclass(frozen=True)
class PiiPolicy:
    """Which fields are personal and what happens to the IP address."""

    trait_fields: tuple[str, ...] = DEFAULT_TRAIT_FIELDS
    property_fields: tuple[str, ...] = DEFAULT_PROPERTY_FIELDS
    ip: IpHandling = "tokenise"
    phone_region: str = "US"
    enabled: bool = True


@dataclass
class Tokeniser:
    """Tokens under one key, with a bounded memo of values already tokenised."""

    key: bytes
    policy: PiiPolicy = field(default_factory=PiiPolicy)
    _memo: dict[tuple[str, str, str | None], tuple[str, str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._mac = hmac.new(self.key, digestmod="sha256")
        self._traits = frozenset(self.policy.trait_fields)
        self._properties = frozenset(self.policy.property_fields)

    def token(self, kind: str, normal: str) -> str:
        """The token of a value already in normal form."""
        mac = self._mac.copy()
        mac.update(kind.encode() + _SEP + normal.encode())
        return f"pii:{kind}:{mac.hexdigest()[:32]}"

    def normal_form(self, kind: str, value: Any, region: str | None = None) -> str:
        """The normal form of a field's value (see the module docstring)."""
        if isinstance(value, (dict, list)):
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        text = clean_text(value if isinstance(value, str) else orjson.dumps(value).decode())
        if kind == "email":
            return text.lower()
        if kind == "phone":
            n = normalise_phone(text, region, self.policy.phone_region)
            return n.value if n.reason is None else text
        return text

    def tokenise(self, kind: str, value: Any, region: str | None = None) -> tuple[str, str]:
        """(token, normal form) of one value; memoised for text values."""
        if isinstance(value, str):
            memo_key = (kind, value, region if kind == "phone" else None)
            hit = self._memo.get(memo_key)
            if hit is not None:
                return hit
            normal = self.normal_form(kind, value, region)
            out = (self.token(kind, normal), normal)
            if len(self._memo) >= 100_000:
                self._memo.clear()
            self._memo[memo_key] = out
            return out
        normal = self.normal_form(kind, value, region)
        return self.token(kind, normal), normal

    # --- events ----------------------------------------------------------------------------
    def protect_event(self, event: dict[str, Any]) -> tuple[dict[str, Any], list[PiiValue]]:
        """A copy of `event` with personal fields replaced by tokens (and the IP handled by
        policy), and the values replaced. Values that already are tokens are left alone, so
        protecting twice changes nothing."""
        if not self.policy.enabled:
            return event, []
        found: list[PiiValue] = []
        out = dict(event)
        traits = event.get("traits")
        context = event.get("context")
        region = _region(traits, context)
        if isinstance(traits, dict):
            out["traits"] = self._protect_fields(traits, self._traits, region, found)
        props = event.get("properties")
        if isinstance(props, dict):
            out["properties"] = self._protect_fields(props, self._properties, region, found)
        if isinstance(context, dict):
            ctx = context
            if isinstance(context.get("traits"), dict):
                protected = self._protect_fields(context["traits"], self._traits, region, found)
                if protected is not context["traits"]:
                    ctx = {**context, "traits": protected}
            ip = context.get("ip")
            if isinstance(ip, str) and ip and self.policy.ip != "keep" and not is_token(ip):
                if ctx is context:
                    ctx = dict(context)
                if self.policy.ip == "truncate":
                    ctx["ip"] = truncate_ip(ip)
                else:
                    token, normal = self.tokenise("ip", ip)
                    ctx["ip"] = token
                    found.append(PiiValue(token, "ip", normal))
            out["context"] = ctx
        return out, found

    def _protect_fields(
        self, obj: dict[str, Any], fields: frozenset[str], region: str | None, found: list[PiiValue]
    ) -> dict[str, Any]:
        if fields.isdisjoint(obj):  # most objects hold no personal field: no copy, no loop
            return obj
        copy: dict[str, Any] | None = None
        for name in sorted(fields.intersection(obj)):
            value = obj.get(name)
            if value is None or value == "" or is_token(value):
                continue
            kind = kind_of(name)
            token, normal = self.tokenise(kind, value, region)
            if copy is None:
                copy = dict(obj)
            copy[name] = token
            found.append(PiiValue(token, kind, normal))
        return obj if copy is None else copy


def _region(traits: Any, context: Any) -> str | None:
    for holder in (traits, context.get("traits") if isinstance(context, dict) else None):
        if isinstance(holder, dict) and isinstance(holder.get("country"), str):
            return str(holder["country"])
    return None


def subject_of(event: dict[str, Any]) -> str | None:
    """Whose event this is, for its data key: the user id, else the anonymous id, as text in
    the normal form identity resolution gives ids (so erasure finds the same key)."""
    for name in ("userId", "anonymousId"):
        text = normal_id(event.get(name))
        if text:
            return text
    return None


def normal_id(value: Any) -> str | None:
    """A user or anonymous id in the normal form identity resolution gives ids (None when it is no
    id: missing, empty, an object, a list or a boolean)."""
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    if isinstance(value, str) and value and value.isascii() and value.isprintable() and value[0] != " " and value[-1] != " ":
        return value  # printable ASCII without outer spaces is its own normal form (the common case)
    text = clean_text(value if isinstance(value, str) else orjson.dumps(value).decode())
    return text or None


def truncate_ip(ip: str) -> str:
    """An IPv4 address with its last octet zeroed (/24); IPv6 kept to its /48. Not an address: ''."""
    try:
        addr = ipaddress.ip_address(ip.strip())
    except ValueError:
        return ""
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False).network_address)
