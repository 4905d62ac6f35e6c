"""The shape of a probabilistic link: one row of `identity_links`, as Arrow.

A link joins two identifiers (type + value) with a score in 0..1, the method that found it, the
model version that scored it and the evidence behind the score. Its id is derived from the
ordered pair, the method and the model version, so the same run finds the same ids.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import pyarrow as pa

PERSON_RECORD = "person_record"
DEVICE_SIGNAL = "device_signal"
METHODS = (PERSON_RECORD, DEVICE_SIGNAL)

LINK_COLUMNS = (
    "link_id", "a_type", "a_value", "b_type", "b_value", "score", "method", "model_version",
    "evidence", "created_at", "removed_at",
)  # fmt: skip

LINK_SCHEMA = pa.schema(
    [
        ("link_id", pa.string()),
        ("a_type", pa.string()),
        ("a_value", pa.string()),
        ("b_type", pa.string()),
        ("b_value", pa.string()),
        ("score", pa.float64()),
        ("method", pa.string()),
        ("model_version", pa.string()),
        ("evidence", pa.string()),  # JSON text; the table column is JSON
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("removed_at", pa.timestamp("us", tz="UTC")),
    ]
)


def ordered(a: tuple[str, str], b: tuple[str, str]) -> tuple[tuple[str, str], tuple[str, str]]:
    """The pair in its one canonical order (by type, then value), so (a, b) and (b, a) are one link."""
    return (a, b) if a <= b else (b, a)


def link_id(method: str, model_version: str, a: tuple[str, str], b: tuple[str, str]) -> str:
    """A deterministic id for a link: the same pair, method and model version always give the same id."""
    (at, av), (bt, bv) = ordered(a, b)
    key = json.dumps([method, model_version, at, av, bt, bv], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def fingerprint(parts: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able mapping (settings, data digests)."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def build_links(rows: Iterable[Mapping[str, Any]], *, method: str, model_version: str, created_at: datetime) -> pa.Table:
    """Rows of (a_type, a_value, b_type, b_value, score, evidence) -> an identity_links Arrow table.

    Pairs are put in canonical order; a pair found more than once keeps its highest score; a
    self-pair (both ends the same identifier) is dropped. The result is sorted by link id.
    """
    best: dict[tuple[tuple[str, str], tuple[str, str]], tuple[float, Any]] = {}
    for r in rows:
        a, b = (str(r["a_type"]), str(r["a_value"])), (str(r["b_type"]), str(r["b_value"]))
        if a == b:
            continue
        pair = ordered(a, b)
        score = float(r["score"])
        if pair not in best or score > best[pair][0]:
            best[pair] = (score, r.get("evidence"))
    out = []
    for (a, b), (score, evidence) in best.items():
        out.append(
            {
                "link_id": link_id(method, model_version, a, b),
                "a_type": a[0], "a_value": a[1], "b_type": b[0], "b_value": b[1],
                "score": score,
                "method": method,
                "model_version": model_version,
                "evidence": evidence if isinstance(evidence, str) else json.dumps(evidence, sort_keys=True),
                "created_at": created_at,
                "removed_at": None,
            }
        )  # fmt: skip
    out.sort(key=lambda r: str(r["link_id"]))
    return pa.Table.from_pylist(out, schema=LINK_SCHEMA)


def empty_links() -> pa.Table:
    return LINK_SCHEMA.empty_table()
