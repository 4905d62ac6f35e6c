"""The LLM context of a profile through a real `refinery serve`: segments, non-personal traits and
recent behaviour, citing only the person's own message ids; nothing personal in the answer (scanned
for the clear values the test itself sent); nothing for a person who denied personalisation; the
token budget kept by dropping the least important lines and saying so; a merged id answered by
its survivor; an erased profile 404. Plus the pure core on its own, and `refinery context`."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from refinery.profiles.context import EventFact, Facts, build, estimate_tokens
from support import Server, fresh_runtime, write_events

NOW = datetime.now(UTC)


def _call(type_: str, minutes_ago: int, **fields: Any) -> dict[str, Any]:
    return {"type": type_, "messageId": uuid.uuid4().hex, "timestamp": (NOW - timedelta(minutes=minutes_ago)).isoformat(), **fields}


def _consent(granted: bool) -> dict[str, Any]:
    return {"consent": {"categoryPreferences": {"personalisation": granted}}}


def _token(api: httpx.Client, name: str, role: str) -> dict[str, str]:
    r = api.post("/api/tokens", json={"name": name, "role": role, "expires": "1d"})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


ANN = {"email": "Ann.Larsen@example.org", "phone": "+44 7700 900123", "name": "Ann Larsen", "firstName": "Ann"}
BOB = {"email": "bob.okafor@example.net", "phone": "+1 415 555 0199", "name": "Bob Okafor"}


def _clear_values(person: dict[str, str]) -> list[str]:
    """Every form a person's clear values could take in an answer."""
    out = set()
    for v in person.values():
        out |= {v, v.lower(), v.replace(" ", ""), v.replace(" ", "").lstrip("+")}
    return sorted(out)


