"""The identity graph's semantics in plain Python: the reference for `graph.py`, and the resolver the
incremental path runs on the part of the graph a batch of events touches.

Input: identifiers `(type, value)` with their first-seen times (blocked ones left out) and the
edges between them. Output: for every identifier the identifier that keys its profile, its status
and reason, and every refusal (conflicting edges, hubs, ambiguous identifiers, detached ones) -
steps 1-7 of `graph.py`'s docstring, which this module follows line by line:

1. identifiers are ordered by (first_seen, type priority, type, value);
2. an edge joining two values of one exclusive type is refused (`conflicting_<type>`);
3. an identifier of a non-exclusive type adjacent to more than `hub_max_user_ids` values of one
   exclusive type is a hub (`shared_identifier`) and links nobody;
4. connected components of the remaining edges;
5. for each exclusive type, highest priority first, a group holding two or more of its values is
   split by nearest anchor; an identifier equally near two or more (or near none) is `ambiguous`
   and the ambiguous identifiers that touch form groups of their own;
6. a type limited to more than one value keeps a group's oldest `limit` values (`limit_exceeded`);
7. a group of more than `max_merges_per_profile + 1` identifiers - counted before step 6's
   detachments, as the SQL counts them - is not formed (`profile_too_large`).

Everything is a function of the identifier set and the edge set, so `resolve` on one component
(hubs decided over the whole graph) gives what a full resolution gives for that component.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from refinery.identity.rules import IdentityRules

#: An identifier: (type, value).
Ident = tuple[str, str]
Order = tuple[Any, int, str, str]


def profile_id(ident: Ident) -> str:
    """`prof_` + the first 24 hex digits of md5('type:value') of the profile's oldest identifier."""
    return "prof_" + hashlib.md5(f"{ident[0]}:{ident[1]}".encode()).hexdigest()[:24]  # noqa: S324 - an id, not security


@dataclass(frozen=True)
class Hub:
    kind_of_many: str  # the exclusive type it is adjacent to too many values of (the greatest name, as SQL's max)
    linked: int        # the most values of one such type


@dataclass
class Resolution:
    """The graph's result for a set of identifiers (all of them, or a closed part of the graph)."""

    order: dict[Ident, Order]
    key: dict[Ident, Ident] = field(default_factory=dict)          # identifier -> identifier keying its profile
    status: dict[Ident, str] = field(default_factory=dict)         # linked | shared | ambiguous | detached
    reason: dict[Ident, str | None] = field(default_factory=dict)
    hubs: dict[Ident, Hub] = field(default_factory=dict)
    conflicts: list[tuple[Ident, Ident, str]] = field(default_factory=list)   # (older, younger, reason)
    ambiguous: list[tuple[Ident, str, list[Ident]]] = field(default_factory=list)  # (identifier, reason, candidates)
    detached: list[tuple[Ident, str, Ident]] = field(default_factory=list)     # (identifier, reason, would-join key)

    def profile_id(self, ident: Ident) -> str:
        return profile_id(self.key[ident])


def order_key(ident: Ident, first_seen: Any, rules: IdentityRules) -> Order:
    return (first_seen, rules.rank(ident[0]), ident[0], ident[1])


def find_hubs(idents: Iterable[Ident], adjacency: Mapping[Ident, Iterable[Ident]], rules: IdentityRules) -> dict[Ident, Hub]:
    """Step 3 for `idents`, counting every neighbour in `adjacency` (conflicting edges and hubs included)."""
    exclusive = set(rules.exclusive_types)
    hubs: dict[Ident, Hub] = {}
    for node in idents:
        if node[0] in exclusive:
            continue
        counts: dict[str, set[str]] = {}
        for other in adjacency.get(node, ()):
            if other[0] in exclusive:
                counts.setdefault(other[0], set()).add(other[1])
        over = {k: len(v) for k, v in counts.items() if len(v) > rules.hub_max_user_ids}
        if over:
            hubs[node] = Hub(max(over), max(over.values()))
    return hubs


def _components(nodes: Iterable[Ident], adjacency: Mapping[Ident, set[Ident]], order: Mapping[Ident, Order]) -> dict[Ident, Ident]:
    """Each node's smallest (oldest) node of its connected component."""
    label: dict[Ident, Ident] = {}
    for start in nodes:
        if start in label:
            continue
        seen = [start]
        label[start] = start
        queue = deque([start])
        while queue:
            u = queue.popleft()
            for v in adjacency.get(u, ()):
                if v not in label:
                    label[v] = start
                    seen.append(v)
                    queue.append(v)
        smallest = min(seen, key=order.__getitem__)
        for v in seen:
            label[v] = smallest
    return label


