"""Incremental identity resolution: the identity and profile tables follow the events as they are
committed, and end up as a full resolution over all events would leave them.

Why it can be local (docs/decisions/0006-identity-resolution.md): the graph's result for an
identifier depends only on its *usable* component (edges that are not conflicting and touch no
hub), on the first-seen order inside it, and on whether its identifiers are hubs. A batch of events
changes the graph only around the identifiers it touches (T): new identifiers, identifiers seen
earlier than before (a back-dated event), and the ends of new edges; only those can become hubs
(hubs only grow as edges are added). So the region R - everything reachable from T over edges that
were usable before *or* are usable now - holds every identifier whose result can change, and it is
closed: no usable edge leaves it, old or new. R is resolved again with `identity.reference` (hubs
decided over the whole graph) and only the differences are written.

Per batch, inside the one writer transaction (`run_batch`):
1. the batch: events with `loaded_at` at or after the watermark (the start of the previous
   batch's transaction: the writer is serial, so every event committed before it is older);
2. identifiers and edges of the batch, extracted by the same SQL as a full resolution
   (`identity.extract` over a temporary view that stands in for `events`);
3. identifier and edge statistics merged into `identities` / `identity_edges`;
4. when T is empty (every identifier and edge already known: the common case) only the batch's
   events are attributed; otherwise R is found by breadth-first search over `identity_edges`,
   resolved, and `identities`, `identity_edges`, `identity_blocked`, `profile_merges` and the
   attribution of older events of the profiles that changed are rewritten for R;
5. the `profiles` rows of every profile that gained events or changed are rebuilt with
   `profiles.build`'s own SQL, over those profiles only.

It falls back to a full resolution (`profiles.build.resolve_and_build`) when nothing was resolved
yet, when the rules changed since the last run, while a user's removal or split is in force (or was
revoked since the last run), when a batch is larger than `max_events`, and in one
case whose effect is not local: a new user id equal to a known anonymous id (an older alias's
`previousId` would now be typed as a user id).

The watermark and the follower's counters live in one row of `identity_resolutions`
(`resolution_id = 'incremental'`, `finished_at` = the watermark); a full resolution's `started_at`
is a watermark too (it saw every event committed before it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from sqlglot import exp

from refinery.identity import reference as ref
from refinery.identity import sql
from refinery.identity.extract import extract
from refinery.identity.reference import Ident
from refinery.identity.rules import _TYPE_NAME, PII_TYPES, IdentityRules
from refinery.identity.working_set import WorkingSet
from refinery.privacy.normalise import normalise
from refinery.privacy.pii import reveal, token_for
from refinery.privacy.tokens import is_token
from refinery.storage.engine import Engine

if TYPE_CHECKING:
    from refinery.governance.lineage import RunWindow
    from refinery.profiles.policy import TraitPolicy
    from refinery.settings import Settings
    from refinery.storage.writer import Writer

log = logging.getLogger(__name__)

STATE_ID = "incremental"
#: The settle watermark's row in `identity_resolutions` (its `finished_at`).
SETTLED_ID = "incremental_settled"
#: A batch with more events than this is resolved in full (one set-based pass beats row-wise work).
MAX_BATCH_EVENTS = 50_000
#: The follower never runs a full resolution in the writer over a store larger than this (ingest would stall).
FOLLOWER_MAX_FULL_EVENTS = 200_000
#: The source name of the stand-in rows that tell the extractor which alias `previousId`s are known user ids.
_KNOWN = " known user id "
_TS = pa.timestamp("us", tz="UTC")
_GRAPH_REFUSALS = ("shared_identifier", "limit_exceeded", "profile_too_large")


@dataclass
class BatchReport:
    #: none | attach (attributed from known identifiers) | region (a region resolved) | settle (statistics only)
    #: | full | skipped; `phase` says which transaction: attach (event_profiles and the attach watermark
    #: only), settle (statistics of attached events), both (attach and settle in one)
    mode: str
    events: int = 0           # events attributed
    settled: int = 0          # events whose statistics were folded in
    phase: str = "both"
    identifiers: int = 0      # distinct identifiers in the batch
    touched: int = 0          # |T|
    region: int = 0           # |R|
    changed: int = 0          # identifiers whose profile, status or reason changed
    merges: int = 0
    unmerges: int = 0
    reason: str | None = None  # why a full resolution ran
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- state ---------------------------------------------------------------------------------

#: Everything a batch needs to know first, in one cheap statement (planned once): the watermark rows
#: (a digest of their rules), and what tells whether anyone else wrote the identity tables.
_STATE = """
    SELECT now(),
           (SELECT list(struct_pack(id := resolution_id, mode := mode, started := started_at, finished := finished_at,
                                    rules := md5(CAST(rules AS VARCHAR)))) FROM identity_resolutions),
           (SELECT struct_pack(n := count(*), at := max(coalesce(finished_at, started_at))) FROM privacy_requests),
           (SELECT struct_pack(n := count(*) FILTER (WHERE revoked_at IS NULL), revoked := max(revoked_at)) FROM identity_overrides)
