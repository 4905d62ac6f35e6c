"""Compiled rules run on real DuckDB over events sent through the real pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from refinery.identity import IdentityRules
from refinery.privacy.pii import token_for
from refinery.profiles.build import resolve_and_build
from refinery.profiles.policy import TraitPolicy
from refinery.runtime import Runtime
from refinery.segments import CompileContext, build_catalog, compile_rule
from support import fresh_runtime, write_events

# After the events are received (as-of counts only events received by then), before any is in the future.
AS_OF = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)


def at(days_before: float) -> str:
    return (AS_OF - timedelta(days=days_before)).isoformat()


def track(user: str, name: str, days_before: float, **props: Any) -> dict[str, Any]:
    import uuid

    return {"type": "track", "messageId": uuid.uuid4().hex, "userId": user, "event": name,
            "timestamp": at(days_before), "properties": props}


def identify(user: str, days_before: float = 40, **traits: Any) -> dict[str, Any]:
    import uuid

    return {"type": "identify", "messageId": uuid.uuid4().hex, "userId": user, "timestamp": at(days_before),
            "traits": traits}


class Store:
    def __init__(self, rt: Runtime):
        self.rt = rt

    def ctx(self, **kw: Any) -> CompileContext:
        engine = self.rt.engine
        return CompileContext(build_catalog(engine), tokenise=lambda k, v: token_for(engine, k, v) or v, **kw)

    def members(self, rule: str, **kw: Any) -> set[str]:
        compiled = compile_rule(rule, self.ctx(**kw))
        rows = self.rt.engine.fetch_all(compiled.members(AS_OF), cursor=self.rt.engine.reader())
        return {self.user_of(r[0]) for r in rows}

    def user_of(self, profile_id: str) -> str:
        rows = self.rt.engine.fetch_all("SELECT value FROM identities WHERE profile_id = ? AND identifier_type = 'user_id'",
                                        [profile_id], cursor=self.rt.engine.reader())
        return str(rows[0][0])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    path: Path = tmp_path_factory.mktemp("segments")
    with fresh_runtime(path) as rt:
        events = [
            identify("ann", plan="pro", age=25, email="Ann@Example.com"),
            identify("bob", plan="free", age=41),
            identify("cat", plan="pro", age=33),
            track("ann", "Order Completed", 10, total=150, category="shoes"),
            track("ann", "Order Completed", 5, total=120, category="shoes"),
            track("bob", "Order Completed", 3, total=20, category="hats"),
            track("bob", "Product Viewed", 2.5, category="hats"),
            track("bob", "Order Completed", 2, total=30, category="hats"),
            track("cat", "Product Viewed", 50, category="shoes"),
        ]
        outcomes = write_events(rt, *events)
        assert all(o.status == "loaded" for o in outcomes), outcomes
        rt.writer.call(lambda e: resolve_and_build(e, IdentityRules(), TraitPolicy()))
        yield Store(rt)


def test_the_issue_examples_run(store: Store) -> None:
    assert store.members("performed 'Order Completed' where total > 100 at least 2 times in last 30 days") == {"ann"}
    assert store.members("not performed 'Order Completed' in last 30 days") == {"cat"}
    assert store.members("'Product Viewed' then 'Order Completed' within 1 day") == {"bob"}
    assert store.members("plan = 'pro' and age between 18 and 30") == {"ann"}
    assert store.members("email = 'ann@example.com '") == {"ann"}
    assert store.members("email is set") == {"ann"}
    assert store.members("sum(total) of 'Order Completed' > 100") == {"ann"}
    assert store.members("most frequent category of 'Order Completed' = 'hats'") == {"bob"}
