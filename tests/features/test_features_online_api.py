"""The online store through a real `refinery serve`: an analyst materialises, a marketer reads a
profile's served features (audited as a profile read), a token without features:read is refused,
a merged id answers with its survivor, and after an erasure the profile's features answer 404
"erased" (and a subject export listed them before). Plus `refinery features materialize/get` on a
data folder without a server."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from test_features_cli import run

from support import Server, fresh_runtime, write_events


def _token(api: httpx.Client, name: str, role: str) -> dict[str, str]:
    r = api.post("/api/tokens", json={"name": name, "role": role, "expires": "1d"})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def _order(user: str, total: int, at: datetime, **ids: Any) -> dict[str, Any]:
    return {"type": "track", "userId": user, "event": "Order Completed", "properties": {"total": total},
            "messageId": uuid.uuid4().hex, "timestamp": at.isoformat(), **ids}


def test_online_features_over_the_api(server: Server) -> None:
    t0 = datetime.now(UTC) - timedelta(hours=3)
    batch = [_order("ann", 10, t0 - timedelta(days=2)), _order("ann", 5, t0), _order("bob", 7, t0 - timedelta(days=40))]
    assert httpx.post(server.url + "/v1/batch", json={"batch": batch}, headers=server.basic).status_code == 200
    with server.api() as api:
        assert api.post("/api/identity/resolve", timeout=60).status_code == 200
        ann = api.get("/api/profiles", params={"identifier": "user_id:ann"}).json()["profile_id"]
        bob = api.get("/api/profiles", params={"identifier": "user_id:bob"}).json()["profile_id"]
        analyst, marketer = _token(api, "ana", "analyst"), _token(api, "mark", "marketer")
        privacy = _token(api, "pat", "privacy_officer")
        for body in ({"name": "spend", "definition": "sum(total) of 'Order Completed'", "ttl": "1 day"},
                     {"name": "orders_30d", "definition": "count of 'Order Completed'", "window": "30 days"}):
            assert api.post("/api/features", json=body, headers=analyst).status_code == 201

        assert api.post("/api/features/materialize", json={}, headers=marketer).status_code == 403
        r = api.post("/api/features/materialize", json={}, headers=analyst, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["mode"] == "full" and r.json()["profiles"] == 2 and r.json()["store"] == "sqlite"

        assert api.get(f"/api/profiles/{ann}/features", headers=privacy).status_code == 403
        got = api.get(f"/api/profiles/{ann}/features", headers=marketer)
        assert got.status_code == 200, got.text
        features = got.json()["features"]
        assert features["spend"]["value"] == 15 and features["spend"]["status"] == "fresh" and features["spend"]["ttl_seconds"] == 86_400
        assert features["orders_30d"]["value"] == 2
        assert api.get(f"/api/profiles/{bob}/features", headers=marketer).json()["features"]["orders_30d"]["value"] == 0
        missing = api.get("/api/profiles/p_nobody/features", headers=marketer)
        assert missing.status_code == 404 and "materialize" in missing.json()["fix"]
        reads = [e for e in api.get("/api/audit", params={"action": "profiles.features"}).json()["entries"]
                 if e["action"] == "profiles.features"]
        assert any(e["object"] == f"profile:{ann}" for e in reads)

        exported = api.post("/api/privacy/requests", json={"kind": "export", "identifier": "user_id:ann"}, timeout=120)
        assert exported.status_code == 201, exported.text
        erased = api.post("/api/privacy/requests", json={"kind": "erase", "identifier": "user_id:ann"}, timeout=120)
        assert erased.status_code == 201, erased.text
        assert erased.json()["receipt"]["stores"]["features"] == 2, erased.json()
        gone = api.get(f"/api/profiles/{ann}/features", headers=marketer)
        assert gone.status_code == 404 and "erased" in gone.json()["message"], gone.text
        # the next materialisation does not bring the person back
        assert api.post("/api/features/materialize", json={"full": True}, headers=analyst, timeout=120).status_code == 200
        assert api.get(f"/api/profiles/{ann}/features", headers=marketer).status_code == 404
        assert api.get(f"/api/profiles/{bob}/features", headers=marketer).status_code == 200


def test_subject_export_lists_online_values(tmp_path: Path) -> None:
    from refinery.features import registry
    from refinery.features.operations import materialize, online_store
    from refinery.governance.principal import local_principal
    from refinery.identity import IdentityRules
    from refinery.privacy import requests
    from refinery.profiles.build import resolve_and_build
    from refinery.profiles.policy import TraitPolicy

    with fresh_runtime(tmp_path) as rt:
        write_events(rt, _order("cat", 12, datetime.now(UTC) - timedelta(days=1)))
        rt.writer.call(lambda e: resolve_and_build(e, IdentityRules(), TraitPolicy()))
        rt.writer.call(lambda e: registry.define(e, local_principal(), "spend", "sum(total) of 'Order Completed'"))
        materialize(rt, local_principal())
        doc = requests.export(rt, "user_id:cat", local_principal())
        section = doc["document"]["stores"]["features"] if "document" in doc else doc["stores"]["features"]
        assert [(v["feature"], v["value"]) for v in section["online_values"]] == [("spend", 12.0)]
        requests.erase(rt, "user_id:cat", local_principal())
        assert online_store(rt).count() == 0


def test_materialize_and_get_from_the_cli(tmp_path: Path) -> None:
    with fresh_runtime(tmp_path) as rt:
        write_events(rt, _order("dan", 3, datetime.now(UTC) - timedelta(days=1)))
        from refinery.identity import IdentityRules
        from refinery.profiles.build import resolve_and_build
        from refinery.profiles.policy import TraitPolicy

        rt.writer.call(lambda e: resolve_and_build(e, IdentityRules(), TraitPolicy()))
        pid = str(rt.engine.fetch_all("SELECT profile_id FROM identities WHERE value = 'dan'", cursor=rt.engine.fresh_reader())[0][0])
    data = tmp_path / "data"
    run(data, "features", "create", "spend", "sum(total) of 'Order Completed'", "--json")
    done = json.loads(run(data, "features", "materialize", "--json").stdout)
    assert done["mode"] == "full" and done["values"] == 1 and done["store"] == "sqlite"
    again = json.loads(run(data, "features", "materialize", "--json").stdout)
    assert again["mode"] == "incremental" and again["profiles"] == 0, again
    assert (data / "features" / "online.sqlite").exists()
    got = json.loads(run(data, "features", "get", pid, "--json").stdout)
    assert got["features"]["spend"]["value"] == 3.0
    out = run(data, "features", "get", "p_nobody", ok=False)
    assert "no features" in (out.stdout + out.stderr)
