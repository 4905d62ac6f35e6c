"""The catalog: which events arrive, from which sources, with which properties of which types.

One entry per (source, call type, event name): count, first and last event time, and for each
top-level key of `properties` (track, page, screen) and of `traits` (identify, group, and any call
that carries them) its inferred type (the most common non-null JSON type) with every type seen.

For callers without `pii:read` the catalog is k-anonymous (`build(..., min_group_size=k)`): an event
seen from fewer than k distinct people, and a property or trait key seen from fewer than k people
within an event, is left out, and `suppressed_groups` says how many were; the rest is unchanged.
A rare event's name, count and first/last time would otherwise tell when a handful of people did it.
"""

from __future__ import annotations

from typing import Any

from refinery.governance import kanon
from refinery.storage.engine import Engine

_EVENTS_SQL = """
SELECT source, type, COALESCE(event, name, type) AS event_name, count(*) AS count,
       min(timestamp) AS first_seen, max(timestamp) AS last_seen
FROM events
WHERE (? IS NULL OR source = ?)
GROUP BY ALL
ORDER BY count DESC, source, event_name
"""

# json_each gives each top-level key with its JSON type; keys are never used as paths, so a key
# like "a.b" or "$" is counted as itself. `kind` says which object the key came from.
_FIELDS_SQL = """
SELECT e.source, e.type, COALESCE(e.event, e.name, e.type) AS event_name, 'properties' AS kind,
       p.key AS key, p.type AS json_type, count(*) AS count
FROM events e, json_each(CASE WHEN json_type(e.properties) = 'OBJECT' THEN e.properties END) p
WHERE ? IS NULL OR e.source = ?
GROUP BY ALL
UNION ALL
SELECT e.source, e.type, COALESCE(e.event, e.name, e.type) AS event_name, 'traits' AS kind,
       t.key AS key, t.type AS json_type, count(*) AS count
FROM events e, json_each(CASE WHEN json_type(e.traits) = 'OBJECT' THEN e.traits END) t
WHERE ? IS NULL OR e.source = ?
GROUP BY ALL
ORDER BY 1, 3, 4, 5, count DESC
"""
_KINDS = ("properties", "traits")

# The same groups with their distinct people (`kanon.PERSON_TABLES['events']`'s person: the event's
# profile, else its user or anonymous id), for the k-anonymous catalog. Apart, so the full catalog pays no join.
_EVENT_PEOPLE_SQL = """
SELECT e.source, e.type, COALESCE(e.event, e.name, e.type) AS event_name,
       count(DISTINCT COALESCE(ep.profile_id, 'user_id:' || e.user_id, 'anonymous_id:' || e.anonymous_id)) AS people
FROM events e LEFT JOIN event_profiles ep ON ep.source = e.source AND ep.message_id = e.message_id
WHERE (? IS NULL OR e.source = ?)
GROUP BY ALL
"""
_FIELD_PEOPLE_SQL = """
SELECT e.source, e.type, COALESCE(e.event, e.name, e.type) AS event_name, 'properties' AS kind, p.key AS key,
       count(DISTINCT COALESCE(ep.profile_id, 'user_id:' || e.user_id, 'anonymous_id:' || e.anonymous_id)) AS people
FROM events e LEFT JOIN event_profiles ep ON ep.source = e.source AND ep.message_id = e.message_id,
     json_each(CASE WHEN json_type(e.properties) = 'OBJECT' THEN e.properties END) p
WHERE ? IS NULL OR e.source = ?
GROUP BY ALL
UNION ALL
SELECT e.source, e.type, COALESCE(e.event, e.name, e.type) AS event_name, 'traits' AS kind, t.key AS key,
       count(DISTINCT COALESCE(ep.profile_id, 'user_id:' || e.user_id, 'anonymous_id:' || e.anonymous_id)) AS people
FROM events e LEFT JOIN event_profiles ep ON ep.source = e.source AND ep.message_id = e.message_id,
     json_each(CASE WHEN json_type(e.traits) = 'OBJECT' THEN e.traits END) t
WHERE ? IS NULL OR e.source = ?
GROUP BY ALL
"""

