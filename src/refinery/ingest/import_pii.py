"""Pseudonymisation inside the import's SELECT: the collector's tokens, computed in SQL.

An imported row must carry the same tokens in `events` as the same values sent to the collector,
whose `Tokeniser.protect_event` (privacy/tokens.py) is the reference. A token is
`pii:<kind>:` + the first 32 hex digits of HMAC-SHA256(token key, kind 0x1f normal form):

- printable-ASCII text of any kind but phone: the normal form is `trim` (and `lower` for
  emails), exactly what `clean_text` gives such text, and the HMAC is computed in DuckDB:
  sha256(opad || unhex(sha256(ipad || bytes))). The key's pads are connection variables set
  from bound parameters (`bind`): they never appear in SQL text, logs or errors.
- phones, other text, numbers, booleans, objects: a vectorised Python function (`pii_py_<id>`)
  calls the `Tokeniser` once per distinct value in each vector (it memoises text values).

A property test (tests/ingest/test_import_pii.py) checks that both paths give the Tokeniser's
token and normal form. Values that already are tokens, nulls and empty strings stay as they are,
as `protect_event` leaves them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa
from sqlglot import exp

from refinery.privacy.tokens import TOKEN_PATTERN, PiiPolicy, Tokeniser, kind_of
from refinery.storage.engine import parse

_BLOCK = 64  # SHA-256's block size: HMAC pads the key to it
_IPAD_VAR = "refinery_pii_ipad"
_OPAD_VAR = "refinery_pii_opad"
_PY_RESULT = pa.struct([("token", pa.string()), ("normal", pa.string())])


@dataclass(frozen=True)
class PiiSlot:
    """One personal field of a mapping: where it goes (`traits.email`) and its token kind."""

    group: str  # traits | properties
    name: str
    kind: str


def pii_fields(policy: PiiPolicy | None, group: str, names: list[str]) -> dict[str, str]:
    """Which of `names` (fields of `group`) are personal under `policy`: name -> token kind."""
    if policy is None or not policy.enabled:
        return {}
    listed = policy.trait_fields if group == "traits" else policy.property_fields
    return {n: kind_of(n) for n in names if n in listed}


def _lit(value: str) -> exp.Expr:
    return exp.Literal.string(value)


def _tpl(sql: str, **slots: exp.Expr) -> exp.Expression:
    tree = parse(sql)
    for col in list(tree.find_all(exp.Column)):
        if col.name.startswith("__") and col.name[2:] in slots:
            col.replace(exp.Paren(this=slots[col.name[2:]].copy()))
    return tree


def hmac_token_sql(kind: str, normal: exp.Expr) -> exp.Expression:
    """`pii:<kind>:<hex>` of a normal form, in SQL (the key pads come from `bind`'s variables)."""
    return _tpl(
        "__prefix || left(sha256(getvariable('" + _OPAD_VAR + "') || unhex(sha256(getvariable('" + _IPAD_VAR + "') "
        "|| encode(__kind || chr(31) || __n)))), 32)",
        prefix=_lit(f"pii:{kind}:"), kind=_lit(kind), n=normal,
    )


def sql_normal(kind: str, text: exp.Expr) -> exp.Expression:
    """The normal form of printable-ASCII text (what `clean_text` gives it), in SQL."""
    return _tpl("lower(trim(__t))" if kind == "email" else "trim(__t)", t=text)


def _simple(kind: str, text: exp.Expr) -> exp.Expression:
    """Whether SQL can normalise `text` itself (mirrors `privacy.normalise.needs_python`)."""
    if kind == "phone":
        return exp.false()
    return _tpl("regexp_full_match(__t, '[ -~]*')", t=text)


class PiiSql:
    """Builds the token and normal-form expressions of one import's personal fields."""

    def __init__(self) -> None:
        self.udf = "pii_py_" + uuid.uuid4().hex[:12]  # functions are visible database-wide: one name per import
        self.used_udf = False

    def _py(self, kind: str, json_text: exp.Expr, region: exp.Expr) -> exp.Expression:
        self.used_udf = True
        return exp.Anonymous(this=self.udf, expressions=[_lit(kind), json_text.copy(), region.copy()])

    def protect(self, kind: str, value: exp.Expr, text: exp.Expr | None, region: exp.Expr) -> tuple[exp.Expression, exp.Expression]:
        """(token, normal) of a JSON `value` (NULL token: leave the value as it is). `text`, when
        given, is the value's text and the value is known to be `to_json(text)` (a string or NULL)."""
        if text is None:
            text = _tpl("CASE WHEN json_type(__v) = 'VARCHAR' THEN __v ->> '$' END", v=value)
            other = _tpl("__v IS NOT NULL AND json_type(__v) NOT IN ('VARCHAR', 'NULL')", v=value)
        else:
            other = exp.false()
        skip = _tpl(f"__t IS NULL OR __t = '' OR regexp_full_match(__t, '{TOKEN_PATTERN}')", t=text)
        simple = _simple(kind, text)
        py_text = self._py(kind, _tpl("CAST(to_json(__t) AS VARCHAR)", t=text), region)
        py_other = self._py(kind, _tpl("CAST(__v AS VARCHAR)", v=value), region)
        normal_sql = sql_normal(kind, text)
        normal = exp.Case().when(other.copy(), exp.Dot(this=exp.Paren(this=py_other.copy()), expression=exp.to_identifier("normal")))
        normal = normal.when(skip.copy(), exp.Null()).when(simple.copy(), normal_sql.copy())
        normal = normal.else_(exp.Dot(this=exp.Paren(this=py_text.copy()), expression=exp.to_identifier("normal")))
        token = exp.Case().when(other.copy(), exp.Dot(this=exp.Paren(this=py_other), expression=exp.to_identifier("token")))
        token = token.when(skip, exp.Null()).when(simple, hmac_token_sql(kind, normal_sql))
        token = token.else_(exp.Dot(this=exp.Paren(this=py_text), expression=exp.to_identifier("token")))
        return token, normal


def python_tokens(tokeniser: Tokeniser) -> Any:
    """The vectorised function behind `pii_py_<id>(kind, json text, region)` -> {token, normal}."""

    def fn(kinds: pa.Array, texts: pa.Array, regions: pa.Array) -> pa.Array:
        out: list[dict[str, str] | None] = []
        memo: dict[tuple[Any, Any, Any], dict[str, str] | None] = {}
        for key in zip(kinds.to_pylist(), texts.to_pylist(), regions.to_pylist(), strict=True):
            hit = memo.get(key, ...)
            if hit is ...:
                kind, text, region = key
                hit = None
                if text is not None:
                    try:
                        value = orjson.loads(text)
                    except orjson.JSONDecodeError:
                        value = text
                    if value is not None:
                        token, normal = tokeniser.tokenise(kind, value, region if isinstance(region, str) else None)
                        hit = {"token": token, "normal": normal}
                memo[key] = hit
            out.append(hit)
        return pa.array(out, _PY_RESULT)

    return fn


@contextmanager
def bind(cursor: Any, tokeniser: Tokeniser, sql: PiiSql) -> Iterator[None]:
    """Make `sql`'s expressions runnable on `cursor` (a DuckDB connection): the key pads as
    connection variables (bound parameters, never SQL text) and the Python function."""
    import duckdb

    key = tokeniser.key
    if len(key) > _BLOCK:
        raise ValueError("token keys longer than 64 bytes are not supported by the SQL path")
    padded = key.ljust(_BLOCK, b"\0")
    cursor.execute(f"SET VARIABLE {_IPAD_VAR} = ?", [bytes(b ^ 0x36 for b in padded)])
    cursor.execute(f"SET VARIABLE {_OPAD_VAR} = ?", [bytes(b ^ 0x5C for b in padded)])
    registered = False
    try:
        if sql.used_udf:
            cursor.create_function(
                sql.udf, python_tokens(tokeniser), ["VARCHAR", "VARCHAR", "VARCHAR"],
                duckdb.struct_type({"token": "VARCHAR", "normal": "VARCHAR"}), type="arrow", null_handling="special",
            )
            registered = True
        yield
    finally:
        for var in (_IPAD_VAR, _OPAD_VAR):
            with suppress(Exception):
                cursor.execute(f"RESET VARIABLE {var}")
        if registered:
            with suppress(Exception):
                cursor.remove_function(sql.udf)


def region_expr(traits: list[tuple[str, exp.Expr]]) -> exp.Expr:
    """The phone region `protect_event` uses: the `country` trait when it is a string, else NULL."""
    for name, value in traits:
        if name == "country":
            return _tpl("CASE WHEN json_type(__v) = 'VARCHAR' THEN __v ->> '$' END", v=value)
    return exp.Null()
