"""The SQL full resolution (`identity.resolve` in the writer, on a real DuckDB) and the plain-Python
reference (`identity/reference.py`) give the same profiles, statuses, reasons, edge statuses and
refusals on random small event sets: shared devices, kiosks, aliases between users, junk values,
several user ids, CRM ids, emails and phones, ties in time."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlglot import exp

from refinery.identity import IdentityRules, resolve
from refinery.identity import reference as ref
from refinery.ingest.protocol import Limits, stage
from refinery.ingest.store import IngestItem
from refinery.privacy.pii import protect_identifier
from refinery.runtime import Runtime
from refinery.settings import Settings

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
ANON = ["a0", "a1", "a2", "a3", "kiosk", "undefined", " "]
USERS = ["u0", "u1", "u2", "u3", "u4", "0"]
EMAILS = ["p0@shop.io", "p1@shop.io", " P1@Shop.IO ", "p2@shop.io", "test@shop.io"]
PHONES = ["+1 415 555 0100", "(415) 555-0101", "+44 20 7946 0000", "12"]
DEVICES = ["d0", "d1", "00000000-0000-0000-0000-000000000000"]
CRMS = ["c0", "c1", "c2"]
RESET = ("events", "raw_events", "message_ids", "failed_events", "identities", "identity_edges", "identity_blocked",
         "profile_merges", "identity_resolutions", "event_profiles", "profiles")


@st.composite
def segment_event(draw: st.DrawFn) -> dict[str, Any]:
    """One Segment call drawn from a small vocabulary, so that identifiers collide often."""
    kind = draw(st.sampled_from(["identify", "track", "page", "alias", "kiosk"]))
    at = T0 + timedelta(minutes=draw(st.integers(0, 6)))
    ev: dict[str, Any] = {"messageId": uuid.uuid4().hex, "timestamp": at.isoformat()}
    if kind == "alias":
        ev.update(type="alias", previousId=draw(st.sampled_from(USERS[:4] + ANON[:3])), userId=draw(st.sampled_from(USERS[:4])))
        return ev
    if kind == "kiosk":  # the shared kiosk: one cookie, many users
        ev.update(type="track", event="Checked In", anonymousId="kiosk", userId=draw(st.sampled_from(USERS)))
        return ev
    ev["type"] = kind
    if kind == "track":
        ev["event"] = "Viewed"
    user = draw(st.none() | st.sampled_from(USERS))
    anon = draw(st.none() | st.sampled_from(ANON))
    if user is None and anon is None:
        anon = "a0"
    if user is not None:
        ev["userId"] = user
    if anon is not None:
        ev["anonymousId"] = anon
    traits: dict[str, Any] = {}
    if draw(st.booleans()):
        traits["email"] = draw(st.sampled_from(EMAILS))
    if draw(st.integers(0, 3)) == 0:
        traits["phone"] = draw(st.sampled_from(PHONES))
    if draw(st.integers(0, 2)) == 0:
        traits["plan"] = draw(st.sampled_from(["free", "pro", None]))
    context: dict[str, Any] = {}
    if draw(st.integers(0, 3)) == 0:
        context["device"] = {"id": draw(st.sampled_from(DEVICES))}
    if draw(st.integers(0, 4)) == 0:
        context["externalIds"] = [{"id": draw(st.sampled_from(CRMS)), "type": "crm_id", "collection": "users", "encoding": "none"}]
    if kind == "identify":
        if traits:
            ev["traits"] = traits
    elif traits:
        context["traits"] = traits
    if context:
        ev["context"] = context
    return ev


def identity_rules(draw_hub: int, cap: int, crm_exclusive: bool, email_limit: int | None) -> IdentityRules:
    limits = {"user_id": 1}
    if crm_exclusive:
        limits["crm_id"] = 1
    if email_limit:
        limits["email"] = email_limit
    return IdentityRules(hub_max_user_ids=draw_hub, max_merges_per_profile=cap, limits=limits)


rules_strategy = st.builds(identity_rules, st.integers(1, 3), st.integers(2, 12), st.booleans(), st.sampled_from([None, 1, 2]))
events_strategy = st.lists(segment_event(), min_size=1, max_size=30)


def send(rt: Runtime, events: list[dict[str, Any]], source: str = "web") -> None:
    items = []
    for ev in events:
        items.extend(IngestItem(source, "req", datetime.now(UTC), s) for s in stage("batch", {"batch": [ev]}, Limits()))
    rt.writer.call(lambda e: rt.events.write(e, items))


def reset(rt: Runtime) -> None:
    def clear(engine: Any) -> None:
        for t in RESET:
            engine.execute(f"DELETE FROM {t}")  # noqa: S608 - constant names
    rt.writer.call(clear)


def rows_of(rt: Runtime, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    return rt.engine.fetch_dicts(sql, params, cursor=rt.engine.reader())


def stored_email(rt: Runtime, value: str) -> str:
    """An email as the identity tables hold it (its token, when pseudonymising)."""
    return str(protect_identifier(rt.engine, "email", exp.Literal.string(value)).this)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    path: Path = tmp_path_factory.mktemp("reference") / "data"
    rt = Runtime.open(Settings(data_dir=path, admin_token="t"))
    try:
        yield rt
    finally:
        rt.close()


def reference_of_tables(rt: Runtime, rules: IdentityRules) -> ref.Resolution:
    """The reference run on the identifiers and edges that the SQL extraction stored."""
    ids = {(r["identifier_type"], r["value"]): r["first_seen"] for r in rows_of(rt, "SELECT * FROM identities WHERE status <> 'blocked'")}
    edges = [((r["a_type"], r["a_value"]), (r["b_type"], r["b_value"])) for r in rows_of(rt, "SELECT * FROM identity_edges")]
    return ref.resolve(ids, edges, rules)


def refusals(res: ref.Resolution) -> list[tuple[Any, ...]]:
    """The graph's refusals as resolve.py records them in identity_blocked (without the evidence)."""
    out: list[tuple[Any, ...]] = []
    for h in res.hubs:
        out.append(("identifier", "shared_identifier", *h, None, None, res.profile_id(h), None))
    for a, b, reason in res.conflicts:
        out.append(("merge", reason, *a, *b, res.profile_id(a), res.profile_id(b)))
    for n, reason, cands in res.ambiguous:
        out.append(("merge", reason, *n, None, None, res.profile_id(cands[0]) if cands else None,
                    res.profile_id(cands[1]) if len(cands) > 1 else None))
    for n, reason, _ in res.detached:
        out.append(("identifier", reason, *n, None, None, res.profile_id(n), None))
    return sorted(out, key=repr)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(events=events_strategy, rules=rules_strategy)
