"""Admin API for data subject requests: export and erasure, with their receipts.

`POST /api/privacy/requests` needs `privacy:write`; an export also needs `pii:read` (the
document holds the person's values in clear). Listing and reading requests needs
`privacy:read`; the export document comes back only with `pii:read`. Every request is audited by
the request id and the identifier's type, never its value.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from refinery.api.auth import current_principal, record_for, require
from refinery.governance.principal import Principal
from refinery.privacy import requests
from refinery.runtime import Runtime


class SubjectRequest(BaseModel):
    kind: Literal["export", "erase"] = Field(description="export: everything held about the person; erase: forget them everywhere.")
    identifier: str = Field(description="type:value (email:jane@example.com, user_id:u-1042, phone:+4420..., anonymous_id:...) or a bare value.")


def router(runtime: Runtime) -> APIRouter:
    r = APIRouter(tags=["privacy"])

    @r.post("/api/privacy/requests", dependencies=[Depends(require("privacy:write"))], status_code=201)
    async def post_request(body: SubjectRequest, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        if body.kind == "export":
            actor.check(["pii:read"])  # the document holds personal values in clear
            return await run_in_threadpool(requests.export, runtime, body.identifier, actor)
        return await run_in_threadpool(requests.erase, runtime, body.identifier, actor)

    @r.get("/api/privacy/requests", dependencies=[Depends(require("privacy:read"))])
    def list_requests(
        request: Request,
        status: str | None = Query(None, description="Only requests in this status: " + ", ".join(requests.STATUSES) + "."),
        limit: int = Query(100, ge=1, le=10_000),
    ) -> dict[str, Any]:
        rows = requests.list_requests(runtime.engine, limit=limit, status=status)
        record_for(request, "privacy.requests_read", None, {"rows": len(rows)})
        return {"requests": rows}

    @r.get("/api/privacy/requests/{request_id}", dependencies=[Depends(require("privacy:read"))])
    def get_request(request: Request, request_id: str) -> dict[str, Any]:
        actor = current_principal(request)
        with_document = actor.can("pii:read")
        body = requests.get(runtime, request_id, with_document=with_document)
        record_for(request, "privacy.request_read", f"privacy_request:{request_id}",
                   {"document": "document" in body and body["document"] is not None})
        if not with_document and body.get("document_available"):
            body["document_note"] = "The export document needs pii:read."
        return body

    return r

