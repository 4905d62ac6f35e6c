"""Fixtures of the feature store tests: the real Redis server of tests/services.py (started once per
session, on a free loopback port) for the Redis online store."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services import RedisServer, start_redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("features-redis"))
    try:
        yield server
    finally:
        server.stop()
