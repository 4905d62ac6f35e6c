"""Compacting the database after an erasure, so deleted values leave the file itself.

DuckDB does not overwrite the blocks deleted rows lived in: after an erasure the person's ids and
tokens are gone from every table, yet their bytes can linger in free blocks of
`refinery.duckdb` until those blocks are reused. `compact` rewrites the database into a fresh
file (`COPY FROM DATABASE`: tables, constraints, sequences at their current values) and puts it
in place of the old one, whose bytes are overwritten before it is deleted. DuckDB lets one
process open the file, so this runs with `refinery serve` stopped (`refinery privacy compact`).
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

from refinery.errors import ConfigurationError, StorageError
from refinery.settings import Settings


def compact(settings: Settings) -> dict[str, int]:
    """Rewrite `settings.database_path` without its free blocks; returns the sizes before and after."""
    from refinery.api.server import running_server

    if running_server(settings) is not None:
        raise ConfigurationError(
            "`refinery serve` is running on this data dir, and compaction needs the database to itself.",
            fix="Stop the server, run `refinery privacy compact`, then start it again.",
        )
    db = settings.database_path
    if not db.exists():
        raise ConfigurationError(f"No database at {db}.", fix="Point --data-dir at the data folder.")
    fresh = db.with_name(db.name + ".compact")
    _remove(fresh)
    before = db.stat().st_size + _size(Path(str(db) + ".wal"))
    try:
        con = duckdb.connect(str(fresh))
        try:
            con.execute("ATTACH ? AS old (READ_ONLY)", [str(db)])
            catalog = con.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
            con.execute(f'COPY FROM DATABASE old TO "{catalog}"')  # constant names
            con.execute("DETACH old")
            con.execute("CHECKPOINT")
        finally:
            con.close()
    except duckdb.Error as e:
        _remove(fresh)
        raise StorageError(f"Compacting {db} failed: {e}", fix="The database is unchanged; report this with the message above.") from e
    old = db.with_name(db.name + ".old")
    os.replace(db, old)
    os.replace(fresh, db)
    _shred(old)
    _shred(Path(str(db) + ".wal"))
    return {"bytes_before": before, "bytes_after": db.stat().st_size}


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _remove(path: Path) -> None:
    if path.exists():
        path.unlink()


def _shred(path: Path) -> None:
    """Overwrite a file with zeros before deleting it (a deleted file's blocks keep their bytes)."""
    if not path.exists():
        return
    size = path.stat().st_size
    with open(path, "r+b") as f:
        chunk = b"\0" * (1 << 20)
        left = size
        while left > 0:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    path.unlink()
