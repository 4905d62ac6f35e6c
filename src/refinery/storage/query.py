"""`refinery query`: read-only SQL over the zones, checked with sqlglot before it runs.

Only one SELECT (WITH, UNION, ... allowed) over Refinery's own tables runs; anything that writes,
reads files, attaches databases, reads settings or the environment is refused with the reason.

Defence in depth, in order:
1. the text is parsed once; what runs is the *parsed tree rendered again*, comments stripped, so
   the engine never sees text the checker did not understand;
2. exactly one statement, and it must be a query (or DESCRIBE of one);
3. every table is either one of ours or a CTE visible where it is used; CTEs are renamed to inert
   names, so a CTE called "data.csv" cannot make the engine read a file in another scope;
4. table functions are refused (but `range`, `generate_series`, `unnest`), and so are scalar
   functions with side effects or that reveal the environment (`getenv`, `nextval`, ...);
5. tables with secrets are swapped for safe views; results are capped with an outer LIMIT.

Callers without `pii:read` run `run_aggregate_query` instead: the same checks, then only one
aggregate SELECT over one person-keyed table, whose groups of fewer than k distinct people are not
returned (`refinery.governance.kanon`, docs/decisions/0017-k-anonymity.md).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, SqlglotError

from refinery.errors import QueryError
from refinery.storage.engine import Engine

#: Tables a user may read. Each later stage adds its curated tables here.
QUERYABLE_TABLES: set[str] = {
    # ingest and storage
    "events", "raw_events", "failed_events", "imports", "schema_migrations", "message_ids",
    # identity
    "identities", "identity_edges", "identity_links", "identity_blocked", "profile_merges", "identity_resolutions",
    "identity_overrides",
    # governance
    "consent_log", "consent_conflicts", "consent_syncs",
    "retention_overrides", "retention_runs",  # retention
    # profiles
    "profiles", "event_profiles",
    # segments
    "segments", "segment_versions", "segment_members", "segment_runs", "segment_events",
    "computed_traits", "computed_trait_values",
    # activation (destination secrets are in their own table, never queryable)
    "destinations", "syncs", "sync_state", "sync_runs", "activation_batches", "activation_records", "activation_dead_letters",
    # features
    "features", "feature_versions",
}
#: Safe views over tables with secrets (the source list without key hashes).
QUERYABLE_VIEWS: dict[str, str] = {
    "sources": "SELECT name, kind, enabled, write_key_prefix, unplanned_events, rate_limit_per_second, created_at FROM sources",
    # governance: tokens without their hashes; the audit log as it is (it holds no secrets or values)
    "api_tokens": "SELECT token_id, name, token_prefix, role, sources, created_at, created_by, expires_at, revoked_at, revoked_by FROM api_tokens",
    "audit_log": "SELECT seq, recorded_at, actor_id, actor_name, actor_role, action, object, details, prev_hash, hash FROM audit_log",
}

#: Scalar functions that write, sleep, or reveal settings, the environment or other queries.
_FORBIDDEN_FUNCTIONS = frozenset({
    "getenv", "current_setting", "getvariable", "nextval", "setval", "currval", "write_log", "sleep_ms",
    "pg_sleep", "setseed", "json_execute_serialized_sql", "query", "query_table", "glob", "sniff_csv",
    "which_secret", "checkpoint", "force_checkpoint", "txid_current", "current_query", "json_serialize_plan",
})
_FORBIDDEN_PREFIXES = ("read_", "parquet_", "duckdb_", "pragma_", "enable_", "disable_", "python_", "arrow_")
#: Table functions that only generate values.
_SAFE_TABLE_FUNCTIONS = (exp.GenerateSeries, exp.Unnest)


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool
    #: aggregate queries (`run_aggregate_query`): groups not shown, having fewer than `min_group_size` people
    suppressed_groups: int | None = None
    min_group_size: int | None = None

    def to_dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        """The API's answer: columns, rows, truncated, and for aggregate queries what was suppressed."""
        body: dict[str, Any] = {"columns": self.columns, "rows": [list(r) for r in self.rows], "truncated": self.truncated}
        if self.suppressed_groups is not None:
            body.update(suppressed_groups=self.suppressed_groups, min_group_size=self.min_group_size)
        return body


