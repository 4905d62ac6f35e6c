"""The single writer: group commit, isolation of a failing job, one transaction per call()."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pytest

from refinery.errors import StorageError
from refinery.storage.duckdb_engine import DuckDBEngine
from refinery.storage.engine import ConstraintViolation, Engine
from refinery.storage.writer import RetryGroup, Writer


class RowHandler:
    """Inserts each item as a row; an item 'bad' makes the whole write fail (a real DuckDB error)."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gate: threading.Event | None = None  # the first write waits for it, so others queue up
        self.entered = threading.Event()

    def write(self, engine: Engine, items: Sequence[str]) -> list[str]:
        if self.gate is not None:
            gate, self.gate = self.gate, None
            self.entered.set()
            gate.wait(10)
        self.calls.append(len(items))
        for item in items:
            engine.execute("INSERT INTO t VALUES (?)", [item])
            if item == "bad":
                engine.execute("SELECT * FROM no_such_table")
        return [f"ok:{i}" for i in items]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[DuckDBEngine]:
    e = DuckDBEngine(tmp_path / "w.duckdb")
    e.execute("CREATE TABLE t (v VARCHAR)")
    yield e
    e.close()


@pytest.fixture
def writer(engine: DuckDBEngine) -> Iterator[Writer]:
    w = Writer(engine, max_group=1000, max_wait_ms=50)
    w.start()
    yield w
    w.stop()


@dataclass
class Blocked:
    """A running writer held inside its first commit, so that later submissions queue up behind it."""

    writer: Writer
    handler: RowHandler
    gate: threading.Event
    first: Future[list[str]]


@pytest.fixture
def blocked(engine: DuckDBEngine) -> Iterator[Blocked]:
    writer = Writer(engine, max_group=1000, max_wait_ms=20)
    handler = RowHandler()
    gate = threading.Event()
    handler.gate = gate
    writer.start()
    try:
        first = writer.submit_batch(handler, ["first"])
        assert handler.entered.wait(10)
        yield Blocked(writer, handler, gate, first)
    finally:
        gate.set()
        writer.stop()


def _rows(engine: DuckDBEngine) -> list[str]:
    return sorted(r[0] for r in engine.fetch_all("SELECT v FROM t", cursor=engine.reader()))


def test_group_commit(engine: DuckDBEngine, blocked: Blocked) -> None:
    writer, handler, gate, first = blocked.writer, blocked.handler, blocked.gate, blocked.first
    # While the writer is blocked inside the first commit, 20 requests queue up.
    futures = [writer.submit_batch(handler, [f"a{i}", f"b{i}"]) for i in range(20)]
    gate.set()
    assert first.result(10) == ["ok:first"]
    for i, f in enumerate(futures):
        assert f.result(10) == [f"ok:a{i}", f"ok:b{i}"]  # each request gets its own outcomes, in order
    assert handler.calls == [1, 40]  # the 20 waiting requests were written together
    assert writer.commits == 2 and writer.last_group_size == 40
    assert len(_rows(engine)) == 41


def test_a_failing_job_does_not_fail_its_neighbours(engine: DuckDBEngine, blocked: Blocked) -> None:
    writer, handler, gate, blocker = blocked.writer, blocked.handler, blocked.gate, blocked.first
    good1 = writer.submit_batch(handler, ["g1"])
    bad = writer.submit_batch(handler, ["x1", "bad", "x2"])
    good2 = writer.submit_batch(handler, ["g2", "g3"])
    gate.set()
    blocker.result(10)
    assert good1.result(10) == ["ok:g1"]
    assert good2.result(10) == ["ok:g2", "ok:g3"]
    with pytest.raises(StorageError, match="no_such_table"):
        bad.result(10)
    # The group was rolled back, the good jobs rewritten alone; nothing of the bad job is on disk.
    assert _rows(engine) == ["first", "g1", "g2", "g3"]
    assert writer.submit_batch(handler, ["after"]).result(10) == ["ok:after"]  # the writer lives on


def test_call_runs_in_one_transaction_and_rolls_back_on_error(engine: DuckDBEngine, writer: Writer) -> None:
    def half_then_fail(e: Engine) -> None:
        e.execute("INSERT INTO t VALUES ('half')")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        writer.call(half_then_fail)
    assert _rows(engine) == []
    assert writer.call(lambda e: e.execute("INSERT INTO t VALUES ('whole')") and "done") == "done"
    assert _rows(engine) == ["whole"]


def test_call_without_a_thread_is_still_one_transaction(engine: DuckDBEngine) -> None:
    writer = Writer(engine)
    with pytest.raises(ValueError):
        writer.call(lambda e: (e.execute("INSERT INTO t VALUES ('x')"), (_ for _ in ()).throw(ValueError("no")))[0])
    assert _rows(engine) == []


def test_a_call_from_inside_the_writer_does_not_deadlock(engine: DuckDBEngine, writer: Writer) -> None:
    def outer(e: Engine) -> str:
        return writer.call(lambda inner: inner.execute("INSERT INTO t VALUES ('nested')") and "inner")

    assert writer.submit(outer).result(5) == "inner"
    assert _rows(engine) == ["nested"]


