"""Every admin endpoint declares its permissions, and the server enforces them: the whole endpoint x
role matrix, read from the app's route table (a new route is covered by construction), against a
real server. No token is 401; a role without the right is 403; a token limited to some sources is
403 outside them (object-level) and on every route that reaches across sources."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastapi.routing
import httpx
import pytest

from refinery.api.app import create_app
from refinery.api.auth import SourceFrom
from refinery.governance.permissions import ROLES, get_role
from refinery.runtime import Runtime
from refinery.settings import Settings
from support import Server

DATA = Path(__file__).resolve().parents[1] / "ingest" / "data"


@dataclass(frozen=True)
class Route:
    method: str
    path: str                  # as declared, e.g. /api/sources/{name}
    permissions: tuple[str, ...]
    sources: SourceFrom | None

    def url(self, **values: str) -> str:
        return re.sub(r"\{([^}]+)\}", lambda m: values.get(m.group(1), "x"), self.path)

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def _all_routes(app: Any) -> list[Any]:
    """Every route, including those of included routers (FastAPI 0.165 includes routers lazily:
    `app.routes` then holds the router, not its routes)."""
    iter_contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    return list(iter_contexts(app.routes)) if iter_contexts else list(app.routes)


def _declared_routes(runtime: Runtime) -> list[Route]:
    app = create_app(runtime)
    routes = []
    for route in _all_routes(app):
        path = getattr(route, "path", None) or ""
        if not path.startswith("/api/"):
            continue
        original = getattr(route, "original_route", route)
        checks = [d.call for d in original.dependant.dependencies if hasattr(d.call, "permissions")]
        assert len(checks) == 1, f"{path} must declare its permissions once with Depends(require(...)); found {len(checks)}"
        for method in sorted(getattr(route, "methods", set()) - {"HEAD", "OPTIONS"}):
            routes.append(Route(method, path, checks[0].permissions, checks[0].sources))
    return routes


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> list[Route]:
    rt = Runtime.open(Settings(data_dir=tmp_path_factory.mktemp("routes"), admin_token="x"))
    try:
        return _declared_routes(rt)
    finally:
        rt.close()


def test_the_app_has_admin_routes_and_each_declares_permissions(routes: list[Route]) -> None:
    found = {(r.method, r.path): r for r in routes}
    assert ("POST", "/api/query") in found and ("POST", "/api/sources") in found and ("POST", "/api/tokens") in found
    assert ("GET", "/api/profiles/{profile_id}") in found and ("GET", "/api/audit/verify") in found  # included routers too
    assert len(routes) >= 20
    assert found[("GET", "/api/profiles/{profile_id}")].permissions == ("profiles:read",)  # values only with pii:read
    assert found[("POST", "/api/vault/reveal")].permissions == ("pii:read",)
    assert found[("POST", "/api/tokens")].permissions == ("tokens:write",)


def _token(api: httpx.Client, name: str, role: str, sources: list[str] | None = None) -> str:
    r = api.post("/api/tokens", json={"name": name, "role": role, "sources": sources, "expires": "1d"})
    assert r.status_code == 201, r.text
    secret: str = r.json()["token"]
    return secret


def _call(server: Server, route: Route, token: str | None, *, source: str | None = None) -> httpx.Response:
    """Call `route` as `token`; with `source`, put it where the route says its source is."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    params: dict[str, Any] = {}
    body: dict[str, Any] = {}
    path_values: dict[str, str] = {}
    spec = route.sources
    if source is not None and spec is not None:
        if spec.where == "query":
            params[spec.name] = source
        elif spec.where == "body":
            body[spec.name] = source
        elif spec.where == "path":
            path_values[spec.name] = source
    return httpx.request(route.method, server.url + route.url(**path_values), params=params,
                         json=body if route.method in ("POST", "PATCH", "PUT") else None, headers=headers, timeout=120)


def test_no_token_is_401_and_an_unknown_token_is_401(server: Server, routes: list[Route]) -> None:
    for token in (None, "not-a-token"):
        for route in routes:
            r = _call(server, route, token)
            assert r.status_code == 401, (str(route), token, r.status_code, r.text)
            body = r.json()
            assert body["error"] == "unauthorized" and body["fix"]


