"""Admin API for segments and computed traits: define, preview, run, read members and history, explain.

Thin routes over `refinery.segments.lifecycle`. `segments:read` lists, previews and reads members
(profile ids; every read of members audited), `segments:write` changes definitions and runs
recomputation (audited in the transaction of the change). An explanation shows personal values in
clear only to callers that also hold `pii:read`. See docs/segments.md.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from refinery.api.auth import current_principal, require
from refinery.governance.principal import Principal
from refinery.identity import rules_from_settings
from refinery.runtime import Runtime
from refinery.segments import lifecycle
from refinery.segments.preview import MAX_SAMPLE


class SegmentCreate(BaseModel):
    name: str = Field(description="Lower-case letters, digits, '_' or '-', e.g. 'pricing_visitors'.")
    rule: str = Field(description="The rule, in the segment language (docs/segments.md).")
    description: str | None = None
    run: bool = Field(True, description="Compute the membership right away.")


class SegmentUpdate(BaseModel):
    rule: str | None = Field(None, description="A new rule (a new version is saved).")
    description: str | None = None
    run: bool = Field(True, description="Recompute the membership right away.")


class PreviewRequest(BaseModel):
    rule: str
    sample: int = Field(20, ge=0, le=MAX_SAMPLE)
    as_of: str | None = Field(None, description="Evaluate as of this moment (ISO 8601); default now.")
    name: str | None = Field(None, description="Preview the rule as this segment's new rule (cycles through it are found).")


class RunRequest(BaseModel):
    name: str | None = Field(None, description="One segment; default every live segment.")
    as_of: str | None = Field(None, description="Run as of this moment (not earlier than the segment's last run); default now.")
    force: bool = Field(False, description="Recompute even when nothing the rule reads has changed.")


class TraitDefine(BaseModel):
    name: str
    expression: str = Field(description="e.g. sum(total) of 'Order Completed' in last 365 days")
    description: str | None = None


def router(runtime: Runtime) -> APIRouter:
    r = APIRouter(tags=["segments"])
    read = Depends(require("segments:read"))
    write = Depends(require("segments:write"))
    engine, writer = runtime.engine, runtime.writer

    def rules() -> Any:
        return rules_from_settings(runtime.settings)

    settings = runtime.settings  # lineage of the runs; the trait policy of as-of evaluation

    @r.get("/api/segments", dependencies=[read])
    def list_segments() -> dict[str, Any]:
        return {"segments": lifecycle.list_segments(engine)}

    @r.post("/api/segments", dependencies=[write], status_code=201)
    def create(body: SegmentCreate, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return lifecycle.create(engine, writer, actor, body.name, body.rule, body.description, run=body.run, trigger="api", rules=rules(),
                                settings=settings)

    @r.post("/api/segments/preview", dependencies=[read])
    def preview(body: PreviewRequest, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return lifecycle.run_preview(engine, writer, actor, body.rule, sample=body.sample, as_of=body.as_of, name=body.name, rules=rules(),
                                     settings=settings)

    @r.post("/api/segments/run", dependencies=[write])
    def run(body: RunRequest, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return lifecycle.run(engine, writer, actor, body.name, as_of=body.as_of, force=body.force, trigger="api", rules=rules(),
                             settings=settings)

    @r.get("/api/segments/{name}", dependencies=[read])
    def show(name: str) -> dict[str, Any]:
        return lifecycle.show(engine, name)

    @r.patch("/api/segments/{name}", dependencies=[write])
    def update(name: str, body: SegmentUpdate, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return lifecycle.update(engine, writer, actor, name, body.rule, body.description, run=body.run, rules=rules(),
                                settings=settings)

    @r.delete("/api/segments/{name}", dependencies=[write])
    def delete(name: str, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return lifecycle.delete(writer, actor, name, settings=settings)

    @r.get("/api/segments/{name}/members", dependencies=[read])
    def members(
        name: str,
        actor: Principal = Depends(current_principal),
        as_of: str | None = Query(None, description="A past moment (ISO 8601); default now."),
        source: Literal["history", "evaluated"] = Query("history", description="history: rows open then; evaluated: the rule then in force over events received by then."),
        limit: int = Query(1000, ge=0, le=1_000_000),
    ) -> dict[str, Any]:
        return lifecycle.read_members(engine, writer, actor, name, as_of=as_of, source=source, limit=limit, rules=rules(),
                                      settings=settings)

    @r.get("/api/segments/{name}/history", dependencies=[read])
    def history(name: str, limit: int = Query(50, ge=1, le=10_000)) -> dict[str, Any]:
        return lifecycle.read_history(engine, name, limit)

    @r.get("/api/segments/{name}/explain", dependencies=[read])
    def explain(name: str, profile: str = Query(..., description="A profile id, or an identifier as type:value."),
                as_of: str | None = None, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return lifecycle.explain_profile(engine, writer, actor, name, profile, as_of=as_of, rules=rules(),
                                         settings=settings)

    @r.get("/api/computed-traits", dependencies=[read])
    def list_traits() -> dict[str, Any]:
        return {"computed_traits": lifecycle.list_traits(engine)}

    @r.post("/api/computed-traits", dependencies=[write], status_code=201)
    def define_trait(body: TraitDefine, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return lifecycle.define_trait(writer, actor, body.name, body.expression, body.description)

    @r.post("/api/computed-traits/{name}/compute", dependencies=[write])
    def compute_trait(name: str, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return lifecycle.compute_trait(engine, writer, actor, name, settings=settings)

    @r.delete("/api/computed-traits/{name}", dependencies=[write])
    def delete_trait(name: str, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return lifecycle.delete_trait(writer, actor, name)

    return r
