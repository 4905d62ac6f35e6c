"""Lineage: every batch job emits OpenLineage run events, and `refinery lineage` reads the trail.

A job runs inside `run(settings, job=..., inputs=[...], outputs=[...])`: the context manager emits
START, then COMPLETE (with the row counts the job reported, as `outputStatistics` facets) or FAIL
(with the error's type and a redacted message, never a value from the data), through the
`openlineage-python` client. Every event is appended to `settings.lineage_path` (JSON lines) and,
when `lineage_url` is set, POSTed to that OpenLineage endpoint as well. Sending is best effort: a
failure is logged (without personal data) and never fails the job, and a job's own error always
propagates unchanged.

Datasets are Refinery's tables (namespace `refinery`) and files (namespace `file`, written
`file:/path` in `inputs`). The reading side (`table_trail`, `profile_trail`) joins the emitted
runs with the row-level trail the tables keep: `event_profiles` -> `events.raw_id` / `import_id`
-> `imports.stored_path`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import attr
import orjson

from refinery.errors import NotFoundError, RefineryError
from refinery.privacy.pii import redact_text
from refinery.settings import Settings

log = logging.getLogger(__name__)

NAMESPACE = "refinery"  # the jobs' namespace, and the tables'
FILE_NAMESPACE = "file"
_SCHEMA = "https://github.com/refinery-dmp/refinery/blob/main/docs/lineage.md#refineryrunfacet"
_MAX_ERROR = 500
_LOCK = threading.Lock()  # the client cache
_FILE_LOCK = threading.Lock()  # appends to the lineage file
_CLIENTS: dict[tuple[str, str, float], Any] = {}


@dataclass
class LineageRun:
    """One job run: its id, and what the job tells it while it runs (row counts, ids of its own records)."""

    job: str
    inputs: list[str]
    outputs: list[str]
    run_id: str = field(default_factory=lambda: str(_new_run_id()))
    counts: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def count(self, table: str, rows: int | None) -> None:
        """Rows the job wrote to (or, for a full rebuild, now holds in) an output table."""
        if rows is not None:
            self.counts[table] = int(rows)

    def note(self, **details: Any) -> None:
        """Ids and numbers of the job's own records (an import id, a retention run id); never personal values."""
        self.details.update({k: v for k, v in details.items() if v is not None})

    failure: str | None = None
    #: False for jobs whose errors quote the caller's input (an identifier's value): FAIL says only the type.
    quote_errors: bool = True

    def add_input(self, name: str) -> None:
        if name not in self.inputs:
            self.inputs.append(name)

    def add_output(self, name: str) -> None:
        if name not in self.outputs:
            self.outputs.append(name)

    def failed(self, message: str) -> None:
        """A job that records its failure instead of raising: the run ends FAIL with `message`
        (written by us, never holding values from the data)."""
        self.failure = message[:_MAX_ERROR]

    def record_resolution(self, result: dict[str, Any]) -> None:
        """`profiles.build.resolve_and_build`'s result: the resolution id, and the rows it left."""
        identity, profiles, consent = result.get("identity", {}), result.get("profiles", {}), result.get("consent", {})
        self.note(resolution_id=identity.get("resolution_id"), consent_sync_id=consent.get("sync_id"),
                  merges=identity.get("merges"), unmerges=identity.get("unmerges"))
        self.count("identities", identity.get("identifiers"))
        self.count("identity_edges", identity.get("edges"))
        self.count("profiles", profiles.get("profiles"))
        self.count("event_profiles", profiles.get("events_attributed"))
        self.count("consent_log", consent.get("log_rows"))

    def record_import(self, job: Any) -> None:
        """An import job's outcome (`ingest.importer.ImportJob`): its ids, counts, stored file and state.
        Its error text stays in `imports.error` (it may quote a value); the event points there."""
        self.note(import_id=job.import_id, source=job.source, file_sha256=job.file_sha256 or None,
                  rows_read=job.rows_read, rows_duplicate=job.rows_duplicate)
        self.count("events", job.rows_loaded)
        self.count("failed_events", job.rows_failed)
        if job.stored_path:
            self.add_output(f"{FILE_NAMESPACE}:{job.stored_path}")
        if job.status == "failed":
            self.failed(f"Import {job.import_id} failed; its error is recorded in imports.error.")


    def record_override(self, result: dict[str, Any], action: str) -> None:
        """An override (`{"override": ..., "resolution": ...}`) and the resolution it ran: the run names
        the override by id and kind (never its identifiers' values)."""
        o = result.get("override", {})
        self.note(override_id=o.get("override_id"), kind=o.get("kind"), action=action)
        self.count("identity_overrides", 1)
        self.record_resolution(result.get("resolution", {}))

    def record_consent_sync(self, report: dict[str, Any]) -> None:
        """The consent job's report (`consent_sync.SyncReport.to_dict()`)."""
        self.note(consent_sync_id=report.get("sync_id"), events=report.get("events"), subjects=report.get("subjects"),
                  conflicts_open=report.get("conflicts_open"))
        self.count("consent_log", report.get("log_rows"))
        self.count("consent_conflicts", (report.get("conflicts_new") or 0) + (report.get("conflicts_resolved") or 0))
        self.count("consent_syncs", 1)


    def record_segment_runs(self, report: dict[str, Any]) -> None:
        """A segments run's report (`segments.members.RunReport.to_dict()`): each recomputed
        segment's run id and counts; the job FAILs when a segment's rule failed (its reason stays in
        `segment_runs.error`)."""
        runs = report.get("runs", [])
        self.note(as_of=report.get("as_of"), trigger=report.get("trigger"),
                  segments={r["segment"]: {k: r.get(k) for k in ("run_id", "status", "members", "entered", "exited")} for r in runs},
                  skipped=len(report.get("skipped", [])))
        self.count("segment_runs", len(runs))
        self.count("segment_events", sum((r.get("entered") or 0) + (r.get("exited") or 0) for r in runs))
        if report.get("failed"):
            self.failed(f"Segments {', '.join(report['failed'])} failed; their reasons are recorded in segment_runs.error.")

    def record_computed_traits(self, names: list[str], rows: int | None = None) -> None:
        self.note(computed_traits=list(names))
        self.count("computed_trait_values", rows)


