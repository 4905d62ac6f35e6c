"""The demo's identity step: the rules its world needs, resolution through the running server, and
a summary scored against the world's ground truth.

The world writes email addresses on the domains reserved for examples (RFC 2606: example.com,
mail.example, ...), which the default rules block as test addresses; and its CRM export carries the
web user id of customers in a `webUserId` trait. The demo's rules file says both, as a user would.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

import yaml

from refinery.client import Client
from refinery.demo.world import CRM_SOURCE
from refinery.identity.evaluate import score, truth_owners
from refinery.privacy.tokens import is_token

DEMO_RULES: dict[str, Any] = {
    "identifiers": [{"type": "user_id", "path": "traits.webUserId", "sources": [CRM_SOURCE]}],
    "blocked": {"disable_defaults": ["test_email_domain"]},
}

Ident = tuple[str, str]


def ensure_rules_file(path: Path) -> bool:
    """Write the demo's identity rules to `path` unless a rules file is already there; True if written."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Identity rules written by `refinery demo` (docs/identity.md). Edit freely; the demo never overwrites them.\n"
    path.write_text(header + yaml.safe_dump(DEMO_RULES, sort_keys=False), "utf-8")
    return True


def _rows(api: Client, sql: str) -> list[list[Any]]:
    rows: list[list[Any]] = api.query(sql, None)["rows"]
    return rows


def summarise(api: Client, truth: dict[str, Any], resolution: dict[str, Any], persons: dict[str, Any] | None) -> dict[str, Any]:
    """Profiles, merges, refusals by reason, links by method, and accuracy against the ground truth."""
    ids = _rows(api, "SELECT identifier_type, value, profile_id FROM identities")
    edge_rows = _rows(api, "SELECT a_type, a_value, b_type, b_value FROM identity_edges")
    # Emails and phones are stored as tokens; the ground truth holds values: compare values.
    clear = api.reveal(sorted({v for _, v, _ in ids if is_token(v)} | {v for r in edge_rows for v in (r[1], r[3]) if is_token(v)}))
    assignment: dict[Ident, str | None] = {(t, clear.get(v, v)): p for t, v, p in ids}
    edges = [((a, clear.get(b, b)), (c, clear.get(d, d))) for a, b, c, d in edge_rows]
    refusals = {r: int(n) for r, n in _rows(api, "SELECT reason, count(*) FROM identity_blocked GROUP BY 1 ORDER BY 2 DESC")}
    links = {m: int(n) for m, n in _rows(api, "SELECT method, count(*) FROM identity_links WHERE removed_at IS NULL GROUP BY 1 ORDER BY 1")}
    det = score(truth, assignment, edges)
    out: dict[str, Any] = {
        "profiles": resolution["profiles"]["profiles"],
        "identifiers": resolution["identity"]["identifiers"],
        "merges": resolution["identity"]["merges"],
        "refusals": refusals,
        "events_attributed": resolution["profiles"]["events_attributed"],
        "events_unattributed": resolution["profiles"]["events_unattributed"],
        "probabilistic_links": links,
        "consent": {
            "receipts": int(_rows(api, "SELECT count(*) FROM consent_log")[0][0]),
            "conflicts_open": int(_rows(api, "SELECT count(*) FROM consent_conflicts WHERE resolved_at IS NULL")[0][0]),
        },
        "accuracy": {"deterministic": {**det.to_dict(), "recall_of_all_pairs": _recall_all(truth, assignment)}},
    }
    if persons is not None:
        person_of = {p: person for person, group in persons["joined"].items() for p in group}
        joined = {k: (person_of.get(p, p) if p else None) for k, p in assignment.items()}
        prob = score(truth, joined, edges)
        out["accuracy"]["with_probabilistic_links"] = {
            **prob.to_dict(), "recall_of_all_pairs": _recall_all(truth, joined), "threshold": persons["policy"]["threshold"],
            "links_used": persons["links_used"], "links_refused": len(persons["refused"]),
        }
    return out


def _recall_all(truth: dict[str, Any], assignment: dict[Ident, str | None]) -> float:
    """Share of all same-person identifier pairs (shared identifiers aside) placed together, knowable or not."""
    owner, _ = truth_owners(truth)
    by_person: dict[str, list[Ident]] = defaultdict(list)
    for ident, person in owner.items():
        by_person[person].append(ident)
    total = found = 0
    for members in by_person.values():
        for a, b in combinations(members, 2):
            total += 1
            pa, pb = assignment.get(a), assignment.get(b)
            found += pa is not None and pa == pb
    return round(found / total, 6) if total else 1.0
