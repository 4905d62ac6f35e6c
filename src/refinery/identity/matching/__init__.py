"""Probabilistic identity matching, kept apart from the deterministic graph and kept reversible.

- `match_person_records`: person records (CRM rows) matched with Splink (Fellegi-Sunter, EM) on
  a scratch DuckDB; needs the `[ml]` extra, imported only when called.
- `device_signal_links`: anonymous/device ids that share IP and user agent close in time, scored
  low (at most 0.6), over the clean `events` table.
- `person_records_from_events`: person records from imported identify calls (CRM rows keyed by
  the external id the import mapping names).
- `save_links` / `write_links`, `remove_link`, `restore_link`, `active_links`: `identity_links`.

See docs/identity-matching.md and docs/decisions/0007-probabilistic-matching.md.
"""

from __future__ import annotations

from refinery.identity.matching.device import DeviceSignalConfig, device_signal_links
from refinery.identity.matching.errors import LinkNotFound, MatchingError, MissingExtraError
from refinery.identity.matching.links import DEVICE_SIGNAL, LINK_COLUMNS, LINK_SCHEMA, PERSON_RECORD
from refinery.identity.matching.person import PersonMatchConfig, PersonMatchResult, match_person_records
from refinery.identity.matching.records import from_events as person_records_from_events
from refinery.identity.matching.store import (
    WriteSummary,
    active_links,
    remove_link,
    restore_link,
    save_links,
    write_links,
)

__all__ = [
    "DEVICE_SIGNAL",
    "LINK_COLUMNS",
    "LINK_SCHEMA",
    "PERSON_RECORD",
    "DeviceSignalConfig",
    "LinkNotFound",
    "MatchingError",
    "MissingExtraError",
    "PersonMatchConfig",
    "PersonMatchResult",
    "WriteSummary",
    "active_links",
    "device_signal_links",
    "match_person_records",
    "person_records_from_events",
    "remove_link",
    "restore_link",
    "save_links",
    "write_links",
]
