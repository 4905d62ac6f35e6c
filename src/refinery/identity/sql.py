"""SQL plumbing for the identity stage: constant templates (DuckDB dialect, parsed by sqlglot) with
slots filled by sqlglot expressions, handed to the engine, which renders them for its dialect.

User text (blocked values, patterns, JSON paths, thresholds) only ever enters as sqlglot literals.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from sqlglot import exp

from refinery.storage.engine import Engine, parse


@lru_cache(maxsize=512)
def _parsed(sql: str) -> exp.Expression:
    return parse(sql, "duckdb")


def template(sql: str, **slots: exp.Expression) -> exp.Expression:
    """Parse a constant template; a column or table named `__name` is replaced by `slots[name]`."""
    tree = _parsed(sql).copy()
    if not slots:
        return tree
    for col in list(tree.find_all(exp.Column)):
        name = col.name
        if name.startswith("__") and name[2:] in slots:
            value = slots[name[2:]].copy()
            atomic = isinstance(value, exp.Column | exp.Literal | exp.Func | exp.Cast | exp.Case | exp.Paren | exp.Array | exp.Null | exp.Boolean)
            col.replace(value if atomic else exp.Paren(this=value))
    for table in list(tree.find_all(exp.Table)):
        if table.name.startswith("__") and table.name[2:] in slots:
            replacement = slots[table.name[2:]].copy()
            if table.args.get("alias") is not None:
                replacement.set("alias", table.args["alias"].copy())
            table.replace(replacement)
    return tree


@lru_cache(maxsize=512)
def _fragment(text: str) -> exp.Expression:
    return exp.maybe_parse(text, dialect="duckdb")


def fragment(text: str) -> exp.Expression:
    """Parse a constant SQL expression (never user text), e.g. a column or function call."""
    return _fragment(text).copy()


def run(engine: Engine, sql: str, **slots: exp.Expression) -> Any:
    return engine.execute(template(sql, **slots))


def scalar(engine: Engine, sql: str, **slots: exp.Expression) -> Any:
    rows = engine.fetch_all(template(sql, **slots))
    return rows[0][0] if rows else None


def lit(value: str | int | float | bool | None) -> exp.Expression:
    if value is None:
        return exp.Null()
    if isinstance(value, bool):
        return exp.Boolean(this=value)
    if isinstance(value, int | float):
        return exp.Literal.number(value)
    return exp.Literal.string(value)


def in_list(column: exp.Expression, values: list[str] | tuple[str, ...]) -> exp.Expression:
    """`column IN (...)` with literals; FALSE for an empty list."""
    if not values:
        return exp.false()
    return exp.In(this=column, expressions=[lit(v) for v in values])


def case_map(column: exp.Expression, mapping: dict[str, int], default: int) -> exp.Expression:
    """CASE column WHEN 'k' THEN v ... ELSE default END."""
    case = exp.Case(this=column.copy())
    for k, v in mapping.items():
        case = case.when(lit(k), lit(v))
    return case.else_(lit(default))