def resolve(
    first_seen: Mapping[Ident, datetime | Any],
    edges: Iterable[tuple[Ident, Ident]],
    rules: IdentityRules,
    *,
    hubs: Mapping[Ident, Hub] | None = None,
) -> Resolution:
    """Steps 1-7 over identifiers `first_seen` (not blocked) and `edges` between them.

    `hubs`, when given, replaces step 3: the caller resolving one part of a larger graph decides hubs
    over the whole graph (a hub's neighbours outside the part count too).
    """
    order = {i: order_key(i, t, rules) for i, t in first_seen.items()}
    res = Resolution(order)
    exclusive = list(rules.exclusive_types)
    exclusive_set = set(exclusive)

    adjacency: dict[Ident, set[Ident]] = {}
    for a, b in edges:
        if a == b or a not in order or b not in order:
            continue
        adjacency.setdefault(a, set()).add(b)
        adjacency.setdefault(b, set()).add(a)

    # 2. Conflicting edges (each once, older end first).
    for a, nbrs in adjacency.items():
        for b in nbrs:
            if a[0] == b[0] and a[0] in exclusive_set and order[a] < order[b]:
                res.conflicts.append((a, b, f"conflicting_{a[0]}"))
    # 3. Hubs.
    res.hubs = dict(hubs) if hubs is not None else find_hubs(order, adjacency, rules)
    hub_set = set(res.hubs)

    # 4. Components of the usable edges.
    usable: dict[Ident, set[Ident]] = {}
    for a, nbrs in adjacency.items():
        if a in hub_set:
            continue
        for b in nbrs:
            if b in hub_set or (a[0] == b[0] and a[0] in exclusive_set):
                continue
            usable.setdefault(a, set()).add(b)
    group = _components(sorted(order, key=order.__getitem__), usable, order)

    # 5. Nearest-anchor splits, highest-priority exclusive type first.
    ambiguous_reasons: dict[Ident, list[str]] = {}
    for kind in exclusive:
        members: dict[Ident, list[Ident]] = {}
        for node, g in group.items():
            members.setdefault(g, []).append(node)
        for nodes in members.values():
            anchors = [n for n in nodes if n[0] == kind]
            if len(anchors) < 2:
                continue
            inside = set(nodes)
            # Multi-source BFS: each node's set of nearest anchors.
            dist: dict[Ident, int] = {}
            nearest: dict[Ident, set[Ident]] = {}
            frontier = []
            for a in anchors:
                dist[a], nearest[a] = 0, {a}
                frontier.append(a)
            d = 0
            while frontier:
                reached: dict[Ident, set[Ident]] = {}
                for u in frontier:
                    for v in usable.get(u, ()):
                        if v in inside and v not in dist:
                            reached.setdefault(v, set()).update(nearest[u])
                d += 1
                for v, anc in reached.items():
                    dist[v], nearest[v] = d, anc
                frontier = list(reached)
            assigned: dict[Ident, Ident | None] = {}
            for n in nodes:
                anc = nearest.get(n, set())
                if len(anc) == 1:
                    assigned[n] = next(iter(anc))
                else:
                    assigned[n] = None
                    cands = sorted(anc, key=order.__getitem__)
                    res.ambiguous.append((n, f"conflicting_{kind}", cands))
                    ambiguous_reasons.setdefault(n, []).append(f"conflicting_{kind}")
            by_anchor: dict[Ident, list[Ident]] = {}
            for n, anchor in assigned.items():
                if anchor is not None:
                    by_anchor.setdefault(anchor, []).append(n)
            for ns in by_anchor.values():
                smallest = min(ns, key=order.__getitem__)
                for n in ns:
                    group[n] = smallest
            amb = [n for n, a in assigned.items() if a is None]
            amb_set = set(amb)
            amb_adj = {n: {v for v in usable.get(n, ()) if v in amb_set} for n in amb}
            for n, label in _components(amb, amb_adj, order).items():
                group[n] = label

    # 6. Limits above one: a group keeps its oldest `limit` values of the type.
    detached: dict[Ident, tuple[str, Ident]] = {}
    members = {}
    for node, g in group.items():
        members.setdefault(g, []).append(node)
    for kind, limit in sorted(rules.capped_types.items()):
        for g, nodes in members.items():
            values = sorted((n for n in nodes if n[0] == kind), key=order.__getitem__)
            for n in values[limit:]:
                detached[n] = ("limit_exceeded", g)
    # 7. The merge cap (the group's size before step 6, as the SQL counts it).
    cap = rules.max_merges_per_profile + 1
    for g, nodes in members.items():
        if len(nodes) > cap:
            for n in nodes:
                detached.setdefault(n, ("profile_too_large", g))

    for node in order:
        if node in res.hubs:
            res.key[node], res.status[node], res.reason[node] = node, "shared", "shared_identifier"
        elif node in detached:
            res.key[node], res.status[node], res.reason[node] = node, "detached", detached[node][0]
        elif node in ambiguous_reasons:
            res.key[node], res.status[node], res.reason[node] = group[node], "ambiguous", min(ambiguous_reasons[node])
        else:
            res.key[node], res.status[node], res.reason[node] = group[node], "linked", None
    res.detached = [(n, r, g) for n, (r, g) in sorted(detached.items(), key=lambda x: order[x[0]])]
    return res


def edge_status(a: Ident, b: Ident, pa: str | None, pb: str | None, ra: str | None, rb: str | None) -> tuple[str, str | None]:
    """An edge's `identity_edges` status and reason, from its ends' profile ids and reasons (as resolve.py writes it)."""
    if pa == pb:
        return "active", None
    if ra is not None:
        return "blocked", ra
    if rb is not None:
        return "blocked", rb
    if a[0] == b[0]:
        return "blocked", f"conflicting_{a[0]}"
    return "blocked", "nearer_other_profile"
