"""Helpers for the consent tests: a runtime with the demo's sources, events through the real
staging and cleaning path, resolution and the consent job."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from refinery.governance.consent_sync import SyncReport, sync
from refinery.governance.purposes import CategoryMap
from refinery.identity import parse_rules
from refinery.profiles.build import resolve_and_build
from refinery.profiles.policy import TraitPolicy
from refinery.runtime import Runtime
from refinery.settings import Settings
from support import write_events

DEMO_RULES: dict[str, Any] = {
    "identifiers": [{"type": "user_id", "path": "traits.webUserId", "sources": ["demo-crm"]}],
    "blocked": {"disable_defaults": ["test_email_domain"]},
}


class ConsentWorld:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.rules = parse_rules(DEMO_RULES)

    def send(self, *events: dict[str, Any], source: str = "web") -> None:
        msgs = [json.loads(json.dumps(e, default=str)) for e in events]
        for i in range(0, len(msgs), 500):
            write_events(self.rt, *msgs[i:i + 500], source=source)

    def resolve(self) -> dict[str, Any]:
        rules, policy = self.rules, TraitPolicy.from_settings(self.rt.settings)
        result: dict[str, Any] = self.rt.writer.call(lambda e: resolve_and_build(e, rules, policy))
        return result

    def sync(self, categories: dict[str, str] | None = None, full: bool = False) -> SyncReport:
        cats = CategoryMap.build(categories)
        report: SyncReport = self.rt.writer.call(lambda e: sync(e, cats, full=full))
        return report

    def profile_of(self, kind: str, value: str) -> str | None:
        rows = self.rt.engine.fetch_all("SELECT profile_id FROM identities WHERE identifier_type = ? AND value = ?", [kind, value])
        return rows[0][0] if rows else None

    def log(self) -> list[dict[str, Any]]:
        return self.rt.engine.fetch_dicts("SELECT * FROM consent_log ORDER BY log_id")


@pytest.fixture
def cw(tmp_path: Path) -> Iterator[ConsentWorld]:
    rt = Runtime.open(Settings(data_dir=tmp_path / "data", admin_token="test-admin-token"))
    for name in ("web", "demo-web", "demo-app"):
        rt.writer.call(lambda e, n=name: rt.sources.create(e, n))
    try:
        yield ConsentWorld(rt)
    finally:
        rt.close()
