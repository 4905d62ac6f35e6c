"""Profile test helpers: events go in through the real staging and cleaning path (in-process, one
writer), then resolution and the profile build run inside the writer as `refinery identity resolve` does."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from refinery.identity import IdentityRules
from refinery.ingest.protocol import Limits, stage
from refinery.ingest.store import IngestItem
from refinery.profiles.build import resolve_and_build
from refinery.profiles.policy import TraitPolicy
from refinery.runtime import Runtime
from refinery.settings import Settings

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
_clock = itertools.count()


def event(type_: str = "identify", *, minutes: int | None = None, **fields: Any) -> dict[str, Any]:
    at = T0 + timedelta(minutes=next(_clock) if minutes is None else minutes)
    return {"type": type_, "messageId": uuid.uuid4().hex, "timestamp": at.isoformat(), **fields}


class World:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.rules = IdentityRules()

    def send(self, *events: dict[str, Any], source: str = "web") -> None:
        items = []
        for ev in events:
            items.extend(IngestItem(source, "req", datetime.now(UTC), s) for s in stage("batch", {"batch": [ev]}, Limits()))
        outcomes = self.rt.writer.call(lambda e: self.rt.events.write(e, items))
        assert all(o.status == "loaded" for o in outcomes), outcomes

    def resolve(self, policy: TraitPolicy | None = None) -> dict[str, Any]:
        p = policy or TraitPolicy()
        return self.rt.writer.call(lambda e: resolve_and_build(e, self.rules, p))  # type: ignore[no-any-return]

    def rows(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        return self.rt.engine.fetch_dicts(sql, params, cursor=self.rt.engine.reader())

    def profile_of(self, kind: str, value: str) -> str:
        [row] = self.rows("SELECT profile_id FROM identities WHERE identifier_type = ? AND value = ?", [kind, value])
        assert row["profile_id"], f"{kind}:{value} is not linked"
        return row["profile_id"]  # type: ignore[no-any-return]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    rt = Runtime.open(Settings(data_dir=tmp_path / "data", admin_token="t"))
    try:
        yield World(rt)
    finally:
        rt.close()
