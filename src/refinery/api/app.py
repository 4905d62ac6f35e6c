"""The HTTP application: collector routes, health, metrics, and the admin API under `/api`.

Built-in routes are thin: each calls a library function and maps `RefineryError` to its status.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.responses import Response

from refinery import __version__
from refinery.api.auth import (
    admin_token,
    current_principal,
    from_body,
    from_lookup,
    from_path,
    from_query,
    record_for,
    require,
)
from refinery.api.collector import Collector
from refinery.api.metrics import Metrics
from refinery.client import REVEAL_MAX
from refinery.errors import RefineryError
from refinery.governance import audit
from refinery.governance.objects import import_source
from refinery.governance.principal import Principal
from refinery.ingest import replay
from refinery.ingest.rawzone import read_failed, read_raw
from refinery.runtime import Runtime


class SourceCreate(BaseModel):
    name: str = Field(description="Lower-case name, e.g. 'web'.")
    kind: str = Field("collector", description="'collector' (gets a write key) or 'import'.")
    write_key: str | None = Field(None, description="Use this write key instead of generating one.")
    unplanned_events: str | None = Field(None, description="'accept' or 'quarantine' events without a tracking plan.")
    rate_limit_per_second: float | None = None


class SourceUpdate(BaseModel):
    enabled: bool | None = None
    unplanned_events: str | None = None
    rate_limit_per_second: float | None = None


class QueryRequest(BaseModel):
    sql: str
    limit: int | None = Field(10_000, ge=1)


class RevealRequest(BaseModel):
    tokens: list[str] = Field(..., max_length=REVEAL_MAX, description="Tokens (pii:<kind>:<hex>) to reveal.")


class ReplayRequest(BaseModel):
    source: str | None = None
    reason: str | None = None
    limit: int | None = None


class ImportRequest(BaseModel):
    path: str = Field(description="A file path readable by the server.")
    source: str
    mapping: dict[str, Any]


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(title="Refinery", version=__version__)
    metrics = Metrics()
    collector = Collector(runtime, metrics)
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.admin_token = admin_token(runtime.settings)
    app.router.routes.extend(collector.routes())

    @app.exception_handler(RefineryError)
    async def _refinery_error(request: Request, exc: RefineryError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.http_status)

    @app.get("/health", tags=["ops"])
    def health() -> dict[str, Any]:
        runtime.engine.fetch_all("SELECT 1", cursor=runtime.engine.reader())
        return {"status": "ok", "version": __version__, "writer_queue": runtime.writer.pending()}

    @app.get("/metrics", tags=["ops"])
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/events/failed", dependencies=[Depends(require("events:read", "pii:read", sources=from_query()))], tags=["events"])
    def failed(request: Request, source: str | None = None, reason: str | None = None, pending: bool = True, limit: int = 100) -> dict[str, Any]:
        rows = replay.list_failed(runtime.engine, source=source, reason=reason, pending_only=pending, limit=limit)
        record_for(request, "failed.read", f"source:{source}" if source else None, {"reason": reason, "rows": len(rows)})
        return {"failed": rows}

    @app.get("/api/events/payloads", dependencies=[Depends(require("events:read", "pii:read", sources=from_query()))], tags=["events"])
    def event_payloads(request: Request, message_id: str, source: str | None = None) -> dict[str, Any]:
        """An event as received (raw zone) and as quarantined (failed zone), unsealed: personal data in clear, audited."""
        raw = read_raw(runtime.engine, runtime.vault, message_id, source=source)
        failed_rows = read_failed(runtime.engine, runtime.vault, message_id, source=source)
        record_for(request, "payloads.read", f"source:{source}" if source else None, {"raw": len(raw), "failed": len(failed_rows)})
        return {"raw": raw, "failed": failed_rows}

    @app.post("/api/vault/reveal", dependencies=[Depends(require("pii:read"))], tags=["privacy"])
    def reveal(body: RevealRequest, request: Request) -> dict[str, Any]:
        """The values behind tokens; tokens of erased people (or unknown ones) are left out. Audited."""
        values = runtime.vault.reveal(runtime.engine, body.tokens)
        record_for(request, "vault.reveal", None, {"tokens": len(body.tokens), "revealed": len(values)})
        return {"values": values}

    @app.post("/api/events/replay", dependencies=[Depends(require("events:replay", sources=from_body()))], tags=["events"])
    def post_replay(body: ReplayRequest, request: Request) -> dict[str, Any]:
        result = replay.replay(runtime, source=body.source, reason=body.reason, limit=body.limit).to_dict()
        record_for(request, "events.replay", f"source:{body.source}" if body.source else None, {"reason": body.reason, **audit.counts(result)})
        return result

    @app.get("/api/sources", dependencies=[Depends(require("sources:read"))], tags=["sources"])
    def list_sources() -> dict[str, Any]:
        return {"sources": [s.to_dict() for s in runtime.sources.list()]}

    @app.post("/api/sources", dependencies=[Depends(require("sources:write", sources=from_body("name")))], status_code=201, tags=["sources"])
    def create_source(body: SourceCreate, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        def create(e: Any) -> Any:
            made = runtime.sources.create(
                e, body.name, kind=body.kind,  # type: ignore[arg-type]
                write_key=body.write_key, unplanned_events=body.unplanned_events,
                rate_limit_per_second=body.rate_limit_per_second,
            )
            audit.record(e, actor, "sources.create", f"source:{body.name}", body.model_dump(exclude={"name", "write_key"}))
            return made

        source, key = runtime.writer.call(create)
        return {**source.to_dict(), "write_key": key}

    @app.patch("/api/sources/{name}", dependencies=[Depends(require("sources:write", sources=from_path("name")))], tags=["sources"])
    def update_source(name: str, body: SourceUpdate, actor: Principal = Depends(current_principal)) -> dict[str, Any]:
        def change(e: Any) -> None:
            runtime.sources.get(name)
            if body.enabled is not None:
                runtime.sources.set_enabled(e, name, body.enabled)
            runtime.sources.update(e, name, unplanned_events=body.unplanned_events, rate_limit_per_second=body.rate_limit_per_second)
            audit.record(e, actor, "sources.update", f"source:{name}", body.model_dump(exclude_none=True))

        runtime.writer.call(change)
        return runtime.sources.get(name).to_dict()

    @app.post("/api/imports", dependencies=[Depends(require("imports:write", sources=from_body()))], status_code=201, tags=["imports"])
    def post_import(body: ImportRequest, request: Request) -> dict[str, Any]:
        from refinery.ingest.importer import start_import

        job = start_import(runtime, body.path, source=body.source, mapping=body.mapping).to_dict()
        record_for(request, "imports.start", f"import:{job['import_id']}", {"source": body.source, "file_sha256": job.get("file_sha256")})
        return job

    @app.get("/api/imports/{import_id}", dependencies=[Depends(require("events:read", sources=from_lookup("import_id", import_source)))], tags=["imports"])
    def get_import(import_id: str) -> dict[str, Any]:
        from refinery.ingest.importer import get_import as fetch

        return fetch(runtime.engine, import_id).to_dict()

    from refinery.api.profiles import router as profiles_router

    app.include_router(profiles_router(runtime))
    from refinery.api.identity import router as identity_router

    app.include_router(identity_router(runtime))
    from refinery.api.governance import router as governance_router

    app.include_router(governance_router(runtime))
    from refinery.api.consent import router as consent_router

    app.include_router(consent_router(runtime))
    from refinery.api.retention import router as retention_router  # retention (governance/retention.py)

    app.include_router(retention_router(runtime))
    from refinery.api.lineage import router as lineage_router  # lineage (governance/lineage.py)

    app.include_router(lineage_router(runtime))
    from refinery.api.reports import router as reports_router  # catalog and SQL, k-anonymous without pii:read

    app.include_router(reports_router(runtime))
    from refinery.api.privacy import router as privacy_router  # subject requests (privacy/requests.py)
    app.include_router(privacy_router(runtime))
    from refinery.api.segments import router as segments_router  # segments (docs/segments.md)
    app.include_router(segments_router(runtime))
    from refinery.api.activation import router as activation_router  # activation (docs/activation.md)
    app.include_router(activation_router(runtime))
    from refinery.api.features import router as features_router  # feature store (docs/features.md)
    app.include_router(features_router(runtime))
    from refinery.api.context import router as context_router  # LLM context (docs/profiles.md)
    app.include_router(context_router(runtime))
    from refinery.console.builder.shell import register as register_builder  # segment builder (decision 0029)
    register_builder(app, runtime)
    return app
