"""Batch import: a CSV, JSON lines or Parquet file plus a mapping -> Segment calls in the zones.

The file is copied into the raw zone under its SHA-256 and recorded in `imports`. DuckDB then
streams it (read_csv / read_parquet; JSON lines are read as lines and parsed in SQL, so a bad
line becomes a failed row instead of stopping the scan) through one SELECT, built with sqlglot,
that turns each row into a Segment-shaped payload with a deterministic message id and, for rows
that cannot become an event, a reason. Python only moves Arrow batches: each batch of about
200k rows is one writer call that drops duplicates, quarantines failed rows (stage `import`, with
file and row number) and hands the rest to `insert_clean`, the collector's own cleaning.
See docs/import.md and docs/decisions/0003-import-raw-zone.md.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa
from sqlglot import exp

from refinery.errors import ImportError_, NotFoundError, RefineryError
from refinery.ingest.mapping import column_uses, validate_mapping
from refinery.ingest.store import insert_clean
from refinery.storage.engine import Engine, parse

if TYPE_CHECKING:
    from refinery.runtime import Runtime

log = logging.getLogger(__name__)

CHUNK_ROWS = 200_000
LIBRARY = {"name": "refinery-import", "version": "1"}
_EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
               ".parquet": "parquet", ".pq": "parquet"}
#: JSON text never holds a raw U+001F (control characters must be escaped), so splitting JSON lines on
#: it yields whole lines; a line that does contain one is not JSON and is rejected with its number.
_LINE_DELIMITER = "\x1f"

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


# --- the pure part: mapping + file shape -> SQL ------------------------------------------------

@dataclass(frozen=True)
class FileShape:
    """What the importer learnt about a file before reading it: format, columns (in order) and types."""

    format: str
    columns: dict[str, str]
    header_lines: int = 0  # lines before the first data row (CSV: skip + header)


def _template(sql: str, **slots: exp.Expression) -> exp.Expression:
    """Parse a constant SQL template and put sqlglot expressions where `__name` placeholders stand."""
    tree = parse(sql)
    for col in list(tree.find_all(exp.Column)):
        name = col.name
        if name.startswith("__") and name[2:] in slots:
            value = slots[name[2:]].copy()
            atomic = isinstance(value, (exp.Column, exp.Literal, exp.Func, exp.Cast, exp.Case, exp.Paren, exp.Array))
            col.replace(value if atomic else exp.Paren(this=value))
    for table in list(tree.find_all(exp.Table)):
        if table.name.startswith("__") and table.name[2:] in slots:
            table.replace(slots[table.name[2:]].copy())
    return tree


def _lit(value: str) -> exp.Expression:
    return exp.Literal.string(value)


def _json_object(pairs: list[tuple[str, exp.Expression]]) -> exp.Expression:
    args: list[exp.Expression] = []
    for k, v in pairs:
        args.extend((_lit(k), v))
    return exp.Anonymous(this="json_object", expressions=args)


class _Columns:
    """How to read one column as text and as a JSON value, per format (CSV: all text; JSON lines:
    JSON values; Parquet: native types)."""

    def __init__(self, shape: FileShape):
        self.shape = shape

    def ref(self, name: str) -> exp.Expression:
        return exp.column(exp.to_identifier(name, quoted=True))

    def text(self, name: str) -> exp.Expression:
        c = self.ref(name)
        if self.shape.format == "csv":
            return c
        if self.shape.format == "jsonl":
            return _template("__c ->> '$'", c=c)
        return exp.cast(c, "VARCHAR")

    def value(self, name: str, kind: str) -> exp.Expression:
        """The value to embed in the payload (NULL when a declared type does not fit)."""
        text = self.text(name)
        if kind in ("integer", "double", "boolean"):
            sql_type = {"integer": "BIGINT", "double": "DOUBLE", "boolean": "BOOLEAN"}[kind]
            return exp.TryCast(this=text, to=exp.DataType.build(sql_type))
        if kind == "string":
            return text
        if kind == "json":
            if self.shape.format == "jsonl":
                return self.ref(name)
            if self.shape.format == "csv":
                return _template("CASE WHEN json_valid(__t) THEN CAST(__t AS JSON) END", t=text)
            return _template("to_json(__c)", c=self.ref(name))
        # auto: text for CSV, the JSON value for JSON lines, the native value for Parquet
        return text if self.shape.format == "csv" else self.ref(name)


def _timestamp_expr(cols: _Columns, spec: dict[str, str]) -> exp.Expression:
    text = cols.text(spec["column"])
    fmt = spec["format"]
    if fmt == "iso":
        return _template("TRY_CAST(__t AS TIMESTAMPTZ)", t=text)
    if fmt in ("epoch_s", "epoch_ms"):
        scale = "1.0" if fmt == "epoch_s" else "1000.0"
        return _template(
            f"CASE WHEN abs(TRY_CAST(__t AS DOUBLE) / {scale}) < 1e11 THEN to_timestamp(TRY_CAST(__t AS DOUBLE) / {scale}) END", t=text
        )
    return _template("CAST(try_strptime(__t, __f) AS TIMESTAMPTZ)", t=text, f=_lit(fmt))


def _truncated(text: exp.Expression) -> exp.Expression:
    return _template("to_json(CASE WHEN length(__t) > 40 THEN left(__t, 37) || '...' ELSE __t END)", t=text)


def payload_select(mapping: dict[str, Any], shape: FileShape, source: str, relation: exp.Expression) -> exp.Select:
    """SELECT message_id, payload, _reason, _message, _field over `relation` (the file's rows).

    A NULL `_reason` means the payload is ready for cleaning. `message_id` is
    'imp-' + sha256(source, call type, row key values) so a re-import yields the same ids; rows
    whose key is empty get no message id (they are tracked by file and row number instead).
    """
    cols = _Columns(shape)
    call = mapping["type"]
    checks: list[tuple[exp.Expression, str, exp.Expression, str]] = []  # (condition, reason, message, field)

    key_texts = [cols.text(c) for c in mapping["row_key"]]
    key_list = exp.Array(expressions=key_texts)
    all_key_null = exp.and_(*[exp.Is(this=t.copy(), expression=exp.Null()) for t in key_texts])
    checks.append((
        all_key_null, "missing_row_key",
        _lit(f"The row key ({', '.join(mapping['row_key'])}) is empty, so the row cannot get a stable message id; "
             "fill the column in the file or choose row_key columns that always have a value."),
        "/" + mapping["row_key"][0],
    ))
    message_id = _template(
        "CASE WHEN __nokey THEN NULL ELSE 'imp-' || substr(sha256(__src || chr(31) || __call || chr(31) || CAST(to_json(__keys) AS VARCHAR)), 1, 32) END",
        nokey=all_key_null.copy(), src=_lit(source), call=_lit(call), keys=key_list,
    )

    ids: dict[str, exp.Expression] = {}
    for key, field_name in (("user_id", "userId"), ("anonymous_id", "anonymousId")):
        if mapping.get(key):
            ids[field_name] = _template("NULLIF(trim(__t), '')", t=cols.text(mapping[key]))
    mapped_ids = [f"'{mapping[k]}' ({k})" for k in ("user_id", "anonymous_id") if mapping.get(k)]
    checks.append((
        exp.and_(*[exp.Is(this=v.copy(), expression=exp.Null()) for v in ids.values()]),
        "missing_identity",
        _lit(f"The row has no user: column {' and '.join(mapped_ids)} is empty. Fill it in the file, or map "
             "anonymous_id to a column that always has a value."),
        "/userId" if mapping.get("user_id") else "/anonymousId",
    ))

    event: exp.Expression | None = None
    if call == "track":
        spec = mapping["event"]
        if "value" in spec:
            event = _lit(spec["value"])
        else:
            event = _template("NULLIF(trim(__t), '')", t=cols.text(spec["column"]))
            checks.append((
                exp.Is(this=event.copy(), expression=exp.Null()), "missing_event",
                _lit(f"Column '{spec['column']}' (event) is empty; a track call needs an event name. "
                     "Fill it in the file or set event to a constant in the mapping."),
                "/event",
            ))

    ts_text: exp.Expression | None = None
    ts_out: exp.Expression | None = None
    if mapping.get("timestamp"):
        ts = mapping["timestamp"]
        ts_text = cols.text(ts["column"])
        parsed = _timestamp_expr(cols, ts)
        fmt_hint = "an ISO-8601 time such as 2026-01-31T12:00:00Z" if ts["format"] == "iso" else (
            f"{ts['format']} (epoch)" if ts["format"].startswith("epoch") else f"the format '{ts['format']}'")
        checks.append((
            exp.Is(this=ts_text.copy(), expression=exp.Null()), "missing_timestamp",
            _lit(f"Column '{ts['column']}' (timestamp) is empty. Fill it in the file, or remove timestamp from the "
                 "mapping to use the import time."),
            "/timestamp",
        ))
        checks.append((
            exp.Is(this=parsed.copy(), expression=exp.Null()), "invalid_timestamp",
            _template(
                "'Column ' || __col || ' (timestamp) holds ' || __val || ', which is not ' || __hint || "
                "'; fix the value in the file or set timestamp.format in the mapping (e.g. ''%d/%m/%Y %H:%M'').'",
                col=_lit(f"'{ts['column']}'"), val=_truncated(ts_text), hint=_lit(fmt_hint),
            ),
            "/timestamp",
        ))
        # Failed rows keep the text as found, so a replay cannot load them with the import time.
        ts_out = _template("COALESCE(strftime(__p, '%Y-%m-%dT%H:%M:%S.%fZ'), __t)", p=parsed, t=ts_text.copy())

    def fields(group: str, where: str) -> list[tuple[str, exp.Expression]]:
        out: list[tuple[str, exp.Expression]] = []
        for name, spec in mapping.get(group, {}).items():
            if "value" in spec:
                out.append((name, _template("CAST(__j AS JSON)", j=_lit(orjson.dumps(spec["value"]).decode()))))
                continue
            value = cols.value(spec["column"], spec["type"])
            if spec["type"] not in ("auto", "string"):
                text = cols.text(spec["column"])
                checks.append((
                    _template("__t IS NOT NULL AND __v IS NULL", t=text, v=value),
                    "invalid_value",
                    _template(
                        "'Column ' || __col || ' (' || __where || ') holds ' || __val || ', which is not ' || __type || "
                        "'; fix the value in the file or change its type in the mapping.'",
                        col=_lit(f"'{spec['column']}'"), where=_lit(f"{where}.{name}"), val=_truncated(text.copy()),
                        type=_lit("a " + spec["type"] if spec["type"] != "integer" else "an integer"),
                    ),
                    f"/{where}/{name}",
                ))
                # keep the text as found in failed payloads, like timestamps
                value = _template("CASE WHEN __v IS NULL AND __t IS NOT NULL THEN to_json(__t) ELSE to_json(__v) END",
                                  v=value, t=text.copy())
            out.append((name, value))
        return out

    traits = fields("traits", "traits")
    properties = fields("properties", "properties")
    context: list[tuple[str, exp.Expression]] = [("library", _json_object([(k, _lit(v)) for k, v in LIBRARY.items()]))]
    if mapping.get("crm_id"):
        crm = mapping["crm_id"]
        crm_text = cols.text(crm["column"])
        traits.append((crm["name"], crm_text))
        context.append(("externalIds", _template(
            "CASE WHEN __t IS NULL THEN NULL ELSE json_array(json_object('id', __t, 'type', __n, 'collection', 'users', 'encoding', 'none')) END",
            t=crm_text, n=_lit(crm["name"]),
        )))

    payload: list[tuple[str, exp.Expression]] = [("type", _lit(call))]
    if event is not None:
        payload.append(("event", event))
    payload.extend(ids.items())
    if call == "identify":
        payload.append(("traits", _json_object(traits)))
    else:
        payload.append(("properties", _json_object(properties)))
        if traits:
            context.append(("traits", _json_object(traits)))
    payload.append(("context", _json_object(context)))
    if ts_out is not None:
        payload.append(("timestamp", ts_out))
    payload.append(("messageId", message_id.copy()))

    reason: exp.Case = exp.Case()
    message: exp.Case = exp.Case()
    fld: exp.Case = exp.Case()
    for cond, code, msg, ptr in checks:
        reason = reason.when(cond, _lit(code))
        message = message.when(cond.copy(), msg)
        fld = fld.when(cond.copy(), _lit(ptr))

    select = exp.select(
        message_id.as_("message_id"),
        exp.cast(_json_object(payload), "VARCHAR").as_("payload"),
        reason.as_("_reason"),
        message.as_("_message"),
        fld.as_("_field"),
    ).from_(relation)
    if shape.format == "jsonl":
        # Lines that are blank or not JSON objects: no payload, a reason, no message id.
        select = _jsonl_guard(select)
    return select


def _jsonl_guard(select: exp.Select) -> exp.Select:
    inner = select.select("_blank", "_not_object", "_line_head", append=True)
    return exp.select(
        parse("CASE WHEN _blank OR _not_object THEN NULL ELSE message_id END").as_("message_id"),
        parse("CASE WHEN _blank OR _not_object THEN NULL ELSE payload END").as_("payload"),
        parse("CASE WHEN _blank THEN 'blank_line' WHEN _not_object THEN 'invalid_json' ELSE _reason END").as_("_reason"),
        parse(
            "CASE WHEN _blank THEN 'The line is blank.' WHEN _not_object THEN 'The line is not a JSON object (it starts ' || "
            "to_json(_line_head) || '); write one JSON object per line, e.g. {\"user_id\": \"u1\"}.' ELSE _message END"
        ).as_("_message"),
        parse("CASE WHEN _blank OR _not_object THEN '' ELSE _field END").as_("_field"),
        parse("_blank").as_("_blank"),
    ).from_(inner.subquery("_rows"))


def reader_relation(shape: FileShape, mapping: dict[str, Any], rejects_table: str) -> tuple[exp.Expression, list[Any]]:
    """The file as a relation (a table function call with bound parameters) and its parameters."""
    opts = mapping["csv"]
    if shape.format == "csv":
        sql = ("SELECT * FROM read_csv(?, delim = ?, quote = ?, escape = ?, header = true, skip = ?, encoding = ?, "
               "auto_detect = false, all_varchar = true, columns = ?, store_rejects = true, rejects_table = ?, rejects_scan = ?)")
        params = [None, opts["delimiter"], opts["quote"], opts["escape"], opts["skip"], mapping["encoding"],
                  {c: "VARCHAR" for c in shape.columns}, rejects_table, rejects_table + "_scan"]
        return parse(sql).subquery("_file"), params
    if shape.format == "jsonl":
        needed = column_uses(mapping)
        structure = orjson.dumps({c: "JSON" for c in needed}).decode()
        inner = _template(
            "SELECT _line IS NULL OR trim(_line) = '' AS _blank, "
            "_line IS NOT NULL AND trim(_line) <> '' AND NOT _is_object AS _not_object, "
            "left(_line, 20) AS _line_head, "
            "CASE WHEN _is_object THEN json_transform(_line, __structure) END AS _obj "
            # CASE guards evaluation, so invalid lines are never handed to json_type / json_transform
            "FROM (SELECT _line, CASE WHEN json_valid(_line) THEN json_type(_line) = 'OBJECT' ELSE false END AS _is_object "
            "FROM read_csv(?, delim = ?, quote = '', escape = '', header = false, encoding = ?, auto_detect = false, "
            "columns = {'_line': 'VARCHAR'}, store_rejects = true, rejects_table = ?, rejects_scan = ?))",
            structure=_lit(structure),
        )
        # json_transform yields a struct keyed by the column names; expose each as the column name.
        outer = exp.select("_blank", "_not_object", "_line_head").from_(inner.subquery("_lines"))
        for c in needed:
            outer = outer.select(
                exp.StructExtract(this=exp.column("_obj"), expression=_lit(c)).as_(exp.to_identifier(c, quoted=True)), append=True
            )
        return outer.subquery("_file"), [None, _LINE_DELIMITER, mapping["encoding"], rejects_table, rejects_table + "_scan"]
    return parse("SELECT * FROM read_parquet(?)").subquery("_file"), [None]


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
            [str(path), _LINE_DELIMITER, mapping["encoding"]], cursor=engine.reader(),
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


# --- the raw zone ------------------------------------------------------------------------------

def store_raw_file(path: Path, raw_dir: Path) -> tuple[str, Path]:
    """Copy the file as received to `<raw_dir>/<sha256><suffixes>` (content-addressed, read-only)."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    tmp = raw_dir / f".incoming-{uuid.uuid4().hex}"
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
        sha = digest.hexdigest()
        final = raw_dir / (sha + "".join(s.lower() for s in path.suffixes[-2:]))
        if final.exists():
            tmp.unlink()
        else:
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ImportError_(f"Cannot copy {path.name} into the raw zone: {e.strerror}.",
                           fix=f"Check that {path} is readable and {raw_dir} is writable with free space.") from e
    return sha, final


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
    rows = engine.fetch_dicts(
        "SELECT import_id, source, path, status, rows_read, rows_loaded, rows_duplicate, rows_failed, error, started_at, "
        "finished_at, format, file_sha256, stored_path FROM imports WHERE import_id = ?",
        [import_id], cursor=engine.reader(),
    )
    if not rows:
        raise NotFoundError(f"No import with id {import_id!r}.", fix="List imports with: refinery query \"SELECT * FROM imports\"")
    return ImportJob(**rows[0])


def _execute(runtime: Runtime, plan: _Plan, progress: Progress | None) -> None:
    job = plan.job
    try:
        sha, stored = store_raw_file(plan.original, runtime.settings.raw_files_dir)
        job.file_sha256, job.stored_path = sha, str(stored)
        runtime.writer.call(lambda e: e.execute(
            "UPDATE imports SET file_sha256 = ?, stored_path = ? WHERE import_id = ?", [sha, str(stored), job.import_id]))
        _stream(runtime, plan, stored, progress)
        job.status = "completed"
    except Exception as e:  # recorded on the job; the caller (CLI, API poller) shows it
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


def _stream(runtime: Runtime, plan: _Plan, stored: Path, progress: Progress | None) -> None:
    job, engine = plan.job, runtime.engine
    rejects = "_rejects_" + job.import_id
    relation, params = reader_relation(plan.shape, plan.mapping, rejects)
    params[0] = str(stored)
    select = payload_select(plan.mapping, plan.shape, job.source, relation)
    if plan.shape.format == "parquet":
        job.rows_total = int(engine.fetch_all("SELECT sum(num_rows) FROM parquet_file_metadata(?)", [str(stored)],
                                              cursor=engine.reader())[0][0] or 0)
    cursor = engine.reader()
    batches = engine.stream_arrow(select, params, batch_size=CHUNK_ROWS, cursor=cursor)
    next_row = plan.shape.header_lines + 1
    for batch in batches:
        if batch.num_rows == 0:
            continue
        rows = pa.Table.from_batches([batch]).append_column(
            "row_number", pa.array(range(next_row, next_row + batch.num_rows), pa.int64()))
        next_row += batch.num_rows
        runtime.writer.call(lambda e, t=rows: _write_chunk(runtime, e, job, t))
        if progress:
            progress(job.to_dict())
    del batches
    if plan.shape.format in ("csv", "jsonl"):
        rejected = engine.fetch_arrow(
            _template(
                "SELECT line, arg_min(error_type, _rank) AS error_type, arg_min(column_name, _rank) AS column_name, "
                "arg_min(csv_line, _rank) AS csv_line FROM (SELECT *, CASE error_type WHEN 'UNQUOTED VALUE' THEN 0 "
                "WHEN 'INVALID ENCODING' THEN 1 ELSE 2 END AS _rank FROM __t) GROUP BY line ORDER BY line",
                t=exp.to_table(exp.to_identifier(rejects, quoted=True)),  # a name we generated, quoted anyway
            ),
            cursor=cursor,
        )
        for name in (rejects, rejects + "_scan"):
            engine.execute(_template("DROP TABLE IF EXISTS __t", t=exp.to_table(exp.to_identifier(name, quoted=True))), cursor=cursor)
        if rejected.num_rows:
            runtime.writer.call(lambda e: _write_rejects(e, job, plan, rejected))
            if progress:
                progress(job.to_dict())


def _write_chunk(runtime: Runtime, engine: Engine, job: ImportJob, rows: pa.Table) -> None:
    """One chunk, inside one writer transaction: flag duplicates, quarantine failed rows, clean the rest."""
    engine.register("_imp_rows", rows)
    file = Path(job.path).name
    try:
        # Joins against the chunk's own ids (not correlated subqueries): one pass over each zone.
        engine.execute(
            "CREATE OR REPLACE TEMP TABLE _imp_chunk AS "
            "WITH ids AS (SELECT DISTINCT message_id FROM _imp_rows WHERE message_id IS NOT NULL), "
            "loaded AS (SELECT DISTINCT e.message_id FROM events e JOIN ids ON ids.message_id = e.message_id WHERE e.source = ?), "
            "quarantined AS (SELECT DISTINCT f.message_id, CAST(f.payload AS VARCHAR) AS payload FROM failed_events f "
            "  JOIN ids ON ids.message_id = f.message_id WHERE f.source = ?), "
            "by_row AS (SELECT DISTINCT f.row_number FROM failed_events f JOIN imports i ON i.import_id = f.import_id "
            "  WHERE f.source = ? AND f.message_id IS NULL AND i.file_sha256 = ?) "
            "SELECT c.*, CASE "
            "  WHEN coalesce(c._reason, '') = 'blank_line' THEN true "
            "  WHEN c.message_id IS NULL THEN p.row_number IS NOT NULL "
            "  WHEN l.message_id IS NOT NULL OR q.message_id IS NOT NULL THEN true "
            "  ELSE row_number() OVER (PARTITION BY c.message_id ORDER BY c.row_number) > 1 END AS _dup "
            "FROM _imp_rows c "
            "LEFT JOIN loaded l ON l.message_id = c.message_id "
            "LEFT JOIN quarantined q ON q.message_id = c.message_id AND q.payload = c.payload "
            "LEFT JOIN by_row p ON c.message_id IS NULL AND p.row_number = c.row_number",
            [job.source, job.source, job.source, job.file_sha256],
        )
        blank, dup, failed = engine.fetch_all(
            "SELECT count(*) FILTER (WHERE coalesce(_reason, '') = 'blank_line'), count(*) FILTER (WHERE _dup), "
            "count(*) FILTER (WHERE NOT _dup AND _reason IS NOT NULL) FROM _imp_chunk"
        )[0]
        engine.execute(
            "INSERT INTO failed_events (failure_id, raw_id, source, message_id, stage, reason, message, field, payload, "
            "received_at, failed_at, import_id, file, row_number) SELECT nextval('failed_event_seq'), NULL, ?, message_id, 'import', _reason, _message, _field, "
            "CAST(payload AS JSON), ?, now(), ?, ?, row_number FROM _imp_chunk WHERE NOT _dup AND _reason IS NOT NULL",
            [job.source, job.started_at, job.import_id, file],
        )
        relation = _template(
            "SELECT CAST(NULL AS BIGINT) AS raw_id, __src AS source, message_id, CAST(__at AS TIMESTAMPTZ) AS received_at, "
            "payload, __id AS import_id FROM _imp_chunk WHERE NOT _dup AND _reason IS NULL",
            src=_lit(job.source), at=_lit(job.started_at.isoformat()), id=_lit(job.import_id),
        )
        rejected = insert_clean(engine, relation, runtime.clean_rules, file=file)
        if rejected:
            # Cleaning does not know row numbers; give its rejects theirs (and the import stage's file).
            engine.execute(
                "UPDATE failed_events SET row_number = c.row_number FROM _imp_chunk c "
                "WHERE failed_events.import_id = ? AND failed_events.row_number IS NULL AND failed_events.message_id = c.message_id",
                [job.import_id],
            )
        # Rows quarantined by an earlier import and loaded now (the file was fixed): no longer pending.
        engine.execute(
            "UPDATE failed_events SET replay_status = 'loaded', replayed_at = now(), replay_count = replay_count + 1 "
            "WHERE source = ? AND (replay_status IS NULL OR replay_status = 'failed_again') AND import_id IS DISTINCT FROM ? "
            "AND message_id IN (SELECT message_id FROM _imp_chunk WHERE NOT _dup AND _reason IS NULL) "
            "AND message_id NOT IN (SELECT message_id FROM failed_events WHERE import_id = ? AND message_id IS NOT NULL)",
            [job.source, job.import_id, job.import_id],
        )
        engine.execute("DROP TABLE _imp_chunk")
    except BaseException:
        with suppress(Exception):  # the transaction is aborted; the error that matters is the one raised
            engine.unregister("_imp_rows")
        raise
    engine.unregister("_imp_rows")
    n = rows.num_rows - int(blank)
    job.rows_read += n
    job.rows_duplicate += int(dup) - int(blank)
    job.rows_failed += int(failed) + len(rejected)
    job.rows_loaded += n - (int(dup) - int(blank)) - int(failed) - len(rejected)
    _save_counts(engine, job)


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


def _write_rejects(engine: Engine, job: ImportJob, plan: _Plan, rejected: pa.Table) -> None:
    """Rows the reader could not parse: quarantine them with their line numbers, and move the row
    numbers of earlier failed rows of this import past them (they were counted without them)."""
    file = Path(job.path).name
    opts = plan.mapping["csv"]
    lines = rejected.column("line").to_pylist()
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
            code, template = _REJECT_REASONS.get(etype, ("unreadable_row", "The reader could not parse this row ({etype})."))
            msg = template.format(col=repr(col) if col else "?", enc=plan.mapping["encoding"], delim=opts["delimiter"], etype=etype)
        reasons.append(code)
        messages.append(msg)
        fields.append("/" + col if col else "")
        payloads.append(orjson.dumps({"line": text}).decode())
    table = pa.table({"row_number": pa.array(lines, pa.int64()), "reason": reasons, "message": messages, "field": fields,
                      "payload": payloads})
    engine.register("_imp_rejects", table)
    try:
        dup = engine.fetch_all(
            "SELECT count(*) FROM _imp_rejects r WHERE EXISTS (SELECT 1 FROM failed_events f JOIN imports i ON i.import_id = f.import_id "
            "WHERE f.source = ? AND f.message_id IS NULL AND i.file_sha256 = ? AND f.row_number = r.row_number)",
            [job.source, job.file_sha256],
        )[0][0]
        engine.execute(
            "INSERT INTO failed_events (failure_id, raw_id, source, message_id, stage, reason, message, field, payload, "
            "received_at, failed_at, import_id, file, row_number) SELECT nextval('failed_event_seq'), NULL, ?, NULL, 'import', reason, message, field, "
            "CAST(payload AS JSON), ?, now(), ?, ?, row_number FROM _imp_rejects r WHERE NOT EXISTS (SELECT 1 FROM failed_events f "
            "JOIN imports i ON i.import_id = f.import_id WHERE f.source = ? AND f.message_id IS NULL AND i.file_sha256 = ? "
            "AND f.row_number = r.row_number)",
            [job.source, job.started_at, job.import_id, file, job.source, job.file_sha256],
        )
    except BaseException:
        with suppress(Exception):  # as in _write_chunk
            engine.unregister("_imp_rejects")
        raise
    engine.unregister("_imp_rejects")
    job.rows_read += rejected.num_rows
    job.rows_duplicate += int(dup)
    job.rows_failed += rejected.num_rows - int(dup)
    _save_counts(engine, job)
