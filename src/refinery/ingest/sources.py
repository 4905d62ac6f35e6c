"""Sources: named producers of events, each with its own write key, mode and rate limit.

Write keys are shown once at creation and stored only as a SHA-256 hash.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from refinery.errors import ConfigurationError, ConflictError, NotFoundError
from refinery.storage.engine import Engine

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
Kind = Literal["collector", "import"]


@dataclass(frozen=True)
class Source:
    name: str
    kind: str
    enabled: bool
    write_key_prefix: str | None
    unplanned_events: str | None
    rate_limit_per_second: float | None
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = self.created_at.isoformat()
        return d


def hash_key(write_key: str) -> str:
    return hashlib.sha256(write_key.encode("utf-8")).hexdigest()


def validate_name(name: str) -> str:
    if not _NAME.match(name):
        raise ConfigurationError(
            f"Source name {name!r} is not valid.",
            fix="Use 1-63 lower-case letters, digits, '-' or '_', starting with a letter or digit (e.g. 'web' or 'crm-export').",
            field="name",
        )
    return name


# Constant queries (no interpolation): the columns of `Source`, in its field order.
_LIST = "SELECT name, kind, enabled, write_key_prefix, unplanned_events, rate_limit_per_second, created_at FROM sources ORDER BY name"
_BY_NAME = (
    "SELECT name, kind, enabled, write_key_prefix, unplanned_events, rate_limit_per_second, created_at "
    "FROM sources WHERE name = ?"
)
_BY_KEY = (
    "SELECT write_key_hash, name, kind, enabled, write_key_prefix, unplanned_events, rate_limit_per_second, created_at "
    "FROM sources WHERE write_key_hash IS NOT NULL"
)


class SourceRegistry:
    """Reads sources through reader cursors, writes through the writer; caches key lookups."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._by_key: dict[str, Source] | None = None

    # --- reads ----------------------------------------------------------------------------
    def list(self) -> list[Source]:
        rows = self.engine.fetch_all(_LIST, cursor=self.engine.reader())
        return [Source(*r) for r in rows]

    def get(self, name: str) -> Source:
        rows = self.engine.fetch_all(_BY_NAME, [name], cursor=self.engine.reader())
        if not rows:
            known = ", ".join(s.name for s in self.list()) or "none yet"
            raise NotFoundError(f"No source named {name!r} (known: {known}).", fix=f"Create it: refinery sources create {name}")
        return Source(*rows[0])

    def by_write_key(self, write_key: str) -> Source | None:
        with self._lock:
            if self._by_key is None:
                rows = self.engine.fetch_all(
                    _BY_KEY,
                    cursor=self.engine.reader(),
                )
                self._by_key = {r[0]: Source(*r[1:]) for r in rows}
            return self._by_key.get(hash_key(write_key))

    def invalidate(self) -> None:
        with self._lock:
            self._by_key = None

    # --- writes (call inside the writer) -----------------------------------------------------
    def create(
        self,
        engine: Engine,
        name: str,
        *,
        kind: Kind = "collector",
        write_key: str | None = None,
        unplanned_events: str | None = None,
        rate_limit_per_second: float | None = None,
    ) -> tuple[Source, str | None]:
        """Create a source; returns it with its write key (collector sources only; shown once)."""
        validate_name(name)
        if unplanned_events not in (None, "accept", "quarantine"):
            raise ConfigurationError(
                f"unplanned_events {unplanned_events!r} is not a mode.", fix="Use 'accept' or 'quarantine'.", field="unplanned_events"
            )
        if engine.fetch_all("SELECT 1 FROM sources WHERE name = ?", [name]):
            raise ConflictError(f"Source {name!r} already exists.", fix="Pick another name, or use the existing source.")
        key = None
        if kind == "collector":
            key = write_key or ("rk_" + secrets.token_urlsafe(24))
        now = datetime.now(UTC)
        engine.execute(
            "INSERT INTO sources (name, kind, write_key_hash, write_key_prefix, enabled, unplanned_events, "
            "rate_limit_per_second, created_at) VALUES (?, ?, ?, ?, TRUE, ?, ?, ?)",
            [name, kind, hash_key(key) if key else None, key[:7] if key else None, unplanned_events, rate_limit_per_second, now],
        )
        self.invalidate()
        return Source(name, kind, True, key[:7] if key else None, unplanned_events, rate_limit_per_second, now), key

    def ensure(self, engine: Engine, name: str, kind: Kind) -> Source:
        rows = engine.fetch_all(_BY_NAME, [name])
        if rows:
            return Source(*rows[0])
        return self.create(engine, name, kind=kind)[0]

    def set_enabled(self, engine: Engine, name: str, enabled: bool) -> None:
        if not engine.fetch_all("SELECT 1 FROM sources WHERE name = ?", [name]):
            raise NotFoundError(f"No source named {name!r}.", fix="List sources with: refinery sources list")
        engine.execute("UPDATE sources SET enabled = ? WHERE name = ?", [enabled, name])
        self.invalidate()

    def update(self, engine: Engine, name: str, *, unplanned_events: str | None = None, rate_limit_per_second: float | None = None) -> None:
        if unplanned_events is not None:
            if unplanned_events not in ("accept", "quarantine"):
                raise ConfigurationError(f"unplanned_events {unplanned_events!r} is not a mode.", fix="Use 'accept' or 'quarantine'.")
            engine.execute("UPDATE sources SET unplanned_events = ? WHERE name = ?", [unplanned_events, name])
        if rate_limit_per_second is not None:
            engine.execute("UPDATE sources SET rate_limit_per_second = ? WHERE name = ?", [rate_limit_per_second, name])
        self.invalidate()
