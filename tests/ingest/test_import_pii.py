"""The import's SQL tokens equal the Tokeniser's (the collector's reference), for any value:
printable ASCII through DuckDB's HMAC, the rest through the per-distinct-value Python function."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlglot import exp

from refinery.ingest.import_pii import PiiSql, bind
from refinery.privacy.tokens import Tokeniser, is_token

TOKENISER = Tokeniser(os.urandom(32))
KINDS = ("email", "name", "first_name", "phone", "address")


@pytest.fixture(scope="module")
def con() -> Iterator[duckdb.DuckDBPyConnection]:
    c = duckdb.connect()
    yield c
    c.close()


def sql_tokens(con: duckdb.DuckDBPyConnection, kind: str, values: list[Any], regions: list[str | None], *, as_text: bool) -> list[tuple[Any, Any]]:
    """(token, normal) of each value by the import's SQL: `as_text` for text columns (CSV, string
    type), else for JSON values of any type (JSON lines, Parquet, typed columns)."""
    pii = PiiSql()
    if as_text:
        token, normal = pii.protect(kind, exp.column("v"), exp.column("t"), exp.column("region"))
    else:
        token, normal = pii.protect(kind, exp.column("v"), None, exp.column("region"))
    table = pa.table({
        "i": pa.array(range(len(values)), pa.int64()),
        "t": pa.array([v if isinstance(v, str) or v is None else None for v in values], pa.string()),
        "j": pa.array([None if v is None else orjson.dumps(v).decode() for v in values], pa.string()),
        "region": pa.array(regions, pa.string()),
    })
    con.register("_vals", table)
    value = "to_json(t)" if as_text else "CAST(j AS JSON)"
    query = f"SELECT {token.sql('duckdb')}, {normal.sql('duckdb')} FROM (SELECT i, t, region, {value} AS v FROM _vals) ORDER BY i"  # noqa: S608 - built here
    try:
        with bind(con, TOKENISER, pii):
            return [tuple(r) for r in con.execute(query).fetchall()]
    finally:
        con.unregister("_vals")


def expected(kind: str, value: Any, region: str | None) -> tuple[Any, Any]:
    """What `protect_event` does with the value: nothing for None, "" and tokens; else its token."""
    if value is None or value == "" or is_token(value):
        return (None, None)
    return TOKENISER.tokenise(kind, value, region)


ascii_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
any_text = st.text(max_size=30)
emails = st.builds(lambda a, b, pad: f"{pad}{a}@{b}.COM{pad}", st.from_regex(r"[A-Za-z0-9._%+-]{1,12}", fullmatch=True),
                   st.from_regex(r"[A-Za-z0-9-]{1,10}", fullmatch=True), st.sampled_from(["", " ", "  "]))
phones = st.one_of(st.from_regex(r"\+?[0-9 ()-]{6,16}", fullmatch=True), st.sampled_from(["+44 20 7946 0101", "(212) 555-0199", "070-123 45 67"]))
regions = st.one_of(st.none(), st.sampled_from(["GB", "US", "SE", "de", "", "XX", "Sweden"]))


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(KINDS), values=st.lists(st.one_of(ascii_text, any_text, emails, phones, st.none()), max_size=25),
       data=st.data())
def test_text_values_get_the_tokenisers_tokens(con: duckdb.DuckDBPyConnection, kind: str, values: list[Any], data: Any) -> None:
    rs = data.draw(st.lists(regions, min_size=len(values), max_size=len(values)))
    got = sql_tokens(con, kind, values, rs, as_text=True)
    assert got == [expected(kind, v, r) for v, r in zip(values, rs, strict=True)]


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False),
              ascii_text, any_text),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6,
)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(KINDS), values=st.lists(json_values, max_size=20), data=st.data())
def test_json_values_of_any_type_get_the_tokenisers_tokens(con: duckdb.DuckDBPyConnection, kind: str, values: list[Any], data: Any) -> None:
    rs = data.draw(st.lists(regions, min_size=len(values), max_size=len(values)))
    got = sql_tokens(con, kind, values, rs, as_text=False)
    # the collector sees the value JSON gives back (a JSON number's own text, re-read), as the import's payload holds it
    want = [expected(kind, orjson.loads(orjson.dumps(v)), r) for v, r in zip(values, rs, strict=True)]
    assert got == want


def test_tokens_are_left_alone_and_the_key_is_not_in_the_sql(con: duckdb.DuckDBPyConnection) -> None:
    token = TOKENISER.token("email", "a@b.co")
    assert sql_tokens(con, "email", [token, "", None, " A@B.co "], [None] * 4, as_text=True) == [
        (None, None), (None, None), (None, None), (token, "a@b.co")]
    pii = PiiSql()
    text = pii.protect("email", exp.column("v"), exp.column("t"), exp.Null())[0].sql("duckdb")
    assert TOKENISER.key.hex() not in text.lower() and "getvariable" in text.lower()
