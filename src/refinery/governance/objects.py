"""What a request touches, for scope checks and audit rows: the source of an import, the tables a
query reads. Names only, never values."""

from __future__ import annotations

from typing import Any

from sqlglot import exp

from refinery.storage.query import QUERYABLE_TABLES, QUERYABLE_VIEWS, check_read_only


def import_source(runtime: Any, import_id: str) -> str | None:
    """The source an import job loads into (None when there is no such job)."""
    rows = runtime.engine.fetch_all("SELECT source FROM imports WHERE import_id = ?", [import_id], cursor=runtime.engine.reader())
    return str(rows[0][0]) if rows else None


def queried_tables(sql: str, dialect: str = "duckdb") -> list[str]:
    """Refinery's tables (and safe views) a read-only query reads, sorted."""
    ours = QUERYABLE_TABLES | set(QUERYABLE_VIEWS)
    return sorted({t.name.lower() for t in check_read_only(sql, dialect).find_all(exp.Table)} & ours)
