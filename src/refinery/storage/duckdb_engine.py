"""The embedded default engine: one DuckDB file, one writer connection, reader cursors per thread."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
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

    def __init__(
        self,
        path: Path | str,
        *,
        memory_limit: str = "2GB",
        batch_memory_limit: str | None = None,
        threads: int = 2,
        read_only: bool = False,
    ):
        """`memory_limit` is the steady DuckDB limit; `batch_memory_limit` (default: the same) is the
        one `batch_memory()` raises it to while a batch job runs (docs/decisions/0012-memory-policy.md)."""
        self.path = str(path)
        config: dict[str, Any] = {"memory_limit": memory_limit, "threads": threads, **ALLOCATOR}
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # Where DuckDB evicts to when it reaches its limit: next to the database, in the data dir.
            config["temp_directory"] = self.path + ".tmp"
        try:
            self._con = duckdb.connect(self.path, read_only=read_only, config=config)
            if not read_only:
                self._con.execute("SET TimeZone = 'UTC'")
        except duckdb.IOException as e:
            raise StorageError(
                f"Cannot open the database {self.path}: {e}",
                fix="Another Refinery process holds it; stop it, or run this command while `refinery serve` is up "
                "so the CLI talks to the server instead.",
            ) from e
        self.memory = MemoryBudget(self._con, memory_limit, batch_memory_limit or memory_limit)
        self._local = threading.local()
        self._after_commit: list[Callable[[], None]] | None = None  # a list while the writer's transaction is open
        self._prepared: dict[str, tuple[str, bool]] = {}
        self._staged: dict[str, _Staged] = {}
        # Registering is a catalog change: a ROLLBACK undoes it, so names first staged inside a
        # transaction that rolls back must be registered again (see `transaction`).
        self._staged_in_transaction: list[str] = []
        self._checkpointer: _Checkpointer | None = None
        if not read_only and self.path != ":memory:":
            self._checkpointer = _Checkpointer(self._con, Path(self.path + ".wal"), self.memory)

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
            self._after_commit = []
        try:
            yield con
        except BaseException:
            if mine:
                self._after_commit = None
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
            if mine:
                callbacks, self._after_commit = self._after_commit or [], None
                for callback in callbacks:
                    callback()
        finally:
            if mine:
                self._staged_in_transaction.clear()
                self._after_commit = None

    def after_commit(self, callback: Callable[[], None]) -> None:
        if self._after_commit is None:
            callback()
        else:
            self._after_commit.append(callback)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self.memory.close()
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

    def __init__(self, con: duckdb.DuckDBPyConnection, wal: Path, memory: MemoryBudget | None = None):
        self._cursor = con.cursor()
        self._memory = memory
        con.execute(f"SET checkpoint_threshold = '{self.BACKSTOP}'")
        self._wal = wal
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="refinery-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self.INTERVAL_S):
            if self._memory is not None:
                self._memory.settle()
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


#: DuckDB's allocator returns freed memory to the system sooner than its defaults (128 MB kept per
#: thread, flushed only by the threads themselves); measured on the import: peak RSS -8 to -15%.
ALLOCATOR: dict[str, Any] = {"allocator_flush_threshold": "32MB", "allocator_background_threads": True}


class MemoryBudget:
    """DuckDB's memory limit: a steady one, raised to the batch one while any batch job runs, and
    lowered to a cap while a streaming job (an import) runs alone.

    The limit is the buffer pool's, for the whole database (any connection's `SET` applies to all).
    Lowering it makes DuckDB evict cached blocks at once (to `temp_directory` when they are not on
    disk yet); when it cannot free enough (pinned memory such as a loaded ART index, or a running
    query) the `SET` fails and the higher limit stays: `settle()`, called by the checkpointer's
    ticks, tries again until it holds. A batch job wins over a cap: both at once get the batch limit.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, steady: str, batch: str):
        self._cursor = con.cursor()
        self._lock = threading.Lock()
        self.steady, self.batch_limit = _checked_size(steady), _checked_size(batch)
        self._current = self.steady
        self._batches = 0
        self._caps: list[str] = []

    @property
    def current(self) -> str:
        return self._current

    def _target(self) -> str:
        if self._batches:
            return self.batch_limit
        if self._caps:
            return min([self.steady, *self._caps], key=parse_size)
        return self.steady

    def set_steady(self, limit: str) -> None:
        """Change the steady limit (the server lowers it for its lifetime)."""
        with self._lock:
            self.steady = _checked_size(limit)
            self._apply(self._target())

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Raise the limit to the batch one for the duration; nested and concurrent uses share it."""
        with self._lock:
            self._batches += 1
            self._apply(self._target())
        try:
            yield
        finally:
            with self._lock:
                self._batches -= 1
                self._apply(self._target())

    @contextmanager
    def capped(self, limit: str) -> Iterator[None]:
        """At most `limit` for the duration (unless a batch job runs meanwhile)."""
        cap = _checked_size(limit)
        with self._lock:
            self._caps.append(cap)
            self._apply(self._target())
        try:
            yield
        finally:
            with self._lock:
                self._caps.remove(cap)
                self._apply(self._target())

    def settle(self) -> None:
        """Retry a lowering that DuckDB refused earlier (nothing to do most of the time)."""
        if self._current != self._target():
            with self._lock:
                self._apply(self._target())

    def _apply(self, limit: str) -> None:
        if limit == self._current:
            return
        try:
            self._cursor.execute(f"SET memory_limit = '{limit}'")
            self._current = limit
        except duckdb.Error as e:  # cannot free enough yet: keep the higher limit, `settle` retries
            log.warning("DuckDB memory limit stays at %s for now (wanted %s): %s", self._current, limit, type(e).__name__)

    def close(self) -> None:
        with suppress(duckdb.Error):
            self._cursor.close()


_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b\s*", re.IGNORECASE)


def parse_size(limit: str) -> float:
    """Bytes in a DuckDB memory size (`256MB` is 256 * 1000**2, `2GiB` is 2 * 1024**3)."""
    m = _SIZE.fullmatch(limit)
    if m is None:
        raise StorageError(f"{limit!r} is not a memory size.", fix="Write it as a number and a unit, e.g. 256MB or 2GB.")
    unit = m.group(2).lower()
    base = 1024 ** "kmgt".index(unit) * 1024 if unit and m.group(3) else _UNITS[unit]
    return float(m.group(1)) * base


def _checked_size(limit: str) -> str:
    """A memory size from settings, checked before it reaches a SET."""
    parse_size(limit)
    return limit.strip()


def batch_memory(engine: Engine) -> AbstractContextManager[None]:
    """Raise the engine's memory limit for a batch job (a no-op for engines without one)."""
    memory = getattr(engine, "memory", None)
    return memory.batch() if isinstance(memory, MemoryBudget) else nullcontext()


def capped_memory(engine: Engine, limit: str) -> AbstractContextManager[None]:
    """Cap the engine's memory limit for a streaming job (a no-op for engines without one)."""
    memory = getattr(engine, "memory", None)
    return memory.capped(limit) if isinstance(memory, MemoryBudget) else nullcontext()


def steady_memory(engine: Engine, limit: str) -> None:
    """Set the engine's steady memory limit (a no-op for engines without one)."""
    memory = getattr(engine, "memory", None)
    if isinstance(memory, MemoryBudget):
        memory.set_steady(limit)


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
