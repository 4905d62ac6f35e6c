"""Admin API for undoing and planning identity resolution: overrides (remove an identifier, remove an
edge, split a profile; list; revoke) and the dry run of changed rules.

Writes go through the writer and re-resolve in the same transaction (resolution, then profiles);
reads use the reader cursor. `POST /api/identity/resolve` itself lives in `api/profiles.py`.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from refinery.api.auth import require
from refinery.identity import overrides as ov
from refinery.identity.plan import plan
from refinery.identity.rules import parse_rules, rules_from_settings, thresholds_from_settings
from refinery.profiles.build import resolve_and_build
from refinery.profiles.policy import TraitPolicy
from refinery.runtime import Runtime

#: Who the admin API records as the actor of an override (one admin token today).
API_ACTOR = "api:admin"


class OverrideCreate(BaseModel):
    kind: Literal["remove_identifier", "remove_edge", "split"]
    identifiers: list[str] = Field(description="type:value each: the identifier, the edge's two ends, or the side to split off.")
    profile: str | None = Field(None, description="split: the profile to split (default: the profile of the identifiers).")
    reason: str | None = Field(None, description="A note kept with the override.")


class PlanRequest(BaseModel):
    rules: dict[str, Any] | None = Field(None, description="A rules document (the YAML file's content as JSON); none: the rules in force.")
    examples: int = Field(5, ge=0, le=100)


def router(runtime: Runtime) -> APIRouter:
    r = APIRouter(tags=["identity"])
    read_dep = Depends(require("profiles:read"))
    admin = Depends(require("admin"))

    def rules() -> Any:
        return rules_from_settings(runtime.settings)

    def then_resolve(e: Any) -> dict[str, Any]:
        return resolve_and_build(e, rules(), TraitPolicy.from_settings(runtime.settings))

    @r.post("/api/identity/overrides", dependencies=[admin], status_code=201)
    def post_override(body: OverrideCreate) -> dict[str, Any]:
        rs = rules()

        def work(e: Any) -> dict[str, Any]:
            o = ov.create(e, rs, body.kind, body.identifiers, profile=body.profile, reason=body.reason, actor=API_ACTOR)
            return {"override": o.to_dict(), "resolution": then_resolve(e)}

        return runtime.writer.call(work)

    @r.get("/api/identity/overrides", dependencies=[read_dep])
    def get_overrides(all: bool = Query(False, description="Include revoked overrides.")) -> dict[str, Any]:  # noqa: A002
        found = ov.list_overrides(runtime.engine, include_revoked=all, cursor=runtime.engine.reader())
        return {"overrides": [o.to_dict() for o in found]}

    @r.get("/api/identity/overrides/{override_id}", dependencies=[read_dep])
    def get_override(override_id: str) -> dict[str, Any]:
        return ov.get(runtime.engine, override_id, cursor=runtime.engine.reader()).to_dict()

    @r.post("/api/identity/overrides/{override_id}/revoke", dependencies=[admin])
    def post_revoke(override_id: str) -> dict[str, Any]:
        def work(e: Any) -> dict[str, Any]:
            o = ov.revoke(e, override_id, actor=API_ACTOR)
            return {"override": o.to_dict(), "resolution": then_resolve(e)}

        return runtime.writer.call(work)

    @r.post("/api/identity/plan", dependencies=[admin])
    def post_plan(body: PlanRequest) -> dict[str, Any]:
        current = rules()
        proposed = parse_rules(body.rules, thresholds_from_settings(runtime.settings)) if body.rules is not None else current
        return runtime.writer.call(lambda e: plan(e, current, proposed, examples=body.examples))

    return r
