"""The incremental follower's working set: the `identities` rows and `identity_edges` rows it has
read or written, kept in memory between batches so that a batch reads the graph around its
identifiers from here instead of from the tables (docs/decisions/0023-incremental-identity-working-set.md).

It only ever holds what is committed: rows read inside a batch's transaction before the batch
writes (the writer is serial, so they are what the last commit left), and a batch's own rows once
its transaction has committed (`Engine.after_commit`). It is dropped whenever something else may
have written the identity tables since the follower's last batch: the batch compares a
fingerprint of `identity_resolutions` and `privacy_requests` (a full resolution, an override, an
erasure each leave a row there) with the one its last commit left. Without a working set (a
fresh one per batch) a batch reads everything from the tables, as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from refinery.identity.reference import Ident
from refinery.storage.engine import Engine

EdgeKey = tuple[Ident, Ident]
#: Identifiers kept at most; past this the working set starts again empty (the next batches read
#: the graph around them from the tables, as a cold start does).
MAX_IDENTIFIERS = 500_000

_IDENTITIES_BY_KEYS = ("SELECT i.* FROM identities i JOIN (SELECT unnest(CAST(? AS VARCHAR[])) AS kind, "
                       "unnest(CAST(? AS VARCHAR[])) AS value) k ON k.kind = i.identifier_type AND k.value = i.value")
_EDGES_BY_ENDS = """
    WITH k AS (SELECT unnest(CAST(? AS VARCHAR[])) AS kind, unnest(CAST(? AS VARCHAR[])) AS value)
    SELECT e.* FROM identity_edges e WHERE EXISTS (SELECT 1 FROM k WHERE k.kind = e.a_type AND k.value = e.a_value)
    UNION ALL
    SELECT e.* FROM identity_edges e WHERE EXISTS (SELECT 1 FROM k WHERE k.kind = e.b_type AND k.value = e.b_value)
      AND NOT EXISTS (SELECT 1 FROM k WHERE k.kind = e.a_type AND k.value = e.a_value)
