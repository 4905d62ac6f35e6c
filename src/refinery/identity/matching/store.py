"""Probabilistic links in `identity_links`: written idempotently, removed and restored, never deleted.

Rules, all inside one writer transaction:

- Writing a run (one method, one model version) inserts the links it found that are new, keeps
  those already there (refreshing score and evidence), brings back links of the same version that
  an earlier run had superseded, and supersedes (sets `removed_at`, notes `superseded_by` in the
  evidence) the method's active links that this run did not find. Running the same version twice
  changes nothing.
- A person removing a link (`remove_link`) sets `removed_at` and records who, why and when under
  `evidence.removed`. That removal holds for the pair, not only for one model version: a later
  run that finds the pair again stores its link already removed, carrying the removal, so a wrong
  link a person took out never comes back by itself. `restore_link` undoes a removal.
- Rows are never deleted: every score a model produced stays readable for `explain`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa

from refinery.identity.matching.errors import LinkNotFound, MatchingError
from refinery.identity.matching.links import LINK_COLUMNS, LINK_SCHEMA, METHODS
from refinery.storage.engine import Engine
from refinery.storage.writer import Writer

INCOMING = "refinery_incoming_links"  # the run's links, staged for the statements below

INSERT_NEW = """
INSERT INTO identity_links (link_id, a_type, a_value, b_type, b_value, score, method, model_version, evidence, created_at, removed_at)
SELECT i.link_id, i.a_type, i.a_value, i.b_type, i.b_value, i.score, i.method, i.model_version,
       CASE WHEN r.removal IS NULL THEN json(i.evidence)
            ELSE json_merge_patch(json(i.evidence), json_object('removed', r.removal)) END,
       i.created_at,
       CASE WHEN r.removal IS NULL THEN NULL ELSE $now END
FROM refinery_incoming_links AS i
LEFT JOIN LATERAL (
    -- a pair a person removed, for this method (any model version), carries that removal
    SELECT k.evidence -> '$.removed' AS removal
    FROM identity_links AS k
    WHERE k.method = i.method
      AND k.a_type = i.a_type AND k.a_value = i.a_value AND k.b_type = i.b_type AND k.b_value = i.b_value
      AND k.removed_at IS NOT NULL AND json_exists(k.evidence, '$.removed')
    ORDER BY k.removed_at DESC
    LIMIT 1
) AS r ON TRUE
WHERE NOT EXISTS (SELECT 1 FROM identity_links AS l WHERE l.link_id = i.link_id)
"""

# Same link id: refresh score and evidence; a link superseded earlier (not removed by a person) comes back.
REFRESH = """
UPDATE identity_links AS l
SET score = i.score,
    evidence = i.evidence,
    removed_at = CASE WHEN json_exists(l.evidence, '$.removed') THEN l.removed_at ELSE NULL END
FROM (
    SELECT n.link_id, n.score,
           json_merge_patch(json(n.evidence), json_object('removed', o.evidence -> '$.removed')) AS evidence
    FROM refinery_incoming_links AS n JOIN identity_links AS o ON o.link_id = n.link_id
) AS i
WHERE l.link_id = i.link_id
  AND (l.score IS DISTINCT FROM i.score
       OR CAST(l.evidence AS VARCHAR) IS DISTINCT FROM CAST(i.evidence AS VARCHAR)
       OR l.removed_at IS NOT NULL AND NOT json_exists(l.evidence, '$.removed'))
"""

# Links of the method this run did not find: marked superseded (a person's removal stays recorded too).
SUPERSEDE = """
UPDATE identity_links
SET removed_at = coalesce(removed_at, $now),
    evidence = json_merge_patch(coalesce(evidence, CAST('{}' AS JSON)), json_object('superseded_by', $version))
WHERE method = $method AND NOT json_exists(coalesce(evidence, CAST('{}' AS JSON)), '$.superseded_by')
  AND link_id NOT IN (SELECT link_id FROM refinery_incoming_links)
"""

COUNT_ACTIVE = "SELECT count(*) FROM identity_links WHERE method = $method AND model_version = $version AND removed_at IS NULL"

REMOVE = """
UPDATE identity_links AS l
SET removed_at = $now,
    evidence = json_merge_patch(coalesce(l.evidence, CAST('{}' AS JSON)),
                                json_object('removed', json_object('at', CAST($now AS VARCHAR), 'reason', $reason, 'by', $by)))
FROM (SELECT method, a_type, a_value, b_type, b_value FROM identity_links WHERE link_id = $link_id) AS t
WHERE l.method = t.method AND l.a_type = t.a_type AND l.a_value = t.a_value AND l.b_type = t.b_type AND l.b_value = t.b_value
  AND (l.removed_at IS NULL OR l.link_id = $link_id)
