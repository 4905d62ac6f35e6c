"""Every bad input of issue 3: none may collapse profiles, and each refusal is on the record."""

from __future__ import annotations

import csv
from pathlib import Path

from identity_helpers import Identity, event

from refinery.identity import parse_rules
from refinery.ingest.importer import run_import
from refinery.ingest.mapping import validate_mapping


def test_junk_identifiers_are_blocked_and_link_nobody(ident: Identity) -> None:
    junk = ["undefined", "0", "null", "-1", "anonymous", "00000000-0000-0000-0000-000000000000", "N/A"]
    for i, value in enumerate(junk):
        ident.send(event(anonymousId=f"anon-{i}", userId=value, traits={"email": f"person{i}@shop.io"}))
    ident.resolve()
    profiles = {ident.profile("email", f"person{i}@shop.io") for i in range(len(junk))}
    assert len(profiles) == len(junk), "junk user ids merged different people"
    blocked = {(r["identifier_type"], r["value"]): r["reason"] for r in ident.blocked() if r["kind"] == "identifier"}
    for value in junk:
        shown = value.strip()
        assert ("user_id", shown) in blocked, (value, blocked)
        assert ident.identity("user_id", shown)["status"] == "blocked"
    # Whitespace ids never reach the clean zone; a value that is nothing but invisible characters is empty.
    ident.send(event(anonymousId="blank-1", userId="   ", traits={"email": "\u200b \u200d"}),
               event(anonymousId="blank-2", userId="   ", traits={"email": "\ufeff"}))
    ident.resolve()
    assert ident.profile("anonymous_id", "blank-1") != ident.profile("anonymous_id", "blank-2")
    assert ident.identity("email", "")["reason"] == "empty"
    assert blocked[("user_id", "undefined")] == "blocked_value"
    assert blocked[("user_id", "00000000-0000-0000-0000-000000000000")] == "blocked_pattern:all_zero"


def test_test_emails_are_blocked(ident: Identity) -> None:
    ident.send(event(userId="u1", traits={"email": "test@test.com"}), event(userId="u2", traits={"email": "TEST@test.com "}),
               event(userId="u3", traits={"email": "someone@example.com"}), event(userId="u4", traits={"email": "someone@example.com"}))
    ident.resolve()
    assert len({ident.profile("user_id", u) for u in ("u1", "u2", "u3", "u4")}) == 4
    reasons = {r["value"]: r["reason"] for r in ident.blocked() if r["identifier_type"] == "email"}
    assert reasons == {"test@test.com": "blocked_pattern:test_email_local", "someone@example.com": "blocked_pattern:test_email_domain"}


def test_a_kiosk_anonymous_id_with_thousands_of_user_ids_links_nobody(ident: Identity) -> None:
    users = [f"shopper-{i}" for i in range(2000)]
    batch = [event(anonymousId="kiosk-1", userId=u, minutes=i, context={"device": {"id": "kiosk-device"}}) for i, u in enumerate(users)]
    for i in range(0, len(batch), 500):
        ident.send(*batch[i:i + 500])
    # One shopper also has their own phone, with the kiosk's cookie nowhere near it.
    ident.send(event(anonymousId="phone-of-0", userId="shopper-0", minutes=5000))
    report = ident.resolve()
    assert report.graph["hubs"] == 2  # the cookie and the device id
    profiles = {ident.profile("user_id", u) for u in users}
    assert len(profiles) == len(users)
    kiosk = ident.identity("anonymous_id", "kiosk-1")
    assert (kiosk["status"], kiosk["reason"]) == ("shared", "shared_identifier")
    assert kiosk["profile_id"] not in profiles
    assert ident.profile("anonymous_id", "phone-of-0") == ident.profile("user_id", "shopper-0")
    hubs = {r["value"]: r for r in ident.blocked("shared_identifier")}
    assert set(hubs) == {"kiosk-1", "kiosk-device"}
    assert '"linked_values":2000' in hubs["kiosk-1"]["evidence"].replace(" ", "")


def test_a_shared_family_laptop_does_not_fuse_the_family(ident: Identity) -> None:
    ident.send(
        event("page", anonymousId="family-laptop"),  # before anyone logs in
        event(anonymousId="family-laptop", userId="mum", traits={"email": "mum@home.io"}),
        event(anonymousId="family-laptop", userId="dad", traits={"email": "dad@home.io"}),
        event(anonymousId="mums-phone", userId="mum"),
        event(anonymousId="dads-phone", userId="dad"),
    )
    ident.resolve()
    mum, dad = ident.profile("user_id", "mum"), ident.profile("user_id", "dad")
    assert mum != dad
    assert ident.profile("email", "mum@home.io") == ident.profile("anonymous_id", "mums-phone") == mum
    assert ident.profile("email", "dad@home.io") == ident.profile("anonymous_id", "dads-phone") == dad
    laptop = ident.identity("anonymous_id", "family-laptop")
    assert (laptop["status"], laptop["reason"]) == ("ambiguous", "conflicting_user_id")
    assert laptop["profile_id"] not in (mum, dad)
    [refusal] = ident.blocked("conflicting_user_id")
    assert refusal["kind"] == "merge" and refusal["value"] == "family-laptop"
    assert {refusal["profile_a"], refusal["profile_b"]} == {mum, dad}
    assert '"value":"mum"' in refusal["evidence"] and '"value":"dad"' in refusal["evidence"]


