"""Batch import: a CSV, JSON lines or Parquet file plus a mapping -> Segment calls in the zones.

The file is recorded in `imports` with its SHA-256. DuckDB then streams it (read_csv / read_parquet; JSON lines are read as lines and parsed in SQL, so a bad
line becomes a failed row instead of stopping the scan) through one SELECT built by
`import_clean.import_select`, which yields rows ready for `events` (cleaned from the typed
columns, no JSON round trip) with a deterministic message id and, for rows that cannot be
loaded, a reason. A reader thread pulls Arrow batches of 61,440 rows (and runs tracking
plans over track rows when a plan applies); the writer takes each batch in one transaction:
drops duplicates, quarantines failed rows (with file and row number) and appends the rest.
Personal fields become the collector's tokens inside the SELECT (`import_pii`); before the writer
sees a chunk, rows of suppressed (erased) people are dropped, failed payloads and personal values
are sealed under each row's subject key, and the rows as read are sealed into the raw zone's
Parquet file (`import_vault`). No clear copy of the file is kept.
See docs/import.md, docs/decisions/0016-sealed-import-raw-zone.md (which supersedes the file copy
of 0003) and 0005-import-from-typed-columns.md.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import functools
import gzip
import logging
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from sqlglot import exp

from refinery.errors import ImportError_, NotFoundError, RefineryError
from refinery.governance import lineage
from refinery.ingest.clean import EVENT_COLUMNS
from refinery.ingest.import_clean import (
    LINE_DELIMITER,
    FileShape,
    ImportContext,
    import_select,
    pii_slots,
    quoted_table,
    reader_relation,
    template,
)
from refinery.ingest.import_pii import PiiSql, bind
from refinery.ingest.import_vault import ChunkPrivacy, SealedRawWriter, file_sha256, raw_path
from refinery.ingest.mapping import column_uses, validate_mapping
from refinery.ingest.replay import with_pending
from refinery.privacy.tokens import PiiValue
from refinery.privacy.vault import Vault
from refinery.storage.duckdb_engine import capped_memory
from refinery.storage.engine import Engine

if TYPE_CHECKING:
    from refinery.runtime import Runtime

log = logging.getLogger(__name__)

CHUNK_ROWS = 61_440  # half a DuckDB row group: bounded memory with one chunk read, one prepared, one in the writer (decision 0016)
_EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
               ".parquet": "parquet", ".pq": "parquet"}
#: Imports running in this process (the only one that can write the store): any other import
#: recorded as new/started was cut off by a stop and is reported, then marked, as interrupted.
_RUNNING: set[str] = set()
_RUNNING_LOCK = threading.Lock()
#: One import per source at a time, so their duplicate checks see each other's rows.
_SOURCE_LOCKS: dict[str, threading.Lock] = {}

Progress = Callable[[dict[str, Any]], None]


@dataclass
class ImportJob:
    """One import and its counters; moves through new -> started -> completed | failed."""

    import_id: str
    source: str
    path: str
    status: str = "new"
    rows_read: int = 0
    rows_loaded: int = 0
    rows_duplicate: int = 0
    rows_failed: int = 0
    #: Rows of people on the suppression list (erased): neither loaded nor quarantined, nothing kept.
    #: Not a column of `imports`: every row read is loaded, a duplicate, failed or suppressed, so
    #: `get_import` derives it from the other counters.
    rows_suppressed: int = 0
    error: str | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None
    format: str = ""
    file_sha256: str = ""
    stored_path: str | None = None
    rows_total: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("started_at", "finished_at"):
            d[k] = d[k].isoformat() if d[k] else None
        return d


# --- looking at the file -----------------------------------------------------------------------

def detect_format(path: Path, mapping: dict[str, Any]) -> str:
    if mapping.get("format"):
        return str(mapping["format"])
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".zst"):
        suffixes = suffixes[:-1]
    fmt = _EXTENSIONS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise ImportError_(
            f"Cannot tell the format of {path.name} from its extension.",
            fix="Rename it to .csv, .jsonl or .parquet, or set format: csv | jsonl | parquet in the mapping.",
            field="format",
        )
    return fmt


def _read_header(path: Path, encoding: str, skip: int, max_bytes: int = 1 << 20) -> str:
    """The header line as text (after `skip` lines). Only the head of the file is read and decoded:
    a bad byte further down is the reader's business, reported with its row."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rb") as f:
        head = f.read(max_bytes)
    py_enc = {"utf-8": "utf-8-sig", "utf-16": "utf-16", "latin-1": "latin-1"}[encoding]
    text = head.decode(py_enc, errors="replace")
    lines = text.splitlines()
    line = lines[skip] if len(lines) > skip else ""
    if "\ufffd" in line:
        raise ImportError_(
            f"The header of {path.name} is not valid {encoding}.",
            fix="Set encoding in the mapping (e.g. encoding: latin-1), or save the file as UTF-8.", field="encoding",
        )
    return line