def test_sql_resolution_equals_reference(runtime: Runtime, events: list[dict[str, Any]], rules: IdentityRules) -> None:
    reset(runtime)
    send(runtime, events)
    runtime.writer.call(lambda e: resolve(e, rules))
    res = reference_of_tables(runtime, rules)

    sql_ids = {(r["identifier_type"], r["value"]): (r["profile_id"], r["status"], r["reason"])
               for r in rows_of(runtime, "SELECT * FROM identities WHERE status <> 'blocked'")}
    ref_ids = {i: (res.profile_id(i), res.status[i], res.reason[i]) for i in res.key}
    assert sql_ids == ref_ids

    expected_edges = {}
    for r in rows_of(runtime, "SELECT * FROM identity_edges"):
        a, b = (r["a_type"], r["a_value"]), (r["b_type"], r["b_value"])
        expected_edges[(a, b)] = ref.edge_status(a, b, res.profile_id(a), res.profile_id(b), res.reason[a], res.reason[b])
        assert (r["status"], r["reason"]) == expected_edges[(a, b)], (a, b)

    sql_refusals = sorted(
        (tuple(r.values()) for r in rows_of(runtime, """
            SELECT kind, reason, identifier_type, value, other_type, other_value, profile_a, profile_b
            FROM identity_blocked WHERE NOT (kind = 'identifier' AND reason NOT IN ('shared_identifier', 'limit_exceeded', 'profile_too_large'))
        """)), key=repr)
    assert sql_refusals == refusals(res)


def test_reference_on_a_hand_made_family_laptop() -> None:
    """A family laptop's cookie, equally near two user ids, joins neither; the kiosk links nobody."""
    t = datetime(2026, 1, 1, tzinfo=UTC)
    ids = {("user_id", "mum"): t, ("user_id", "son"): t + timedelta(1), ("anonymous_id", "laptop"): t,
           ("anonymous_id", "kiosk"): t, ("user_id", "x"): t, ("user_id", "y"): t, ("email", "m@a.io"): t}
    edges = [(("user_id", "mum"), ("anonymous_id", "laptop")), (("user_id", "son"), ("anonymous_id", "laptop")),
             (("user_id", "mum"), ("email", "m@a.io")), (("user_id", "x"), ("anonymous_id", "kiosk")),
             (("user_id", "y"), ("anonymous_id", "kiosk")), (("user_id", "mum"), ("anonymous_id", "kiosk"))]
    res = ref.resolve(ids, edges, IdentityRules(hub_max_user_ids=2))
    assert res.status[("anonymous_id", "laptop")] == "ambiguous"
    assert res.key[("email", "m@a.io")] == ("user_id", "mum") != res.key[("user_id", "son")]
    assert res.status[("anonymous_id", "kiosk")] == "shared"
    assert [(n, c) for n, _, c in res.ambiguous] == [(("anonymous_id", "laptop"), [("user_id", "mum"), ("user_id", "son")])]


def test_sql_lists_ambiguous_candidates_oldest_first(runtime: Runtime) -> None:
    """An email used by two user ids joins neither; its refusal names both, the oldest first (in the
    evidence too: with hashed node ids the evidence was once listed in hash order)."""
    reset(runtime)
    at = T0.isoformat()
    send(runtime, [{"type": "identify", "messageId": "m1", "timestamp": at, "userId": "u0", "traits": {"email": "p0@shop.io"}},
                   {"type": "identify", "messageId": "m2", "timestamp": at, "userId": "u3", "traits": {"email": "p0@shop.io"}}])
    runtime.writer.call(lambda e: resolve(e, IdentityRules()))
    [row] = rows_of(runtime, "SELECT * FROM identity_blocked WHERE value = ?", [stored_email(runtime, "p0@shop.io")])
    assert row["profile_a"] == ref.profile_id(("user_id", "u0")) and row["profile_b"] == ref.profile_id(("user_id", "u3"))
    assert [c["value"] for c in json.loads(row["evidence"])["candidates"]] == ["u0", "u3"]
