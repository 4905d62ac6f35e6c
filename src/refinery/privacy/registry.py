"""Every store of personal data registers here, so subject requests reach it by construction.

A `PersonalStore` can export what it holds about a subject and erase it. Subject requests
(`privacy/requests.py`) call every registered store, in registration order; nothing else decides
which tables an export or an erasure covers. Tables that hold no personal data are declared too,
with the reason, and `tests/privacy/test_registry.py` fails when the database has a table that is
neither covered by a store nor declared: a new stage that adds a table must say which it is.

Destinations that can delete a person on their side (activation, later) register a
`DeletionTarget`; an erasure asks each of them and lists them on its receipt.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from refinery.errors import ConfigurationError
from refinery.storage.engine import Engine


@dataclass(frozen=True)
class Subject:
    """Everything that names one person, found before anything is exported or erased.

    Values are as the tables store them (tokens for personal identifier types when pseudonymising).
    `clear` maps tokens to their clear normal values (revealed from the vault before the keys are
    destroyed); it is used to scan sealed payloads and never leaves this process.
    """

    identifier_type: str | None                       # the type asked for (None: a bare value)
    profile_ids: tuple[str, ...] = ()                 # the profile, the profiles merged into it, and its survivor
    identifiers: tuple[tuple[str, str], ...] = ()     # (type, stored value) of every identifier of the person
    key_ids: tuple[str, ...] = ()                     # vault keys of the person's user and anonymous ids
    tokens: tuple[str, ...] = ()                      # every token sealed under those keys, and identifier tokens
    identifier_tokens: tuple[str, ...] = ()           # tokens of identifier types only (email, phone): unique to the person
    clear: dict[str, str] = field(default_factory=dict, repr=False)  # token -> clear normal value
    messages: tuple[tuple[str, str], ...] = ()        # (source, message_id) of the person's events
    #: Keys of rows without a subject (`ek_...`) an erasure found to be the person's: destroyed with theirs.
    found_keys: list[str] = field(default_factory=list, compare=False)
    #: The vault (to unseal payloads and values) and the default phone region, for stores that need them.
    vault: Any = field(default=None, repr=False, compare=False)
    phone_region: str = "US"

    def values(self, *types: str) -> list[str]:
        """Stored values of the person's identifiers (of `types`, or all)."""
        return sorted({v for t, v in self.identifiers if not types or t in types})

    @property
    def ids(self) -> list[str]:
        """User ids and anonymous ids: what events name their subject by."""
        return self.values("user_id", "anonymous_id")

    def needles(self) -> list[str]:
        """Values specific to this person, to find them inside other rows' text: every identifier
        value, identifier tokens and their clear values. Never names or addresses (other people
        share them, and so do their tokens)."""
        out = set(self.values())
        out.update(self.identifier_tokens)
        out.update(self.clear[t] for t in self.identifier_tokens if t in self.clear)
        return sorted(v for v in out if v)


@runtime_checkable
class PersonalStore(Protocol):
    """A store that holds personal data: it can say what it holds about a subject, and forget it."""

    name: str
    #: The database tables it covers (empty for a store outside the database).
    tables: tuple[str, ...]

    def export(self, engine: Engine, subject: Subject) -> Any:
        """What this store holds about `subject`: JSON-ready rows or a dict."""

    def erase(self, engine: Engine, subject: Subject) -> int:
        """Delete or anonymise `subject` here, inside the caller's transaction; returns rows changed."""


@runtime_checkable
class DeletionTarget(Protocol):
    """A destination that can delete a person on its side (an ad platform, an email tool)."""

    name: str

    def request_deletion(self, subject: Subject) -> dict[str, Any]:
        """Ask the destination to delete `subject`; returns what it answered (no personal values)."""


@dataclass
class Registry:
    stores: dict[str, PersonalStore] = field(default_factory=dict)
    no_personal_data: dict[str, str] = field(default_factory=dict)
    destinations: dict[str, DeletionTarget] = field(default_factory=dict)

    def register(self, store: PersonalStore) -> PersonalStore:
        if not isinstance(store, PersonalStore):
            raise ConfigurationError(
                f"{store!r} is not a personal store.",
                fix="Give it a name, a tables tuple, and export(engine, subject) and erase(engine, subject) methods.",
            )
        if store.name in self.stores and self.stores[store.name] is not store:
            raise ConfigurationError(f"A personal store named {store.name!r} is registered already.",
                                     fix="Give each store its own name.")
        for table in store.tables:
            if table in self.no_personal_data:
                raise ConfigurationError(f"Table {table!r} is declared to hold no personal data, yet store {store.name!r} covers it.",
                                         fix="Remove one of the two declarations.")
        self.stores[store.name] = store
        return store

    def declare_no_personal_data(self, table: str, reason: str) -> None:
        """Say that `table` holds nothing about any person, and why (shown in docs and tests)."""
        if not reason.strip():
            raise ConfigurationError(f"Declaring {table!r} free of personal data needs a reason.", fix="Say why it holds none.")
        if table in self.covered():
            raise ConfigurationError(f"Table {table!r} is covered by a personal store; it cannot also hold no personal data.",
                                     fix="Remove one of the two declarations.")
        self.no_personal_data[table] = reason

    def register_destination(self, target: DeletionTarget) -> DeletionTarget:
        self.destinations[target.name] = target
        return target

    def covered(self) -> dict[str, str]:
        """table -> the store covering it."""
        return {t: s.name for s in self.stores.values() for t in s.tables}

    def unaccounted(self, tables: Iterable[str]) -> list[str]:
        """Tables neither covered by a store nor declared free of personal data."""
        known = set(self.covered()) | set(self.no_personal_data)
        return sorted(t for t in tables if t not in known and not _is_prefixed(t, known))


def _is_prefixed(table: str, known: set[str]) -> bool:
    """`retention_*`-style declarations cover every table with the prefix."""
    return any(k.endswith("*") and table.startswith(k[:-1]) for k in known)


#: The registry subject requests use. Built-in stores are registered in `privacy/stores.py`;
#: later stages register theirs with `REGISTRY.register(...)` at import time.
REGISTRY = Registry()


def registry() -> Registry:
    """The registry with the built-in stores loaded."""
    from refinery.privacy import stores  # noqa: F401 - registers the built-in stores

    return REGISTRY
