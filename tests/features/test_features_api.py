"""The feature store through a real `refinery serve`: an analyst defines and versions features, a
marketer may read but not define, a token without features:read is refused, a training set comes
back point-in-time correct over HTTP, errors carry their field, fix and caret, and every change and
training set is in the audit log."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from support import Server


def _token(api: httpx.Client, name: str, role: str) -> dict[str, str]:
    r = api.post("/api/tokens", json={"name": name, "role": role, "expires": "1d"})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def _order(user: str, total: int, at: datetime) -> dict[str, Any]:
    return {"type": "track", "userId": user, "event": "Order Completed", "properties": {"total": total},
            "messageId": uuid.uuid4().hex, "timestamp": at.isoformat()}


def test_features_over_the_api(server: Server) -> None:
    t0 = datetime.now(UTC) - timedelta(hours=3)
    first = [_order("ann", 10, t0 - timedelta(days=2)), _order("bob", 5, t0 - timedelta(days=1))]
    assert httpx.post(server.url + "/v1/batch", json={"batch": first}, headers=server.basic).status_code == 200
    time.sleep(0.01)
    cut = datetime.now(UTC)
    time.sleep(0.01)
    late = [_order("ann", 100, t0 - timedelta(days=1))]  # happened before `cut`, received after
    assert httpx.post(server.url + "/v1/batch", json={"batch": late}, headers=server.basic).status_code == 200
    with server.api() as api:
        assert api.post("/api/identity/resolve", timeout=60).status_code == 200
        ann = api.get("/api/profiles", params={"identifier": "user_id:ann"}).json()["profile_id"]
        bob = api.get("/api/profiles", params={"identifier": "user_id:bob"}).json()["profile_id"]
        analyst, marketer = _token(api, "ana", "analyst"), _token(api, "mark", "marketer")
        privacy = _token(api, "pat", "privacy_officer")

        body = {"name": "spend", "definition": "sum(total) of 'Order Completed'", "ttl": "1 day"}
        assert api.post("/api/features", json=body, headers=marketer).status_code == 403
        r = api.post("/api/features", json=body, headers=analyst)
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 1 and r.json()["ttl_seconds"] == 86_400 and r.json()["value_type"] == "number"
        assert api.post("/api/features", json=body, headers=analyst).status_code == 409
        r = api.put("/api/features/spend", json={"definition": "sum(total) of 'Order Completed'", "window": "30 days"}, headers=analyst)
        assert r.status_code == 200 and r.json()["version"] == 2, r.text

        bad = api.post("/api/features", json={"name": "oops", "definition": "sum(totl) of 'Order Completed'"}, headers=analyst)
        assert bad.status_code == 400 and "did you mean 'total'" in bad.json()["message"] and "^" in bad.json()["caret"]
        sql = api.post("/api/features", json={"name": "leaky", "kind": "sql", "definition":
                       "SELECT ep.profile_id, count(*) AS value FROM events e JOIN event_profiles ep USING (source, message_id) "
                       "WHERE e.timestamp > now() - INTERVAL 7 DAY GROUP BY 1"}, headers=analyst)
        assert sql.status_code == 400 and sql.json()["field"] == "sql" and "$as_of" in sql.json()["fix"]

        listed = api.get("/api/features", headers=marketer)
        assert listed.status_code == 200 and [f["name"] for f in listed.json()["features"]] == ["spend"]
        assert api.get("/api/features", headers=privacy).status_code == 403
        shown = api.get("/api/features/spend", headers=marketer).json()
        assert [v["version"] for v in shown["versions"]] == [1, 2] and shown["window"] == "30 days"

        rows = [{"profile_id": ann, "timestamp": cut.isoformat(), "churned": 0},
                {"profile_id": bob, "timestamp": cut.isoformat(), "churned": 1},
                {"profile_id": ann, "timestamp": datetime.now(UTC).isoformat(), "churned": 0}]
        r = api.post("/api/features/training-set", json={"rows": rows, "features": ["spend@1"], "label": "churned"}, headers=marketer)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["columns"] == ["row", "profile_id", "profile_id_now", "timestamp", "churned", "spend@1"]
        assert [row[-1] for row in got["rows"]] == [10.0, 5.0, 110.0]

        future = [{**rows[0], "timestamp": (datetime.now(UTC) + timedelta(days=2)).isoformat()}, rows[1]]
        r = api.post("/api/features/training-set", json={"rows": future, "features": ["spend"], "label": "churned"}, headers=marketer)
        assert r.status_code == 400 and r.json()["field"] == "timestamp" and r.json()["rows"] == [0]

        assert api.delete("/api/features/spend", headers=marketer).status_code == 403
        assert api.delete("/api/features/spend", headers=analyst).status_code == 200
        assert api.get("/api/features/spend", headers=analyst).status_code == 404

        actions = [e["action"] for e in api.get("/api/audit", params={"limit": 200}).json()["entries"]]
        assert actions.count("features.define") == 2 and "features.delete" in actions and "features.training_set" in actions
