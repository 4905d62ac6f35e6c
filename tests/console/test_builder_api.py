"""The builder's JSON endpoints through a real `refinery serve`: each needs its permission (an
analyst converts and previews but cannot save), the preview is the segments preview, the errors
carry a tree pointer and a line and column, and saving creates then versions a segment."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from support import Server

API = "/console/api/builder"


def _token(api: httpx.Client, name: str, role: str) -> dict[str, str]:
    r = api.post("/api/tokens", json={"name": name, "role": role, "expires": "1d"})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def _track(user: str, name: str, **props: Any) -> dict[str, Any]:
    return {"type": "track", "userId": user, "event": name, "properties": props, "messageId": uuid.uuid4().hex}


def test_builder_endpoints_by_role(server: Server) -> None:
    batch = [_track("ann", "Order Completed", total=120), _track("ann", "Order Completed", total=20), _track("ben", "Order Completed", total=5)]
    assert httpx.post(server.url + "/v1/batch", json={"batch": batch}, headers=server.basic).status_code == 200
    with server.api() as api:
        assert api.post("/api/identity/resolve", timeout=120).status_code == 200
        marketer, analyst = _token(api, "mia", "marketer"), _token(api, "ann", "analyst")

    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post(API + "/tree", json={"text": "performed 'Order Completed'"}).status_code == 401
        tree = c.post(API + "/tree", headers=analyst, json={"text": "performed 'Order Completed' where total > 50"}).json()
        assert tree["valid"] and tree["tree"]["root"]["children"][0]["where"]["children"][0]["path"] == "total"

        tree["tree"]["root"]["children"][0]["frequency"] = {"op": ">=", "count": 2}
        text = c.post(API + "/text", headers=analyst, json={"tree": tree["tree"]}).json()
        assert text == {**text, "text": "performed 'Order Completed' where total > 50 at least 2 times", "valid": True}

        bad = c.post(API + "/text", headers=analyst, json={"tree": {"version": 1, "policy": None, "root": {
            "kind": "group", "op": "and", "children": [{"kind": "performed", "event": "Order Complet", "where": None, "window": None}]}}}).json()
        assert [(e["pointer"], e["line"], e["column"]) for e in bad["errors"]] == [("/root/children/0/event", 1, 11)]

        rule = "performed 'Order Completed' where total > 10"
        mine = c.post(API + "/preview", headers=analyst, json={"text": rule}).json()
        theirs = c.post("/api/segments/preview", headers=analyst, json={"rule": rule}).json()
        assert mine["count"] == theirs["count"] == 1 and mine["sample"] == theirs["sample"]
        refused = c.post(API + "/preview", headers=analyst, json={"text": "performed 'Nope'"})
        assert refused.status_code == 400 and refused.json()["errors"][0]["column"] == 11

        assert c.post(API + "/save", headers=analyst, json={"name": "big", "text": rule}).status_code == 403
        made = c.post(API + "/save", headers=marketer, json={"name": "big", "tree": tree["tree"], "description": "two big orders"})
        assert made.status_code == 200 and made.json()["created"] and made.json()["version"] == 1, made.text
        again = c.post(API + "/save", headers=marketer, json={"name": "big", "text": rule}).json()
        assert not again["created"] and again["version"] == 2
        listed = {s["name"]: s for s in c.get("/api/segments", headers=analyst).json()["segments"]}
        assert listed["big"]["rule"] == rule and listed["big"]["members"] == 1

        opened = c.get(API + "/segments/big", headers=analyst).json()
        assert opened["text"] == rule and opened["tree"]["root"]["children"][0]["event"] == "Order Completed"
        sizes = c.get(API + "/segments/big/sizes", headers=analyst).json()
        assert sizes["size"] == 1 and [p["size"] for p in sizes["points"]][-1] == 1
        assert c.get(API + "/segments/nope/sizes", headers=analyst).status_code == 404
        catalog = c.get(API + "/catalog", headers=analyst).json()
        assert catalog["events"]["Order Completed"] == {"total": "number"} and "big" in catalog["segments"]


def test_the_stand_in_login_and_cookie(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=60, follow_redirects=False) as c:
        page = c.get("/console/segments/builder?name=x", headers={"Accept": "text/html"})
        assert page.status_code == 303 and page.headers["location"] == "/console/builder/login?next=%2Fconsole%2Fsegments%2Fbuilder%3Fname%3Dx"
        wrong = c.post("/console/builder/login", content="token=nope&next=/console/segments/builder",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert wrong.status_code == 401 and "not known" in wrong.text and "set-cookie" not in wrong.headers
        # after login only a path on this server is followed
        ok = c.post("/console/builder/login", content=f"token={server.admin_token}&next=https://evil.example/x",
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert ok.status_code == 303 and ok.headers["location"] == "/console/segments/builder"
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
        assert c.get("/console/segments/builder").status_code == 200  # the client keeps the cookie
        assert c.post(API + "/tree", json={"text": "plan = 'pro'"}).status_code == 200
        # a POST authenticated by the cookie must be JSON (a cross-site form cannot send that)
        form = c.post(API + "/tree", content="text=plan", headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert form.status_code == 401
        assert c.get("/console/builder/static/builder.js").headers["content-type"].startswith("text/javascript")
