"""Imports honour the vault: the collector's tokens, no clear personal value anywhere in the store,
rows sealed per subject in the raw zone (crypto-shredding one person leaves the others readable),
suppressed people not imported, and sealed failures replayed (or not, once their key is gone)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
from starlette.testclient import TestClient

from refinery.api.app import create_app
from refinery.governance.principal import local_principal
from refinery.ingest.import_vault import read_sealed_rows
from refinery.ingest.importer import get_import, run_import
from refinery.ingest.replay import replay
from refinery.privacy import requests
from refinery.profiles.build import Refresh
from refinery.runtime import Runtime
from refinery.settings import Settings
from support import WRITE_KEY

BASIC = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}
HEADER = "customer_id,email,phone,first_name,last_name,country,plan,joined\n"
PEOPLE = (
    HEADER
    + "c1,Wilhelmina.Ashcombe@ashcombe-estates.co.uk,+44 20 7946 0101,Wilhelmina,Ashcombe,GB,pro,2024-01-02 10:00:00\n"
    + "c2,bartholomew.quigley@quigleyandsons.net,(212) 555-0199,Bartholomew,Quigley,US,free,2024-01-03 10:00:00\n"
    + "c3,zoë.ångström@exämple.se,070-123 45 67,Zoë,Ångström,SE,pro,2024-01-04 10:00:00\n"
    + "c4,ignatius.fairweather@fairweather.io,+1 415 555 0142,Ignatius,Fairweather,US,pro,not-a-date\n"
    + "c5,octavia.pembrooke@pembrooke.dev,+1 415 555 0177,Octavia,Pembrooke,US,pro,2024-01-05 10:00:00,extra\n"
)
IDENTIFY = {
    "type": "identify", "user_id": "customer_id", "email": "email", "phone": "phone",
    "traits": {"first_name": "first_name", "last_name": "last_name", "country": "country", "plan": "plan"},
    "timestamp": {"column": "joined", "format": "%Y-%m-%d %H:%M:%S"}, "row_key": ["customer_id"],
}
#: What must never be found in clear: emails (as written), phones (as written and in E.164), names.
NEEDLES = [
    "Wilhelmina.Ashcombe@ashcombe-estates.co.uk", "bartholomew.quigley@quigleyandsons.net", "zoë.ångström@exämple.se",
    "ignatius.fairweather@fairweather.io", "octavia.pembrooke@pembrooke.dev",
    "+44 20 7946 0101", "+442079460101", "(212) 555-0199", "+12125550199", "070-123 45 67", "+46701234567",
    "+1 415 555 0142", "+14155550142", "+1 415 555 0177", "+14155550177",
]
NAMES = ["Wilhelmina", "Ashcombe", "Bartholomew", "Quigley", "Ångström", "Ignatius", "Fairweather", "Octavia", "Pembrooke"]


def rows(rt: Runtime, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    return rt.engine.fetch_dicts(sql, params, cursor=rt.engine.reader())


def tok(rt: Runtime, kind: str, value: Any, region: str | None = None) -> str:
    return rt.vault.tokens.tokenise(kind, value, region)[0]


def file_hits(folder: Path) -> dict[str, list[str]]:
    """needle -> files under `folder` holding it (byte by byte; emails and phones case-insensitively,
    names as whole words)."""
    hits: dict[str, list[str]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        low = raw.lower()
        for n in NEEDLES:
            if n.lower().encode() in low:
                hits.setdefault(n, []).append(str(path.relative_to(folder)))
        for w in NAMES:
            if re.search(rb"(?<![A-Za-z0-9])" + re.escape(w.encode()) + rb"(?![A-Za-z0-9])", raw):
                hits.setdefault(w, []).append(str(path.relative_to(folder)))
    return hits


def table_hits(db: Path) -> dict[str, list[str]]:
    """needle -> table.column where some row's value, as text, holds it."""
    hits: dict[str, list[str]] = {}
    con = duckdb.connect(str(db), read_only=True)
    try:
        for (table,) in con.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall():
            for (col,) in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]).fetchall():
                for n in [*NEEDLES, *NAMES]:
                    q = f'SELECT count(*) FROM "{table}" WHERE contains(lower(CAST("{col}" AS VARCHAR)), lower(?))'  # noqa: S608 - catalog names
                    if con.execute(q, [n]).fetchone()[0]:  # type: ignore[index]
                        hits.setdefault(n, []).append(f"{table}.{col}")
    finally:
        con.close()
    return hits


