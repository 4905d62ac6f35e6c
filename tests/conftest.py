"""Shared fixtures: a fresh data dir, an in-process runtime, and a real server on loopback
(the plumbing lives in support.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from refinery.runtime import Runtime
from refinery.settings import Settings
from support import WRITE_KEY, Server, start_server


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", admin_token="test-admin-token")


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime.open(settings)
    rt.writer.call(lambda e: rt.sources.create(e, "web", write_key=WRITE_KEY))
    try:
        yield rt
    finally:
        rt.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    srv = start_server(data_dir)
    with srv.api() as api:
        r = api.post("/api/sources", json={"name": "web", "write_key": WRITE_KEY})
        assert r.status_code == 201, r.text
    try:
        yield srv
    finally:
        srv.stop()
