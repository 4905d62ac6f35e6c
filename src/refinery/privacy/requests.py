"""Data subject requests: export everything held about a person, or erase them, with receipts.

- **Export** finds the subject (`subject.find_subject`) and asks every registered store
  (`registry.REGISTRY`) what it holds; the document is returned, and kept sealed under the
  person's key so `GET /api/privacy/requests/{id}` can return it again (an erasure drops it).
- **Erase** runs inside the writer, in one transaction serialised with ingestion: the subject is
  found, every store erases, the person's identifiers go on the suppression list (clear values
  revealed first: the list keeps keyed hashes, never values or tokens), and the request row and
  its audit row commit with them. Then the person's data keys are destroyed (crypto-shredding
  every sealed copy, backups included), destinations that support deletion are asked, and the
  receipt is completed. The receipt holds counts, never personal values.

Every request is a row of `privacy_requests` with its status and a due date (`DEADLINE` after it
was received). The person is named there only by the keyed hash of the identifier asked for.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from refinery.errors import NotFoundError, QueryError, RefineryError
from refinery.governance import audit
from refinery.governance.principal import Principal
from refinery.identity import rules_from_settings
from refinery.privacy.registry import Subject, registry
from refinery.privacy.stores import clear_identifiers
from refinery.privacy.subject import find_subject, normal_value
from refinery.profiles import read
from refinery.storage.engine import Engine

if TYPE_CHECKING:
    from refinery.runtime import Runtime

log = logging.getLogger(__name__)

#: How long a request may take (GDPR art. 12(3): one month from receipt).
DEADLINE = timedelta(days=30)
KINDS = ("export", "erase")
STATUSES = ("received", "in_progress", "completed", "failed", "rejected")
FORMAT = "refinery.subject-export/1"


class SubjectNotFound(NotFoundError):
    code = "subject_not_found"


class RequestError(RefineryError):
    http_status = 422
    code = "invalid_request"


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return "dsr_" + uuid.uuid4().hex[:24]


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


@dataclass
class Asked:
    """What a request names: the identifier's type (None: a bare value) and its keyed hash."""

    identifier_type: str | None
    identifier_hash: str | None


def _asked(runtime: Runtime, identifier: str) -> Asked:
    rules = rules_from_settings(runtime.settings)
    kind, raw = read.parse_identifier(identifier, rules)
    normal = normal_value(kind or "any", raw, rules)
    return Asked(kind, runtime.vault.suppression_hash(kind or "any", normal) if normal else None)


def _check(kind: str, identifier: str) -> None:
    if kind not in KINDS:
        raise RequestError(f"Unknown request kind {kind!r}.", fix=f"Use one of: {', '.join(KINDS)}.", field="kind")
    if not identifier or not identifier.strip():
        raise RequestError("The identifier is empty.", fix="Give it as type:value, e.g. email:jane@example.com or user_id:u-1042.",
                           field="identifier")


def _not_found(asked: Asked, request_id: str) -> SubjectNotFound:
    what = f"{asked.identifier_type} identifier" if asked.identifier_type else "identifier of any type"
    return SubjectNotFound(
        f"No {what} with that value is held: nothing to export or erase (request {request_id}, recorded as rejected).",
        fix="Check the spelling and the type (email:, phone:, user_id:, anonymous_id:, ...); a phone needs its country code "
        "(+44...) unless it is in the default region. Run `refinery profiles explain TYPE:VALUE` to see what is held.",
        field="identifier", request_id=request_id,
    )


def _insert(engine: Engine, rid: str, kind: str, status: str, asked: Asked, actor: Principal, *,
            receipt: dict[str, Any] | None = None, error: str | None = None) -> datetime:
    at = _now()
    engine.execute(
        "INSERT INTO privacy_requests (request_id, kind, status, identifier_type, identifier_hash, actor, received_at, due_at, "
        "started_at, finished_at, receipt, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [rid, kind, status, asked.identifier_type, asked.identifier_hash, actor.name, at, at + DEADLINE,
         at if status != "received" else None, at if status in ("completed", "failed", "rejected") else None,
         json.dumps(receipt) if receipt is not None else None, error],
    )
    return at


