"""The demo world's ground truth: which identifiers belong to which person, and which devices are shared.

Built from what the world actually put in the data (every anonymous id, user id, email, phone,
CRM id, device id and advertising id found in the events and the CRM export, exactly as written
there), so identity resolution can score itself against it. Pure: `build()` returns plain data;
`refinery.demo.run` writes it as `ground_truth.json` and `event_truth.csv`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from refinery.demo.world import World

VERSION = 1
IDENTIFIER_KINDS: tuple[str, ...] = ("anonymous_id", "user_id", "email", "phone", "crm_id", "device_id", "advertising_id")
EVENT_TRUTH_COLUMNS: tuple[str, ...] = ("message_id", "source", "type", "event", "person_id", "device", "expected")


def event_identifiers(message: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(kind, value) of every identifier in one event, as sent."""
    for kind, key in (("anonymous_id", "anonymousId"), ("user_id", "userId")):
        if message.get(key):
            yield kind, str(message[key])
    traits = message.get("traits") or {}
    for kind in ("email", "phone"):
        if traits.get(kind):
            yield kind, str(traits[kind])
    device = (message.get("context") or {}).get("device") or {}
    if device.get("id"):
        yield "device_id", str(device["id"])
    if device.get("advertisingId"):
        yield "advertising_id", str(device["advertisingId"])


def crm_identifiers(values: dict[str, str]) -> Iterator[tuple[str, str]]:
    """(kind, value) of every identifier in one CRM row, as written in the file."""
    for kind, column in (("crm_id", "customer_id"), ("email", "email"), ("phone", "phone"), ("user_id", "web_user_id")):
        if values.get(column, "").strip():
            yield kind, values[column]


def build(world: World) -> dict[str, Any]:
    """The ground truth document (see docs/demo.md for its fields)."""
    owners: dict[tuple[str, str], set[str]] = {}
    device_users: dict[str, set[str]] = {}
    for e in world.events:
        device_users.setdefault(e.device_key, set()).add(e.person_id)
        for ident in event_identifiers(e.message):
            owners.setdefault(ident, set()).add(e.person_id)
    for row in world.crm_rows:
        for ident in crm_identifiers(row.values):
            owners.setdefault(ident, set()).add(row.person_id)

    by_person: dict[str, dict[str, list[str]]] = {p.person_id: {k: [] for k in IDENTIFIER_KINDS} for p in world.people}
    identifiers = []
    for (kind, value), persons in sorted(owners.items()):
        identifiers.append({"kind": kind, "value": value, "persons": sorted(persons), "shared": len(persons) > 1})
        for pid in persons:
            by_person[pid][kind].append(value)

    devices = []
    for dev in world.devices.values():
        users = sorted(device_users.get(dev.key, ()))
        if not users:
            continue
        devices.append({
            "device": dev.key, "kind": dev.kind, "source": dev.source, "anonymous_ids": list(dev.anonymous_ids),
            "device_id": dev.device_id, "household_id": dev.household_id, "persons": users, "shared": len(users) > 1,
        })

    households: dict[str, list[str]] = {}
    for p in world.people:
        households.setdefault(p.household_id, []).append(p.person_id)

    crm_expected: dict[str, int] = {}
    for row in world.crm_rows:
        crm_expected[row.expected] = crm_expected.get(row.expected, 0) + 1
    return {
        "version": VERSION,
        "world": {"seed": world.seed, "people": world.size, "now": _iso(world.now)},
        "expected": {"events": world.expected_counts(), "crm_rows": crm_expected},
        "persons": [
            {
                "person_id": p.person_id,
                "household_id": p.household_id,
                "first_name": p.first_name,
                "last_name": p.last_name,
                "country": p.country,
                "city": p.city,
                "user_id": p.user_id,
                "emails": list(p.emails),
                "email_changed_at": _iso(p.email_changed_at),
                "phone": p.phone,
                "consent": [{"from": _iso(at), "categoryPreferences": prefs} for at, prefs in p.consent_history],
                "devices": [d for d in p.devices if p.person_id in device_users.get(d, ())],
                "identifiers": by_person[p.person_id],
            }
            for p in world.people
        ],
        "identifiers": identifiers,
        "devices": devices,
        "shared_devices": [d["device"] for d in devices if d["shared"]],
        "households": households,
        "crm_rows": [
            {"line": i + 2, "customer_id": r.values["customer_id"] or None, "person_id": r.person_id, "issues": list(r.issues), "expected": r.expected}
            for i, r in enumerate(world.crm_rows)
        ],
    }


def event_truth(world: World) -> Iterator[tuple[str, ...]]:
    """One row per event: who made it, on which device, and what should become of it."""
    for e in world.events:
        m = e.message
        yield (e.message_id, e.source, m["type"], m.get("event") or m.get("name") or "", e.person_id, e.device_key, e.expected)


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")
