"""Admin API for identity and profiles: resolve, look up, timeline, explain, persons by policy.

Thin routes over `refinery.identity` and `refinery.profiles`; reads use the reader cursor, the one
write (resolution) goes through the writer.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from refinery.api.auth import require
from refinery.identity import rules_from_settings
from refinery.profiles import explain as explain_mod
from refinery.profiles import read
from refinery.profiles.build import resolve_and_build
from refinery.profiles.persons import IdentityPolicy, persons, summary
from refinery.profiles.policy import TraitPolicy
from refinery.runtime import Runtime


def router(runtime: Runtime) -> APIRouter:
    r = APIRouter(tags=["profiles"])
    read_dep = Depends(require("profiles:read"))
    admin = Depends(require("admin"))

    def rules() -> Any:
        return rules_from_settings(runtime.settings)

    @r.post("/api/identity/resolve", dependencies=[admin])
    def post_resolve() -> dict[str, Any]:
        rs, policy = rules(), TraitPolicy.from_settings(runtime.settings)
        return runtime.writer.call(lambda e: resolve_and_build(e, rs, policy))

    @r.post("/api/identity/match", dependencies=[admin])
    def post_match(source: str | None = None) -> dict[str, Any]:
        from refinery.identity.matching.run import run_matching

        return run_matching(runtime.engine, runtime.writer, runtime.settings, source=source)

    @r.get("/api/identity/identifiers", dependencies=[read_dep])
    def get_identifiers(identifier: str = Query(..., description="type:value, or a bare value of any type")) -> dict[str, Any]:
        return {"identifiers": read.find(runtime.engine, identifier, rules())}

    @r.get("/api/identity/explain", dependencies=[read_dep])
    def get_explain(identifier: str = Query(..., description="type:value, e.g. email:jane@example.com")) -> dict[str, Any]:
        return explain_mod.explain(runtime.engine, identifier, rules())

    @r.get("/api/persons", dependencies=[read_dep])
    def get_persons(mode: str = "probabilistic", threshold: float = 0.9) -> dict[str, Any]:
        policy = IdentityPolicy(mode, threshold)
        return summary(persons(runtime.engine, policy, rules()), policy)

    @r.get("/api/profiles", dependencies=[read_dep])
    def lookup(identifier: str = Query(..., description="type:value, e.g. user_id:u-123")) -> dict[str, Any]:
        return read.lookup(runtime.engine, identifier, rules())

    @r.get("/api/profiles/{profile_id}", dependencies=[read_dep])
    def get_profile(profile_id: str) -> dict[str, Any]:
        return read.get(runtime.engine, profile_id)

    @r.get("/api/profiles/{profile_id}/events", dependencies=[read_dep])
    def get_events(profile_id: str, limit: int = Query(100, ge=1, le=10_000), before: str | None = None) -> dict[str, Any]:
        return {"events": read.timeline(runtime.engine, profile_id, limit=limit, before=before)}

    return r
