"""Every admin endpoint checks its permission: no token is 401, a wrong token is 403."""

from __future__ import annotations

import re

import httpx
import pytest

from refinery.api.app import create_app
from refinery.runtime import Runtime
from refinery.settings import Settings
from support import Server


@pytest.fixture(scope="module")
def admin_routes(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    rt = Runtime.open(Settings(data_dir=tmp_path_factory.mktemp("routes"), admin_token="x"))
    try:
        return _admin_routes(rt)
    finally:
        rt.close()


def _admin_routes(runtime: Runtime) -> list[tuple[str, str]]:
    app = create_app(runtime)
    routes = []
    for route in app.routes:
        path = getattr(route, "path", "")
        if not path.startswith("/api/"):
            continue
        for method in sorted(getattr(route, "methods", set()) - {"HEAD", "OPTIONS"}):
            routes.append((method, re.sub(r"\{[^}]+\}", "x", path)))
    return routes


def test_the_app_has_admin_routes(runtime: Runtime) -> None:
    routes = _admin_routes(runtime)
    assert ("POST", "/api/query") in routes
    assert ("POST", "/api/sources") in routes
    assert len(routes) >= 8


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_every_admin_route_refuses_without_the_right_token(
    server: Server, admin_routes: list[tuple[str, str]], token: str | None
) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for method, path in admin_routes:
        r = httpx.request(method, server.url + path, headers=headers, json={})
        expected = 403 if token else 401
        assert r.status_code == expected, (method, path, r.status_code, r.text)
        body = r.json()
        assert body["error"] in ("unauthorized", "forbidden")
        assert "fix" in body


def test_the_write_key_is_not_an_admin_token(server: Server) -> None:
    r = httpx.get(server.url + "/api/sources", headers={"Authorization": f"Bearer {server.write_key}"})
    assert r.status_code == 403
