"""The demo's activation step: one segment delivered to a webhook receiver the demo starts itself
and to a folder of files, through the running server's syncs, with what arrived checked against
the segment.

The receiver is Refinery's own test receiver (`activation/receiver.py`): a real HTTP server on
loopback that verifies each batch's signature and applies it once per idempotency key. Loopback is
refused to destinations by default (server-side request forgery); the demo's own server is started
with `127.0.0.1/32` allowed (demo/server.py). A server the user started must allow it too, or this
step reports the refusal with its fix.

Only people whose consent for the destinations' purpose (marketing) is granted are sent; the step
prints how many members that leaves out.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from refinery.activation.client import ActivationClient, RemoteActivation
from refinery.activation.receiver import Receiver
from refinery.client import Client

SEGMENT = "repeat_buyers"
PURPOSE = "marketing"
WEBHOOK, FILES = "demo_webhook", "demo_files"
TO_WEBHOOK, TO_FILES = "repeat_buyers_to_webhook", "repeat_buyers_to_files"
MAPPING = {"email": "email", "first_name": "firstName"}


def _ensure_destination(act: ActivationClient, name: str, kind: str, config: dict[str, Any], description: str) -> None:
    if any(d["name"] == name for d in act.destinations()):
        act.update_destination(name, config=config)
    else:
        act.create_destination(name, kind, PURPOSE, config, description)


def _ensure_sync(act: ActivationClient, name: str, destination: str, mode: str) -> None:
    if not any(s["name"] == name for s in act.syncs()):
        act.create_sync(name, SEGMENT, destination, MAPPING, mode, "manual", None)


def run(api: Client, url: str, token: str, folder: Path, *, wait_seconds: float = 60.0) -> dict[str, Any]:
    """Deliver the segment to both destinations; return what each run did and what arrived."""
    out_dir = folder / "activation"
    out_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(24)
    members = {m["profile_id"] for m in api.segment_members(SEGMENT, limit=1_000_000)["members"]}
    with Receiver(secret) as rx, RemoteActivation(url, token) as act:
        # The receiver is new at every demo run (a new port), so its sync sends the whole audience
        # every time (mode full); the files sync sends only who entered or left since its last run.
        _ensure_destination(act, WEBHOOK, "webhook", {"url": rx.url, "secret": secret},
                            "The demo's own webhook receiver on loopback")
        _ensure_destination(act, FILES, "files", {"folder": str(out_dir), "format": "jsonl"},
                            "JSON lines files in the demo folder")
        _ensure_sync(act, TO_WEBHOOK, WEBHOOK, "full")
        _ensure_sync(act, TO_FILES, FILES, "diff")
        webhook = act.run_sync(TO_WEBHOOK, wait_seconds)
        files = act.run_sync(TO_FILES, wait_seconds)
        received = rx.members(SEGMENT)
        stats = rx.stats
    arrived = set(received)
    return {
        "segment": SEGMENT,
        "members": len(members),
        "purpose": PURPOSE,
        "webhook": {"url": rx.url, "run": webhook.get("run"), "received": len(arrived),
                    "batches": stats.batches, "duplicates": stats.duplicates,
                    "outside_segment": len(arrived - members),
                    "not_sent": len(members - arrived),
                    "with_email": sum(1 for r in received.values() if r.get("email"))},
        "files": {"folder": str(out_dir), "run": files.get("run"), "files": sorted(p.name for p in out_dir.iterdir())},
    }
