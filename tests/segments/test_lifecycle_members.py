"""Membership history: a run's diff against the open rows closes who left, opens who entered, and
writes the entered/exited outbox, the run row and the audit row in one transaction (real DuckDB,
through the writer). The rule's evaluation is separate (members.evaluate); here the new member
sets are given, so each step of the history is exact."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest

from refinery.errors import StorageError
from refinery.governance.principal import Principal
from refinery.runtime import Runtime
from refinery.segments import members

ACTOR = Principal("local", "local:test", "admin")
T1 = datetime(2026, 1, 1, tzinfo=UTC)


def _define(rt: Runtime, name: str) -> None:
    """A segment row (as store.create writes it) so reads find the segment."""
    rt.writer.call(lambda e: e.execute(
        "INSERT INTO segments VALUES (?, 'performed ''x''', NULL, '{\"mode\": \"profiles\"}', 1, 't', ?, 't', ?, NULL, NULL)",
        [name, T1, T1]))


def _run(rt: Runtime, name: str, ids: list[str], at: datetime, run_id: str | None = None) -> members.SegmentRun:
    run = members.SegmentRun(run_id or f"segrun_{at:%H%M%S}{len(ids)}", name, 1, at.isoformat(), "test", ACTOR.name, at.isoformat())
    table = pa.table({"profile_id": pa.array(ids, pa.string())})
    return rt.writer.call(lambda e: members._apply(e, run, table, at, {"digest": "x"}, ACTOR))


def _open(rt: Runtime, name: str) -> list[str]:
    return sorted(r[0] for r in rt.engine.fetch_all(
        "SELECT profile_id FROM segment_members WHERE segment = ? AND exited_at IS NULL", [name], cursor=rt.engine.reader()))


def _outbox(rt: Runtime, name: str) -> list[tuple[Any, ...]]:
    return rt.engine.fetch_all("SELECT kind, profile_id, occurred_at FROM segment_events WHERE segment = ? ORDER BY event_id",
                               [name], cursor=rt.engine.reader())


def test_runs_record_entries_exits_and_returns_with_an_outbox(runtime: Runtime) -> None:
    _define(runtime, "s")
    t2, t3 = T1 + timedelta(hours=1), T1 + timedelta(hours=2)
    r1 = _run(runtime, "s", ["a", "b", "b"], T1)  # duplicates count once
    assert (r1.members, r1.entered, r1.exited, r1.status) == (2, 2, 0, "completed")
    r2 = _run(runtime, "s", ["b", "c"], t2)
    assert (r2.members, r2.entered, r2.exited) == (2, 1, 1)
    r3 = _run(runtime, "s", ["a", "b", "c"], t3)
    assert (r3.members, r3.entered, r3.exited) == (3, 1, 0)
    assert _open(runtime, "s") == ["a", "b", "c"]
    by_run = sorted(_outbox(runtime, "s"), key=lambda r: (r[2], r[0], r[1]))  # event ids are ordered by run, not within one
    assert [(k, p) for k, p, _ in by_run] == [
        ("segment_entered", "a"), ("segment_entered", "b"), ("segment_entered", "c"), ("segment_exited", "a"), ("segment_entered", "a")]
    assert max(i for i, in runtime.engine.fetch_all("SELECT event_id FROM segment_events WHERE run_id = ?", [r1.run_id],
                                                    cursor=runtime.engine.reader())) < min(
        i for i, in runtime.engine.fetch_all("SELECT event_id FROM segment_events WHERE run_id = ?", [r2.run_id], cursor=runtime.engine.reader()))
    assert [at for k, p, at in _outbox(runtime, "s") if p == "a"] == [T1, t2, t3]
    # 'a' has two stays: the first closed at t2, the second open
    assert members.profile_history(runtime.engine, "s", "a") == [
        {"entered_at": T1.isoformat(), "exited_at": t2.isoformat(), "entered_run": r1.run_id, "exited_run": r2.run_id},
        {"entered_at": t3.isoformat(), "exited_at": None, "entered_run": r3.run_id, "exited_run": None}]
    # history answers for any moment: rows open then
    ids = lambda at: [m["profile_id"] for m in members.members_from_history(runtime.engine, "s", at)]  # noqa: E731
    assert ids(T1 - timedelta(seconds=1)) == []
    assert ids(T1) == ["a", "b"]
    assert ids(t2 + timedelta(minutes=5)) == ["b", "c"]
    assert ids(None) == ["a", "b", "c"]
    # every run is audited with its counts
    rows = runtime.engine.fetch_all("SELECT object, details FROM audit_log WHERE action = 'segments.run' ORDER BY seq",
                                    cursor=runtime.engine.reader())
    assert [json.loads(d)["entered"] for _, d in rows] == [2, 1, 1] and {o for o, _ in rows} == {"segment:s"}


def test_a_run_older_than_the_last_is_superseded_and_changes_nothing(runtime: Runtime) -> None:
    _define(runtime, "s")
    _run(runtime, "s", ["a"], T1 + timedelta(hours=1))
    late = _run(runtime, "s", ["b"], T1)
    assert late.status == "superseded" and late.entered is None
    assert _open(runtime, "s") == ["a"] and len(_outbox(runtime, "s")) == 1


def test_a_failing_run_rolls_back_its_history_outbox_and_audit(runtime: Runtime) -> None:
    _define(runtime, "s")
    first = _run(runtime, "s", ["a"], T1)
    audit_rows = runtime.engine.fetch_all("SELECT count(*) FROM audit_log", cursor=runtime.engine.reader())[0][0]
    with pytest.raises(StorageError):  # the run row's key exists: the whole transaction goes
        _run(runtime, "s", ["b", "c"], T1 + timedelta(hours=1), run_id=first.run_id)
    assert _open(runtime, "s") == ["a"] and len(_outbox(runtime, "s")) == 1
    assert runtime.engine.fetch_all("SELECT count(*) FROM audit_log", cursor=runtime.engine.reader())[0][0] == audit_rows


def test_closing_every_membership_on_delete(runtime: Runtime) -> None:
    _define(runtime, "s")
    _run(runtime, "s", ["a", "b"], T1)
    at = T1 + timedelta(days=1)
    assert runtime.writer.call(lambda e: members.close_all(e, "s", 1, at, ACTOR)) == 2
    assert _open(runtime, "s") == []
    assert [k for k, _, _ in _outbox(runtime, "s")][-2:] == ["segment_exited", "segment_exited"]
    assert runtime.engine.fetch_all("SELECT trigger, exited FROM segment_runs WHERE segment = 's' ORDER BY as_of DESC LIMIT 1",
                                    cursor=runtime.engine.reader()) == [("delete", 2)]


def test_segments_do_not_touch_each_other(runtime: Runtime) -> None:
    _define(runtime, "s")
    _define(runtime, "t")
    _run(runtime, "s", ["a", "b"], T1)
    _run(runtime, "t", ["a"], T1)
    _run(runtime, "s", [], T1 + timedelta(hours=1))
    assert _open(runtime, "s") == [] and _open(runtime, "t") == ["a"]