def test_every_route_for_every_role(server: Server, routes: list[Route]) -> None:
    with server.api() as api:
        tokens = {role: _token(api, f"t-{role}", role) for role in ROLES}
    assert set(tokens) >= {"admin", "privacy_officer", "marketer", "analyst"}
    allowed_somewhere = set()
    for route in routes:
        for role, token in tokens.items():
            r = _call(server, route, token)
            may = all(get_role(role).allows(p) for p in route.permissions)
            if may:
                allowed_somewhere.add(str(route))
                assert r.status_code not in (401, 403), (str(route), role, r.status_code, r.text)
                assert r.status_code < 500, (str(route), role, r.status_code, r.text)
            else:
                assert r.status_code == 403, (str(route), role, r.status_code, r.text)
                body = r.json()
                assert body["error"] == "forbidden" and set(body["required"]) == {p for p in route.permissions if not get_role(role).allows(p)}
    assert allowed_somewhere == {str(r) for r in routes}  # the admin reaches everything


def test_tokens_limited_to_sources(server: Server, routes: list[Route]) -> None:
    with server.api() as api:
        assert api.post("/api/sources", json={"name": "app"}).status_code == 201
        web_admin = _token(api, "web-admin", "admin", ["web"])
    scoped = [r for r in routes if r.sources is not None and r.sources.where != "lookup"]
    assert {str(r) for r in scoped} >= {"GET /api/catalog", "GET /api/events/failed", "POST /api/sources", "PATCH /api/sources/{name}"}
    for route in routes:
        if route.sources is None:
            r = _call(server, route, web_admin)
            assert r.status_code == 403 and "limited to sources web" in r.json()["message"], (str(route), r.status_code, r.text)
        elif route.sources.where != "lookup":
            outside = _call(server, route, web_admin, source="app")
            assert outside.status_code == 403 and "may not reach app" in outside.json()["message"], (str(route), outside.text)
            missing = _call(server, route, web_admin)
            assert missing.status_code == 403, (str(route), missing.text)
            inside = _call(server, route, web_admin, source="web")
            assert inside.status_code not in (401, 403) and inside.status_code < 500, (str(route), inside.status_code, inside.text)


def test_an_import_is_reached_only_by_tokens_for_its_source(server: Server) -> None:
    from refinery.ingest.mapping import load_mapping_file

    mapping = load_mapping_file(DATA / "crm_contacts.yaml")
    with server.api() as api:
        job = api.post("/api/imports", json={"path": str(DATA / "crm_contacts.csv"), "source": "crm", "mapping": mapping})
        assert job.status_code == 201, job.text
        crm_only, web_only = _token(api, "crm-reader", "analyst", ["crm"]), _token(api, "web-reader", "analyst", ["web"])
    url = f"{server.url}/api/imports/{job.json()['import_id']}"
    assert httpx.get(url, headers={"Authorization": f"Bearer {crm_only}"}).status_code == 200
    r = httpx.get(url, headers={"Authorization": f"Bearer {web_only}"})
    assert r.status_code == 403 and "may not reach crm" in r.json()["message"]
    r = httpx.get(f"{server.url}/api/imports/no-such-job", headers={"Authorization": f"Bearer {web_only}"})
    assert r.status_code == 403  # a limited token learns nothing about jobs it cannot see


def test_the_write_key_is_not_an_admin_token(server: Server) -> None:
    r = httpx.get(server.url + "/api/sources", headers={"Authorization": f"Bearer {server.write_key}"})
    assert r.status_code == 403 and "write key" in r.json()["message"]


def test_revoked_and_expired_tokens_stop_working(server: Server) -> None:
    with server.api() as api:
        secret = _token(api, "short-lived", "analyst")
        headers = {"Authorization": f"Bearer {secret}"}
        assert httpx.get(server.url + "/api/sources", headers=headers).status_code == 200
        assert api.delete("/api/tokens/short-lived").status_code == 200
        r = httpx.get(server.url + "/api/sources", headers=headers)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        bad = api.post("/api/tokens", json={"name": "x", "role": "analyst", "expires": "soon"})
        assert bad.status_code == 400 and bad.json()["field"] == "expires"
        r = api.post("/api/tokens", json={"name": "one-second", "role": "analyst", "expires": "1s"})
        assert r.status_code == 201
        time.sleep(1.2)
        r = httpx.get(server.url + "/api/sources", headers={"Authorization": f"Bearer {r.json()['token']}"})
        assert r.status_code == 401 and "expired" in r.json()["message"]
