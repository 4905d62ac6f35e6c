"""Lineage emission on the real file and HTTP transports: START then COMPLETE (or FAIL) per run, as
OpenLineage run events; a job's own error still raises; an unreachable endpoint never fails a job."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from refinery.errors import QueryError
from refinery.governance import lineage
from refinery.settings import Settings
from support import free_port


def events_of(settings: Settings) -> list[dict[str, Any]]:
    return [json.loads(line) for line in settings.lineage_path.read_text("utf-8").splitlines()]


def check_run_event(ev: dict[str, Any]) -> None:
    """The fields the OpenLineage 2-0-2 RunEvent schema requires, with the types it gives them."""
    assert ev["schemaURL"].startswith("https://openlineage.io/spec/2-0-2/OpenLineage.json")
    assert ev["eventType"] in ("START", "COMPLETE", "FAIL")
    assert datetime.fromisoformat(ev["eventTime"]).tzinfo is not None
    assert ev["producer"].startswith("https://")
    uuid.UUID(ev["run"]["runId"])
    assert ev["job"]["namespace"] == "refinery" and ev["job"]["name"]
    for ds in (*ev["inputs"], *ev["outputs"]):
        assert set(ds) >= {"namespace", "name"}


def test_a_job_emits_start_then_complete_with_inputs_outputs_and_counts(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    with lineage.run(settings, job="identity.resolve", inputs=["events", "file:/srv/crm.csv"], outputs=["identities", "profiles"]) as run:
        run.count("profiles", 42)
        run.note(resolution_id="res_1")
    start, complete = events_of(settings)
    for ev in (start, complete):
        check_run_event(ev)
        assert ev["run"]["runId"] == run.run_id and ev["job"]["name"] == "identity.resolve"
        assert [(d["namespace"], d["name"]) for d in ev["inputs"]] == [("refinery", "events"), ("file", "/srv/crm.csv")]
        assert [d["name"] for d in ev["outputs"]] == ["identities", "profiles"]
    assert (start["eventType"], complete["eventType"]) == ("START", "COMPLETE")
    assert start["outputs"][1]["outputFacets"] == {}  # counts come with the end, not the start
    assert complete["outputs"][1]["outputFacets"]["outputStatistics"]["rowCount"] == 42
    assert "outputStatistics" not in complete["outputs"][0]["outputFacets"]  # not counted: no facet
    assert complete["run"]["facets"]["refinery"]["details"] == {"resolution_id": "res_1"}
    assert settings.lineage_path == tmp_path / "data" / "lineage" / "events.jsonl"

    runs = lineage.read_runs(settings.lineage_path)
    assert [(r["job"], r["state"], r["counts"]) for r in runs] == [("identity.resolve", "COMPLETE", {"profiles": 42})]
    assert lineage.table_trail(settings, "profiles")["runs"][0]["run_id"] == run.run_id
    assert lineage.table_trail(settings, "consent_log")["runs"] == []


def test_a_failing_job_emits_fail_and_still_raises_its_own_error(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    boom = QueryError("No identifier 'email:jane@example.com' has been seen.", fix="Check it.")
    with pytest.raises(QueryError) as raised, lineage.run(settings, job="identity.match", inputs=["events"], outputs=["identity_links"]):
        raise boom
    assert raised.value is boom
    start, fail = events_of(settings)
    check_run_event(fail)
    assert (start["eventType"], fail["eventType"]) == ("START", "FAIL")
    message = fail["run"]["facets"]["errorMessage"]["message"]
    assert message.startswith("QueryError: No identifier") and "jane@example.com" not in message and "[email]" in message

    # errors that are not ours (a database error may quote a value) carry only their type
    with pytest.raises(ValueError), lineage.run(settings, job="j", inputs=[], outputs=[]):
        raise ValueError("could not convert 'Jane Doe'")
    assert events_of(settings)[-1]["run"]["facets"]["errorMessage"]["message"] == "ValueError"
    assert [r["state"] for r in lineage.read_runs(settings.lineage_path)] == ["FAIL", "FAIL"]


def test_a_job_that_records_its_failure_ends_fail_without_raising(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    with lineage.run(settings, job="ingest.import", inputs=[], outputs=["events"]) as run:
        run.failed("Import imp_1 failed; its error is recorded in imports.error.")
    assert events_of(settings)[-1]["eventType"] == "FAIL"


def test_an_unreachable_endpoint_does_not_fail_the_job(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(data_dir=tmp_path / "data", lineage_url=f"http://127.0.0.1:{free_port()}")  # nothing listens
    done = []
    with lineage.run(settings, job="identity.resolve", inputs=["events"], outputs=["profiles"]):
        done.append(True)
    assert done == [True]
    assert [e["eventType"] for e in events_of(settings)] == ["START", "COMPLETE"]  # the file still has them
    assert "did not reach the http target" in caplog.text


def test_an_unwritable_file_does_not_fail_the_job(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    settings = Settings(data_dir=tmp_path / "data", lineage_file=blocker / "events.jsonl")
    with lineage.run(settings, job="j", inputs=[], outputs=[]) as run:
        run.count("x", 1)


class _Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, Any]]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, json.loads(body)))
        self.send_response(201)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[tuple[str, list[tuple[str, dict[str, Any]]]]]:
    received: list[tuple[str, dict[str, Any]]] = []
    handler = type("Handler", (_Collector,), {"received": received})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", received
    finally:
        srv.shutdown()
        srv.server_close()


def test_events_reach_an_http_endpoint(tmp_path: Path, endpoint: tuple[str, list[tuple[str, dict[str, Any]]]]) -> None:
    url, received = endpoint
    settings = Settings(data_dir=tmp_path / "data", lineage_url=url)
    with lineage.run(settings, job="governance.retention", inputs=["events"], outputs=["events"]) as run:
        pass
    assert [(path, ev["eventType"], ev["run"]["runId"]) for path, ev in received] == [
        ("/api/v1/lineage", "START", run.run_id), ("/api/v1/lineage", "COMPLETE", run.run_id)]
    for _, ev in received:
        check_run_event(ev)
