"""Retention: each zone is kept for a time-to-live, per zone and per source, and no longer.

A policy (`Policy`) holds the days per zone from the settings (`retention_*_days`) and the per-source
overrides in `retention_overrides`; `0` keeps a zone forever. A run measures every row's age from
when Refinery received it (`received_at`; quarantined rows from `failed_at`, resolved ones from
`replayed_at`) against one moment (`as_of`) and deletes what is older, zone by zone:

| zone | rows | aged by |
|---|---|---|
| `raw` | `raw_events`, and imported files under `<data_dir>/raw/imports` no recent import uses | `received_at`; a file by its imports' `started_at` |
| `events` | `events`, with the `event_profiles` rows of the events deleted | `received_at` |
| `failed` | `failed_events` still pending or failed again | `failed_at` |
| `failed_resolved` | `failed_events` a replay loaded or found already loaded | `replayed_at` |

`message_ids` are pruned with the dedup window by `ingest.maintenance.prune_message_ids` (reused
here, so a run reports them too); `audit_log` is never deleted.

Deletes go through the one writer in bounded batches (`retention_batch_rows` rows per transaction),
so a large backlog never holds the writer for long; the run's row in `retention_runs` and its
audit row (`retention.run`, with the counts) commit together at the end. A dry run counts what
would go and writes nothing. SQL is constant text with bound parameters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from refinery.errors import RefineryError
from refinery.governance import audit, lineage
from refinery.governance.errors import GovernanceError
from refinery.governance.principal import Principal
from refinery.ingest.maintenance import prune_message_ids
from refinery.settings import Settings
from refinery.storage.engine import Engine
from refinery.storage.writer import Writer

log = logging.getLogger(__name__)

#: The zones a time-to-live applies to, with the setting that holds each default.
ZONES: dict[str, str] = {
    "raw": "retention_raw_days",
    "events": "retention_events_days",
    "failed": "retention_failed_days",
    "failed_resolved": "retention_failed_resolved_days",
}

#: Who runs the scheduled job inside `refinery serve` (recorded as the audit actor).
SYSTEM = Principal("system", "system:retention", "admin")


class RetentionError(GovernanceError):
    """A retention policy or override that cannot be applied."""

    code = "invalid_retention"
    http_status = 400


class UnknownSource(RetentionError):
    code = "not_found"
    http_status = 404


# --- the policy ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Policy:
    """Days to keep each zone (`defaults`), and per source where it differs (`overrides[source][zone]`)."""

    defaults: dict[str, int]
    overrides: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def load(cls, engine: Engine, settings: Settings, *, cursor: Any = None) -> Policy:
        defaults = {zone: int(getattr(settings, name)) for zone, name in ZONES.items()}
        overrides: dict[str, dict[str, int]] = {}
        for source, zone, days in engine.fetch_all(
            "SELECT source, zone, days FROM retention_overrides ORDER BY source, zone", cursor=cursor
        ):
            overrides.setdefault(str(source), {})[str(zone)] = int(days)
        return cls(defaults, overrides)

    def days(self, zone: str, source: str) -> int:
        return self.overrides.get(source, {}).get(zone, self.defaults[zone])

    def to_dict(self) -> dict[str, Any]:
        return {"defaults": dict(self.defaults), "overrides": {s: dict(z) for s, z in self.overrides.items()}}


def check_zone(zone: str) -> str:
    if zone not in ZONES:
        raise RetentionError(f"Unknown retention zone {zone!r}.", fix=f"Use one of: {', '.join(ZONES)}.", field="zone")
    return zone


def set_override(engine: Engine, source: str, zone: str, days: int | None, *, actor: str, known_sources: list[str]) -> None:
    """Give `source` its own days for `zone` (`days` None removes the override). Call inside the writer."""
    check_zone(zone)
    if source not in known_sources:
        raise UnknownSource(f"Unknown source {source!r}.", fix=f"Use one of: {', '.join(sorted(known_sources)) or '(none yet)'}.", field="source")
    engine.execute("DELETE FROM retention_overrides WHERE source = ? AND zone = ?", [source, zone])
    if days is not None:
        if days < 0:
            raise RetentionError(f"Retention of {days} days is negative.", fix="Give 0 (keep forever) or a number of days.", field="days")
        engine.execute(
            "INSERT INTO retention_overrides (source, zone, days, set_at, set_by) VALUES (?, ?, ?, ?, ?)",
            [source, zone, days, datetime.now(UTC), actor],
        )


# --- what one zone deletes ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Zone:
    """One zone's rows in one table: older than the cutoff by `age_column`, and `extra` (constant text)."""

    zone: str
    table: str
    age_column: str
    extra: str = ""          # further condition on the rows, constant text


