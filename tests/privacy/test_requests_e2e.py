"""Subject requests against a real server: events sent with the official Segment SDK, resolution
through the API, then export and erasure through /api/privacy/requests; the data directory is then
read directly (the server stopped) to prove what is left."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from privacy_helpers import file_hits, request, resolve, sdk, table_hits, wait_for

from support import WRITE_KEY, Server, start_server

JANE = {"user_id": "u-jane-1042", "anonymous_id": "anon-jane-7f3c9d2e-4b1a", "email": "Jane.Quill@Shop.io",
        "phone": "+44 20 7946 0958", "name": "Janelle"}
BOB = {"user_id": "u-bob-2077", "anonymous_id": "anon-bob-1c2d3e4f-9a8b", "email": "bob.marsh@shop.io",
       "phone": "+44 20 7946 0123", "name": "Bartholomew"}


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Server]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    server = start_server(data_dir)
    with server.api() as api:
        assert api.post("/api/sources", json={"name": "web", "write_key": WRITE_KEY}).status_code == 201
    try:
        yield server
    finally:
        server.stop()


def _send_person(client: Any, p: dict[str, str], n: int = 3) -> None:
    client.identify(p["user_id"], {"email": p["email"], "phone": p["phone"], "firstName": p["name"]}, anonymous_id=p["anonymous_id"])
    for i in range(n):
        client.track(p["user_id"], "Order Completed", {"order": i, "total": 10 + i}, anonymous_id=p["anonymous_id"])
    client.page(None, "Docs", "Home", {"path": "/"}, anonymous_id=p["anonymous_id"])


def _populate(srv: Server) -> None:
    client = sdk(srv)
    _send_person(client, JANE)
    _send_person(client, BOB)
    client.flush()
    client.shutdown()
    assert not client.errors
    # An event with no user or anonymous id that mentions Jane (quarantined, sealed under a key of its own),
    # and Bob's event that names Jane as a referrer (Bob's, with Jane's email in it).
    batch = {"batch": [
        {"type": "track", "event": "Newsletter", "properties": {"email": JANE["email"].upper()}, "messageId": "m-noid-1"},
        {"type": "track", "event": "Referred", "userId": BOB["user_id"], "properties": {"email": JANE["email"]}, "messageId": "m-ref-1"},
    ]}
    r = httpx.post(srv.url + "/v1/batch", json=batch, headers=srv.basic, timeout=30)
    assert r.status_code == 200, r.text
    wait_for(srv, "SELECT count(*) FROM events", 11)
    resolve(srv)
    with srv.api() as api:
        r = api.post("/api/consent", json={"identifier": f"user_id:{JANE['user_id']}", "purposes": {"marketing": "granted"}})
        assert r.status_code == 201, r.text


def _needles(p: dict[str, str], tokens: list[str]) -> list[str]:
    return [p["user_id"], p["anonymous_id"], p["email"].lower(), p["phone"], p["phone"].replace(" ", ""), p["name"], *tokens]


def _tokens(document: dict[str, Any]) -> list[str]:
    return sorted({i["stored_as"] for i in document["subject"]["identifiers"] if i["stored_as"].startswith("pii:")}
                  | {v["token"] for v in document["stores"]["vault"]})


def test_export_holds_every_zone_of_the_person_and_nothing_of_another(srv: Server) -> None:
    _populate(srv)
    r = request(srv, "export", f"email:{JANE['email']}")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "completed" and body["kind"] == "export"
    doc = body["document"]
    stores = doc["stores"]
    assert {"events", "raw_events", "failed_events", "identity", "profiles", "consent", "vault", "audit", "segments",
            "features", "activation"} <= set(stores)
    assert len(stores["events"]["events"]) == 5
    assert {e["user_id"] for e in stores["events"]["events"] if e["user_id"]} == {JANE["user_id"]}
    raw = stores["raw_events"]["raw_events"]
    assert len(raw) == 6  # her five, and the quarantined event without an id that names her
    assert all(r["payload_unsealed"] is not None for r in raw)
    assert any(JANE["email"].upper() in json.dumps(r["payload_unsealed"]) for r in raw)
    assert [f["reason"] for f in stores["failed_events"]["failed_events"]] == ["missing_identity"]
    idents = {(i["identifier_type"], i["value"]) for i in stores["identity"]["identities"]}
    assert ("user_id", JANE["user_id"]) in idents and ("anonymous_id", JANE["anonymous_id"]) in idents
    assert len(stores["profiles"]["profiles"]) == 1
    assert [c["purpose"] for c in stores["consent"]["consent_log"]] == ["marketing"]
    clear = {v["kind"]: v["value"] for v in stores["vault"]}
    assert clear["email"] == JANE["email"].lower() and clear["first_name"] == JANE["name"] and clear["phone"] == "+442079460958"
    text = json.dumps(doc)
    for value in (BOB["user_id"], BOB["anonymous_id"], BOB["email"], BOB["name"], "+442079460123"):
        assert value not in text, value
    # Kept, sealed, and readable again with pii:read; the request row names her by no value.
    with srv.api() as api:
        again = api.get(f"/api/privacy/requests/{body['request_id']}").json()
        assert again["document"]["stores"]["vault"] == stores["vault"]
        listed = api.get("/api/privacy/requests").json()["requests"]
        assert [x["request_id"] for x in listed] == [body["request_id"]]
        audit_rows = api.get("/api/audit", params={"action": "privacy"}).json()
        assert JANE["email"].lower() not in json.dumps(audit_rows).lower()


def test_erasure_removes_the_person_everywhere_and_keeps_everyone_else(srv: Server) -> None:
    _populate(srv)
    bob_before = request(srv, "export", f"user_id:{BOB['user_id']}").json()["document"]
    jane = request(srv, "export", f"user_id:{JANE['user_id']}").json()["document"]
    tokens = _tokens(jane)
    r = request(srv, "erase", f"email:{JANE['email']}")
    assert r.status_code == 201, r.text
    receipt = r.json()["receipt"]
    assert r.json()["status"] == "completed"
    assert receipt["stores"]["events"] >= 5 and receipt["stores"]["raw_events"] >= 6 and receipt["stores"]["vault"] >= 3
    assert receipt["keys_destroyed"] >= 2 and receipt["suppression_entries_added"] >= 4 and receipt["destinations_asked"] == []
    assert JANE["email"].lower() not in json.dumps(r.json()).lower()
    again = request(srv, "export", f"user_id:{JANE['user_id']}")
    assert again.status_code == 404 and again.json()["error"] == "subject_not_found"
    # Bob is intact (his referral event keeps its row, Jane's email in it replaced).
    bob_after = request(srv, "export", f"user_id:{BOB['user_id']}").json()["document"]
    assert len(bob_after["stores"]["events"]["events"]) == len(bob_before["stores"]["events"]["events"]) == 6
    # His vault values, but for Jane's email from his referral event (sealed under his key: gone with her).
    assert bob_after["stores"]["vault"] == [v for v in bob_before["stores"]["vault"] if v["token"] not in tokens]
    assert {v["value"] for v in bob_after["stores"]["vault"]} >= {BOB["email"], BOB["name"], "+442079460123"}
    assert bob_after["stores"]["profiles"]["profiles"][0]["traits"] == bob_before["stores"]["profiles"]["profiles"][0]["traits"]
    srv.stop()
    data = srv.data_dir
    assert table_hits(data / "refinery.duckdb", _needles(JANE, tokens)) == {}
    assert table_hits(data / "refinery.duckdb", [BOB["user_id"], BOB["anonymous_id"]]).keys() == {BOB["user_id"], BOB["anonymous_id"]}
    files = file_hits(data, [JANE["email"].lower(), JANE["phone"], "+442079460958", JANE["name"]])
    assert files == {}, files


def test_an_unknown_identifier_is_a_clear_404_and_a_rejected_request(srv: Server) -> None:
    r = request(srv, "erase", "email:nobody.here@shop.io")
    assert r.status_code == 404, r.text
    body = r.json()
    assert body["error"] == "subject_not_found" and "email identifier" in body["message"] and body["fix"]
    assert "nobody.here" not in r.text
    with srv.api() as api:
        [row] = api.get("/api/privacy/requests").json()["requests"]
    assert row["status"] == "rejected" and row["identifier_type"] == "email" and "nobody" not in json.dumps(row)
    bad = request(srv, "delete", "email:x@shop.io")
    assert bad.status_code == 422


def test_an_erasure_racing_with_new_events_leaves_nothing_and_later_events_are_dropped(srv: Server) -> None:
    _populate(srv)
    tokens = _tokens(request(srv, "export", f"user_id:{JANE['user_id']}").json()["document"])
    stop = threading.Event()
    sent = [0]

    def keep_sending() -> None:
        client = sdk(srv)
        while not stop.is_set():
            client.track(JANE["user_id"], "Viewed", {"i": sent[0]}, anonymous_id=JANE["anonymous_id"])
            client.identify(JANE["user_id"], {"email": JANE["email"], "phone": JANE["phone"], "firstName": JANE["name"]})
            sent[0] += 2
            time.sleep(0.005)
        client.flush()
        client.shutdown()

    sender = threading.Thread(target=keep_sending)
    sender.start()
    time.sleep(0.5)
    r = request(srv, "erase", f"user_id:{JANE['user_id']}")
    assert r.status_code == 201, r.text
    time.sleep(0.5)
    stop.set()
    sender.join(30)
    assert sent[0] > 20
    # After the erasure: events naming her by any identifier are dropped.
    client = sdk(srv)
    client.track(None, "Came back", {}, anonymous_id=JANE["anonymous_id"])
    client.identify("someone-new", {"email": JANE["email"]})
    client.flush()
    client.shutdown()
    time.sleep(0.3)
    srv.stop()
    assert table_hits(srv.data_dir / "refinery.duckdb", _needles(JANE, tokens)) == {}


def test_a_replay_and_a_re_import_after_an_erasure_do_not_bring_the_person_back(srv: Server, tmp_path: Path) -> None:
    _populate(srv)
    # A quarantined event of hers that a replay would load (a plan violation fixed later): sent before the erasure.
    bad = {"batch": [{"type": "track", "event": "Bad", "userId": JANE["user_id"], "timestamp": "not-a-time", "messageId": "m-bad-1",
                      "properties": {"email": JANE["email"]}}]}
    assert httpx.post(srv.url + "/v1/batch", json=bad, headers=srv.basic, timeout=30).status_code == 200
    tokens = _tokens(request(srv, "export", f"user_id:{JANE['user_id']}").json()["document"])
    assert request(srv, "erase", f"user_id:{JANE['user_id']}").status_code == 201
    csv = tmp_path / "crm.csv"
    csv.write_text(f"customer_id,email,phone,first_name\n{JANE['user_id']},{JANE['email']},{JANE['phone']},{JANE['name']}\n"
                   f"c-new-1,someone.else@shop.io,,Zed\n", "utf-8")
    mapping = {"type": "identify", "user_id": "customer_id", "email": "email", "phone": "phone",
               "traits": {"firstName": "first_name"}, "row_key": ["customer_id"]}
    with srv.api() as api:
        replayed = api.post("/api/events/replay", json={})
        assert replayed.status_code == 200, replayed.text
        job = api.post("/api/imports", json={"path": str(csv), "source": "crm", "mapping": mapping}).json()
        while job["status"] in ("new", "started"):
            time.sleep(0.1)
            job = api.get(f"/api/imports/{job['import_id']}").json()
        assert job["status"] == "completed", job
    wait_for(srv, "SELECT count(*) FROM events WHERE source = 'crm'", 1)
    resolve(srv)
    srv.stop()
    assert table_hits(srv.data_dir / "refinery.duckdb", _needles(JANE, tokens)) == {}
