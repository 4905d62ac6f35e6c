"""The proof (issue 4): erase a person of the demo world, then scan every table and every file under
the data directory, byte by byte, for their emails, phone, name, ids and tokens: none is found, and
everyone else's data is intact.

The demo world goes in as `refinery demo` sends it: the official Segment SDK to a real server, the
CRM export through the importer, then resolution. The world's own files (its ground truth and the
CRM export, which stand for the customer's systems) are written outside the data directory."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import httpx
from privacy_helpers import file_hits, request, resolve, table_hits

from refinery.demo import crm
from refinery.demo import identity as demo_identity
from refinery.demo.run import CRM_MAPPING
from refinery.demo.send import send_events
from refinery.demo.world import APP_SOURCE, CRM_SOURCE, WEB_SOURCE, Person, World, generate
from refinery.privacy.normalise import normalise_phone
from support import start_server

PEOPLE = 40


def _person(world: World) -> Person:
    """A signed-up person with a phone, a CRM row and a device of their own, whose names nobody shares
    (and are long enough that random bytes of ciphertext cannot spell them by chance)."""
    crm_people = {r.person_id for r in world.crm_rows if r.values.get("customer_id")}
    names = [p.first_name for p in world.people] + [p.last_name for p in world.people]
    for p in world.people:
        own = [d for d in p.devices if not world.devices[d].shared]
        if p.user_id and p.phone and p.person_id in crm_people and own and names.count(p.first_name) == 1 \
                and names.count(p.last_name) == 1 and min(len(p.first_name), len(p.last_name)) >= 5:
            return p
    raise AssertionError("the world has no suitable person; change PEOPLE")


def _values(world: World, p: Person) -> dict[str, list[str]]:
    own_devices = [world.devices[d] for d in p.devices if not world.devices[d].shared]
    rows = [r.values for r in world.crm_rows if r.person_id == p.person_id]
    phone = normalise_phone(p.phone or "", p.country, "US").value
    return {
        "emails": sorted({e.lower() for e in p.emails} | {r["email"].lower() for r in rows if r.get("email")}),
        "phones": sorted({p.phone or "", phone} | {r["phone"] for r in rows if r.get("phone")}),
        "names": [p.first_name, p.last_name],
        "ids": sorted({p.user_id or ""} | {a for d in own_devices for a in d.anonymous_ids}
                      | {d.device_id for d in own_devices if d.device_id} | {d.advertising_id for d in own_devices if d.advertising_id}
                      | {r["customer_id"] for r in rows if r.get("customer_id")}),
    }


def _alone(db: Path, anon: str, needles: list[str]) -> None:
    """`anon` belongs to a profile (if any) that holds no other identifier of the erased person."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute("SELECT i2.value FROM identities i JOIN identities i2 ON i2.profile_id = i.profile_id "
                           "WHERE i.value = ?", [anon]).fetchall()
    finally:
        con.close()
    assert not {r[0] for r in rows} & set(needles), anon


def _counts(db: Path, user_ids: list[str]) -> dict[str, int]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute("SELECT user_id, count(*) FROM events WHERE user_id IN (SELECT unnest(CAST(? AS VARCHAR[]))) "
                           "GROUP BY 1", [user_ids]).fetchall()
    finally:
        con.close()
    return {u: int(n) for u, n in rows}


