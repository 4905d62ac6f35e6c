"""The embedded default engine: one DuckDB file, one writer connection, reader cursors per thread."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import sqlglot
from sqlglot import exp

from refinery.errors import StorageError
from refinery.storage.engine import Capabilities, ConstraintViolation, Engine, Params

log = logging.getLogger(__name__)


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
        self._prepared: dict[str, tuple[str, bool]] = {}
        self._staged: dict[str, _Staged] = {}
        # Registering is a catalog change: a ROLLBACK undoes it, so names first staged inside a
        # transaction that rolls back must be registered again (see `transaction`).
        self._staged_in_transaction: list[str] = []
        self._checkpointer: _Checkpointer | None = None
        if not read_only and self.path != ":memory:":
            self._checkpointer = _Checkpointer(self._con, Path(self.path + ".wal"))

    @property
    def connection(self) -> duckdb.DuckDBPyConnection:
        """The writer's connection. Only the writer thread (and start-up code) may use it."""
        return self._con

    def fresh_reader(self) -> duckdb.DuckDBPyConnection:
        cur = self._con.cursor()
        cur.execute("SET TimeZone = 'UTC'")
        return cur

    def interrupt(self, cursor: Any) -> None:
        cursor.interrupt()

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
        try:
            return con.execute(sql, params) if params is not None else con.execute(sql)
        except duckdb.ConstraintException as e:
            raise ConstraintViolation(f"{type(e).__name__}: {e}", sql=sql) from e

    def _fetch_arrow(self, sql: str, params: Params, cursor: Any) -> pa.Table:
        con = self._target(cursor)
        return con.sql(sql, params=params).to_arrow_table()

    def _stream_arrow(self, sql: str, params: Params, batch_size: int, cursor: Any) -> pa.RecordBatchReader:
        return self._target(cursor).sql(sql, params=params).to_arrow_reader(batch_size)

    def execute_reused(self, sql: str) -> Any:
        """Plan `sql` once (`PREPARE`) on the writer's connection and `EXECUTE` it from then on.

        `now()` is bound as a constant when a statement is planned, which would force DuckDB to
        plan again on every run; it is passed in as a parameter instead (evaluated by EXECUTE, so
        it is still the transaction's start time).
        """
        entry = self._prepared.get(sql)
        try:
            if entry is None:
                name = f"refinery_reused_{len(self._prepared) + 1}"
                text, uses_now = _now_as_parameter(sql)
                self._con.execute(f"PREPARE {name} AS {text}")
                entry = self._prepared[sql] = (name, uses_now)
            name, uses_now = entry
            return self._con.execute(f"EXECUTE {name}(now())" if uses_now else f"EXECUTE {name}")
        except duckdb.ConstraintException as e:
            raise ConstraintViolation(f"{type(e).__name__}: {e}", sql=sql) from e
        except duckdb.Error as e:
            raise StorageError(f"{type(e).__name__}: {e}", sql=sql) from e

    def stage(self, name: str, table: pa.Table) -> None:
        """Swap the rows behind `name` without re-registering it: DuckDB binds a registered table
        into a prepared plan, so a reused plan would keep reading the first table it saw. The view
        reads through a holder that hands out whichever table is staged now."""
        holder = self._staged.get(name)
        if holder is None:
            holder = self._staged[name] = _Staged(table)
            self._con.register(name, holder)
            self._staged_in_transaction.append(name)
        else:
            holder.table = table

    def register(self, name: str, table: pa.Table, *, cursor: Any = None) -> None:
        self._target(cursor).register(name, table)

    def unregister(self, name: str, *, cursor: Any = None) -> None:
        self._target(cursor).unregister(name)

    @contextmanager
    def transaction(self, cursor: Any = None) -> Iterator[Any]:
        con = self._target(cursor)
        con.execute("BEGIN TRANSACTION")
        mine = con is self._con
        if mine:
            self._staged_in_transaction.clear()
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            if mine and self._staged_in_transaction:
                # The rollback dropped those views: register them afresh next time, and plan
                # again the statements that were bound to them.
                for name in self._staged_in_transaction:
                    self._staged.pop(name, None)
                self._prepared.clear()
            raise
        else:
            con.execute("COMMIT")
        finally:
            if mine:
                self._staged_in_transaction.clear()

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        with suppress(duckdb.Error):
            self._con.execute("CHECKPOINT")
        self._con.close()


class _Checkpointer:
    """Checkpoints from a thread of its own, so the writer's commits do not wait for them.

    DuckDB checkpoints automatically inside the COMMIT that crosses its WAL threshold, and that
    commit then waits for every changed row group to be rewritten (half a second once the tables
    hold a few hundred thousand events), stalling every acknowledgement queued behind it. A
    checkpoint on another connection runs alongside the writer's commits instead. The automatic
    threshold stays as a backstop, far above ours, in case this thread cannot keep up.
    """

    WAL_BYTES = 16 * 1024 * 1024
    BACKSTOP = "1GB"
    INTERVAL_S = 0.5

    def __init__(self, con: duckdb.DuckDBPyConnection, wal: Path):
        self._cursor = con.cursor()
        con.execute(f"SET checkpoint_threshold = '{self.BACKSTOP}'")
        self._wal = wal
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="refinery-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self.INTERVAL_S):
            try:
                if self._wal.stat().st_size < self.WAL_BYTES:
                    continue
            except OSError:  # no WAL yet
                continue
            try:
                self._cursor.execute("CHECKPOINT")
            except duckdb.Error as e:  # the WAL stays and the next tick tries again
                log.debug("background checkpoint skipped: %s", type(e).__name__)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(30)
        with suppress(duckdb.Error):
            self._cursor.close()


class _Staged:
    """An Arrow stream source whose rows can be swapped (see `DuckDBEngine.stage`)."""

    def __init__(self, table: pa.Table):
        self.table = table

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        return self.table.__arrow_c_stream__(requested_schema)


def _now_as_parameter(sql: str) -> tuple[str, bool]:
    """`sql` with every `now()` / `current_timestamp` replaced by the parameter `$1`."""
    tree = sqlglot.parse_one(sql, read="duckdb")
    found = False

    def swap(node: exp.Expression) -> exp.Expression:
        nonlocal found
        is_now = isinstance(node, exp.CurrentTimestamp) or (
            isinstance(node, exp.Anonymous) and str(node.this).lower() in ("now", "get_current_timestamp")
        )
        if not is_now:
            return node
        found = True
        return exp.cast(exp.Placeholder(this="1"), exp.DataType.build("TIMESTAMPTZ", dialect="duckdb"))

    tree = tree.transform(swap)
    return (tree.sql("duckdb"), True) if found else (sql, False)
