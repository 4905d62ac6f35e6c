"""The demo's privacy step: one person's data exported, another erased with a receipt, and an event
sent for the erased person afterwards, which the suppression list keeps out.

Who: two people of the world chosen by seed (signed up, one email, a phone), never the same. The
erasure happens once per data directory (`<data_dir>/demo/privacy.json` remembers its request id,
never the person's identifiers); a re-run shows the same receipt and what suppression did since.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from refinery.client import Client
from refinery.demo.world import Person, World


def candidates(world: World) -> list[Person]:
    """People whose identity the demo can name simply: signed up, one email, a phone, no shared device."""
    shared = {d.key for d in world.devices.values() if d.shared}
    return [
        p for p in sorted(world.people, key=lambda p: p.person_id)
        if p.user_id and p.phone and len(p.emails) == 1 and not shared.intersection(p.devices)
    ]


def chosen(world: World) -> tuple[Person, Person]:
    """(the person exported, the person erased)."""
    people = candidates(world) or sorted((p for p in world.people if p.user_id), key=lambda p: p.person_id)
    if len(people) < 2:
        people = sorted(world.people, key=lambda p: p.person_id)
    return people[0], people[-1]


def erased_person(folder: Path) -> str | None:
    """The world's person id of the person erased in this data directory, if any."""
    state = _state(folder)
    return str(state["person_id"]) if state else None


def run(api: Client, world: World, folder: Path, url: str, write_key: str) -> dict[str, Any]:
    exported, erased = chosen(world)
    export = api.privacy_request("export", f"user_id:{exported.user_id}")
    document = export.pop("document")
    export_file = folder / f"export-{export['request_id']}.json"
    _write_private(export_file, document)
    consent = _consent(document)

    state = _state(folder)
    if state is None:
        erase = api.privacy_request("erase", f"user_id:{erased.user_id}")
        state = {"request_id": erase["request_id"], "person_id": erased.person_id}
        _write_private(folder / "privacy.json", state)
    else:
        erase = api.privacy_request_get(state["request_id"])
        erase.pop("document", None)

    # The erased person comes back: one more event from them, which the suppression list drops.
    answer = httpx.post(
        f"{url}/v1/batch", auth=(write_key, ""), timeout=30,
        json={"batch": [{"type": "track", "event": "Product Viewed", "userId": erased.user_id,
                         "messageId": f"demo-after-erasure-{uuid.uuid4().hex}", "timestamp": datetime.now(UTC).isoformat()}]},
    )
    answer.raise_for_status()
    return {
        "export": {
            "request_id": export["request_id"], "file": str(export_file), "status": export["status"],
            "stores": _receipt(export).get("stores", {}), "consent": consent,
        },
        "erasure": {
            "request_id": erase["request_id"], "status": erase["status"], "due_at": erase.get("due_at"),
            "receipt": _receipt(erase),
        },
        "after_erasure": {"sent": 1, "suppressed": int(answer.json().get("suppressed", 0))},
    }


def _receipt(request: dict[str, Any]) -> dict[str, Any]:
    receipt = request.get("receipt")
    if isinstance(receipt, str):
        receipt = json.loads(receipt)
    return receipt if isinstance(receipt, dict) else {}


def _consent(document: dict[str, Any]) -> dict[str, str]:
    """The exported person's latest choice per purpose, from the export's consent section."""
    section = document.get("stores", {}).get("consent")
    rows = section.get("consent_log", []) if isinstance(section, dict) else section or []
    latest: dict[str, tuple[str, str]] = {}
    for r in rows:
        if isinstance(r, dict) and r.get("purpose") and r.get("state"):
            at = str(r.get("chosen_at") or r.get("recorded_at") or "")
            if r["purpose"] not in latest or at >= latest[r["purpose"]][0]:
                latest[r["purpose"]] = (at, str(r["state"]))
    return {purpose: state for purpose, (_, state) in sorted(latest.items())}


def _state(folder: Path) -> dict[str, Any] | None:
    path = folder / "privacy.json"
    if not path.exists():
        return None
    state = json.loads(path.read_text("utf-8"))
    return state if isinstance(state, dict) and state.get("request_id") else None


def _write_private(path: Path, body: Any) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(body, f, indent=2, ensure_ascii=False, default=str)
    tmp.replace(path)


__all__ = ["candidates", "chosen", "erased_person", "run"]
