"""Why a profile is what it is: the chain of evidence that joined its identifiers, the merges it
absorbed, what resolution refused to join to it (with the rule), and its probabilistic links.

`explain(engine, identifier, rules)` returns plain data; `refinery profiles explain` and
`GET /api/profiles/explain` print or serve it.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from refinery.errors import NotFoundError
from refinery.identity.rules import IdentityRules
from refinery.profiles.read import find, survivor
from refinery.storage.engine import Engine

Ident = tuple[str, str]


def _iso(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _chain(start: Ident, members: set[Ident], edges: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Breadth-first from the asked identifier over the profile's active edges: for each other
    identifier, the edge (event) that first reached it, and the identifier it was reached from."""
    adjacent: dict[Ident, list[tuple[Ident, dict[str, Any]]]] = {}
    for e in edges:
        a, b = (e["a_type"], e["a_value"]), (e["b_type"], e["b_value"])
        adjacent.setdefault(a, []).append((b, e))
        adjacent.setdefault(b, []).append((a, e))
    for links in adjacent.values():
        links.sort(key=lambda x: (x[1]["event_time"], x[0]))
    steps: list[dict[str, Any]] = []
    seen = {start}
    queue = deque([(start, 0)])
    while queue:
        node, depth = queue.popleft()
        for other, e in adjacent.get(node, []):
            if other in seen or other not in members:
                continue
            seen.add(other)
            queue.append((other, depth + 1))
            steps.append({
                "identifier": {"type": other[0], "value": other[1]},
                "joined_to": {"type": node[0], "value": node[1]},
                "depth": depth + 1,
                "rule": e["rule"], "message_id": e["message_id"], "source": e["source"],
                "event_time": _iso(e["event_time"]), "events": e["event_count"],
            })
    return steps


def explain(engine: Engine, identifier: str, rules: IdentityRules) -> dict[str, Any]:
    matches = find(engine, identifier, rules)
    if not matches:
        raise NotFoundError(f"No identifier {identifier!r} has been seen.", fix="Write it as type:value, e.g. email:jane@example.com.")
    cur = engine.reader()
    linked = [m for m in matches if m["profile_id"]]
    asked = linked[0] if linked else matches[0]
    start: Ident = (asked["identifier_type"], asked["value"])
    refusals_of_asked = engine.fetch_dicts(
        "SELECT * FROM identity_blocked WHERE (identifier_type = ? AND value = ?) OR (other_type = ? AND other_value = ?)",
        [*start, *start], cursor=cur,
    )
    out: dict[str, Any] = {
        "identifier": {"type": start[0], "value": start[1], "status": asked["status"], "reason": asked["reason"]},
        "profile_id": asked["profile_id"],
    }
    if not asked["profile_id"]:
        out["refusals"] = [_refusal(r) for r in refusals_of_asked]
        return out

    profile_id = survivor(engine, asked["profile_id"]) or asked["profile_id"]
    members_rows = engine.fetch_dicts(
        "SELECT identifier_type, value, status, first_seen, first_message_id, first_source FROM identities "
        "WHERE profile_id = ? ORDER BY first_seen, identifier_type, value", [profile_id], cursor=cur,
    )
    members = {(m["identifier_type"], m["value"]) for m in members_rows}
    edges = engine.fetch_dicts(
        """
        SELECT e.* FROM identity_edges e
        JOIN identities a ON a.identifier_type = e.a_type AND a.value = e.a_value
        JOIN identities b ON b.identifier_type = e.b_type AND b.value = e.b_value
        WHERE e.status = 'active' AND a.profile_id = ? AND b.profile_id = ?
        """, [profile_id, profile_id], cursor=cur,
    )
    refusals = engine.fetch_dicts(
        """
        SELECT DISTINCT k.* FROM identity_blocked k
        LEFT JOIN identities a ON a.identifier_type = k.identifier_type AND a.value = k.value
        LEFT JOIN identities b ON b.identifier_type = k.other_type AND b.value = k.other_value
        WHERE a.profile_id = ? OR b.profile_id = ? OR k.profile_a = ? OR k.profile_b = ?
        ORDER BY k.event_time, k.reason
        """, [profile_id] * 4, cursor=cur,
    )
    blocked_edges = engine.fetch_dicts(
        """
        SELECT e.*, a.profile_id AS a_profile, b.profile_id AS b_profile FROM identity_edges e
        JOIN identities a ON a.identifier_type = e.a_type AND a.value = e.a_value
        JOIN identities b ON b.identifier_type = e.b_type AND b.value = e.b_value
        WHERE e.status = 'blocked' AND (a.profile_id = ? OR b.profile_id = ?)
        ORDER BY e.event_time
        """, [profile_id, profile_id], cursor=cur,
    )
    merges = engine.fetch_dicts(
        "SELECT * FROM profile_merges WHERE surviving_profile_id = ? OR merged_profile_id = ? ORDER BY merged_at",
        [profile_id, profile_id], cursor=cur,
    )
    links = engine.fetch_dicts(
        """
        SELECT l.link_id, l.a_type, l.a_value, l.b_type, l.b_value, l.score, l.method, l.model_version, l.evidence,
               a.profile_id AS a_profile, b.profile_id AS b_profile
        FROM identity_links l
        LEFT JOIN identities a ON a.identifier_type = l.a_type AND a.value = l.a_value
        LEFT JOIN identities b ON b.identifier_type = l.b_type AND b.value = l.b_value
        WHERE l.removed_at IS NULL AND (a.profile_id = ? OR b.profile_id = ?)
        ORDER BY l.score DESC, l.link_id
        """, [profile_id, profile_id], cursor=cur,
    )
    out.update({
        "profile_id": profile_id,
        "identifiers": [
            {"type": m["identifier_type"], "value": m["value"], "first_seen": _iso(m["first_seen"]),
             "first_message_id": m["first_message_id"], "first_source": m["first_source"]}
            for m in members_rows
        ],
        "chain": _chain(start, members, edges),
        "merges": [
            {"merge_id": m["merge_id"], "surviving_profile_id": m["surviving_profile_id"], "merged_profile_id": m["merged_profile_id"],
             "merged_at": _iso(m["merged_at"]), "evidence": _json(m["evidence"]), "undone_at": _iso(m["undone_at"])}
            for m in merges
        ],
        "refusals": [_refusal(r) for r in refusals],
        "blocked_edges": [
            {"a": {"type": e["a_type"], "value": e["a_value"], "profile_id": e["a_profile"]},
             "b": {"type": e["b_type"], "value": e["b_value"], "profile_id": e["b_profile"]},
             "reason": e["reason"], "rule": e["rule"], "message_id": e["message_id"], "source": e["source"],
             "event_time": _iso(e["event_time"])}
            for e in blocked_edges
        ],
        "probabilistic_links": [
            {"link_id": x["link_id"], "score": x["score"], "method": x["method"], "model_version": x["model_version"],
             "a": {"type": x["a_type"], "value": x["a_value"], "profile_id": x["a_profile"]},
             "b": {"type": x["b_type"], "value": x["b_value"], "profile_id": x["b_profile"]},
             "evidence": _json(x["evidence"])}
            for x in links
        ],
    })
    return out


def _refusal(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": r["kind"], "reason": r["reason"],
        "identifier": {"type": r["identifier_type"], "value": r["value"]},
        "other": {"type": r["other_type"], "value": r["other_value"]} if r["other_type"] else None,
        "profiles_kept_apart": [p for p in (r["profile_a"], r["profile_b"]) if p],
        "message_id": r["message_id"], "source": r["source"], "event_time": _iso(r["event_time"]),
        "evidence": _json(r["evidence"]),
    }
