"""Profile test helpers: events go in through the real staging and cleaning path (in-process, one
writer), then resolution and the profile build run inside the writer as `refinery identity resolve` does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlglot import exp

from refinery.identity import IdentityRules
from refinery.identity.rules import PII_TYPES
from refinery.privacy.pii import protect_identifier, reveal_in
from refinery.profiles import read
from refinery.profiles.build import resolve_and_build
from refinery.profiles.explain import explain
from refinery.profiles.policy import TraitPolicy
from refinery.runtime import Runtime
from support import event, fresh_runtime, write_events

__all__ = ["World", "event", "world"]


class World:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.rules = IdentityRules()

    def send(self, *events: dict[str, Any], source: str = "web") -> None:
        outcomes = write_events(self.rt, *events, source=source)
        assert all(o.status == "loaded" for o in outcomes), outcomes

    def resolve(self, policy: TraitPolicy | None = None) -> dict[str, Any]:
        p = policy or TraitPolicy()
        return self.rt.writer.call(lambda e: resolve_and_build(e, self.rules, p))  # type: ignore[no-any-return]

    def rows(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        return self.rt.engine.fetch_dicts(sql, params, cursor=self.rt.engine.reader())

    def stored(self, kind: str, value: str) -> str:
        """A normalised identifier as the identity tables hold it (a token, for personal types)."""
        return str(protect_identifier(self.rt.engine, kind, exp.Literal.string(value)).this) if kind in PII_TYPES else value

    def profile_of(self, kind: str, value: str) -> str:
        [row] = self.rows("SELECT profile_id FROM identities WHERE identifier_type = ? AND value = ?", [kind, self.stored(kind, value)])
        assert row["profile_id"], f"{kind}:{value} is not linked"
        return row["profile_id"]  # type: ignore[no-any-return]


    # Reads as a principal with pii:read sees them: tokens revealed.
    def get(self, profile_id: str) -> dict[str, Any]:
        return reveal_in(self.rt.engine, read.get(self.rt.engine, profile_id))

    def timeline(self, profile_id: str, **kw: Any) -> list[dict[str, Any]]:
        return reveal_in(self.rt.engine, read.timeline(self.rt.engine, profile_id, **kw))

    def explain(self, identifier: str, rules: IdentityRules) -> dict[str, Any]:
        return reveal_in(self.rt.engine, explain(self.rt.engine, identifier, rules))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with fresh_runtime(tmp_path) as rt:
        yield World(rt)
