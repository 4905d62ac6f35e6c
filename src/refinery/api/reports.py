"""Admin API for aggregate reports: the event catalog and read-only SQL, k-anonymous for callers
without `pii:read`.

Callers with `pii:read` get the full catalog and run any read-only query (`storage.query.run_query`).
Callers without it get the catalog without the events and keys seen from fewer than
`min_group_size` people, and may run only aggregate queries over the person-keyed tables, whose
small groups are left out (`storage.query.run_aggregate_query`); both answers say how many groups
were suppressed. See docs/decisions/0017-k-anonymity.md.

These routes replace `GET /api/catalog` and `POST /api/query` in `api/app.py` once it mounts this
router (`app.include_router(reports.router(runtime))`) in place of its own two.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from refinery.api.auth import current_principal, from_query, record_for, require
from refinery.governance.objects import queried_tables
from refinery.ingest import catalog
from refinery.runtime import Runtime
from refinery.storage.query import run_aggregate_query, run_query


class QueryRequest(BaseModel):
    sql: str = Field(description="One read-only SELECT. Without pii:read: one aggregate SELECT ... GROUP BY over one person-keyed table.")
    limit: int | None = Field(10_000, ge=1)


def router(runtime: Runtime) -> APIRouter:
    r = APIRouter(tags=["events"])

    @r.get("/api/catalog", dependencies=[Depends(require("events:read", sources=from_query()))])
    def get_catalog(request: Request, source: str | None = None) -> dict[str, Any]:
        k = None if current_principal(request).can("pii:read") else runtime.settings.min_group_size
        return catalog.build(runtime.engine, source=source, min_group_size=k)

    @r.post("/api/query", dependencies=[Depends(require("query:read"))])
    def post_query(body: QueryRequest, request: Request) -> dict[str, Any]:
        timeout = runtime.settings.query_timeout_seconds
        if current_principal(request).can("pii:read"):
            result = run_query(runtime.engine, body.sql, limit=body.limit, timeout=timeout)
        else:
            result = run_aggregate_query(runtime.engine, body.sql, min_group_size=runtime.settings.min_group_size,
                                         limit=body.limit, timeout=timeout)
        details: dict[str, Any] = {"tables": queried_tables(body.sql, runtime.engine.dialect), "rows": len(result.rows)}
        if result.suppressed_groups is not None:
            details.update(aggregate=True, suppressed_groups=result.suppressed_groups)
        record_for(request, "query.run", None, details)
        return result.to_dict()

    return r
