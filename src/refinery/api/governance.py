"""Admin API for governance: API tokens (admin only) and the audit log.

Thin routes over `refinery.governance`; token changes and their audit rows commit together in the writer.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from refinery.api.auth import current_principal, require
from refinery.governance import audit
from refinery.governance.tokens import expiry, store_for
from refinery.runtime import Runtime


class TokenCreate(BaseModel):
    name: str = Field(description="A name to recognise the token by, e.g. 'jane-analyst'.")
    role: str = Field(description="admin, privacy_officer, marketer or analyst.")
    sources: list[str] | None = Field(None, description="Limit the token to these sources (default: every source).")
    expires: str | None = Field(None, description="Lifetime such as '30d', '12h' or 'never' (default: the token_default_expiry setting).")


def router(runtime: Runtime) -> APIRouter:
    r = APIRouter(tags=["governance"])
    tokens = store_for(runtime)

    @r.get("/api/tokens", dependencies=[Depends(require("tokens:read"))])
    def list_tokens(all: bool = False) -> dict[str, Any]:  # noqa: A002 - the query parameter's name
        return {"tokens": [t.to_dict() for t in tokens.list(include_inactive=all)]}

    @r.post("/api/tokens", dependencies=[Depends(require("tokens:write"))], status_code=201)
    def create_token(body: TokenCreate, request: Request) -> dict[str, Any]:
        actor, lifetime = current_principal(request), expiry(body.expires, runtime.settings)
        token, secret = runtime.writer.call(
            lambda e: tokens.create(e, actor, body.name, body.role, sources=body.sources, expires_in=lifetime)
        )
        return {**token.to_dict(), "token": secret}

    @r.delete("/api/tokens/{ref}", dependencies=[Depends(require("tokens:write"))])
    def revoke_token(ref: str, request: Request) -> dict[str, Any]:
        actor = current_principal(request)
        return runtime.writer.call(lambda e: tokens.revoke(e, actor, ref)).to_dict()

    @r.get("/api/audit", dependencies=[Depends(require("audit:read"))])
    def list_audit(
        limit: int = Query(100, ge=1, le=10_000), after: int | None = None,
        action: str | None = None, actor: str | None = None,
    ) -> dict[str, Any]:
        rows = audit.entries(runtime.engine, limit=limit, after=after, action=action, actor=actor)
        return {"entries": [e.to_dict() for e in rows]}

    @r.get("/api/audit/verify", dependencies=[Depends(require("audit:read"))])
    def verify_audit(expect: str | None = Query(None, description="A head noted earlier, as SEQ:HASH.")) -> dict[str, Any]:
        return audit.verify(runtime.engine, expect=audit.parse_head(expect) if expect else None).to_dict()

    return r