def test_identify_with_a_null_user_id(ident: Identity) -> None:
    ident.send(
        event(anonymousId="a1", userId=None, traits={"email": "one@shop.io"}),
        event(anonymousId="a2", userId=None, traits={"email": "two@shop.io"}),
        event(anonymousId="a3", userId="null", traits={"email": "three@shop.io"}),
        event(anonymousId="a4", userId="null", traits={"email": "four@shop.io"}),
    )
    ident.resolve()
    assert ident.profile("anonymous_id", "a1") == ident.profile("email", "one@shop.io")
    assert len({ident.profile("anonymous_id", f"a{i}") for i in range(1, 5)}) == 4
    assert ident.identity("user_id", "null")["status"] == "blocked"


def test_an_alias_joining_two_known_users_is_refused(ident: Identity) -> None:
    ident.send(
        event(userId="alice", traits={"email": "alice@shop.io"}),
        event(userId="bob", traits={"email": "bob@shop.io"}),
        event("alias", previousId="alice", userId="bob"),
        event("alias", previousId="guest-cookie", userId="bob"),  # an anonymous id: a normal alias
    )
    ident.resolve()
    alice, bob = ident.profile("user_id", "alice"), ident.profile("user_id", "bob")
    assert alice != bob
    assert ident.profile("anonymous_id", "guest-cookie") == bob
    [refusal] = ident.blocked("conflicting_user_id")
    assert (refusal["kind"], refusal["other_type"]) == ("merge", "user_id")
    assert {refusal["value"], refusal["other_value"]} == {"alice", "bob"}
    assert {refusal["profile_a"], refusal["profile_b"]} == {alice, bob}
    assert '"rule":"alias"' in refusal["evidence"]
    [edge] = ident.rows("SELECT * FROM identity_edges WHERE a_type = 'user_id' AND b_type = 'user_id'")
    assert (edge["status"], edge["reason"], edge["rule"]) == ("blocked", "conflicting_user_id", "alias")


def test_odd_unicode_is_normalised_and_huge_values_are_blocked(ident: Identity) -> None:
    huge = "x" + "9" * 10_000
    ident.send(
        event(userId="u1", traits={"email": "ann@shop.io"}),
        # Full-width letters, a zero-width space and a BOM: the same address once normalised.
        event(anonymousId="a-ann", traits={"email": "\uff21\uff2e\uff2e@shop.io\u200b\ufeff"}),
        event(anonymousId="a-b", userId="u2", context={"device": {"id": huge}}),
        event(anonymousId="a-c", userId="u3", context={"device": {"id": huge}}),
        event(anonymousId="a-d", userId="u4\u0000\u200d"),
    )
    ident.resolve()
    assert ident.profile("anonymous_id", "a-ann") == ident.profile("user_id", "u1")
    assert ident.profile("user_id", "u2") != ident.profile("user_id", "u3")
    [too_long] = ident.blocked("too_long")
    assert too_long["identifier_type"] == "device_id" and len(too_long["value"]) < 120
    assert ident.profile("anonymous_id", "a-d") == ident.profile("user_id", "u4")


def test_contradictory_crm_rows_do_not_merge_two_web_users(ident: Identity, tmp_path: Path) -> None:
    ident.send(event(anonymousId="w1", userId="web-1", traits={"email": "pat@shop.io"}),
               event(anonymousId="w2", userId="web-2", traits={"email": "sam@shop.io"}))
    rows = [
        {"customer_id": "C1", "email": "shared@shop.io", "phone": "+44 20 7946 0001", "web_user_id": "web-1", "country": "GB"},
        {"customer_id": "C2", "email": "shared@shop.io", "phone": "020 7946 0002", "web_user_id": "web-2", "country": "GB"},
        # The same phone typed two ways: one number once normalised.
        {"customer_id": "C3", "email": "", "phone": "020 7946 0001", "web_user_id": "", "country": "GB"},
    ]
    path = tmp_path / "crm.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    mapping = validate_mapping({
        "type": "identify", "user_id": "customer_id", "crm_id": {"column": "customer_id", "name": "crm_id"},
        "email": "email", "phone": "phone", "traits": {"webUserId": "web_user_id", "country": "country"},
    })
    assert run_import(ident.rt, path, source="crm", mapping=mapping).status == "completed"
    rules = parse_rules({"identifiers": [{"type": "user_id", "path": "traits.webUserId", "sources": ["crm"]}]})
    ident.resolve(rules)
    web1, web2 = ident.profile("user_id", "web-1"), ident.profile("user_id", "web-2")
    assert web1 != web2
    # The customer id arrives as the import's userId *and* its external id: it is a CRM id, not a user id.
    assert ident.profile("crm_id", "C1") == ident.profile("crm_id", "C3") == web1
    assert ident.profile("crm_id", "C2") == web2
    assert ident.rows("SELECT * FROM identities WHERE identifier_type = 'user_id' AND value LIKE 'C%'") == []
    assert ident.identity("email", "shared@shop.io")["status"] == "ambiguous"
    assert ident.profile("phone", "+442079460001") == web1
    assert [r["value"] for r in ident.blocked("conflicting_user_id")] == ["shared@shop.io"]