def _new_run_id() -> uuid.UUID:
    from openlineage.client.uuid import generate_new_uuid

    return generate_new_uuid()


#: What a full resolution (`profiles.build.resolve_and_build`, consent sync included) reads and writes.
RESOLVE: dict[str, Any] = {
    "job": "identity.resolve",
    "inputs": ["events", "identity_overrides", "consent_log"],
    "outputs": ["identities", "identity_edges", "identity_blocked", "profile_merges", "identity_resolutions",
                "profiles", "event_profiles", "consent_log", "consent_conflicts", "consent_syncs"],
}


#: A user's override (remove an identifier or an edge, split a profile, or revoke one), then the full
#: resolution it reruns in the same transaction.
OVERRIDE: dict[str, Any] = {
    "job": "identity.override",
    "inputs": RESOLVE["inputs"],
    "outputs": ["identity_overrides", *RESOLVE["outputs"]],
    "quote_errors": False,  # "No identifier 'user_id:...'": the caller's input
}
#: The consent job run on its own (`POST /api/consent/sync`, `refinery consent sync`).
CONSENT_SYNC: dict[str, Any] = {
    "job": "governance.consent_sync",
    "inputs": ["events", "identities", "consent_log"],
    "outputs": ["consent_log", "consent_conflicts", "consent_syncs"],
}
#: A choice recorded through `POST /api/consent` (`refinery consent set`): receipts appended to consent_log.
CONSENT_RECORD: dict[str, Any] = {
    "job": "governance.consent_record",
    "inputs": ["identities"],
    "outputs": ["consent_log"],
    "quote_errors": False,
}
#: The incremental identity follower: one run per window of batches (`identity/incremental.py`).
INCREMENTAL: dict[str, Any] = {
    "job": "identity.incremental",
    "inputs": ["events", "identity_overrides", "consent_log"],
    "outputs": ["identities", "identity_edges", "identity_blocked", "profile_merges", "identity_resolutions",
                "profiles", "event_profiles"],
}


