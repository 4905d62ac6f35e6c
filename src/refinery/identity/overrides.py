"""Undo: a user's removals and splits, stored in `identity_overrides` and applied by every resolution.

Three kinds, each a change to the *input* of the graph, so the semantics of `graph.py` stand:

- `remove_identifier`: the identifier is blocked (`removed_by_user`): it links nobody and belongs to
  no profile; its events are attributed by their other identifiers.
- `remove_edge`: the edge between two identifiers is not used (`removed_by_user`), whatever events
  say; the two stay together only if other edges join them.
- `split`: a profile's identifiers are separated into a given side and the rest (as they were when
  the split was asked for) by not using any edge between the two sides (`split_by_user`). New
  evidence that joins them through a third identifier joins them again, by the rules.

An override is never deleted: `revoke` sets `revoked_at`, and the next resolution ignores it.
`create` and `revoke` run inside the writer; the caller then resolves and rebuilds profiles in the
same transaction (`refinery.profiles.build.resolve_and_build`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlglot import exp

from refinery.errors import ConflictError, NotFoundError
from refinery.identity.errors import OverrideError
from refinery.identity.rules import PII_TYPES, IdentityRules
from refinery.privacy.normalise import normalise
from refinery.privacy.pii import protect_identifier
from refinery.storage.engine import Engine

KINDS = ("remove_identifier", "remove_edge", "split")
#: identity_blocked / identity_edges reason per kind.
REASONS = {"remove_identifier": "removed_by_user", "remove_edge": "removed_by_user", "split": "split_by_user"}

Ident = dict[str, str]  # {"type": ..., "value": ...} as the identity tables hold it


@dataclass
class Override:
    override_id: str
    kind: str
    identifiers: list[Ident]
    profile_id: str | None
    other_identifiers: list[Ident] | None
    reason: str | None
    actor: str
    created_at: str
    revoked_at: str | None = None
    revoked_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(v: Any) -> Any:
    return v.isoformat() if hasattr(v, "isoformat") else v


def _from_row(r: dict[str, Any]) -> Override:
    def js(v: Any) -> Any:
        return json.loads(v) if isinstance(v, str) else v

    return Override(r["override_id"], r["kind"], js(r["identifiers"]), r["profile_id"], js(r["other_identifiers"]), r["reason"],
                    r["actor"], _iso(r["created_at"]), _iso(r["revoked_at"]), r["revoked_by"])


def find_identity(engine: Engine, text: str, rules: IdentityRules, cursor: Any = None) -> dict[str, Any]:
    """The one identity `type:value` (or a bare value of a single type) names, normalised as
    resolution normalises it; a clear error when none or several match."""
    kind, sep, raw = text.partition(":")
    known = set(rules.priority)
    kinds = [kind] if sep and kind in known else sorted(known)
    raw = raw if sep and kind in known else text
    conditions = []
    for k in kinds:
        value: exp.Expression = exp.Literal.string(normalise(k, raw, None, rules.phone_region).value)
        if k in PII_TYPES:
            value = protect_identifier(engine, k, value)
        conditions.append(exp.and_(exp.column("identifier_type").eq(exp.Literal.string(k)), exp.column("value").eq(value)))
    query = exp.select("identifier_type", "value", "profile_id", "status", "reason").from_("identities").where(exp.or_(*conditions))
    rows = engine.fetch_dicts(query, cursor=cursor)
    if not rows:
        raise NotFoundError(f"No identifier {text!r} has been seen.",
                            fix="Write it as type:value (e.g. email:jane@example.com) as `refinery profiles explain` shows it.")
    if len(rows) > 1:
        raise OverrideError(f"{text!r} matches {len(rows)} identifiers ({', '.join(r['identifier_type'] for r in rows)}).",
                            fix="Say which type you mean, e.g. user_id:" + text, field="identifier")
    return rows[0]


def _ident(row: dict[str, Any]) -> Ident:
    return {"type": row["identifier_type"], "value": row["value"]}


def _active_same(engine: Engine, kind: str, idents: list[Ident]) -> Override | None:
    key = sorted((i["type"], i["value"]) for i in idents)
    for o in list_overrides(engine, include_revoked=False):
        if o.kind == kind and sorted((i["type"], i["value"]) for i in o.identifiers) == key:
            return o
    return None


def create(engine: Engine, rules: IdentityRules, kind: str, identifiers: list[str], *, profile: str | None = None,
           reason: str | None = None, actor: str, now: datetime | None = None) -> Override:
    """Record an override (call inside the writer). Asking twice for the same active removal returns
    the first one."""
    now = now or datetime.now(UTC)
    if kind not in KINDS:
        raise OverrideError(f"Unknown override kind {kind!r}.", fix=f"Use one of: {', '.join(KINDS)}.", field="kind")
    rows = [find_identity(engine, t, rules) for t in identifiers]
    idents = [_ident(r) for r in rows]
    profile_id: str | None = None
    others: list[Ident] | None = None
    if kind == "remove_identifier":
        if len(rows) != 1:
            raise OverrideError(f"remove_identifier takes one identifier, got {len(rows)}.",
                                fix="Name one: refinery identity remove-identifier email:jane@example.com", field="identifiers")
        profile_id = rows[0]["profile_id"]
    elif kind == "remove_edge":
        if len(rows) != 2 or idents[0] == idents[1]:
            raise OverrideError("remove_edge takes two different identifiers (the ends of the edge).",
                                fix="refinery identity remove-edge anonymous_id:abc user_id:u-1", field="identifiers")
        (a, b) = idents
        found = engine.fetch_all(
            "SELECT count(*) FROM identity_edges WHERE (a_type = ? AND a_value = ? AND b_type = ? AND b_value = ?) "
            "OR (a_type = ? AND a_value = ? AND b_type = ? AND b_value = ?)",
            [a["type"], a["value"], b["type"], b["value"], b["type"], b["value"], a["type"], a["value"]],
        )[0][0]
        if not found:
            raise OverrideError(f"No edge joins {a['type']}:{a['value']} and {b['type']}:{b['value']}.",
                                fix="Edges are listed by `refinery profiles explain` (chain); to separate identifiers joined "
                                "through others, use `refinery identity split`.", field="identifiers")
    else:
        profile_id = profile or (rows[0]["profile_id"] if rows else None)
        if not rows or not profile_id:
            raise OverrideError("split needs the identifiers to separate, which must belong to a profile.",
                                fix="refinery identity split user_id:u-1 --identifier anonymous_id:abc", field="identifiers")
        members = engine.fetch_dicts("SELECT identifier_type, value FROM identities WHERE profile_id = ? ORDER BY identifier_type, value",
                                     [profile_id])
        if not members:
            raise NotFoundError(f"No profile {profile_id!r}.", fix="Name a live profile id (prof_...) or one of its identifiers.")
        outside = [i for i, r in zip(idents, rows, strict=True) if r["profile_id"] != profile_id]
        if outside:
            raise OverrideError(f"{outside[0]['type']}:{outside[0]['value']} is not in profile {profile_id}.",
                                fix="Split off identifiers of that profile only (see `refinery profiles show`).", field="identifiers")
        side = {(i["type"], i["value"]) for i in idents}
        others = [_ident(m) for m in members if (m["identifier_type"], m["value"]) not in side]
        if not others:
            raise OverrideError(f"The split would keep every identifier of {profile_id} on one side.",
                                fix="Name only the identifiers to take out of the profile.", field="identifiers")
    existing = _active_same(engine, kind, idents) if kind != "split" else None
    if existing is not None:
        return existing
    o = Override("ovr_" + uuid.uuid4().hex[:16], kind, idents, profile_id, others, reason, actor, now.isoformat())
    engine.execute(
        "INSERT INTO identity_overrides VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
        [o.override_id, kind, json.dumps(idents), profile_id, json.dumps(others) if others is not None else None, reason, actor, now],
    )
    return o


def get(engine: Engine, override_id: str, cursor: Any = None) -> Override:
    rows = engine.fetch_dicts("SELECT * FROM identity_overrides WHERE override_id = ?", [override_id], cursor=cursor)
    if not rows:
        raise NotFoundError(f"No override {override_id!r}.", fix="List them with: refinery identity overrides --all")
    return _from_row(rows[0])


def revoke(engine: Engine, override_id: str, *, actor: str, now: datetime | None = None) -> Override:
    """Stop applying an override (call inside the writer); the next resolution restores what it undid."""
    o = get(engine, override_id)
    if o.revoked_at is not None:
        raise ConflictError(f"Override {override_id} was already revoked at {o.revoked_at} by {o.revoked_by}.",
                            fix="Nothing to do; create a new override to apply it again.")
    engine.execute("UPDATE identity_overrides SET revoked_at = ?, revoked_by = ? WHERE override_id = ?",
                   [now or datetime.now(UTC), actor, override_id])
    return get(engine, override_id)


def list_overrides(engine: Engine, *, include_revoked: bool = True, cursor: Any = None) -> list[Override]:
    rows = engine.fetch_dicts(
        "SELECT * FROM identity_overrides WHERE ? OR revoked_at IS NULL ORDER BY created_at, override_id", [include_revoked],
        cursor=cursor,
    )
    return [_from_row(r) for r in rows]


# --- applied by resolution (temporary tables, inside the resolution's transaction) -------------------

def load(engine: Engine) -> int:
    """`_idr_ovm(override_id, okind, kind, value, side, actor, note)`: every identifier named by an
    active override; side 'a' / 'b' are the two ends of a removed edge or the two sides of a split."""
    engine.execute("""
        CREATE OR REPLACE TEMP TABLE _idr_ovm AS
        SELECT o.override_id, o.kind AS okind, json_extract_string(i.x, '$.type') AS kind, json_extract_string(i.x, '$.value') AS value,
               CASE WHEN o.kind = 'remove_edge' AND i.pos > 1 THEN 'b' ELSE 'a' END AS side, o.actor, o.reason AS note, o.profile_id
        FROM identity_overrides o, unnest(json_extract(o.identifiers, '$[*]')) WITH ORDINALITY AS i(x, pos)
        WHERE o.revoked_at IS NULL
        UNION ALL
        SELECT o.override_id, o.kind, json_extract_string(i.x, '$.type'), json_extract_string(i.x, '$.value'), 'b', o.actor, o.reason,
               o.profile_id
        FROM identity_overrides o, unnest(json_extract(o.other_identifiers, '$[*]')) AS i(x)
        WHERE o.revoked_at IS NULL AND o.kind = 'split'
    """)
    return int(engine.fetch_all("SELECT count(*) FROM _idr_ovm")[0][0])


def block_identifiers(engine: Engine) -> None:
    """Removed identifiers are blocked in `_idr_occ` (before statistics, stars and edges are built)."""
    engine.execute("""
        UPDATE _idr_occ SET reason = 'removed_by_user'
        WHERE reason IS NULL AND EXISTS (
            SELECT 1 FROM _idr_ovm o WHERE o.okind = 'remove_identifier' AND o.kind = _idr_occ.kind AND o.value = _idr_occ.value
        )
    """)


#: `_idr_cut` when no override is active.
EMPTY_CUT = ("CREATE OR REPLACE TEMP TABLE _idr_cut (a_kind VARCHAR, a_value VARCHAR, b_kind VARCHAR, b_value VARCHAR, "
             "okind VARCHAR, override_id VARCHAR, actor VARCHAR, note VARCHAR)")


def cut_edges(engine: Engine) -> None:
    """`_idr_cut`: edges of `_idr_edges_full` a removal or a split takes out, with the override."""
    engine.execute("""
        CREATE OR REPLACE TEMP TABLE _idr_cut AS
        SELECT DISTINCT ON (e.a_kind, e.a_value, e.b_kind, e.b_value)
               e.a_kind, e.a_value, e.b_kind, e.b_value, x.okind, x.override_id, x.actor, x.note
        FROM _idr_edges_full e
        JOIN _idr_ovm x ON x.kind = e.a_kind AND x.value = e.a_value AND x.okind IN ('remove_edge', 'split')
        JOIN _idr_ovm y ON y.kind = e.b_kind AND y.value = e.b_value AND y.override_id = x.override_id AND y.side <> x.side
        ORDER BY e.a_kind, e.a_value, e.b_kind, e.b_value, x.override_id
    """)
