"""Admin API for retention: run it (or a dry run), list the runs, read and set the per-source policy.

Thin routes over `refinery.governance.retention`. A run is audited with its counts in the
transaction that records it; an override is audited in its own.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from refinery.api.auth import current_principal, from_path, require
from refinery.governance import audit, retention
from refinery.governance.principal import Principal
from refinery.runtime import Runtime


class OverrideRequest(BaseModel):
    zone: str = Field(description=f"One of: {', '.join(retention.ZONES)}.")
    days: int | None = Field(description="Days to keep this source's rows in the zone; 0 keeps them forever; null removes the override.")


def router(runtime: Runtime) -> APIRouter:
    r = APIRouter(tags=["retention"])

    @r.post("/api/retention/run", dependencies=[Depends(require("retention:run"))])
    def post_run(dry_run: bool = False, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return retention.run(runtime.engine, runtime.writer, runtime.settings, actor, trigger="api", dry_run=dry_run).to_dict()

    @r.get("/api/retention/runs", dependencies=[Depends(require("retention:read"))])
    def get_runs(limit: int = Query(50, ge=1, le=10_000)) -> dict[str, Any]:
        return {"runs": retention.runs(runtime.engine, limit=limit)}

    @r.get("/api/retention/policy", dependencies=[Depends(require("retention:read"))])
    def get_policy() -> dict[str, Any]:
        return retention.Policy.load(runtime.engine, runtime.settings, cursor=runtime.engine.reader()).to_dict()

    @r.put("/api/retention/sources/{name}", dependencies=[Depends(require("config:write", sources=from_path("name")))])
    def put_override(name: str, body: OverrideRequest, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        known = [s.name for s in runtime.sources.list()]

        def change(e: Any) -> None:
            retention.set_override(e, name, body.zone, body.days, actor=actor.name, known_sources=known)
            audit.record(e, actor, "retention.set", f"source:{name}", {"zone": body.zone, "days": body.days})

        runtime.writer.call(change)
        return retention.Policy.load(runtime.engine, runtime.settings, cursor=runtime.engine.reader()).to_dict()

    return r
