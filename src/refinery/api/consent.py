"""Admin API for consent: record a choice, read an identifier's (and its profile's) state with the
receipts, and run the consent job.

Thin routes over `refinery.governance.consent`; writes go through the writer and are audited in
the same transaction, each inside a lineage run (`governance.consent_record`, `governance.consent_sync`)
emitted outside the writer; reads of consent (personal data) are audited before the answer leaves.
Audit details name the identifier *type* and the purposes, never the identifier's value.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from refinery.api.auth import current_principal, record_for, require
from refinery.governance import audit, lineage
from refinery.governance.consent import ConsentService, record_request
from refinery.governance.principal import Principal
from refinery.governance.purposes import PURPOSES
from refinery.identity import rules_from_settings
from refinery.runtime import Runtime


class ConsentRequest(BaseModel):
    identifier: str = Field(description="type:value, e.g. user_id:u-123 or email:jane@example.com.")
    purposes: dict[str, Any] | None = Field(
        None, description=f"purpose -> 'granted' | 'denied' (or true/false); purposes: {', '.join(PURPOSES)}."
    )
    tcString: str | None = Field(None, description="An IAB TCF v2 TC string; decoded, checked, mapped to purposes.")  # noqa: N815 - the CMP API's name


def router(runtime: Runtime) -> APIRouter:
    r = APIRouter(tags=["consent"])
    service = ConsentService(runtime.engine)

    def rules() -> Any:
        return rules_from_settings(runtime.settings)

    @r.post("/api/consent", dependencies=[Depends(require("privacy:write"))], status_code=201)
    def post_consent(body: ConsentRequest, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        rs = rules()

        def write(e: Any) -> dict[str, Any]:
            done = record_request(e, rs, body.identifier, body.purposes, body.tcString, actor=actor.name)
            audit.record(e, actor, "consent.record", f"consent:{done.request_id}",
                         {"identifier_type": done.subject_type, "choices": done.choices, "tcf": body.tcString is not None})
            return done.to_dict()

        with lineage.run(runtime.settings, **lineage.CONSENT_RECORD) as lr:  # emitted outside the writer
            recorded = runtime.writer.call(write)
            # the run names the request and the purposes, never the identifier or the choices
            lr.note(request_id=recorded["request_id"], identifier_type=recorded["subject_type"],
                    purposes=sorted(recorded["choices"]), tcf=body.tcString is not None)
            lr.count("consent_log", len(recorded["log_ids"]))
        return {**recorded, **service.for_identifier(body.identifier, rs)}

    @r.get("/api/consent", dependencies=[Depends(require("privacy:read"))])
    def get_consent(
        request: Request,
        identifier: str = Query(..., description="type:value, e.g. email:jane@example.com"),
        limit: int = Query(1000, ge=1, le=100_000, description="Most receipts to return, newest first."),
    ) -> dict[str, Any]:
        body = service.for_identifier(identifier, rules(), limit=limit)
        record_for(request, "consent.read", f"profile:{body['profile_id']}" if body.get("profile_id") else None,
                   {"identifier_type": body["identifier_type"], "receipts": len(body["receipts"])})
        return body

    @r.post("/api/consent/sync", dependencies=[Depends(require("privacy:write"))])
    def post_sync(full: bool = False, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        from refinery.governance.consent_sync import run_audited

        return run_audited(runtime.settings, runtime.writer, actor, full=full)

    return r
