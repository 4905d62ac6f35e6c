"""One matching run over the store: person records from imported CRM rows (Splink) and device
signals from clean events, each written to `identity_links` under its model version.

Reading and training happen outside the writer (Splink runs on its own scratch DuckDB); only the
link writes go through it, one transaction per method.
"""

from __future__ import annotations

from typing import Any

from refinery.governance import lineage
from refinery.identity.matching.device import DeviceSignalConfig, device_signal_links
from refinery.identity.matching.links import DEVICE_SIGNAL, PERSON_RECORD
from refinery.identity.matching.person import PersonMatchConfig, match_person_records
from refinery.identity.matching.records import from_events
from refinery.identity.matching.store import save_links
from refinery.settings import Settings
from refinery.storage.engine import Engine
from refinery.storage.writer import Writer


def run_matching(engine: Engine, writer: Writer, settings: Settings, *, source: str | None = None) -> dict[str, Any]:
    """Match person records (optionally of one source) and device signals; returns what each wrote."""
    with lineage.run(settings, job="identity.match", inputs=["events", "identities"], outputs=["identity_links"]) as lr:
        records = from_events(engine, source=source)
        person = match_person_records(records, PersonMatchConfig.from_settings(settings))
        person_written = save_links(writer, person.links, method=PERSON_RECORD, model_version=person.model_version)
        device_config = DeviceSignalConfig.from_settings(settings)
        device = device_signal_links(engine, device_config)
        device_written = save_links(writer, device, method=DEVICE_SIGNAL, model_version=device_config.model_version)
        lr.count("identity_links", sum(w.inserted + w.refreshed for w in (person_written, device_written)))
        lr.note(source=source, person_model=person.model_version, device_model=device_config.model_version)
    return {
        "person_record": {**person.summary(), "written": _summary(person_written)},
        "device_signal": {"links": device.num_rows, "model_version": device_config.model_version, "written": _summary(device_written)},
    }


def _summary(w: Any) -> dict[str, Any]:
    return {"inserted": w.inserted, "refreshed": w.refreshed, "superseded": w.superseded, "active": w.active}