"""
_RULES_SEEN: dict[tuple[str, str], bool] = {}  # (digest of the stored rules, these rules) -> equal


@dataclass(frozen=True)
class _Marks:
    """What a batch's first statement learns: the transaction's time, the two watermarks (events
    loaded before `attached` have their `event_profiles`; before `settled`, their statistics too),
    why a full resolution is needed instead (or None), and the fingerprint of what last wrote the
    identity tables (the working set is valid while it is the one its last commit left)."""

    now: datetime
    attached: datetime | None
    settled: datetime | None
    why_full: str | None
    fingerprint: tuple[Any, ...]
    mine: bool = False  # the top row is the follower's own (`incremental`)


def _read_state(engine: Engine, cursor: Any = None) -> tuple[datetime, tuple[datetime, str, str] | None, datetime | None,
                                                              datetime | None, tuple[Any, ...], bool]:
    """(now, the top watermark row as (covered, resolution id, rules digest), the settle row's
    watermark, the latest full resolution's start, the fingerprint, whether an override is in force
    or changed since the top watermark)."""
    sql_ = _STATE
    now, runs, privacy, overrides = (engine.execute_reused(sql_) if cursor is None else engine.execute(sql_, cursor=cursor)).fetchall()[0]
    top: tuple[datetime, str, str] | None = None
    settled = full_at = None
    for r in runs or ():
        if r["mode"] in ("full", "incremental"):
            covered = r["finished"] if r["id"] == STATE_ID else r["started"]
            if covered is not None and (top is None or (covered, r["id"] == STATE_ID) > (top[0], top[1] == STATE_ID)):
                top = (covered, r["id"], r["rules"])
        if r["id"] == SETTLED_ID:
            settled = r["finished"]
        if r["mode"] == "full" and (full_at is None or r["started"] > full_at):
            full_at = r["started"]
    covered_at = top[0] if top else None
    fingerprint = _fingerprint(covered_at, top is not None and top[1] == STATE_ID, privacy["n"], privacy["at"])
    in_force = bool(overrides["n"]) or (overrides["revoked"] is not None and covered_at is not None and overrides["revoked"] >= covered_at)
    return now, top, settled, full_at, fingerprint, in_force


def _watermark(engine: Engine, rules: IdentityRules) -> _Marks:
    """The batch's `_Marks`, in one statement (two when the stored rules are new to this process).

    `attached` is the top row of `identity_resolutions` (the follower's `finished_at`, or a full
    resolution's `started_at`: it saw every event committed before it), the watermark real-time
    segments read. `settled` is the `incremental_settled` row, or a later full resolution; a store
    without that row (written before the split) has nothing unsettled."""
    now, top, settled, full_at, fingerprint, overrides = _read_state(engine)
    if top is None:
        return _Marks(now, None, None, "nothing resolved yet", fingerprint)
    covered, resolution_id, digest = top
    if settled is None:
        settled = covered
    elif full_at is not None and full_at > settled:
        settled = full_at
    ours = json.dumps(rules.to_dict(), sort_keys=True)
    same = _RULES_SEEN.get((digest, ours))
    if same is None:
        stored = engine.fetch_all("SELECT rules FROM identity_resolutions WHERE resolution_id = ?", [resolution_id])[0][0]
        same = json.loads(stored) == json.loads(ours)
        if len(_RULES_SEEN) > 64:
            _RULES_SEEN.clear()
        _RULES_SEEN[(digest, ours)] = same
    mine = resolution_id == STATE_ID
    if not same:
        return _Marks(now, covered, settled, "the identity rules changed", fingerprint, mine)
    # A user's removals and splits (identity_overrides) are not applied locally yet: while one is
    # in force, or one changed since the watermark, resolve in full.
    if overrides:
        return _Marks(now, covered, settled, "identity overrides are in force", fingerprint, mine)
    return _Marks(now, covered, settled, None, fingerprint, mine)


def _fingerprint(covered: datetime | None, mine: bool | None, requests: int, requests_at: datetime | None) -> tuple[Any, ...]:
    return covered, bool(mine), int(requests), requests_at


def _fingerprint_after(engine: Engine, ws: WorkingSet, covered: datetime, before: tuple[Any, ...],
                       identities: Sequence[dict[str, Any]] = (), edges: Sequence[dict[str, Any]] = ()) -> None:
    """Once the batch's transaction commits: its rows into the working set, with the fingerprint
    the tables then have (`covered`: the follower's attach watermark on top)."""
    after = _fingerprint(covered, True, before[2], before[3])
    engine.after_commit(lambda: ws.install(identities, edges, after))


_SAVE_ATTACHED = """
    INSERT INTO identity_resolutions VALUES ('incremental', 'incremental', ?, ?, ?, ?, NULL, NULL, ?, ?, ?, 1)
    ON CONFLICT (resolution_id) DO UPDATE SET rules = excluded.rules, finished_at = excluded.finished_at,
        identifiers = identity_resolutions.identifiers + excluded.identifiers,
        merges = identity_resolutions.merges + excluded.merges, unmerges = identity_resolutions.unmerges + excluded.unmerges,
        blocked = identity_resolutions.blocked + excluded.blocked, iterations = identity_resolutions.iterations + 1
"""
_SAVE_SETTLED = """
    INSERT INTO identity_resolutions VALUES ('incremental_settled', 'incremental_settled', ?, ?, ?, ?, NULL, NULL, 0, 0, 0, 1)
    ON CONFLICT (resolution_id) DO UPDATE SET rules = excluded.rules, finished_at = excluded.finished_at,
        identifiers = identity_resolutions.identifiers + excluded.identifiers, iterations = identity_resolutions.iterations + 1
"""


#: Whether any event was committed since the attach watermark (param-free: planned once).
_NEWER = """
    SELECT 1 FROM events WHERE loaded_at >= (SELECT max(CASE WHEN resolution_id = 'incremental' THEN finished_at ELSE started_at END)
                                             FROM identity_resolutions WHERE mode IN ('full', 'incremental')) LIMIT 1
"""
#: The attach path's watermark, when the `incremental` row is the top one: `now()` is the transaction's time.
_MOVE_ATTACHED = "UPDATE identity_resolutions SET finished_at = now(), iterations = iterations + 1 WHERE resolution_id = 'incremental'"


def _save_state(engine: Engine, rules: IdentityRules, report: BatchReport, *, attached: datetime | None = None,
                settled: datetime | None = None) -> None:
    """Move the watermarks. `incremental`: started_at = the first batch, finished_at = the attach
    watermark; the counts add up over batches (identifiers seen, merges, unmerges, identifiers whose
    result changed in `blocked`, batches in `iterations`). `incremental_settled`: finished_at = the
    settle watermark (events settled in `identifiers`, settles in `iterations`)."""
    text = json.dumps(rules.to_dict())
    if attached is not None:
        engine.execute(_SAVE_ATTACHED, [text, attached, attached, report.identifiers, report.merges, report.unmerges, report.changed])
    if settled is not None:
        engine.execute(_SAVE_SETTLED, [text, settled, settled, report.settled])


def preload(engine: Engine, ws: WorkingSet) -> bool:
    """Fill `ws` with the whole of `identities` and `identity_edges`, read on a reader cursor in one
    snapshot with its fingerprint (so the next batch keeps it only if nothing wrote since), when the
    tables hold at most half of what a working set may; False when they are larger (the batches
    then read what they need). Outside the writer: the collector's commits go on meanwhile."""
    cur = engine.fresh_reader()
    try:
        with engine.transaction(cursor=cur):
            fingerprint = _read_state(engine, cur)[4]
            if int(engine.fetch_all("SELECT count(*) FROM identities", cursor=cur)[0][0]) > ws.max_identifiers // 2:
                return False
            identities = engine.fetch_dicts("SELECT * FROM identities", cursor=cur)
            edges = engine.fetch_dicts("SELECT * FROM identity_edges", cursor=cur)
    finally:
        cur.close()
    ws.load(identities, edges, fingerprint)
    return True


# --- small SQL helpers ---------------------------------------------------------------------

_CATALOGS: dict[int, str] = {}


def _catalog(engine: Engine) -> str:
    name = _CATALOGS.get(id(engine))
    if name is None:
        name = _CATALOGS[id(engine)] = str(engine.fetch_all("SELECT current_database()")[0][0])
    return name


def _main(engine: Engine, table: str) -> exp.Expression:
    """`<database>.main.<table>`: the stored table, past any temporary view of the same name."""
    return exp.table_(table, db="main", catalog=_catalog(engine), quoted=True)


def _ts(value: datetime) -> exp.Expression:
    return exp.cast(sql.lit(value.isoformat()), exp.DataType.build("TIMESTAMPTZ", dialect="duckdb"))


def _keys_table(idents: Iterable[Ident]) -> pa.Table:
    ks = sorted(set(idents))
    return pa.table({"kind": pa.array([k for k, _ in ks], pa.string()), "value": pa.array([v for _, v in ks], pa.string())})


def _occurrences(engine: Engine, rules: IdentityRules, events: exp.Expression, known_user_ids: Sequence[str] = ()) -> list[dict[str, Any]]:
    """`identity.extract` over the events `events` selects (it reads a temporary view `events` that
    stands in for the table). `known_user_ids`: stored user ids an alias's previousId may name."""
    source: exp.Expression = events
    if known_user_ids:
        stand_in = sql.template(
            "SELECT __src AS source, 'k' || value AS message_id, 'identify' AS type, value AS user_id, now() AS timestamp, "
            "now() AS received_at, now() AS loaded_at FROM __ids WHERE identifier_type = 'user_id' AND list_contains(__vals, value)",
            src=sql.lit(_KNOWN), ids=_main(engine, "identities"),
            vals=exp.Array(expressions=[sql.lit(v) for v in sorted(set(known_user_ids))]),
        )
        source = exp.Union(this=events, expression=stand_in, distinct=False, by_name=True)
    view = sql.template("CREATE OR REPLACE TEMP VIEW events AS SELECT * FROM __q", q=exp.Subquery(this=source))
    engine.execute(view)
    try:
        extract(engine, rules)
    finally:
        engine.execute("DROP VIEW IF EXISTS temp.main.events")
    rows = engine.fetch_dicts("SELECT message_id, source, ts, rule, kind, value, reason FROM _idr_occ WHERE source <> ?", [_KNOWN])
    engine.execute("DROP TABLE IF EXISTS _idr_occ")
    return rows


#: The batch: the events committed since a watermark (at most the last parameter of them); `_BETWEEN`:
#: those between the settle and the attach watermark (attached, not settled).
_COLUMNS = ("SELECT source, message_id, timestamp, type, import_id, user_id, anonymous_id, previous_id, device_id, advertising_id, "
            "traits, context, loaded_at FROM events ")
_BATCH = _COLUMNS + "WHERE loaded_at >= ? LIMIT ?"
_BETWEEN = _COLUMNS + "WHERE loaded_at >= ? AND loaded_at < ? LIMIT ?"
_ALIASES = "SELECT previous_id FROM events WHERE loaded_at >= ? AND type = 'alias' AND previous_id IS NOT NULL"
_ALIASES_BETWEEN = "SELECT previous_id FROM events WHERE loaded_at >= ? AND loaded_at < ? AND type = 'alias' AND previous_id IS NOT NULL"
_PRINTABLE = re.compile(r"[ -~]*")


def _protection_is_identity(engine: Engine) -> bool:
    from refinery.privacy.pii import tokenising

    return not tokenising(engine)


#: Block reasons already decided, per rules object (the same identifiers come back batch after batch).
_BLOCK_MEMO: dict[int, tuple[IdentityRules, dict[tuple[str, str], str | None]]] = {}
_NOT_DECIDED = "\x00"


def _block_reason(kind: str, value: str, rules: IdentityRules) -> str | None:
    """`_decide_block`, remembered (a bounded memo per rules object)."""
    held = _BLOCK_MEMO.get(id(rules))
    if held is None or held[0] is not rules:
        if len(_BLOCK_MEMO) > 8:
            _BLOCK_MEMO.clear()
        held = _BLOCK_MEMO[id(rules)] = (rules, {})
    memo = held[1]
    found = memo.get((kind, value), _NOT_DECIDED)
    if found is _NOT_DECIDED:
        if len(memo) > 200_000:
            memo.clear()
        found = memo[(kind, value)] = _decide_block(kind, value, rules)
    return found


def _decide_block(kind: str, value: str, rules: IdentityRules) -> str | None:
    """`extract._block_reason`, for one value (the SQL CASE, branch by branch)."""
    if not _TYPE_NAME.fullmatch(kind):
        return "invalid_type"
    if value == "":
        return "empty"
    if len(value) > rules.max_value_length:
        return "too_long"
    if value.lower() in rules.blocked_values:
        return "blocked_value"
    for p in rules.blocked_patterns:
        if (p.types is None or kind in p.types) and re.fullmatch("(?i)" + p.pattern, value):
            return f"blocked_pattern:{p.name}"
    return None


def _python_occurrences(engine: Engine, rules: IdentityRules, rows: list[tuple[Any, ...]],
                        with_traits: set[tuple[str, str]]) -> list[dict[str, Any]] | None:
    """The batch's `_idr_occ` rows computed in Python, for batches of plain events (identifiers only in
    the built-in columns and traits, as strings; no external ids, no declared identifiers; emails and
    phones tokenised as `extract` does when the store pseudonymises): the same rows `identity.extract` gives (the property tests compare
    the two through the whole path), without its dozen SQL statements. None: use the SQL.
    `with_traits` receives the identify calls that carry traits (they change a profile's traits)."""
    if rules.declared:
        return None
    protect = not _protection_is_identity(engine)
    raw: list[tuple[str, str, datetime, str, str, str, str | None]] = []  # source, message_id, ts, rule, kind, raw, region
    for source, mid, ts, typ, import_id, user_id, anon, prev, device, adid, traits_j, context_j, *_ in rows:
        traits = json.loads(traits_j) if traits_j else None
        context = json.loads(context_j) if context_j else None
        if (traits is not None and not isinstance(traits, dict)) or (context is not None and not isinstance(context, dict)):
            return None
        traits, context = traits or {}, context or {}
        if "externalIds" in context:
            return None
        ctraits = context.get("traits") or {}
        if not isinstance(ctraits, dict):
            return None
        if typ == "identify" and traits:
            with_traits.add((source, mid))
        rule = "alias" if typ == "alias" else "import_row" if import_id is not None else "same_event"
        country = traits.get("country", ctraits.get("country"))
        if country is not None and not isinstance(country, str):
            return None
        found: list[tuple[str, Any, str | None]] = [("anonymous_id", anon, None), ("user_id", user_id, None)]
        if typ == "alias":
            found.append(("previous_id", prev, None))
        found += [("email", traits.get("email"), None), ("email", ctraits.get("email"), None),
                  ("phone", traits.get("phone"), country), ("phone", ctraits.get("phone"), country),
                  ("device_id", device, None), ("advertising_id", adid, None)]
        for kind, value, region in found:
            if value is None:
                continue
            if not isinstance(value, str):
                return None
            raw.append((source, mid, ts, rule, kind, value, region))
    # Personal types, when pseudonymising, as `extract` treats them: the clean zone holds their tokens;
    # the clear value (from the vault) is only normalised and checked, the token is the stored form.
    clear: dict[str, str] = {}
    if protect:
        wanted = {text for _, _, _, _, kind, text, _ in raw if kind in PII_TYPES and is_token(text)}
        clear = reveal(engine, wanted) if wanted else {}
    norm: list[tuple[str, str, datetime, str, str, str, str, str | None, str | None]] = []
    for source, mid, ts, rule, kind, text, region in raw:
        stored: str | None = None
        if protect and kind in PII_TYPES:
            token = text if is_token(text) else None
            if token is not None and token not in clear:
                value, pre = token, None  # its person was erased (or the vault does not know it)
            else:
                n = normalise(kind, clear.get(text, text), region, rules.phone_region)
                value, pre = n.value, n.reason
            stored = token or token_for(engine, kind, value)
        elif kind == "phone" or not _PRINTABLE.fullmatch(text):
            n = normalise(kind, text, region, rules.phone_region)
            value, pre = n.value, n.reason
        else:
            value, pre = (text.strip(" ").lower() if kind == "email" else text.strip(" ")), None
        norm.append((source, mid, ts, rule, kind, text, value, pre, stored))
    users = {r[6] for r in norm if r[4] == "user_id"}
    prev_values = sorted({r[6] for r in norm if r[4] == "previous_id"} - users)
    if prev_values:
        users |= {r[0] for r in engine.fetch_all(
            "SELECT value FROM identities WHERE identifier_type = 'user_id' AND list_contains(?, value)", [prev_values])}
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for source, mid, ts, rule, kind, _text, value, pre, stored in norm:
        if kind == "previous_id":
            kind = "user_id" if value in users else "anonymous_id"
        reason = pre or _block_reason(kind, value, rules)
        if stored is not None:
            shown = stored
        elif len(value) > rules.max_value_length:
            shown = value[:64] + "...#" + hashlib.md5(value.encode()).hexdigest()  # noqa: S324 - the SQL's md5
        else:
            shown = value
        row = {"message_id": mid, "source": source, "ts": ts, "rule": rule, "kind": kind, "value": shown, "reason": reason}
        out.setdefault((mid, source, ts, rule, kind, shown, reason), row)
    return list(out.values())


def _centres(occ: Iterable[dict[str, Any]], rules: IdentityRules) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Each event's usable identifiers, highest priority first (the first is the star's centre and
    the identifier that attributes the event)."""
    by_event: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for o in occ:
        if o["reason"] is None:
            by_event.setdefault((o["source"], o["message_id"]), []).append(o)
    for lst in by_event.values():
        lst.sort(key=lambda o: (rules.rank(o["kind"]), o["kind"], o["value"]))
        # one row per identifier (an identifier can sit in two places of one event)
        seen: set[Ident] = set()
        lst[:] = [o for o in lst if not ((o["kind"], o["value"]) in seen or seen.add((o["kind"], o["value"])))]  # type: ignore[func-returns-value]
    return by_event


def _first(a: tuple[Any, ...] | None, b: tuple[Any, ...]) -> bool:
    return a is None or b < a


# --- the batch -------------------------------------------------------------------------------

@dataclass
class _State:
    """What one batch knows: stored rows it read, merged with what the batch adds."""

    ids: dict[Ident, dict[str, Any]] = field(default_factory=dict)     # identities rows (merged)
    old: dict[Ident, dict[str, Any]] = field(default_factory=dict)     # identities rows as stored before
    edges: dict[tuple[Ident, Ident], dict[str, Any]] = field(default_factory=dict)
    new_edges: set[tuple[Ident, Ident]] = field(default_factory=set)
    touched_edges: set[tuple[Ident, Ident]] = field(default_factory=set)
    incident: dict[Ident, set[tuple[Ident, Ident]]] = field(default_factory=dict)
    fetched: set[Ident] = field(default_factory=set)
    hubs: dict[Ident, ref.Hub] = field(default_factory=dict)       # hubs among the touched identifiers, as they are now

    def add_edge_row(self, r: dict[str, Any]) -> None:
        key = ((r["a_type"], r["a_value"]), (r["b_type"], r["b_value"]))
        self.edges.setdefault(key, r)
        for end in key:
            self.incident.setdefault(end, set()).add(key)


def run_batch(engine: Engine, rules: IdentityRules, policy: TraitPolicy, *, consent_categories: Mapping[str, str] | None = None,
              max_events: int = MAX_BATCH_EVENTS, max_full_events: int | None = None,
              working_set: WorkingSet | None = None, phase: str = "both", yield_to_new: bool = False) -> BatchReport:
    """Bring the identity and profile tables up to date with the events committed since the watermark
    (call inside the writer: `writer.call(lambda e: run_batch(e, rules, policy))`).

    `phase` (docs/decisions/0023-incremental-identity-working-set.md, "Attach and settle"):
    * `attach`: when every usable identifier of the new events is known (none seen earlier than
      stored), every edge they make is known and no identify call carries traits, only their
      `event_profiles` rows are written and the attach watermark moved (what real-time segments
      read); otherwise as `both`;
    * `settle`: the statistics of the attached events (identities, edges, refusals, profile counts)
      and the settle watermark; redone from the tables after a restart;
    * `both`: everything unsettled and everything new, in one transaction (the region path).
    With `yield_to_new`, a settle does nothing (reason `deferred...`) while events committed since
    the last attach wait for theirs.

    A full resolution runs when one is needed (nothing resolved yet, the rules changed, an alias
    retyped) and when a batch holds more than `max_events` events - but never over a store of more
    than `max_full_events` events (None: no limit): the writer would stall ingest for as long as it
    takes. Then a needed one is left to `refinery identity resolve` (mode `skipped`, nothing
    written), and a large batch is resolved incrementally.

    `working_set`: the follower's, kept between batches (the graph around the batch is read from it
    and, for what it lacks, from the tables); None reads everything from the tables.
    """
    if phase not in ("attach", "settle", "both"):
        raise ValueError(f"phase must be attach, settle or both, not {phase!r}")
    clock = time.perf_counter()
    ws = working_set if working_set is not None else WorkingSet()
    m = _watermark(engine, rules)
    ws.validate(m.fingerprint)
    now, why_full = m.now, m.why_full
    total = 0

    def too_big() -> bool:
        nonlocal total
        if max_full_events is None:
            return False
        total = int(engine.fetch_all("SELECT count(*) FROM events")[0][0])
        return total > max_full_events

    def done(report: BatchReport) -> BatchReport:
        report.seconds = time.perf_counter() - clock
        return report

    report: BatchReport | None = None
    if why_full is None and m.attached is not None:
        assert m.settled is not None
        if phase == "settle":
            if m.settled >= m.attached:
                return done(BatchReport("none", phase="settle"))
            if yield_to_new and engine.execute_reused(_NEWER).fetchall():
                # Events committed since the last attach wait for theirs: attach them first (the
                # follower comes back to settle), so that a settle never delays an event's profile.
                return done(BatchReport("none", phase="settle", reason="deferred: events to attach first"))
            kept = ws.take_pending(m.settled, m.attached)
            if kept is not None:  # what the attach path extracted, since the tables are as it left them
                report = _incremental(engine, rules, policy, [], ws, m, upto=m.attached, covered=m.attached, settling=kept)
            else:  # after a restart, or when anything else wrote meanwhile: from the tables
                rows = engine.fetch_all(_BETWEEN, [m.settled, m.attached, 2**62])
                report = _incremental(engine, rules, policy, rows, ws, m, upto=m.attached, covered=m.attached)
            if report is not None:
                report.phase, report.events = "settle", 0
                _save_state(engine, rules, report, settled=m.attached)
                return done(report)
            why_full = "a new user id equals a known anonymous id (an older alias's previousId)"
        else:
            rows = engine.fetch_all(_BATCH, [m.attached if phase == "attach" else m.settled, max_events + 1])
            if not rows:
                return done(BatchReport("none", phase=phase))
            extracted: list[Any] = []
            if phase == "attach" and len(rows) <= max_events:
                attached = _attach(engine, rules, rows, ws, extracted)
                if attached is not None:
                    occ, n = extracted[0], len(rows)
                    engine.after_commit(lambda: ws.note_attached(m.settled, m.attached, now, occ, n))
                    report = BatchReport("attach", events=len(attached[0]), identifiers=attached[1], phase="attach")
                    _stage_event_profiles(engine, attached[0])
                    if m.mine:  # two planned-once statements: what a known person's event costs
                        engine.execute_reused(_MOVE_ATTACHED)
                    else:
                        _save_state(engine, rules, report, attached=now)
                    _fingerprint_after(engine, ws, now, m.fingerprint)
                    return done(report)
            ws.take_pending(None, None)  # this transaction settles them (or a full resolution does)
            if phase == "attach" and m.settled < m.attached:  # the unsettled events too
                rows = engine.fetch_all(_BATCH, [m.settled, max_events + 1])
                extracted = []
            if len(rows) > max_events and not too_big():
                why_full = f"more than {max_events} new events"
            else:
                if len(rows) > max_events:  # too many for a full resolution in the writer: all of them, locally
                    rows = engine.fetch_all(_BATCH, [m.settled, 2**62])
                report = _incremental(engine, rules, policy, rows, ws, m, upto=None, covered=now,
                                      extracted=(extracted[0], extracted[1]) if extracted else None)
                why_full = None if report is not None else "a new user id equals a known anonymous id (an older alias's previousId)"
    if report is None:
        ws.clear()
        if too_big():
            return done(BatchReport("skipped", reason=f"{why_full}; the store holds {total} events: run `refinery identity resolve`"))
        from refinery.profiles.build import resolve_and_build

        result = resolve_and_build(engine, rules, policy, consent_categories=consent_categories)
        events = int(result["profiles"]["events_attributed"]) + int(result["profiles"]["events_unattributed"])
        report = BatchReport("full", events=events, settled=events,
                             identifiers=int(result["identity"]["identifiers"]), merges=int(result["identity"]["merges"]),
                             unmerges=int(result["identity"]["unmerges"]), reason=why_full)
        _fingerprint_after(engine, ws, now, m.fingerprint)
    _save_state(engine, rules, report, attached=now, settled=now)
    return done(report)


def _attach(engine: Engine, rules: IdentityRules, rows: list[tuple[Any, ...]], ws: WorkingSet,
            extracted: list[Any]) -> tuple[list[tuple[str, str, str, str, datetime]], int] | None:
    """The fast path: each event's `event_profiles` row (source, message id, profile, identifier type,
    time) from the working set, and the number of distinct identifiers; None when the batch needs the
    region path: an identifier not stored yet (a new node, or a new refusal), one seen earlier than
    stored (the order inside its component may change), an edge not stored yet (a merge or a new
    member), an identify call with traits (its profile's traits change), or identifiers only the
    SQL extraction finds (`extracted` receives the occurrences and identify calls with traits).
    Nothing else can change a result (identity/incremental.py's docstring), so
    each event goes to the profile its centre identifier has, as the region path would send it."""
    with_traits: set[tuple[str, str]] = set()
    occ = _python_occurrences(engine, rules, rows, with_traits)
    extracted[:] = [occ, with_traits]  # for the region path, if it comes to that
    if occ is None or with_traits:
        return None
    earliest: dict[Ident, datetime] = {}
    for o in occ:
        i = (o["kind"], o["value"])
        t = earliest.get(i)
        if t is None or o["ts"] < t:
            earliest[i] = o["ts"]
    stored = ws.peek(engine, earliest)
    for i, t in earliest.items():
        old = stored.get(i)
        if old is None or (t < old["first_seen"] and old["status"] != "blocked"):
            return None
    by_event = _centres(occ, rules)
    keys = {((lst[0]["kind"], lst[0]["value"]), (o["kind"], o["value"])) for lst in by_event.values() for o in lst[1:]}
    if keys and not ws.has_edges(engine, keys):
        return None
    out = []
    for (source, mid), lst in by_event.items():
        c = lst[0]
        p = stored[(c["kind"], c["value"])]["profile_id"]
        if p is not None:
            out.append((source, mid, p, c["kind"], c["ts"]))
    return out, len(earliest)


_INSERT_EVENT_PROFILES = """
    INSERT INTO event_profiles SELECT unnest(CAST(? AS VARCHAR[])), unnest(CAST(? AS VARCHAR[])), unnest(CAST(? AS VARCHAR[])),
           unnest(CAST(? AS VARCHAR[])), unnest(CAST(? AS TIMESTAMPTZ[]))
"""


_EP_STAGED = "INSERT INTO event_profiles SELECT source, message_id, profile_id, identifier_type, timestamp FROM _inc_attached"
_EP_SCHEMA = pa.schema([("source", pa.string()), ("message_id", pa.string()), ("profile_id", pa.string()),
                        ("identifier_type", pa.string()), ("timestamp", _TS)])


def _stage_event_profiles(engine: Engine, rows: Sequence[tuple[str, str, str, str, datetime]]) -> None:
    """The attach path's rows, through a statement planned once (`Engine.stage` + `execute_reused`)."""
    if not rows:
        return
    table = pa.Table.from_arrays([pa.array(list(col), f.type) for col, f in zip(zip(*rows, strict=True), _EP_SCHEMA, strict=True)],
                                 schema=_EP_SCHEMA)
    engine.stage("_inc_attached", table)
    try:
        engine.execute_reused(_EP_STAGED)
    finally:
        engine.stage("_inc_attached", table.slice(0, 0))


def _insert_event_profiles(engine: Engine, rows: Sequence[tuple[str, str, str, str, datetime]]) -> None:
    if rows:
        engine.execute(_INSERT_EVENT_PROFILES, [list(col) for col in zip(*rows, strict=True)])


def _tally(table: dict[Any, dict[str, Any]], key: Any, o: dict[str, Any], label: str) -> None:
    """Fold one occurrence `o` into `table[key]`: first and last time, count, and `label` (the rule or
    block reason) of the earliest occurrence by (time, source, message id)."""
    first = (o["ts"], o["source"], o["message_id"])
    t = table.get(key)
    if t is None:
        table[key] = {"first_seen": o["ts"], "last_seen": o["ts"], "n": 1, "first": first, label: o[label]}
        return
    t["first_seen"], t["last_seen"], t["n"] = min(t["first_seen"], o["ts"]), max(t["last_seen"], o["ts"]), t["n"] + 1
    if first < t["first"]:
        t["first"], t[label] = first, o[label]


def _incremental(engine: Engine, rules: IdentityRules, policy: TraitPolicy, rows: list[tuple[Any, ...]], ws: WorkingSet,
                 m: _Marks, *, upto: datetime | None, covered: datetime,
                 extracted: tuple[list[dict[str, Any]] | None, set[tuple[str, str]]] | None = None,
                 settling: tuple[list[dict[str, Any]], int] | None = None) -> BatchReport | None:
    """The local path over the batch's events `rows` (`_BATCH`: loaded since the settle watermark, and
    before `upto`); None when the batch needs a full resolution. Events loaded before the attach
    watermark have their `event_profiles` rows already (a region the batch changes moves them like
    any older event); the statistics of all of them are folded in. `covered`: the attach watermark
    once this commits. `extracted`: `_python_occurrences` of `rows` already computed (occurrences or
    None, identify calls with traits); `settling`: instead of `rows`, the occurrences of attached
    events the attach path kept, and their number."""
    assert m.settled is not None and m.attached is not None
    now, watermark = m.now, m.settled
    bounds: list[Any] = [watermark] if upto is None else [watermark, upto]
    if upto is None:
        batch = sql.template("SELECT * FROM __events WHERE loaded_at >= __w", events=_main(engine, "events"), w=_ts(watermark))
    else:
        batch = sql.template("SELECT * FROM __events WHERE loaded_at >= __w AND loaded_at < __u", events=_main(engine, "events"),
                             w=_ts(watermark), u=_ts(upto))
    attached: set[tuple[str, str]] | None  # None: all of them
    with_traits: set[tuple[str, str]] = set()
    occ: list[dict[str, Any]] | None
    if settling is not None:
        occ, attached = settling[0], None
        report = BatchReport("settle", settled=settling[1])
    else:
        attached = {(r[0], r[1]) for r in rows if r[12] < m.attached}
        if extracted is not None:
            occ, with_traits = extracted
        else:
            occ = _python_occurrences(engine, rules, rows, with_traits)
        report = BatchReport("attach" if len(attached) < len(rows) else "settle", events=len(rows) - len(attached), settled=len(rows))
    exact_traits = occ is not None  # else every profile of the batch is rebuilt in full
    if occ is None:
        aliases = engine.fetch_all(_ALIASES if upto is None else _ALIASES_BETWEEN, bounds)
        known = [normalise("user_id", r[0]).value for r in aliases]
        occ = _occurrences(engine, rules, batch, known)
    st = _State()

    # Identifier statistics of the batch.
    add: dict[Ident, dict[str, Any]] = {}
    for o in occ:
        _tally(add, (o["kind"], o["value"]), o, "reason")
    report.identifiers = len(add)
    new_users = [v for (kind, v) in add if kind == "user_id"]
    stored = ws.identities(engine, [*add, *(("anonymous_id", v) for v in new_users)])
    for v in new_users:
        if ("user_id", v) not in stored and ("anonymous_id", v) in stored:
            return None
    touched: set[Ident] = set()
    for i, s in add.items():
        old = stored.get(i)
        if old is None:
            row = {"identifier_type": i[0], "value": i[1], "profile_id": None, "status": "blocked" if s["reason"] else None,
                   "reason": s["reason"], "first_seen": s["first_seen"], "last_seen": s["last_seen"], "event_count": s["n"],
                   "first_message_id": s["first"][2], "first_source": s["first"][1]}
            if s["reason"] is None:
                touched.add(i)
        else:
            row = dict(old)
            if s["first"] < (old["first_seen"], old["first_source"], old["first_message_id"]):
                row["first_message_id"], row["first_source"] = s["first"][2], s["first"][1]
            if s["first_seen"] < old["first_seen"]:
                row["first_seen"] = s["first_seen"]
                if old["status"] != "blocked":
                    touched.add(i)
            row["last_seen"] = max(old["last_seen"], s["last_seen"])
            row["event_count"] = old["event_count"] + s["n"]
        st.ids[i] = row
    st.old = {i: r for i, r in stored.items()}

    # Edges of the batch: each event's star around its centre.
    by_event = _centres(occ, rules)
    eadd: dict[tuple[Ident, Ident], dict[str, Any]] = {}
    for lst in by_event.values():
        c = lst[0]
        a = (c["kind"], c["value"])
        for o in lst[1:]:
            _tally(eadd, (a, (o["kind"], o["value"])), o, "rule")
    ends = {end for key in eadd for end in key}
    for r in ws.edges_of(engine, touched | ends):
        st.add_edge_row(r)
    st.fetched |= touched | ends
    for key, e in eadd.items():
        old_e = st.edges.get(key)
        if old_e is None:
            row = {"a_type": key[0][0], "a_value": key[0][1], "b_type": key[1][0], "b_value": key[1][1], "rule": e["rule"],
                   "message_id": e["first"][2], "source": e["first"][1], "event_time": e["first_seen"], "last_seen": e["last_seen"],
                   "event_count": e["n"], "status": None, "reason": None}
            st.new_edges.add(key)
            touched.update(key)
            st.add_edge_row(row)
        else:
            row = old_e
            if e["first"] < (old_e["event_time"], old_e["source"], old_e["message_id"]):
                row["rule"], row["message_id"], row["source"] = e["rule"], e["first"][2], e["first"][1]
            row["event_time"] = min(old_e["event_time"], e["first_seen"])
            row["last_seen"] = max(old_e["last_seen"], e["last_seen"])
            row["event_count"] = old_e["event_count"] + e["n"]
        st.touched_edges.add(key)
    report.touched = len(touched)

    res: ref.Resolution | None = None
    region: set[Ident] = set()
    if touched:
        report.mode = "region"
        region = _region(engine, ws, st, touched, rules)
        res = _resolve_region(st, region, touched, rules)
        report.region = len(region)

    def pid(i: Ident) -> str | None:
        if res is not None and i in region:
            return res.profile_id(i)
        return st.ids[i]["profile_id"] if i in st.ids else st.old[i]["profile_id"]

    # identities: statistics of the batch's identifiers, results of the region.
    for i in region:
        assert res is not None
        row = st.ids.get(i) or dict(st.old[i])
        new = (res.profile_id(i), res.status[i], res.reason[i])
        if st.old.get(i) is None or (st.old[i]["profile_id"], st.old[i]["status"], st.old[i]["reason"]) != new:
            report.changed += 1
        row["profile_id"], row["status"], row["reason"] = new
        st.ids[i] = row
    _write_identities(engine, list(st.ids.values()))

    # identity_edges: the batch's edges, and every edge at the region's border or inside it.
    edge_keys = set(st.touched_edges)
    for i in region:
        edge_keys |= st.incident.get(i, set())
    missing = {end for key in edge_keys for end in key if end not in st.ids and end not in st.old}
    st.old.update(ws.identities(engine, missing))
    for key in edge_keys:
        a, b = key
        info_a, info_b = st.ids.get(a) or st.old[a], st.ids.get(b) or st.old[b]
        row = st.edges[key]
        row["status"], row["reason"] = ref.edge_status(a, b, pid(a), pid(b), info_a["reason"], info_b["reason"])
    written_edges = [st.edges[k] for k in edge_keys]
    _write_edges(engine, written_edges)
    _fingerprint_after(engine, ws, covered, m.fingerprint, list(st.ids.values()), written_edges)

    _write_refusals(engine, st, res, region, add, rules)
    if res is not None:
        report.merges, report.unmerges = _write_merges(engine, st, res, region, now)

    # event_profiles: the batch's events, and older events of profiles the region changed.
    affected: set[str] = set()
    in_place: dict[str, bool] = {}  # profile -> whether its row exists: only its identifiers changed
    if res is not None:
        involved, moves = _reattribute(engine, rules, st, res, region)
        into: dict[str, set[str]] = {}
        for q, targets in moves.items():
            for t in targets:
                into.setdefault(t, set()).add(q)
        for t in involved:
            # Neither merged with another profile nor split: its events and traits stay as they were.
            if exact_traits and into.get(t, {t}) == {t} and moves.get(t, {t}) == {t}:
                in_place[t] = t in moves
            else:
                affected.add(t)
    new_rows = []
    counted: dict[str, list[Any]] = {}  # profile -> [events, first, last, sources] of the batch
    for (source, mid), lst in by_event.items():
        c = lst[0]
        p = pid((c["kind"], c["value"]))
        if p is not None:
            if attached is not None and (source, mid) not in attached:
                new_rows.append((source, mid, p, c["kind"], c["ts"]))
            if not exact_traits or (source, mid) in with_traits:
                affected.add(p)
            else:
                d = counted.setdefault(p, [0, c["ts"], c["ts"], set()])
                d[0], d[1], d[2] = d[0] + 1, min(d[1], c["ts"]), max(d[2], c["ts"])
                d[3].add(source)
    _insert_event_profiles(engine, new_rows)
    _rebuild_profiles(engine, policy, affected, now)
    assert res is not None or not in_place
    if res is not None:
        _write_identifier_lists(engine, st, res, region, {p: e for p, e in in_place.items() if p not in affected}, counted, now)
    _count_events(engine, {p: d for p, d in counted.items() if p not in affected and in_place.get(p, True)}, now)
    return report


_UPDATE_IDENTIFIERS = """
    UPDATE profiles SET identifiers = to_json(map(n.types, list_transform(n.vals, lambda x: to_json(x)))), updated_at = ?
    FROM (SELECT unnest(CAST(? AS VARCHAR[])) AS profile_id, unnest(CAST(? AS VARCHAR[][])) AS types,
                 unnest(CAST(? AS VARCHAR[][][])) AS vals) n
    WHERE profiles.profile_id = n.profile_id
"""
_INSERT_PROFILES = """
    INSERT INTO profiles
    SELECT profile_id, to_json(map(types, list_transform(vals, lambda x: to_json(x)))), '{}', '{}', first_seen, last_seen, n,
           to_json(sources), ?
    FROM (SELECT unnest(CAST(? AS VARCHAR[])) AS profile_id, unnest(CAST(? AS VARCHAR[][])) AS types,
                 unnest(CAST(? AS VARCHAR[][][])) AS vals, unnest(CAST(? AS TIMESTAMPTZ[])) AS first_seen,
                 unnest(CAST(? AS TIMESTAMPTZ[])) AS last_seen, unnest(CAST(? AS BIGINT[])) AS n,
                 unnest(CAST(? AS VARCHAR[][])) AS sources)
"""


def _write_identifier_lists(engine: Engine, st: _State, res: ref.Resolution, region: set[Ident], profiles: dict[str, bool],
                            counted: dict[str, list[Any]], now: datetime) -> None:
    """`profiles.identifiers` of region profiles that were neither merged nor split (`profiles`:
    profile -> whether its row exists), as `write_profiles` builds it: per type, sorted, the values
    oldest first. A whole profile lies in the region (R is closed), so its identifiers are all here.
    New profiles get their row, with the batch's events (`counted`) and no traits."""
    if not profiles:
        return
    members: dict[str, dict[str, list[tuple[Any, str]]]] = {p: {} for p in profiles}
    for i in region:
        p = res.profile_id(i)
        if p in members:
            members[p].setdefault(i[0], []).append((_info(st, i)["first_seen"], i[1]))

    def lists(p: str) -> tuple[list[str], list[list[str]]]:
        types = sorted(members[p])
        return types, [[v for _, v in sorted(members[p][t])] for t in types]

    old = sorted(p for p, exists in profiles.items() if exists)
    if old:
        ls = [lists(p) for p in old]
        engine.execute(_UPDATE_IDENTIFIERS, [now, old, [t for t, _ in ls], [v for _, v in ls]])
    new = sorted(p for p, exists in profiles.items() if not exists)
    if new:
        ls = [lists(p) for p in new]
        c = [counted.get(p) for p in new]
        engine.execute(_INSERT_PROFILES, [now, new, [t for t, _ in ls], [v for _, v in ls], [d[1] if d else None for d in c],
                                          [d[2] if d else None for d in c], [d[0] if d else 0 for d in c],
                                          [sorted(d[3]) if d else [] for d in c]])


def _count_events(engine: Engine, counted: dict[str, list[Any]], now: datetime) -> None:
    """Profiles that only gained events without traits (their identifiers and traits unchanged):
    counts, first/last seen and sources updated in place, as `write_profiles` would compute them."""
    if not counted:
        return
    ps = sorted(counted)
    engine.register("_inc_counts", pa.table({
        "profile_id": pa.array(ps, pa.string()), "n": pa.array([counted[p][0] for p in ps], pa.int64()),
        "first": pa.array([counted[p][1] for p in ps], _TS), "last": pa.array([counted[p][2] for p in ps], _TS),
        "sources": pa.array([sorted(counted[p][3]) for p in ps], pa.list_(pa.string()))}))
    try:
        engine.execute("""
            UPDATE profiles SET event_count = profiles.event_count + c.n,
                   first_seen = CASE WHEN profiles.first_seen IS NULL OR c.first < profiles.first_seen THEN c.first ELSE profiles.first_seen END,
                   last_seen = CASE WHEN profiles.last_seen IS NULL OR c.last > profiles.last_seen THEN c.last ELSE profiles.last_seen END,
                   sources = to_json(list_sort(list_distinct(list_concat(CAST(profiles.sources AS VARCHAR[]), c.sources)))),
                   updated_at = ?
            FROM _inc_counts c WHERE profiles.profile_id = c.profile_id
        """, [now])
    finally:
        engine.unregister("_inc_counts")


def _region(engine: Engine, ws: WorkingSet, st: _State, touched: set[Ident], rules: IdentityRules) -> set[Ident]:
    """R: everything reachable from `touched` over edges usable before or usable now."""
    exclusive = set(rules.exclusive_types)
    adjacency = {n: {b if a == n else a for a, b in st.incident.get(n, set())} for n in touched}
    new_hubs = ref.find_hubs(touched, adjacency, rules)
    st.hubs = new_hubs

    def old_hub(n: Ident) -> bool:
        o = st.old.get(n)
        return o is not None and o["status"] == "shared"

    def hub_now(n: Ident) -> bool:
        return n in new_hubs if n in touched else old_hub(n)

    def usable(key: tuple[Ident, Ident]) -> bool:
        a, b = key
        if a[0] == b[0] and a[0] in exclusive:
            return False
        if key in st.new_edges:
            return not hub_now(a) and not hub_now(b)
        return not old_hub(a) and not old_hub(b)

    region = set(touched)
    frontier = set(touched)
    while frontier:
        need = frontier - st.fetched
        if need:
            for r in ws.edges_of(engine, need):
                st.add_edge_row(r)
            st.fetched |= need
        others = {e for n in frontier for key in st.incident.get(n, set()) for e in key if e not in st.old and e not in st.ids}
        st.old.update(ws.identities(engine, others))
        nxt: set[Ident] = set()
        for n in frontier:
            for key in st.incident.get(n, set()):
                other = key[1] if key[0] == n else key[0]
                if other not in region and usable(key):
                    region.add(other)
                    nxt.add(other)
        frontier = nxt
    # Every identifier of the region needs its stored row (statistics, previous result).
    st.old.update(ws.identities(engine, {n for n in region if n not in st.old and n not in st.ids}))
    return region


def _resolve_region(st: _State, region: set[Ident], touched: set[Ident], rules: IdentityRules) -> ref.Resolution:
    first_seen = {n: (st.ids.get(n) or st.old[n])["first_seen"] for n in region}
    edges = [key for key in st.edges if key[0] in region and key[1] in region]
    hubs = {n: h for n, h in st.hubs.items() if n in region}
    return ref.resolve(first_seen, edges, rules, hubs=hubs)


# --- writes ----------------------------------------------------------------------------------

_IDENTITY_COLUMNS = ("identifier_type", "value", "profile_id", "status", "reason", "first_seen", "last_seen", "event_count",
                     "first_message_id", "first_source")
_EDGE_COLUMNS = ("a_type", "a_value", "b_type", "b_value", "rule", "message_id", "source", "event_time", "last_seen", "event_count",
                 "status", "reason")
_TS_COLUMNS = {"first_seen", "last_seen", "event_time"}


def _arrow(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> pa.Table:
    data = {}
    for c in columns:
        t = _TS if c in _TS_COLUMNS else pa.int64() if c == "event_count" else pa.string()
        data[c] = pa.array([r[c] for r in rows], t)
    return pa.table(data)


def _write_identities(engine: Engine, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    engine.register("_inc_ids", _arrow(rows, _IDENTITY_COLUMNS))
    try:
        engine.execute("DELETE FROM identities WHERE EXISTS (SELECT 1 FROM _inc_ids n WHERE n.identifier_type = identities.identifier_type "
                       "AND n.value = identities.value)")
        engine.execute("INSERT INTO identities SELECT * FROM _inc_ids")
    finally:
        engine.unregister("_inc_ids")


def _write_edges(engine: Engine, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    engine.register("_inc_edges", _arrow(rows, _EDGE_COLUMNS))
    try:
        engine.execute("""
            DELETE FROM identity_edges WHERE EXISTS (SELECT 1 FROM _inc_edges n WHERE n.a_type = identity_edges.a_type
                AND n.a_value = identity_edges.a_value AND n.b_type = identity_edges.b_type AND n.b_value = identity_edges.b_value)
        """)
        engine.execute("INSERT INTO identity_edges SELECT * FROM _inc_edges")
    finally:
        engine.unregister("_inc_edges")


def _info(st: _State, i: Ident) -> dict[str, Any]:
    return st.ids.get(i) or st.old[i]


def _write_refusals(engine: Engine, st: _State, res: ref.Resolution | None, region: set[Ident], add: dict[Ident, dict[str, Any]],
                    rules: IdentityRules) -> None:
    """identity_blocked rows for the batch's blocked identifiers, the region's refusals, and the
    conflicting edges the batch saw again (their event counts)."""
    exclusive = set(rules.exclusive_types)
    junk = [i for i in add if _info(st, i)["status"] == "blocked"]
    # A refusal about one identifier carries its first event: keep it current for the batch's others.
    # (Only identifiers that are shared, ambiguous or detached have such a row: a linked one has none.)
    seen_again = [_info(st, i) for i in add if i not in region and _info(st, i)["status"] not in ("blocked", "linked")]
    if seen_again:
        engine.register("_inc_ids", _arrow(seen_again, _IDENTITY_COLUMNS))
        try:
            engine.execute("""
                UPDATE identity_blocked SET message_id = n.first_message_id, source = n.first_source, event_time = n.first_seen
                FROM _inc_ids n WHERE identity_blocked.other_type IS NULL AND n.identifier_type = identity_blocked.identifier_type
                  AND n.value = identity_blocked.value
            """)
        finally:
            engine.unregister("_inc_ids")
    conflict_keys = {k for k in st.touched_edges if k[0][0] == k[1][0] and k[0][0] in exclusive}
    for i in region:
        conflict_keys |= {k for k in st.incident.get(i, set()) if k[0][0] == k[1][0] and k[0][0] in exclusive}
    if not junk and not conflict_keys and not region:
        return

    def pid(i: Ident) -> str | None:
        if res is not None and i in region:
            return res.profile_id(i)
        found: str | None = _info(st, i)["profile_id"]
        return found

    def older(a: Ident, b: Ident) -> tuple[Ident, Ident]:
        ka = ref.order_key(a, _info(st, a)["first_seen"], rules)
        kb = ref.order_key(b, _info(st, b)["first_seen"], rules)
        return (a, b) if ka < kb else (b, a)

    out: list[dict[str, Any]] = []

    def row(kind: str, reason: str, i: Ident, other: Ident | None, pa_: str | None, pb_: str | None, evidence: dict[str, Any],
            message_id: str | None = None, source: str | None = None, at: datetime | None = None) -> None:
        info = _info(st, i)
        out.append({"kind": kind, "reason": reason, "identifier_type": i[0], "value": i[1],
                    "other_type": other[0] if other else None, "other_value": other[1] if other else None,
                    "profile_a": pa_, "profile_b": pb_, "message_id": message_id or info["first_message_id"],
                    "source": source or info["first_source"], "event_time": at or info["first_seen"],
                    "evidence": json.dumps(evidence, separators=(",", ":"), ensure_ascii=False)})

    for i in junk:
        row("identifier", _info(st, i)["reason"], i, None, None, None, {"events": _info(st, i)["event_count"]})
    if res is not None:
        for h, hub in res.hubs.items():
            row("identifier", "shared_identifier", h, None, pid(h), None, {"linked_type": hub.kind_of_many, "linked_values": hub.linked})
        for n, reason, cands in res.ambiguous:
            row("merge", reason, n, None, pid(cands[0]) if cands else None, pid(cands[1]) if len(cands) > 1 else None,
                {"candidates": [{"type": c[0], "value": c[1], "profile_id": pid(c)} for c in cands]})
        for n, reason, g in res.detached:
            row("identifier", reason, n, None, pid(n), None, {"would_join": ref.profile_id(g)})
    for key in conflict_keys:
        a, b = older(*key)
        e = st.edges[key]
        row("merge", f"conflicting_{a[0]}", a, b, pid(a), pid(b), {"rule": e["rule"], "events": e["event_count"]},
            e["message_id"], e["source"], e["event_time"])

    keys = _keys_table([*junk, *region])
    conflicts = sorted(conflict_keys)
    engine.register("_inc_keys", keys)
    engine.register("_inc_conf", pa.table({
        "a_type": pa.array([k[0][0] for k in conflicts], pa.string()), "a_value": pa.array([k[0][1] for k in conflicts], pa.string()),
        "b_type": pa.array([k[1][0] for k in conflicts], pa.string()), "b_value": pa.array([k[1][1] for k in conflicts], pa.string())}))
    engine.register("_inc_blocked", pa.table({
        c: pa.array([r[c] for r in out], _TS if c == "event_time" else pa.string())
        for c in ("kind", "reason", "identifier_type", "value", "other_type", "other_value", "profile_a", "profile_b", "message_id",
                  "source", "event_time", "evidence")}))
    try:
        # Rows about one identifier (junk, hub, ambiguous, detached) of the batch or the region.
        engine.execute("""
            DELETE FROM identity_blocked WHERE other_type IS NULL
              AND EXISTS (SELECT 1 FROM _inc_keys k WHERE k.kind = identity_blocked.identifier_type AND k.value = identity_blocked.value)
        """)
        # Conflicting edges, stored older end first.
        engine.execute("""
            DELETE FROM identity_blocked WHERE other_type IS NOT NULL AND EXISTS (SELECT 1 FROM _inc_conf c
              WHERE (c.a_type = identity_blocked.identifier_type AND c.a_value = identity_blocked.value
                     AND c.b_type = identity_blocked.other_type AND c.b_value = identity_blocked.other_value)
                 OR (c.b_type = identity_blocked.identifier_type AND c.b_value = identity_blocked.value
                     AND c.a_type = identity_blocked.other_type AND c.a_value = identity_blocked.other_value))
        """)
        engine.execute("""
            INSERT INTO identity_blocked SELECT kind, reason, identifier_type, value, other_type, other_value, profile_a, profile_b,
                   message_id, source, event_time, CAST(evidence AS JSON) FROM _inc_blocked
        """)
    finally:
        for t in ("_inc_keys", "_inc_conf", "_inc_blocked"):
            engine.unregister(t)


def _write_merges(engine: Engine, st: _State, res: ref.Resolution, region: set[Ident], now: datetime) -> tuple[int, int]:
    """profile_merges as a full resolution run now would write them: a previous profile id that no
    longer exists, merged into the one its identifiers joined; merged ids that exist again, undone."""
    new_pids = {res.profile_id(i) for i in region}
    prev = {i: st.old[i]["profile_id"] for i in region if st.old.get(i) is not None and st.old[i]["profile_id"] is not None}
    cands = sorted({(res.profile_id(i), p) for i, p in prev.items() if p != res.profile_id(i) and p not in new_pids})
    rid = "inc_" + uuid.uuid4().hex[:16]
    rows = []
    for survivor, merged in cands:
        best: tuple[Any, ...] | None = None
        for key in st.edges:
            a, b = key
            if a not in region or b not in region or res.profile_id(a) != survivor or res.profile_id(b) != survivor:
                continue
            if (prev.get(a) == merged) == (prev.get(b) == merged):
                continue
            e = st.edges[key]
            k = (e["event_time"], e["message_id"], a[1], b[1])
            if best is None or k < best[0]:
                best = (k, e)
        ev = best[1] if best else None
        rows.append({"survivor": survivor, "merged": merged, "has": ev is not None,
                     "a_type": ev["a_type"] if ev else None, "a_value": ev["a_value"] if ev else None,
                     "b_type": ev["b_type"] if ev else None, "b_value": ev["b_value"] if ev else None,
                     "message_id": ev["message_id"] if ev else None, "source": ev["source"] if ev else None,
                     "event_time": ev["event_time"] if ev else None, "rule": ev["rule"] if ev else None})
    if rows:
        engine.register("_inc_merges", pa.table({
            c: pa.array([r[c] for r in rows], _TS if c == "event_time" else pa.bool_() if c == "has" else pa.string())
            for c in rows[0]}))
        try:
            sql.run(engine, """
                INSERT INTO profile_merges
                SELECT 'mrg_' || left(md5(survivor || '>' || merged || '@' || __rid), 20), survivor, merged,
                       CASE WHEN has THEN json_object('a_type', a_type, 'a_value', a_value, 'b_type', b_type, 'b_value', b_value,
                                                      'message_id', message_id, 'source', source, 'time', event_time, 'rule', rule)
                            ELSE json_object('note', 'no single edge: the profiles were joined through identifiers new to this run') END,
                       __now, __rid, NULL, NULL
                FROM _inc_merges
            """, rid=sql.lit(rid), now=_ts(now))
        finally:
            engine.unregister("_inc_merges")
    unmerges = 0
    if new_pids:
        ids = sorted(new_pids)
        unmerges = int(engine.fetch_all(
            "SELECT count(*) FROM profile_merges WHERE undone_at IS NULL AND list_contains(?, merged_profile_id)", [ids])[0][0])
        if unmerges:
            engine.execute("UPDATE profile_merges SET undone_at = ?, undone_reason = 'split: the merged profile exists again' "
                           "WHERE undone_at IS NULL AND list_contains(?, merged_profile_id)", [now, ids])
    return len(rows), unmerges


def _reattribute(engine: Engine, rules: IdentityRules, st: _State, res: ref.Resolution,
                 region: set[Ident]) -> tuple[set[str], dict[str, set[str]]]:
    """Move the stored events of profiles the region changed; returns every profile id involved,
    and for each previous profile of the region, the profiles its identifiers are in now."""
    moves: dict[str, set[str]] = {}
    for i in region:
        old = st.old.get(i)
        if old is not None and old["profile_id"] is not None:
            moves.setdefault(old["profile_id"], set()).add(res.profile_id(i))
    involved = set(moves) | {res.profile_id(i) for i in region}
    whole = {p: next(iter(q)) for p, q in moves.items() if len(q) == 1 and p not in q}
    split = sorted(p for p, q in moves.items() if len(q) > 1)
    if whole:
        engine.register("_inc_pmap", pa.table({"old": pa.array(list(whole), pa.string()), "new": pa.array(list(whole.values()), pa.string())}))
        try:
            engine.execute("UPDATE event_profiles SET profile_id = m.new FROM _inc_pmap m WHERE event_profiles.profile_id = m.old")
        finally:
            engine.unregister("_inc_pmap")
    if split:
        # Events of a profile that split: each goes where its centre identifier went.
        events = sql.template(
            "SELECT e.* FROM __events e WHERE EXISTS (SELECT 1 FROM __ep a WHERE a.source = e.source AND a.message_id = e.message_id "
            "AND list_contains(__pids, a.profile_id))",
            events=_main(engine, "events"), ep=_main(engine, "event_profiles"),
            pids=exp.Array(expressions=[sql.lit(p) for p in split]))
        occ = _occurrences(engine, rules, events)
        rows = [(s, m, res.profile_id((lst[0]["kind"], lst[0]["value"]))) for (s, m), lst in _centres(occ, rules).items()]
        if rows:
            engine.register("_inc_emap", pa.table({"source": pa.array([r[0] for r in rows], pa.string()),
                                                   "message_id": pa.array([r[1] for r in rows], pa.string()),
                                                   "profile_id": pa.array([r[2] for r in rows], pa.string())}))
            try:
                engine.execute("UPDATE event_profiles SET profile_id = m.profile_id FROM _inc_emap m "
                               "WHERE event_profiles.source = m.source AND event_profiles.message_id = m.message_id")
            finally:
                engine.unregister("_inc_emap")
    return involved, moves


def _rebuild_profiles(engine: Engine, policy: TraitPolicy, affected: set[str], now: datetime) -> None:
    """`profiles` rows of `affected`, by `profiles.build`'s own SQL run over those profiles only
    (temporary views stand in for event_profiles and identities, a temporary table for profiles)."""
    if not affected:
        return
    from refinery.profiles.build import merge_traits, write_profiles

    pids = exp.Array(expressions=[sql.lit(p) for p in sorted(affected)])
    sql.run(engine, "CREATE OR REPLACE TEMP VIEW event_profiles AS SELECT * FROM __t WHERE list_contains(__p, profile_id)",
            t=_main(engine, "event_profiles"), p=pids)
    sql.run(engine, "CREATE OR REPLACE TEMP VIEW identities AS SELECT * FROM __t WHERE list_contains(__p, profile_id)",
            t=_main(engine, "identities"), p=pids)
    sql.run(engine, "CREATE OR REPLACE TEMP TABLE profiles AS SELECT * FROM __t LIMIT 0", t=_main(engine, "profiles"))
    try:
        merge_traits(engine, policy)
        write_profiles(engine, now)
        target = _main(engine, "profiles")
        sql.run(engine, "DELETE FROM __t WHERE list_contains(__p, profile_id)", t=target, p=pids)
        sql.run(engine, "INSERT INTO __t SELECT * FROM temp.main.profiles", t=target)
    finally:
        engine.execute("DROP VIEW IF EXISTS temp.main.event_profiles")
        engine.execute("DROP VIEW IF EXISTS temp.main.identities")
        engine.execute("DROP TABLE IF EXISTS temp.main.profiles")
        engine.execute("DROP TABLE IF EXISTS _prf_traits")


# --- the follower ----------------------------------------------------------------------------

#: The follower's lineage: one OpenLineage run per this many seconds of batches (a batch every few
#: milliseconds would write two events each); see docs/lineage.md.
LINEAGE_WINDOW_SECONDS = 60.0


def _lineage_counts(report: BatchReport) -> tuple[dict[str, int], dict[str, int]]:
    """A batch's rows per output table (as far as the report knows them) and its numbers for the run."""
    counts = {"event_profiles": report.events, "identities": report.identifiers if report.mode == "full" else report.changed,
              "profile_merges": report.merges + report.unmerges, "identity_resolutions": 1}
    totals = {"events": report.events, "identifiers": report.identifiers, "changed": report.changed, "merges": report.merges,
              "unmerges": report.unmerges, "full_resolutions": int(report.mode == "full"), "settled": report.settled}
    return counts, totals


#: While the collector has work queued, the follower waits this many times as long as its last batch
#: took before the next one: it holds the writer at most 1/(1+YIELD_FACTOR) of the time under load
#: (batches grow meanwhile, and cost less per event); an idle writer is followed at once.
YIELD_FACTOR = 4.0
#: Settle once this long after the first unsettled attach, when the writer has nothing queued...
SETTLE_AFTER_SECONDS = 0.02
#: ...and at the latest this long after it, queued work or not (how far `profiles` may lag behind).
SETTLE_WITHIN_SECONDS = 0.5


class Follower:
    """Runs `run_batch` in the writer whenever the writer has committed something else since the
    last batch, so profiles follow events within a few milliseconds of their commit.

    Each batch first runs the attach phase alone (`event_profiles` and the attach watermark, in a
    few milliseconds; the region path when the batch needs it). The statistics of attached events
    are settled later, in a transaction of their own that covers every batch attached meanwhile:
    `settle_after` seconds after the first unsettled attach when the writer has nothing queued
    (the collector's group commits go first), at the latest `settle_within` seconds after it.
    While the writer is busy (two or more jobs queued, or three or more other commits since the last
    batch), the follower waits `yield_factor` times as long as its last batch took before it runs again (so it never holds a busy writer more than 1/(1+yield_factor) of
    the time; profiles then lag further behind, in larger and cheaper batches).

    With `lineage` settings, the batches that changed something are reported as one OpenLineage run
    (`identity.incremental`) per `lineage_seconds`, emitted from this thread, never from the writer;
    a run ends only once its batches are settled (the settle is part of it)."""

    def __init__(self, writer: Writer, rules: IdentityRules, policy: TraitPolicy, *, poll_seconds: float = 0.001,
                 max_full_events: int | None = FOLLOWER_MAX_FULL_EVENTS, consent_categories: Mapping[str, str] | None = None,
                 lineage: Settings | None = None, lineage_seconds: float = LINEAGE_WINDOW_SECONDS,
                 settle_after: float = SETTLE_AFTER_SECONDS, settle_within: float = SETTLE_WITHIN_SECONDS,
                 yield_factor: float = YIELD_FACTOR):
        self.writer, self.rules, self.policy, self.poll = writer, rules, policy, poll_seconds
        self.consent_categories = consent_categories
        self.max_full_events = max_full_events
        self.settle_after, self.settle_within, self.yield_factor = settle_after, settle_within, yield_factor
        self._resume_at = 0.0  # monotonic time before which the follower leaves a busy writer alone
        self._commits_after = 0  # the writer's commits when the last batch was done
        self.window: RunWindow | None = None
        if lineage is not None:
            from refinery.governance.lineage import INCREMENTAL, RunWindow

            self.window = RunWindow(lineage, INCREMENTAL, lineage_seconds)
        self._warned = False
        self.working_set = WorkingSet()  # the graph around recent batches, kept between them
        self.batches = 0
        self.settles = 0
        self.last: BatchReport | None = None
        self.failures = 0
        #: monotonic time of the first attach not settled yet; None: nothing to settle (as far as this
        #: follower knows: at start it settles once, which also finishes what a previous run left)
        self.unsettled_since: float | None = time.monotonic()
        self._loaded_after = -1  # the working set's `clears` when it was last loaded whole
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="refinery-identity-follower", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self.window is not None:
            self.window.close()  # the last window's COMPLETE (its thread has ended)

    def _settle_due(self) -> bool:
        if self.unsettled_since is None:
            return False
        age = time.monotonic() - self.unsettled_since
        return age >= self.settle_within or (age >= self.settle_after and self.writer.pending() == 0)

    def _batch(self, phase: str) -> BatchReport | None:
        started = datetime.now(UTC)
        # A settle steps aside for events waiting to be attached, unless it is overdue.
        overdue = self.unsettled_since is not None and time.monotonic() - self.unsettled_since >= self.settle_within
        try:
            report = self.writer.submit(
                lambda e: run_batch(e, self.rules, self.policy, consent_categories=self.consent_categories,
                                    max_full_events=self.max_full_events, working_set=self.working_set, phase=phase,
                                    yield_to_new=not overdue)).result()
        except Exception as e:  # the follower must not die; the next commit retries
            self.working_set.clear()
            self.failures += 1
            log.warning("identity follower: %s batch failed (%s); retrying after the next commit", phase, type(e).__name__,
                        exc_info=True)
            if self.window is not None:
                self.window.fail(started, e)
            self._stop.wait(1.0)
            return None
        self.batches += 1
        self.last = report
        # (at most `settle_within`: waiting longer would only make the next batch, and its stall, larger)
        self._resume_at = time.monotonic() + min(self.yield_factor * report.seconds, self.settle_within)
        self._commits_after = self.writer.commits
        if report.reason is not None and report.reason.startswith("deferred"):
            pass  # still unsettled: the follower attaches first, then settles
        elif report.phase != "attach" or report.mode == "skipped":
            self.unsettled_since = None  # settled, or attached and settled in one transaction (or nothing to do till a resolve)
        elif report.mode == "attach" and self.unsettled_since is None:
            self.unsettled_since = time.monotonic()
        if report.phase == "settle" and report.mode != "none":
            self.settles += 1
        if self.window is not None and report.mode in ("attach", "region", "settle", "full"):
            self.window.add(started, *_lineage_counts(report))
            if report.mode == "full" and self.window.current is not None:  # a full resolution syncs consent too
                for table in ("consent_log", "consent_conflicts", "consent_syncs"):
                    self.window.current.add_output(table)
        if report.mode == "skipped" and not self._warned:
            self._warned = True
            log.warning("identity follower: profiles are not following events: %s", report.reason)
        return report

    def _preload(self) -> None:
        """A working set of the whole tables when they are small enough, at start and after it was dropped."""
        ws = self.working_set
        if ws.whole or ws.clears == self._loaded_after:
            return
        self._loaded_after = ws.clears
        try:
            preload(self.writer.engine, ws)
        except Exception as e:  # the batches read what they need instead
            ws.clear()
            self._loaded_after = ws.clears
            log.warning("identity follower: could not load the working set (%s)", type(e).__name__)

    def _run(self) -> None:
        seen = -1
        while not self._stop.is_set():
            if self.window is not None and self.unsettled_since is None:
                self.window.tick()  # a run ends with its batches settled: the settle is part of it
            self._preload()
            commits = self.writer.commits
            # Busy: requests from more than one client queued, or several commits by others since the
            # last batch (one client writing in turn is not load: it is followed batch by batch).
            busy = self.writer.pending() > 1 or commits - self._commits_after > 2
            if busy and time.monotonic() < self._resume_at:
                self._stop.wait(self.poll)  # the collector's group commits first
            elif commits != seen:
                # Commits after this read but before the batch's transaction are in the batch; any
                # other than the batch's own makes the counter pass commits + 1 and triggers one more.
                if self._batch("attach") is None:
                    continue
                seen = commits + 1  # the batch's own commit
            elif self._settle_due():
                if self._batch("settle") is None:
                    continue
                seen = commits + 1
            else:
                self._stop.wait(self.poll)
        if self.unsettled_since is not None and self.writer.running:
            self._batch("settle")  # leave nothing unsettled behind (a restart would redo it anyway)


def start_follower(runtime: Any) -> Follower | None:
    """Start the follower for a serving runtime when the `identity_incremental` setting is on; None
    when it is off or the identity rules cannot be read (the server still serves; the log says why)."""
    settings = runtime.settings
    if not getattr(settings, "identity_incremental", False):
        return None
    from refinery.identity.errors import IdentityRulesError
    from refinery.identity.rules import rules_from_settings
    from refinery.profiles.policy import TraitPolicy

    try:
        rules = rules_from_settings(settings)
    except IdentityRulesError as e:
        log.warning("identity follower not started: %s", e.message)
        return None
    follower = Follower(runtime.writer, rules, TraitPolicy.from_settings(settings), consent_categories=settings.consent_categories,
                        lineage=settings)
    follower.start()
    return follower
