"""The engine seam: every query is a sqlglot expression rendered for the engine at the last moment.

An engine declares its differences as data (`dialect`, `capabilities`); business logic never asks
which engine it is talking to. Orchestration (`execute`, `render`, error wrapping) is final here;
an engine implements a handful of hooks, as splink's database API does.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast, final

import pyarrow as pa
import sqlglot
from sqlglot import exp

from refinery.errors import StorageError

Params = Sequence[Any] | dict[str, Any] | None
SQL = exp.Expression | str


class ConstraintViolation(StorageError):
    """A statement broke a key or constraint (e.g. a duplicate primary key). Engines raise it for
    their driver's constraint errors, so callers can tell "this row exists" from a broken store
    without knowing the driver. The statement's transaction is then aborted: roll it back."""


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do, declared once; consulted by planners, never by `if engine ==`."""

    transactions: bool = True
    unique_indexes: bool = True
    json_merge_patch: bool = True
    arrow_scans: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def parse(sql: str, dialect: str = "duckdb") -> exp.Expression:
    """Parse a constant SQL template (never user text) into an expression."""
    return cast(exp.Expression, sqlglot.parse_one(sql, read=dialect))


class Engine(abc.ABC):
    """A small engine interface: render expressions, run them, move Arrow tables in and out."""

    dialect: str
    capabilities: Capabilities

    @final
    def render(self, sql: SQL) -> str:
        if isinstance(sql, str):
            return sql
        return sql.sql(dialect=self.dialect)

    @final
    def execute(self, sql: SQL, params: Params = None, *, cursor: Any = None) -> Any:
        text = self.render(sql)
        try:
            return self._execute(text, params, cursor)
        except StorageError:
            raise
        except Exception as e:  # the driver's own errors, re-raised with the SQL that failed
            raise StorageError(f"{type(e).__name__}: {e}", sql=text) from e

    @final
    def fetch_arrow(self, sql: SQL, params: Params = None, *, cursor: Any = None) -> pa.Table:
        text = self.render(sql)
        try:
            return self._fetch_arrow(text, params, cursor)
        except Exception as e:
            raise StorageError(f"{type(e).__name__}: {e}", sql=text) from e

    @final
    def stream_arrow(self, sql: SQL, params: Params = None, *, batch_size: int = 131_072, cursor: Any = None) -> pa.RecordBatchReader:
        """Run `sql` and return its rows as a stream of Arrow batches, in order, without materialising
        the result (batch imports of files larger than memory read through this)."""
        text = self.render(sql)
        try:
            return self._stream_arrow(text, params, batch_size, cursor)
        except Exception as e:
            raise StorageError(f"{type(e).__name__}: {e}", sql=text) from e

    @final
    def fetch_all(self, sql: SQL, params: Params = None, *, cursor: Any = None) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self.execute(sql, params, cursor=cursor).fetchall()
        return rows

    @final
    def fetch_dicts(self, sql: SQL, params: Params = None, *, cursor: Any = None) -> list[dict[str, Any]]:
        return self.fetch_arrow(sql, params, cursor=cursor).to_pylist()

    def execute_reused(self, sql: str) -> Any:
        """Run a constant statement that the writer runs again and again (a group commit's INSERTs).

        An engine that can plan a statement once and reuse the plan does so (planning the cleaning
        SQL costs more than running it on a few hundred rows); the default simply executes it.
        Only for parameter-free text that never contains user input; it reads rows staged with
        `stage`, never a table passed to `register` (a reused plan may hold on to that table).
        """
        return self.execute(sql)

    def stage(self, name: str, table: pa.Table) -> None:
        """Expose `table` under `name` in place of the rows staged there before (the writer's inbox)."""
        self.register(name, table)

    # --- hooks an engine implements -------------------------------------------------------
    @abc.abstractmethod
    def _execute(self, sql: str, params: Params, cursor: Any) -> Any: ...

    @abc.abstractmethod
    def _fetch_arrow(self, sql: str, params: Params, cursor: Any) -> pa.Table: ...

    @abc.abstractmethod
    def _stream_arrow(self, sql: str, params: Params, batch_size: int, cursor: Any) -> pa.RecordBatchReader: ...

    @abc.abstractmethod
    def register(self, name: str, table: pa.Table, *, cursor: Any = None) -> None:
        """Expose an Arrow table to SQL under `name` (the staging path for writes)."""

    @abc.abstractmethod
    def unregister(self, name: str, *, cursor: Any = None) -> None: ...

    @abc.abstractmethod
    def reader(self) -> Any:
        """A cursor for reads on the calling thread; readers never block the writer."""

    @abc.abstractmethod
    def fresh_reader(self) -> Any:
        """A new read cursor of its own (for one user query that may be interrupted); close it after."""

    @abc.abstractmethod
    def interrupt(self, cursor: Any) -> None:
        """Stop the statement running on `cursor` (from another thread); it fails with an error."""

    @abc.abstractmethod
    @contextmanager
    def transaction(self, cursor: Any = None) -> Iterator[Any]: ...

    @abc.abstractmethod
    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once the writer's open transaction commits (never if it rolls back);
        at once when no transaction is open. For in-memory state that must only ever describe
        what is on disk (caches of rows written)."""

    @abc.abstractmethod
    def close(self) -> None: ...
