"""The destination interface: one method that delivers a batch and says how a failure should be treated.

A destination is the size of an httpx transport. `deliver(batch)` returns when every record of the
batch is in effect at the receiver, or raises:

- `TransientDeliveryError` when trying the same batch again later may work (a timeout, a refused or
  closed connection, HTTP 5xx or 429); `retry_after` carries the receiver's own hint in seconds;
- `TerminalDeliveryError` when it never will (HTTP 4xx other than 408/429, a refused address, a
  mapping the receiver rejects): the batch goes to the dead-letter table, to be replayed after a fix.

Any other exception counts as transient (a bug must not lose the batch) until the attempts run out.

Every delivery of the same batch carries the same `Batch.id`, the idempotency key: a receiver that
saw it already must not apply it twice, and the built-ins apply batches idempotently (upserts, set
adds and removes, files named by batch id). That is what "exactly once in effect" rests on: the
outbox delivers at least once, the key makes a repeat harmless.

Built-in kinds register themselves with `register()` exactly as a third party would; a package can
also declare an entry point in the `refinery.destinations` group naming a `DestinationType`.
"""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import orjson
from pydantic import BaseModel

from refinery.errors import ConfigurationError, RefineryError

Action = Literal["add", "remove"]
PURPOSES = ("advertising", "marketing", "personalisation", "analytics")


@dataclass(frozen=True, slots=True)
class Record:
    """One profile's change. `fields` are the sync's mapped fields, revealed (clear values) at
    delivery time and never stored in the outbox; empty for `remove` unless the destination asks."""

    profile_id: str
    action: Action
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Batch:
    id: str  # idempotency key, the same on every attempt
    sync: str
    segment: str
    destination: str
    mode: Literal["full", "diff", "mirror"]
    records: tuple[Record, ...]
    created_at: datetime
    attempt: int = 1  # 1 on the first delivery, counted up on retries

    @property
    def added(self) -> list[Record]:
        return [r for r in self.records if r.action == "add"]

    @property
    def removed(self) -> list[Record]:
        return [r for r in self.records if r.action == "remove"]


def field_text(value: Any) -> str | None:
    """A mapped field's value as text for destinations that store strings (CSV cells, Redis hashes):
    None stays None, booleans are `true`/`false`, numbers their decimal text, anything else JSON."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return orjson.dumps(value, default=str).decode()


class DeliveryError(RefineryError):
    code = "delivery_failed"


class TransientDeliveryError(DeliveryError):
    """Try again later. `retry_after` (seconds) is the receiver's hint, honoured over the backoff."""

    code = "delivery_transient"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class TerminalDeliveryError(DeliveryError):
    """Never going to work as is: dead-letter the batch."""

    code = "delivery_terminal"


@runtime_checkable
class Destination(Protocol):
    def deliver(self, batch: Batch) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class DestinationContext:
    """What a destination may use from the platform, handed to its factory."""

    name: str  # the destination's name as configured
    data_dir: Path
    timeout_seconds: float
    allowed_networks: tuple[str, ...]  # SSRF allow-list (settings.activation_allowed_networks)


@dataclass(frozen=True)
class DestinationType:
    """A kind of destination: its name, the pydantic model of its configuration (fields typed
    `pydantic.SecretStr` are secrets: stored encrypted, never logged or returned by the API), and a
    factory that builds a live destination from a validated configuration."""

    kind: str
    config_model: type[BaseModel]
    factory: Callable[[Any, DestinationContext], Destination]
    description: str = ""
    # Fields the destination needs in every record (e.g. ad-platform files need email or phone).
    needs_fields: tuple[str, ...] = ()


_registry: dict[str, DestinationType] = {}
_lock = threading.Lock()
_entry_points_loaded = False


def register(dtype: DestinationType) -> DestinationType:
    with _lock:
        if dtype.kind in _registry and _registry[dtype.kind] is not dtype:
            raise ConfigurationError(
                f"Destination kind {dtype.kind!r} is registered twice.",
                fix="Give the third-party destination a kind of its own.",
            )
        _registry[dtype.kind] = dtype
    return dtype


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    import refinery.activation.builtin  # noqa: F401  (registers the built-in kinds)

    for ep in importlib.metadata.entry_points(group="refinery.destinations"):
        value = ep.load()
        if isinstance(value, DestinationType) and value.kind not in _registry:
            register(value)


def kinds() -> Mapping[str, DestinationType]:
    _load_entry_points()
    return dict(_registry)


def get_type(kind: str) -> DestinationType:
    known = kinds()
    if kind not in known:
        raise ConfigurationError(
            f"Unknown destination kind {kind!r}.",
            field="kind",
            fix=f"Use one of: {', '.join(sorted(known))}.",
        )
    return known[kind]
