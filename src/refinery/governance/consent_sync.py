"""The consent job: receipts from the clean zone, and conflicts from the identity graph.

`sync(engine, categories)` runs inside the writer (after a resolution, like the profile build;
re-running it changes nothing). It:

1. finds the identifiers with events loaded since the last run (all of them the first time);
2. reads every consent signal those identifiers' events carry: `context.consent.categoryPreferences`
   (Segment's consent object; category names mapped to purposes by `CategoryMap`, several categories
   of one purpose in one event combine to the most restrictive) and IAB TCF v2 strings at
   `context.consent.tcString`, `context.consent.tcfString` or `context.gdpr_consent` (each distinct
   string decoded once in Python; a string that fails is refused, counted by reason, and records
   nothing);
3. orders each identifier's signals, together with its receipts recorded through the API, by time,
   and appends to `consent_log` each signal that *changes* the identifier's choice for a purpose and
   is not there yet. The log holds changes, not one row per event;
4. records in `consent_conflicts` each (profile, purpose) whose identifiers' current choices
   disagree (and marks conflicts that no longer hold as resolved).

An event's consent belongs to the browser or app install that carried it: its `anonymous_id`
(where the CMP keeps the choice), else its `user_id`. A family laptop's cookie belongs to no profile
(identity resolution leaves it `ambiguous`), so its banner choice is kept as a receipt for the cookie
and never becomes any one member's consent. Why: docs/decisions/0010-consent.md.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from sqlglot import exp

from refinery.governance.consent import latest_relation
from refinery.governance.purposes import CategoryMap, from_tcf
from refinery.governance.tcf import TCFError
from refinery.governance.tcf import decode as decode_tcf
from refinery.identity import sql
from refinery.privacy.normalise import normalise
from refinery.storage.engine import Engine

if TYPE_CHECKING:
    from refinery.governance.principal import Principal
    from refinery.settings import Settings
    from refinery.storage.writer import Writer

_TEMP = ("_cns_subj", "_cns_sig", "_cns_new", "_cns_conf")

#: The subject of an event's consent: the browser or install (anonymous id), else the user id.
_SUBJECT = """
SELECT CASE WHEN anonymous_id IS NOT NULL AND trim(anonymous_id) <> '' THEN 'anonymous_id' ELSE 'user_id' END AS subject_type,
       CASE WHEN anonymous_id IS NOT NULL AND trim(anonymous_id) <> '' THEN anonymous_id ELSE user_id END AS raw_subject,
       source, message_id, timestamp AS chosen_at, loaded_at, consent, context
