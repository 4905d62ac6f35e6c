"""Scoring a resolution against the demo world's ground truth: pairwise precision, recall, F1.

Pure: takes the ground truth document (`<data_dir>/demo/ground_truth.json`), the resolved
assignment (identifier -> profile id) and the edges, and counts pairs of identifiers.

- Identifiers are compared in normalised form (the truth lists them as written; `normalise`
  turns each into what resolution stores, phones with the person's country).
- Shared identifiers (several persons: family devices) are left out of both sides: no answer for
  them is right for every person. That they do not fuse a family shows in precision.
- Precision: of the pairs of identifiers resolution put in one profile, the share that belong to one
  person. Recall is measured against what the data makes *knowable*: two identifiers of a person
  are a knowable pair when a chain of evidence edges joins them through identifiers of that person
  alone (no shared identifier, nothing blocked). A person who never logged in on a second device
  has two unlinkable halves; counting that pair as missed would measure the data, not resolution.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any

from refinery.privacy.normalise import normalise

Ident = tuple[str, str]


@dataclass
class Score:
    precision: float
    recall: float
    f1: float
    predicted_pairs: int
    true_pairs: int
    knowable_pairs: int
    found_pairs: int
    false_pairs: int
    persons: int
    identifiers_scored: int
    shared_identifiers: int
    profiles_with_two_persons: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def truth_owners(truth: Mapping[str, Any], default_region: str = "US") -> tuple[dict[Ident, str], set[Ident]]:
    """(normalised identifier -> its one person, normalised shared identifiers)."""
    country = {p["person_id"]: p.get("country") for p in truth["persons"]}
    owners: dict[Ident, set[str]] = defaultdict(set)
    for item in truth["identifiers"]:
        for pid in item["persons"]:
            n = normalise(item["kind"], item["value"], country.get(pid), default_region)
            if n.reason is None:
                owners[(item["kind"], n.value)].add(pid)
    single = {k: next(iter(v)) for k, v in owners.items() if len(v) == 1}
    shared = {k for k, v in owners.items() if len(v) > 1}
    return single, shared


def score(truth: Mapping[str, Any], assignment: Mapping[Ident, str | None], edges: Iterable[tuple[Ident, Ident]],
          default_region: str = "US") -> Score:
    owner, shared = truth_owners(truth, default_region)
    scored = {k: p for k, p in assignment.items() if k in owner and p is not None}

    by_profile: dict[str, list[Ident]] = defaultdict(list)
    for ident, profile in scored.items():
        by_profile[profile].append(ident)
    predicted = correct = 0
    mixed = 0
    for members in by_profile.values():
        persons = {owner[m] for m in members}
        mixed += len(persons) > 1
        for a, b in combinations(members, 2):
            predicted += 1
            correct += owner[a] == owner[b]

    # Knowable: components of each person's own evidence (edges whose both ends are that person's).
    parent: dict[Ident, Ident] = {k: k for k in scored}

    def find(x: Ident) -> Ident:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        if a in scored and b in scored and owner[a] == owner[b]:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[Ident, list[Ident]] = defaultdict(list)
    for k in scored:
        groups[find(k)].append(k)
    knowable = found = 0
    for members in groups.values():
        for a, b in combinations(members, 2):
            knowable += 1
            found += scored[a] == scored[b]

    true_pairs = sum(len(v) * (len(v) - 1) // 2 for v in _by_person(scored, owner).values())
    precision = correct / predicted if predicted else 1.0
    recall = found / knowable if knowable else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Score(
        precision=round(precision, 6), recall=round(recall, 6), f1=round(f1, 6), predicted_pairs=predicted,
        true_pairs=true_pairs, knowable_pairs=knowable, found_pairs=found, false_pairs=predicted - correct,
        persons=len({owner[k] for k in scored}), identifiers_scored=len(scored), shared_identifiers=len(shared),
        profiles_with_two_persons=mixed,
    )


def _by_person(scored: Mapping[Ident, str], owner: Mapping[Ident, str]) -> dict[str, list[Ident]]:
    out: dict[str, list[Ident]] = defaultdict(list)
    for k in scored:
        out[owner[k]].append(k)
    return out
