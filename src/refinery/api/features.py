"""Admin API for the feature store: feature definitions (every change a new version) and
point-in-time training sets.

Thin routes over `refinery.features.operations`. `features:read` lists and reads definitions,
builds training sets (profile ids with derived values; each audited) and reads a profile's served
features (`GET /api/profiles/{id}/features`, audited as a profile read); `features:write` creates,
changes and deletes definitions (audited in the transaction of the change) and materialises the
online store (`POST /api/features/materialize`). See docs/features.md.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from refinery.api.auth import current_principal, require
from refinery.features import operations as ops
from refinery.governance.principal import Principal
from refinery.runtime import Runtime


class FeatureFields(BaseModel):
    definition: str = Field(description="An aggregate in the segment language (count of 'Order Completed'), or for kind 'sql' a SELECT "
                                        "of profile_id, value over events as of $as_of.")
    kind: Literal["expression", "sql"] = "expression"
    entity: Literal["profile"] = "profile"
    window: str | None = Field(None, description="e.g. '90 days' (expression features without a window of their own).")
    ttl: str | None = Field(None, description="How long a materialised value may be served, e.g. '1 day'.")
    owner: str | None = Field(None, description="Who answers for the feature (default: the caller).")
    description: str | None = None


class FeatureCreate(FeatureFields):
    name: str = Field(description="Letters, digits and '_', e.g. 'orders_90d'.")


class InlineFeature(BaseModel):
    name: str
    definition: str
    kind: Literal["expression", "sql"] = "expression"
    window: str | None = None


class TrainingSetRequest(BaseModel):
    rows: list[dict[str, Any]] = Field(description="Objects with profile_id, timestamp (ISO 8601) and the label.", max_length=ops.MAX_ROWS)
    features: list[str | InlineFeature] = Field(description="Feature names (NAME or NAME@VERSION), or unsaved definitions.", min_length=1)
    label: str | None = Field("label", description="The label's field; null for none (mode 'retrieval').")
    mode: Literal["training", "retrieval"] = "training"
    unknown: Literal["refuse", "drop"] = Field("refuse", description="Rows of profiles this store does not know: refuse the request, "
                                                                     "or drop them (reported).")


class MaterializeRequest(BaseModel):
    features: list[str] = Field(default_factory=list, description="Feature names to materialise (default: every feature).")
    full: bool = Field(False, description="Recompute every profile even when an incremental run would do.")


def router(runtime: Runtime) -> APIRouter:
    r = APIRouter(tags=["features"])
    read = Depends(require("features:read"))
    write = Depends(require("features:write"))

    @r.get("/api/features", dependencies=[read])
    def list_features() -> dict[str, Any]:
        return {"features": ops.list_features(runtime)}

    @r.post("/api/features", dependencies=[write], status_code=201)
    def create(body: FeatureCreate, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return ops.define(runtime, actor, body.name, body.definition, create=True, kind=body.kind, entity=body.entity,
                          window=body.window, ttl=body.ttl, owner=body.owner, description=body.description)

    @r.post("/api/features/training-set", dependencies=[read])
    def training_set(body: TrainingSetRequest, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        features: list[Any] = [f if isinstance(f, str) else f.model_dump() for f in body.features]
        return ops.build_training_set(runtime, actor, body.rows, features, label=body.label, mode=body.mode, unknown=body.unknown)

    @r.post("/api/features/materialize", dependencies=[write])
    def materialize(body: MaterializeRequest | None = None, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        asked = body or MaterializeRequest(features=[], full=False)
        return ops.materialize(runtime, actor, asked.features or None, full=asked.full)

    @r.get("/api/profiles/{profile_id}/features", dependencies=[read])
    def profile_features(profile_id: str, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        """The profile's latest feature values from the online store (a merged id answers with its
        survivor's); each `fresh`, or `stale` (no value) when older than its feature's TTL."""
        return ops.profile_features(runtime, actor, profile_id)

    @r.get("/api/features/{name}", dependencies=[read])
    def show(name: str) -> dict[str, Any]:
        return ops.show(runtime, name)

    @r.get("/api/features/{name}/versions", dependencies=[read])
    def versions(name: str) -> dict[str, Any]:
        return {"name": name, "versions": ops.versions(runtime, name)}

    @r.put("/api/features/{name}", dependencies=[write])
    def update(name: str, body: FeatureFields, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return ops.define(runtime, actor, name, body.definition, create=False, kind=body.kind, entity=body.entity,
                          window=body.window, ttl=body.ttl, owner=body.owner, description=body.description)

    @r.delete("/api/features/{name}", dependencies=[write])
    def delete(name: str, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return ops.delete(runtime, actor, name)

    return r