def _finish(engine: Engine, rid: str, status: str, receipt: dict[str, Any] | None, error: str | None = None) -> None:
    engine.execute(
        "UPDATE privacy_requests SET status = ?, finished_at = ?, receipt = coalesce(?, receipt), error = ? WHERE request_id = ?",
        [status, _now(), json.dumps(receipt) if receipt is not None else None, error, rid],
    )


def _reject(runtime: Runtime, rid: str, kind: str, asked: Asked, actor: Principal) -> SubjectNotFound:
    err = _not_found(asked, rid)

    def write(e: Engine) -> None:
        _insert(e, rid, kind, "rejected", asked, actor, error=err.message)
        audit.record(e, actor, f"privacy.{kind}", f"privacy_request:{rid}",
                     {"identifier_type": asked.identifier_type or "any", "status": "rejected"})

    runtime.writer.call(write)
    return err


def _summary(subject: Subject) -> dict[str, int]:
    return {"profiles": len(subject.profile_ids), "identifiers": len(subject.identifiers), "events": len(subject.messages),
            "keys": len(subject.key_ids)}


def _check_one_profile_type(subject: Subject, identifier: str) -> None:
    if subject.identifier_type is None and len({p for p in subject.profile_ids}) > 1:
        types = sorted({t for t, _ in subject.identifiers})
        raise QueryError(
            f"The bare value matches identifiers of {len(subject.profile_ids)} profiles.",
            fix="Say which type you mean, as type:value (types held for it: " + ", ".join(types) + ").",
            field="identifier",
        )


# --- export ---------------------------------------------------------------------------------

def export(runtime: Runtime, identifier: str, actor: Principal) -> dict[str, Any]:
    """Everything held about the person `identifier` names, as one JSON document (see the module
    docstring); the request is recorded (rejected when nothing is held) and audited."""
    _check("export", identifier)
    rid, asked = _new_id(), _asked(runtime, identifier)
    rules = rules_from_settings(runtime.settings)
    subject = find_subject(runtime.engine, runtime.vault, rules, identifier, cursor=runtime.engine.reader())
    if subject is None:
        raise _reject(runtime, rid, "export", asked, actor)
    _check_one_profile_type(subject, identifier)
    runtime.writer.call(lambda e: _insert(e, rid, "export", "in_progress", asked, actor))
    try:
        document = build_document(runtime.engine, subject, rid)
    except Exception as err:
        message = f"{type(err).__name__} while reading the stores"
        runtime.writer.call(lambda en: _finish(en, rid, "failed", None, message))
        raise
    counts = {name: _size(section) for name, section in document["stores"].items()}
    receipt = {"request_id": rid, "kind": "export", "subject": _summary(subject), "stores": counts}
    body = json.dumps(document, ensure_ascii=False, default=str).encode()
    key_id = subject.key_ids[0] if subject.key_ids else runtime.vault.event_key_id("privacy", rid)
    [sealed] = runtime.vault.seal_many([key_id], [body])

    def finish(e: Engine) -> None:
        e.execute("UPDATE privacy_requests SET status = 'completed', finished_at = ?, receipt = ?, key_id = ?, document = ? "
                  "WHERE request_id = ?", [_now(), json.dumps(receipt), key_id, sealed, rid])
        audit.record(e, actor, "privacy.export", f"privacy_request:{rid}",
                     {"identifier_type": asked.identifier_type or "any", "status": "completed", **_summary(subject)})

    runtime.writer.call(finish)
    return {**get(runtime, rid, with_document=False), "document": document}


