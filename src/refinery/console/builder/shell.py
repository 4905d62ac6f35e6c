"""A stand-in console shell for the builder while the console itself (refinery.console.app: pages
for the logged-in user, permission checks on a cookie session) is not in the tree: a login form
that takes an API token, a check that reads the bearer header or that cookie, and a page renderer
with a minimal base template. `register` wires the builder with it; once the console lands,
`register` takes the console's render and check instead and this module goes.

The cookie holds the API token itself (HttpOnly, SameSite=Strict, path /console): a request from
another site never carries it, and a POST authenticated by it must be JSON (a form cannot send
that without a preflight).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jinja2
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from refinery.governance.errors import Unauthenticated
from refinery.governance.permissions import check_permission
from refinery.governance.principal import Principal
from refinery.governance.tokens import store_for
from refinery.runtime import Runtime

COOKIE = "refinery_console_token"
LOGIN = "/console/builder/login"
STATIC = "/console/builder/static"

_BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}{% endblock %} · Refinery</title>
<style>body{font-family:system-ui,sans-serif;margin:1rem 2rem;color:#111;background:#f7f7f9}</style></head>
<body><main id="main">{% block content %}{% endblock %}</main>{% block scripts %}{% endblock %}</body></html>"""

_LOGIN = """{% extends "base.html" %}{% block title %}Log in{% endblock %}{% block content %}
<h1>Log in to Refinery</h1>
{% if error %}<p role="alert" style="color:#b00020">{{ error }}</p>{% endif %}
<form method="post" action="{{ action }}">
  <label for="token">API token</label>
  <input id="token" name="token" type="password" autocomplete="current-password" required>
  <input type="hidden" name="next" value="{{ next }}">
  <button type="submit">Log in</button>
</form>{% endblock %}"""


_CONSOLE = Path(__file__).resolve().parent.parent  # src/refinery/console: templates/ and static/


def _environment() -> jinja2.Environment:
    templates = str(_CONSOLE / "templates")
    return jinja2.Environment(
        loader=jinja2.ChoiceLoader([jinja2.FileSystemLoader(templates), jinja2.DictLoader({"base.html": _BASE, "_login.html": _LOGIN})]),
        autoescape=True,
    )


def _token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    cookie = request.cookies.get(COOKIE)
    if cookie and request.method not in ("GET", "HEAD") and not request.headers.get("content-type", "").startswith("application/json"):
        raise Unauthenticated("A request authenticated by the console's cookie must send JSON.",
                              fix="Send Content-Type: application/json, or a bearer token.")
    return cookie or None


def require(*permissions: str) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency: the caller (bearer token, or the console cookie) must hold every permission."""
    for p in permissions:
        check_permission(p)

    async def dependency(request: Request) -> Principal:
        token = _token(request)
        if token is None:
            raise Unauthenticated("Log in to the console first.", fix=f"Open {LOGIN} and give an API token.")
        principal = store_for(request.app.state.runtime).authenticate(token)
        principal.check(permissions)
        return principal

    dependency.permissions = permissions  # type: ignore[attr-defined]
    return dependency


def require_page(*permissions: str) -> Callable[[Request], Awaitable[Principal]]:
    """As `require`, for a page: a visitor who is not logged in is sent to the login form."""
    check = require(*permissions)

    async def dependency(request: Request) -> Principal:
        try:
            return await check(request)
        except Unauthenticated:
            target = request.url.path + ("?" + request.url.query if request.url.query else "")
            raise HTTPException(303, headers={"Location": LOGIN + "?" + urllib.parse.urlencode({"next": target})}) from None

    dependency.permissions = permissions  # type: ignore[attr-defined]
    return dependency


def register(app: FastAPI, runtime: Runtime) -> None:
    """The builder's JSON routes, its page, a login form, and its two static files."""
    from refinery.console.builder.routes import pages, router

    env = _environment()

    def render(request: Request, template: str, context: dict[str, Any]) -> HTMLResponse:
        return HTMLResponse(env.get_template(template).render(static_prefix=STATIC, **context))

    app.include_router(router(runtime, require))
    app.include_router(pages(runtime, render, require_page))

    @app.get(LOGIN, include_in_schema=False)
    def login_form(next: str = "/console/segments/builder") -> HTMLResponse:
        return HTMLResponse(env.get_template("_login.html").render(action=LOGIN, next=_local(next), error=None))

    @app.post(LOGIN, include_in_schema=False)
    async def login(request: Request) -> Response:
        form = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0].strip()
        target = _local((form.get("next") or ["/console/segments/builder"])[0])
        try:
            store_for(runtime).authenticate(token)
        except Exception as e:  # an unknown, revoked or expired token, or a write key: say so on the form
            message = getattr(e, "message", "That token does not open the console.")
            return HTMLResponse(env.get_template("_login.html").render(action=LOGIN, next=target, error=message), status_code=401)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/console")
        return response

    for name, media in (("builder.js", "text/javascript"), ("builder.css", "text/css")):
        body = (_CONSOLE / "static" / name).read_bytes()

        def serve(body: bytes = body, media: str = media) -> Response:
            return Response(body, media_type=media, headers={"Cache-Control": "no-cache"})

        app.add_api_route(f"{STATIC}/{name}", serve, methods=["GET"], include_in_schema=False)


def _local(path: str) -> str:
    """Only a path on this server (no scheme, no host) is followed after login."""
    parsed = urllib.parse.urlsplit(path)
    if parsed.scheme or parsed.netloc or not path.startswith("/") or path.startswith("//"):
        return "/console/segments/builder"
    return path
