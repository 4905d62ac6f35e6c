"""Admin API access: who is calling (a bearer token), what the route needs, which sources it touches.

Every `/api/*` route declares its permissions with `require(...)`: the caller's token must be known,
active, and its role must grant every permission named. Routes that act on one source say where
the source is (`sources=from_query("source")`, `from_path`, `from_body`, `from_lookup`); a token
limited to some sources may call only those routes, and only for its sources. A route that does
not locate a source reaches every source, so limited tokens are refused there by construction.

Write keys are not admin credentials: the token store refuses them. The bootstrap admin token
(`<data_dir>/admin.token` or the `admin_token` setting) keeps working beside the stored tokens.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from refinery.governance import audit
from refinery.governance.errors import PermissionDenied, Unauthenticated
from refinery.governance.permissions import check_permission
from refinery.governance.principal import Principal
from refinery.governance.tokens import bootstrap_token, store_for
from refinery.settings import Settings

__all__ = ["SourceFrom", "Unauthenticated", "admin_token", "current_principal", "from_body", "from_lookup",
           "from_path", "from_query", "record_for", "require"]


def admin_token(settings: Settings) -> str:
    """The bootstrap admin token (see `refinery.governance.tokens.bootstrap_token`)."""
    return bootstrap_token(settings)


@dataclass(frozen=True)
class SourceFrom:
    """Where a route finds the source it acts on: a query or path parameter, a JSON body field, or a
    lookup from a path parameter (e.g. an import id) to its source."""

    where: Literal["query", "path", "body", "lookup"]
    name: str
    lookup: Callable[[Any, str], str | None] | None = None

    def describe(self) -> str:
        return {"query": f"?{self.name}=", "path": f"the {{{self.name}}} in the path", "body": f"the body's {self.name!r}",
                "lookup": f"the {{{self.name}}} in the path"}[self.where]


def from_query(name: str = "source") -> SourceFrom:
    return SourceFrom("query", name)


def from_path(name: str) -> SourceFrom:
    return SourceFrom("path", name)


def from_body(name: str = "source") -> SourceFrom:
    return SourceFrom("body", name)


def from_lookup(name: str, lookup: Callable[[Any, str], str | None]) -> SourceFrom:
    """`lookup(runtime, value)` returns the source of the object the path parameter `name` names."""
    return SourceFrom("lookup", name, lookup)


async def _located_sources(request: Request, spec: SourceFrom) -> list[str] | None:
    value: Any
    if spec.where == "query":
        value = request.query_params.get(spec.name)
    elif spec.where == "path":
        value = request.path_params.get(spec.name)
    elif spec.where == "body":
        try:
            body = await request.json()
        except ValueError:
            return None
        value = body.get(spec.name) if isinstance(body, dict) else None
    else:
        key = request.path_params.get(spec.name)
        assert spec.lookup is not None
        value = await run_in_threadpool(spec.lookup, request.app.state.runtime, key) if key else None
    return [value] if isinstance(value, str) and value else None


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise Unauthenticated(
            "This endpoint needs an API token.",
            fix="Send 'Authorization: Bearer <token>' (an admin's is in <data_dir>/admin.token; "
            "create others with: refinery tokens create NAME --role ROLE).",
        )
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthenticated("The Authorization header is not 'Bearer <token>'.", fix="Send 'Authorization: Bearer <token>'.")
    return value.strip()


Dependency = Callable[[Request], Awaitable[Principal]]


def require(*permissions: str, sources: SourceFrom | None = None) -> Dependency:
    """A FastAPI dependency: the caller's token must grant every permission in `permissions`, and a
    token limited to some sources must be acting on one of them (located by `sources`).

    The dependency carries its declaration (`.permissions`, `.sources`) so tests and docs can read
    the whole endpoint x role matrix from the app's route table."""
    if not permissions:
        raise ValueError("require() needs at least one permission")
    for p in permissions:
        check_permission(p)

    async def dependency(request: Request) -> Principal:
        principal = store_for(request.app.state.runtime).authenticate(_bearer(request))
        principal.check(permissions)
        if principal.sources is not None:
            located = await _located_sources(request, sources) if sources is not None else None
            principal.check_sources(located, where=sources.describe() if sources is not None else "this endpoint takes no source")
        request.state.principal = principal
        return principal

    dependency.permissions = tuple(permissions)  # type: ignore[attr-defined]
    dependency.sources = sources  # type: ignore[attr-defined]
    return dependency


def current_principal(request: Request) -> Principal:
    """The caller `require` authenticated for this request."""
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        raise PermissionDenied("This route declared no permission.", fix="Add dependencies=[Depends(require(...))] to the route.")
    return principal


def record_for(request: Request, action: str, obj: str | None = None, details: dict[str, Any] | None = None) -> None:
    """Audit what the caller did, in its own transaction, before the answer leaves (fails closed).

    For reads of personal data (which have no transaction to share) and for jobs that commit in
    several transactions (replay, imports); changes made in one writer call record inside it."""
    audit.record_now(request.app.state.runtime.writer, current_principal(request), action, obj, details)
