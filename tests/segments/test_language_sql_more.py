"""Compiled rules on real DuckDB, through the real pipeline: explanations with their values,
persons pooled by real links, sequences of three steps, date windows at their edges, computed traits
inside rules, the batch of many rules (`compile_many`) against each rule alone."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest

from refinery.identity import IdentityRules
from refinery.identity.matching.links import build_links
from refinery.identity.matching.store import write_links
from refinery.privacy.pii import token_for
from refinery.profiles.build import resolve_and_build
from refinery.profiles.persons import IdentityPolicy, persons
from refinery.profiles.policy import TraitPolicy
from refinery.runtime import Runtime
from refinery.segments import PERSONS_TABLE, CompileContext, build_catalog, compile_rule
from refinery.segments.compile import Compiled, compile_many
from support import fresh_runtime, write_events

# After every event is received (as-of counts only events received by then), on a whole second.
AS_OF = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
# Two dates for the absolute windows: whole days well inside the events' past.
D1 = (AS_OF - timedelta(days=20)).date()
D2 = (AS_OF - timedelta(days=10)).date()


def midnight(d: date) -> datetime:
    return datetime.combine(d, time(0, 0), tzinfo=UTC)


def ago(days: float) -> datetime:
    return AS_OF - timedelta(days=days)


def track(user: str, name: str, when: datetime, **props: Any) -> dict[str, Any]:
    return {"type": "track", "messageId": uuid.uuid4().hex, "userId": user, "event": name,
            "timestamp": when.isoformat(), "properties": props}


def track_anonymous(anonymous: str, name: str, when: datetime, **props: Any) -> dict[str, Any]:
    return {"type": "track", "messageId": uuid.uuid4().hex, "anonymousId": anonymous, "event": name,
            "timestamp": when.isoformat(), "properties": props}


def identify(user: str | None = None, *, anonymous: str | None = None, **traits: Any) -> dict[str, Any]:
    ids = {"userId": user} if user is not None else {"anonymousId": anonymous}
    return {"type": "identify", "messageId": uuid.uuid4().hex, **ids, "timestamp": ago(60).isoformat(), "traits": traits}


EVENTS = [
    # explain: ann bought twice recently and is on pro; bob once, long ago, on free
    identify("ann", plan="pro", age=25),
    identify("bob", plan="free", age=41),
    track("ann", "Order Completed", ago(10), total=150, category="shoes"),
    track("ann", "Order Completed", ago(5), total=120, category="shoes"),
    track("ann", "Product Viewed", ago(5.5), category="shoes"),
    track("ann", "Product Viewed", ago(4), category="hats"),
    track("ann", "Product Viewed", ago(3), category="shoes"),
    track("bob", "Order Completed", ago(50), total=20, category="hats"),
    # sequences: Product Viewed then Added to Cart then Order Completed within 1 day
    track("seq_ok", "Product Viewed", ago(10)),
    track("seq_ok", "Added to Cart", ago(10) + timedelta(hours=1)),
    track("seq_ok", "Order Completed", ago(10) + timedelta(hours=2), total=150),
    track("seq_wrong_order", "Added to Cart", ago(10)),
    track("seq_wrong_order", "Product Viewed", ago(10) + timedelta(hours=1)),
    track("seq_wrong_order", "Order Completed", ago(10) + timedelta(hours=2), total=150),
    track("seq_slow", "Product Viewed", ago(10)),
    track("seq_slow", "Added to Cart", ago(9.5)),
    track("seq_slow", "Order Completed", ago(8), total=150),
    track("seq_tie", "Product Viewed", ago(10)),
    track("seq_tie", "Added to Cart", ago(10)),
    track("seq_tie", "Order Completed", ago(10) + timedelta(hours=2), total=150),
    # a first chain too slow, a second one in time: the second counts
    track("seq_again", "Product Viewed", ago(20)),
    track("seq_again", "Added to Cart", ago(20) + timedelta(hours=1)),
    track("seq_again", "Order Completed", ago(15), total=150),
    track("seq_again", "Product Viewed", ago(5)),
    track("seq_again", "Added to Cart", ago(5) + timedelta(hours=1)),
    track("seq_again", "Order Completed", ago(5) + timedelta(hours=3), total=150),
    track("seq_small", "Product Viewed", ago(3)),
    track("seq_small", "Added to Cart", ago(3) + timedelta(hours=1)),
    track("seq_small", "Order Completed", ago(3) + timedelta(hours=2), total=50),
    # date windows: one Login each, at the edges of D1..D2 and of 30 days ago..7 days ago
    track("d1_start", "Login", midnight(D1)),
    track("d1_before", "Login", midnight(D1) - timedelta(seconds=1)),
    track("d2_end", "Login", midnight(D2) + timedelta(hours=23, minutes=59, seconds=59)),
    track("d2_after", "Login", midnight(D2 + timedelta(days=1))),
    track("rel_31", "Login", ago(31)),
    track("rel_29", "Login", ago(29)),
    track("rel_8", "Login", ago(8)),
    track("rel_6", "Login", ago(6)),
    # a page call has no `event`: its name is the page's name
    {"type": "page", "messageId": uuid.uuid4().hex, "userId": "pager", "name": "Pricing", "timestamp": ago(2).isoformat(),
     "properties": {"url": "https://shop.example/pricing"}},
    # persons: a web profile and a CRM row of the same person (linked at 0.97), and a pair at 0.7
    identify("web-1", email="ann.w@acme.io"),
    identify(anonymous="crm-7", email="a.smith@post.io", plan="pro"),
    identify("web-2", email="bob.w@acme.io", plan="pro"),
    identify(anonymous="crm-9", email="b.jones@post.io"),
    track("web-1", "Order Completed", ago(4), total=60),
    track_anonymous("crm-7", "Order Completed", ago(3), total=70),
    track("web-2", "Order Completed", ago(4), total=60),
    track_anonymous("crm-9", "Order Completed", ago(3), total=70),
]


class Store:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.engine = rt.engine

    def ctx(self, **kw: Any) -> CompileContext:
        engine = self.engine
        return CompileContext(build_catalog(engine), tokenise=lambda k, v: token_for(engine, k, v) or v, **kw)

    def token(self, kind: str, value: str) -> str:
        """A personal value as the identity tables hold it (its token when the store pseudonymises)."""
        return token_for(self.engine, kind, value) or value

    def profile(self, kind: str, value: str) -> str:
        rows = self.engine.fetch_all("SELECT profile_id FROM identities WHERE identifier_type = ? AND value = ?",
                                     [kind, value], cursor=self.engine.reader())
        return str(rows[0][0])

    def name_of(self, profile_id: str) -> str:
        rows = self.engine.fetch_all(
            "SELECT identifier_type, value FROM identities WHERE profile_id = ? AND identifier_type IN ('user_id', 'anonymous_id') "
            "ORDER BY identifier_type DESC", [profile_id], cursor=self.engine.reader())
        return str(rows[0][1])

    def run(self, compiled: Compiled, cursor: Any = None) -> set[str]:
        rows = self.engine.fetch_all(compiled.members(AS_OF), cursor=cursor or self.engine.reader())
        return {self.name_of(r[0]) for r in rows}

    def members(self, rule: str, **kw: Any) -> set[str]:
        return self.run(compile_rule(rule, self.ctx(**kw)))

    def explain(self, rule: str, profile_id: str, cursor: Any = None, **kw: Any) -> list[tuple[str, bool, str | None]]:
        compiled = compile_rule(rule, self.ctx(**kw))
        return [(str(r[0]), r[1], r[2]) for r in
                self.engine.fetch_all(compiled.explain(profile_id, AS_OF), cursor=cursor or self.engine.reader())]

    def persons_cursor(self, threshold: float) -> Any:
        """A reader with the profile -> person groups at `threshold` registered, as a run does."""
        cur = self.engine.fresh_reader()
        groups = persons(self.engine, IdentityPolicy("probabilistic", threshold), IdentityRules())
        self.engine.register(PERSONS_TABLE, groups.to_arrow(), cursor=cur)
        return cur


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    path: Path = tmp_path_factory.mktemp("segments_more")
    with fresh_runtime(path) as rt:
        outcomes = write_events(rt, *EVENTS)
        assert all(o.status == "loaded" for o in outcomes), outcomes
        rt.writer.call(lambda e: resolve_and_build(e, IdentityRules(), TraitPolicy()))
        s = Store(rt)
        links = [{"a_type": "email", "a_value": s.token("email", a), "b_type": "email",
                  "b_value": s.token("email", b), "score": score, "evidence": {}}
                 for a, b, score in [("ann.w@acme.io", "a.smith@post.io", 0.97), ("bob.w@acme.io", "b.jones@post.io", 0.7)]]
        table = build_links(links, method="person_record", model_version="test-v1", created_at=datetime.now(UTC))
        rt.writer.call(lambda e: write_links(e, table, method="person_record", model_version="test-v1"))
        yield s


# --- explain ------------------------------------------------------------------------------------
def test_explain_reports_each_condition_with_the_value_that_decided_it(store: Store) -> None:
    rule = ("performed 'Order Completed' where total > 100 at least 2 times in last 30 days "
            "and plan = 'pro' and not performed 'Product Viewed' in last 2 days")
    ann, bob = store.profile("user_id", "ann"), store.profile("user_id", "bob")
    # a condition is the leaf: c3 is `performed ...`, which did not hold, so its `not` did
    assert [c.text for c in compile_rule(rule, store.ctx()).conditions][2] == "performed 'Product Viewed' in last 2 days"
    assert store.explain(rule, ann) == [("c1", True, "2"), ("c2", True, "pro"), ("c3", False, "0")]
    assert store.explain(rule, bob) == [("c1", False, "0"), ("c2", False, "free"), ("c3", False, "0")]
    assert store.members(rule) == {"ann"}
    # the value of a sum, a most frequent value and a last time, as text; a missing trait has no value
    rule = ("sum(total) of 'Order Completed' > 250 or most frequent category of 'Product Viewed' = 'shoes' "
            "or last time of 'Order Completed' < 30 days ago or email is set")
    rows = store.explain(rule, ann)
    assert [(cid, held) for cid, held, _ in rows] == [("c1", True), ("c2", True), ("c3", False), ("c4", False)]
    assert float(str(rows[0][2])) == 270.0 and rows[1][2] == "shoes" and rows[3][2] is None
    assert str(rows[2][2]).startswith(str(ago(5).date()))


def test_explain_of_an_included_segment_shows_its_own_conditions(store: Store) -> None:
    ctx = {"segments": {"buyers": "performed 'Order Completed' in last 30 days"}}
    ann = store.profile("user_id", "ann")
    assert store.explain("in segment 'buyers' and age < 30", ann, **ctx) == [
        ("c1", True, "true"), ("c1.c1", True, "2"), ("c2", True, "25")]


# --- persons --------------------------------------------------------------------------------------
def test_counted_by_persons_pools_events_and_traits_over_real_links(store: Store) -> None:
    web1, crm7 = store.profile("user_id", "web-1"), store.profile("anonymous_id", "crm-7")
    # each profile bought once; the person (linked at 0.97) twice
    twice = "performed 'Order Completed' at least 2 times in last 30 days"
    assert not {"web-1", "crm-7", "web-2", "crm-9"} & store.members(twice)
    cur = store.persons_cursor(0.9)
    try:
        pooled = store.run(compile_rule(twice + " counted by persons above 0.9", store.ctx()), cur)
        assert {"web-1", "crm-7"} <= pooled and not {"web-2", "crm-9"} & pooled  # 0.7 is below the threshold
        # a trait of one profile and the events of the other: every profile of the person is a member
        mixed = compile_rule("plan = 'pro' and sum(total) of 'Order Completed' > 100 counted by persons above 0.9", store.ctx())
        assert store.run(mixed, cur) == {"web-1", "crm-7", "ann"}  # web-2 is pro with 60 alone; ann on her own
        rows = store.engine.fetch_all(mixed.explain(web1, AS_OF), cursor=cur)
        assert [(r[0], r[1]) for r in rows] == [("c1", True), ("c2", True)] and float(rows[1][2]) == 130.0
        assert store.engine.fetch_all(mixed.explain(crm7, AS_OF), cursor=cur)[1][2] == rows[1][2]
    finally:
        cur.close()
    cur = store.persons_cursor(0.6)
    try:  # at 0.6 the second pair is a person too
        assert {"web-1", "crm-7", "web-2", "crm-9"} <= store.run(compile_rule(twice + " counted by persons above 0.6", store.ctx()), cur)
    finally:
        cur.close()


# --- sequences ------------------------------------------------------------------------------------
def test_three_step_sequences_in_order_strictly_after_within_the_time(store: Store) -> None:
    three = "'Product Viewed' then 'Added to Cart' then 'Order Completed' within 1 day"
    got = store.members(three)
    assert {"seq_ok", "seq_again", "seq_small"} <= got
    assert not {"seq_wrong_order", "seq_slow", "seq_tie"} & got
    # a step's `where`, and a window on the whole sequence
    assert "seq_small" not in store.members("'Product Viewed' then 'Added to Cart' then 'Order Completed' where total > 100 within 1 day")
    assert store.members(three + " in last 7 days") & {"seq_ok", "seq_again", "seq_small"} == {"seq_again", "seq_small"}
    # within 3 days the slow chain completes; the tie never does (each step strictly after the one before)
    slow = store.members("'Product Viewed' then 'Added to Cart' then 'Order Completed' within 3 days")
    assert "seq_slow" in slow and "seq_tie" not in slow


# --- date windows ---------------------------------------------------------------------------------
def test_date_windows_include_whole_days_at_both_ends(store: Store) -> None:
    logins = {"d1_start", "d1_before", "d2_end", "d2_after", "rel_31", "rel_29", "rel_8", "rel_6"}

    def who(window: str) -> set[str]:
        return store.members(f"performed 'Login' {window}") & logins

    assert who(f"between {D1} and {D2}") == {"d1_start", "d2_end"}
    assert who(f"since {D2 + timedelta(days=1)}") == {"d2_after", "rel_8", "rel_6"}
    assert who(f"before {D1}") == {"d1_before", "rel_31", "rel_29"}
    assert who("between 30 days ago and 7 days ago") == {"rel_29", "rel_8", "d1_start", "d1_before", "d2_end", "d2_after"}
    assert who("in last 7 days") == {"rel_6"}
    # times (not dates) are exact: the first second of D1, and not the one before it
    assert who(f"between {D1}T00:00:00Z and {D1}T00:00:01Z") == {"d1_start"}


# --- computed traits ------------------------------------------------------------------------------
def test_computed_traits_inside_rules(store: Store) -> None:
    traits = {"lifetime_value": "sum(total) of 'Order Completed'",
              "favourite_category": "most frequent category of 'Product Viewed' in last 90 days",
              "orders_30d": "count of 'Order Completed' in last 30 days"}
    assert store.members("lifetime_value > 250", computed_traits=traits) == {"ann", "seq_again"}  # 270 and 300
    assert store.members("favourite_category = 'shoes' and orders_30d >= 2", computed_traits=traits) == {"ann"}
    assert store.members("lifetime_value < 30 and plan = 'free'", computed_traits=traits) == {"bob"}
    ann = store.profile("user_id", "ann")
    assert store.explain("lifetime_value > 250 and favourite_category = 'shoes'", ann, computed_traits=traits)[1] == (
        "c2", True, "shoes")


# --- many rules at once ---------------------------------------------------------------------------
def test_compile_many_gives_each_rule_its_own_members(store: Store) -> None:
    rules = {
        "buyers": "performed 'Order Completed' where total > 100 in last 30 days",
        "pro_not_viewing": "plan = 'pro' and not performed 'Product Viewed' in last 30 days",
        "three_steps": "'Product Viewed' then 'Added to Cart' then 'Order Completed' within 1 day",
        "shoe_people": "most frequent category of 'Product Viewed' = 'shoes'",
        "big": "in segment 'buyers' and sum(total) of 'Order Completed' > 250",
        "nobody": "performed 'Login' in last 1 days",
        "persons": "performed 'Order Completed' at least 2 times counted by persons above 0.9",
    }
    ctx = store.ctx(segments=rules)
    many = compile_many(rules, ctx)
    assert many.alone == ("persons",) and "persons" not in many.batched
    query = many.members(AS_OF)
    assert query is not None
    got: dict[str, set[str]] = {name: set() for name in many.batched}
    for segment, profile_id in store.engine.fetch_all(query, cursor=store.engine.reader()):
        got[segment].add(store.name_of(profile_id))
    for name in many.batched:
        assert got[name] == store.run(many.compiled[name]), name
    assert got["buyers"] >= {"ann", "seq_ok"} and got["nobody"] == set()
    assert "ann" in got["big"] and "seq_small" not in got["big"]


# --- phone literals -------------------------------------------------------------------------------
def test_a_phone_literal_is_normalised_with_the_stores_region(tmp_path: Path) -> None:
    from refinery.settings import Settings

    rt = Runtime.open(Settings(data_dir=tmp_path / "data", admin_token="t", identity_phone_region="GB"))
    try:
        outcomes = write_events(rt, identify("gb-caller", phone="020 7946 0958"), identify("us-caller", phone="+1 212 555 0100"))
        assert all(o.status == "loaded" for o in outcomes), outcomes
        rt.writer.call(lambda e: resolve_and_build(e, IdentityRules(phone_region="GB"), TraitPolicy()))
        s = Store(rt)
        assert s.ctx().catalog.phone_region == "GB"
        # written as a caller in the store's region would write it, or in full: the same number
        assert s.members("phone = '020 7946 0958'") == {"gb-caller"}
        assert s.members("phone = '+44 20 7946 0958'") == {"gb-caller"}
        assert s.members("phone = '(212) 555-0100'") == set()  # a GB store does not read it as a US number
        assert s.members("phone in ('(212) 555-0100', '+1 212 555 0100')") == {"us-caller"}
        # the context can say otherwise
        assert s.members("phone = '(212) 555-0100'", phone_region="US") == {"us-caller"}
    finally:
        rt.close()


# --- event names ----------------------------------------------------------------------------------
def test_names_of_pages_and_types_pass_the_scans_name_test(store: Store) -> None:
    """The scan tests `event IN (names) OR event IS NULL` before the JSON: a page (no `event`) is
    named by its name, an identify by its type, and both are still counted."""
    assert store.members("performed 'Pricing' in last 7 days") == {"pager"}
    assert store.members("count(event = 'Pricing' and url contains 'pricing') >= 1") == {"pager"}
    assert store.members("count(event in ('Pricing', 'Login') and type = 'page') >= 1") == {"pager"}
    assert store.members("'Pricing' then 'Order Completed' within 30 days or most frequent url of 'Pricing' = 'x'") == set()
    assert {"ann", "bob"} <= store.members("performed 'identify' and performed 'Order Completed'")


# --- what the SQL relies on -----------------------------------------------------------------------
def test_event_profiles_carry_their_events_time_through_full_and_incremental_resolution(tmp_path: Path) -> None:
    """The compiled scan repeats its time bounds on `event_profiles.timestamp`: it must be the
    event's own `timestamp`, to the microsecond, however the event was attributed."""
    from refinery.identity.incremental import run_batch
    from refinery.settings import Settings

    rules, policy = IdentityRules(), TraitPolicy()
    with Runtime.open(Settings(data_dir=tmp_path / "data", admin_token="t")) as rt:
        write_events(rt, identify("t1", plan="pro"), track("t1", "Login", ago(3) + timedelta(microseconds=123457)))
        rt.writer.call(lambda e: resolve_and_build(e, rules, policy))  # full
        write_events(rt, track("t1", "Login", ago(2) + timedelta(microseconds=999999)),  # known identifier: attached
                     {**identify(anonymous="t1-device"), "userId": "t1"},                # a new identifier: a region
                     track_anonymous("t1-device", "Login", ago(1) + timedelta(microseconds=1)))
        assert rt.writer.call(lambda e: run_batch(e, rules, policy)).mode != "none"
        write_events(rt, track_anonymous("t2-device", "Login", ago(0.5) + timedelta(microseconds=500001)))
        rt.writer.call(lambda e: run_batch(e, rules, policy))
        rows = rt.engine.fetch_all("SELECT count(*), count(*) FILTER (WHERE e.timestamp IS DISTINCT FROM ep.timestamp) "
                                   "FROM events e JOIN event_profiles ep ON ep.source = e.source AND ep.message_id = e.message_id",
                                   cursor=rt.engine.reader())
        assert rows == [(6, 0)]
        s = Store(rt)
        assert s.members("count of 'Login' >= 3 in last 3 days") == {"t1"}
