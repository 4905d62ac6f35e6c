"""Admin API for undoing and planning identity resolution: overrides (remove an identifier, remove an
edge, split a profile; list; revoke) and the dry run of changed rules.

Writes (`identity:write`) go through the writer and re-resolve in the same transaction (resolution,
then profiles), audited in it, inside an `identity.override` lineage run that names the override; the
override records the caller's token name as its actor. Reads show identifier values, so they need
`profiles:read` and `pii:read` and are audited (types and counts only).
`POST /api/identity/resolve` itself lives in `api/profiles.py`.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from refinery.api.auth import current_principal, record_for, require
from refinery.governance import audit, lineage
from refinery.governance.principal import Principal
from refinery.identity import overrides as ov
from refinery.identity.plan import plan
from refinery.identity.rules import parse_rules, rules_from_settings, thresholds_from_settings
from refinery.profiles.build import Refresh
from refinery.runtime import Runtime


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
    read_pii = Depends(require("profiles:read", "pii:read"))
    identity_write = Depends(require("identity:write"))
    plan_dep = Depends(require("identity:write", "pii:read"))

    def rules() -> Any:
        return rules_from_settings(runtime.settings)

    def then_resolve(e: Any) -> dict[str, Any]:
        return Refresh.from_settings(runtime.settings)(e)

    def changed(e: Any, actor: Principal, action: str, o: ov.Override) -> dict[str, Any]:
        result = {"override": o.to_dict(), "resolution": then_resolve(e)}
        audit.record(e, actor, action, f"identity_override:{o.override_id}",
                     {"kind": o.kind, "identifier_types": sorted({i["type"] for i in o.identifiers}),
                      **audit.counts(result["resolution"])})
        return result

    def with_lineage(work: Any, action: str) -> dict[str, Any]:
        """The override's writer call inside an `identity.override` lineage run (emitted outside the writer)."""
        with lineage.run(runtime.settings, **lineage.OVERRIDE) as lr:
            result: dict[str, Any] = runtime.writer.call(work)
            lr.record_override(result, action)
        return result

    @r.post("/api/identity/overrides", dependencies=[identity_write], status_code=201)
    def post_override(body: OverrideCreate, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        rs = rules()

        def work(e: Any) -> dict[str, Any]:
            o = ov.create(e, rs, body.kind, body.identifiers, profile=body.profile, reason=body.reason, actor=actor.name)
            return changed(e, actor, "identity.override", o)

        return with_lineage(work, "create")

    @r.get("/api/identity/overrides", dependencies=[read_pii])
    def get_overrides(request: Request, all: bool = Query(False, description="Include revoked overrides.")) -> dict[str, Any]:  # noqa: A002
        found = ov.list_overrides(runtime.engine, include_revoked=all, cursor=runtime.engine.reader())
        record_for(request, "identity.overrides_read", None, {"rows": len(found)})
        return {"overrides": [o.to_dict() for o in found]}

    @r.get("/api/identity/overrides/{override_id}", dependencies=[read_pii])
    def get_override(request: Request, override_id: str) -> dict[str, Any]:
        o = ov.get(runtime.engine, override_id, cursor=runtime.engine.reader())
        record_for(request, "identity.overrides_read", f"identity_override:{override_id}", {"rows": 1})
        return o.to_dict()

    @r.post("/api/identity/overrides/{override_id}/revoke", dependencies=[identity_write])
    def post_revoke(override_id: str, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return with_lineage(lambda e: changed(e, actor, "identity.override_revoke", ov.revoke(e, override_id, actor=actor.name)), "revoke")

    @r.post("/api/identity/plan", dependencies=[plan_dep])
    def post_plan(request: Request, body: PlanRequest) -> dict[str, Any]:
        current = rules()
        proposed = parse_rules(body.rules, thresholds_from_settings(runtime.settings)) if body.rules is not None else current
        result = runtime.writer.call(lambda e: plan(e, current, proposed, examples=body.examples))
        record_for(request, "identity.plan", None, {"merges": result["merges"], "splits": result["splits"]})
        return result

    return r