def test_context_over_the_api(server: Server) -> None:
    ann_events = [
        _call("identify", 600, userId="ann", anonymousId="ann-phone",
              traits={**ANN, "plan": "pro", "lifetime_value": 1200, "bio": "call me on +44 7700 900123"}, context=_consent(True)),
        *[_call("track", 300 - i, userId="ann", event="Order Completed", properties={"total": 400, "email": ANN["email"]}) for i in range(3)],
        _call("page", 100, userId="ann", name="Pricing", properties={"url": "https://shop.example/?email=ann.larsen@example.org"}),
        _call("track", 50, userId="ann", event="Product Viewed", properties={"sku": "A-1"}),
    ]
    bob_events = [
        _call("identify", 500, userId="bob", traits={**BOB, "plan": "pro"}, context=_consent(False)),
        *[_call("track", 200 - i, userId="bob", event="Order Completed", properties={"total": 900}) for i in range(3)],
    ]
    anon_events = [_call("track", 40, anonymousId="ann-laptop", event="Cart Viewed")]
    r = httpx.post(server.url + "/v1/batch", json={"batch": ann_events + bob_events + anon_events}, headers=server.basic)
    assert r.status_code == 200, r.text
    with server.api() as api:
        assert api.post("/api/identity/resolve", timeout=120).status_code == 200
        assert api.post("/api/consent/sync", timeout=120).status_code == 200
        ann = api.get("/api/profiles", params={"identifier": "user_id:ann"}).json()["profile_id"]
        bob = api.get("/api/profiles", params={"identifier": "user_id:bob"}).json()["profile_id"]
        laptop = api.get("/api/profiles", params={"identifier": "anonymous_id:ann-laptop"}).json()["profile_id"]
        seg = api.post("/api/segments", json={"name": "high_value_customer", "rule": "sum(total) of 'Order Completed' > 500", "run": True},
                       timeout=120)
        assert seg.status_code == 201, seg.text
        marketer, privacy = _token(api, "mark", "marketer"), _token(api, "pat", "privacy_officer")
        assistant = _token(api, "bot", "assistant")
        assert api.get(f"/api/profiles/{ann}", headers=assistant).status_code == 403  # the assistant sees the context only
        assert api.get(f"/api/profiles/{ann}/context", headers=assistant).status_code == 200

        assert api.get(f"/api/profiles/{ann}/context", headers=privacy).status_code == 403  # no context:read
        got = api.get(f"/api/profiles/{ann}/context", headers=marketer)
        assert got.status_code == 200, got.text
        body = got.json()
        text = body["context"]
        assert body["consent"] == {"purpose": "personalisation", "state": "granted"}
        assert "[user_segment: high_value_customer]" in text
        assert "[trait: plan = pro]" in text and "[trait: lifetime_value = 1200]" in text
        assert "[recent: Order Completed x3," in text and "[recent: Pricing," in text and "[recent: Product Viewed," in text
        # no PII: no clear value (in any form), no token, no identifier
        answer = json.dumps(body)
        for value in _clear_values(ANN):
            assert value not in answer, value
        assert "pii:" not in answer and "ann-phone" not in answer and '"ann"' not in answer
        withheld = {(w["key"], w["reason"]) for w in body["withheld"]}
        assert {("email", "personal_kind"), ("phone", "personal_kind"), ("name", "personal_kind"),
                ("firstName", "personal_kind"), ("bio", "looks_personal")} <= withheld
        # citations: real message ids of ann's own events, and every line's cites among them
        ann_ids = {e["messageId"] for e in ann_events}
        cited = {c["message_id"] for c in body["citations"]}
        assert cited and cited <= ann_ids
        assert all(set(line["cites"]) <= cited for line in body["lines"])
        assert ann_events[0]["messageId"] in cited  # the identify call behind the traits
        assert body["tokens"]["estimate"] == estimate_tokens(text) <= body["tokens"]["max"] == 256 and body["dropped"] == []

        # the budget: the least important lines go first (recent behaviour before traits before segments), and are listed
        small = api.get(f"/api/profiles/{ann}/context", params={"max_tokens": 24}, headers=marketer).json()
        assert 0 < small["tokens"]["estimate"] <= 24
        assert small["context"].startswith("[user_segment: high_value_customer]")
        dropped = [d["section"] for d in small["dropped"]]
        assert dropped and dropped[: dropped.count("recent")] == ["recent"] * dropped.count("recent") and "segment" not in dropped
        assert len(small["lines"]) + len(small["dropped"]) == len(body["lines"])
        assert api.get(f"/api/profiles/{ann}/context", params={"max_tokens": 5}, headers=marketer).status_code == 422

        # consent denied: nothing at all
        denied = api.get(f"/api/profiles/{bob}/context", headers=marketer).json()
        assert denied["consent"]["state"] == "denied" and denied["context"] == "" and denied["lines"] == []
        assert denied["citations"] == [] and "reason" in denied
        for value in [*_clear_values(BOB), "plan", "Order Completed", "high_value_customer"]:
            assert value not in json.dumps(denied), value
        # unknown consent (the laptop's profile never chose): nothing either, under the default opt-in policy
        assert api.get(f"/api/profiles/{laptop}/context", headers=marketer).json()["lines"] == []

        reads = [e for e in api.get("/api/audit", params={"action": "profiles.context"}).json()["entries"] if e["action"] == "profiles.context"]
        assert {e["object"] for e in reads} >= {f"profile:{ann}", f"profile:{bob}"}
        assert all(e["details"]["pii"] is False for e in reads)

        # a merge: the laptop turns out to be ann's; its old id answers with ann's context
        link = _call("identify", 30, userId="ann", anonymousId="ann-laptop", context=_consent(True))
        assert httpx.post(server.url + "/v1/batch", json={"batch": [link]}, headers=server.basic).status_code == 200
        assert api.post("/api/identity/resolve", timeout=120).status_code == 200
        now_ann = api.get("/api/profiles", params={"identifier": "user_id:ann"}).json()["profile_id"]
        old = laptop if now_ann != laptop else ann
        merged = api.get(f"/api/profiles/{old}/context", headers=marketer)
        assert merged.status_code == 200, merged.text
        assert merged.json()["profile_id"] == now_ann and merged.json()["merged_into"] == now_ann
        assert "[recent: Cart Viewed, last" in merged.json()["context"]

        # unknown and erased profiles: 404
        assert api.get("/api/profiles/p_nobody/context", headers=marketer).status_code == 404
        erased = api.post("/api/privacy/requests", json={"kind": "erase", "identifier": "user_id:ann"}, timeout=120)
        assert erased.status_code == 201, erased.text
        for pid in {ann, now_ann, old}:
            gone = api.get(f"/api/profiles/{pid}/context", headers=marketer)
            assert gone.status_code == 404 and "erased" in gone.json()["message"], gone.text