_TYPE_NAMES = {
    "VARCHAR": "string", "BIGINT": "integer", "UBIGINT": "integer", "DOUBLE": "number", "BOOLEAN": "boolean",
    "OBJECT": "object", "ARRAY": "array", "NULL": "null", "HUGEINT": "integer", "UHUGEINT": "integer",
}


def build(engine: Engine, *, source: str | None = None, min_group_size: int | None = None) -> dict[str, Any]:
    """The catalog as a dict: one entry per (source, type, event) with counts, property and trait types.

    With `min_group_size` (k; for callers without `pii:read`), entries and keys seen from fewer than
    k people are left out and counted in `suppressed_groups` (events) and `suppressed_keys`."""
    full = _build(engine, source)
    if min_group_size is None:
        return full
    return _k_anonymous(engine, full, source, min_group_size)


def _k_anonymous(engine: Engine, full: dict[str, Any], source: str | None, k: int) -> dict[str, Any]:
    cur = engine.reader()
    people = {(r["source"], r["type"], r["event_name"]): r["people"]
              for r in engine.fetch_dicts(_EVENT_PEOPLE_SQL, [source, source], cursor=cur)}
    key_people = {(r["source"], r["type"], r["event_name"], r["kind"], r["key"]): r["people"]
                  for r in engine.fetch_dicts(_FIELD_PEOPLE_SQL, [source] * 4, cursor=cur)}
    events = kanon.suppress(full["events"], k, people=lambda e: people.get((e["source"], e["type"], e["event"])))
    suppressed_keys = 0
    for entry in events.rows:
        for kind in _KINDS:
            group = (entry["source"], entry["type"], entry["event"], kind)
            keys = kanon.suppress([{"key": key, "value": value, "people": key_people.get((*group, key))}
                                   for key, value in entry[kind].items()], k)
            entry[kind] = {row["key"]: row["value"] for row in keys.rows}
            suppressed_keys += keys.suppressed_groups
    return {"events": events.rows, "min_group_size": k, "suppressed_groups": events.suppressed_groups,
            "suppressed_keys": suppressed_keys}


def _build(engine: Engine, source: str | None) -> dict[str, Any]:
    cur = engine.reader()
    events = engine.fetch_dicts(_EVENTS_SQL, [source, source], cursor=cur)
    fields = engine.fetch_dicts(_FIELDS_SQL, [source] * 4, cursor=cur)
    by_event: dict[tuple[str, str, str], dict[str, Any]] = {}
    for e in events:
        key = (e["source"], e["type"], e["event_name"])
        by_event[key] = {
            "source": e["source"],
            "type": e["type"],
            "event": e["event_name"],
            "count": e["count"],
            "first_seen": e["first_seen"].isoformat() if e["first_seen"] else None,
            "last_seen": e["last_seen"].isoformat() if e["last_seen"] else None,
            "properties": {},
            "traits": {},
        }
    for p in fields:
        entry = by_event.get((p["source"], p["type"], p["event_name"]))
        if entry is None:
            continue
        prop = entry[p["kind"]].setdefault(p["key"], {"types": {}, "count": 0})
        type_name = _TYPE_NAMES.get(p["json_type"], str(p["json_type"]).lower())
        prop["types"][type_name] = prop["types"].get(type_name, 0) + p["count"]
        prop["count"] += p["count"]
    for entry in by_event.values():
        for prop in (prop for kind in _KINDS for prop in entry[kind].values()):
            # The inferred type is the most common non-null one (ties: alphabetical, so output is stable).
            non_null = {k: v for k, v in prop["types"].items() if k != "null"} or prop["types"]
            prop["type"] = min(non_null.items(), key=lambda kv: (-kv[1], kv[0]))[0]
            prop["types"] = dict(sorted(prop["types"].items(), key=lambda kv: (-kv[1], kv[0])))
    return {"events": list(by_event.values())}
