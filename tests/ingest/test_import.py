"""Batch import on a real store: CSV, JSON lines and Parquet; re-imports; every bad-row case."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refinery.errors import ImportError_
from refinery.ingest import importer
from refinery.ingest.import_vault import read_sealed_rows
from refinery.ingest.importer import get_import, run_import
from refinery.ingest.mapping import load_mapping_file, validate_mapping
from refinery.runtime import Runtime

DATA = Path(__file__).parent / "data"

TRACK = {
    "type": "track",
    "event": "Order Completed",
    "user_id": "customer_id",
    "email": "email",
    "timestamp": {"column": "ordered_at", "format": "%Y-%m-%d %H:%M:%S"},
    "properties": {"order_id": "order_id", "amount": {"column": "amount", "type": "double"}, "channel": {"value": "shop"}},
    "row_key": ["order_id"],
}


def rows(rt: Runtime, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    return rt.engine.fetch_dicts(sql, params, cursor=rt.engine.reader())


def failed(rt: Runtime) -> list[dict[str, Any]]:
    return rows(rt, "SELECT stage, reason, message, field, file, row_number, message_id, payload, key_id, sealed "
                "FROM failed_events ORDER BY row_number")


def tok(rt: Runtime, kind: str, value: Any) -> str:
    """The token the collector would give this value (the Tokeniser is the reference)."""
    return rt.vault.tokens.tokenise(kind, value)[0]


def payload(rt: Runtime, row: dict[str, Any]) -> dict[str, Any]:
    """A failed row's payload: sealed under its subject's key, never kept in clear."""
    assert row["payload"] is None and row["sealed"] is not None, row
    (plain,) = rt.vault.unseal_many([row["key_id"]], [row["sealed"]])
    assert plain is not None
    return json.loads(plain)  # type: ignore[no-any-return]


def write_orders(path: Path, body: str) -> Path:
    path.write_text("order_id,customer_id,email,ordered_at,amount\n" + body)
    return path


def test_csv_identify_from_a_crm_export(runtime: Runtime) -> None:
    job = run_import(runtime, DATA / "crm_contacts.csv", source="crm", mapping=load_mapping_file(DATA / "crm_contacts.yaml"))
    assert (job.status, job.rows_read, job.rows_loaded, job.rows_failed) == ("completed", 3, 3, 0), job.error
    ev = rows(runtime, "SELECT * FROM events ORDER BY user_id")
    assert [e["user_id"] for e in ev] == ["c-001", "c-002", "c-003"]
    assert {e["type"] for e in ev} == {"identify"} and {e["source"] for e in ev} == {"crm"}
    ann = json.loads(ev[0]["traits"])
    # personal traits are the collector's tokens; the values are in the vault, sealed under Ann's key
    assert ann == {"first_name": tok(runtime, "first_name", "Ann"), "plan": "pro", "lifetime_value": 1200.5,
                   "email": tok(runtime, "email", "ann@example.com"), "phone": tok(runtime, "phone", "+44 20 7946 0001"),
                   "salesforce_id": "SF001"}
    assert runtime.vault.reveal(runtime.engine, [ann["email"], ann["phone"], ann["first_name"]]) == {
        ann["email"]: "ann@example.com", ann["phone"]: "+442079460001", ann["first_name"]: "Ann"}
    held = rows(runtime, "SELECT DISTINCT key_id FROM vault_values WHERE token = ?", [ann["email"]])
    assert held == [{"key_id": runtime.vault.key_id("c-001")}]
    assert json.loads(ev[2]["traits"])["phone"] is None
    ctx = json.loads(ev[0]["context"])
    assert ctx["externalIds"] == [{"id": "SF001", "type": "salesforce_id", "collection": "users", "encoding": "none"}]
    assert ev[0]["library_name"] == "refinery-import"
    assert ev[1]["timestamp"].isoformat() == "2024-03-02T10:30:00+00:00"
    assert ev[0]["import_id"] == job.import_id and ev[0]["raw_id"] is None
    assert all(e["message_id"].startswith("imp-") for e in ev)
    src = rows(runtime, "SELECT kind FROM sources WHERE name = 'crm'")
    assert src == [{"kind": "import"}]


def test_csv_track_and_the_sealed_raw_zone(runtime: Runtime, tmp_path: Path) -> None:
    f = write_orders(tmp_path / "orders.csv", "o1,c1,a@x.com,2024-01-02 10:00:00,12.5\no2,c2,b@x.com,2024-01-03 11:00:00,3\n")
    job = run_import(runtime, f, source="shop", mapping=TRACK)
    assert (job.rows_loaded, job.rows_failed) == (2, 0)
    ev = rows(runtime, "SELECT event, user_id, properties, traits, timestamp FROM events ORDER BY user_id")
    assert ev[0]["event"] == "Order Completed"
    assert json.loads(ev[0]["properties"]) == {"order_id": "o1", "amount": 12.5, "channel": "shop"}
    assert json.loads(ev[0]["traits"]) == {"email": tok(runtime, "email", "a@x.com")}  # from context.traits
    # the rows as read, sealed per subject, content-addressed by the file's hash and recorded with the import
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    rec = rows(runtime, "SELECT file_sha256, stored_path, format, status, rows_loaded FROM imports")[0]
    assert rec["file_sha256"] == sha and rec["format"] == "csv" and rec["status"] == "completed" and rec["rows_loaded"] == 2
    stored = Path(rec["stored_path"])
    assert stored.name == sha + ".sealed.parquet" and stored.parent == runtime.settings.raw_files_dir
    assert b"a@x.com" not in stored.read_bytes() and b"2024-01-03 11:00:00" not in stored.read_bytes()
    got = {r.row_number: (r.key_id, r.value) for r in read_sealed_rows(runtime.vault, stored)}
    assert got == {
        2: (runtime.vault.key_id("c1"), {"order_id": "o1", "customer_id": "c1", "email": "a@x.com", "ordered_at": "2024-01-02 10:00:00", "amount": "12.5"}),
        3: (runtime.vault.key_id("c2"), {"order_id": "o2", "customer_id": "c2", "email": "b@x.com", "ordered_at": "2024-01-03 11:00:00", "amount": "3"}),
    }
    assert get_import(runtime.engine, job.import_id).to_dict()["rows_loaded"] == 2


def test_reimport_adds_nothing_and_counts_duplicates(runtime: Runtime, tmp_path: Path) -> None:
    f = write_orders(tmp_path / "orders.csv", "o1,c1,a@x.com,2024-01-02 10:00:00,1\no2,,b@x.com,2024-01-02 10:00:00,1\n"
                     'o3,c3,c@x.com,2024-01-02 10:00:00,1\no4,"c4,x,2024-01-02 10:00:00,1\n')
    first = run_import(runtime, f, source="shop", mapping=TRACK)
    assert (first.rows_read, first.rows_loaded, first.rows_failed, first.rows_duplicate) == (4, 2, 2, 0)
    copy = tmp_path / "orders-again.csv"
    shutil.copy(f, copy)
    second = run_import(runtime, copy, source="shop", mapping=TRACK)
    assert (second.rows_read, second.rows_loaded, second.rows_failed, second.rows_duplicate) == (4, 0, 0, 4)
    assert rows(runtime, "SELECT count(*) AS n FROM events")[0]["n"] == 2
    assert rows(runtime, "SELECT count(*) AS n FROM failed_events")[0]["n"] == 2
    # a grown export: only the new row is loaded
    grown = write_orders(tmp_path / "orders-3.csv", "o1,c1,a@x.com,2024-01-02 10:00:00,1\no5,c5,e@x.com,2024-01-02 10:00:00,1\n")
    third = run_import(runtime, grown, source="shop", mapping=TRACK)
    assert (third.rows_loaded, third.rows_duplicate) == (1, 1)
    # the same rows under another source are other events
    other = run_import(runtime, grown, source="shop-eu", mapping=TRACK)
    assert other.rows_loaded == 2


def test_fixed_row_is_loaded_on_reimport_and_its_failure_resolved(runtime: Runtime, tmp_path: Path) -> None:
    bad = write_orders(tmp_path / "a.csv", "o1,c1,a@x.com,yesterday,1\n")
    assert run_import(runtime, bad, source="shop", mapping=TRACK).rows_failed == 1
    good = write_orders(tmp_path / "b.csv", "o1,c1,a@x.com,2024-01-02 10:00:00,1\n")
    job = run_import(runtime, good, source="shop", mapping=TRACK)
    assert (job.rows_loaded, job.rows_duplicate) == (1, 0)
    assert rows(runtime, "SELECT replay_status FROM failed_events") == [{"replay_status": "loaded"}]


def test_bad_rows_land_in_failed_events_with_row_numbers(runtime: Runtime, tmp_path: Path) -> None:
    f = write_orders(
        tmp_path / "orders.csv",
        "o1,c1,a@x.com,2024-01-02 10:00:00,1\n"      # row 2: fine
        "o2,,b@x.com,2024-01-02 10:00:00,1\n"        # row 3: no user id
        "o3,c3,c@x.com,02/01/2024,1\n"               # row 4: timestamp in another format
        "o4,c4,d@x.com,2024-01-02 10:00:00,ten\n"    # row 5: amount is not a number
        "o5,c5,e@x.com,2024-01-02 10:00:00,1,extra\n"  # row 6: one value too many
        "o6,c6,f@x.com,1999-01-02 10:00:00,1\n"      # row 7: rejected by cleaning (too old)
        "o7,c7,g@x.com,2024-01-02 10:00:00,1\n"      # row 8: fine
        'o8,"c8,h@x.com,2024-01-02 10:00:00,1\n',    # row 9: quote never closed
    )
    job = run_import(runtime, f, source="shop", mapping=TRACK)
    assert (job.status, job.rows_read, job.rows_loaded, job.rows_failed) == ("completed", 8, 2, 6)
    got = {r["row_number"]: r for r in failed(runtime)}
    assert sorted(got) == [3, 4, 5, 6, 7, 9]
    assert {r["file"] for r in got.values()} == {"orders.csv"}
    assert got[3]["reason"] == "missing_identity" and "'customer_id'" in got[3]["message"] and got[3]["stage"] == "import"
    assert got[4]["reason"] == "invalid_timestamp" and '"02/01/2024"' in got[4]["message"] and "%Y-%m-%d %H:%M:%S" in got[4]["message"]
    assert payload(runtime, got[4])["timestamp"] == "02/01/2024"  # kept as found (sealed)
    assert payload(runtime, got[4])["context"]["traits"] == {"email": "c@x.com"}
    assert got[4]["key_id"] == runtime.vault.key_id("c3")
    assert got[5]["reason"] == "invalid_value" and "'amount'" in got[5]["message"] and "a double" in got[5]["message"]
    assert got[6]["reason"] == "wrong_column_count" and got[6]["message_id"] is None
    assert payload(runtime, got[6]) == {"line": "o5,c5,e@x.com,2024-01-02 10:00:00,1,extra"}
    assert got[3]["key_id"].startswith("ek_") and got[6]["key_id"].startswith("ek_")  # no subject: keys of their own
    assert got[7]["reason"] == "timestamp_too_old" and got[7]["stage"] == "clean"
    assert got[9]["reason"] == "csv_unterminated_quote" and "'customer_id'" in got[9]["message"]
    assert [e["user_id"] for e in rows(runtime, "SELECT user_id FROM events ORDER BY 1")] == ["c1", "c7"]


def test_row_numbers_stay_right_across_chunks(runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importer, "CHUNK_ROWS", 2)
    body = "".join(
        "o{i},{u},x@x.com,2024-01-02 10:00:00,1{extra}\n".format(i=i, u="" if i in (4, 9) else f"c{i}", extra=",x" if i in (2, 6) else "")
        for i in range(1, 11)
    )
    seen: list[dict[str, Any]] = []
    job = run_import(runtime, write_orders(tmp_path / "o.csv", body), source="shop", mapping=TRACK, progress=seen.append)
    assert (job.rows_read, job.rows_loaded, job.rows_failed) == (10, 6, 4)
    got = {r["row_number"]: r["reason"] for r in failed(runtime)}
    # data row i is file line i + 1 (the header is line 1)
    assert got == {3: "wrong_column_count", 7: "wrong_column_count", 5: "missing_identity", 10: "missing_identity"}
    reads = [p["rows_read"] for p in seen]
    assert len(reads) >= 4 and reads == sorted(reads) and seen[-1]["status"] == "completed"


def test_invalid_utf8_is_quarantined_and_latin1_can_be_declared(runtime: Runtime, tmp_path: Path) -> None:
    mapping = {"type": "identify", "user_id": "customer_id", "traits": {"name": "name", "city": "city"}, "row_key": ["customer_id"]}
    job = run_import(runtime, DATA / "latin1_customers.csv", source="crm", mapping=mapping)
    assert (job.rows_loaded, job.rows_failed) == (1, 1)
    (f,) = failed(runtime)
    assert f["reason"] == "invalid_encoding" and f["row_number"] == 2 and "encoding" in f["message"] and "latin-1" in f["message"]
    job = run_import(runtime, DATA / "latin1_customers.csv", source="crm-latin", mapping={**mapping, "encoding": "latin-1"})
    assert (job.rows_loaded, job.rows_failed) == (2, 0)
    traits = rows(runtime, "SELECT traits FROM events WHERE source = 'crm-latin' AND user_id = 'c-1'")[0]["traits"]
    assert json.loads(traits) == {"name": tok(runtime, "name", "Café Owner"), "city": "Zürich"}  # non-ASCII: the Python path


def test_missing_column_is_an_error_before_anything_is_written(runtime: Runtime, tmp_path: Path) -> None:
    f = write_orders(tmp_path / "orders.csv", "o1,c1,a@x.com,2024-01-02 10:00:00,1\n")
    mapping = {**TRACK, "user_id": "customerid"}
    with pytest.raises(ImportError_) as info:
        run_import(runtime, f, source="shop", mapping=mapping)
    err = info.value
    assert err.field == "user_id" and err.http_status == 400
    assert "'customerid'" in err.message and "order_id, customer_id, email, ordered_at, amount" in err.message
    assert "Did you mean 'customer_id'?" in err.message
    assert rows(runtime, "SELECT count(*) AS n FROM imports")[0]["n"] == 0
    assert not runtime.settings.raw_files_dir.exists() or not any(runtime.settings.raw_files_dir.iterdir())
    with pytest.raises(ImportError_, match="does not exist"):
        run_import(runtime, tmp_path / "nope.csv", source="shop", mapping=TRACK)


def test_jsonl_track_with_event_names_from_a_column(runtime: Runtime, tmp_path: Path) -> None:
    f = tmp_path / "events.jsonl"
    lines = [
        {"id": 1, "visitor": "v1", "kind": "Viewed", "at": 1704189600, "price": 9.5, "tags": ["a", "b"]},
        {"id": 2, "visitor": "v2", "kind": "Bought", "at": 1704189601, "price": 20},
        None,  # a blank line
        "not json at all",
        {"id": 4, "visitor": "v4", "kind": "", "at": 1704189602},
        {"id": 5, "visitor": "v5", "kind": "Viewed", "at": "soon"},
    ]
    f.write_text("\n".join("" if x is None else x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    mapping = validate_mapping({
        "type": "track", "event": {"column": "kind"}, "anonymous_id": "visitor", "row_key": ["id"],
        "timestamp": {"column": "at", "format": "epoch_s"}, "properties": {"price": "price", "tags": "tags"},
    })
    job = run_import(runtime, f, source="app", mapping=mapping)
    assert (job.rows_read, job.rows_loaded, job.rows_failed) == (5, 2, 3)
    ev = rows(runtime, "SELECT event, anonymous_id, properties, timestamp FROM events ORDER BY anonymous_id")
    assert [e["event"] for e in ev] == ["Viewed", "Bought"]
    assert json.loads(ev[0]["properties"]) == {"price": 9.5, "tags": ["a", "b"]}  # JSON values keep their types
    assert ev[0]["timestamp"].isoformat() == "2024-01-02T10:00:00+00:00"
    got = {r["row_number"]: r["reason"] for r in failed(runtime)}
    assert got == {4: "invalid_json", 5: "missing_event", 6: "invalid_timestamp"}
    again = run_import(runtime, f, source="app", mapping=mapping)
    assert (again.rows_loaded, again.rows_duplicate, again.rows_failed) == (0, 5, 0)


def test_parquet_identify_with_native_types(runtime: Runtime, tmp_path: Path) -> None:
    f = tmp_path / "people.parquet"
    pq.write_table(pa.table({
        "uid": pa.array([10, 11, None, 13], pa.int64()),
        "email": ["a@x.com", "b@x.com", "c@x.com", "d@x.com"],
        "score": [1.5, 2.0, 3.0, None],
        "vip": [True, False, True, None],
        "address": [{"city": "Oslo"}, {"city": "Rome"}, None, None],
    }), f, row_group_size=2)
    mapping = {"type": "identify", "user_id": "uid", "email": "email",
               "traits": {"score": "score", "vip": "vip", "address": "address"}, "row_key": ["email"]}
    seen: list[dict[str, Any]] = []
    job = run_import(runtime, f, source="warehouse", mapping=mapping, progress=seen.append)
    assert (job.rows_read, job.rows_loaded, job.rows_failed) == (4, 3, 1)
    assert seen[0]["rows_total"] == 4
    ev = rows(runtime, "SELECT user_id, traits FROM events ORDER BY user_id")
    assert ev[0]["user_id"] == "10"
    assert json.loads(ev[0]["traits"]) == {"score": 1.5, "vip": True, "address": tok(runtime, "address", {"city": "Oslo"}),
                                           "email": tok(runtime, "email", "a@x.com")}
    (bad,) = failed(runtime)
    assert (bad["reason"], bad["row_number"]) == ("missing_identity", 3)
    assert run_import(runtime, f, source="warehouse", mapping=mapping).rows_duplicate == 4
