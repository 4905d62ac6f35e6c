"""`refinery query`: read-only SQL over the zones, checked with sqlglot before it runs.

Only one SELECT (WITH, UNION, ... allowed) over Refinery's own tables runs; anything that writes,
reads files, attaches databases or reads the environment is refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError

from refinery.errors import QueryError
from refinery.storage.engine import Engine

#: Tables a user may read. Each later stage adds its curated tables here.
QUERYABLE_TABLES: set[str] = {
    "events", "raw_events", "failed_events", "imports", "schema_migrations", "message_ids",
}
#: Safe views over tables with secrets (the source list without key hashes).
QUERYABLE_VIEWS: dict[str, str] = {
    "sources": "SELECT name, kind, enabled, write_key_prefix, unplanned_events, rate_limit_per_second, created_at FROM sources",
}

_FORBIDDEN_FUNCTIONS = {
    "getenv", "read_csv", "read_csv_auto", "read_json", "read_json_auto", "read_json_objects", "read_ndjson",
    "read_ndjson_auto", "read_ndjson_objects", "read_parquet", "parquet_scan", "parquet_metadata", "parquet_schema",
    "read_text", "read_blob", "glob", "sniff_csv", "query", "query_table", "current_setting", "duckdb_settings",
    "duckdb_secrets", "duckdb_extensions", "which_secret", "read_xlsx",
}


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool

    def to_dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]


def check_read_only(sql: str, dialect: str = "duckdb") -> exp.Expression:
    """Parse `sql` and refuse anything but one read-only query over Refinery's tables."""
    try:
        statements = [s for s in sqlglot.parse(sql, read=dialect) if s is not None]
    except ParseError as e:
        err = e.errors[0] if e.errors else {}
        where = f" at line {err.get('line')}, column {err.get('col')}" if err else ""
        raise QueryError(f"The query does not parse{where}: {err.get('description', e)}.", fix="Check the SQL syntax.") from e
    if len(statements) != 1:
        raise QueryError(f"Send exactly one statement (got {len(statements)}).", fix="Remove the extra statements.")
    tree = statements[0]
    if not isinstance(tree, exp.Query) and not isinstance(tree, exp.Describe):
        raise QueryError(
            f"Only read-only queries run here; this is a {tree.key.upper()} statement.",
            fix="Use SELECT (with WITH/UNION as needed).",
        )
    ctes = {c.alias_or_name.lower() for c in tree.find_all(exp.CTE)}
    for node in tree.walk():
        if isinstance(node, (exp.Insert, exp.Update, exp.Delete, exp.Create, exp.Drop, exp.Alter, exp.Command, exp.Copy)):
            raise QueryError("The query tries to change data.", fix="Only read-only queries run here.")
        if isinstance(node, exp.Func):
            name = (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()
            if name in _FORBIDDEN_FUNCTIONS or name.startswith("read_"):
                raise QueryError(f"Function {name}() is not allowed in queries.", fix="Query Refinery's tables only.")
        if isinstance(node, exp.Table):
            if not isinstance(node.this, exp.Identifier):
                raise QueryError("Table functions are not allowed in queries.", fix="Query Refinery's tables only.")
            name = node.name.lower()
            if node.args.get("db") or node.args.get("catalog"):
                raise QueryError(f"Qualified table {node.sql()} is not allowed.", fix="Use the bare table names.")
            if name not in ctes and name not in QUERYABLE_TABLES and name not in QUERYABLE_VIEWS:
                known = ", ".join(sorted(QUERYABLE_TABLES | set(QUERYABLE_VIEWS)))
                raise QueryError(f"Unknown table {node.name!r}.", fix=f"Query one of: {known}.")
    return tree


def run_query(engine: Engine, sql: str, *, limit: int | None = 10_000) -> QueryResult:
    tree = check_read_only(sql, engine.dialect)
    # Swap the sensitive tables for their safe views.
    for table in list(tree.find_all(exp.Table)):
        view = QUERYABLE_VIEWS.get(table.name.lower())
        if view is not None:
            table.replace(exp.Subquery(this=sqlglot.parse_one(view, read=engine.dialect), alias=exp.TableAlias(this=exp.to_identifier(table.alias_or_name))))
    cursor = engine.reader()
    try:
        result: pa.Table = engine.fetch_arrow(tree, cursor=cursor)
    except Exception as e:
        raise QueryError(f"The query failed: {getattr(e, 'message', e)}", fix="Check column and table names with: refinery query \"DESCRIBE events\"") from e
    truncated = limit is not None and result.num_rows > limit
    if truncated:
        result = result.slice(0, limit)
    columns = result.column_names
    rows = [tuple(r.values()) for r in result.to_pylist()]
    return QueryResult(columns, rows, truncated)