#: A recomputation of segment membership (`refinery segments run`, the schedule, a create or change
#: that runs, a delete that closes every membership).
SEGMENTS_RUN: dict[str, Any] = {
    "job": "segments.run",
    "inputs": ["segments", "segment_versions", "events", "event_profiles", "profiles", "identity_links", "computed_traits"],
    "outputs": ["segment_members", "segment_events", "segment_runs"],
}
#: Computed traits re-materialised (`refinery segments traits compute`, the schedule).
COMPUTED_TRAITS: dict[str, Any] = {
    "job": "segments.computed_traits",
    "inputs": ["computed_traits", "events", "event_profiles"],
    "outputs": ["computed_trait_values", "computed_traits"],
}


def after_the_fact(settings: Settings, spec: dict[str, Any], started_at: datetime, fill: Any,
                   error: BaseException | None = None) -> LineageRun:
    """A run recorded once the job is over (for a scheduled job that only sometimes does work: a
    START and its end, dated when the job began and now). `fill(run)` adds counts and notes."""
    current = LineageRun(spec["job"], list(spec["inputs"]), list(spec["outputs"]), quote_errors=spec.get("quote_errors", True))
    fill(current)
    emit(settings, current, "START", at=started_at)
    emit(settings, current, "FAIL" if error is not None or current.failure else "COMPLETE", error=error)
    return current


@contextmanager
def run(settings: Settings, *, job: str, inputs: Sequence[str], outputs: Sequence[str],
        quote_errors: bool = True) -> Iterator[LineageRun]:
    """Wrap a batch job: START now, COMPLETE when the block ends, FAIL (and re-raise) when it raises.
    With `quote_errors=False` a FAIL names only the error's type (for jobs whose errors quote their input)."""
    current = LineageRun(job, list(inputs), list(outputs), quote_errors=quote_errors)
    emit(settings, current, "START")
    try:
        yield current
    except BaseException as e:
        emit(settings, current, "FAIL", error=e)
        raise
    emit(settings, current, "FAIL" if current.failure else "COMPLETE")


class RunWindow:
    """A continuous job's lineage: its batches folded into one run per window of `seconds`.

    A job that runs many times a minute (the incremental identity follower) would write two events per
    batch; instead, the first batch that does work opens a run (START, dated when that batch began),
    later batches add their counts, and `tick()` - called by the job's own loop, outside the writer -
    ends it (COMPLETE, with the sums) once `seconds` have passed. A failing batch ends the open run
    FAIL. `close()` ends it at shutdown. Not thread-safe: one job thread owns a window."""

    def __init__(self, settings: Settings, spec: dict[str, Any], seconds: float):
        self.settings, self.spec, self.seconds = settings, spec, seconds
        self.current: LineageRun | None = None
        self._opened = 0.0

    def _open(self, started_at: datetime) -> LineageRun:
        if self.current is None:
            self.current = LineageRun(self.spec["job"], list(self.spec["inputs"]), list(self.spec["outputs"]))
            self._opened = time.monotonic()
            emit(self.settings, self.current, "START", at=started_at)
        return self.current

    def add(self, started_at: datetime, counts: dict[str, int], totals: dict[str, int]) -> None:
        """One batch that did work: rows it wrote per output table, and numbers to sum in the run's facet."""
        current = self._open(started_at)
        for table, rows in counts.items():
            current.counts[table] = current.counts.get(table, 0) + int(rows)
        for key, value in totals.items():
            current.details[key] = int(current.details.get(key, 0)) + int(value)
        current.details["batches"] = int(current.details.get("batches", 0)) + 1

    def fail(self, started_at: datetime, error: BaseException) -> None:
        """A batch raised: the open run (or a new one for this batch) ends FAIL with the error's type."""
        current = self._open(started_at)
        emit(self.settings, current, "FAIL", error=error)
        self.current = None

    def tick(self) -> None:
        """End the open run when its window has passed."""
        if self.current is not None and time.monotonic() - self._opened >= self.seconds:
            self.close()

    def close(self) -> None:
        if self.current is not None:
            emit(self.settings, self.current, "COMPLETE")
            self.current = None