def inspect_file(engine: Engine, path: Path, fmt: str, mapping: dict[str, Any]) -> FileShape:
    """Read only what is needed to check the mapping: the CSV header, Parquet schema, or the keys of
    the first JSON lines. Raises ImportError_ when a mapped column is missing."""
    opts = mapping["csv"]
    if fmt == "csv":
        line = _read_header(path, mapping["encoding"], opts["skip"])
        try:
            reader = csv.reader([line], delimiter=opts["delimiter"], quotechar=opts["quote"] or None,
                                escapechar=None if opts["escape"] in ("", opts["quote"]) else opts["escape"],
                                doublequote=opts["escape"] == opts["quote"])
            header = next(reader, None)
        except csv.Error as e:
            raise ImportError_(f"Cannot read the header of {path.name}: {e}.", fix="Check csv.delimiter and csv.quote.") from e
        if not header:
            raise ImportError_(f"{path.name} is empty: no header line.", fix="Export the file with a header line naming the columns.")
        names = [h.strip() for h in header]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes or "" in names:
            raise ImportError_(
                f"The header of {path.name} has {'duplicate columns ' + ', '.join(map(repr, dupes)) if dupes else 'an empty column name'}.",
                fix="Give every column a distinct, non-empty name in the header line.",
            )
        columns = {n: "VARCHAR" for n in names}
        shape = FileShape("csv", columns, header_lines=1 + opts["skip"])
    elif fmt == "parquet":
        try:
            rows = engine.fetch_all("DESCRIBE SELECT * FROM read_parquet(?)", [str(path)], cursor=engine.reader())
        except RefineryError as e:
            raise ImportError_(f"{path.name} is not a readable Parquet file.", fix="Check the file, or set format in the mapping.") from e
        shape = FileShape("parquet", {r[0]: r[1] for r in rows})
    else:
        keys = engine.fetch_all(
            "SELECT DISTINCT unnest(json_keys(_line)) FROM (SELECT _line FROM read_csv(?, delim = ?, quote = '', escape = '', "
            "header = false, encoding = ?, auto_detect = false, columns = {'_line': 'VARCHAR'}, ignore_errors = true) "
            "WHERE CASE WHEN json_valid(_line) THEN json_type(_line) = 'OBJECT' ELSE false END LIMIT 1000)",
            [str(path), LINE_DELIMITER, mapping["encoding"]], cursor=engine.reader(),
        )
        shape = FileShape("jsonl", {k[0]: "JSON" for k in keys})
    _check_columns(path, shape, mapping)
    return shape


def _check_columns(path: Path, shape: FileShape, mapping: dict[str, Any]) -> None:
    existing = list(shape.columns)
    for col, key in column_uses(mapping).items():
        if col in existing:
            continue
        close = difflib.get_close_matches(col, existing, n=1, cutoff=0.5)
        if not close:
            close = [c for c in existing if c.lower() == col.lower()]
        hint = f" Did you mean {close[0]!r}?" if close else ""
        seen = "its first lines have the keys" if shape.format == "jsonl" else "it has the columns"
        raise ImportError_(
            f"Column {col!r} (mapped by {key}) is not in {path.name}; {seen}: {', '.join(existing) or 'none'}.{hint}",
            fix=f"Change {key} in the mapping to one of those columns (names are case-sensitive).",
            field=key, column=col, columns=existing,
        )


# --- running an import -------------------------------------------------------------------------

@dataclass
class _Plan:
    job: ImportJob
    mapping: dict[str, Any]
    shape: FileShape
    original: Path


def _prepare(runtime: Runtime, path: str | Path, source: str, mapping: dict[str, Any]) -> _Plan:
    """Everything that can refuse an import, before anything is written."""
    spec = validate_mapping(mapping)
    p = Path(path)
    if not p.is_file():
        raise ImportError_(f"{p} does not exist or is not a file.", fix="Pass the path of a CSV, JSON lines or Parquet file.", field="path")
    fmt = detect_format(p, spec)
    shape = inspect_file(runtime.engine, p, fmt, spec)
    job = ImportJob(import_id="imp_" + uuid.uuid4().hex[:16], source=source, path=str(p), format=fmt)
    recover_interrupted(runtime)
    runtime.writer.call(lambda e: _record_start(runtime, e, job, spec))
    return _Plan(job, spec, shape, p)


def _record_start(runtime: Runtime, engine: Engine, job: ImportJob, mapping: dict[str, Any]) -> None:
    runtime.sources.ensure(engine, job.source, "import")
    job.status = "started"
    engine.execute(
        "INSERT INTO imports (import_id, source, path, stored_path, file_sha256, format, mapping, status, started_at) "
        "VALUES (?, ?, ?, NULL, '', ?, ?, ?, ?)",
        [job.import_id, job.source, job.path, job.format, orjson.dumps(mapping).decode(), job.status, job.started_at],
    )


def run_import(runtime: Runtime, path: str | Path, *, source: str, mapping: dict[str, Any], progress: Progress | None = None) -> ImportJob:
    """Import a file synchronously; returns the finished job (status completed or failed).

    Raises ImportError_ / ConfigurationError when the import cannot start (bad mapping, missing
    file or column); failures after that are recorded on the job."""
    plan = _prepare(runtime, path, source, mapping)
    _execute(runtime, plan, progress)
    return plan.job


def start_import(runtime: Runtime, path: str | Path, *, source: str, mapping: dict[str, Any]) -> ImportJob:
    """Check the import and start it in a background thread; returns the job with status 'started'."""
    plan = _prepare(runtime, path, source, mapping)
    snapshot = ImportJob(**{**asdict(plan.job)})
    thread = threading.Thread(target=_execute, args=(runtime, plan, None), name=f"import-{plan.job.import_id}", daemon=True)
    thread.start()
    return snapshot


