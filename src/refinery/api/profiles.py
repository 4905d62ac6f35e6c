"""Admin API for identity and profiles: resolve, look up, timeline, explain, persons by policy.

Thin routes over `refinery.identity` and `refinery.profiles`; reads use the reader cursor, the one
write (resolution) goes through the writer.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from refinery.api.auth import current_principal, record_for, require
from refinery.errors import PermissionDenied
from refinery.governance import audit, lineage
from refinery.governance.principal import Principal
from refinery.identity import rules_from_settings
from refinery.privacy.pii import reveal_in, tokenising
from refinery.profiles import explain as explain_mod
from refinery.profiles import read
from refinery.profiles.build import Refresh
from refinery.profiles.persons import IdentityPolicy, persons, summary
from refinery.runtime import Runtime


def router(runtime: Runtime) -> APIRouter:
    r = APIRouter(tags=["profiles"])
    # Profiles and identifiers hold tokens in place of personal values (privacy/tokens.py): any
    # profiles:read role sees them pseudonymised; pii:read also sees the values. Every read is
    # audited (by profile id and identifier type, and whether values were shown).
    read_dep = Depends(require("profiles:read"))
    identity_write = Depends(require("identity:write"))

    def rules() -> Any:
        return rules_from_settings(runtime.settings)

    def kind(identifier: str) -> str:
        return read.parse_identifier(identifier, rules())[0] or "any"

    @r.post("/api/identity/resolve", dependencies=[identity_write])
    def post_resolve(actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        refresh = Refresh.from_settings(runtime.settings)

        def run(e: Any) -> dict[str, Any]:
            result = refresh(e)
            audit.record(e, actor, "identity.resolve", None, audit.counts(result))
            return result

        with lineage.run(runtime.settings, **lineage.RESOLVE) as lr:  # lineage: emitted outside the writer
            result: dict[str, Any] = runtime.writer.call(run)
            lr.record_resolution(result)
        return result

    @r.post("/api/identity/match", dependencies=[identity_write])
    def post_match(request: Request, source: str | None = None) -> dict[str, Any]:
        from refinery.identity.matching.run import run_matching

        result = run_matching(runtime.engine, runtime.writer, runtime.settings, source=source)
        record_for(request, "identity.match", f"source:{source}" if source else None, audit.counts(result))
        return result

    @r.get("/api/identity/identifiers", dependencies=[read_dep])
    def get_identifiers(request: Request, identifier: str = Query(..., description="type:value, or a bare value of any type")) -> dict[str, Any]:
        found = read.find(runtime.engine, identifier, rules())
        return shown(request, "identity.identifiers", None, {"identifier_type": kind(identifier), "matches": len(found),
                                                             "profiles": sorted({f["profile_id"] for f in found if f["profile_id"]})},
                     {"identifiers": found})

    @r.get("/api/identity/explain", dependencies=[read_dep])
    def get_explain(request: Request, identifier: str = Query(..., description="type:value, e.g. email:jane@example.com")) -> dict[str, Any]:
        result = explain_mod.explain(runtime.engine, identifier, rules())
        pid = result.get("profile_id")
        return shown(request, "identity.explain", f"profile:{pid}" if pid else None, {"identifier_type": kind(identifier)}, result)

    @r.get("/api/persons", dependencies=[read_dep])
    def get_persons(request: Request, mode: str = "probabilistic", threshold: float = 0.9) -> dict[str, Any]:
        policy = IdentityPolicy(mode, threshold)
        result = summary(persons(runtime.engine, policy, rules()), policy)
        record_for(request, "persons.read", None, {"mode": mode, "threshold": threshold})
        return result

    @r.get("/api/profiles", dependencies=[read_dep])
    def lookup(request: Request, identifier: str = Query(..., description="type:value, e.g. user_id:u-123")) -> dict[str, Any]:
        profile = read.lookup(runtime.engine, identifier, rules())
        return shown(request, "profiles.lookup", f"profile:{profile['profile_id']}", {"identifier_type": kind(identifier)}, profile)

    @r.get("/api/profiles/{profile_id}", dependencies=[read_dep])
    def get_profile(request: Request, profile_id: str) -> dict[str, Any]:
        profile = read.get(runtime.engine, profile_id)
        return shown(request, "profiles.read", f"profile:{profile['profile_id']}", {"requested_id": profile_id}, profile)

    @r.get("/api/profiles/{profile_id}/events", dependencies=[read_dep])
    def get_events(request: Request, profile_id: str, limit: int = Query(100, ge=1, le=10_000), before: str | None = None) -> dict[str, Any]:
        events = read.timeline(runtime.engine, profile_id, limit=limit, before=before)
        return shown(request, "profiles.events", f"profile:{profile_id}", {"events": len(events)}, {"events": events})

    def shown(request: Request, action: str, obj: str | None, details: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        """The answer as the caller may see it: personal values in clear for `pii:read` (the
        audit row says so), tokens for everyone else. Audited before it leaves."""
        clear = current_principal(request).can("pii:read")
        if not clear and not tokenising(runtime.engine):
            raise PermissionDenied(
                "This store keeps personal values in clear (pseudonymise = false), so reading profiles needs pii:read.",
                fix="Use a token whose role has pii:read, or turn pseudonymisation on.",
            )
        record_for(request, action, obj, {**details, "pii": clear})
        return reveal_in(runtime.engine, body) if clear else body

    return r