def test_build_is_pure_and_keeps_the_budget() -> None:
    at = datetime(2026, 11, 1, tzinfo=UTC)
    facts = Facts(
        "p_1", "p_1", "granted", True,
        traits={"plan": "pro", "email": "pii:email:" + "0" * 32, "note": "pii:name:" + "1" * 32, "vip": True,
                "prefs": {"colour": "blue"}, "mobile_number": 447700900123, "jane@example.com": 1},
        trait_sources={"plan": {"source": "web", "message_id": "m-plan", "at": at.isoformat()}},
        segments=[("churn_risk", at), ("high_value_customer", at + timedelta(days=1))],
        computed=[("orders_90d", 4)],
        first_seen=at - timedelta(days=100), last_seen=at, event_count=12,
        events=[EventFact("web", f"m{i}", "track", "Order Completed" if i % 2 else "Page Viewed", at - timedelta(hours=i)) for i in range(6)],
    )
    full = build(facts, 4096)
    assert "pii:" not in full.text and "jane@example.com" not in full.text and "447700900123" not in full.text
    assert {w["reason"] for w in full.withheld} == {"personal_kind", "token", "structured", "looks_personal", "name_unsafe"}
    assert [x.section for x in full.lines] == ["segment", "segment", "trait", "trait", "computed", "activity", "recent", "recent"]
    for budget in range(16, estimate_tokens(full.text) + 1):
        ctx = build(facts, budget)
        assert estimate_tokens(ctx.text) <= budget
        assert len(ctx.lines) + len(ctx.dropped) == len(full.lines)
        kept = {(x.section, x.key) for x in ctx.lines}
        # what stays is always the most important: a dropped line never outranks a kept one
        assert all(d.rank < min((x.rank for x in ctx.lines), default=10**9) for d in ctx.dropped), kept
    assert build(facts, 16).lines[0].key == "high_value_customer"  # the newest segment is the last to go
    assert build(Facts("p_1", "p_1", "denied", False), 4096).to_dict()["context"] == ""


@pytest.mark.parametrize("text,expected", [("", 0), ("[user_segment: vip]", 7), ("Order Completed x3", 6), ("abcdefghi", 3)])
def test_estimator(text: str, expected: int) -> None:
    assert estimate_tokens(text) == expected
    assert estimate_tokens(text + "\n" + text) == 2 * expected  # additive over lines


def test_context_from_the_cli(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from refinery.identity import IdentityRules
    from refinery.profiles.build import resolve_and_build
    from refinery.profiles.policy import TraitPolicy

    with fresh_runtime(tmp_path) as rt:
        calls = [_call("identify", 10, userId="cli", traits={"plan": "basic", "email": "cli.user@example.com"}),
                 _call("track", 5, userId="cli", event="Signed Up")]
        write_events(rt, *calls)
        rt.writer.call(lambda e: resolve_and_build(e, IdentityRules(), TraitPolicy()))
        pid = str(rt.engine.fetch_all("SELECT profile_id FROM identities WHERE value = 'cli'", cursor=rt.engine.fresh_reader())[0][0])
    env = {**os.environ, "REFINERY_DATA_DIR": str(tmp_path / "data"), "REFINERY_ADMIN_TOKEN": "t",
           "REFINERY_CONSENT_UNKNOWN_ALLOWED": '["personalisation"]'}
    out = subprocess.run([sys.executable, "-m", "refinery", "context", pid, "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert "[trait: plan = basic]" in got["context"] and "cli.user@example.com" not in out.stdout
    assert {c["message_id"] for c in got["citations"]} == {c["messageId"] for c in calls}
    missing = subprocess.run([sys.executable, "-m", "refinery", "context", "p_nobody"], env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "No profile" in missing.stdout + missing.stderr
