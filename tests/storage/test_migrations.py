"""Migrations: versioned, applied once, in order, atomically; a newer database is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from refinery.errors import MigrationError
from refinery.storage.duckdb_engine import DuckDBEngine
from refinery.storage.migrations import LATEST_VERSION, MIGRATIONS, Migration, current_version, migrate

SECOND = Migration(2, "test: a notes table", ("CREATE TABLE notes (id INTEGER, body VARCHAR)", "ALTER TABLE events ADD COLUMN note_id INTEGER"))


@pytest.fixture
def engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    e = DuckDBEngine(tmp_path / "db.duckdb")
    yield e
    e.close()


def _tables(engine: DuckDBEngine) -> set[str]:
    return {r[0] for r in engine.fetch_all("SELECT table_name FROM duckdb_tables()")}


def test_a_fresh_database_gets_every_migration_once(engine: DuckDBEngine) -> None:
    assert migrate(engine) == [m.version for m in MIGRATIONS]
    assert current_version(engine) == LATEST_VERSION
    assert {"events", "raw_events", "failed_events", "sources", "imports", "message_ids"} <= _tables(engine)
    assert migrate(engine) == []  # applied once
    assert engine.fetch_all("SELECT count(*) FROM schema_migrations")[0][0] == len(MIGRATIONS)


def test_a_second_migration_applies_on_top_of_version_1(tmp_path: Path) -> None:
    path = tmp_path / "db.duckdb"
    e = DuckDBEngine(path)
    assert migrate(e, MIGRATIONS[:1]) == [1]
    e.execute("INSERT INTO sources (name, kind, created_at) VALUES ('web', 'collector', now())")
    e.close()

    e = DuckDBEngine(path)  # a later release opens the same file
    assert migrate(e, (*MIGRATIONS[:1], SECOND)) == [2]
    assert current_version(e) == 2
    assert "notes" in _tables(e)
    assert "note_id" in {r[0] for r in e.fetch_all("DESCRIBE events")}
    assert e.fetch_all("SELECT name FROM sources") == [("web",)]  # data kept
    assert e.fetch_all("SELECT version, description FROM schema_migrations ORDER BY version") == [
        (1, MIGRATIONS[0].description), (2, SECOND.description),
    ]
    assert migrate(e, (*MIGRATIONS[:1], SECOND)) == []
    e.close()


def test_a_newer_database_is_refused_with_a_clear_error(engine: DuckDBEngine) -> None:
    migrate(engine, (*MIGRATIONS[:1], SECOND))
    with pytest.raises(MigrationError) as info:
        migrate(engine, MIGRATIONS[:1])
    assert "version 2" in info.value.message and "(1)" in info.value.message
    assert "Upgrade Refinery" in (info.value.fix or "")


def test_a_failing_migration_rolls_back_and_names_itself(engine: DuckDBEngine) -> None:
    migrate(engine, MIGRATIONS[:1])
    broken = Migration(2, "test: broken", ("CREATE TABLE half_done (id INTEGER)", "ALTER TABLE nope ADD COLUMN x INTEGER"))
    with pytest.raises(MigrationError) as info:
        migrate(engine, (*MIGRATIONS[:1], broken))
    assert "Migration 2 (test: broken)" in info.value.message and "nope" in (info.value.sql or "")
    assert current_version(engine) == 1
    assert "half_done" not in _tables(engine)  # the whole migration rolled back


def test_versions_must_be_contiguous(engine: DuckDBEngine) -> None:
    with pytest.raises(MigrationError, match="1, 2, 3"):
        migrate(engine, (MIGRATIONS[0], Migration(3, "gap", ())))