def error_text(e: BaseException) -> str:
    """What a FAIL event says: our errors' redacted message; only the type of anything else (a
    database error can quote a value from the data)."""
    if isinstance(e, RefineryError):
        return f"{type(e).__name__}: {redact_text(e.message)}"[:_MAX_ERROR]
    return type(e).__name__


def _dataset(name: str, cls: Any, facets: dict[str, Any] | None = None) -> Any:
    if name.startswith(FILE_NAMESPACE + ":"):
        namespace, name = FILE_NAMESPACE, name[len(FILE_NAMESPACE) + 1:]
    else:
        namespace = NAMESPACE
    if facets is None:
        return cls(namespace=namespace, name=name)
    return cls(namespace=namespace, name=name, outputFacets=facets)


def build_event(current: LineageRun, state: str, *, error: BaseException | None = None, at: datetime | None = None) -> Any:
    """The OpenLineage RunEvent for `current` in `state` (START, COMPLETE or FAIL), at `at` (default: now)."""
    from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
    from openlineage.client.facet_v2 import error_message_run, output_statistics_output_dataset

    run_facets: dict[str, Any] = {}
    if current.details:
        run_facets["refinery"] = _facet_class()(details=dict(current.details))
    if error is not None:
        message: str | None = error_text(error) if current.quote_errors else type(error).__name__
    else:
        message = current.failure if state == "FAIL" else None
    if message:
        run_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(message=message, programmingLanguage="python")
    outputs = []
    for name in current.outputs:
        facets = None
        if state != "START" and name in current.counts:
            facets = {"outputStatistics": output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(rowCount=current.counts[name])}
        outputs.append(_dataset(name, OutputDataset, facets))
    return RunEvent(
        eventType=RunState[state],
        eventTime=(at or datetime.now(UTC)).astimezone(UTC).isoformat(),
        run=Run(runId=current.run_id, facets=run_facets),
        job=Job(namespace=NAMESPACE, name=current.job),
        inputs=[_dataset(n, InputDataset) for n in current.inputs],
        outputs=outputs,
        producer=_producer(),
    )


_FACET: list[Any] = []


def _facet_class() -> Any:
    """A custom run facet (`refinery`) carrying the job's own ids and numbers."""
    if not _FACET:
        from openlineage.client.generated.base import RunFacet

        @attr.define
        class RefineryRunFacet(RunFacet):
            details: dict[str, Any] = attr.field(factory=dict)
            _additional_skip_redact: ClassVar[list[str]] = ["details"]

            @staticmethod
            def _get_schema() -> str:
                return _SCHEMA

        _FACET.append(RefineryRunFacet)
    return _FACET[0]


def _producer() -> str:
    from refinery import __version__

    return f"https://github.com/refinery-dmp/refinery/tree/{__version__}"


def _client(kind: str, target: str, timeout: float) -> Any:
    key = (kind, target, timeout)
    with _LOCK:
        if key not in _CLIENTS:
            from openlineage.client import OpenLineageClient
            from openlineage.client.transport.file import FileConfig, FileTransport
            from openlineage.client.transport.http import HttpConfig, HttpTransport

            if kind == "file":
                transport: Any = FileTransport(FileConfig(log_file_path=target, append=True))
            else:
                transport = HttpTransport(HttpConfig(url=target, timeout=timeout, retry={"total": 0, "connect": 0, "read": 0}))
            _CLIENTS[key] = OpenLineageClient(transport=transport, config={})
        return _CLIENTS[key]