@pytest.fixture
def people(tmp_path: Path) -> Path:
    f = tmp_path / "people.csv"
    f.write_text(PEOPLE, encoding="utf-8")
    return f


@pytest.fixture
def app(runtime: Runtime) -> Iterator[TestClient]:
    runtime.plans.check_interval = 0
    with TestClient(create_app(runtime)) as client:
        yield client


def test_imported_tokens_equal_the_collectors_and_resolution_joins_them(runtime: Runtime, app: TestClient, people: Path) -> None:
    # The same person, seen by the website (anonymous, with her email and phone) and in the CRM export.
    body = {"anonymousId": "visitor-77", "messageId": "m-1", "traits": {
        "email": "wilhelmina.ashcombe@ASHCOMBE-estates.co.uk ", "phone": "+44 20 7946 0101", "first_name": "Wilhelmina", "country": "GB"}}
    r = app.post("/v1/identify", json=body, headers=BASIC)
    assert r.status_code == 200, r.text
    job = run_import(runtime, people, source="crm", mapping=IDENTIFY)
    assert (job.rows_loaded, job.rows_failed) == (3, 2), job.error

    web = json.loads(rows(runtime, "SELECT traits FROM events WHERE source = 'web'")[0]["traits"])
    crm = json.loads(rows(runtime, "SELECT traits FROM events WHERE source = 'crm' AND user_id = 'c1'")[0]["traits"])
    for field in ("email", "phone", "first_name"):
        assert web[field] == crm[field] and web[field].startswith(f"pii:{field}:"), field
    assert crm["last_name"] == tok(runtime, "last_name", "Ashcombe") and crm["plan"] == "pro"
    # the Python path (non-ASCII, phones with their country) gives the Tokeniser's tokens too
    zoe = json.loads(rows(runtime, "SELECT traits FROM events WHERE user_id = 'c3'")[0]["traits"])
    assert zoe["email"] == tok(runtime, "email", "zoë.ångström@exämple.se")
    assert zoe["phone"] == tok(runtime, "phone", "070-123 45 67", "SE")
    assert runtime.vault.reveal(runtime.engine, [zoe["phone"], zoe["last_name"]]) == {
        zoe["phone"]: "+46701234567", zoe["last_name"]: "Ångström"}

    runtime.writer.call(Refresh.from_settings(runtime.settings))
    ids = {(r["identifier_type"], r["value"]): r["profile_id"] for r in rows(runtime, "SELECT identifier_type, value, profile_id FROM identities")}
    assert ids[("anonymous_id", "visitor-77")] == ids[("user_id", "c1")]  # joined by the email and phone tokens
    assert ids[("user_id", "c1")] != ids[("user_id", "c2")]


def test_no_clear_personal_value_of_an_imported_person_anywhere(settings: Settings, people: Path) -> None:
    # The scanner finds every needle where it is (the source file), so a miss below means something.
    source_hits = file_hits(people.parent)
    assert set(source_hits) == {*NEEDLES, *NAMES} - {"+442079460101", "+12125550199", "+46701234567", "+14155550142", "+14155550177"}

    with Runtime.open(settings) as rt:
        job = run_import(rt, people, source="crm", mapping=IDENTIFY)
        assert (job.rows_loaded, job.rows_failed) == (3, 2), job.error
        reasons = {r["row_number"]: r["reason"] for r in rows(rt, "SELECT row_number, reason FROM failed_events")}
        assert reasons == {5: "invalid_timestamp", 6: "wrong_column_count"}
        assert rows(rt, "SELECT count(*) AS n FROM vault_values")[0]["n"] == 12  # 3 people x 4 personal traits
        job2 = run_import(rt, people, source="crm", mapping=IDENTIFY)  # a re-import adds nothing, clear or not
        assert (job2.rows_loaded, job2.rows_duplicate) == (0, 5)
    data = settings.data_dir
    assert table_hits(settings.database_path) == {}
    assert file_hits(data) == {}
    assert any(p.name.endswith(".sealed.parquet") for p in settings.raw_files_dir.iterdir())


