"""The segment builder's JSON endpoints, under the console: thin routes over service.py.

`segments:read` converts, checks, previews and reads sizes; `segments:write` saves. The caller is
found by `require(permission)`, a dependency that checks the permission and returns the Principal:
the console's cookie session in the console, a bearer token through the admin API's `require`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Body, Depends, Query, Request

from refinery.governance.principal import Principal
from refinery.identity import rules_from_settings
from refinery.runtime import Runtime

from . import service

PREFIX = "/console/api/builder"


def router(runtime: Runtime, require: Callable[..., Any]) -> APIRouter:
    r = APIRouter(tags=["console"])
    engine, writer, settings = runtime.engine, runtime.writer, runtime.settings
    read = require("segments:read")
    write = require("segments:write")

    def name_of(body: dict[str, Any]) -> str | None:
        name = body.get("name")
        return name if isinstance(name, str) and name else None

    @r.post(PREFIX + "/text", dependencies=[Depends(read)])
    def tree_to_text(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        """The canonical rule text of `tree`, its errors at their nodes (`pointer`) and places (line, column)."""
        return service.tree_to_text(engine, body.get("tree"), name=name_of(body))

    @r.post(PREFIX + "/tree", dependencies=[Depends(read)])
    def text_to_tree(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        """The tree of a rule `text` (null when it does not parse), with its errors."""
        text = body.get("text")
        return service.text_to_tree(engine, text if isinstance(text, str) else "", name=name_of(body))

    @r.post(PREFIX + "/preview")
    def preview(body: dict[str, Any] = Body(...), actor: Principal = Depends(read)) -> dict[str, Any]:
        """Count and sample of the rule (`text`, or `tree`), as POST /api/segments/preview; audited."""
        return service.preview(engine, writer, actor, body, rules=rules_from_settings(settings), settings=settings)

    @r.post(PREFIX + "/save")
    def save(body: dict[str, Any] = Body(...), actor: Principal = Depends(write)) -> dict[str, Any]:
        """Create the segment `name`, or save a new version; the rule is `text`, or `tree` printed."""
        return service.save(engine, writer, actor, body, rules=rules_from_settings(settings), settings=settings)

    @r.get(PREFIX + "/catalog", dependencies=[Depends(read)])
    def catalog() -> dict[str, Any]:
        return service.catalog(engine)

    @r.get(PREFIX + "/segments/{name}", dependencies=[Depends(read)])
    def load(name: str) -> dict[str, Any]:
        return service.load(engine, name)

    @r.get(PREFIX + "/segments/{name}/sizes", dependencies=[Depends(read)])
    def sizes(name: str) -> dict[str, Any]:
        return service.sizes(engine, name)

    return r


def pages(runtime: Runtime, render: Callable[..., Any], require: Callable[..., Any]) -> APIRouter:
    """The builder's page: `/console/segments/builder` (new) and `?name=NAME` (open a saved segment).
    `render(request, template, context)` renders a console template for the logged-in user."""
    r = APIRouter(tags=["console"])
    read = require("segments:read")

    @r.get("/console/segments/builder", include_in_schema=False)
    def builder(request: Request, name: str = Query("", description="A saved segment to open."),
                actor: Principal = Depends(read)) -> Any:
        return render(request, "builder.html", {"segment": name, "can_write": actor.can("segments:write")})

    return r
