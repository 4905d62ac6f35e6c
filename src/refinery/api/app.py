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
from refinery.api.auth import admin_token, require
from refinery.api.collector import Collector
from refinery.api.metrics import Metrics
from refinery.errors import RefineryError
from refinery.ingest import catalog, replay
from refinery.runtime import Runtime
from refinery.storage.query import run_query


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

    read = Depends(require("events:read"))
    admin = Depends(require("admin"))

    @app.get("/api/catalog", dependencies=[read], tags=["events"])
    def get_catalog(source: str | None = None) -> dict[str, Any]:
        return catalog.build(runtime.engine, source=source)

    @app.post("/api/query", dependencies=[read], tags=["events"])
    def post_query(body: QueryRequest) -> dict[str, Any]:
        result = run_query(runtime.engine, body.sql, limit=body.limit)
        return {"columns": result.columns, "rows": [list(r) for r in result.rows], "truncated": result.truncated}

    @app.get("/api/events/failed", dependencies=[read], tags=["events"])
    def failed(source: str | None = None, reason: str | None = None, pending: bool = True, limit: int = 100) -> dict[str, Any]:
        return {"failed": replay.list_failed(runtime.engine, source=source, reason=reason, pending_only=pending, limit=limit)}

    @app.post("/api/events/replay", dependencies=[admin], tags=["events"])
    def post_replay(body: ReplayRequest) -> dict[str, Any]:
        return replay.replay(runtime, source=body.source, reason=body.reason, limit=body.limit).to_dict()

    @app.get("/api/sources", dependencies=[read], tags=["sources"])
    def list_sources() -> dict[str, Any]:
        return {"sources": [s.to_dict() for s in runtime.sources.list()]}

    @app.post("/api/sources", dependencies=[admin], status_code=201, tags=["sources"])
    def create_source(body: SourceCreate) -> dict[str, Any]:
        source, key = runtime.writer.call(
            lambda e: runtime.sources.create(
                e, body.name, kind=body.kind,  # type: ignore[arg-type]
                write_key=body.write_key, unplanned_events=body.unplanned_events,
                rate_limit_per_second=body.rate_limit_per_second,
            )
        )
        return {**source.to_dict(), "write_key": key}

    @app.patch("/api/sources/{name}", dependencies=[admin], tags=["sources"])
    def update_source(name: str, body: SourceUpdate) -> dict[str, Any]:
        def change(e: Any) -> None:
            runtime.sources.get(name)
            if body.enabled is not None:
                runtime.sources.set_enabled(e, name, body.enabled)
            runtime.sources.update(e, name, unplanned_events=body.unplanned_events, rate_limit_per_second=body.rate_limit_per_second)

        runtime.writer.call(change)
        return runtime.sources.get(name).to_dict()

    @app.post("/api/imports", dependencies=[admin], status_code=201, tags=["imports"])
    def post_import(body: ImportRequest) -> dict[str, Any]:
        from refinery.ingest.importer import start_import

        return start_import(runtime, body.path, source=body.source, mapping=body.mapping).to_dict()

    @app.get("/api/imports/{import_id}", dependencies=[read], tags=["imports"])
    def get_import(import_id: str) -> dict[str, Any]:
        from refinery.ingest.importer import get_import as fetch

        return fetch(runtime.engine, import_id).to_dict()

    from refinery.api.profiles import router as profiles_router

    app.include_router(profiles_router(runtime))
    return app
