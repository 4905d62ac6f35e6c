"""identity_links: idempotent writes, supersession by a new model version, removal that sticks, restore."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from refinery.identity.matching import (
    DEVICE_SIGNAL,
    PERSON_RECORD,
    LinkNotFound,
    MatchingError,
    active_links,
    remove_link,
    restore_link,
    save_links,
)
from refinery.identity.matching.links import build_links
from refinery.runtime import Runtime

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def links(version: str, pairs: dict[tuple[str, str], float], method: str = PERSON_RECORD, at: datetime = T0) -> pa.Table:
    return build_links(
        ({"a_type": "crm_id", "a_value": a, "b_type": "crm_id", "b_value": b, "score": s, "evidence": {"v": version}}
         for (a, b), s in pairs.items()),
        method=method, model_version=version, created_at=at,
    )  # fmt: skip


def rows(rt: Runtime) -> list[dict[str, object]]:
    return rt.engine.fetch_dicts("SELECT * FROM identity_links ORDER BY model_version, a_value, b_value", cursor=rt.engine.reader())


def test_writing_the_same_run_twice_changes_nothing(runtime: Runtime) -> None:
    run = links("pr-1", {("A", "B"): 0.97, ("C", "D"): 0.91})
    first = save_links(runtime.writer, run, method=PERSON_RECORD, model_version="pr-1", now=T0)
    assert (first.inserted, first.refreshed, first.superseded, first.active) == (2, 0, 0, 2)
    before = rows(runtime)
    again = save_links(runtime.writer, run, method=PERSON_RECORD, model_version="pr-1", now=T0 + timedelta(days=1))
    assert (again.inserted, again.refreshed, again.superseded, again.active) == (0, 0, 0, 2)
    assert rows(runtime) == before
    assert {(r["a_value"], r["b_value"]) for r in before} == {("A", "B"), ("C", "D")}
    assert all(r["created_at"] == T0 and r["removed_at"] is None for r in before)


def test_a_new_model_version_supersedes_the_old_links_and_keeps_them_readable(runtime: Runtime) -> None:
    save_links(runtime.writer, links("pr-1", {("A", "B"): 0.97, ("C", "D"): 0.91}), method=PERSON_RECORD, model_version="pr-1", now=T0)
    t1 = T0 + timedelta(hours=1)
    summary = save_links(runtime.writer, links("pr-2", {("A", "B"): 0.99}, at=t1), method=PERSON_RECORD, model_version="pr-2", now=t1)
    assert (summary.inserted, summary.superseded, summary.active) == (1, 2, 1)
    all_rows = rows(runtime)
    assert len(all_rows) == 3  # nothing deleted
    old = [r for r in all_rows if r["model_version"] == "pr-1"]
    assert all(r["removed_at"] == t1 and json.loads(str(r["evidence"]))["superseded_by"] == "pr-2" for r in old)
    active = active_links(runtime.engine).to_pylist()
    assert [(r["a_value"], r["b_value"], r["model_version"]) for r in active] == [("A", "B", "pr-2")]
    # Going back to the first model brings its links back, as they were.
    back = save_links(runtime.writer, links("pr-1", {("A", "B"): 0.97, ("C", "D"): 0.91}), method=PERSON_RECORD, model_version="pr-1", now=t1)
    assert (back.inserted, back.refreshed, back.superseded, back.active) == (0, 2, 1, 2)
    assert {r["model_version"] for r in active_links(runtime.engine).to_pylist()} == {"pr-1"}


def test_a_removed_link_stays_removed_across_reruns_and_model_versions_until_restored(runtime: Runtime) -> None:
    run = links("pr-1", {("A", "B"): 0.97, ("C", "D"): 0.91})
    save_links(runtime.writer, run, method=PERSON_RECORD, model_version="pr-1", now=T0)
    ab = next(r["link_id"] for r in run.to_pylist() if r["a_value"] == "A")
    runtime.writer.call(lambda e: remove_link(e, ab, reason="different people (checked by phone)", by="ops@example.com", now=T0))
    removed = next(r for r in rows(runtime) if r["link_id"] == ab)
    assert removed["removed_at"] == T0
    assert json.loads(str(removed["evidence"]))["removed"]["reason"] == "different people (checked by phone)"
    assert [r["a_value"] for r in active_links(runtime.engine).to_pylist()] == ["C"]

    again = save_links(runtime.writer, run, method=PERSON_RECORD, model_version="pr-1", now=T0 + timedelta(days=1))
    assert (again.inserted, again.active) == (0, 1)  # the re-run does not bring it back

    t2 = T0 + timedelta(days=2)
    save_links(runtime.writer, links("pr-2", {("A", "B"): 0.99, ("C", "D"): 0.95}, at=t2), method=PERSON_RECORD, model_version="pr-2", now=t2)
    new_ab = next(r for r in rows(runtime) if r["model_version"] == "pr-2" and r["a_value"] == "A")
    assert new_ab["removed_at"] == t2  # found again by the new model, stored already removed
    assert json.loads(str(new_ab["evidence"]))["removed"]["by"] == "ops@example.com"
    assert [(r["a_value"], r["model_version"]) for r in active_links(runtime.engine).to_pylist()] == [("C", "pr-2")]

    restored = runtime.writer.call(lambda e: restore_link(e, ab))
    assert restored == 2  # both versions' rows of the pair lose the removal
    active = active_links(runtime.engine).to_pylist()
    assert sorted((r["a_value"], r["model_version"]) for r in active) == [("A", "pr-2"), ("C", "pr-2")]  # pr-1 stays superseded


def test_policies_read_links_above_a_threshold_by_method(runtime: Runtime) -> None:
    save_links(runtime.writer, links("pr-1", {("A", "B"): 0.97}), method=PERSON_RECORD, model_version="pr-1", now=T0)
    device = build_links(
        [{"a_type": "anonymous_id", "a_value": "x", "b_type": "anonymous_id", "b_value": "y", "score": 0.45, "evidence": {}}],
        method=DEVICE_SIGNAL, model_version="ds-1", created_at=T0,
    )  # fmt: skip
    save_links(runtime.writer, device, method=DEVICE_SIGNAL, model_version="ds-1", now=T0)
    assert active_links(runtime.engine).num_rows == 2
    assert active_links(runtime.engine, min_score=0.9)["method"].to_pylist() == [PERSON_RECORD]
    assert active_links(runtime.engine, methods=[DEVICE_SIGNAL])["score"].to_pylist() == [0.45]
    # Writing device signals did not supersede person-record links: each method keeps its own runs.
    assert active_links(runtime.engine, methods=[PERSON_RECORD]).num_rows == 1


def test_bad_writes_and_unknown_links_are_refused(runtime: Runtime) -> None:
    run = links("pr-1", {("A", "B"): 0.97})
    with pytest.raises(MatchingError, match="model_version 'pr-2'"):
        save_links(runtime.writer, run, method=PERSON_RECORD, model_version="pr-2")
    with pytest.raises(MatchingError, match="Unknown link method"):
        save_links(runtime.writer, run, method="guess", model_version="pr-1")
    with pytest.raises(LinkNotFound):
        runtime.writer.call(lambda e: remove_link(e, "nope", reason="x"))
    with pytest.raises(LinkNotFound):
        runtime.writer.call(lambda e: restore_link(e, "nope"))
    assert rows(runtime) == []
