"""The catalog: which events arrive, from which sources, with which properties of which types.

One entry per (source, call type, event name): count, first and last event time, and for each
top-level key of `properties` (track, page, screen) and of `traits` (identify, group, and any call
that carries them) its inferred type (the most common non-null JSON type) with every type seen.
"""

from __future__ import annotations

from typing import Any

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

_TYPE_NAMES = {
    "VARCHAR": "string", "BIGINT": "integer", "UBIGINT": "integer", "DOUBLE": "number", "BOOLEAN": "boolean",
    "OBJECT": "object", "ARRAY": "array", "NULL": "null", "HUGEINT": "integer", "UHUGEINT": "integer",
}


def build(engine: Engine, *, source: str | None = None) -> dict[str, Any]:
    """The catalog as a dict: one entry per (source, type, event) with counts, property and trait types."""
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
