"""The Parquet lake: the tables the Spark engine reads and writes, as plain files.

Layout (shared with the broker's workers): a lake is a folder; each table is a folder
`<lake>/<table>/` of Parquet files with the embedded table's columns, one file per batch written,
`<batch_id>.parquet`. Readers take every `*.parquet` file of the folder (names starting with `.` or
`_` are in-progress writes and are skipped, as Spark skips them). A table is replaced by writing
its new files into `.<table>.<id>/` beside it and swapping the folders, so a reader sees the old
table or the new one, never half of each.

`export_store` copies an embedded DuckDB store's tables into a lake, the way a user moves a store
that has outgrown one machine to Spark (`refinery lake export`).
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
from sqlglot import exp

from refinery.errors import StorageError
from refinery.storage.engine import Engine

if TYPE_CHECKING:
    from refinery.settings import Settings

#: The tables `refinery lake export` copies by default: the zones batch jobs read and write.
#: Secrets (tokens, destination credentials), the vault's sealed values and the raw zone stay in
#: the embedded store; `--table` exports any table by name.
DATA_TABLES: tuple[str, ...] = (
    "events", "failed_events", "event_profiles", "profiles", "identities", "identity_edges", "identity_blocked",
    "profile_merges", "identity_links", "identity_overrides", "identity_resolutions", "segments", "segment_versions",
    "segment_members", "computed_traits", "computed_trait_values", "features", "feature_versions", "consent_log",
)

_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
#: DuckDB types the lake stores as another (Spark has no JSON or unsigned 64-bit type).
_AS_TEXT = ("JSON", "UUID")
_AS_DECIMAL = ("UBIGINT", "HUGEINT", "UHUGEINT")


def lake_root(settings: Settings) -> str:
    """`lake_path`, or `<data_dir>/lake`."""
    return settings.lake_path or str(settings.data_dir / "lake")


def check_table_name(name: str) -> str:
    if not _NAME.match(name):
        raise StorageError(f"{name!r} is not a lake table name.",
                           fix="Use lower-case letters, digits and underscores, starting with a letter (e.g. events).")
    return name


def new_batch_id() -> str:
    """A batch id that sorts by time of writing (hex milliseconds) and is unique (random tail)."""
    import time

    return f"{int(time.time() * 1000):012x}-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Lake:
    """A lake on the local file system (Spark itself reads and writes any path it can; these
    helpers are for the local folders the tests, the export and local mode use)."""

    root: Path

    @classmethod
    def at(cls, root: str | Path) -> Lake:
        return cls(Path(root))

    def table_dir(self, name: str) -> Path:
        return self.root / check_table_name(name)

    def tables(self) -> list[str]:
        """Tables present: folders with at least one Parquet file."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and _NAME.match(p.name) and any(self.files(p.name)))

    def files(self, name: str) -> list[Path]:
        folder = self.table_dir(name)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith((".", "_")))

    def read(self, name: str) -> pa.Table:
        """A whole table as Arrow (small tables and tests; Spark reads the folder itself)."""
        files = self.files(name)
        if not files:
            raise StorageError(f"The lake at {self.root} has no table {name!r}.",
                               fix="Export it (refinery lake export) or write it first.")
        return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")

    def append(self, name: str, batches: pa.RecordBatchReader | pa.Table, batch_id: str | None = None) -> Path:
        """Write one batch file `<batch_id>.parquet` (written under a dot name, then renamed)."""
        folder = self.table_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        batch_id = batch_id or new_batch_id()
        final = folder / f"{batch_id}.parquet"
        tmp = folder / f".{batch_id}.parquet.tmp"
        _write(tmp, batches)
        tmp.replace(final)
        return final

    def replace(self, name: str, batches: pa.RecordBatchReader | pa.Table, batch_id: str | None = None) -> Path:
        """Replace the table by one batch file, swapping whole folders."""
        folder = self.table_dir(name)
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".{name}.{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        batch_id = batch_id or new_batch_id()
        _write(staging / f"{batch_id}.parquet", batches)
        swap_in(folder, staging)
        return folder / f"{batch_id}.parquet"


def swap_in(folder: Path, staging: Path) -> None:
    """Make `staging` the table folder `folder` (the old one, if any, is removed after the swap)."""
    old = folder.parent / f".{folder.name}.old.{uuid.uuid4().hex[:8]}"
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _write(path: Path, batches: pa.RecordBatchReader | pa.Table) -> None:
    if isinstance(batches, pa.Table):
        pq.write_table(batches, path, compression="zstd")
        return
    with pq.ParquetWriter(path, batches.schema, compression="zstd") as w:
        for batch in batches:
            w.write_batch(batch)


# --- export from the embedded store --------------------------------------------------------------
def lake_select(engine: Engine, table: str) -> exp.Select:
    """SELECT of a store table with each column as the lake stores it (JSON and UUID as text,
    unsigned and 128-bit integers as DECIMAL(38, 0))."""
    rows = engine.fetch_all(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = 'main' AND table_name = ? "
        "ORDER BY ordinal_position", [table])
    if not rows:
        raise StorageError(f"The store has no table {table!r}.", fix="Name a table listed by `refinery query 'SHOW TABLES'`.")
    cols: list[exp.Expr] = []
    for name, dtype in rows:
        col = exp.column(str(name), quoted=True)
        if dtype in _AS_TEXT:
            cols.append(exp.alias_(exp.cast(col, exp.DataType.build("VARCHAR")), str(name), quoted=True))
        elif dtype in _AS_DECIMAL:
            cols.append(exp.alias_(exp.cast(col, exp.DataType.build("DECIMAL(38, 0)")), str(name), quoted=True))
        else:
            cols.append(col)
    return exp.select(*cols).from_(exp.to_table(table))


def export_store(engine: Engine, lake: Lake, tables: Sequence[str] | None = None, *,
                 batch_id: str | None = None) -> dict[str, int]:
    """Replace each table in the lake by the store's rows (one batch file per table); returns the
    rows written per table. Tables the store does not have are skipped when exporting the default
    list, refused when named."""
    named = tables is not None
    present = {str(r[0]) for r in engine.fetch_all(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'")}
    wanted: Iterable[str] = tables if tables is not None else DATA_TABLES
    out: dict[str, int] = {}
    batch_id = batch_id or new_batch_id()
    for table in wanted:
        check_table_name(table)
        if table not in present:
            if named:
                raise StorageError(f"The store has no table {table!r}.", fix=f"Name one of: {', '.join(sorted(present))}.")
            continue
        reader = engine.stream_arrow(lake_select(engine, table), cursor=engine.reader())
        counted = _Counted(reader)
        lake.replace(table, counted.reader(), batch_id)
        out[table] = counted.rows
    return out


class _Counted:
    """Counts the rows passing through a RecordBatchReader."""

    def __init__(self, reader: pa.RecordBatchReader):
        self._reader = reader
        self.rows = 0

    def reader(self) -> pa.RecordBatchReader:
        def gen() -> Iterable[pa.RecordBatch]:
            for batch in self._reader:
                self.rows += batch.num_rows
                yield batch

        return pa.RecordBatchReader.from_batches(self._reader.schema, gen())