_TABLE_ZONES = (
    _Zone("raw", "raw_events", "received_at"),
    _Zone("events", "events", "received_at"),
    _Zone("failed", "failed_events", "failed_at", "(replay_status IS NULL OR replay_status NOT IN ('loaded', 'duplicate'))"),
    _Zone("failed_resolved", "failed_events", "replayed_at", "replay_status IN ('loaded', 'duplicate')"),
)


def _conditions(policy: Policy, zone: str, as_of: datetime) -> list[tuple[str, list[Any]]]:
    """(WHERE fragment over `source`, params) per distinct time-to-live: each overriding source on
    its own, every other source with the default. Zones kept forever give no condition."""
    out: list[tuple[str, list[Any]]] = []
    overridden = sorted(s for s, zones in policy.overrides.items() if zone in zones)
    for source in overridden:
        days = policy.overrides[source][zone]
        if days > 0:
            out.append(("source = ?", [source, as_of - timedelta(days=days)]))
    default = policy.defaults[zone]
    if default > 0:
        if overridden:
            out.append(("NOT list_contains(CAST(? AS VARCHAR[]), source)", [overridden, as_of - timedelta(days=default)]))
        else:
            out.append(("TRUE", [as_of - timedelta(days=default)]))
    return out


def _where(z: _Zone, source_condition: str) -> str:
    parts = [source_condition, f"{z.age_column} < ?"]
    if z.extra:
        parts.append(z.extra)
    return " AND ".join(parts)


def _count(engine: Engine, z: _Zone, condition: str, params: list[Any], cursor: Any = None) -> int:
    sql = f"SELECT count(*) FROM {z.table} WHERE {_where(z, condition)}"  # noqa: S608 - constant text, values bound
    return int(engine.fetch_all(sql, params, cursor=cursor)[0][0])


def _delete_batch(engine: Engine, z: _Zone, condition: str, params: list[Any], batch: int) -> dict[str, int]:
    """Delete at most `batch` expired rows of one zone (and what hangs off them); returns counts."""
    where = _where(z, condition)
    if z.table == "raw_events":
        # Ingest allocates raw ids from max(raw_id) when it starts: the newest raw row stays until a
        # newer one arrives, so an id is never handed out twice (events and failures keep theirs).
        sql = ("DELETE FROM raw_events WHERE raw_id IN (SELECT raw_id FROM raw_events WHERE " + where +  # noqa: S608
               " AND raw_id < (SELECT max(raw_id) FROM raw_events) LIMIT ?) RETURNING 1")
        return {"raw_events": len(engine.fetch_all(sql, [*params, batch]))}
    if z.table == "failed_events":
        sql = ("DELETE FROM failed_events WHERE failure_id IN (SELECT failure_id FROM failed_events WHERE " + where +  # noqa: S608
               " LIMIT ?) RETURNING 1")
        return {"failed_events": len(engine.fetch_all(sql, [*params, batch]))}
    # events: delete by key with the age condition repeated (a message id reused after the dedup
    # window may have a newer row), then the event_profiles rows left without an event.
    engine.execute("DROP TABLE IF EXISTS _retention_batch")
    engine.execute(
        "CREATE TEMP TABLE _retention_batch AS SELECT DISTINCT source, message_id FROM "  # noqa: S608
        "(SELECT source, message_id FROM events WHERE " + where + " LIMIT ?)",
        [*params, batch],
    )
    try:
        deleted = engine.fetch_all(
            "DELETE FROM events WHERE (source, message_id) IN (SELECT source, message_id FROM _retention_batch) AND "  # noqa: S608
            + where + " RETURNING 1",
            params,
        )
        profiles = engine.fetch_all(
            "DELETE FROM event_profiles WHERE (source, message_id) IN (SELECT source, message_id FROM _retention_batch b "
            "WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.source = b.source AND e.message_id = b.message_id)) RETURNING 1"
        )
    finally:
        engine.execute("DROP TABLE IF EXISTS _retention_batch")
    return {"events": len(deleted), "event_profiles": len(profiles)}


# --- raw files ----------------------------------------------------------------------------------

def expired_files(engine: Engine, policy: Policy, raw_dir: Path, as_of: datetime, *, cursor: Any = None) -> list[Path]:
    """Files in the raw zone older than the raw time-to-live that no import still needs.

    A file is needed while an import that stored it is running (new, started) or started within its
    source's raw time-to-live (re-importing a file keeps it: the copy is content-addressed). Files no
    import names (crash leftovers) go by their modification time and the default."""
    if not raw_dir.is_dir():
        return []
    uses: dict[str, list[tuple[str, datetime, str]]] = {}
    for stored, source, started, status in engine.fetch_all(
        "SELECT stored_path, source, started_at, status FROM imports WHERE stored_path IS NOT NULL", cursor=cursor
    ):
        uses.setdefault(os.path.basename(str(stored)), []).append((str(source), started, str(status)))
    default_days = policy.defaults["raw"]
    out = []
    for path in sorted(raw_dir.iterdir()):
        if not path.is_file():
            continue
        imports = uses.get(path.name)
        if imports:
            def kept(source: str, started: datetime, status: str) -> bool:
                days = policy.days("raw", source)
                return status in ("new", "started") or days == 0 or started >= as_of - timedelta(days=days)

            if any(kept(*u) for u in imports):
                continue
        else:
            if default_days == 0:
                continue
            mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
            if mtime >= as_of - timedelta(days=default_days):
                continue
        out.append(path)
    return out


