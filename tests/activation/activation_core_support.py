"""Support for the activation core tests: people (profiles, identifiers, consent receipts, personal
traits sealed in the real vault) and segment membership written by the segments' own code."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from ledger_destination import LEDGER

from refinery.activation.destination import register
from refinery.governance import consent
from refinery.governance.principal import Principal
from refinery.privacy.tokens import PiiValue
from refinery.runtime import Runtime
from refinery.segments import members

ACTOR = Principal("local", "local:test", "admin")
register(LEDGER)


def person(rt: Runtime, pid: str, *, email: str | None = None, plan: str = "pro", marketing: str | None = "granted") -> None:
    """A profile with a user id, traits (email sealed in the vault, stored as its token) and a consent receipt."""
    now = datetime.now(UTC)
    user_id = "u-" + pid

    def write(e: Any) -> None:
        traits: dict[str, Any] = {"plan": plan}
        if email is not None:
            token, normal = rt.vault.tokens.tokenise("email", email)
            rt.vault.put_values(e, [(rt.vault.key_id(user_id), PiiValue(token, "email", normal))])
            traits["email"] = token
        e.execute("INSERT INTO profiles VALUES (?, ?, ?, '{}', ?, ?, 1, '[\"web\"]', ?)",
                  [pid, json.dumps({"user_id": [user_id]}), json.dumps(traits), now, now, now])
        e.execute("INSERT INTO identities (identifier_type, value, profile_id, status, first_seen, last_seen, event_count) "
                  "VALUES ('user_id', ?, ?, 'linked', ?, ?, 1)", [user_id, pid, now, now])
        if marketing is not None:
            consent.record(e, "user_id", user_id, {"marketing": marketing}, origin="api", source="api", at=now, evidence=None)

    rt.writer.call(write)


def set_consent(rt: Runtime, pid: str, state: str) -> None:
    now = datetime.now(UTC)
    rt.writer.call(lambda e: consent.record(e, "user_id", "u-" + pid, {"marketing": state}, origin="api", source="api", at=now,
                                            evidence=None))


def define_segment(rt: Runtime, name: str) -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    rt.writer.call(lambda e: e.execute(
        "INSERT INTO segments VALUES (?, 'performed ''x''', NULL, '{\"mode\": \"profiles\"}', 1, 't', ?, 't', ?, NULL, NULL)", [name, t, t]))


def membership(rt: Runtime, segment: str, ids: list[str]) -> members.SegmentRun:
    """Set the segment's members as a segment run does (history rows and segment_entered/exited events)."""
    at = datetime.now(UTC)
    run = members.SegmentRun("segrun_" + uuid.uuid4().hex[:12], segment, 1, at.isoformat(), "test", ACTOR.name, at.isoformat())
    table = pa.table({"profile_id": pa.array(ids, pa.string())})
    return rt.writer.call(lambda e: members._apply(e, run, table, at, {"digest": uuid.uuid4().hex}, ACTOR))


def ledger_destination(rt: Runtime, name: str, folder: Path, *, purpose: str = "marketing", delay: float = 0.0) -> dict[str, Any]:
    from refinery.activation import operations

    return operations.create_destination(rt, ACTOR, name, "ledger", purpose,
                                         {"folder": str(folder), "token": "s3cret-token", "delay_seconds": delay})


def plugin_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a `refinery` process that loads the ledger destination as a plug-in package
    would be loaded: a distribution on the path declaring it in the `refinery.destinations` entry points."""
    import os

    site = tmp_path / "plugins"
    dist = site / "refinery_test_ledger-0.1.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: refinery-test-ledger\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[refinery.destinations]\nledger = ledger_destination:LEDGER\n")
    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(site), str(here), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path}
