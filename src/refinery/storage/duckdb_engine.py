"""The embedded default engine: one DuckDB file, one writer connection, reader cursors per thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from refinery.errors import StorageError
from refinery.storage.engine import Capabilities, Engine, Params


class DuckDBEngine(Engine):
    dialect = "duckdb"
    capabilities = Capabilities()

    def __init__(self, path: Path | str, *, memory_limit: str = "2GB", threads: int = 2, read_only: bool = False):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = duckdb.connect(
                self.path,
                read_only=read_only,
                config={"memory_limit": memory_limit, "threads": threads},
            )
            if not read_only:
                self._con.execute("SET TimeZone = 'UTC'")
        except duckdb.IOException as e:
            raise StorageError(
                f"Cannot open the database {self.path}: {e}",
                fix="Another Refinery process holds it; stop it, or run this command while `refinery serve` is up "
                "so the CLI talks to the server instead.",
            ) from e
        self._local = threading.local()

    @property
    def connection(self) -> duckdb.DuckDBPyConnection:
        """The writer's connection. Only the writer thread (and start-up code) may use it."""
        return self._con

    def reader(self) -> duckdb.DuckDBPyConnection:
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self._con.cursor()
            cur.execute("SET TimeZone = 'UTC'")
            self._local.cursor = cur
        return cur

    def _target(self, cursor: Any) -> duckdb.DuckDBPyConnection:
        return cursor if cursor is not None else self._con

    def _execute(self, sql: str, params: Params, cursor: Any) -> Any:
        con = self._target(cursor)
        return con.execute(sql, params) if params is not None else con.execute(sql)

    def _fetch_arrow(self, sql: str, params: Params, cursor: Any) -> pa.Table:
        con = self._target(cursor)
        return con.sql(sql, params=params).to_arrow_table()

    def _stream_arrow(self, sql: str, params: Params, batch_size: int, cursor: Any) -> pa.RecordBatchReader:
        return self._target(cursor).sql(sql, params=params).to_arrow_reader(batch_size)  # type: ignore[no-any-return]

    def register(self, name: str, table: pa.Table, *, cursor: Any = None) -> None:
        self._target(cursor).register(name, table)

    def unregister(self, name: str, *, cursor: Any = None) -> None:
        self._target(cursor).unregister(name)

    @contextmanager
    def transaction(self, cursor: Any = None) -> Iterator[Any]:
        con = self._target(cursor)
        con.execute("BEGIN TRANSACTION")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        else:
            con.execute("COMMIT")

    def close(self) -> None:
        try:
            self._con.execute("CHECKPOINT")
        except duckdb.Error:
            pass
        self._con.close()
