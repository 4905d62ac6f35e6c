"""The collector: Segment's HTTP Tracking API over the protocol rules and the single writer.

The hot path is plain Starlette (no body models): read the body with its limits, authenticate the
write key, apply the source's rate limit, stage the events, hand them to the writer and answer
only when the group commit that holds them is on disk.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from refinery.api.metrics import Metrics
from refinery.api.ratelimit import RateLimiter
from refinery.errors import AuthError, IngestError, PayloadTooLarge, PermissionDenied, RefineryError
from refinery.ingest import protocol
from refinery.ingest.protocol import Failure
from refinery.ingest.sources import Source
from refinery.ingest.store import IngestItem, Outcome
from refinery.runtime import Runtime

log = logging.getLogger(__name__)

CORS_HEADERS = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "POST, OPTIONS",
    "access-control-allow-headers": "Authorization, Content-Type, Content-Encoding",
    "access-control-max-age": "86400",
}


def _json(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    h = dict(CORS_HEADERS)
    if headers:
        h.update(headers)
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=h)


class Collector:
    def __init__(self, runtime: Runtime, metrics: Metrics):
        self.rt = runtime
        self.metrics = metrics
        s = runtime.settings
        self.limits = protocol.Limits(s.max_event_bytes, s.max_batch_bytes, s.max_batch_events, s.max_json_depth)
        self.rate = RateLimiter(s.rate_limit_per_second, s.rate_limit_burst)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # Request ids: 64 random bits per process, then a counter (32 hex digits, like a UUID's
        # hex): unique across restarts without a random-number syscall per request.
        self._id_prefix = secrets.token_hex(8)
        self._id_counter = itertools.count(1)

    def _request_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_counter):016x}"

    def _metric(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: the lookup costs more than the increment."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def routes(self) -> list[Route]:
        routes = []
        for call in (*protocol.CALL_TYPES, "batch", "import"):
            endpoint = CollectorEndpoint(self, "batch" if call == "import" else call)
            routes.append(Route(f"/v1/{call}", endpoint, methods=["POST", "OPTIONS"]))
        for short, call in protocol.SHORT_PATHS.items():
            routes.append(Route(f"/v1/{short}", CollectorEndpoint(self, call), methods=["POST", "OPTIONS"]))
        return routes

    async def handle(self, call: str, request: Request) -> Response:
        started = time.perf_counter()
        request_id = self._request_id()
        status = 200
        try:
            response = await self._handle(call, request, request_id)
            status = response.status_code
            return response
        except RefineryError as e:
            status = e.http_status
            self.metrics.rejected.labels(e.details.get("reason") or e.code).inc()
            headers = {"x-request-id": request_id}
            retry_after = e.details.get("retry_after")
            if retry_after is not None:
                headers["retry-after"] = str(max(1, int(retry_after + 0.999)))
            return _json({"success": False, "code": e.code, **e.to_dict(), "request_id": request_id}, e.http_status, headers)
        except ClientDisconnect:
            status = 499
            self.metrics.rejected.labels("client_disconnected").inc()
            return Response(status_code=400)
        except Exception as e:  # never crash the server; never log payloads (PII)
            status = 500
            log.error("collector: unexpected %s handling a %s request %s", type(e).__name__, call, request_id, exc_info=True)
            self.metrics.rejected.labels("internal_error").inc()
            return _json(
                {"success": False, "code": "internal_error", "error": "internal_error",
                 "message": "The event was not stored; retry.", "request_id": request_id},
                500,
            )
        finally:
            self._metric(self.metrics.requests, call, str(status)).inc()
            if status == 200:
                self._metric(self.metrics.latency, call).observe(time.perf_counter() - started)

    async def _read_body(self, request: Request) -> bytes:
        """The body, refusing one over the batch limit: at once when Content-Length says so (the
        body is never read), else while streaming it."""
        limit = self.limits.max_batch_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError as e:
                raise IngestError(
                    f"Content-Length {declared[:20]!r} is not a number.", field="Content-Length",
                    fix="Send a valid Content-Length.", reason="invalid_content_length",
                ) from e
            if n > limit:
                raise PayloadTooLarge(
                    f"The body is {n} bytes; at most {limit} are accepted.",
                    fix="Send smaller batches (Segment's limit is 500 KB per batch, 32 KB per event).",
                    field="Content-Length",
                    reason="body_too_large",
                )
            return await request.body()
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(
                    f"The body exceeds {limit} bytes.", fix="Send smaller batches (Segment's limit is 500 KB per batch).",
                    field="body", reason="body_too_large",
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _source(self, key: str) -> Source:
        source = self.rt.sources.by_write_key(key)
        if source is None:
            raise AuthError(
                "The write key is not valid.",
                fix="Use the key printed by `refinery sources create NAME` (HTTP Basic user name, empty password).",
                field="Authorization",
                reason="invalid_write_key",
            )
        if not source.enabled:
            raise PermissionDenied(
                f"Source {source.name!r} is disabled.", fix=f"Enable it with: refinery sources enable {source.name}",
                field="writeKey", reason="source_disabled",
            )
        return source

    async def _handle(self, call: str, request: Request, request_id: str) -> Response:
        # Authenticate from the header before reading the body when we can: strangers never get
        # their bodies decompressed or parsed.
        key = protocol.write_key_from_header(request.headers.get("authorization"))
        source = self._source(key) if key is not None else None
        body_bytes = await self._read_body(request)
        body_bytes = protocol.decode_body(body_bytes, request.headers.get("content-encoding"), self.limits)
        body = protocol.parse_body(body_bytes)
        if source is None:
            body_key = protocol.write_key_from_body(body)
            if body_key is None:
                raise protocol.missing_write_key()
            source = self._source(body_key)
        # Rate-limit before staging, so a client over its limit costs us no per-event work.
        batch = body.get("batch") if call == "batch" else None
        cost = min(len(batch), self.limits.max_batch_events) if isinstance(batch, list) and batch else 1
        self.rate.take(source.name, cost, source.rate_limit_per_second)
        staged = protocol.stage(call, body, self.limits)
        plans = self.rt.plans
        if plans.applies_to(source.unplanned_events):
            for ev in staged:
                if ev.failure is None and ev.merged is not None:
                    ev.failure = plans.check(ev.merged, source.unplanned_events)
        received_at = datetime.now(UTC)
        items = [IngestItem(source.name, request_id, received_at, ev) for ev in staged]
        self.metrics.writer_queue.set(self.rt.writer.pending())
        try:
            outcomes = await commit_isolating(self._write, items, _quarantine)
        except Exception as e:  # storage errors carry SQL and values: never sent to the client nor logged
            log.error("collector: commit failed for request %s: %s", request_id, type(e).__name__)
            raise _Unavailable() from e
        loaded = dup = suppressed = 0
        failures = []
        for o in outcomes:
            if o.status == "loaded":
                loaded += 1
            elif o.status == "duplicate":
                dup += 1
            elif o.status == "suppressed":
                suppressed += 1
            else:
                failures.append(o)
                self.metrics.failed.labels(source.name, o.reason or "unknown").inc()
        if loaded:
            self._metric(self.metrics.accepted, source.name).inc(loaded)
        if dup:
            self._metric(self.metrics.duplicates, source.name).inc(dup)
        if suppressed:
            self.metrics.suppressed.labels(source.name).inc(suppressed)
        resp: dict[str, Any] = {"success": True, "request_id": request_id}
        if call == "batch":
            resp.update(accepted=loaded, duplicates=dup, failed=len(failures))
            if suppressed:
                resp["suppressed"] = suppressed
            if failures:
                resp["failures"] = [
                    {"index": i, "messageId": o.message_id, "reason": o.reason, "field": o.field, "message": o.message}
                    for i, o in enumerate(outcomes)
                    if o.status == "failed"
                ]
        elif failures:
            o = failures[0]
            resp.update(quarantined=True, reason=o.reason, field=o.field, message=o.message)
        return _json(resp, headers={"x-request-id": request_id})


    async def _write(self, items: list[IngestItem]) -> list[Outcome]:
        return await self.rt.writer.submit_batch_async(self.rt.events, items)


class CollectorEndpoint:
    """One collector path as a bare ASGI app: no per-request wrapping by the framework, since
    `Collector.handle` turns every error into its response itself."""

    __slots__ = ("collector", "call")

    def __init__(self, collector: Collector, call: str):
        self.collector = collector
        self.call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "OPTIONS":
            response = Response(status_code=204, headers=CORS_HEADERS)
        else:
            response = await self.collector.handle(self.call, Request(scope, receive))
        await response(scope, receive, send)


def collector_first(app: ASGIApp, routes: Iterable[BaseRoute]) -> ASGIApp:
    """`app`, with the collector's paths served straight by their endpoints.

    Tracking calls are most of the traffic and need none of the application's middleware or
    routing (they authenticate, limit and answer errors themselves); skipping it is a third of the
    event loop's time per single-event request. Anything else, including other methods on the
    collector's paths (answered 405), goes through `app` as before.
    """
    direct = {r.path: r.app for r in routes if isinstance(r, Route) and isinstance(r.app, CollectorEndpoint)}
    methods = {"POST", "OPTIONS"}  # the collector routes' methods

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in methods:
            endpoint = direct.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await app(scope, receive, send)

    return dispatch


T = TypeVar("T")
R = TypeVar("R")


async def commit_isolating(
    write: Callable[[list[T]], Awaitable[list[R]]],
    items: list[T],
    quarantine: Callable[[T, Exception], None],
    *,
    max_failures: int = 64,
) -> list[R]:
    """Write `items`; if the commit fails, bisect to find the items that make it fail, write the
    rest, and write those marked by `quarantine` (so they land in failed_events).

    One event that trips a storage bug must not fail its whole batch forever: SDKs retry a 5xx a
    few times and then drop the batch, good events included. An error that is not about the items
    (disk full) fails every split; after `max_failures` failed commits the error is raised.
    """
    failures = 0

    async def attempt(chunk: list[T]) -> list[R]:
        nonlocal failures
        try:
            return await write(chunk)
        except Exception as e:
            failures += 1
            if failures > max_failures:
                raise
            if len(chunk) == 1:
                quarantine(chunk[0], e)
                return await write(chunk)
        mid = len(chunk) // 2
        return [*(await attempt(chunk[:mid])), *(await attempt(chunk[mid:]))]

    return await attempt(items)


def _quarantine(item: IngestItem, error: Exception) -> None:
    log.error("collector: an event of request %s could not be stored (%s); quarantining it", item.request_id, type(error).__name__)
    item.event.failure = Failure(
        "storage_error",
        f"Refinery could not clean or store this event ({type(error).__name__}); it is kept here as received. "
        "Report it with this row, and replay it once fixed.",
        None,
        "clean",
    )


class _Unavailable(RefineryError):
    http_status = 503
    code = "unavailable"

    def __init__(self) -> None:
        super().__init__("The event could not be committed and was not stored.", fix="Retry; SDKs retry 5xx responses.")
