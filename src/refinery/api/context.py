"""Admin API for the LLM context of a profile (`GET /api/profiles/{id}/context`, `context:read`).

A thin route over `refinery.profiles.context`: gathered on a reader cursor, built within the
caller's token budget, audited as a profile read before it leaves. See docs/profiles.md#llm-context.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from refinery.api.auth import current_principal, require
from refinery.governance.principal import Principal
from refinery.profiles import context
from refinery.runtime import Runtime


def router(runtime: Runtime) -> APIRouter:
    r = APIRouter(tags=["profiles"])

    @r.get("/api/profiles/{profile_id}/context", dependencies=[Depends(require("context:read"))])
    def profile_context(
        profile_id: str,
        max_tokens: int = Query(context.DEFAULT_MAX_TOKENS, ge=context.MIN_MAX_TOKENS, le=context.MAX_MAX_TOKENS,
                                description="The budget, in tokens as the `words4` estimator counts them (docs/profiles.md#llm-context)."),
        actor: Principal = Depends(current_principal),
    ) -> dict[str, Any]:
        """A compact summary of the person for a prompt: segments, non-personal traits, recent
        behaviour, each line citing the message ids it came from. Nothing without personalisation
        consent; a merged id answers with its survivor's; unknown or erased: 404."""
        return context.profile_context(runtime, actor, profile_id, max_tokens)

    return r
