"""Read-only query: allowed queries return the right rows; every escape attempt is refused.

Each escape test has something real to steal: a CSV file in the working directory, an
environment variable, a second database, and a sequence that `nextval` would advance.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from refinery.errors import QueryError
from refinery.runtime import Runtime
from refinery.storage.query import check_read_only, run_query


def _add_events(rt: Runtime, rows: list[tuple[str, str, str]]) -> None:
    """Insert (message_id, type, event) rows into the clean zone."""
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    def write(e):  # type: ignore[no-untyped-def]
        for mid, typ, name in rows:
            e.execute(
                "INSERT INTO events (message_id, source, type, event, user_id, timestamp, received_at, properties, loaded_at) "
                "VALUES (?, 'web', ?, ?, 'u1', ?, ?, ?, ?)",
                [mid, typ, name, now, now, json.dumps({"n": len(mid)}), now],
            )

    rt.writer.call(write)


@pytest.fixture
def loaded(runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    _add_events(runtime, [("m1", "track", "A"), ("m2", "track", "B"), ("m3", "page", None), ("m44", "track", "A")])  # type: ignore[list-item]
    # Bait for file-reading escapes: a CSV and a DuckDB file in the working directory.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.csv").write_text("password\nhunter2\n")
    other = duckdb.connect(str(tmp_path / "other.duckdb"))
    other.execute("CREATE TABLE loot AS SELECT 'hunter2' AS password")
    other.close()
    monkeypatch.setenv("REFINERY_TEST_SECRET", "hunter2")
    return runtime


# --- allowed queries return correct rows --------------------------------------------------------

def test_select_group_by_returns_the_counts(loaded: Runtime) -> None:
    r = run_query(loaded.engine, "SELECT type, count(*) AS n FROM events GROUP BY type ORDER BY type")
    assert r.columns == ["type", "n"]
    assert r.rows == [("page", 1), ("track", 3)]
    assert not r.truncated


def test_ctes_unions_subqueries_and_joins_work(loaded: Runtime) -> None:
    sql = """
    WITH a AS (SELECT message_id FROM events WHERE event = 'A'),
         b AS (SELECT * FROM a WHERE message_id <> 'm1')
    SELECT message_id FROM b
    UNION ALL SELECT e.message_id FROM events e JOIN a USING (message_id) WHERE e.message_id = 'm1'
    ORDER BY 1
    """
    assert run_query(loaded.engine, sql).rows == [("m1",), ("m44",)]
    rec = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 4) SELECT sum(n) FROM r"
    assert run_query(loaded.engine, rec).rows == [(10,)]
    nested = "WITH x AS (SELECT 2 AS v) SELECT * FROM (WITH y AS (SELECT v * 3 AS w FROM x) SELECT w FROM y)"
    assert run_query(loaded.engine, nested).rows == [(6,)]


def test_json_functions_and_generators_are_allowed(loaded: Runtime) -> None:
    r = run_query(loaded.engine, "SELECT message_id, properties->>'$.n' AS n FROM events WHERE message_id = 'm44'")
    assert r.rows == [("m44", "3")]
    assert run_query(loaded.engine, "SELECT count(*) FROM range(5)").rows == [(5,)]
    assert run_query(loaded.engine, "SELECT sum(x) FROM unnest([1, 2, 3]) AS t(x)").rows == [(6,)]


def test_limit_truncates_and_keeps_the_order(loaded: Runtime) -> None:
    r = run_query(loaded.engine, "SELECT message_id FROM events ORDER BY message_id DESC", limit=2)
    assert r.rows == [("m44",), ("m3",)]
    assert r.truncated
    r = run_query(loaded.engine, "SELECT message_id FROM events ORDER BY message_id LIMIT 1", limit=2)
    assert r.rows == [("m1",)] and not r.truncated


def test_sources_view_hides_the_key_hash(loaded: Runtime) -> None:
    r = run_query(loaded.engine, "SELECT * FROM sources")
    assert "write_key_hash" not in r.columns and r.rows[0][0] == "web"
    with pytest.raises(QueryError, match="write_key_hash"):
        run_query(loaded.engine, "SELECT write_key_hash FROM sources")
    with pytest.raises(QueryError):
        run_query(loaded.engine, "SELECT s.write_key_hash FROM events e, sources s")


def test_describe_and_trailing_semicolon(loaded: Runtime) -> None:
    r = run_query(loaded.engine, "DESCRIBE events;")
    assert "message_id" in [row[0] for row in r.rows]


# --- escapes --------------------------------------------------------------------------------------

ESCAPES = {
    "insert": "INSERT INTO events (message_id) VALUES ('x')",
    "update": "UPDATE events SET user_id = 'x'",
    "delete": "DELETE FROM events",
    "drop": "DROP TABLE events",
    "create": "CREATE TABLE t AS SELECT * FROM events",
    "create view": "CREATE VIEW v AS SELECT 1",
    "copy out": "COPY events TO 'out.csv'",
    "copy query out": "COPY (SELECT * FROM events) TO 'out.csv'",
    "copy in": "COPY events FROM 'secret.csv'",
    "attach": "ATTACH 'other.duckdb' AS o",
    "attached table": "SELECT * FROM other.loot",
    "catalog qualified": "SELECT * FROM refinery.main.events",
    "schema qualified": "SELECT * FROM main.sources",
    "information_schema": "SELECT * FROM information_schema.tables",
    "read_csv": "SELECT * FROM read_csv('secret.csv')",
    "read_csv scalar position": "SELECT (SELECT password FROM read_csv_auto('secret.csv'))",
    "read_text": "SELECT * FROM read_text('secret.csv')",
    "file as table": "SELECT * FROM 'secret.csv'",
    "file as quoted identifier": 'SELECT * FROM "secret.csv"',
    "file in subquery": "SELECT * FROM events WHERE message_id IN (SELECT password FROM 'secret.csv')",
    "cte name escaping its scope": 'SELECT * FROM (WITH "secret.csv" AS (SELECT 1 AS password) SELECT * FROM "secret.csv"), "secret.csv"',
    "cte defined after use": 'WITH a AS (SELECT * FROM "secret.csv"), "secret.csv" AS (SELECT 1) SELECT * FROM a',
    "duckdb file as table": "SELECT * FROM 'other.duckdb'",
    "glob": "SELECT * FROM glob('*')",
    "getenv": "SELECT getenv('REFINERY_TEST_SECRET')",
    "getenv qualified": "SELECT main.getenv('REFINERY_TEST_SECRET')",
    "getenv quoted": "SELECT \"getenv\"('REFINERY_TEST_SECRET')",
    "current_setting": "SELECT current_setting('memory_limit')",
    "duckdb_settings": "SELECT * FROM duckdb_settings()",
    "duckdb_settings as table": "SELECT * FROM duckdb_settings",
    "duckdb_secrets": "SELECT * FROM duckdb_secrets()",
    "nextval": "SELECT nextval('failed_event_seq')",
    "setval in where": "SELECT * FROM events WHERE setval('failed_event_seq', 99) > 0",
    "write_log": "SELECT write_log('x')",
    "sleep": "SELECT pg_sleep(60)",
    "query()": "SELECT * FROM query('SELECT 1')",
    "query_table()": "SELECT * FROM query_table('events')",
    "serialized sql": "SELECT * FROM json_execute_serialized_sql('{}')",
    "pragma": "PRAGMA database_list",
    "pragma function": "SELECT * FROM pragma_database_list()",
    "set": "SET memory_limit = '1GB'",
    "reset": "RESET memory_limit",
    "call": "CALL pragma_version()",
    "install": "INSTALL httpfs",
    "load": "LOAD httpfs",
    "checkpoint": "CHECKPOINT",
    "export": "EXPORT DATABASE 'dump'",
    "explain analyze": "EXPLAIN ANALYZE SELECT 1",
    "two statements": "SELECT 1; DROP TABLE events",
    "two selects": "SELECT 1; SELECT 2",
    "comment hiding a statement": "SELECT 1 -- harmless\n; DROP TABLE events",
    "comment closing trick": "SELECT 1 /* */; DROP TABLE events; /* */",
    "unknown table": "SELECT * FROM nope",
    "sqlite_master": "SELECT * FROM sqlite_master",
    "select into": "SELECT * INTO t2 FROM events",
    "transaction": "BEGIN TRANSACTION",
    "macro": "CREATE MACRO m(x) AS x",
    "secret": "CREATE SECRET s (TYPE s3)",
    "use": "USE other",
    "vacuum": "VACUUM",
    "summarize file": "SUMMARIZE 'secret.csv'",
    "describe file": "DESCRIBE 'secret.csv'",
}


@pytest.mark.parametrize("sql", list(ESCAPES.values()), ids=list(ESCAPES))
def test_escape_is_refused_and_changes_nothing(loaded: Runtime, sql: str) -> None:
    before = run_query(loaded.engine, "SELECT count(*), min(message_id) FROM events").rows
    seq_before = loaded.engine.fetch_all("SELECT last_value FROM duckdb_sequences() WHERE sequence_name = 'failed_event_seq'")
    with pytest.raises(QueryError) as info:
        run_query(loaded.engine, sql)
    err = info.value
    assert err.fix, "every refusal says what to do instead"
    assert "hunter2" not in str(err)
    assert run_query(loaded.engine, "SELECT count(*), min(message_id) FROM events").rows == before
    assert loaded.engine.fetch_all("SELECT last_value FROM duckdb_sequences() WHERE sequence_name = 'failed_event_seq'") == seq_before
    assert not (Path.cwd() / "out.csv").exists() and not (Path.cwd() / "dump").exists()


def test_refusals_name_the_reason() -> None:
    with pytest.raises(QueryError, match="Unknown table 'nope'") as info:
        check_read_only("SELECT * FROM nope")
    assert "events" in (info.value.fix or "")
    with pytest.raises(QueryError, match=r"getenv\(\) is not allowed"):
        check_read_only("SELECT getenv('HOME')")
    with pytest.raises(QueryError, match="exactly one statement"):
        check_read_only("SELECT 1; SELECT 2")
    with pytest.raises(QueryError, match="line 1"):
        check_read_only("SELEC 1 FROM")


def test_a_comment_hiding_a_statement_runs_only_the_query(loaded: Runtime) -> None:
    assert run_query(loaded.engine, "SELECT 1 AS x -- */ ; DROP TABLE events").rows == [(1,)]
    assert run_query(loaded.engine, "SELECT count(*) FROM events").rows == [(4,)]


def test_what_runs_is_the_checked_tree_without_comments() -> None:
    tree = check_read_only("SELECT 1 /* note */ AS x -- trailing\n")
    assert "note" not in tree.sql("duckdb") and "trailing" not in tree.sql("duckdb")


def test_a_runaway_query_is_stopped_at_the_time_limit_and_the_store_keeps_working(loaded: Runtime) -> None:
    import time

    runaway = "SELECT count(*) FROM range(100000000000) a, range(1000) b WHERE a.range * b.range = -1"
    started = time.monotonic()
    with pytest.raises(QueryError, match=r"longer than 0.5 s") as e:
        run_query(loaded.engine, runaway, timeout=0.5)
    assert time.monotonic() - started < 10
    assert "query_timeout_seconds" in (e.value.fix or "")
    # The next queries, on the same engine, run normally.
    assert run_query(loaded.engine, "SELECT count(*) FROM events", timeout=5).rows[0][0] >= 0
    assert loaded.writer.call(lambda eng: eng.fetch_all("SELECT 1"))[0][0] == 1