"""

RESTORE = """
UPDATE identity_links AS l
SET evidence = json_merge_patch(l.evidence, json_object('removed', NULL)),
    removed_at = CASE WHEN json_exists(l.evidence, '$.superseded_by') THEN l.removed_at ELSE NULL END
FROM (SELECT method, a_type, a_value, b_type, b_value FROM identity_links WHERE link_id = $link_id) AS t
WHERE l.method = t.method AND l.a_type = t.a_type AND l.a_value = t.a_value AND l.b_type = t.b_type AND l.b_value = t.b_value
  AND json_exists(l.evidence, '$.removed')
"""

ACTIVE = """
SELECT link_id, a_type, a_value, b_type, b_value, score, method, model_version, evidence, created_at, removed_at FROM identity_links
WHERE removed_at IS NULL AND score >= $min_score AND list_contains($methods, method)
ORDER BY method, a_type, a_value, b_type, b_value
"""


@dataclass(frozen=True)
class WriteSummary:
    method: str
    model_version: str
    found: int  # links in this run
    inserted: int
    refreshed: int  # already there: score or evidence refreshed, or brought back from superseded
    superseded: int  # links of the method this run did not find, now marked superseded
    active: int  # active links of this version afterwards


def write_links(engine: Engine, links: pa.Table, *, method: str, model_version: str, now: datetime | None = None) -> WriteSummary:
    """Write one run's links (see the module docstring); call it inside the writer (`save_links`)."""
    if method not in METHODS:
        raise MatchingError(f"Unknown link method {method!r}.", field="method", fix=f"Use one of {', '.join(METHODS)}.")
    links = links.select(list(LINK_COLUMNS)).cast(LINK_SCHEMA)
    for column, expected in (("method", method), ("model_version", model_version)):
        values = set(links.column(column).to_pylist())
        if values - {expected}:
            raise MatchingError(
                f"Every link of one write must have {column} {expected!r}; found {sorted(map(str, values))}.",
                field=column,
                fix="Write each run (one method, one model version) on its own.",
            )
    now = now or datetime.now(UTC)
    engine.register(INCOMING, links)
    try:
        inserted = _count(engine.execute(INSERT_NEW, {"now": now}))
        refreshed = _count(engine.execute(REFRESH))
        superseded = _count(engine.execute(SUPERSEDE, {"now": now, "version": model_version, "method": method}))
    finally:
        engine.unregister(INCOMING)
    active = int(engine.fetch_all(COUNT_ACTIVE, {"method": method, "version": model_version})[0][0])
    return WriteSummary(method, model_version, links.num_rows, inserted, refreshed, superseded, active)


def save_links(writer: Writer, links: pa.Table, *, method: str, model_version: str, now: datetime | None = None) -> WriteSummary:
    """`write_links` through the single writer, in one transaction."""
    return writer.call(lambda engine: write_links(engine, links, method=method, model_version=model_version, now=now))


def remove_link(engine: Engine, link_id: str, *, reason: str, by: str | None = None, now: datetime | None = None) -> int:
    """Take a link out (and any other active link of the same pair and method); returns rows changed."""
    changed = _count(
        engine.execute(REMOVE, {"link_id": link_id, "reason": reason, "by": by, "now": now or datetime.now(UTC)})
    )
    if not changed:
        raise LinkNotFound(f"No link {link_id!r} in identity_links.", field="link_id", fix="List links with `refinery query`.")
    return changed


def restore_link(engine: Engine, link_id: str) -> int:
    """Undo a person's removal of the pair `link_id` joins; superseded versions stay superseded."""
    if not engine.fetch_all("SELECT 1 FROM identity_links WHERE link_id = $link_id", {"link_id": link_id}):
        raise LinkNotFound(f"No link {link_id!r} in identity_links.", field="link_id", fix="List links with `refinery query`.")
    return _count(engine.execute(RESTORE, {"link_id": link_id}))


def active_links(engine: Engine, *, min_score: float = 0.0, methods: Sequence[str] = METHODS) -> pa.Table:
    """Links in force at or above `min_score`: what a policy 'deterministic + probabilistic >= t' adds.

    The resolver must still apply merge protection to these (blocked values, one user id per
    profile): a probabilistic link proposes a merge, it never forces one.
    """
    return engine.fetch_arrow(ACTIVE, {"min_score": min_score, "methods": list(methods)}, cursor=engine.reader())


def _count(result: object) -> int:
    row = result.fetchone()  # type: ignore[attr-defined]
    return int(row[0]) if row else 0