def _refuse(message: str, fix: str = "Query Refinery's tables only, with SELECT.") -> QueryError:
    return QueryError(message, fix=fix)


def _parse(sql: str, dialect: str) -> exp.Expression:
    sqlglot_log = logging.getLogger("sqlglot")
    level = sqlglot_log.level
    sqlglot_log.setLevel(logging.ERROR)  # its "falling back to Command" warning would log the query text
    try:
        statements = [s for s in sqlglot.parse(sql, read=dialect) if s is not None]
    except ParseError as e:
        err = e.errors[0] if e.errors else {}
        where = f" at line {err.get('line')}, column {err.get('col')}" if err else ""
        raise QueryError(f"The query does not parse{where}: {err.get('description', e)}.", fix="Check the SQL syntax.") from e
    except SqlglotError as e:
        raise QueryError(f"The query does not parse: {e}.", fix="Check the SQL syntax.") from e
    finally:
        sqlglot_log.setLevel(level)
    if len(statements) != 1:
        raise _refuse(f"Send exactly one statement (got {len(statements)}).", "Remove the extra statements.")
    tree: exp.Expression = statements[0]  # type: ignore[assignment]
    return tree


def _function_name(node: exp.Func) -> str:
    return (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()


def _visible_cte(table: exp.Table) -> exp.CTE | None:
    """The CTE a table name refers to: the nearest enclosing WITH that defines the name."""
    name = table.name.lower()
    node: Any = table.parent
    while node is not None:
        with_ = node.args.get("with_") or node.args.get("with")
        if isinstance(with_, exp.With):
            for cte in with_.expressions:
                if cte.alias_or_name.lower() == name:
                    return cte if isinstance(cte, exp.CTE) else None
        node = node.parent
    return None


def check_read_only(sql: str, dialect: str = "duckdb") -> exp.Expression:
    """Parse `sql`, refuse anything but one read-only query over Refinery's tables, and return the
    tree that may run (comments stripped, CTEs renamed, views substituted)."""
    tree = _parse(sql, dialect)
    if isinstance(tree, exp.Describe):
        if not isinstance(tree.this, (exp.Table, exp.Query)):
            raise _refuse("DESCRIBE takes a table name or a query.", "e.g. DESCRIBE events")
    elif not isinstance(tree, exp.Query):
        raise _refuse(f"Only read-only queries run here; this is a {tree.key.upper()} statement.", "Use SELECT (with WITH/UNION as needed).")

    for node in tree.walk():
        node.comments = None
        if isinstance(node, (exp.DML, exp.DDL, exp.Command, exp.Copy, exp.Set, exp.Pragma, exp.Attach, exp.Detach, exp.Into)):
            raise _refuse("The query tries to change data or settings.", "Only read-only queries run here.")
        if isinstance(node, exp.Func) and not isinstance(node, _SAFE_TABLE_FUNCTIONS):
            name = _function_name(node)
            if name in _FORBIDDEN_FUNCTIONS or name.startswith(_FORBIDDEN_PREFIXES) or name.endswith("_scan"):
                raise _refuse(f"Function {name}() is not allowed in queries.", "Use the tables and ordinary functions only.")

    known = ", ".join(sorted(QUERYABLE_TABLES | set(QUERYABLE_VIEWS)))
    ctes = list(tree.find_all(exp.CTE))
    new_names = {id(cte): f"_cte{i}" for i, cte in enumerate(ctes)}
    renames: list[tuple[exp.Table, str]] = []
    views: list[exp.Table] = []
    for table in list(tree.find_all(exp.Table)):
        if not isinstance(table.this, exp.Identifier):
            if isinstance(table.this, _SAFE_TABLE_FUNCTIONS):
                continue
            raise _refuse("Table functions (reading files, settings or other databases) are not allowed.")
        if table.args.get("db") or table.args.get("catalog"):
            raise _refuse(f"Qualified table {table.sql(dialect)} is not allowed.", f"Use the bare table names: {known}.")
        cte = _visible_cte(table)
        if cte is not None:
            renames.append((table, new_names[id(cte)]))
        elif table.name.lower() in QUERYABLE_VIEWS:
            views.append(table)
        elif table.name.lower() not in QUERYABLE_TABLES:
            raise _refuse(f"Unknown table {table.name!r}.", f"Query one of: {known}.")

    for table, new in renames:
        alias = table.alias or table.name
        table.set("this", exp.to_identifier(new))
        table.set("alias", exp.TableAlias(this=exp.to_identifier(alias)))
    for cte in ctes:
        cte.args["alias"].set("this", exp.to_identifier(new_names[id(cte)]))
    for table in views:
        view = sqlglot.parse_one(QUERYABLE_VIEWS[table.name.lower()], read="duckdb")
        table.replace(exp.Subquery(this=view, alias=exp.TableAlias(this=exp.to_identifier(table.alias_or_name))))
    return tree


def run_query(engine: Engine, sql: str, *, limit: int | None = 10_000, timeout: float | None = 60.0) -> QueryResult:
    """Check and run one read-only query; at most `limit` rows come back (`truncated` says if more
    exist), and a query still running after `timeout` seconds is stopped with a clear error."""
    tree = check_read_only(sql, engine.dialect)
    return _run(engine, tree, limit=limit, timeout=timeout)


def run_aggregate_query(engine: Engine, sql: str, *, min_group_size: int, limit: int | None = 10_000,
                        timeout: float | None = 60.0) -> QueryResult:
    """`run_query` for callers without `pii:read`: only one aggregate SELECT over one person-keyed
    table (`kanon.PERSON_TABLES`, each with a `_person` column) runs, and only its groups of at
    least `min_group_size` distinct people come back; `suppressed_groups` counts the others.
    `DESCRIBE` of a person-keyed table runs as it is (it shows columns, no data)."""
    from refinery.governance import kanon

    kanon.check_k(min_group_size)
    tree = check_read_only(sql, engine.dialect)
    if isinstance(tree, exp.Describe):
        target = tree.this
        if not (isinstance(target, exp.Table) and target.name.lower() in kanon.PERSON_TABLES):
            raise _refuse("Without pii:read, DESCRIBE takes one of: " + ", ".join(sorted(kanon.PERSON_TABLES)) + ".",
                          "e.g. DESCRIBE events")
        return _run(engine, tree, limit=limit, timeout=timeout)
    select = kanon.person_keyed(kanon.check_aggregate(tree), dialect=engine.dialect)
    shown, counted = kanon.threshold(select, min_group_size)
    result = _run(engine, shown, limit=limit, timeout=timeout)
    suppressed = _run(engine, counted, limit=None, timeout=timeout).rows[0][0]
    result.suppressed_groups, result.min_group_size = int(suppressed), min_group_size
    return result


def _run(engine: Engine, tree: exp.Expression, *, limit: int | None, timeout: float | None) -> QueryResult:
    if limit is not None and isinstance(tree, exp.Query):
        # Cap in the engine, not after fetching everything: a cross join must not fill memory.
        tree = exp.select("*").from_(tree.subquery("_q")).limit(limit + 1)
    cursor = engine.fresh_reader()  # its own cursor: stopping it can touch no other query
    timer = threading.Timer(timeout, engine.interrupt, [cursor]) if timeout else None
    try:
        if timer is not None:
            timer.start()
        result: pa.Table = engine.fetch_arrow(tree, cursor=cursor)
    except Exception as e:
        if timer is not None and timer.finished.is_set():
            raise QueryError(
                f"The query ran longer than {timeout:g} s and was stopped.",
                fix="Narrow it (a WHERE on timestamp or source, fewer joins), or raise the query_timeout_seconds setting.",
            ) from e
        detail = str(getattr(e, "message", e)).split("\nSQL:")[0]
        raise QueryError(f"The query failed: {detail}", fix='Check column and table names with: refinery query "DESCRIBE events"') from e
    finally:
        if timer is not None:
            timer.cancel()
        cursor.close()
    truncated = limit is not None and result.num_rows > limit
    if truncated:
        result = result.slice(0, limit)
    rows = [tuple(r.values()) for r in result.to_pylist()]
    return QueryResult(result.column_names, rows, truncated)
