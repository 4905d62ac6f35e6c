"""Helpers for the subject-request tests: send with the official Segment SDK, call the admin API,
and scan a stopped server's data directory (every table's every column, every file) for values."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import duckdb
import httpx

from support import Server


def sdk(server: Server, write_key: str | None = None) -> Any:
    from segment.analytics import Client

    errors: list[Exception] = []
    client = Client(write_key=write_key or server.write_key, host=server.url, on_error=lambda e, batch: errors.append(e),
                    upload_interval=0.05, upload_size=50, sync_mode=False)
    client.errors = errors  # type: ignore[attr-defined]
    return client


def resolve(server: Server) -> dict[str, Any]:
    with server.api() as api:
        r = api.post("/api/identity/resolve", timeout=120)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]


def request(server: Server, kind: str, identifier: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or server.admin_token}"}
    return httpx.post(server.url + "/api/privacy/requests", json={"kind": kind, "identifier": identifier}, headers=headers, timeout=120)


def wait_for(server: Server, sql: str, expected: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    n = -1
    while time.monotonic() < deadline:
        with server.api() as api:
            r = api.post("/api/query", json={"sql": sql})
            assert r.status_code == 200, r.text
            n = r.json()["rows"][0][0]
        if n >= expected:
            return
        time.sleep(0.1)
    raise AssertionError(f"{sql}: {n} rows, expected {expected}")


def table_hits(db: Path, needles: Iterable[str], words: Iterable[str] = ()) -> dict[str, list[str]]:
    """needle -> ['table.column', ...] where some row's value (as text, case-insensitive) contains it;
    `words` (names) are matched as whole words, case-sensitively."""
    wanted = [n for n in needles if n]
    names = [w for w in words if w]
    hits: dict[str, list[str]] = {}
    con = duckdb.connect(str(db), read_only=True)
    try:
        tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()]
        for table in tables:
            cols = con.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ?", [table]).fetchall()
            for col, kind in cols:
                for n in wanted:
                    q = f'SELECT count(*) FROM "{table}" WHERE contains(lower(CAST("{col}" AS VARCHAR)), lower(?))'  # noqa: S608 - catalog names
                    if con.execute(q, [n]).fetchone()[0]:  # type: ignore[index]
                        hits.setdefault(n, []).append(f"{table}.{col}")
                for w in names if kind != "BLOB" else ():  # ciphertext: random bytes, long needles only
                    q = f'SELECT count(*) FROM "{table}" WHERE regexp_matches(CAST("{col}" AS VARCHAR), ?)'  # noqa: S608
                    if con.execute(q, [r"\b" + w + r"\b"]).fetchone()[0]:  # type: ignore[index]
                        hits.setdefault(w, []).append(f"{table}.{col}")
    finally:
        con.close()
    return hits


def file_hits(folder: Path, needles: Iterable[str], words: Iterable[str] = ()) -> dict[str, list[str]]:
    """needle -> files under `folder` whose bytes contain it (as UTF-8, case-insensitive); `words`
    (names) as whole words, case-sensitively."""
    wanted = [n for n in needles if n]
    patterns = {w: re.compile(rb"\b" + re.escape(w.encode()) + rb"\b") for w in words if w}
    hits: dict[str, list[str]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        data = raw.lower()
        for n in wanted:
            if n.lower().encode() in data:
                hits.setdefault(n, []).append(str(path.relative_to(folder)))
        for w, pattern in patterns.items():
            if pattern.search(raw):
                hits.setdefault(w, []).append(str(path.relative_to(folder)))
    return hits