def test_a_cancelled_request_does_not_kill_the_writer(engine: DuckDBEngine, blocked: Blocked) -> None:
    writer, handler, gate, blocker = blocked.writer, blocked.handler, blocked.gate, blocked.first
    gone = writer.submit_batch(handler, ["gone"])
    kept = writer.submit_batch(handler, ["kept"])
    assert gone.cancel()  # a client that disconnected before its commit
    gate.set()
    blocker.result(10)
    assert kept.result(10) == ["ok:kept"]
    assert writer.call(lambda e: "alive") == "alive"
    assert "gone" not in _rows(engine)  # never acknowledged, so never written


class OptimisticHandler:
    """Tries a plain INSERT into a keyed table first; on a key clash asks for a careful second run."""

    def __init__(self, raise_again: bool = False) -> None:
        self.careful = False
        self.raise_again = raise_again
        self.attempts: list[str] = []

    def write(self, engine: Engine, items: Sequence[str]) -> list[str]:
        for item in items:
            engine.execute("INSERT INTO t VALUES (?)", [f"log:{item}"])
        if self.careful and not self.raise_again:
            self.attempts.append("careful")
            rows = engine.fetch_all(
                "INSERT INTO k SELECT unnest(CAST(? AS VARCHAR[])) ON CONFLICT DO NOTHING RETURNING v", [list(items)]
            )
            new = {r[0] for r in rows}
            return ["new" if i in new else "seen" for i in items]
        self.attempts.append("optimistic")
        try:
            engine.execute("INSERT INTO k SELECT unnest(CAST(? AS VARCHAR[]))", [list(items)])
        except ConstraintViolation as e:
            self.careful = True
            raise RetryGroup() from e
        return ["new"] * len(items)


@pytest.mark.parametrize("threaded", [True, False])
def test_retry_group_rolls_back_and_writes_again(engine: DuckDBEngine, threaded: bool) -> None:
    engine.execute("CREATE TABLE k (v VARCHAR PRIMARY KEY)")
    writer = Writer(engine)
    if threaded:
        writer.start()
    try:
        handler = OptimisticHandler()
        assert writer.write_batch(handler, ["a", "b"]) == ["new", "new"]
        assert writer.write_batch(handler, ["c", "a"]) == ["new", "seen"]
        assert handler.attempts == ["optimistic", "optimistic", "careful"]
        assert writer.rewritten_groups == 1
        # The aborted first attempt left nothing behind: one log row per item written, not two.
        assert _rows(engine) == ["log:a", "log:a", "log:b", "log:c"]
        assert sorted(r[0] for r in engine.fetch_all("SELECT v FROM k", cursor=engine.reader())) == ["a", "b", "c"]
    finally:
        writer.stop()


def test_retry_group_twice_is_an_error_and_nothing_is_written(engine: DuckDBEngine, writer: Writer) -> None:
    engine.execute("CREATE TABLE k (v VARCHAR PRIMARY KEY)")
    engine.execute("INSERT INTO k VALUES ('a')")
    with pytest.raises(RetryGroup):
        writer.write_batch(OptimisticHandler(raise_again=True), ["a"])
    assert _rows(engine) == []
    assert writer.call(lambda e: "alive") == "alive"


def test_staged_rows_survive_a_rolled_back_first_group(engine: DuckDBEngine, writer: Writer) -> None:
    """Staging a name registers a view, and a ROLLBACK drops it: when the very first group to stage
    rows fails, later groups must still find their staged rows (and re-plan reused statements)."""
    import pyarrow as pa

    class Staging:
        def write(self, e: Engine, items: Sequence[str]) -> list[str]:
            e.stage("_rows", pa.table({"v": list(items)}))
            e.execute_reused("INSERT INTO t SELECT v FROM _rows")
            if "bad" in items:
                raise ValueError("fail after staging")
            return list(items)

    with pytest.raises(ValueError):
        writer.write_batch(Staging(), ["bad"])
    assert writer.write_batch(Staging(), ["x", "y"]) == ["x", "y"]
    assert writer.write_batch(Staging(), ["z"]) == ["z"]
    assert _rows(engine) == ["x", "y", "z"]


def test_async_submissions_are_answered_on_their_loop_despite_a_failing_or_cancelled_neighbour(engine: DuckDBEngine, blocked: Blocked) -> None:
    import asyncio

    writer, handler, gate = blocked.writer, blocked.handler, blocked.gate

    async def main() -> list[list[str]]:
        waiters = [writer.submit_batch_async(handler, [f"x{i}"]) for i in range(5)]
        gone = writer.submit_batch_async(handler, ["gone"])
        gone.cancel()  # the requester gave up before the write began: not written
        bad = writer.submit_batch_async(handler, ["bad"])
        gate.set()
        with pytest.raises(StorageError, match="no_such_table"):
            await bad
        return list(await asyncio.gather(*waiters))

    assert asyncio.run(main()) == [[f"ok:x{i}"] for i in range(5)]
    assert blocked.first.result(10) == ["ok:first"]
    assert "gone" not in _rows(engine) and "bad" not in _rows(engine)
    assert [f"x{i}" for i in range(5)] == [r for r in _rows(engine) if r.startswith("x")]
