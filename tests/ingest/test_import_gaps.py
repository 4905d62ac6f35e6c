"""Import gaps closed: line numbers across blank lines, plans on imported track rows, exact big
integers, progress totals, and imports cut off by a stop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from refinery.ingest.importer import get_import, recover_interrupted, run_import
from refinery.runtime import Runtime

TRACK = {
    "type": "track",
    "event": "Order Completed",
    "user_id": "customer_id",
    "timestamp": {"column": "ordered_at", "format": "%Y-%m-%d %H:%M:%S"},
    "properties": {"order_id": "order_id", "amount": {"column": "amount", "type": "double"}},
    "row_key": ["order_id"],
}
HEADER = "order_id,customer_id,ordered_at,amount\n"


def rows(rt: Runtime, sql: str) -> list[dict[str, Any]]:
    return rt.engine.fetch_dicts(sql, cursor=rt.engine.reader())


def test_row_numbers_are_line_numbers_across_blank_lines(runtime: Runtime, tmp_path: Path) -> None:
    f = tmp_path / "o.csv"
    f.write_text(
        HEADER
        + "o1,c1,2024-01-02 10:00:00,1\n"   # line 2
        + "\n"                              # line 3: blank
        + "o2,,2024-01-02 10:00:00,1\n"     # line 4: no user
        + "\n\n"                            # lines 5, 6
        + "o3,c3,2024-01-02 10:00:00,1,x\n"  # line 7: too many values
        + "o4,c4,2024-01-02 10:00:00,ten\n"  # line 8: bad amount
        + "\n"                              # line 9: blank
        + "o5,,2024-01-02 10:00:00,1\n"     # line 10: no user
    )
    seen: list[dict[str, Any]] = []
    job = run_import(runtime, f, source="shop", mapping=TRACK, progress=seen.append)
    assert (job.rows_read, job.rows_loaded, job.rows_failed) == (5, 1, 4), job.error
    got = {r["row_number"]: r["reason"] for r in rows(runtime, "SELECT row_number, reason FROM failed_events")}
    assert got == {4: "missing_identity", 7: "wrong_column_count", 8: "invalid_value", 10: "missing_identity"}
    assert seen[0]["rows_total"] == 5  # lines minus header and blank lines, known before the first chunk
    again = run_import(runtime, f, source="shop", mapping=TRACK)
    assert (again.rows_loaded, again.rows_duplicate, again.rows_failed) == (0, 5, 0)


def test_imported_track_rows_meet_the_tracking_plans(runtime: Runtime, tmp_path: Path) -> None:
    plans = runtime.settings.plans_dir
    plans.mkdir(parents=True, exist_ok=True)
    (plans / "Order Completed.json").write_text(json.dumps({
        "type": "object", "properties": {"amount": {"type": "number", "minimum": 0}}, "required": ["amount"]}))
    f = tmp_path / "o.csv"
    f.write_text(HEADER + "o1,c1,2024-01-02 10:00:00,5\no2,c2,2024-01-02 10:00:00,-3\no3,c3,2024-01-02 10:00:00,\n")
    job = run_import(runtime, f, source="shop", mapping=TRACK)
    assert (job.rows_loaded, job.rows_failed) == (1, 2)
    got = {r["row_number"]: r for r in rows(runtime, "SELECT row_number, stage, reason, field, payload, key_id, sealed FROM failed_events")}
    assert got[3]["stage"] == "plan" and got[3]["reason"] == "plan_violation" and got[3]["field"] == "/properties/amount"
    assert got[3]["payload"] is None  # sealed under the customer's key
    (plain,) = runtime.vault.unseal_many([got[3]["key_id"]], [got[3]["sealed"]])
    assert plain is not None and json.loads(plain)["properties"]["amount"] == -3
    assert got[4]["field"] == "/properties/amount"  # required, and the empty cell is null
    # fix the plan, re-import: the violations load and their failures are resolved, nothing twice
    (plans / "Order Completed.json").write_text(json.dumps({"type": "object"}))
    runtime.plans.reload(force=True)
    again = run_import(runtime, f, source="shop", mapping=TRACK)
    assert (again.rows_loaded, again.rows_duplicate) == (2, 1)
    assert rows(runtime, "SELECT count(*) AS n FROM events")[0]["n"] == 3
    assert {r["replay_status"] for r in rows(runtime, "SELECT replay_status FROM failed_events")} == {"loaded"}


def test_integers_beyond_64_bits_stay_exact(runtime: Runtime, tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    big = 123456789012345678901234567890
    f.write_text(json.dumps({"id": big, "u": "u1", "n": 42}) + "\n" + '{"id": 7, "u": "u2", "n": 99999999999999999999}\n')
    mapping = {"type": "identify", "user_id": "u", "row_key": ["id"], "traits": {"id": "id", "n": {"column": "n", "type": "integer"}}}
    job = run_import(runtime, f, source="app", mapping=mapping)
    assert job.rows_loaded == 2, job.error
    traits = {r["user_id"]: r["traits"] for r in rows(runtime, "SELECT user_id, traits FROM events")}
    assert json.loads(traits["u1"]) == {"id": big, "n": 42}  # auto keeps the JSON number's digits
    assert json.loads(traits["u2"])["n"] == "99999999999999999999"  # integer type: exact, as text beyond 64 bits
    ids = [r["m"] for r in rows(runtime, "SELECT message_id AS m FROM events")]
    assert len(set(ids)) == 2


def test_an_import_cut_off_by_a_stop_is_marked_and_finished_by_importing_again(runtime: Runtime, tmp_path: Path) -> None:
    f = tmp_path / "o.csv"
    f.write_text(HEADER + "".join(f"o{i},c{i},2024-01-02 10:00:00,1\n" for i in range(50)))
    # a previous process loaded the first rows of this file and stopped before finishing
    first = tmp_path / "head.csv"
    first.write_text(HEADER + "".join(f"o{i},c{i},2024-01-02 10:00:00,1\n" for i in range(20)))
    done = run_import(runtime, first, source="shop", mapping=TRACK)
    runtime.writer.call(lambda e: e.execute("UPDATE imports SET status = 'started', finished_at = NULL WHERE import_id = ?",
                                            [done.import_id]))
    assert get_import(runtime.engine, done.import_id).status == "interrupted"  # reported at once, before any write
    assert recover_interrupted(runtime) == 1
    rec = rows(runtime, "SELECT status, error FROM imports")[0]
    assert rec["status"] == "interrupted" and "Import the file again" in rec["error"]
    job = run_import(runtime, f, source="shop", mapping=TRACK)
    assert (job.status, job.rows_loaded, job.rows_duplicate) == ("completed", 30, 20)
    assert rows(runtime, "SELECT count(*) AS n, count(DISTINCT message_id) AS d FROM events")[0] == {"n": 50, "d": 50}
