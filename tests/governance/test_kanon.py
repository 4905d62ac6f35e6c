"""k-anonymity (governance/kanon.py): groups of fewer than k distinct people are not shown to callers
without pii:read - in the pure functions, in aggregate queries and in the catalog, on real DuckDB."""

from __future__ import annotations

import re
from typing import Any

import pytest
import sqlglot

from refinery.errors import QueryError
from refinery.governance import kanon
from refinery.ingest import catalog
from refinery.profiles.build import Refresh
from refinery.runtime import Runtime
from refinery.storage.query import run_aggregate_query, run_query
from support import event, write_events

# -- the pure functions ------------------------------------------------------------------------------


def test_suppress_keeps_groups_of_at_least_k_people_and_counts_the_others() -> None:
    rows = [{"g": "a", "people": 9}, {"g": "b", "people": 10}, {"g": "c", "people": None}, {"g": "d", "people": 250}]
    s = kanon.suppress(rows, 10)
    assert [r["g"] for r in s.rows] == ["b", "d"]
    assert s.suppressed_groups == 2  # the unknown count is suppressed too: nothing unvouched-for is shown
    assert s.note() == "suppressed groups: 2 (fewer than 10 people each)"
    assert kanon.suppress(rows, 2, people=lambda r: r["people"]).suppressed_groups == 1


def test_the_other_bucket_is_shown_only_when_it_holds_k_people() -> None:
    rows = [{"g": "a", "people": 4, "n": 7}, {"g": "b", "people": 5, "n": 8}, {"g": "c", "people": 30, "n": 90}]
    assert kanon.suppress(rows, 10, other=["n"], other_people=9).other == {}  # 9 people: the bucket would single them out
    assert kanon.suppress(rows, 6, other=["n"], other_people=9).other == {"n": 15, "people": 9}
    assert kanon.suppress(rows, 6, other=["n"]).other == {}  # no exact count of the bucket's people: nothing


@pytest.mark.parametrize("k", [1, 0, -3, True, 2.5])
def test_a_minimum_group_size_below_two_is_refused(k: Any) -> None:
    with pytest.raises(QueryError, match="at least 2"):
        kanon.suppress([], k)


def _check(sql: str) -> Any:
    return kanon.check_aggregate(sqlglot.parse_one(sql, read="duckdb"))


@pytest.mark.parametrize(("sql", "says"), [
    ("SELECT user_id FROM events", "returns rows, not groups"),
    ("SELECT event, max(user_id) FROM events GROUP BY event", "max() can return one person's value"),
    ("SELECT event, list(user_id) FROM events GROUP BY event", "can return one person's value"),
    ("SELECT event, histogram(user_id) FROM events GROUP BY event", "histogram() is not one the checker knows"),
    ("SELECT event, count(*) OVER () FROM events GROUP BY event", "window functions"),
    ("SELECT e.event, count(*) FROM events e JOIN profiles p ON p.profile_id = e.user_id GROUP BY 1", "no JOIN"),
    ("SELECT count(*) FROM events WHERE user_id IN (SELECT user_id FROM events)", "subqueries"),
    ("SELECT count(*) FROM audit_log", "exactly one of"),
    ("SELECT count(*) FROM events UNION ALL SELECT count(*) FROM events", "this is a UNION"),
    ("WITH x AS (SELECT * FROM events) SELECT count(*) FROM x", "cannot use WITH"),
])
def test_queries_a_threshold_cannot_protect_are_refused_with_the_reason(sql: str, says: str) -> None:
    with pytest.raises(QueryError, match=re.escape(says)) as caught:
        _check(sql)
    assert caught.value.fix


def test_threshold_adds_the_people_condition_to_the_query_s_own_having() -> None:
    select = _check("SELECT event, count(*) AS n FROM events GROUP BY event HAVING count(*) > 1 ORDER BY n LIMIT 3")
    shown, counted = kanon.threshold(select, 10)
    assert "HAVING (COUNT(*) > 1) AND COUNT(DISTINCT _person) >= 10" in shown.sql("duckdb")
    small = counted.sql("duckdb")
    assert "(COUNT(*) > 1) AND COUNT(DISTINCT _person) < 10" in small and "LIMIT" not in small


# -- aggregate queries on real data ------------------------------------------------------------------


def _people_doing(rt: Runtime, name: str, people: int, *, each: int = 1, prefix: str = "u", **fields: Any) -> None:
    write_events(rt, *(event("track", event=name, userId=f"{prefix}{name}{i}", **fields) for i in range(people) for _ in range(each)))