"""


def edge_key(r: dict[str, Any]) -> EdgeKey:
    return (r["a_type"], r["a_value"]), (r["b_type"], r["b_value"])


class WorkingSet:
    """identifier -> its `identities` row (None: not in the table), edge -> its `identity_edges`
    row, identifier -> its edges, for the identifiers whose edges are all here (`complete`)."""

    def __init__(self, max_identifiers: int = MAX_IDENTIFIERS):
        self.max_identifiers = max_identifiers
        self.fingerprint: tuple[Any, ...] | None = None
        self.reads = 0  # statements run to fill it (a measure for tests and the benchmark)
        self.clears = -1  # times it was dropped
        self.clear()

    def clear(self) -> None:
        #: Whether `ids` holds every row of `identities` (and `edges` every edge): then an identifier
        #: not in `ids` is not stored, and nothing needs a read. Set by `load`, kept by `install`.
        self.whole = False
        self.clears += 1
        #: Occurrences of the events attached since the settle watermark, per attach, kept for the
        #: settle: (settle watermark, attach watermark) they cover, the lists, the number of events.
        self.pending_range: tuple[Any, Any] | None = None
        self.pending: list[list[dict[str, Any]]] = []
        self.pending_events = 0
        self.ids: dict[Ident, dict[str, Any] | None] = {}
        self.edges: dict[EdgeKey, dict[str, Any]] = {}
        self.incident: dict[Ident, set[EdgeKey]] = {}
        self.complete: set[Ident] = set()

    def validate(self, fingerprint: tuple[Any, ...]) -> None:
        """Drop everything unless the tables are as this working set's last commit left them."""
        if fingerprint != self.fingerprint:
            self.clear()
            self.fingerprint = None

    # --- reads: copies, so that a batch may change its rows freely ------------------------------

    def identities(self, engine: Engine, idents: Iterable[Ident]) -> dict[Ident, dict[str, Any]]:
        """The stored rows of `idents` that exist."""
        want = set(idents)
        self._fill(engine, want)
        out = {}
        for i in want:
            row = self.ids.get(i)
            if row is not None:
                out[i] = dict(row)
        return out

    def peek(self, engine: Engine, idents: Iterable[Ident]) -> dict[Ident, dict[str, Any]]:
        """`identities`, without copies: the attach path only reads them."""
        want = set(idents)
        if not want <= self.ids.keys():
            self._fill(engine, want)
        return {i: row for i in want if (row := self.ids.get(i)) is not None}

    def note_attached(self, settled: Any, attached: Any, now: Any, occurrences: list[dict[str, Any]], events: int) -> None:
        """After an attach committed: its occurrences, kept when they continue what is kept (the
        events between the settle and the attach watermark), else nothing is kept."""
        if self.pending_range is not None and self.pending_range == (settled, attached):
            self.pending.append(occurrences)
            self.pending_events += events
        elif settled == attached:
            self.pending, self.pending_events = [occurrences], events
        else:
            self.pending_range, self.pending, self.pending_events = None, [], 0
            return
        self.pending_range = (settled, now)

    def take_pending(self, settled: Any, attached: Any) -> tuple[list[dict[str, Any]], int] | None:
        """The kept occurrences when they cover exactly the events between `settled` and `attached`
        (None otherwise); nothing is kept afterwards either way."""
        found = None
        if self.pending_range is not None and self.pending_range == (settled, attached):
            found = ([o for occ in self.pending for o in occ], self.pending_events)
        self.pending_range, self.pending, self.pending_events = None, [], 0
        return found

    def load(self, identities: Iterable[dict[str, Any]], edges: Iterable[dict[str, Any]], fingerprint: tuple[Any, ...]) -> None:
        """The whole of both tables, read in one snapshot whose fingerprint is `fingerprint` (a
        follower starting, or starting again after its working set was dropped)."""
        self.clear()
        self.clears -= 1  # a load is not a drop
        for r in identities:
            self.ids[(r["identifier_type"], r["value"])] = r
        for r in edges:
            self._put_edge(r)
        self.whole = True
        self.fingerprint = fingerprint

    def has_edges(self, engine: Engine, keys: Iterable[EdgeKey]) -> bool:
        """Whether every edge in `keys` is stored (as `identity_edges` keys them: centre first)."""
        keys = set(keys)
        ends = {end for key in keys for end in key}
        missing = [] if self.whole else sorted(ends - self.complete)
        if missing:
            self._fill_edges(engine, missing)
        return all(key in self.edges for key in keys)

    def _fill(self, engine: Engine, want: set[Ident]) -> None:
        missing = sorted(i for i in want if i not in self.ids)
        if self.whole:
            return  # not stored
        if missing:
            self.reads += 1
            found = {(r["identifier_type"], r["value"]): r for r in engine.fetch_dicts(
                _IDENTITIES_BY_KEYS, [[k for k, _ in missing], [v for _, v in missing]])}
            for i in missing:
                self.ids[i] = found.get(i)

    def _fill_edges(self, engine: Engine, missing: list[Ident]) -> None:
        self.reads += 1
        for r in engine.fetch_dicts(_EDGES_BY_ENDS, [[k for k, _ in missing], [v for _, v in missing]]):
            self._put_edge(r)
        self.complete.update(missing)

    def edges_of(self, engine: Engine, idents: Iterable[Ident]) -> list[dict[str, Any]]:
        """Every stored edge with an end among `idents`."""
        want = set(idents)
        missing = [] if self.whole else sorted(want - self.complete)
        if missing:
            self._fill_edges(engine, missing)
        keys = {k for i in want for k in self.incident.get(i, ())}
        return [dict(self.edges[k]) for k in keys]

    # --- what a batch committed ---------------------------------------------------------------

    def _put_edge(self, row: dict[str, Any]) -> None:
        key = edge_key(row)
        self.edges[key] = row
        for end in key:
            self.incident.setdefault(end, set()).add(key)

    def install(self, identities: Iterable[dict[str, Any]], edges: Iterable[dict[str, Any]], fingerprint: tuple[Any, ...]) -> None:
        """Rows a batch wrote, after its commit; `fingerprint` is what the tables say now."""
        for r in identities:
            self.ids[(r["identifier_type"], r["value"])] = dict(r)
        for r in edges:
            self._put_edge(dict(r))
        self.fingerprint = fingerprint
        if len(self.ids) > self.max_identifiers:
            self.clear()
