"""Admin API for lineage: `GET /api/lineage?target=TABLE|PROFILE` (thin route over `refinery.governance.lineage`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from refinery.api.auth import record_for, require
from refinery.governance import lineage
from refinery.identity import rules_from_settings
from refinery.profiles import read
from refinery.runtime import Runtime


def router(runtime: Runtime) -> APIRouter:
    r = APIRouter(tags=["lineage"])

    @r.get("/api/lineage", dependencies=[Depends(require("lineage:read"))])
    def get_lineage(
        request: Request,
        target: str = Query(..., description="A table (e.g. profiles), a profile id (prof_...) or one of a profile's identifiers (type:value)."),
        limit: int = Query(50, ge=1, le=10_000, description="Most runs (for a table) or messages (for a profile) listed."),
    ) -> dict[str, Any]:
        result = lineage.trail(runtime.settings, runtime.engine, target, limit=limit)
        if result["kind"] == "profile":  # which profile an identifier belongs to: audited like a lookup, without the value
            by = "profile_id" if target.startswith("prof_") else read.parse_identifier(target, rules_from_settings(runtime.settings))[0] or "any"
            record_for(request, "lineage.read", f"profile:{result['profile_id']}", {"by": by, "events": result["total_events"]})
        return result

    return r