def emit(settings: Settings, current: LineageRun, state: str, *, error: BaseException | None = None,
         at: datetime | None = None) -> bool:
    """Send one run event to the file (always) and to `lineage_url` (when set); True when every
    target took it. `at` dates an event sent after the fact (default: now). Failures are logged by
    kind and exception type only, and never raised."""
    try:
        event = build_event(current, state, error=error, at=at)
    except Exception as e:  # noqa: BLE001 - lineage must never fail the job
        log.warning("lineage: could not build the %s event of %s (run %s): %s", state, current.job, current.run_id, type(e).__name__)
        return False
    targets = [("file", str(settings.lineage_path))]
    if settings.lineage_url:
        targets.append(("http", settings.lineage_url))
    ok = True
    for kind, target in targets:
        try:
            if kind == "file":
                settings.lineage_path.parent.mkdir(parents=True, exist_ok=True)
                with _FILE_LOCK:  # one line per event, never interleaved between threads
                    _client(kind, target, settings.lineage_timeout_seconds).emit(event)
            else:
                _client(kind, target, settings.lineage_timeout_seconds).emit(event)
        except Exception as e:  # noqa: BLE001 - lineage must never fail the job
            ok = False
            log.warning("lineage: the %s event of %s (run %s) did not reach the %s target: %s",
                        state, current.job, current.run_id, kind, type(e).__name__)
    return ok


# -- reading the trail --------------------------------------------------------------------------