FROM events
WHERE consent IS NOT NULL OR json_extract_string(context, '$.gdpr_consent') IS NOT NULL
"""

_TC_PATHS = ("$.tcString", "$.tcfString")


@dataclass
class SyncReport:
    sync_id: str
    events: int = 0
    subjects: int = 0
    log_rows: int = 0
    tcf_strings: int = 0
    tcf_refused: dict[str, int] = field(default_factory=dict)
    unknown_categories: dict[str, int] = field(default_factory=dict)
    invalid_values: int = 0
    conflicts_open: int = 0
    conflicts_new: int = 0
    conflicts_resolved: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _watermark(engine: Engine) -> datetime | None:
    rows = engine.fetch_all("SELECT max(loaded_until) FROM consent_syncs")
    value: datetime | None = rows[0][0] if rows else None
    return value


def sync(engine: Engine, categories: CategoryMap, *, now: datetime | None = None, full: bool = False) -> SyncReport:
    """Bring `consent_log` and `consent_conflicts` up to date (call inside the writer)."""
    moment = now or datetime.now(UTC)
    report = SyncReport("cns_" + uuid.uuid4().hex[:16])
    since = None if full else _watermark(engine)
    until = engine.fetch_all("SELECT max(loaded_at) FROM events")[0][0]
    try:
        _subjects(engine, since)
        report.subjects = engine.fetch_all("SELECT count(*) FROM (SELECT DISTINCT subject_type, subject_value FROM _cns_subj)")[0][0]
        if report.subjects:
            _signals(engine, categories, report, moment)
            report.log_rows = _append_changes(engine, moment)
        _conflicts(engine, report, moment)
        engine.execute(
            "INSERT INTO consent_syncs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [report.sync_id, moment, datetime.now(UTC), since, until if until is not None else since, report.events,
             report.log_rows, json.dumps(report.tcf_refused), json.dumps(report.unknown_categories), report.conflicts_open],
        )
    finally:
        for t in _TEMP:
            engine.execute(f"DROP TABLE IF EXISTS {t}")  # constant names, no user text
        for t in ("_cns_tc", "_cns_cat"):
            with contextlib.suppress(Exception):  # not registered when an earlier step failed
                engine.unregister(t)
    return report


def run_audited(settings: Settings, writer: Writer, actor: Principal, *, full: bool = False) -> dict[str, Any]:
    """The consent job on its own, as `POST /api/consent/sync` and `refinery consent sync` run it: in one
    writer transaction, audited there as `actor` (`consent.sync`), inside a `governance.consent_sync`
    lineage run emitted outside the writer."""
    from refinery.governance import audit, lineage

    categories = CategoryMap.build(settings.consent_categories)

    def work(e: Engine) -> dict[str, Any]:
        report = sync(e, categories, full=full).to_dict()
        audit.record(e, actor, "consent.sync", f"consent_sync:{report['sync_id']}", audit.counts(report))
        return report

    with lineage.run(settings, **lineage.CONSENT_SYNC) as lr:
        result: dict[str, Any] = writer.call(work)
        lr.record_consent_sync(result)
    return result


def _subjects(engine: Engine, since: datetime | None) -> None:
    """`_cns_subj`: the consent-carrying events of every subject with an event loaded after `since`."""
    sql.run(engine, "CREATE OR REPLACE TEMP TABLE _cns_raw AS __q", q=sql.template(_SUBJECT))
    # Normalise subjects as identity resolution does (NFKC, invisible characters, trim); Python
    # only for the values SQL cannot handle.
    odd = engine.fetch_all("SELECT DISTINCT subject_type, raw_subject FROM _cns_raw WHERE NOT regexp_full_match(raw_subject, '[ -~]*')")
    engine.register("_cns_norm", pa.table({
        "subject_type": pa.array([k for k, _ in odd], pa.string()), "raw_subject": pa.array([r for _, r in odd], pa.string()),
        "value": pa.array([normalise(k, r).value for k, r in odd], pa.string()),
    }))
    try:
        sql.run(engine, """
            CREATE OR REPLACE TEMP TABLE _cns_all AS
            SELECT r.subject_type, coalesce(n.value, trim(r.raw_subject)) AS subject_value, r.source, r.message_id, r.chosen_at, r.loaded_at,
                   r.consent, r.context
            FROM _cns_raw r LEFT JOIN _cns_norm n ON n.subject_type = r.subject_type AND n.raw_subject = r.raw_subject
            WHERE r.raw_subject IS NOT NULL
        """)
    finally:
        engine.unregister("_cns_norm")
    engine.execute("DROP TABLE IF EXISTS _cns_raw")
    if since is None:
        engine.execute("CREATE OR REPLACE TEMP TABLE _cns_subj AS SELECT * FROM _cns_all WHERE subject_value <> ''")
    else:
        engine.execute(
            "CREATE OR REPLACE TEMP TABLE _cns_subj AS SELECT a.* FROM _cns_all a "
            "JOIN (SELECT DISTINCT subject_type, subject_value FROM _cns_all WHERE loaded_at >= ?) s "
            "USING (subject_type, subject_value) WHERE a.subject_value <> ''",
            [since],
        )
    engine.execute("DROP TABLE IF EXISTS _cns_all")


def _tc_string(table: str | None = None) -> exp.Expression:
    """The event's TC string: the first of `consent.tcString`, `consent.tcfString`, `context.gdpr_consent`."""
    def at(column: str, path: str) -> exp.Expression:
        return exp.Anonymous(this="json_extract_string", expressions=[exp.column(column, table=table), sql.lit(path)])

    return exp.Coalesce(this=at("consent", _TC_PATHS[0]), expressions=[at("consent", p) for p in _TC_PATHS[1:]] + [at("context", "$.gdpr_consent")])


