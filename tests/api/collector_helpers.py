"""Helpers for the collector's end-to-end tests: a server shared by one test module, and queries.

Starting a server takes about two seconds, so most collector tests share one per module and keep
apart by using unique messageIds and user ids (`uid()`); tests that change server-wide state
(disabling a source, rate limits) create a source of their own.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlglot import exp

from support import WRITE_KEY, Server, start_server


def shared_server_fixture() -> Any:
    """A module-scoped `server` with source 'web' (write key WRITE_KEY)."""

    @pytest.fixture(scope="module")
    def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
        data_dir: Path = tmp_path_factory.mktemp("collector") / "data"
        data_dir.mkdir()
        s = start_server(data_dir)
        try:
            with s.api() as api:
                r = api.post("/api/sources", json={"name": "web", "write_key": WRITE_KEY})
                assert r.status_code == 201, r.text
            yield s
        finally:
            s.stop()

    return srv


def uid(prefix: str = "m") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def basic(key: str, colon: bool = True) -> dict[str, str]:
    user = f"{key}:" if colon else key
    return {"Authorization": "Basic " + base64.b64encode(user.encode()).decode()}


def select(server: Server, table: str, columns: str = "*", **where: str) -> list[dict[str, Any]]:
    """Rows of `table` whose columns equal the given values (built with sqlglot literals)."""
    q = exp.select(*[c.strip() for c in columns.split(",")]).from_(table)
    for column, value in where.items():
        q = q.where(exp.column(column).eq(exp.Literal.string(value)))
    return query(server, q.sql("duckdb"))


def query(server: Server, sql: str) -> list[dict[str, Any]]:
    with server.api() as api:
        r = api.post("/api/query", json={"sql": sql})
    assert r.status_code == 200, r.text
    body = r.json()
    return [dict(zip(body["columns"], row, strict=True)) for row in body["rows"]]


def events_with(server: Server, message_id: str, columns: str = "*") -> list[dict[str, Any]]:
    return select(server, "events", columns, message_id=message_id)


def failed_with(server: Server, message_id: str) -> list[dict[str, Any]]:
    """The failed zone's rows of a message id, payloads unsealed by the server."""
    return [{k: r[k] for k in ("reason", "field", "message", "stage")} | {"payload": _text(r["payload"])}
            for r in _payloads(server, message_id)["failed"]]


def raw_with(server: Server, message_id: str) -> list[dict[str, Any]]:
    """The raw zone's rows of a message id, unsealed by the server (payloads are sealed at rest)."""
    return [{"payload": _text(x["payload"]), "envelope": _text(x["envelope"])} for x in _payloads(server, message_id)["raw"]]


def _payloads(server: Server, message_id: str) -> dict[str, Any]:
    with server.api() as api:
        r = api.get("/api/events/payloads", params={"message_id": message_id})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _text(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def assert_healthy(server: Server) -> None:
    r = httpx.get(server.url + "/health", timeout=10)
    assert r.status_code == 200, r.text
    assert server.proc.poll() is None, "the server process exited"


def post(server: Server, path: str, body: Any = None, *, headers: dict[str, str] | None = None, content: bytes | None = None) -> httpx.Response:
    h = dict(server.basic if headers is None else headers)
    if content is not None:
        return httpx.post(server.url + path, content=content, headers=h, timeout=30)
    return httpx.post(server.url + path, json=body, headers=h, timeout=30)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0.0 when absent) in exposition `text`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric_name, _, label_text = head.partition("{")
        if metric_name != name:
            continue
        found = dict(
            part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part
        )
        found = {k: v.strip('"') for k, v in found.items()}
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def metrics_text(server: Server) -> str:
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200
    return r.text
