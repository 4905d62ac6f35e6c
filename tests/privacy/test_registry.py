"""Every table holding personal data is covered by a registered store, by construction: a table in
the database that no store covers and nobody declared free of personal data fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from refinery.errors import ConfigurationError
from refinery.privacy.registry import Registry, registry
from support import fresh_runtime


def _tables(rt: object) -> list[str]:
    engine = rt.engine  # type: ignore[attr-defined]
    return [r[0] for r in engine.fetch_all("SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
                                           "AND table_type = 'BASE TABLE' ORDER BY 1")]


def test_every_table_is_covered_or_declared_free_of_personal_data(tmp_path: Path) -> None:
    with fresh_runtime(tmp_path) as rt:
        tables = _tables(rt)
        reg = registry()
        assert {"events", "raw_events", "failed_events", "identities", "vault_values", "consent_log", "privacy_requests",
                "suppression_list", "audit_log"} <= set(tables)
        assert reg.unaccounted(tables) == [], (
            "These tables are neither covered by a personal store nor declared free of personal data; register a store "
            "(refinery.privacy.registry.REGISTRY.register) or declare_no_personal_data(table, reason)")
        covered = reg.covered()
        for table in ("events", "raw_events", "failed_events", "message_ids", "identities", "identity_edges", "identity_blocked",
                      "profile_merges", "identity_links", "identity_overrides", "profiles", "event_profiles", "consent_log",
                      "consent_conflicts", "vault_values"):
            assert table in covered, table
        # A new table nobody declared is caught.
        rt.writer.call(lambda e: e.execute("CREATE TABLE undeclared_stage_table (segment_id VARCHAR, profile_id VARCHAR)"))
        assert registry().unaccounted(_tables(rt)) == ["undeclared_stage_table"]


def test_sections_for_later_stages_and_declarations_are_checked() -> None:
    reg = registry()
    assert {"segments", "features", "activation"} <= set(reg.stores)
    r = Registry()
    r.declare_no_personal_data("sources", "names only")
    with pytest.raises(ConfigurationError, match="needs a reason"):
        r.declare_no_personal_data("imports", " ")
    with pytest.raises(ConfigurationError, match="not a personal store"):
        r.register(object())  # type: ignore[arg-type]