def read_runs(path: Path) -> list[dict[str, Any]]:
    """The runs in a lineage file, newest first: job, state, start/end, inputs, outputs, counts, details."""
    runs: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return []
    with path.open("rb") as f:
        for line in f:
            try:
                ev = orjson.loads(line)
                run_id = ev["run"]["runId"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue  # a torn last line (a crash mid-write) or a foreign event
            r = runs.setdefault(run_id, {"run_id": run_id, "job": ev.get("job", {}).get("name"), "state": None,
                                         "started_at": None, "ended_at": None, "inputs": [], "outputs": [],
                                         "counts": {}, "details": {}, "error": None})
            state, at = ev.get("eventType"), ev.get("eventTime")
            if state == "START":
                r["started_at"] = at
            else:
                r["ended_at"] = at
            if r["state"] in (None, "START") or state != "START":
                r["state"] = state
            for ds in ev.get("inputs") or []:
                _add(r["inputs"], ds)
            for ds in ev.get("outputs") or []:
                _add(r["outputs"], ds)
                rows = ((ds.get("outputFacets") or {}).get("outputStatistics") or {}).get("rowCount")
                if rows is not None:
                    r["counts"][ds["name"]] = rows
            facets = ev.get("run", {}).get("facets") or {}
            r["details"].update((facets.get("refinery") or {}).get("details") or {})
            if "errorMessage" in facets:
                r["error"] = facets["errorMessage"].get("message")
    return sorted(runs.values(), key=lambda r: r["started_at"] or r["ended_at"] or "", reverse=True)


def _add(names: list[str], ds: dict[str, Any]) -> None:
    name = ds["name"] if ds.get("namespace") != FILE_NAMESPACE else f"{FILE_NAMESPACE}:{ds['name']}"
    if name not in names:
        names.append(name)


def table_trail(settings: Settings, table: str, *, limit: int = 50) -> dict[str, Any]:
    """The runs that read or wrote `table`, newest first."""
    runs = [r for r in read_runs(settings.lineage_path) if table in r["inputs"] or table in r["outputs"]]
    return {"kind": "table", "table": table, "runs": runs[:limit], "total_runs": len(runs)}


_SOURCES_SQL = """
SELECT e.source, e.import_id, i.path AS import_path, i.stored_path, i.file_sha256,
       count(*) AS events, count(e.raw_id) AS raw_messages,
       min(e.received_at) AS first_received, max(e.received_at) AS last_received
FROM event_profiles ep JOIN events e ON e.source = ep.source AND e.message_id = ep.message_id
LEFT JOIN imports i ON i.import_id = e.import_id
WHERE ep.profile_id = ?
GROUP BY e.source, e.import_id, i.path, i.stored_path, i.file_sha256
ORDER BY max(e.received_at) DESC
"""

_MESSAGES_SQL = """
SELECT ep.source, ep.message_id, e.raw_id, e.import_id, e.received_at
FROM event_profiles ep JOIN events e ON e.source = ep.source AND e.message_id = ep.message_id
WHERE ep.profile_id = ?
ORDER BY e.received_at DESC, ep.message_id
LIMIT ?
"""


def profile_trail(settings: Settings, engine: Any, target: str, *, limit: int = 100) -> dict[str, Any]:
    """For a profile (by id, or by one of its identifiers): the resolution runs that produced it,
    and where its events came from (sources, message and raw ids, import files)."""
    from refinery.identity import rules_from_settings
    from refinery.profiles import read

    cursor = engine.reader()
    profile_id = read.survivor(engine, target) if target.startswith("prof_") else None
    if profile_id is None:
        if target.startswith("prof_"):
            raise NotFoundError(f"No profile {target!r}.", fix="Run `refinery identity resolve`, or pass one of its identifiers (type:value).")
        profile_id = read.lookup(engine, target, rules_from_settings(settings))["profile_id"]
    rows = engine.fetch_all("SELECT updated_at FROM profiles WHERE profile_id = ?", [profile_id], cursor=cursor)
    updated = rows[0][0].astimezone(UTC).isoformat() if rows and rows[0][0] is not None else None
    sources = engine.fetch_dicts(_SOURCES_SQL, [profile_id], cursor=cursor)
    messages = engine.fetch_dicts(_MESSAGES_SQL, [profile_id, limit], cursor=cursor)
    for row in (*sources, *messages):
        for key in ("first_received", "last_received", "received_at"):
            if row.get(key) is not None:
                row[key] = row[key].astimezone(UTC).isoformat()
    resolutions = [r for r in read_runs(settings.lineage_path) if "profiles" in r["outputs"]]
    produced = [r for r in resolutions if updated and r["state"] == "COMPLETE" and _within(updated, r["started_at"], r["ended_at"])]
    return {
        "kind": "profile",
        "profile_id": profile_id,
        "updated_at": updated,
        "produced_by": produced,
        "resolution_runs": resolutions[:20],
        "sources": sources,
        "messages": messages,
        "total_events": sum(int(s["events"]) for s in sources),
        "files": sorted({s["stored_path"] for s in sources if s.get("stored_path")}),
    }


def _within(at: str, start: str | None, end: str | None) -> bool:
    """Whether the moment `at` falls in [start, end] (ISO-8601 strings, compared as instants)."""
    if not start or not end:
        return False
    moment = datetime.fromisoformat(at)
    return datetime.fromisoformat(start) <= moment <= datetime.fromisoformat(end)


def is_table(name: str, settings: Settings) -> bool:
    from refinery.storage.query import QUERYABLE_TABLES

    return name in QUERYABLE_TABLES or any(name in r["inputs"] or name in r["outputs"] for r in read_runs(settings.lineage_path))


def trail(settings: Settings, engine: Any, target: str, *, limit: int = 50) -> dict[str, Any]:
    """`refinery lineage TARGET`: a table's runs, or a profile's trail."""
    if is_table(target, settings):
        return table_trail(settings, target, limit=limit)
    try:
        return profile_trail(settings, engine, target, limit=limit)
    except NotFoundError as e:
        raise NotFoundError(
            f"{target!r} is neither a table with lineage nor a known profile: {e.message}",
            fix="Pass a table (events, profiles, identities...), a profile id (prof_...) or an identifier as type:value.",
        ) from e