def _signals(engine: Engine, categories: CategoryMap, report: SyncReport, now: datetime) -> None:
    """`_cns_sig(subject_type, subject_value, purpose, state, origin, source, message_id, chosen_at, evidence)`."""
    report.events = engine.fetch_all("SELECT count(*) FROM _cns_subj")[0][0]
    # Category preferences: one row per (event, category), mapped to a purpose through a literal table.
    cats = engine.fetch_all("""
        SELECT j.key, j.value::VARCHAR AS v, json_type(j.value) AS t, count(*)
        FROM _cns_subj, json_each(CASE WHEN json_type(consent, '$.categoryPreferences') = 'OBJECT'
                                       THEN json_extract(consent, '$.categoryPreferences') END) j
        GROUP BY ALL
    """)
    unknown: Counter[str] = Counter()
    names, purposes = [], []
    for key, _v, kind, n in cats:
        purpose = categories.purpose(key)
        if purpose is None:
            unknown[key[:64]] += n
        elif kind != "BOOLEAN":
            report.invalid_values += n
        elif key not in names:
            names.append(key)
            purposes.append(purpose)
    report.unknown_categories = dict(unknown.most_common(50))
    engine.register("_cns_cat", pa.table({"category": pa.array(names, pa.string()), "purpose": pa.array(purposes, pa.string())}))

    # TC strings: each distinct one decoded once.
    strings = [r[0] for r in engine.fetch_all(sql.template("SELECT DISTINCT __tc FROM _cns_subj WHERE __tc IS NOT NULL", tc=_tc_string()))]
    report.tcf_strings = len(strings)
    refused: Counter[str] = Counter()
    tc_rows: dict[str, list[Any]] = {"tc": [], "purpose": [], "state": [], "evidence": []}
    for s in strings:
        try:
            tc = decode_tcf(s, now=now)
        except TCFError as e:
            refused[e.message.split(":")[0][:80]] += 1
            continue
        evidence = json.dumps({"tcString": s, "tcf_purposes_consent": sorted(tc.purposes_consent)})
        for purpose, state in from_tcf(tc.purposes_consent).items():
            for key, value in (("tc", s), ("purpose", purpose), ("state", state), ("evidence", evidence)):
                tc_rows[key].append(value)
    report.tcf_refused = dict(refused)
    engine.register("_cns_tc", pa.table({k: pa.array(v, pa.string()) for k, v in tc_rows.items()}))

    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _cns_sig AS
        SELECT e.subject_type, e.subject_value, c.purpose,
               CASE WHEN bool_and(j.value::BOOLEAN) THEN 'granted' ELSE 'denied' END AS state,
               'event' AS origin, e.source, e.message_id, e.chosen_at,
               json_object('categoryPreferences', any_value(json_extract(e.consent, '$.categoryPreferences'))) AS evidence
        FROM _cns_subj e, json_each(CASE WHEN json_type(e.consent, '$.categoryPreferences') = 'OBJECT'
                                         THEN json_extract(e.consent, '$.categoryPreferences') END) j
        JOIN _cns_cat c ON c.category = j.key
        WHERE json_type(j.value) = 'BOOLEAN'
        GROUP BY e.subject_type, e.subject_value, c.purpose, e.source, e.message_id, e.chosen_at
        UNION ALL
        SELECT e.subject_type, e.subject_value, t.purpose, t.state, 'tcf' AS origin, e.source, e.message_id, e.chosen_at, t.evidence::JSON
        FROM _cns_subj e JOIN _cns_tc t ON t.tc = __tc
    """, tc=_tc_string("e"))


def _append_changes(engine: Engine, now: datetime) -> int:
    """Append each signal that changes its identifier's choice and is not in the log yet."""
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _cns_new AS
        WITH stream AS (
            SELECT subject_type, subject_value, purpose, state, origin, source, message_id, chosen_at, evidence, FALSE AS logged
            FROM _cns_sig
            UNION ALL
            SELECT l.subject_type, l.subject_value, l.purpose, l.state, l.origin, l.source, l.message_id, l.chosen_at, l.evidence, TRUE
            FROM consent_log l JOIN (SELECT DISTINCT subject_type, subject_value FROM _cns_subj) s
              ON s.subject_type = l.subject_type AND s.subject_value = l.subject_value
            WHERE l.message_id IS NULL                   -- choices recorded through the API
        ), ordered AS (
            SELECT *, lag(state) OVER (
                PARTITION BY subject_type, subject_value, purpose
                ORDER BY chosen_at, CASE WHEN state = 'denied' THEN 1 ELSE 0 END, origin, source, message_id) AS before
            FROM stream
        )
        SELECT o.* FROM ordered o
        WHERE NOT o.logged AND (o.before IS NULL OR o.before <> o.state)
          AND NOT EXISTS (
              SELECT 1 FROM consent_log l
              WHERE l.subject_type = o.subject_type AND l.subject_value = o.subject_value AND l.purpose = o.purpose
                AND l.origin = o.origin AND l.source = o.source AND l.message_id = o.message_id)
    """)
    n: int = engine.fetch_all("SELECT count(*) FROM _cns_new")[0][0]
    engine.execute("""
        INSERT INTO consent_log (log_id, subject_type, subject_value, profile_id, purpose, state, origin, source, message_id,
                                 request_id, actor, chosen_at, recorded_at, evidence)
        SELECT nextval('consent_log_seq'), n.subject_type, n.subject_value, i.profile_id, n.purpose, n.state, n.origin, n.source,
               n.message_id, NULL, NULL, n.chosen_at, ?, n.evidence
        FROM (SELECT * FROM _cns_new ORDER BY chosen_at, subject_type, subject_value, purpose, origin) n
        LEFT JOIN identities i ON i.identifier_type = n.subject_type AND i.value = n.subject_value
    """, [now])
    return n


def _conflicts(engine: Engine, report: SyncReport, now: datetime) -> None:
    """Record each (profile, purpose) whose identifiers' current choices disagree; resolve the rest."""
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _cns_conf AS
        WITH cur AS (
            SELECT i.profile_id, c.* FROM __latest c
            JOIN identities i ON i.identifier_type = c.subject_type AND i.value = c.subject_value
            WHERE i.profile_id IS NOT NULL
        ), sides AS (
            SELECT profile_id, purpose,
                   to_json(list(struct_pack(subject := subject_type || ':' || subject_value, chosen_at := chosen_at, source := source,
                                            origin := origin, log_id := log_id) ORDER BY chosen_at, log_id) FILTER (WHERE state = 'denied')) AS denied,
                   to_json(list(struct_pack(subject := subject_type || ':' || subject_value, chosen_at := chosen_at, source := source,
                                            origin := origin, log_id := log_id) ORDER BY chosen_at, log_id) FILTER (WHERE state = 'granted')) AS granted,
                   string_agg(log_id::VARCHAR, ',' ORDER BY log_id) AS ids
            FROM cur GROUP BY profile_id, purpose
            HAVING count(*) FILTER (WHERE state = 'denied') > 0 AND count(*) FILTER (WHERE state = 'granted') > 0
        )
        SELECT 'cc_' || substr(md5(profile_id || '|' || purpose || '|' || ids), 1, 20) AS conflict_id, profile_id, purpose, denied, granted
        FROM sides
    """, latest=exp.Subquery(this=latest_relation(), alias=exp.TableAlias(this=exp.to_identifier("c"))))
    report.conflicts_new = engine.fetch_all(
        "SELECT count(*) FROM _cns_conf n WHERE NOT EXISTS (SELECT 1 FROM consent_conflicts c WHERE c.conflict_id = n.conflict_id)"
    )[0][0]
    engine.execute("""
        INSERT INTO consent_conflicts
        SELECT conflict_id, profile_id, purpose, denied, granted, 'denied', 'identifiers_disagree', ?, NULL FROM _cns_conf n
        WHERE NOT EXISTS (SELECT 1 FROM consent_conflicts c WHERE c.conflict_id = n.conflict_id)
    """, [now])
    report.conflicts_resolved = engine.fetch_all(
        "SELECT count(*) FROM consent_conflicts WHERE resolved_at IS NULL AND conflict_id NOT IN (SELECT conflict_id FROM _cns_conf)"
    )[0][0]
    engine.execute(
        "UPDATE consent_conflicts SET resolved_at = ? WHERE resolved_at IS NULL AND conflict_id NOT IN (SELECT conflict_id FROM _cns_conf)",
        [now],
    )
    report.conflicts_open = engine.fetch_all("SELECT count(*) FROM consent_conflicts WHERE resolved_at IS NULL")[0][0]