def get_import(engine: Engine, import_id: str) -> ImportJob:
    with _RUNNING_LOCK:  # before reading: an import that finishes between the two looks 'started' in the read
        running_before = import_id in _RUNNING
    rows = engine.fetch_dicts(
        "SELECT import_id, source, path, status, rows_read, rows_loaded, rows_duplicate, rows_failed, error, started_at, "
        "finished_at, format, file_sha256, stored_path FROM imports WHERE import_id = ?",
        [import_id], cursor=engine.reader(),
    )
    if not rows:
        raise NotFoundError(f"No import with id {import_id!r}.", fix="List imports with: refinery query \"SELECT * FROM imports\"")
    job = ImportJob(**rows[0])
    job.rows_suppressed = max(job.rows_read - job.rows_loaded - job.rows_duplicate - job.rows_failed, 0)
    with _RUNNING_LOCK:
        cut_off = job.status in ("new", "started") and not running_before and job.import_id not in _RUNNING
    if cut_off:  # not marked yet (that happens when the next import starts): say what it is
        job.status = "interrupted"
        job.error = f"The import stopped before it finished (the server or command was stopped) after {job.rows_read} rows. {_INTERRUPTED_FIX}"
    return job


def _execute(runtime: Runtime, plan: _Plan, progress: Progress | None) -> None:
    job = plan.job
    with _RUNNING_LOCK:
        _RUNNING.add(job.import_id)
        source_lock = _SOURCE_LOCKS.setdefault(job.source, threading.Lock())
    try:
        with source_lock, lineage.run(runtime.settings, job="ingest.import", inputs=[f"file:{plan.original}"],
                                      outputs=["events", "failed_events", "imports"]) as run:
            _run_locked(runtime, plan, progress)
            run.record_import(job)
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(job.import_id)


def _run_locked(runtime: Runtime, plan: _Plan, progress: Progress | None) -> None:
    job = plan.job
    raw: SealedRawWriter | None = None
    try:
        sha = file_sha256(plan.original)
        stored = raw_path(runtime.settings.raw_files_dir, sha)
        job.file_sha256, job.stored_path = sha, str(stored)
        runtime.writer.call(lambda e: e.execute(
            "UPDATE imports SET file_sha256 = ?, stored_path = ? WHERE import_id = ?", [sha, str(stored), job.import_id]))
        # The raw zone is content-addressed: a file whose rows an earlier import sealed is not sealed again.
        raw = None if stored.exists() else SealedRawWriter(runtime.vault, stored)
        # A streaming job: DuckDB needs little for it, and at a high limit it would keep every block
        # it writes cached (docs/decisions/0012-memory-policy.md).
        with capped_memory(runtime.engine, runtime.settings.duckdb_steady_memory_limit):
            _stream(runtime, plan, plan.original, progress, raw)
        if raw is not None:
            raw.commit()
        job.status = "completed"
    except Exception as e:  # recorded on the job; the caller (CLI, API poller) shows it
        if raw is not None:
            raw.abort()
        job.status = "failed"
        job.error = e.message if isinstance(e, RefineryError) else f"{type(e).__name__}: {e}"
        log.error("import %s failed: %s", job.import_id, type(e).__name__)
    job.finished_at = datetime.now(UTC)
    try:
        runtime.writer.call(lambda e: _save_counts(e, job))
    except Exception:  # noqa: BLE001 - the store itself is failing; the job object still says why
        log.exception("import %s: could not record its final status", job.import_id)
    if progress:
        progress(job.to_dict())


def _save_counts(engine: Engine, job: ImportJob) -> None:
    engine.execute(
        "UPDATE imports SET status = ?, rows_read = ?, rows_loaded = ?, rows_duplicate = ?, rows_failed = ?, error = ?, "
        "finished_at = ? WHERE import_id = ?",
        [job.status, job.rows_read, job.rows_loaded, job.rows_duplicate, job.rows_failed, job.error, job.finished_at, job.import_id],
    )


_INTERRUPTED_FIX = ("Import the file again to finish it: rows already loaded count as duplicates, so nothing is "
                    "loaded twice.")


def recover_interrupted(runtime: Runtime) -> int:
    """Mark imports that were cut off by a stop (status new/started, not running in this process)
    as `interrupted`, with how to finish them; returns how many. Safe to call at any time."""
    with _RUNNING_LOCK:
        running = sorted(_RUNNING)

    def mark(engine: Engine) -> int:
        rows = engine.fetch_all(
            "UPDATE imports SET status = 'interrupted', finished_at = now(), "
            "error = 'The import stopped before it finished (the server or command was stopped) after ' || rows_read || "
            "' rows. ' || ? WHERE status IN ('new', 'started') AND NOT list_contains(?, import_id) RETURNING import_id",
            [_INTERRUPTED_FIX, running],
        )
        return len(rows)

    n = runtime.writer.call(mark)
    if n:
        log.warning("%d interrupted import(s) marked; import their files again to finish them", n)
    return n


# --- numbering rows by their line in the file ----------------------------------------------------

@dataclass
class LineScan:
    """What one sequential pass over a text file learns: its line count, its blank lines
    (1-based), and whether the quote character occurs at all (else no value spans lines)."""

    lines: int = 0
    blanks: list[int] = field(default_factory=list)
    has_quote: bool = False


def _blank_starts(block: bytes, after_newline: bool) -> list[int]:
    """Offsets in `block` where a blank line ("\\n" or "\\r\\n" alone) begins; C-speed finds, no regex."""
    found: list[int] = []
    if after_newline and (block.startswith(b"\n") or block.startswith(b"\r\n")):
        found.append(0)
    for pattern in (b"\n\n", b"\n\r\n"):
        i = block.find(pattern)
        while i >= 0:
            found.append(i + 1)
            i = block.find(pattern, i + 1)
    return sorted(found)