def test_destroying_one_persons_key_leaves_everyone_elses_rows_readable(runtime: Runtime, people: Path) -> None:
    job = run_import(runtime, people, source="crm", mapping=IDENTIFY)
    stored = Path(job.stored_path or "")
    before = {r.row_number: r for r in read_sealed_rows(runtime.vault, stored)}
    assert sorted(before) == [2, 3, 4, 5]  # the row the reader rejected (6) is kept sealed in failed_events
    assert before[3].value["email"] == "bartholomew.quigley@quigleyandsons.net" and before[3].readable
    token = json.loads(rows(runtime, "SELECT traits FROM events WHERE user_id = 'c2'")[0]["traits"])["email"]

    assert runtime.vault.destroy([runtime.vault.key_id("c2")]) == 1
    after = {r.row_number: r for r in read_sealed_rows(runtime.vault, stored)}
    assert not after[3].readable and after[3].value is None
    assert {n: r.value for n, r in after.items() if n != 3} == {n: r.value for n, r in before.items() if n != 3}
    assert runtime.vault.reveal(runtime.engine, [token]) == {}
    assert runtime.vault.reveal(runtime.engine, [tok(runtime, "email", "Wilhelmina.Ashcombe@ashcombe-estates.co.uk")]) == {
        tok(runtime, "email", "Wilhelmina.Ashcombe@ashcombe-estates.co.uk"): "wilhelmina.ashcombe@ashcombe-estates.co.uk"}


def test_suppressed_people_are_not_imported_again(runtime: Runtime, people: Path, tmp_path: Path) -> None:
    run_import(runtime, people, source="crm", mapping=IDENTIFY)
    runtime.writer.call(Refresh.from_settings(runtime.settings))
    receipt = requests.erase(runtime, "email:bartholomew.quigley@quigleyandsons.net", local_principal())["receipt"]
    assert receipt["keys_destroyed"] >= 1 and receipt["suppression_entries"] == 3  # his user id, email and phone
    assert rows(runtime, "SELECT count(*) AS n FROM events WHERE user_id = 'c2'")[0]["n"] == 0

    # The same export again, and a new export where he comes back under another customer id.
    again = tmp_path / "people-2.csv"
    again.write_text(PEOPLE.replace("c1,", "c1b,") + "c9,Bartholomew.Quigley@quigleyandsons.net,,Bart,Q,US,pro,2024-02-01 10:00:00\n",
                     encoding="utf-8")
    job = run_import(runtime, again, source="crm", mapping=IDENTIFY)
    assert (job.rows_read, job.rows_loaded, job.rows_suppressed) == (6, 1, 2), job  # c2 by id and email, c9 by email
    assert get_import(runtime.engine, job.import_id).rows_suppressed == 2
    held = rows(runtime, "SELECT user_id FROM events WHERE source = 'crm' ORDER BY user_id")
    assert [r["user_id"] for r in held] == ["c1", "c1b", "c3"]
    assert rows(runtime, "SELECT count(*) AS n FROM failed_events WHERE row_number = 7")[0]["n"] == 0  # never quarantined
    stored = Path(job.stored_path or "")
    assert sorted(r.row_number for r in read_sealed_rows(runtime.vault, stored)) == [2, 4, 5]  # nothing of theirs sealed


TRACK = {
    "type": "track", "event": "Order Completed", "user_id": "customer_id", "email": "email",
    "properties": {"order_id": "order_id", "amount": {"column": "amount", "type": "double"}}, "row_key": ["order_id"],
}
PLAN = {"type": "object", "properties": {"amount": {"type": "number", "minimum": 0}}}


def _plan(rt: Runtime, schema: dict[str, Any]) -> None:
    rt.settings.plans_dir.mkdir(parents=True, exist_ok=True)
    (rt.settings.plans_dir / "Order Completed.json").write_text(json.dumps(schema))
    rt.plans.reload(force=True)


