"""The demo world generator: deterministic for a seed, and holding every property the demo promises.

Identifiers are collected here by reading the messages and CRM rows directly (not through
refinery.demo.groundtruth), so the ground-truth check is independent of the code it checks.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest

from refinery.demo import crm, groundtruth
from refinery.demo.world import APP_SOURCE, CLEAN, WEB_SOURCE, World, generate
from refinery.errors import ConfigurationError

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SEEDS = (1, 7, 2024)


@pytest.fixture(scope="module", params=SEEDS)
def world(request: pytest.FixtureRequest) -> World:
    return generate(30, request.param, NOW)


def _identify_emails(world: World) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = defaultdict(list)
    for e in world.events:
        email = (e.message.get("traits") or {}).get("email")
        if email and email not in seen[e.person_id]:
            seen[e.person_id].append(email)
    return seen


def test_same_seed_same_world() -> None:
    a, b = generate(40, 11, NOW), generate(40, 11, NOW)
    assert a.events == b.events
    assert a.crm_rows == b.crm_rows
    assert groundtruth.build(a) == groundtruth.build(b)
    c = generate(40, 12, NOW)
    assert [e.message_id for e in c.events] != [e.message_id for e in a.events]


def test_too_few_people_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="at least 2"):
        generate(1, 1, NOW)


def test_people_browse_anonymously_then_log_in_on_several_devices(world: World) -> None:
    by_anon: dict[str, list[dict]] = defaultdict(list)
    for e in world.events:
        by_anon[e.message["anonymousId"]].append(e.message)
    # Some cookie shows anonymous events first and identified ones (same anonymous id) later.
    converted = [
        msgs for msgs in by_anon.values()
        if not msgs[0].get("userId") and any(m.get("userId") for m in msgs)
    ]
    assert converted
    anon_per_person: dict[str, set[str]] = defaultdict(set)
    for e in world.events:
        anon_per_person[e.person_id].add(e.message["anonymousId"])
    assert any(len(ids) >= 2 for ids in anon_per_person.values())
    identifies = [e.message for e in world.events if e.message["type"] == "identify"]
    assert identifies and all(m["userId"] and m["traits"]["email"] for m in identifies)
    assert {e.source for e in world.events} == {WEB_SOURCE, APP_SOURCE}
    app = [e.message for e in world.events if e.source == APP_SOURCE]
    assert app and all(m["context"]["device"]["id"] for m in app)
    web = [e.message for e in world.events if e.source == WEB_SOURCE]
    assert all(m["context"]["userAgent"] and m["context"]["ip"] for m in web)


def test_shared_family_devices_exist(world: World) -> None:
    users_by_anon: dict[str, set[str]] = defaultdict(set)
    people_by_anon: dict[str, set[str]] = defaultdict(set)
    for e in world.events:
        people_by_anon[e.message["anonymousId"]].add(e.person_id)
        if e.message.get("userId"):
            users_by_anon[e.message["anonymousId"]].add(e.message["userId"])
    shared = {a for a, people in people_by_anon.items() if len(people) >= 2}
    assert shared
    assert any(len(users_by_anon[a]) >= 2 for a in shared), "two people log in on one family device"
    truth = groundtruth.build(world)
    truth_shared = {i["value"] for i in truth["identifiers"] if i["kind"] == "anonymous_id" and i["shared"]}
    assert truth_shared == shared
    assert truth["shared_devices"]


def test_people_change_email(world: World) -> None:
    changed = {pid: emails for pid, emails in _identify_emails(world).items() if len(emails) >= 2}
    assert changed
    truth = {p["person_id"]: p for p in groundtruth.build(world)["persons"]}
    for pid, emails in changed.items():
        assert set(emails) <= set(truth[pid]["identifiers"]["email"])
        assert truth[pid]["emails"][-1] == emails[-1]


def test_crm_export_is_messy(world: World) -> None:
    rows = [r.values for r in world.crm_rows]
    assert list(rows[0]) == list(crm.COLUMNS)
    true_emails = {e for p in world.people for e in p.emails}
    people = {p.person_id: p for p in world.people}
    # Typos: an email that is no one's, even after trimming and lower-casing; a misspelt name.
    assert any(r["email"] and r["email"].strip().lower() not in true_emails for r in rows)
    assert any(
        (r.values["first_name"], r.values["last_name"]) != (people[r.person_id].first_name, people[r.person_id].last_name)
        for r in world.crm_rows
    )
    # Missing values, rows exported twice, one person under two ids, and a row with no id.
    assert any(r["email"] == "" for r in rows) and any(r["phone"] == "" for r in rows)
    as_tuples = [tuple(r.values()) for r in rows]
    assert len(set(as_tuples)) < len(as_tuples)
    ids_per_person: dict[str, set[str]] = defaultdict(set)
    for r in world.crm_rows:
        if r.values["customer_id"]:
            ids_per_person[r.person_id].add(r.values["customer_id"])
    assert any(len(ids) >= 2 for ids in ids_per_person.values())
    assert sum(1 for r in rows if not r["customer_id"]) == 1


def test_consent_differs_by_purpose(world: World) -> None:
    prefs = [e.message["context"]["consent"]["categoryPreferences"] for e in world.events]
    purposes = {"analytics", "personalisation", "marketing", "advertising"}
    assert all(set(p) == purposes for p in prefs)
    for purpose in purposes:
        assert {p[purpose] for p in prefs} == {True, False}, purpose
    assert any(len(set(p.values())) == 2 for p in prefs), "someone grants one purpose and refuses another"


def test_purchases_funnels_and_timestamps(world: World) -> None:
    events = [e.message.get("event") for e in world.events]
    for name in ("Product Viewed", "Product Added", "Checkout Started", "Order Completed", "Signed Up"):
        assert name in events, name
    orders = [e.message["properties"] for e in world.events if e.message.get("event") == "Order Completed"]
    for o in orders:
        assert o["total"] > 0 and o["currency"] in {"GBP", "USD", "EUR"} and o["category"] and o["products"]
    assert any(e.message.get("properties", {}).get("path") == "/pricing" for e in world.events)
    clean = [e.timestamp for e in world.events if e.expected == CLEAN]
    assert min(clean) >= NOW - timedelta(days=61) and max(clean) < NOW
    assert max(clean) - min(clean) > timedelta(days=20)
    bad = [e for e in world.events if e.expected != CLEAN]
    assert {e.expected for e in bad} == {"timestamp_in_future", "timestamp_too_old"}
    assert all(e.timestamp > NOW + timedelta(days=1) or e.timestamp.year < 2000 for e in bad)
    assert len({e.message_id for e in world.events}) == len(world.events)


def test_ground_truth_covers_every_identifier(world: World) -> None:
    found: dict[tuple[str, str], set[str]] = defaultdict(set)
    for e in world.events:
        m = e.message
        device = m["context"].get("device", {})
        for kind, value in (
            ("anonymous_id", m.get("anonymousId")), ("user_id", m.get("userId")),
            ("email", (m.get("traits") or {}).get("email")), ("phone", (m.get("traits") or {}).get("phone")),
            ("device_id", device.get("id")), ("advertising_id", device.get("advertisingId")),
        ):
            if value:
                found[(kind, value)].add(e.person_id)
    for r in world.crm_rows:
        for kind, column in (("crm_id", "customer_id"), ("email", "email"), ("phone", "phone"), ("user_id", "web_user_id")):
            if r.values[column].strip():
                found[(kind, r.values[column])].add(r.person_id)
    truth = {(i["kind"], i["value"]): set(i["persons"]) for i in groundtruth.build(world)["identifiers"]}
    assert set(found) == set(truth)
    for key, persons in found.items():
        assert truth[key] == persons, key
    kinds = {k for k, _ in found}
    assert {"anonymous_id", "user_id", "email", "phone", "crm_id", "device_id"} <= kinds
