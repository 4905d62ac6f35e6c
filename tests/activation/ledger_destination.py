"""A real destination for the core tests, registered like a third party's: it applies batches to a
members file (profile -> fields) idempotently by batch id, logs every delivery call, and fails on
demand (a `faults.json` list in its folder, consumed one per call: transient with an optional
retry_after, terminal, or slow). The server tests load it through an entry point, as a plug-in
package would be loaded."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from refinery.activation.destination import (
    Batch,
    DestinationContext,
    DestinationType,
    TerminalDeliveryError,
    TransientDeliveryError,
)


class LedgerConfig(BaseModel):
    folder: str
    token: SecretStr | None = None  # a secret, to see it sealed and never shown
    delay_seconds: float = 0.0


_locks: dict[str, threading.Lock] = {}


class Ledger:
    def __init__(self, config: LedgerConfig, ctx: DestinationContext):
        self.folder = Path(config.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.delay = config.delay_seconds
        self.token = config.token.get_secret_value() if config.token else None
        self.lock = _locks.setdefault(str(self.folder), threading.Lock())

    def _fault(self) -> dict[str, Any] | None:
        path = self.folder / "faults.json"
        if not path.exists():
            return None
        faults = json.loads(path.read_text())
        if not faults:
            return None
        first, rest = faults[0], faults[1:]
        path.write_text(json.dumps(rest))
        return dict(first)

    def deliver(self, batch: Batch) -> None:
        with self.lock:
            with (self.folder / "calls.jsonl").open("a") as f:
                f.write(json.dumps({"batch_id": batch.id, "attempt": batch.attempt, "records": len(batch.records),
                                    "token": self.token, "at": time.time()}) + "\n")
            fault = self._fault()
        if self.delay:
            time.sleep(self.delay)
        if fault is not None:
            if fault["kind"] == "slow":
                time.sleep(float(fault["seconds"]))
            elif fault["kind"] == "transient":
                raise TransientDeliveryError("receiver answered 503", retry_after=fault.get("retry_after"))
            elif fault["kind"] == "terminal":
                raise TerminalDeliveryError("receiver answered 400: field rejected")
        with self.lock:
            applied_path = self.folder / "applied.json"
            applied = set(json.loads(applied_path.read_text())) if applied_path.exists() else set()
            if batch.id in applied:
                return  # seen already: a repeat is harmless
            members_path = self.folder / "members.json"
            members = json.loads(members_path.read_text()) if members_path.exists() else {}
            for r in batch.records:
                if r.action == "add":
                    members[r.profile_id] = dict(r.fields)
                else:
                    members.pop(r.profile_id, None)
            _atomic(members_path, members)
            applied.add(batch.id)
            _atomic(applied_path, sorted(applied))

    def close(self) -> None:
        return None


def _atomic(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, sort_keys=True))
    os.replace(tmp, path)


LEDGER = DestinationType("ledger", LedgerConfig, lambda config, ctx: Ledger(config, ctx), "Test ledger: members in a JSON file.")


def members(folder: Path) -> dict[str, Any]:
    path = folder / "members.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


def calls(folder: Path) -> list[dict[str, Any]]:
    path = folder / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def faults(folder: Path, *items: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "faults.json").write_text(json.dumps(list(items)))