def test_erase_a_person_of_the_demo_world_and_find_nothing_of_them(tmp_path: Path) -> None:
    world = generate(PEOPLE, 11, datetime(2026, 3, 1, tzinfo=UTC))
    outside = tmp_path / "customer-systems"
    outside.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    demo_identity.ensure_rules_file(data / "identity-rules.yaml")
    crm_csv = outside / "crm_export.csv"
    with open(crm_csv, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=crm.COLUMNS)
        w.writeheader()
        w.writerows(r.values for r in world.crm_rows)

    srv = start_server(data)
    try:
        with srv.api() as api:
            keys = {s: api.post("/api/sources", json={"name": s, "unplanned_events": "accept"}).json()["write_key"]
                    for s in (WEB_SOURCE, APP_SOURCE)}
            assert api.post("/api/sources", json={"name": CRM_SOURCE, "kind": "import"}).status_code == 201
        send_events(srv.url, keys, world.events)
        with srv.api() as api:
            job = api.post("/api/imports", json={"path": str(crm_csv), "source": CRM_SOURCE, "mapping": CRM_MAPPING}).json()
            while job["status"] in ("new", "started"):
                time.sleep(0.1)
                job = api.get(f"/api/imports/{job['import_id']}").json()
            assert job["status"] == "completed", job
        resolve(srv)
        with srv.api() as api:
            assert api.post("/api/identity/match", timeout=300).status_code == 200

        person = _person(world)
        values = _values(world, person)
        others = sorted({p.user_id for p in world.people if p.user_id and p is not person})
        doc = request(srv, "export", f"user_id:{person.user_id}").json()["document"]
        tokens = sorted({i["stored_as"] for i in doc["subject"]["identifiers"] if i["stored_as"].startswith("pii:")})
        name_tokens = sorted({v["token"] for v in doc["stores"]["vault"] if v["kind"] in ("first_name", "last_name")})
        r = request(srv, "erase", f"user_id:{person.user_id}")
        assert r.status_code == 201, r.text
        receipt: dict[str, Any] = r.json()["receipt"]
        assert receipt["keys_destroyed"] >= 1 and sum(receipt["stores"].values()) > 0
        with srv.api() as api:
            profiles_left = api.post("/api/query", json={"sql": "SELECT count(*) FROM profiles"}).json()["rows"][0][0]
    finally:
        srv.stop()

    # Ids of theirs that no identifier of theirs ever linked (a cookie cleared and never logged in again)
    # are not known to be theirs: they stay, in a profile of their own that holds nothing else of them.
    linked = {i["value"] for i in doc["subject"]["identifiers"]}
    unlinked = sorted(set(values["ids"]) - linked)
    ids = sorted(set(values["ids"]) & linked)
    assert person.user_id in ids
    needles = values["emails"] + values["phones"] + ids + tokens + name_tokens
    assert table_hits(data / "refinery.duckdb", needles, values["names"]) == {}
    for anon in unlinked:
        _alone(data / "refinery.duckdb", anon, needles)
    # The file itself: DuckDB keeps deleted rows' bytes in free blocks until `refinery privacy compact`.
    proc = subprocess.run([sys.executable, "-m", "refinery", "privacy", "compact", "--data-dir", str(data), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert file_hits(data, needles, values["names"]) == {}, "found under the data directory"
    # Everyone else: their events and profiles are all there.
    expected = {}
    for e in world.events:
        uid = e.message.get("userId")
        if uid and uid in others and e.expected == "clean" and e.source in (WEB_SOURCE, APP_SOURCE):
            expected[uid] = expected.get(uid, 0) + 1
    after = _counts(data / "refinery.duckdb", others)
    assert expected and all(after.get(u, 0) >= n for u, n in expected.items())
    assert profiles_left > PEOPLE // 2
    assert "@" not in json.dumps(receipt)
    # The compacted store opens and works: the server starts on it, reads and takes new events.
    srv = start_server(data)
    try:
        with srv.api() as api:
            n = api.post("/api/query", json={"sql": "SELECT count(*) FROM events"}).json()["rows"][0][0]
            assert n >= sum(expected.values())
        r = httpx.post(srv.url + "/v1/track", json={"userId": "after-compaction", "event": "Ping"},
                       headers={"Authorization": "Basic " + __import__("base64").b64encode(f"{keys[WEB_SOURCE]}:".encode()).decode()})
        assert r.status_code == 200, r.text
    finally:
        srv.stop()