def _refunds(path: Path) -> Path:
    path.write_text("order_id,customer_id,email,amount\no1,c1,ann.refund@example.com,-5\no2,c2,ben.refund@example.com,-7\n")
    return path


def test_a_sealed_failed_import_row_replays_with_the_collectors_tokens(runtime: Runtime, tmp_path: Path) -> None:
    _plan(runtime, PLAN)
    job = run_import(runtime, _refunds(tmp_path / "r.csv"), source="shop", mapping=TRACK)
    assert job.rows_failed == 2
    assert rows(runtime, "SELECT count(*) AS n FROM failed_events WHERE payload IS NULL AND sealed IS NOT NULL")[0]["n"] == 2
    _plan(runtime, {"type": "object"})
    result = replay(runtime)
    assert (result.loaded, result.erased, result.failed_again) == (2, 0, 0), result
    ev = rows(runtime, "SELECT user_id, traits, properties FROM events ORDER BY user_id")
    assert json.loads(ev[0]["traits"]) == {"email": tok(runtime, "email", "ann.refund@example.com")}
    assert json.loads(ev[0]["properties"])["amount"] == -5
    assert runtime.vault.reveal(runtime.engine, [json.loads(ev[1]["traits"])["email"]]) == {
        tok(runtime, "email", "ben.refund@example.com"): "ben.refund@example.com"}
    runs = [json.loads(line) for line in runtime.settings.lineage_path.read_text().splitlines()]
    mine = [r for r in runs if r["job"]["name"] == "ingest.replay"]
    assert [r["eventType"] for r in mine] == ["START", "COMPLETE"]


def test_replay_after_a_key_is_destroyed_skips_that_row_and_restores_nothing(runtime: Runtime, tmp_path: Path) -> None:
    _plan(runtime, PLAN)
    run_import(runtime, _refunds(tmp_path / "r.csv"), source="shop", mapping=TRACK)
    runtime.vault.destroy([runtime.vault.key_id("c1")])  # c1 was erased (crypto-shredded)
    _plan(runtime, {"type": "object"})
    result = replay(runtime)
    assert (result.considered, result.loaded, result.erased) == (2, 1, 1), result
    assert [r["user_id"] for r in rows(runtime, "SELECT user_id FROM events")] == ["c2"]
    status = {r["message_id"]: r["replay_status"] for r in rows(runtime, "SELECT message_id, replay_status FROM failed_events")}
    assert sorted(status.values()) == ["erased", "loaded"]
    assert replay(runtime).considered == 0  # not pending any more: nothing to retry


def test_a_sealed_collector_failure_replays_and_a_suppressed_one_does_not(runtime: Runtime, app: TestClient) -> None:
    _plan(runtime, {"type": "object", "properties": {"total": {"type": "number"}}})
    for mid, email in (("m-a", "keep.me@example.com"), ("m-b", "erase.me@example.com")):
        body = {"userId": f"u-{mid}", "event": "Order Completed", "messageId": mid, "properties": {"total": "12"},
                "context": {"traits": {"email": email}}}
        assert app.post("/v1/track", json=body, headers=BASIC).json()["reason"] == "plan_violation"
    assert rows(runtime, "SELECT count(*) AS n FROM failed_events WHERE sealed IS NOT NULL AND payload IS NULL")[0]["n"] == 2
    # erase.me is erased meanwhile (by email: the suppression list has her identifiers)
    runtime.vault.suppressed.add(runtime.vault.suppression_hash("email", "erase.me@example.com"))
    _plan(runtime, {"type": "object"})
    result = replay(runtime)
    assert (result.loaded, result.suppressed) == (1, 1), result
    (kept,) = rows(runtime, "SELECT message_id, traits FROM events")
    assert kept["message_id"] == "m-a" and json.loads(kept["traits"]) == {"email": tok(runtime, "email", "keep.me@example.com")}
    gone = rows(runtime, "SELECT replay_status, payload, sealed FROM failed_events WHERE message_id = 'm-b'")
    assert gone == [{"replay_status": "suppressed", "payload": None, "sealed": None}]
