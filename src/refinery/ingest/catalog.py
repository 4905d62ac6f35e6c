"""The catalog: which events arrive, from which sources, with which properties of which types."""

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

_PROPERTIES_SQL = """
WITH keyed AS (
  SELECT source, type, COALESCE(event, name, type) AS event_name, properties, unnest(json_keys(properties)) AS key
  FROM events
  WHERE properties IS NOT NULL AND json_type(properties) = 'OBJECT' AND (? IS NULL OR source = ?)
)
SELECT source, type, event_name, key, json_type(json_extract(properties, key)) AS json_type, count(*) AS count
FROM keyed
GROUP BY ALL
ORDER BY source, event_name, key, count DESC
"""

_TYPE_NAMES = {
    "VARCHAR": "string", "BIGINT": "integer", "UBIGINT": "integer", "DOUBLE": "number", "BOOLEAN": "boolean",
    "OBJECT": "object", "ARRAY": "array", "NULL": "null",
}


def build(engine: Engine, *, source: str | None = None) -> dict[str, Any]:
    """The catalog as a dict: one entry per (source, type, event) with counts and property types."""
    cur = engine.reader()
    events = engine.fetch_dicts(_EVENTS_SQL, [source, source], cursor=cur)
    props = engine.fetch_dicts(_PROPERTIES_SQL, [source, source], cursor=cur)
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
        }
    for p in props:
        entry = by_event.get((p["source"], p["type"], p["event_name"]))
        if entry is None:
            continue
        prop = entry["properties"].setdefault(p["key"], {"types": {}, "count": 0})
        type_name = _TYPE_NAMES.get(p["json_type"], str(p["json_type"]).lower())
        prop["types"][type_name] = prop["types"].get(type_name, 0) + p["count"]
        prop["count"] += p["count"]
    for entry in by_event.values():
        for prop in entry["properties"].values():
            # The inferred type is the most common non-null one.
            non_null = {k: v for k, v in prop["types"].items() if k != "null"} or prop["types"]
            prop["type"] = max(non_null.items(), key=lambda kv: kv[1])[0]
    return {"events": list(by_event.values())}