def scan_lines(path: Path, encoding: str, quote: str) -> LineScan:
    """Count lines and find blank ones, reading the file once in large blocks."""
    scan = LineScan()
    opener: Callable[..., Any] = gzip.open if path.suffix.lower() == ".gz" else open
    if encoding == "utf-16":  # not byte-oriented: decode (rare, and slower)
        with opener(path, "rt", encoding="utf-16", newline="") as text:
            for n, line in enumerate(text, 1):
                scan.lines = n
                if line in ("\n", "\r\n", "\r"):
                    scan.blanks.append(n)
                scan.has_quote = scan.has_quote or (bool(quote) and quote in line)
        return scan
    q = quote.encode("latin-1") if quote else b""
    after_newline = True  # the start of the file is the start of a line
    with opener(path, "rb") as f:
        while block := f.read(1 << 22):
            base, pos, counted = scan.lines, 0, 0
            for start in _blank_starts(block, after_newline):
                counted += block.count(b"\n", pos, start)
                pos = start
                scan.blanks.append(base + counted + 1)
            scan.lines += block.count(b"\n")
            scan.has_quote = scan.has_quote or (bool(q) and q in block)
            after_newline = block.endswith(b"\n")
    if not after_newline:
        scan.lines += 1  # a last line without a line break
    return scan


class RowNumbers:
    """Gives each accepted row its line number as the CSV reader counts lines (the header is line 1,
    each blank line counts one, a record whose quoted values span lines counts one): the physical
    line unless quoted values span lines. The reader skips blank lines and rejected records, so
    they are put back here; `rejects` are the reader's own line numbers of rejected records
    (known when there are blank lines; otherwise they are put back after the scan)."""

    def __init__(self, first: int, blanks: list[int] | None = None, rejects: list[tuple[int, int]] | None = None):
        self.line = first      # the line number of the next row
        self.phys = first      # the physical line where it starts
        self.blanks = blanks or []
        self.rejects = rejects or []  # (line, physical lines it spans)
        self.bi = self.ri = 0

    def assign(self, n: int, newlines: np.ndarray | None) -> np.ndarray:
        out = np.empty(n, np.int64)
        multi = np.flatnonzero(newlines) if newlines is not None else np.empty(0, np.int64)
        mi, i = 0, 0
        while i < n:
            self._skip_gaps()
            steps = n - i
            if self.bi < len(self.blanks):
                steps = min(steps, self.blanks[self.bi] - self.phys)
            if self.ri < len(self.rejects):
                steps = min(steps, self.rejects[self.ri][0] - self.line)
            if mi < len(multi):
                steps = min(steps, int(multi[mi]) - i)
            if steps > 0:
                out[i:i + steps] = np.arange(self.line, self.line + steps)
                self.line += steps
                self.phys += steps
                i += steps
                continue
            # row i spans several physical lines
            assert newlines is not None and mi < len(multi) and multi[mi] == i
            out[i] = self.line
            self.line += 1
            self.phys += 1 + int(newlines[i])
            mi += 1
            i += 1
        return out

    def _skip_gaps(self) -> None:
        while True:
            if self.ri < len(self.rejects) and self.rejects[self.ri][0] == self.line:
                self.line += 1
                self.phys += self.rejects[self.ri][1]
                self.ri += 1
            elif self.bi < len(self.blanks) and self.blanks[self.bi] < self.phys:
                self.bi += 1  # inside a quoted value of an earlier record
            elif self.bi < len(self.blanks) and self.blanks[self.bi] == self.phys:
                self.line += 1
                self.phys += 1
                self.bi += 1
            else:
                return


# --- duplicates inside one file ------------------------------------------------------------------

class SeenIds:
    """Message ids this import has already met, as a fixed-size Bloom filter over their 64-bit
    hashes: memory stays at `bits / 8` bytes whatever the file's size. A hit is only a candidate;
    the writer confirms it against this import's rows (false positives cost a query, never a row)."""

    def __init__(self, bits_log2: int = 28, k: int = 3):
        self.mask = np.uint64((1 << bits_log2) - 1)
        self.bits = np.zeros(1 << (bits_log2 - 3), np.uint8)
        self.k = k

    def _positions(self, h: np.ndarray) -> list[np.ndarray]:
        a = h & self.mask
        b = (h >> np.uint64(32)) | np.uint64(1)
        return [(a + np.uint64(i) * b) & self.mask for i in range(self.k)]

    def seen(self, h: np.ndarray) -> np.ndarray:
        hit = np.ones(len(h), bool)
        for p in self._positions(h):
            hit &= (self.bits[p >> np.uint64(3)] >> (p & np.uint64(7)).astype(np.uint8)) & 1 == 1
        return hit

    def add(self, h: np.ndarray) -> None:
        for p in self._positions(h):
            np.bitwise_or.at(self.bits, p >> np.uint64(3), (np.uint8(1) << (p & np.uint64(7)).astype(np.uint8)))


