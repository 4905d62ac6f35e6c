"""Admin API for activation: destinations, syncs, their runs, dead letters and replay.

Thin routes over `refinery.activation.operations`. `activation:read` lists and reads (secrets are
shown as `***`; runs and dead letters hold counts and errors, never personal values),
`activation:write` changes definitions, runs syncs and replays dead letters (audited in the
transaction of the change). See docs/activation.md.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from refinery.activation import operations as ops
from refinery.api.auth import current_principal, require
from refinery.governance.principal import Principal
from refinery.runtime import Runtime


class DestinationCreate(BaseModel):
    name: str = Field(description="Lower-case letters, digits, '_' or '-', e.g. 'crm_webhook'.")
    kind: str = Field(description="A registered kind (GET /api/destinations/kinds).")
    purpose: Literal["advertising", "marketing", "personalisation", "analytics"] = Field(
        description="The consent purpose the destination serves: only profiles whose consent for it is granted are sent.")
    config: dict[str, Any] = Field(default_factory=dict, description="The kind's configuration; secret fields are sealed, never returned.")
    description: str | None = None


class DestinationUpdate(BaseModel):
    config: dict[str, Any] | None = Field(None, description="A new configuration; a secret field left out keeps its value.")
    purpose: Literal["advertising", "marketing", "personalisation", "analytics"] | None = None
    description: str | None = None
    enabled: bool | None = None


class SyncCreate(BaseModel):
    name: str
    segment: str
    destination: str
    mapping: dict[str, str] = Field(description="{output field: trait, computed trait or 'profile_id'}")
    mode: Literal["full", "diff", "mirror"] = "diff"
    schedule: str = Field("manual", description="realtime, manual, or an interval in minutes (e.g. '15').")
    batch_size: int | None = Field(None, ge=1, le=100_000)


class SyncUpdate(BaseModel):
    mapping: dict[str, str] | None = None
    mode: Literal["full", "diff", "mirror"] | None = None
    schedule: str | None = None
    batch_size: int | None = Field(None, ge=1, le=100_000)
    enabled: bool | None = None


class SyncRun(BaseModel):
    wait_seconds: float = Field(0.0, ge=0, le=600, description="Wait up to this long for the run's batches to be delivered.")


class ReplayRequest(BaseModel):
    batch_ids: list[str] | None = Field(None, max_length=10_000)
    sync: str | None = Field(None, description="Replay every dead letter of this sync.")


def router(runtime: Runtime) -> APIRouter:
    r = APIRouter(tags=["activation"])
    read = Depends(require("activation:read"))
    write = Depends(require("activation:write"))

    @r.get("/api/destinations", dependencies=[read])
    def list_destinations() -> dict[str, Any]:
        return {"destinations": ops.list_destinations(runtime)}

    @r.get("/api/destinations/kinds", dependencies=[read])
    def list_kinds() -> dict[str, Any]:
        return {"kinds": ops.list_kinds()}

    @r.post("/api/destinations", dependencies=[write], status_code=201)
    def create_destination(body: DestinationCreate, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return ops.create_destination(runtime, actor, body.name, body.kind, body.purpose, body.config, body.description)

    @r.get("/api/destinations/{name}", dependencies=[read])
    def show_destination(name: str) -> dict[str, Any]:
        return ops.show_destination(runtime, name)

    @r.patch("/api/destinations/{name}", dependencies=[write])
    def update_destination(name: str, body: DestinationUpdate, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return ops.update_destination(runtime, actor, name, **body.model_dump(exclude_none=True))

    @r.delete("/api/destinations/{name}", dependencies=[write])
    def delete_destination(name: str, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return ops.delete_destination(runtime, actor, name)

    @r.get("/api/syncs", dependencies=[read])
    def list_syncs() -> dict[str, Any]:
        return {"syncs": ops.list_syncs(runtime)}

    @r.post("/api/syncs", dependencies=[write], status_code=201)
    def create_sync(body: SyncCreate, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return ops.create_sync(runtime, actor, body.name, body.segment, body.destination, body.mapping, mode=body.mode,
                               schedule=body.schedule, batch_size=body.batch_size)

    @r.get("/api/syncs/runs", dependencies=[read])
    def list_runs(sync: str | None = None, limit: int = Query(50, ge=1, le=10_000)) -> dict[str, Any]:
        return {"runs": ops.list_runs(runtime, sync, limit)}

    @r.get("/api/syncs/runs/{run_id}", dependencies=[read])
    def show_run(run_id: str) -> dict[str, Any]:
        from refinery.activation.runs import get_run

        return get_run(runtime.engine, run_id)

    @r.get("/api/syncs/dead-letters", dependencies=[read])
    def dead_letters(sync: str | None = None, destination: str | None = None, include_replayed: bool = False,
                     limit: int = Query(100, ge=1, le=10_000)) -> dict[str, Any]:
        return {"dead_letters": ops.dead_letters(runtime, sync, destination, include_replayed, limit)}

    @r.post("/api/syncs/replay", dependencies=[write])
    def replay(body: ReplayRequest, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return ops.replay(runtime, actor, body.batch_ids, body.sync)

    @r.get("/api/syncs/{name}", dependencies=[read])
    def show_sync(name: str) -> dict[str, Any]:
        return ops.show_sync(runtime, name)

    @r.patch("/api/syncs/{name}", dependencies=[write])
    def update_sync(name: str, body: SyncUpdate, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return ops.update_sync(runtime, actor, name, **body.model_dump(exclude_none=True))

    @r.delete("/api/syncs/{name}", dependencies=[write])
    def delete_sync(name: str, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return ops.delete_sync(runtime, actor, name)

    @r.post("/api/syncs/{name}/run", dependencies=[write])
    def run_sync(name: str, body: SyncRun | None = None, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        return ops.run_sync(runtime, actor, name, trigger="api", wait_seconds=body.wait_seconds if body is not None else 0.0)

    return r
