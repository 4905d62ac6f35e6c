"""The audit log is a hash chain: verify names a row that was edited, deleted or moved in DuckDB."""

from __future__ import annotations

import pytest

from refinery.governance import audit
from refinery.governance.errors import AuditError
from refinery.governance.principal import BOOTSTRAP_ADMIN, Principal
from refinery.runtime import Runtime

ANALYST = Principal("tok_abc", "jane", "analyst")


def _log(runtime: Runtime, n: int) -> list[audit.AuditEntry]:
    return [audit.record_now(runtime.writer, ANALYST if i % 2 else BOOTSTRAP_ADMIN, "profiles.read", f"profile:p{i}", {"n": i})
            for i in range(1, n + 1)]


def _problems(runtime: Runtime) -> list[tuple[int, str]]:
    result = audit.verify(runtime.engine)
    assert result.ok is (not result.problems)
    return [(p.seq, p.kind) for p in result.problems]


def test_rows_chain_and_verify(runtime: Runtime) -> None:
    rows = _log(runtime, 5)
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0].prev_hash == audit.GENESIS
    assert all(b.prev_hash == a.hash for a, b in zip(rows, rows[1:], strict=False))
    result = audit.verify(runtime.engine)
    assert result.ok and result.rows == 5 and (result.head_seq, result.head_hash) == (5, rows[-1].hash)
    listed = audit.entries(runtime.engine, limit=2)
    assert [e.seq for e in listed] == [4, 5] and listed[-1] == rows[-1]
    assert [e.seq for e in audit.entries(runtime.engine, after=3)] == [4, 5]
    assert {e.actor_name for e in audit.entries(runtime.engine, actor="tok_abc")} == {"jane"}


def test_an_edited_row_is_named(runtime: Runtime) -> None:
    _log(runtime, 5)
    runtime.engine.execute("UPDATE audit_log SET object = 'profile:someone-else' WHERE seq = 3")
    assert _problems(runtime) == [(3, "edited")]


def test_an_edited_row_with_a_recomputed_hash_breaks_the_next_link(runtime: Runtime) -> None:
    rows = _log(runtime, 5)
    r = rows[2]
    forged = audit.row_hash(r.seq, r.recorded_at, r.actor_id, r.actor_name, r.actor_role, r.action, "profile:x", r.details, r.prev_hash)
    runtime.engine.execute("UPDATE audit_log SET object = 'profile:x', hash = ? WHERE seq = 3", [forged])
    assert _problems(runtime) == [(4, "broken_link")]


def test_an_edited_time_or_details_is_caught(runtime: Runtime) -> None:
    _log(runtime, 3)
    runtime.engine.execute("UPDATE audit_log SET recorded_at = recorded_at + INTERVAL 1 SECOND WHERE seq = 1")
    runtime.engine.execute("""UPDATE audit_log SET details = '{"n": 99}' WHERE seq = 2""")
    assert _problems(runtime) == [(1, "edited"), (2, "edited")]


def test_a_deleted_row_is_named(runtime: Runtime) -> None:
    _log(runtime, 5)
    runtime.engine.execute("DELETE FROM audit_log WHERE seq = 2")
    problems = audit.verify(runtime.engine).problems
    assert [(p.seq, p.kind) for p in problems] == [(2, "missing"), (3, "broken_link")]
    assert "Row 2 of the audit log is missing" in problems[0].message


def test_rows_deleted_from_the_end_are_named(runtime: Runtime) -> None:
    _log(runtime, 5)
    runtime.engine.execute("DELETE FROM audit_log WHERE seq >= 4")
    assert _problems(runtime) == [(4, "missing")]
    assert "rows 4 to 5" in audit.verify(runtime.engine).problems[0].message.lower()
    # the next row continues from the head, so the gap stays visible
    audit.record_now(runtime.writer, ANALYST, "profiles.read", "profile:p6")
    assert (4, "missing") in _problems(runtime)


def test_reordered_rows_are_named(runtime: Runtime) -> None:
    _log(runtime, 5)
    runtime.engine.execute("UPDATE audit_log SET seq = CASE seq WHEN 2 THEN 3 ELSE 2 END WHERE seq IN (2, 3)")
    # each moved row no longer matches its hash, and the row after them no longer follows
    assert _problems(runtime) == [(2, "edited"), (3, "edited"), (4, "broken_link")]


def test_a_rewritten_log_misses_the_head_noted_earlier(runtime: Runtime) -> None:
    rows = _log(runtime, 3)
    noted = (rows[-1].seq, rows[-1].hash)
    assert audit.verify(runtime.engine, expect=noted).expected_found is True
    # rewrite the whole chain consistently (someone with write access to the file and this code)
    runtime.engine.execute("DELETE FROM audit_log")
    runtime.engine.execute("DELETE FROM audit_head")
    audit.record_now(runtime.writer, ANALYST, "profiles.read", "profile:innocent")
    result = audit.verify(runtime.engine, expect=noted)
    assert result.problems == [] and result.expected_found is False and not result.ok
    assert audit.parse_head(f"3:{rows[-1].hash}") == noted
    with pytest.raises(AuditError, match="SEQ:HASH"):
        audit.parse_head("3-abc")


def test_details_never_hold_personal_values(runtime: Runtime) -> None:
    with pytest.raises(AuditError, match="details.email"):
        audit.record_now(runtime.writer, ANALYST, "profiles.read", None, {"email": "jane@example.com"})
    with pytest.raises(AuditError, match="email address"):
        audit.record_now(runtime.writer, ANALYST, "profiles.lookup", None, {"identifier": "jane@example.com"})
    with pytest.raises(AuditError, match="noun.verb"):
        audit.record_now(runtime.writer, ANALYST, "READ", None)
    assert audit.entries(runtime.engine) == []  # nothing half-written


def test_a_change_and_its_audit_row_commit_together(runtime: Runtime) -> None:
    def change(e):  # type: ignore[no-untyped-def]
        audit.record(e, BOOTSTRAP_ADMIN, "sources.create", "source:app", {})
        runtime.sources.create(e, "web")  # exists already: the whole transaction rolls back

    with pytest.raises(Exception, match="already exists"):
        runtime.writer.call(change)
    assert audit.entries(runtime.engine) == [] and audit.verify(runtime.engine).ok
