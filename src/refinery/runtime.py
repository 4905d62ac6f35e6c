"""Wiring: open the store, migrate it, start the writer. A container of components, not a facade.

Features live in their own modules as functions over these components; `Runtime` only builds
them once and closes them in order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from refinery.governance.ingest_consent import ConsentGate
from refinery.governance.purposes import CategoryMap
from refinery.ingest.clean import CleanRules
from refinery.ingest.plans import TrackingPlans
from refinery.ingest.sources import SourceRegistry
from refinery.ingest.store import EventStore
from refinery.privacy.pii import install
from refinery.privacy.vault import Vault
from refinery.settings import Settings
from refinery.storage.duckdb_engine import DuckDBEngine
from refinery.storage.engine import Engine
from refinery.storage.migrations import migrate
from refinery.storage.writer import Writer

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    writer: Writer
    sources: SourceRegistry
    events: EventStore
    plans: TrackingPlans
    vault: Vault
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, settings: Settings, *, start_writer: bool = True) -> Runtime:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = DuckDBEngine(
            settings.database_path, memory_limit=settings.duckdb_memory_limit, threads=settings.duckdb_threads
        )
        try:
            vault = Vault.open(settings, engine)  # before migrating: a missing or wrong key touches nothing
        except BaseException:
            engine.close()
            raise
        install(engine, vault)
        try:
            applied = migrate(engine)
            vault.load_suppression(engine)
        except BaseException:  # a migration that fails leaves the store as it was: let go of it cleanly
            engine.close()
            vault.close()
            raise
        if applied:
            log.info("storage migrated to version %s", applied[-1])
        writer = Writer(engine, max_group=settings.commit_max_events, max_wait_ms=settings.commit_max_wait_ms)
        if start_writer:
            writer.start()
        rules = CleanRules(settings.min_event_time, settings.max_future_skew_seconds)
        runtime = cls(
            settings=settings,
            engine=engine,
            writer=writer,
            sources=SourceRegistry(engine),
            events=EventStore(rules, vault, ConsentGate(settings.analytics_denied_events, CategoryMap.build(settings.consent_categories))),
            plans=TrackingPlans(settings.plans_dir, default_mode=settings.unplanned_events),
            vault=vault,
        )
        # This process holds the database alone (DuckDB's file lock), so an import still marked as
        # running was cut off by a stop: say so now rather than leave it 'started' forever.
        from refinery.ingest.importer import recover_interrupted

        recover_interrupted(runtime)
        return runtime

    @property
    def clean_rules(self) -> CleanRules:
        return self.events.rules

    def close(self) -> None:
        self.writer.stop()
        self.engine.close()
        self.vault.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