def build_document(engine: Engine, subject: Subject, request_id: str) -> dict[str, Any]:
    reg = registry()
    clear = dict(clear_identifiers(subject))
    return {
        "format": FORMAT,
        "request_id": request_id,
        "generated_at": _now().isoformat(),
        "subject": {
            "profile_ids": list(subject.profile_ids),
            "identifiers": [
                {"type": t, "stored_as": v, "value": subject.clear.get(v, v)} for t, v in subject.identifiers
            ],
            "events": len(subject.messages),
        },
        "stores": {name: store.export(engine, subject) for name, store in reg.stores.items()},
        "notes": {
            "tokens": "Personal values are stored as tokens (pii:<kind>:<hex>); the vault section maps each to its value.",
            "clear_values": sorted(clear),
        },
    }


def _size(section: Any) -> int:
    if isinstance(section, list):
        return len(section)
    if isinstance(section, dict):
        return sum(_size(v) for v in section.values())
    return 1 if section else 0


# --- erase ------------------------------------------------------------------------------------

def erase(runtime: Runtime, identifier: str, actor: Principal) -> dict[str, Any]:
    """Erase the person `identifier` names everywhere (see the module docstring); returns the
    request with its receipt. Unknown identifiers are recorded as rejected and raise `SubjectNotFound`."""
    _check("erase", identifier)
    rid, asked = _new_id(), _asked(runtime, identifier)
    rules = rules_from_settings(runtime.settings)
    reg = registry()
    found: dict[str, Any] = {}

    def work(e: Engine) -> dict[str, Any] | None:
        subject = find_subject(e, runtime.vault, rules, identifier)
        if subject is None:
            return None
        _check_one_profile_type(subject, identifier)
        _insert(e, rid, "erase", "in_progress", asked, actor)
        hashes = _suppression(subject, runtime)  # before anything is deleted: tokens revealed while their keys exist
        counts = {name: store.erase(e, subject) for name, store in reg.stores.items()}
        added = _add_suppression(e, hashes, rid)
        receipt = {"request_id": rid, "kind": "erase", "subject": _summary(subject), "stores": counts,
                   "suppression_entries_added": added, "suppression_entries": len(hashes)}
        e.execute("UPDATE privacy_requests SET receipt = ? WHERE request_id = ?", [json.dumps(receipt), rid])
        audit.record(e, actor, "privacy.erase", f"privacy_request:{rid}",
                     {"identifier_type": asked.identifier_type or "any", "status": "in_progress", "rows": sum(counts.values()),
                      "suppression_entries_added": added})
        e.after_commit(lambda: runtime.vault.suppressed.update(h for h, _ in hashes))
        found["subject"] = subject
        return receipt

    try:
        receipt = runtime.writer.call(work)
    except SubjectNotFound:
        raise
    except RefineryError as err:
        if isinstance(err, QueryError):
            raise
        _fail(runtime, rid, asked, actor, err.message)
        raise
    except Exception as err:
        _fail(runtime, rid, asked, actor, f"{type(err).__name__} while erasing; nothing was erased (rolled back)")
        raise
    if receipt is None:
        raise _reject(runtime, rid, "erase", asked, actor)

    subject = found["subject"]
    try:
        keys = sorted(set(subject.key_ids) | set(subject.found_keys))
        destroyed = runtime.vault.destroy(keys)
        destinations = {name: target.request_deletion(subject) for name, target in reg.destinations.items()}
    except Exception as err:
        message = f"{type(err).__name__} while destroying the keys; the rows are erased, the keys not yet: ask again"
        runtime.writer.call(lambda e: _finish(e, rid, "failed", None, message))
        raise
    receipt.update({"keys_destroyed": destroyed, "destinations_asked": sorted(destinations),
                    "destination_answers": destinations, "finished_at": _now().isoformat()})

    def finish(e: Engine) -> None:
        _finish(e, rid, "completed", receipt)
        audit.record(e, actor, "privacy.erase", f"privacy_request:{rid}",
                     {"status": "completed", "keys_destroyed": destroyed, "destinations_asked": len(destinations)})

    runtime.writer.call(finish)
    runtime.vault.forget_stored()
    log.info("privacy: erasure %s completed (%d rows, %d keys)", rid, sum(receipt["stores"].values()), destroyed)
    return get(runtime, rid, with_document=False)


