"""Reading profiles: by id (following merges), by any identifier, their event timeline, and the
evidence that formed them. Reads run on the caller's reader cursor and never block the writer.
"""

from __future__ import annotations

import json
from typing import Any

from sqlglot import exp

from refinery.errors import NotFoundError, QueryError
from refinery.identity.rules import PII_TYPES, IdentityRules
from refinery.privacy.normalise import normalise
from refinery.privacy.pii import protect_identifier
from refinery.storage.engine import Engine

#: How many merge hops `get` follows before giving up (a cycle would be a bug, not data).
_MAX_HOPS = 64


def parse_identifier(text: str, rules: IdentityRules) -> tuple[str | None, str]:
    """`type:value` (e.g. `email:Jane@Example.com`) or a bare value (any type)."""
    kind, sep, value = text.partition(":")
    known = set(rules.priority) | {"previous_id"}
    if sep and kind in known:
        return kind, value
    return None, text


def _stored_value(engine: Engine, kind: str, raw: str, rules: IdentityRules) -> exp.Expression:
    """The value as the identity tables hold it: normalised, then protected for PII types."""
    value: exp.Expression = exp.Literal.string(normalise(kind, raw, None, rules.phone_region).value)
    return protect_identifier(engine, kind, value) if kind in PII_TYPES else value


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    for key in ("identifiers", "traits", "trait_sources", "sources"):
        if isinstance(row.get(key), str):
            row[key] = json.loads(row[key])
    for key in ("first_seen", "last_seen", "updated_at"):
        if row.get(key) is not None:
            row[key] = row[key].isoformat()
    return row


def survivor(engine: Engine, profile_id: str) -> str | None:
    """The live profile id for `profile_id`: itself, or the profile it was merged into."""
    cur = engine.reader()
    seen = [profile_id]
    current = profile_id
    for _ in range(_MAX_HOPS):
        if engine.fetch_all("SELECT 1 FROM profiles WHERE profile_id = ?", [current], cursor=cur):
            return current
        rows = engine.fetch_all(
            "SELECT surviving_profile_id FROM profile_merges WHERE merged_profile_id = ? AND undone_at IS NULL "
            "ORDER BY merged_at DESC LIMIT 1", [current], cursor=cur,
        )
        if not rows or rows[0][0] in seen:
            return None
        current = rows[0][0]
        seen.append(current)
    return None


def get(engine: Engine, profile_id: str) -> dict[str, Any]:
    """One profile; an id that was merged answers with the surviving profile and says so."""
    live = survivor(engine, profile_id)
    if live is None:
        raise NotFoundError(
            f"No profile {profile_id!r}.",
            fix="Look it up by an identifier instead: refinery profiles show email:jane@example.com",
        )
    [row] = engine.fetch_dicts("SELECT * FROM profiles WHERE profile_id = ?", [live], cursor=engine.reader())
    profile = _decode(row)
    if live != profile_id:
        profile["requested_id"] = profile_id
        profile["merged_into"] = live
    return profile


def find(engine: Engine, identifier: str, rules: IdentityRules) -> list[dict[str, Any]]:
    """Identities matching `type:value` (or a bare value of any type), with their profile and status."""
    kind, raw = parse_identifier(identifier, rules)
    kinds = [kind] if kind else sorted(set(rules.priority) | {"previous_id"})
    conditions = [
        exp.and_(
            exp.column("identifier_type").eq(exp.Literal.string(k)),
            exp.column("value").eq(_stored_value(engine, k, raw, rules)),
        )
        for k in kinds
    ]
    query = (
        exp.select("identifier_type", "value", "profile_id", "status", "reason", "first_seen", "last_seen", "event_count")
        .from_("identities")
        .where(exp.or_(*conditions))
        .order_by("identifier_type")
    )
    rows = engine.fetch_dicts(query, cursor=engine.reader())
    for r in rows:
        for key in ("first_seen", "last_seen"):
            r[key] = r[key].isoformat() if r[key] is not None else None
    return rows


def lookup(engine: Engine, identifier: str, rules: IdentityRules) -> dict[str, Any]:
    """The profile an identifier belongs to; a clear error when it is unknown or not linked."""
    matches = find(engine, identifier, rules)
    linked = [m for m in matches if m["profile_id"]]
    if not linked:
        if matches:
            m = matches[0]
            raise NotFoundError(
                f"{m['identifier_type']} {identifier!r} belongs to no profile: it is {m['status']} ({m['reason']}).",
                fix="See why with: refinery profiles explain " + identifier,
            )
        raise NotFoundError(
            f"No identifier {identifier!r} has been seen.",
            fix="Write it as type:value (e.g. email:jane@example.com), and run `refinery identity resolve` after new data.",
        )
    profiles = sorted({m["profile_id"] for m in linked})
    if len(profiles) > 1:
        raise QueryError(
            f"{identifier!r} matches identifiers of {len(profiles)} profiles ({', '.join(profiles)}).",
            fix="Say which type you mean, e.g. user_id:" + identifier,
        )
    return get(engine, profiles[0])


def timeline(engine: Engine, profile_id: str, *, limit: int = 100, before: str | None = None) -> list[dict[str, Any]]:
    """The profile's events, newest first (`before`: an ISO time to page back from)."""
    live = survivor(engine, profile_id) or profile_id
    rows = engine.fetch_dicts(
        """
        SELECT e.timestamp, e.type, coalesce(e.event, e.name) AS event, e.source, e.message_id,
               a.identifier_type AS matched_by, e.user_id, e.anonymous_id, e.properties, e.traits, e.page_url
        FROM event_profiles a JOIN events e ON e.source = a.source AND e.message_id = a.message_id
        WHERE a.profile_id = ? AND (CAST(? AS TIMESTAMPTZ) IS NULL OR e.timestamp < CAST(? AS TIMESTAMPTZ))
        ORDER BY e.timestamp DESC, e.source, e.message_id
        LIMIT ?
        """,
        [live, before, before, limit], cursor=engine.reader(),
    )
    for r in rows:
        r["timestamp"] = r["timestamp"].isoformat()
        for key in ("properties", "traits"):
            if isinstance(r[key], str):
                r[key] = json.loads(r[key])
    return rows
