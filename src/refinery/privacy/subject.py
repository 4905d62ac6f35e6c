"""Finding a subject: from one identifier to every profile, identifier, key, token and event of
the person (`registry.Subject`).

`type:value` or a bare value, looked up as `refinery profiles explain` does (`profiles.read.find`:
normalised, and tokenised for personal identifier types). Merges are followed both ways: the
profile an id was merged into, and every profile merged into it. An identifier resolution has not
seen yet (events since the last `refinery identity resolve`) is still found by its events, its
sealed values or its data key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from cryptography.exceptions import InvalidTag

from refinery.identity.rules import PII_TYPES, IdentityRules
from refinery.privacy.keys import unseal
from refinery.privacy.normalise import clean_text, normalise, normalise_phone
from refinery.privacy.pii import tokenising
from refinery.privacy.registry import Subject
from refinery.privacy.tokens import is_token
from refinery.privacy.vault import Vault
from refinery.profiles import read
from refinery.storage.engine import Engine

#: Types whose values name the subject of events (and so their vault key).
SUBJECT_TYPES = ("user_id", "anonymous_id")
_MAX_MERGE_HOPS = 64
_EVENT_BY = {
    "user_id": "SELECT 1 FROM events WHERE user_id = ? LIMIT 1",
    "anonymous_id": "SELECT 1 FROM events WHERE anonymous_id = ? LIMIT 1",
}
_SEP = "\x1f"


def key(a: str, b: str) -> str:
    """Two values as one comparable text (type and value, or source and message id)."""
    return a + _SEP + b


def stored_value(engine: Engine, kind: str, raw: str, rules: IdentityRules, vault: Vault) -> str:
    """A value as the identity tables hold it: normalised, and a token for personal types."""
    normal = normalise(kind, raw, None, rules.phone_region).value
    if kind in PII_TYPES and tokenising(engine) and not is_token(normal):
        return vault.tokens.token(kind, normal)
    return normal


def normal_value(kind: str, raw: str, rules: IdentityRules) -> str:
    return normalise(kind, raw, None, rules.phone_region).value


def find_subject(engine: Engine, vault: Vault, rules: IdentityRules, identifier: str, *, cursor: Any = None) -> Subject | None:
    """The subject `identifier` names, or None when nothing is held about it."""
    kind, raw = read.parse_identifier(identifier, rules)
    matches = read.find(engine, identifier, rules)
    profiles = sorted({m["profile_id"] for m in matches if m["profile_id"]})
    seeds: set[tuple[str, str]] = {(m["identifier_type"], m["value"]) for m in matches}
    if not matches:
        seeds = _direct(engine, vault, rules, kind, raw, cursor)
        if not seeds:
            return None
    pids = _with_merges(engine, profiles, cursor)
    identifiers = set(seeds)
    if pids:
        rows = engine.fetch_all(
            "SELECT identifier_type, value FROM identities WHERE profile_id IN (SELECT unnest(CAST(? AS VARCHAR[])))",
            [pids], cursor=cursor,
        )
        identifiers.update((t, v) for t, v in rows)
    ids = sorted({v for t, v in identifiers if t in SUBJECT_TYPES})
    # Events are sealed under their userId (else anonymousId) as sent, whatever type resolution gave
    # the value (a CRM id sent as userId is a crm_id here): every value's key, where one exists.
    key_ids = sorted({vault.key_id(v) for _, v in identifiers if not is_token(v)})
    identifier_tokens: set[str] = set()
    clear: dict[str, str] = {}
    for t, v in identifiers:
        if t not in PII_TYPES:
            continue
        if is_token(v):
            identifier_tokens.add(v)
        else:  # pseudonymisation off: the value is stored in clear; its token may still be in the vault
            token = vault.tokens.token(t, v)
            identifier_tokens.add(token)
            clear[token] = v
    sealed_tokens = [r[0] for r in engine.fetch_all(
        "SELECT DISTINCT token FROM vault_values WHERE key_id IN (SELECT unnest(CAST(? AS VARCHAR[])))", [key_ids], cursor=cursor,
    )] if key_ids else []
    tokens = sorted(identifier_tokens | set(sealed_tokens))
    clear.update(reveal(engine, vault, tokens, cursor=cursor))
    messages = _messages(engine, pids, ids, key_ids, identifiers, cursor)
    return Subject(
        identifier_type=kind, profile_ids=tuple(pids), identifiers=tuple(sorted(identifiers)), key_ids=tuple(key_ids),
        tokens=tuple(tokens), identifier_tokens=tuple(sorted(identifier_tokens)), clear=clear, messages=tuple(messages),
        vault=vault, phone_region=rules.phone_region,
    )


def _direct(engine: Engine, vault: Vault, rules: IdentityRules, kind: str | None, raw: str, cursor: Any) -> set[tuple[str, str]]:
    """Identifiers resolution has not seen (yet) but the zones hold: by events, values or keys."""
    found: set[tuple[str, str]] = set()
    for k in [kind] if kind else ["user_id", "anonymous_id", "email", "phone"]:
        if k in SUBJECT_TYPES:
            v = normal_value(k, raw, rules)
            if not v:
                continue
            hit = engine.fetch_all(_EVENT_BY[k], [v], cursor=cursor)
            if hit or engine.fetch_all("SELECT 1 FROM raw_events WHERE key_id = ? LIMIT 1", [vault.key_id(v)], cursor=cursor) \
                    or vault.keys.get([vault.key_id(v)], create=False):
                found.add((k, v))
        elif k in PII_TYPES:
            v = stored_value(engine, k, raw, rules, vault)
            token = v if is_token(v) else vault.tokens.token(k, v)
            if engine.fetch_all("SELECT 1 FROM vault_values WHERE token = ? LIMIT 1", [token], cursor=cursor):
                found.add((k, v))
    return found


def _with_merges(engine: Engine, profiles: Iterable[str], cursor: Any) -> list[str]:
    """The profiles, the profile each was merged into, and every profile merged into those."""
    out: set[str] = set()
    todo = list(profiles)
    for _ in range(_MAX_MERGE_HOPS):
        if not todo:
            break
        out.update(todo)
        rows = engine.fetch_all(
            "SELECT surviving_profile_id, merged_profile_id FROM profile_merges WHERE undone_at IS NULL "
            "AND (surviving_profile_id IN (SELECT unnest(CAST(? AS VARCHAR[]))) OR merged_profile_id IN (SELECT unnest(CAST(? AS VARCHAR[]))))",
            [todo, todo], cursor=cursor,
        )
        todo = sorted({p for r in rows for p in r if p not in out})
    return sorted(out)


def _messages(engine: Engine, pids: Sequence[str], ids: Sequence[str], key_ids: Sequence[str],
              identifiers: Iterable[tuple[str, str]], cursor: Any) -> list[tuple[str, str]]:
    idents = list(identifiers)
    devices = sorted({v for t, v in idents if t == "device_id"})
    ads = sorted({v for t, v in idents if t == "advertising_id"})
    rows = engine.fetch_all(
        """
        SELECT source, message_id FROM event_profiles WHERE profile_id IN (SELECT unnest(CAST(? AS VARCHAR[])))
        UNION SELECT source, message_id FROM events
          WHERE user_id IN (SELECT unnest(CAST(? AS VARCHAR[]))) OR anonymous_id IN (SELECT unnest(CAST(? AS VARCHAR[])))
             OR previous_id IN (SELECT unnest(CAST(? AS VARCHAR[]))) OR device_id IN (SELECT unnest(CAST(? AS VARCHAR[])))
             OR advertising_id IN (SELECT unnest(CAST(? AS VARCHAR[])))
        UNION SELECT source, message_id FROM raw_events WHERE key_id IN (SELECT unnest(CAST(? AS VARCHAR[])))
        UNION SELECT source, message_id FROM failed_events
          WHERE message_id IS NOT NULL AND key_id IN (SELECT unnest(CAST(? AS VARCHAR[])))
        """,
        [list(pids), list(ids), list(ids), list(ids), devices, ads, list(key_ids), list(key_ids)], cursor=cursor,
    )
    return sorted({(s, m) for s, m in rows})


def reveal(engine: Engine, vault: Vault, tokens: Iterable[str], *, cursor: Any = None) -> dict[str, str]:
    """The clear values behind `tokens` (like `Vault.reveal`, on the caller's cursor)."""
    wanted = sorted(set(tokens))
    if not wanted:
        return {}
    rows = engine.fetch_all(
        "SELECT token, key_id, sealed FROM vault_values WHERE token IN (SELECT unnest(CAST(? AS VARCHAR[]))) ORDER BY token, first_seen DESC",
        [wanted], cursor=cursor,
    )
    plain = vault.unseal_many([k for _, k, _ in rows], [s for _, _, s in rows])
    out: dict[str, str] = {}
    for (token, _, _), value in zip(rows, plain, strict=True):
        if value is not None and token not in out:
            out[token] = value.decode()
    return out


def unseal_one(vault: Vault, key_id: str, sealed: bytes) -> bytes | None:
    """One sealed payload (None when its key is gone or it fails its integrity check)."""
    keys = vault.keys.get([key_id], create=False)
    aead = keys.get(key_id)
    if aead is None:
        return None
    try:
        return unseal(aead, bytes(sealed), key_id.encode())
    except InvalidTag:
        return None


# --- finding a person inside a payload --------------------------------------------------------

_EMAIL = re.compile(r"[^@\s\"'<>(),;:]+@[^@\s\"'<>(),;:]+\.[A-Za-z]{2,}")
_PHONE = re.compile(r"\+?\d[\d ().-]{6,}\d")


class Matcher:
    """Whether a text (a payload unsealed, a JSON document) mentions the subject: one of their
    emails or phones (in any spelling that normalises to theirs), ids, or identifier tokens."""

    def __init__(self, subject: Subject, phone_region: str):
        self.region = phone_region
        self.emails = {v.lower() for t, v in _typed_clear(subject) if t == "email"}
        self.phones = {v for t, v in _typed_clear(subject) if t == "phone"}
        self.exact = {v for t, v in subject.identifiers if t not in PII_TYPES} | set(subject.identifier_tokens)
        self.exact_json = [_json_string(v) for v in sorted(self.exact) if v]

    def __bool__(self) -> bool:
        return bool(self.emails or self.phones or self.exact)

    def mentions(self, text: str) -> bool:
        if any(needle in text for needle in self.exact_json):
            return True
        if self.emails and any(m.group(0).lower().strip(".") in self.emails for m in _EMAIL.finditer(text)):
            return True
        if self.phones:
            for m in _PHONE.finditer(text):
                n = normalise_phone(clean_text(m.group(0)), None, self.region)
                if n.reason is None and n.value in self.phones:
                    return True
        return False


def _typed_clear(subject: Subject) -> list[tuple[str, str]]:
    """(kind, clear value) of the subject's email and phone identifiers."""
    out = []
    for t, v in subject.identifiers:
        if t in PII_TYPES:
            value = subject.clear.get(v, v) if is_token(v) else v
            if not is_token(value):
                out.append((t, value))
    return out


def _json_string(value: str) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)
