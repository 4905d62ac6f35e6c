"""Fixtures of the destination tests (test_dest*.py): a destination context, batches, and the real
Redis and PostgreSQL servers of tests/services.py (started once per session, on free loopback ports)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from refinery.activation.destination import Batch, DestinationContext, Record
from services import PostgresServer, RedisServer, start_postgres, start_redis

_batch_numbers = itertools.count(1)

MakeBatch = Callable[..., Batch]


def _make_batch(
    adds: Mapping[str, Mapping[str, Any]] | None = None,
    removes: list[str] | Mapping[str, Mapping[str, Any]] | None = None,
    *,
    segment: str = "vip",
    batch_id: str | None = None,
    attempt: int = 1,
) -> Batch:
    records = [Record(pid, "add", dict(fields)) for pid, fields in (adds or {}).items()]
    if isinstance(removes, Mapping):
        records += [Record(pid, "remove", dict(fields)) for pid, fields in removes.items()]
    else:
        records += [Record(pid, "remove") for pid in removes or []]
    return Batch(
        id=batch_id or f"b{next(_batch_numbers):06d}",
        sync="vip-sync",
        segment=segment,
        destination="dest",
        mode="diff",
        records=tuple(records),
        created_at=datetime.now(UTC),
        attempt=attempt,
    )


@pytest.fixture
def dest_batch() -> MakeBatch:
    """`dest_batch({"p1": {"email": ...}}, ["p2"], segment="vip")`: a batch of adds and removes
    (removes may carry fields too: `{"p2": {"email": ...}}`)."""
    return _make_batch


@pytest.fixture
def dest_context(tmp_path: Path) -> Callable[..., DestinationContext]:
    """A destination context in tmp_path; `allowed` is the SSRF allow-list (none by default)."""

    def make(allowed: tuple[str, ...] = (), timeout: float = 2.0) -> DestinationContext:
        return DestinationContext(name="dest", data_dir=tmp_path / "data", timeout_seconds=timeout,
                                  allowed_networks=allowed)

    return make


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = start_postgres()
    try:
        yield server
    finally:
        server.remove()