# --- a run --------------------------------------------------------------------------------------

@dataclass
class RunReport:
    run_id: str
    trigger: str
    actor: str
    as_of: str
    dry_run: bool
    status: str = "completed"
    counts: dict[str, int] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    finished_at: str = ""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_COUNTED = ("raw_events", "raw_files", "events", "event_profiles", "failed_events", "failed_resolved", "message_ids")


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat()


def run(engine: Engine, writer: Writer, settings: Settings, actor: Principal, *, trigger: str = "cli", dry_run: bool = False,
        as_of: datetime | None = None, on_progress: Callable[[dict[str, int]], None] | None = None) -> RunReport:
    """`_run` as a lineage run (`governance.retention`): the rows it deleted, per table, in the run's facet."""
    outputs = [] if dry_run else [*_LINEAGE_TABLES, "retention_runs", f"file:{settings.raw_files_dir}"]
    with lineage.run(settings, job="governance.retention", inputs=[*_LINEAGE_TABLES, "retention_overrides"], outputs=outputs) as lr:
        report = _run(engine, writer, settings, actor, trigger=trigger, dry_run=dry_run, as_of=as_of, on_progress=on_progress)
        lr.note(retention_run_id=report.run_id, dry_run=report.dry_run, trigger=report.trigger, deleted=report.counts)
    return report


_LINEAGE_TABLES = ["raw_events", "events", "event_profiles", "failed_events", "message_ids"]


def _run(
    engine: Engine,
    writer: Writer,
    settings: Settings,
    actor: Principal,
    *,
    trigger: str = "cli",
    dry_run: bool = False,
    as_of: datetime | None = None,
    on_progress: Callable[[dict[str, int]], None] | None = None,
) -> RunReport:
    """Delete (or, with `dry_run`, count) everything older than its time-to-live; see the module docstring.

    Every batch is its own writer transaction; the run's row and its audit row commit together at
    the end, also when a batch failed (status `failed`, with the counts so far), before the error
    is raised again."""
    started = datetime.now(UTC)
    now = as_of or started
    policy = Policy.load(engine, settings, cursor=engine.reader())
    report = RunReport(f"ret_{uuid.uuid4().hex[:16]}", trigger, actor.name, _iso(now), dry_run,
                       counts=dict.fromkeys(_COUNTED, 0), policy=policy.to_dict(), started_at=_iso(started))
    counts = report.counts
    try:
        if dry_run:
            _dry_run(engine, settings, policy, now, counts)
        else:
            _delete(engine, writer, settings, policy, now, counts, on_progress)
    except RefineryError as e:
        report.status, report.error = "failed", f"{type(e).__name__}: {e.message}"
        if not dry_run:
            _record(writer, actor, report)
        raise
    except Exception as e:
        report.status, report.error = "failed", type(e).__name__
        if not dry_run:
            _record(writer, actor, report)
        raise
    if not dry_run:
        _record(writer, actor, report)
    else:
        report.finished_at = _iso(datetime.now(UTC))
    return report


def _dry_run(engine: Engine, settings: Settings, policy: Policy, now: datetime, counts: dict[str, int]) -> None:
    cur = engine.reader()
    for z in _TABLE_ZONES:
        key = "failed_resolved" if z.zone == "failed_resolved" else z.table
        for condition, params in _conditions(policy, z.zone, now):
            if z.table == "raw_events":
                extra = " AND raw_id < (SELECT max(raw_id) FROM raw_events)"
                sql = f"SELECT count(*) FROM raw_events WHERE {_where(z, condition)}{extra}"  # noqa: S608 - constant text
                counts[key] += int(engine.fetch_all(sql, params, cursor=cur)[0][0])
            else:
                counts[key] += _count(engine, z, condition, params, cur)
            if z.table == "events":
                # the rows a delete leaves without an event (as `_delete_batch` removes them)
                where = _where(z, condition)
                sql = ("SELECT count(*) FROM event_profiles WHERE (source, message_id) IN (SELECT source, message_id FROM events WHERE "  # noqa: S608
                       + where + ") AND (source, message_id) NOT IN (SELECT source, message_id FROM events WHERE NOT (" + where + "))")
                counts["event_profiles"] += int(engine.fetch_all(sql, params + params, cursor=cur)[0][0])
    cutoff = now - timedelta(days=settings.dedup_window_days)
    counts["message_ids"] = int(engine.fetch_all("SELECT count(*) FROM message_ids WHERE first_seen < ?", [cutoff], cursor=cur)[0][0])
    counts["raw_files"] = len(expired_files(engine, policy, settings.raw_files_dir, now, cursor=cur))


