"""The memory policy (docs/decisions/0012-memory-policy.md) on a real DuckDB file."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from refinery.errors import StorageError
from refinery.storage.duckdb_engine import (
    DuckDBEngine,
    batch_memory,
    capped_memory,
    parse_size,
    steady_memory,
)


def _limit(e: DuckDBEngine) -> float:
    """The limit DuckDB reports, in bytes (it prints MiB / GiB)."""
    text = e.connection.execute("SELECT current_setting('memory_limit')").fetchone()[0]  # type: ignore[index]
    return parse_size(text)


def _near(a: float, b: float) -> bool:
    return abs(a - b) / b < 0.02


@pytest.fixture
def engine(tmp_path: Path):
    e = DuckDBEngine(tmp_path / "m.duckdb", memory_limit="256MB", batch_memory_limit="1GB")
    yield e
    e.close()


def test_temp_directory_is_next_to_the_database(engine: DuckDBEngine, tmp_path: Path) -> None:
    temp = engine.connection.execute("SELECT current_setting('temp_directory')").fetchone()[0]  # type: ignore[index]
    assert Path(temp) == tmp_path / "m.duckdb.tmp"


def test_a_batch_raises_the_limit_and_puts_it_back(engine: DuckDBEngine) -> None:
    assert _near(_limit(engine), 256e6)
    with batch_memory(engine):
        assert _near(_limit(engine), 1e9)
        with batch_memory(engine):  # nested: still raised, and the inner exit does not lower it
            pass
        assert _near(_limit(engine), 1e9)
    assert _near(_limit(engine), 256e6)


def test_a_batch_in_another_thread_keeps_the_limit_raised(engine: DuckDBEngine) -> None:
    inside, release = threading.Event(), threading.Event()

    def job() -> None:
        with batch_memory(engine):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=job)
    t.start()
    inside.wait(10)
    with batch_memory(engine):
        pass
    assert _near(_limit(engine), 1e9)  # the other job still runs
    release.set()
    t.join()
    assert _near(_limit(engine), 256e6)


def test_a_cap_lowers_the_limit_unless_a_batch_runs(engine: DuckDBEngine) -> None:
    with capped_memory(engine, "128MB"):
        assert _near(_limit(engine), 128e6)
        with batch_memory(engine):
            assert _near(_limit(engine), 1e9)
        assert _near(_limit(engine), 128e6)
    assert _near(_limit(engine), 256e6)
    with capped_memory(engine, "2GB"):  # a cap never raises
        assert _near(_limit(engine), 256e6)


def test_steady_limit_changes_and_lowering_evicts(engine: DuckDBEngine) -> None:
    steady_memory(engine, "1GB")
    con = engine.connection
    con.execute("CREATE TABLE t AS SELECT i, md5(i::VARCHAR) AS s FROM range(2000000) t(i)")
    con.execute("CHECKPOINT")
    con.execute("SELECT sum(length(s)) FROM t").fetchall()
    cached = con.execute("SELECT sum(memory_usage_bytes) FROM duckdb_memory()").fetchone()[0]  # type: ignore[index]
    assert cached > 32e6  # the table's blocks are in the buffer pool
    steady_memory(engine, "16MB")
    assert _near(_limit(engine), 16e6)
    after = con.execute("SELECT sum(memory_usage_bytes) FROM duckdb_memory()").fetchone()[0]  # type: ignore[index]
    assert after <= 16e6 < cached


def test_a_memory_size_is_checked() -> None:
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("256MB") == 256e6
    with pytest.raises(StorageError, match="not a memory size"):
        parse_size("256MB'; DROP TABLE events; --")