def test_a_group_of_9_people_is_suppressed_and_a_group_of_10_is_shown(runtime: Runtime) -> None:
    _people_doing(runtime, "Nine", 9, each=3)     # 27 events, 9 people
    _people_doing(runtime, "Ten", 10)             # 10 events, 10 people
    write_events(runtime, *(event("track", event="Nine", userId="uNine0") for _ in range(20)))  # many events, same person
    sql = "SELECT event, count(*) AS events, count(DISTINCT _person) AS people FROM events GROUP BY event ORDER BY event"
    result = run_aggregate_query(runtime.engine, sql, min_group_size=10)
    assert result.rows == [("Ten", 10, 10)]
    assert (result.suppressed_groups, result.min_group_size) == (1, 10)
    assert result.to_dict()["suppressed_groups"] == 1
    # a caller with pii:read runs the same SQL unchanged (run_query knows no _person, so count users)
    full = run_query(runtime.engine, "SELECT event, count(*) AS events FROM events GROUP BY event ORDER BY event")
    assert full.rows == [("Nine", 47), ("Ten", 10)] and full.suppressed_groups is None
    # k is the setting's value: with k = 9 both groups are shown
    assert len(run_aggregate_query(runtime.engine, sql, min_group_size=9).rows) == 2


def test_a_global_aggregate_over_a_few_people_is_suppressed_too(runtime: Runtime) -> None:
    _people_doing(runtime, "Ten", 10)
    one = run_aggregate_query(runtime.engine, "SELECT count(*), sum(1) FROM events WHERE user_id = 'uTen3'", min_group_size=10)
    assert one.rows == [] and one.suppressed_groups == 1
    everyone = run_aggregate_query(runtime.engine, "SELECT count(*) AS n FROM events", min_group_size=10)
    assert everyone.rows == [(10,)] and everyone.suppressed_groups == 0


def test_people_are_profiles_after_resolution(runtime: Runtime) -> None:
    # ten anonymous devices, but two of them are one person (identified on both): 9 people after resolution
    for i in range(10):
        user = "u-joined" if i in (0, 1) else f"u{i}"
        write_events(runtime, event("track", event="Viewed", anonymousId=f"a{i}"),
                     event("identify", anonymousId=f"a{i}", userId=user))
    sql = "SELECT event, count(DISTINCT _person) AS people FROM events WHERE event = 'Viewed' GROUP BY event"
    before = run_aggregate_query(runtime.engine, sql, min_group_size=10)
    assert before.rows == [("Viewed", 10)]  # unresolved: each anonymous id is somebody
    runtime.writer.call(Refresh.from_settings(runtime.settings))
    after = run_aggregate_query(runtime.engine, sql, min_group_size=10)
    assert after.rows == [] and after.suppressed_groups == 1


def test_aggregates_over_profiles_and_consent_count_people_too(runtime: Runtime) -> None:
    _people_doing(runtime, "Ten", 10)
    runtime.writer.call(Refresh.from_settings(runtime.settings))
    profiles = run_aggregate_query(runtime.engine, "SELECT count(*) AS n FROM profiles", min_group_size=10)
    assert profiles.rows == [(10,)]
    by_id = run_aggregate_query(runtime.engine, "SELECT profile_id, count(*) FROM profiles GROUP BY profile_id", min_group_size=10)
    assert by_id.rows == [] and by_id.suppressed_groups == 10


def test_describe_of_a_person_keyed_table_runs_and_other_tables_are_refused(runtime: Runtime) -> None:
    assert "event" in [r[0] for r in run_aggregate_query(runtime.engine, "DESCRIBE events", min_group_size=10).rows]
    with pytest.raises(QueryError, match=r"read exactly one of: .* \(this reads: audit_log\)"):
        run_aggregate_query(runtime.engine, "SELECT action, count(*) FROM audit_log GROUP BY 1", min_group_size=10)
    with pytest.raises(QueryError, match="DESCRIBE takes one of"):
        run_aggregate_query(runtime.engine, "DESCRIBE audit_log", min_group_size=10)
    with pytest.raises(QueryError, match="read_csv"):
        run_aggregate_query(runtime.engine, "SELECT count(*) FROM read_csv('/etc/passwd')", min_group_size=10)


# -- the catalog -------------------------------------------------------------------------------------


def test_the_k_anonymous_catalog_leaves_out_rare_events_and_keys(runtime: Runtime) -> None:
    _people_doing(runtime, "Nine", 9, properties={"plan": "a"})
    write_events(runtime, *(event("track", event="Ten", userId=f"t{i}", properties={"plan": "b", **({"rare": True} if i < 9 else {})})
                            for i in range(10)))
    full = catalog.build(runtime.engine)
    assert {e["event"] for e in full["events"]} == {"Nine", "Ten"} and "suppressed_groups" not in full
    k_anon = catalog.build(runtime.engine, min_group_size=10)
    [ten] = k_anon["events"]
    assert ten["event"] == "Ten" and ten["count"] == 10
    assert set(ten["properties"]) == {"plan"}  # "rare" was seen from 9 people
    assert (k_anon["suppressed_groups"], k_anon["suppressed_keys"], k_anon["min_group_size"]) == (1, 1, 10)
