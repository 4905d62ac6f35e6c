"""Reading payloads back: raw and quarantined payloads are sealed under their subject's key
(privacy/vault.py).

`read_raw` and `read_failed` unseal the rows of one message id (and source). A payload whose key
was destroyed (its person was erased) reads as `erased`; payloads written before the vault, and
payloads cleaning rejected (which hold tokens, not personal values), read as stored.
"""

from __future__ import annotations

from typing import Any

import orjson

from refinery.privacy.vault import Vault
from refinery.storage.engine import Engine


def read_raw(engine: Engine, vault: Vault, message_id: str, *, source: str | None = None) -> list[dict[str, Any]]:
    rows = _opened(engine, vault, (
        "SELECT raw_id, request_id, source, message_id, received_at, import_id, row_number, key_id, sealed, "
        "CAST(payload AS VARCHAR) AS payload, CAST(envelope AS VARCHAR) AS envelope FROM raw_events "
        "WHERE message_id = ? AND (? IS NULL OR source = ?) ORDER BY raw_id"), message_id, source)
    for r in rows:
        doc = r.pop("opened")
        if r["state"] == "clear":
            r["envelope"] = orjson.loads(r["envelope"]) if r["envelope"] is not None else None
        else:  # sealed together as {"payload": ..., "envelope": ...}
            r["payload"], r["envelope"] = (doc["payload"], doc["envelope"]) if doc is not None else (None, None)
    return rows


def read_failed(engine: Engine, vault: Vault, message_id: str, *, source: str | None = None) -> list[dict[str, Any]]:
    rows = _opened(engine, vault, (
        "SELECT failure_id, source, message_id, stage, reason, message, field, received_at, failed_at, file, row_number, "
        "replay_status, key_id, sealed, CAST(payload AS VARCHAR) AS payload FROM failed_events "
        "WHERE message_id = ? AND (? IS NULL OR source = ?) ORDER BY failure_id"), message_id, source)
    for r in rows:
        doc = r.pop("opened")
        if r["state"] != "clear":
            r["payload"] = doc
    return rows


def _opened(engine: Engine, vault: Vault, query: str, message_id: str, source: str | None) -> list[dict[str, Any]]:
    """The rows, with times as ISO text, `state` (clear, sealed or erased), the clear `payload`
    parsed, and what was sealed parsed into `opened` (None when erased or clear)."""
    rows = engine.fetch_dicts(query, [message_id, source, source], cursor=engine.reader())
    opened = vault.unseal_many([r["key_id"] if r["sealed"] is not None else None for r in rows], [r["sealed"] for r in rows])
    for r, plain in zip(rows, opened, strict=True):
        sealed = r.pop("sealed")
        for k in ("received_at", "failed_at"):
            if r.get(k) is not None:
                r[k] = r[k].isoformat()
        r["state"] = "clear" if sealed is None else ("erased" if plain is None else "sealed")
        r["payload"] = orjson.loads(r["payload"]) if sealed is None and r["payload"] is not None else None
        r["opened"] = orjson.loads(plain) if plain is not None else None
    return rows
