"""What rules may name: events, their properties, profile traits, with types; and which fields are personal.

`build_catalog(engine)` reads it from the store (the ingest catalog, refinery/ingest/catalog.py, and
the vault's policy); tests and tools build a `Catalog` directly. The checker uses it to refuse
unknown names with a suggestion and to type comparisons.
"""

from __future__ import annotations

import difflib
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from refinery.storage.engine import Engine

#: Catalog type names (ingest/catalog.py) -> the language's types.
_TYPES = {"string": "string", "integer": "number", "number": "number", "boolean": "boolean",
          "object": "object", "array": "array", "null": "unknown"}


#: DuckDB's json_type names -> the language's types.
_PROFILE_TYPES = {"varchar": "string", "bigint": "number", "ubigint": "number", "double": "number", "boolean": "boolean",
                  "object": "object", "array": "array", "null": "unknown"}


@dataclass(frozen=True)
class Catalog:
    """events: event name -> property -> type; traits: profile trait -> type. Types are the
    language's: string, number, boolean, timestamp, object, array, unknown.

    `strict=False` lets unknown events, properties and traits through (typed `unknown`), for a
    store that has not seen its events yet."""

    events: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    traits: Mapping[str, str] = field(default_factory=dict)
    personal_traits: frozenset[str] = frozenset()
    personal_properties: frozenset[str] = frozenset()
    strict: bool = True
    #: The store's region for phone numbers written without a country code (identity_phone_region):
    #: a `phone = '...'` literal is normalised with it, as ingest normalised the stored ones.
    phone_region: str = "US"

    def properties(self, events: Iterable[str] | None) -> dict[str, str]:
        """The properties of these events (all events for None), a key's type where they agree."""
        names = list(self.events) if events is None else [e for e in events if e in self.events]
        out: dict[str, str] = {}
        for name in names:
            for key, kind in self.events[name].items():
                out[key] = kind if out.get(key, kind) == kind else "unknown"
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"events": {k: dict(v) for k, v in self.events.items()}, "traits": dict(self.traits),
                "personal_traits": sorted(self.personal_traits), "personal_properties": sorted(self.personal_properties)}


def suggest(name: str, options: Iterable[str]) -> str | None:
    """The closest known name, if one is close enough to be a typo."""
    options = list(options)
    hits = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    if not hits:
        lowered = {o.lower(): o for o in options}
        hits = [lowered[h] for h in difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)]
    return hits[0] if hits else None


def build_catalog(engine: Engine) -> Catalog:
    """The catalog of the store behind `engine`: every event name (`COALESCE(event, name, type)`)
    with its properties, the traits identify calls carry, and the personal fields when the store
    pseudonymises (they hold tokens)."""
    from refinery.ingest import catalog as ingest_catalog
    from refinery.privacy import pii

    entries = ingest_catalog.build(engine)["events"]
    events: dict[str, dict[str, str]] = {}
    traits: dict[str, tuple[str, int]] = {}
    for entry in entries:
        props = events.setdefault(entry["event"], {})
        for key, info in entry["properties"].items():
            kind = _TYPES.get(info["type"], "unknown")
            props[key] = kind if props.get(key, kind) == kind else "unknown"
        if entry["type"] == "identify":
            for key, info in entry["traits"].items():
                kind, count = _TYPES.get(info["type"], "unknown"), info["count"]
                if key not in traits or traits[key][1] < count:
                    traits[key] = (kind, count)
    # Traits of the curated profiles too: imports and trait policies put traits there that no
    # identify call in the catalog's window carries.
    for key, jtype, count in engine.fetch_all(
        "SELECT key, lower(json_type(value)), count(*) FROM profiles, json_each(traits) GROUP BY ALL", cursor=engine.reader()
    ):
        kind = _PROFILE_TYPES.get(str(jtype), "unknown")
        if key not in traits or traits[key][1] < int(count):
            traits[key] = (kind, int(count))
    vault = pii.vault_of(engine)
    personal_traits: frozenset[str] = frozenset()
    personal_properties: frozenset[str] = frozenset()
    phone_region = vault.policy.phone_region if vault is not None else "US"
    if vault is not None and vault.policy.enabled:
        personal_traits = frozenset(vault.policy.trait_fields)
        personal_properties = frozenset(vault.policy.property_fields)
    return Catalog(events, {k: v[0] for k, v in traits.items()}, personal_traits, personal_properties,
                   phone_region=phone_region)


#: Per store: (fingerprint, monotonic time built, catalog). Building reads every event's JSON keys
#: (1.5 s per million events), too slow for a preview on every keystroke.
_CACHE: weakref.WeakKeyDictionary[Engine, tuple[tuple[Any, ...], float, Catalog]] = weakref.WeakKeyDictionary()
_FINGERPRINT = ("SELECT (SELECT count(*) FROM events), (SELECT max(loaded_at) FROM events), "
                "(SELECT count(*) FROM profiles), (SELECT max(updated_at) FROM profiles)")


def cached_catalog(engine: Engine, *, max_age: float = 60.0, fresh: bool = False) -> Catalog:
    """The store's catalog, rebuilt when events or profiles changed and the cached one is older
    than `max_age` seconds (so a name first seen less than a minute ago may be missing: callers
    that get `UnknownNameError` from a cached catalog retry with `fresh=True`)."""
    fingerprint = tuple(engine.fetch_all(_FINGERPRINT, cursor=engine.reader())[0])
    hit = _CACHE.get(engine)
    now = time.monotonic()
    if hit is not None and not fresh and (hit[0] == fingerprint or now - hit[1] < max_age):
        return hit[2]
    catalog = build_catalog(engine)
    _CACHE[engine] = (fingerprint, now, catalog)
    return catalog