def _first_in_chunk(ids: list[str | None], h: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """True for rows whose message id occurred earlier in the same chunk (first one wins)."""
    dup = np.zeros(len(h), bool)
    idx = np.flatnonzero(valid)
    if not len(idx):
        return dup
    _, first, counts = np.unique(h[idx], return_index=True, return_counts=True)
    if (counts == 1).all():
        return dup
    shared = set(h[idx][first[counts > 1]].tolist())
    seen: set[str] = set()
    for i in idx:
        if int(h[i]) in shared:
            mid = ids[i]
            assert mid is not None
            if mid in seen:
                dup[i] = True
            seen.add(mid)
    return dup


# --- streaming -----------------------------------------------------------------------------------

_DONE = object()


@dataclass
class _Chunk:
    rows: pa.Table
    in_chunk_dup: np.ndarray
    candidates: np.ndarray  # the Bloom filter saw the id in an earlier chunk
    vault_rows: pa.Table  # sealed personal values of rows certain to load (not candidates)
    privacy: ChunkPrivacy
    suppressed: int = 0  # rows of suppressed people, dropped before the chunk was made


def _plan_mode(runtime: Runtime, mapping: dict[str, Any], source: str) -> str | None | bool:
    """The source's unplanned-events mode when tracking plans apply to this import, else False."""
    if mapping["type"] != "track":
        return False
    mode = runtime.sources.get(source).unplanned_events
    return mode if runtime.plans.applies_to(mode) else False


def _stream(runtime: Runtime, plan: _Plan, stored: Path, progress: Progress | None, raw: SealedRawWriter | None = None) -> None:
    job, engine, shape = plan.job, runtime.engine, plan.shape
    rejects = "_rejects_" + job.import_id
    numbers: RowNumbers
    known_rejects = False
    if shape.format == "parquet":
        job.rows_total = int(engine.fetch_all("SELECT sum(num_rows) FROM parquet_file_metadata(?)", [str(stored)],
                                              cursor=engine.reader())[0][0] or 0)
        numbers = RowNumbers(1)
    else:
        scan = scan_lines(stored, plan.mapping["encoding"], plan.mapping["csv"]["quote"] if shape.format == "csv" else "")
        blanks = [b for b in scan.blanks if b > shape.header_lines]
        job.rows_total = max(scan.lines - shape.header_lines - len(blanks), 0)
        if shape.format == "csv" and blanks:
            shape = dataclasses.replace(shape, count_newlines=scan.has_quote)
            known_rejects = True
            numbers = RowNumbers(shape.header_lines + 1, blanks, _reader_rejects(engine, shape, plan.mapping, stored, rejects + "_pre"))
        else:
            numbers = RowNumbers(shape.header_lines + 1)
    mode = _plan_mode(runtime, plan.mapping, job.source)
    policy = runtime.vault.policy
    pii = PiiSql()
    ctx = ImportContext(job.source, job.import_id, job.started_at, runtime.clean_rules, with_payload=mode is not False,
                        policy=policy, pii=pii, with_original=raw is not None)
    relation, params = reader_relation(shape, plan.mapping, str(stored), rejects)
    select = import_select(plan.mapping, shape, ctx, relation)
    privacy = ChunkPrivacy(runtime.vault, runtime.engine, job.source, job.file_sha256, pii_slots(plan.mapping, policy),
                           sealer=raw.sealer if raw is not None else None)

    chunks: queue.Queue[Any] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        cursor = engine.reader()
        try:
            with bind(cursor, runtime.vault.tokens, pii):
                for rows in _batches(engine, cursor, select, params, numbers):
                    if mode is not False:
                        rows = _check_plans(runtime, rows, mode)
                    while not stop.is_set():
                        try:
                            chunks.put(rows, timeout=0.2)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            rejected = None
            if shape.format in ("csv", "jsonl"):
                rejected = engine.fetch_arrow(_rejects_sql(rejects), cursor=cursor)
                for name in (rejects, rejects + "_scan"):
                    engine.execute(template("DROP TABLE IF EXISTS __t", t=quoted_table(name)), cursor=cursor)
            chunks.put(("rejects", rejected))
        except BaseException as e:  # handed to the consumer, which raises it
            chunks.put(("error", e))

    producer = threading.Thread(target=produce, name=f"import-read-{job.import_id}", daemon=True)
    producer.start()
    seen = SeenIds()
    prefill(engine, seen, job.source)
    writing = _Pipeline(runtime, progress, job)
    try:
        while True:
            item = chunks.get()
            if isinstance(item, tuple):
                kind, value = item
                if kind == "error":
                    raise value
                writing.drain()
                if value is not None and value.num_rows:
                    runtime.writer.call(functools.partial(_write_rejects, job=job, plan=plan, rejected=value, shift=not known_rejects,
                                                          vault=runtime.vault))
                    if progress:
                        progress(job.to_dict())
                break
            rows = item
            # People on the suppression list (erased) are not imported: nothing of theirs is kept.
            blocked = privacy.suppressed(rows)
            if blocked.any():
                rows = rows.filter(pa.array(~blocked))
            h = rows.column("_h").to_numpy(zero_copy_only=False).astype(np.uint64, copy=False)
            valid = rows.column("message_id").is_valid().to_numpy(zero_copy_only=False)
            ids = rows.column("message_id").to_pylist() if valid.any() else []
            in_chunk, candidates = _first_in_chunk(ids, h, valid), seen.seen(h) & valid
            # Rows certain to load (no reason, not seen before): their personal values are sealed
            # here, outside the writer; the writer seals the few loaded candidates itself.
            loads = valid & ~in_chunk & ~candidates & ~rows.column("_reason").is_valid().to_numpy(zero_copy_only=False)
            prepared = privacy.prepare(rows, loads)
            del rows, item
            if raw is not None:
                as_read = prepared.rows.select(["_key_id", "row_number", "_orig", "_reason"])
                blank_rows = pc.fill_null(pc.equal(as_read.column("_reason"), "blank_line"), False)
                raw.add(as_read.filter(pc.invert(blank_rows)) if pc.any(blank_rows).as_py() else as_read)
                prepared.rows = prepared.rows.drop_columns(["_orig"])  # sealed now: not held while the writer works
            chunk = _Chunk(prepared.rows, in_chunk, candidates, prepared.vault_rows, privacy, int(blocked.sum()))
            seen.add(h[valid])
            writing.submit(functools.partial(_write_chunk, job=job, chunk=chunk))
            del chunk, prepared
        writing.drain()
    finally:
        stop.set()
        writing.abandon()
        producer.join(30)


class _Pipeline:
    """At most one chunk in the writer while the next is prepared (sealing, key ids) here: the
    writer's transaction (DuckDB, which lets go of the GIL) overlaps this thread's Python work
    instead of alternating with it. Chunks are written in order (the writer is one FIFO thread), so
    each chunk's duplicate check sees every earlier chunk."""

    def __init__(self, runtime: Runtime, progress: Progress | None, job: ImportJob):
        self.runtime, self.progress, self.job = runtime, progress, job
        self.pending: Future[None] | None = None

    def submit(self, fn: Callable[[Engine], None]) -> None:
        self.drain()
        if not self.runtime.writer.running:  # no writer thread (tests): inline, in its own transaction
            self.runtime.writer.call(fn)
            self._progressed()
            return
        self.pending = self.runtime.writer.submit(fn)

    def drain(self) -> None:
        """Wait for the chunk in the writer; its error is raised here."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()
            self._progressed()

    def abandon(self) -> None:
        """After a failure: let the chunk in the writer finish (its error, if any, is not the one that matters)."""
        if self.pending is not None:
            with suppress(Exception):
                self.pending.result()
            self.pending = None

    def _progressed(self) -> None:
        if self.progress:
            self.progress(self.job.to_dict())


def _rejects_sql(table: str) -> Any:
    """The reader's rejects, one row per line (the most telling error first)."""
    return template(
        "SELECT line, arg_min(error_type, _rank) AS error_type, arg_min(column_name, _rank) AS column_name, "
        "arg_min(csv_line, _rank) AS csv_line FROM (SELECT *, CASE error_type WHEN 'UNQUOTED VALUE' THEN 0 "
        "WHEN 'INVALID ENCODING' THEN 1 ELSE 2 END AS _rank FROM __t) GROUP BY line ORDER BY line",
        t=quoted_table(table),
    )


def _reader_rejects(engine: Engine, shape: FileShape, mapping: dict[str, Any], stored: Path, table: str) -> list[tuple[int, int]]:
    """Scan the file once for the records the reader rejects: (line, physical lines spanned), so rows
    can be numbered while they stream (needed only when blank lines shift the numbering)."""
    cursor = engine.reader()
    relation, params = reader_relation(shape, mapping, str(stored), table)
    engine.fetch_all(template("SELECT count(*) FROM __r", r=relation), params, cursor=cursor)
    rejected = engine.fetch_arrow(_rejects_sql(table), cursor=cursor)
    for name in (table, table + "_scan"):
        engine.execute(template("DROP TABLE IF EXISTS __t", t=quoted_table(name)), cursor=cursor)
    return [(int(line), 1 + (text or "").strip("\r\n").count("\n"))
            for line, text in zip(rejected.column("line").to_pylist(), rejected.column("csv_line").to_pylist(), strict=True)]


def _batches(engine: Engine, cursor: Any, select: Any, params: list[Any], numbers: RowNumbers) -> Iterator[pa.Table]:
    reader = engine.stream_arrow(select, params, batch_size=CHUNK_ROWS, cursor=cursor)
    for batch in reader:
        if batch.num_rows == 0:
            continue
        nl = batch.column("_nl").to_numpy(zero_copy_only=False)
        rows = pa.Table.from_batches([batch]).append_column(
            "row_number", pa.array(numbers.assign(batch.num_rows, nl if nl.any() else None), pa.int64()))
        yield rows


def _check_plans(runtime: Runtime, rows: pa.Table, mode: str | None | bool) -> pa.Table:
    """Tracking plans over track rows that are otherwise loadable, as the collector checks them."""
    unplanned = mode if isinstance(mode, str) else None
    cols = {c: rows.column(c).to_pylist() for c in ("_reason", "_message", "_field", "_stage", "event", "payload")}
    changed = False
    for i, reason in enumerate(cols["_reason"]):
        if reason is not None:
            continue
        # The payload's properties, as found: plans check values, as at the collector, not their tokens.
        payload = cols["payload"][i]
        props = orjson.loads(payload).get("properties") if payload else None
        failure = runtime.plans.check(
            {"type": "track", "event": cols["event"][i], "properties": props if isinstance(props, dict) else {}}, unplanned)
        if failure is not None:
            changed = True
            cols["_reason"][i], cols["_message"][i], cols["_field"][i], cols["_stage"][i] = (
                failure.reason, failure.message, failure.field, failure.stage)
    if not changed:
        return rows
    for c in ("_reason", "_message", "_field", "_stage"):
        rows = rows.set_column(rows.schema.get_field_index(c), c, pa.array(cols[c], pa.string()))
    return rows


_INSERT_EVENTS = exp.insert(
    exp.select(*EVENT_COLUMNS).from_("_imp_chunk").where("_ok"), "events", columns=list(EVENT_COLUMNS)
)
#: Failed rows keep their payload sealed under their subject's key (`payload` stays NULL).
_INSERT_FAILED = (
    "INSERT INTO failed_events (failure_id, raw_id, source, message_id, stage, reason, message, field, payload, "
    "received_at, failed_at, import_id, file, row_number, key_id, sealed) SELECT nextval('failed_event_seq'), NULL, source, "
    "message_id, _stage, _reason, _message, _field, NULL, received_at, now(), import_id, ?, row_number, _key_id, _sealed "
    "FROM _imp_chunk WHERE _fail"
)
_INSERT_VAULT = (
    "INSERT INTO vault_values (token, key_id, kind, sealed, first_seen) SELECT token, key_id, kind, sealed, ? "
    "FROM _imp_vault ON CONFLICT DO NOTHING"
)
#: Rows quarantined by an earlier import and loaded now (the file was fixed): no longer pending.
_RESOLVE = with_pending(
    "UPDATE failed_events SET replay_status = 'loaded', replayed_at = now(), replay_count = replay_count + 1 "
    "WHERE source = ? AND __pending AND import_id IS DISTINCT FROM ? "
    "AND message_id IN (SELECT message_id FROM _imp_chunk WHERE _ok AND _was_failed)"
)


def _write_chunk(engine: Engine, job: ImportJob, chunk: _Chunk) -> None:
    """One chunk, inside one writer transaction: drop duplicates, quarantine failed rows, load the rest."""
    rows = chunk.rows
    file = Path(job.path).name
    reason = rows.column("_reason")
    has_reason = reason.is_valid().to_numpy(zero_copy_only=False)
    blank = pc.fill_null(pc.equal(reason, "blank_line"), False).to_numpy(zero_copy_only=False)
    ids = rows.column("message_id")
    no_id = ~ids.is_valid().to_numpy(zero_copy_only=False) & ~blank
    dup = chunk.in_chunk_dup.copy()
    was_failed = np.zeros(rows.num_rows, bool)

    check = chunk.candidates & ~dup
    if check.any():  # the filter's candidates: really loaded or quarantined before?
        cand = pc.filter(ids, pa.array(check)).to_pylist()
        loaded, failed_before, failed_here, prior = set(), set(), set(), set()
        earlier = []
        for mid, where, imp, payload, key_id, sealed in engine.fetch_all(_KNOWN, [job.source, cand, job.source, cand]):
            if where == "events":
                loaded.add(mid)
            elif imp == job.import_id:
                failed_here.add(mid)  # an earlier row of this file: the first one wins
            else:
                failed_before.add(mid)
                earlier.append((mid, payload, key_id, sealed))
        # Sealed payloads are opened to compare (an erased person's are not: theirs can never match).
        opened = chunk.privacy.vault.unseal_many([e[2] for e in earlier], [e[3] for e in earlier])
        for (mid, payload, _, _), plain in zip(earlier, opened, strict=True):
            prior.add((mid, payload if plain is None else plain.decode()))
        mids = ids.to_pylist()
        payloads = rows.column("payload").to_pylist() if prior else []
        for i in np.flatnonzero(check):
            mid = mids[i]
            if mid in loaded or mid in failed_here:
                dup[i] = True
            elif mid in failed_before:
                was_failed[i] = True
                # failing again as before (same payload): already quarantined
                if has_reason[i] and ((mid, payloads[i]) in prior or (mid, _canonical(payloads[i])) in prior):
                    dup[i] = True
    if no_id.any():  # rows without a key are known by the file's hash and their row number
        numbers = pc.filter(rows.column("row_number"), pa.array(no_id)).to_pylist()
        done = {r[0] for r in engine.fetch_all(
            "SELECT DISTINCT f.row_number FROM failed_events f JOIN imports i ON i.import_id = f.import_id "
            "WHERE f.source = ? AND f.message_id IS NULL AND i.file_sha256 = ? AND list_contains(?, f.row_number)",
            [job.source, job.file_sha256, numbers])}
        if done:
            dup |= no_id & pc.is_in(rows.column("row_number"), pa.array(sorted(done), pa.int64())).to_numpy(zero_copy_only=False)

    live = ~dup & ~blank
    ok = live & ~has_reason
    fail = live & has_reason
    table = rows.append_column("_ok", pa.array(ok)).append_column("_fail", pa.array(fail)).append_column(
        "_was_failed", pa.array(was_failed))
    engine.register("_imp_chunk", table)
    try:
        if ok.any():
            engine.execute(_INSERT_EVENTS)
            _store_values(engine, chunk, ok)
        if fail.any():
            engine.execute(_INSERT_FAILED, [file])
        if (ok & was_failed).any():
            engine.execute(_RESOLVE, [job.source, job.import_id])
    finally:
        with suppress(Exception):  # an aborted transaction: the error that matters is the one raised
            engine.unregister("_imp_chunk")
    n_blank = int(blank.sum())
    job.rows_suppressed += chunk.suppressed
    job.rows_read += rows.num_rows - n_blank + chunk.suppressed
    job.rows_duplicate += int((dup & ~blank).sum())
    job.rows_failed += int(fail.sum())
    job.rows_loaded += int(ok.sum())
    _save_counts(engine, job)


def _store_values(engine: Engine, chunk: _Chunk, ok: np.ndarray) -> None:
    """The sealed personal values of the loaded rows: those sealed before the writer (rows certain to
    load), and those of loaded rows the Bloom filter had flagged, sealed now."""
    if chunk.vault_rows.num_rows:
        engine.register("_imp_vault", chunk.vault_rows)
        try:
            engine.execute(_INSERT_VAULT, [datetime.now(UTC)])
        finally:
            with suppress(Exception):
                engine.unregister("_imp_vault")
    late = ok & chunk.candidates
    if late.any() and chunk.privacy.slots:
        pairs = chunk.privacy.pairs(engine, chunk.rows, late)
        values = [(k, PiiValue(t, kind, n)) for t, k, kind, n in zip(
            *(pairs.column(c).to_pylist() for c in ("token", "key_id", "kind", "normal")), strict=True)]
        chunk.privacy.vault.put_values(engine, values)


_KNOWN = (
    "SELECT message_id, 'events', NULL, NULL, NULL, NULL FROM events WHERE source = ? AND list_contains(?, message_id) "
    "UNION ALL SELECT message_id, 'failed', import_id, CAST(payload AS VARCHAR), key_id, sealed FROM failed_events "
    "WHERE source = ? AND list_contains(?, message_id)"
)


def prefill(engine: Engine, seen: SeenIds, source: str) -> int:
    """Put the source's loaded and quarantined message ids into the filter (streamed: bounded memory)."""
    n = 0
    reader = engine.stream_arrow(
        "SELECT hash(message_id) AS h FROM events WHERE source = ? UNION ALL "
        "SELECT hash(message_id) FROM failed_events WHERE source = ? AND message_id IS NOT NULL",
        [source, source], batch_size=1 << 20, cursor=engine.reader(),
    )
    for batch in reader:
        h = batch.column(0).to_numpy(zero_copy_only=False).astype(np.uint64, copy=False)
        seen.add(h)
        n += len(h)
    return n


def _canonical(payload: str | None) -> str | None:
    """A payload as DuckDB's JSON column gives it back (it is stored as JSON)."""
    return None if payload is None else orjson.dumps(orjson.loads(payload)).decode()


_REJECT_REASONS = {
    "UNQUOTED VALUE": ("csv_unterminated_quote",
                       "A quoted value in column {col} opens a quote that never closes properly, so this row (and possibly the "
                       "lines after it) could not be split into columns. Close the quote, or double quotes inside values (\"\")."),
    "INVALID ENCODING": ("invalid_encoding",
                         "Column {col} holds bytes that are not valid {enc}. Set encoding in the mapping to the file's real "
                         "encoding (e.g. latin-1), or save the file as UTF-8."),
    "MISSING COLUMNS": ("wrong_column_count",
                        "The row has fewer values than the header has columns (first missing: {col}). Quote values that contain "
                        "the delimiter {delim!r} or a line break, or add the missing values."),
    "TOO MANY COLUMNS": ("wrong_column_count",
                         "The row has more values than the header has columns. Quote values that contain the delimiter {delim!r}, "
                         "or remove the extra values."),
    "LINE SIZE OVER MAXIMUM": ("line_too_long", "The row is longer than the reader's maximum line size; split or shorten it."),
}


def _write_rejects(engine: Engine, job: ImportJob, plan: _Plan, rejected: pa.Table, *, shift: bool, vault: Vault) -> None:
    """Rows the reader could not parse: quarantine them with their line numbers. When the rows were
    numbered without knowing them (`shift`), move the numbers of this import's failed rows past them."""
    file = Path(job.path).name
    opts = plan.mapping["csv"]
    lines = rejected.column("line").to_pylist()
    if shift:
        slots = [line - k for k, line in enumerate(lines)]
        engine.execute(
            "UPDATE failed_events SET row_number = row_number + (SELECT count(*) FROM (SELECT unnest(?) AS slot) s "
            "WHERE s.slot <= failed_events.row_number) WHERE import_id = ? AND row_number IS NOT NULL",
            [slots, job.import_id],
        )
    is_jsonl = plan.shape.format == "jsonl"
    reasons, messages, fields, payloads = [], [], [], []
    for etype, col, text in zip(rejected.column("error_type").to_pylist(), rejected.column("column_name").to_pylist(),
                                rejected.column("csv_line").to_pylist(), strict=True):
        if is_jsonl and etype in ("TOO MANY COLUMNS", "MISSING COLUMNS"):
            code, msg = "invalid_json", "The line holds a raw control character (U+001F), so it is not JSON; escape it as \\u001f."
        else:
            code, message = _REJECT_REASONS.get(etype, ("unreadable_row", "The reader could not parse this row ({etype})."))
            msg = message.format(col=repr(col) if col else "?", enc=plan.mapping["encoding"], delim=opts["delimiter"], etype=etype)
        reasons.append(code)
        messages.append(msg)
        fields.append("/" + col if col else "")
        payloads.append(orjson.dumps({"line": text.lstrip("\r\n") if text else text}).decode())  # not blank lines before it
    # The row could not be read, so whose it is is unknown: sealed under a key of its own (file and line).
    key_ids = [vault.event_key_id(job.source, f"file:{job.file_sha256}:{line}") for line in lines]
    sealed = vault.seal_many(key_ids, [p.encode() for p in payloads])
    table = pa.table({"row_number": pa.array(lines, pa.int64()), "reason": reasons, "message": messages, "field": fields,
                      "key_id": pa.array(key_ids, pa.string()), "sealed": pa.array(sealed, pa.binary())})
    engine.register("_imp_rejects", table)
    try:
        dup = engine.fetch_all(
            "SELECT count(*) FROM _imp_rejects r WHERE EXISTS (SELECT 1 FROM failed_events f JOIN imports i ON i.import_id = f.import_id "
            "WHERE f.source = ? AND f.message_id IS NULL AND i.file_sha256 = ? AND f.row_number = r.row_number)",
            [job.source, job.file_sha256],
        )[0][0]
        engine.execute(
            "INSERT INTO failed_events (failure_id, raw_id, source, message_id, stage, reason, message, field, payload, "
            "received_at, failed_at, import_id, file, row_number, key_id, sealed) SELECT nextval('failed_event_seq'), NULL, ?, NULL, "
            "'import', reason, message, field, NULL, ?, now(), ?, ?, row_number, key_id, sealed FROM _imp_rejects r WHERE NOT EXISTS (SELECT 1 FROM failed_events f "
            "JOIN imports i ON i.import_id = f.import_id WHERE f.source = ? AND f.message_id IS NULL AND i.file_sha256 = ? "
            "AND f.row_number = r.row_number)",
            [job.source, job.started_at, job.import_id, file, job.source, job.file_sha256],
        )
    finally:
        with suppress(Exception):  # as in _write_chunk
            engine.unregister("_imp_rejects")
    job.rows_read += rejected.num_rows
    job.rows_duplicate += int(dup)
    job.rows_failed += rejected.num_rows - int(dup)
    _save_counts(engine, job)