def _delete(engine: Engine, writer: Writer, settings: Settings, policy: Policy, now: datetime, counts: dict[str, int],
            on_progress: Callable[[dict[str, int]], None] | None) -> None:
    batch = settings.retention_batch_rows
    for z in _TABLE_ZONES:
        for condition, params in _conditions(policy, z.zone, now):
            while True:
                done = writer.call(lambda e, z=z, c=condition, p=params: _delete_batch(e, z, c, p, batch))  # type: ignore[misc]
                moved = 0
                for key, n in done.items():
                    name = "failed_resolved" if z.zone == "failed_resolved" else key
                    counts[name] += n
                    if key == z.table:
                        moved = n
                if on_progress:
                    on_progress(dict(counts))
                if moved < batch:
                    break
    counts["message_ids"] = writer.call(lambda e: prune_message_ids(e, settings.dedup_window_days, now=now))
    for path in expired_files(engine, policy, settings.raw_files_dir, now, cursor=engine.fresh_reader()):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        counts["raw_files"] += 1


def _record(writer: Writer, actor: Principal, report: RunReport) -> None:
    report.finished_at = _iso(datetime.now(UTC))

    def write(e: Engine) -> None:
        e.execute(
            "INSERT INTO retention_runs (run_id, trigger, actor, started_at, finished_at, as_of, status, policy, counts, error) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [report.run_id, report.trigger, report.actor, datetime.fromisoformat(report.started_at),
             datetime.fromisoformat(report.finished_at), datetime.fromisoformat(report.as_of), report.status,
             json.dumps(report.policy, sort_keys=True), json.dumps(report.counts, sort_keys=True), report.error],
        )
        audit.record(e, actor, "retention.run", f"retention_run:{report.run_id}",
                     {"trigger": report.trigger, "status": report.status, **report.counts})

    writer.call(write)


def runs(engine: Engine, *, limit: int = 50, cursor: Any = None) -> list[dict[str, Any]]:
    """The latest runs, newest first."""
    rows = engine.fetch_dicts(
        "SELECT run_id, trigger, actor, started_at, finished_at, as_of, status, policy, counts, error "
        "FROM retention_runs ORDER BY started_at DESC LIMIT ?",
        [limit], cursor=cursor if cursor is not None else engine.reader(),
    )
    out = []
    for r in rows:
        for k in ("started_at", "finished_at", "as_of"):
            r[k] = _iso(r[k]) if r[k] is not None else None
        for k in ("policy", "counts"):
            if isinstance(r[k], str):
                r[k] = json.loads(r[k])
        out.append(r)
    return out


def due(engine: Engine, settings: Settings, *, now: datetime | None = None) -> bool:
    """Whether the scheduled job should run: on, and no scheduled run within `retention_interval_hours`."""
    if settings.retention_interval_hours <= 0:
        return False
    last = engine.fetch_all(
        "SELECT max(started_at) FROM retention_runs WHERE trigger = 'scheduled'", cursor=engine.fresh_reader()
    )[0][0]
    return last is None or last <= (now or datetime.now(UTC)) - timedelta(hours=settings.retention_interval_hours)


def run_if_due(engine: Engine, writer: Writer, settings: Settings) -> RunReport | None:
    """The scheduled job (`refinery serve`'s housekeeping): a run as the system principal when due."""
    if not due(engine, settings):
        return None
    report = run(engine, writer, settings, SYSTEM, trigger="scheduled")
    log.info("retention run %s: %s", report.run_id, ", ".join(f"{k} {v}" for k, v in report.counts.items() if v))
    return report


async def scheduled(engine: Engine, writer: Writer, settings: Settings) -> None:
    """`refinery serve`'s retention job: first check `retention_first_check_minutes` after start,
    then hourly; runs when `due`. A failure is recorded (a failed run) and logged; the server carries on."""
    if settings.retention_interval_hours <= 0:
        return
    await asyncio.sleep(settings.retention_first_check_minutes * 60)
    while True:
        try:
            await asyncio.to_thread(run_if_due, engine, writer, settings)
        except Exception as e:  # never take the server down
            log.warning("retention failed: %s", type(e).__name__)
        await asyncio.sleep(min(3600.0, settings.retention_interval_hours * 3600))