def _fail(runtime: Runtime, rid: str, asked: Asked, actor: Principal, message: str) -> None:
    def write(e: Engine) -> None:
        _insert(e, rid, "erase", "failed", asked, actor, error=message)
        audit.record(e, actor, "privacy.erase", f"privacy_request:{rid}", {"status": "failed"})

    runtime.writer.call(write)


def _suppression(subject: Subject, runtime: Runtime) -> list[tuple[str, str]]:
    """(hash, kind) of every identifier of the subject."""
    return sorted({(runtime.vault.suppression_hash(t, v), t) for t, v in clear_identifiers(subject)})


def _add_suppression(engine: Engine, entries: list[tuple[str, str]], rid: str) -> int:
    if not entries:
        return 0
    rows = engine.fetch_all(
        "INSERT INTO suppression_list (hash, kind, request_id, added_at) "
        "SELECT h, k, ?, ? FROM (SELECT unnest(CAST(? AS VARCHAR[])) AS h, unnest(CAST(? AS VARCHAR[])) AS k) "
        "ON CONFLICT DO NOTHING RETURNING hash",
        [rid, _now(), [h for h, _ in entries], [k for _, k in entries]],
    )
    return len(rows)


def suppressed(runtime: Runtime, identifier: str) -> bool:
    """Whether `identifier` (type:value) is on the suppression list."""
    rules = rules_from_settings(runtime.settings)
    kind, raw = read.parse_identifier(identifier, rules)
    if kind is None:
        return False
    return runtime.vault.suppression_hash(kind, normal_value(kind, raw, rules)) in runtime.vault.suppressed


# --- reading requests -------------------------------------------------------------------------

_COLUMNS = ("request_id, kind, status, identifier_type, actor, received_at, due_at, started_at, finished_at, "
            "CAST(receipt AS VARCHAR) AS receipt, error")


def _row(r: dict[str, Any]) -> dict[str, Any]:
    out = {k: _iso(v) for k, v in r.items() if k not in ("document", "key_id", "has_document")}
    out["receipt"] = json.loads(r["receipt"]) if r.get("receipt") else None
    due = r.get("due_at")
    out["overdue"] = bool(due is not None and r["status"] in ("received", "in_progress") and due < _now())
    if "has_document" in r:
        out["document_available"] = bool(r["has_document"])
    return out


def list_requests(engine: Engine, *, limit: int = 100, status: str | None = None) -> list[dict[str, Any]]:
    if status is not None and status not in STATUSES:
        raise RequestError(f"Unknown status {status!r}.", fix=f"Use one of: {', '.join(STATUSES)}.", field="status")
    rows = engine.fetch_dicts(
        f"SELECT {_COLUMNS}, document IS NOT NULL AS has_document FROM privacy_requests "  # noqa: S608 - constant columns
        "WHERE (CAST(? AS VARCHAR) IS NULL OR status = ?) ORDER BY received_at DESC LIMIT ?",
        [status, status, limit], cursor=engine.reader(),
    )
    return [_row(r) for r in rows]


def get(runtime: Runtime, request_id: str, *, with_document: bool) -> dict[str, Any]:
    engine = runtime.engine
    rows = engine.fetch_dicts(
        f"SELECT {_COLUMNS}, key_id, document, document IS NOT NULL AS has_document FROM privacy_requests WHERE request_id = ?",  # noqa: S608
        [request_id], cursor=engine.reader(),
    )
    if not rows:
        raise NotFoundError(f"No subject request {request_id!r}.", fix="List them with: refinery privacy requests", field="request_id")
    r = rows[0]
    out = _row(r)
    if with_document and r.get("document") is not None:
        [plain] = runtime.vault.unseal_many([r["key_id"]], [r["document"]])
        out["document"] = json.loads(plain) if plain is not None else None
        if plain is None:
            out["document_available"] = False
    return out
