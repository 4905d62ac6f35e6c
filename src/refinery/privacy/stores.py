"""The built-in personal stores, in one place: every table Refinery creates is listed here, either
covered by a store (what export returns and erasure deletes) or declared free of personal data
with the reason. Later stages register their stores from their own modules.

Erasure, per table: the person's own rows are deleted (found by profile id, identifier, vault key
or message id); other people's rows that mention one of the person's identifiers (their email in
someone else's event, an edge of a merge refused between them) keep the row with the value
replaced by `[erased]`. Names, addresses and IPs are not looked for in other people's rows: people
share them (and so do their tokens), so only identifiers are.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from refinery.privacy.registry import REGISTRY, Subject
from refinery.privacy.subject import Matcher, key, unseal_one
from refinery.privacy.tokens import is_token
from refinery.storage.engine import Engine

ERASED = "[erased]"
_PARAM = re.compile(r"\$([a-z_]+)")


def params(subject: Subject) -> dict[str, Any]:
    """The subject as named SQL parameters (lists bound as VARCHAR[]; never spliced into text)."""
    idents = [key(t, v) for t, v in subject.identifiers]
    return {
        "pids": list(subject.profile_ids),
        "idents": idents,
        "ids": subject.ids,
        "values": subject.values(),
        "devices": subject.values("device_id"),
        "ads": subject.values("advertising_id"),
        "keys": sorted(set(subject.key_ids) | set(subject.found_keys)),
        "msgs": [key(s, m) for s, m in subject.messages],
        "id_tokens": list(subject.identifier_tokens),
        "objects": [f"profile:{p}" for p in subject.profile_ids],
    }


def bind(sql: str, values: dict[str, Any]) -> dict[str, Any]:
    """The parameters `sql` names (DuckDB refuses unused named parameters)."""
    return {name: values[name] for name in dict.fromkeys(_PARAM.findall(sql))}


def _in(column: str, param: str) -> str:
    return f"{column} IN (SELECT unnest(CAST(${param} AS VARCHAR[])))"


def jsonable(row: dict[str, Any], json_columns: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, (bytes, bytearray, memoryview)):
            continue
        if isinstance(v, (datetime, date)):
            v = v.isoformat()
        elif k in json_columns and isinstance(v, str):
            with contextlib.suppress(ValueError):
                v = json.loads(v)
        out[k] = v
    return out


def columns(engine: Engine, table: str, cursor: Any = None) -> list[tuple[str, str]]:
    """(name, type) of a table's columns."""
    rows = engine.fetch_all(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = 'main' AND table_name = ? "
        "ORDER BY ordinal_position", [table], cursor=cursor,
    )
    return [(str(n), str(t)) for n, t in rows]


def _constrained(engine: Engine, table: str) -> set[str]:
    rows = engine.fetch_all(
        "SELECT constraint_column_names FROM duckdb_constraints() WHERE table_name = ? "
        "AND constraint_type IN ('PRIMARY KEY', 'UNIQUE')", [table],
    )
    return {c for r in rows for c in (r[0] or [])}


# --- scrubbing other people's rows -------------------------------------------------------------

def _escape(text: str) -> str:
    """`text` as an RE2 literal."""
    return re.sub(r"([\\.^$|?*+()\[\]{}])", r"\\\1", text)


def _alternation(needles: list[str], *, quoted: bool) -> str | None:
    parts = []
    for n in sorted(set(needles), key=lambda s: (-len(s), s)):
        lit = _escape(json.dumps(n, ensure_ascii=False) if quoted else n)
        parts.append(f"(?i:{lit})" if "@" in n else lit)
    return "|".join(parts) if parts else None


def _specific(value: str) -> bool:
    """Values specific enough to replace inside free text (not only as a whole value)."""
    return is_token(value) or "@" in value or len(value) >= 16


def scrub(engine: Engine, table: str, subject: Subject) -> int:
    """Replace the subject's identifiers in `table`'s text and JSON columns (rows left after the
    person's own were deleted) by `[erased]`; returns the values replaced (rows x columns)."""
    needles = subject.needles()
    if not needles:
        return 0
    in_json = _alternation(needles, quoted=True)
    in_text = _alternation([n for n in needles if _specific(n)], quoted=False)
    skip = _constrained(engine, table)
    changed = 0
    for name, kind in columns(engine, table):
        if name in skip:
            continue
        col = f'"{name}"'
        if kind == "JSON" and in_json:
            sql = (f"UPDATE {table} SET {col} = CAST(regexp_replace(CAST({col} AS VARCHAR), ?, ?, 'g') AS JSON) "  # noqa: S608 - names from the catalog
                   f"WHERE regexp_matches(CAST({col} AS VARCHAR), ?)")
            changed += _count(engine.fetch_all(sql, [in_json, json.dumps(ERASED), in_json]))
        elif kind == "VARCHAR" and in_text:
            sql = f"UPDATE {table} SET {col} = regexp_replace({col}, ?, ?, 'g') WHERE regexp_matches({col}, ?)"  # noqa: S608
            changed += _count(engine.fetch_all(sql, [in_text, ERASED, in_text]))
    return changed


def _count(rows: list[tuple[Any, ...]]) -> int:
    return int(rows[0][0]) if rows and rows[0] and rows[0][0] is not None else 0


# --- stores over tables ------------------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    """One table of a store: the condition that selects the person's own rows (named parameters
    from `params`), and whether other rows are scrubbed of the person's identifiers."""

    table: str
    owned: str
    order: str | None = None
    scrub: bool = True
    #: (type column, value column) pairs and profile id columns that may name someone else: exports
    #: show those as "[another identifier]" / "[another profile]" (and drop such a row's evidence).
    pairs: tuple[tuple[str, str], ...] = ()
    profile_columns: tuple[str, ...] = ()


@dataclass
class TableStore:
    """A personal store over one or more tables (see `Part`)."""

    name: str
    parts: tuple[Part, ...]
    tables: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.tables = tuple(p.table for p in self.parts)

    def export(self, engine: Engine, subject: Subject) -> Any:
        cursor = engine.reader()
        values = params(subject)
        out: dict[str, list[dict[str, Any]]] = {}
        for p in self.parts:
            json_cols = {n for n, t in columns(engine, p.table, cursor) if t == "JSON"}
            sql = f"SELECT * FROM {p.table} WHERE {p.owned}" + (f" ORDER BY {p.order}" if p.order else "")  # noqa: S608 - constant parts
            out[p.table] = [_others_hidden(p, jsonable(r, json_cols), subject)
                            for r in engine.fetch_dicts(sql, bind(sql, values), cursor=cursor)]
        return out

    def erase(self, engine: Engine, subject: Subject) -> int:
        values = params(subject)
        n = 0
        for p in self.parts:
            sql = f"DELETE FROM {p.table} WHERE {p.owned}"  # noqa: S608 - constant parts
            n += _count(engine.fetch_all(sql, bind(sql, values)))
            if p.scrub:
                n += scrub(engine, p.table, subject)
        return n


def _others_hidden(part: Part, row: dict[str, Any], subject: Subject) -> dict[str, Any]:
    """An exported row without other people's identifiers and profile ids."""
    mine = set(subject.identifiers)
    pids = set(subject.profile_ids)
    other = False
    for t, v in part.pairs:
        if row.get(v) is not None and (row.get(t), row.get(v)) not in mine:
            row[v] = "[another identifier]"
            other = True
    for c in part.profile_columns:
        if row.get(c) is not None and row[c] not in pids:
            row[c] = "[another profile]"
            other = True
    if other and "evidence" in row:
        row["evidence"] = None
    return row


_MSG = "(source || chr(31) || message_id)"


class PayloadStore(TableStore):
    """`raw_events` or `failed_events`: rows sealed under the person's keys or of their messages;
    rows sealed under a key of their own (`ek_`, events without a subject) or stored in clear are
    opened and searched for the person's identifiers. Exports unseal the payloads."""

    def __init__(self, name: str, table: str, id_column: str):
        super().__init__(name, (Part(table, f"{_in('key_id', 'keys')} OR {_in(_MSG, 'msgs')}", order=id_column),))
        self.table = table
        self.id_column = id_column

    def export(self, engine: Engine, subject: Subject) -> Any:
        vault = subject.vault
        cursor = engine.reader()
        values = params(subject)
        sql = (f"SELECT * EXCLUDE (payload), CAST(payload AS VARCHAR) AS payload FROM {self.table} "  # noqa: S608 - constant
               f"WHERE {self.parts[0].owned} ORDER BY {self.id_column}")
        rows = engine.fetch_dicts(sql, bind(sql, values), cursor=cursor)
        extra = self._unattributed(engine, subject, cursor)
        if extra:
            more = engine.fetch_dicts(
                f"SELECT * EXCLUDE (payload), CAST(payload AS VARCHAR) AS payload FROM {self.table} "  # noqa: S608
                f"WHERE {self.id_column} IN (SELECT unnest(CAST(? AS BIGINT[])))", [extra], cursor=cursor)
            rows += more
        opened = vault.unseal_many([r.get("key_id") if r.get("sealed") is not None else None for r in rows],
                                   [r.get("sealed") for r in rows])
        json_cols = {n for n, t in columns(engine, self.table, cursor) if t == "JSON"} | {"payload"}
        out = []
        for r, plain in zip(rows, opened, strict=True):
            sealed = r.get("sealed")
            row = jsonable(r, json_cols)
            row.pop("key_id", None)
            if sealed is not None:
                row["payload_unsealed"] = json.loads(plain) if plain is not None else None
            out.append(row)
        return {self.table: out}

    def _unattributed(self, engine: Engine, subject: Subject, cursor: Any = None) -> list[int]:
        """Ids of rows not sealed under the person's keys whose payload mentions them."""
        matcher = Matcher(subject, subject.phone_region)
        if not matcher:
            return []
        vault = subject.vault
        values = params(subject)
        sql = (f"SELECT {self.id_column}, key_id, sealed, CAST(payload AS VARCHAR) FROM {self.table} "  # noqa: S608 - constant
               f"WHERE NOT coalesce(({self.parts[0].owned}), false) AND ((sealed IS NOT NULL AND key_id LIKE 'ek\\_%' ESCAPE '\\') "
               "OR (sealed IS NULL AND payload IS NOT NULL))")
        found = []
        for row_id, key_id, sealed, payload in engine.fetch_all(sql, bind(sql, values), cursor=cursor):
            text = payload
            if sealed is not None:
                plain = unseal_one(vault, key_id, sealed)
                text = plain.decode("utf-8", "replace") if plain is not None else None
            if text is not None and matcher.mentions(text):
                found.append(int(row_id))
        return found

    def erase(self, engine: Engine, subject: Subject) -> int:
        extra = self._unattributed(engine, subject)
        n = 0
        if extra:
            rows = engine.fetch_all(
                f"DELETE FROM {self.table} WHERE {self.id_column} IN (SELECT unnest(CAST(? AS BIGINT[]))) RETURNING key_id",  # noqa: S608
                [extra])
            n += len(rows)
            subject.found_keys.extend(sorted({r[0] for r in rows if r[0] and str(r[0]).startswith("ek_")}))
        return n + super().erase(engine, subject)


class VaultStore(TableStore):
    """`vault_values`: the person's sealed values (under their keys) and their identifier tokens
    sealed under anyone's key. Exports reveal them in clear."""

    def __init__(self) -> None:
        super().__init__("vault", (Part("vault_values", f"{_in('key_id', 'keys')} OR {_in('token', 'id_tokens')}", "token", scrub=False),))

    def export(self, engine: Engine, subject: Subject) -> Any:
        vault = subject.vault
        values = params(subject)
        sql = f"SELECT token, key_id, kind, sealed, first_seen FROM vault_values WHERE {self.parts[0].owned} ORDER BY token"  # noqa: S608
        rows = engine.fetch_dicts(sql, bind(sql, values), cursor=engine.reader())
        plain = vault.unseal_many([r["key_id"] for r in rows], [r["sealed"] for r in rows])
        return [{"token": r["token"], "kind": r["kind"], "value": p.decode() if p is not None else None,
                 "first_seen": r["first_seen"].isoformat()} for r, p in zip(rows, plain, strict=True)]


class AuditStore:
    """The audit log: exported (who read or changed the person's profile, and when), never erased
    here: it is append-only and hash-chained, and holds profile ids, never identifiers
    (docs/decisions/0015-subject-requests.md)."""

    name = "audit"
    tables = ("audit_log",)

    def export(self, engine: Engine, subject: Subject) -> Any:
        rows = engine.fetch_dicts(
            "SELECT seq, recorded_at, actor_name, actor_role, action, object, details FROM audit_log "
            "WHERE object IN (SELECT unnest(CAST(? AS VARCHAR[]))) ORDER BY seq",
            [[f"profile:{p}" for p in subject.profile_ids]], cursor=engine.reader(),
        )
        return [jsonable(r, {"details"}) for r in rows]

    def erase(self, engine: Engine, subject: Subject) -> int:
        return 0


class RequestsStore:
    """Earlier subject requests of the person: their sealed export documents are dropped (the
    request rows stay, naming the person only by a keyed hash, like the suppression list)."""

    name = "privacy_requests"
    tables = ("privacy_requests",)

    def export(self, engine: Engine, subject: Subject) -> Any:
        rows = engine.fetch_dicts(
            "SELECT request_id, kind, status, identifier_type, received_at, due_at, finished_at FROM privacy_requests "
            "WHERE key_id IN (SELECT unnest(CAST(? AS VARCHAR[]))) OR identifier_hash IN (SELECT unnest(CAST(? AS VARCHAR[]))) "
            "ORDER BY received_at",
            [list(subject.key_ids), suppression_hashes(subject)], cursor=engine.reader(),
        )
        return [jsonable(r, set()) for r in rows]

    def erase(self, engine: Engine, subject: Subject) -> int:
        return _count(engine.fetch_all(
            "UPDATE privacy_requests SET document = NULL WHERE document IS NOT NULL AND (key_id IN (SELECT unnest(CAST(? AS VARCHAR[]))) "
            "OR identifier_hash IN (SELECT unnest(CAST(? AS VARCHAR[]))))", [list(subject.key_ids), suppression_hashes(subject)],
        ))


def clear_identifiers(subject: Subject) -> list[tuple[str, str]]:
    """(type, clear normal value) of every identifier of the subject (tokens revealed)."""
    out = []
    for t, v in subject.identifiers:
        value = subject.clear.get(v) if is_token(v) else v
        if value:
            out.append((t, value))
    return sorted(set(out))


def suppression_hashes(subject: Subject) -> list[str]:
    """The suppression-list hashes of the subject's identifiers."""
    return sorted({subject.vault.suppression_hash(t, v) for t, v in clear_identifiers(subject)}) if subject.vault else []


@dataclass
class EmptyStore:
    """A stage that will hold personal data and has no tables yet (segments, features, activation):
    registered now so exports show its section and its owner replaces it when the stage lands."""

    name: str
    note: str
    tables: tuple[str, ...] = ()

    def export(self, engine: Engine, subject: Subject) -> Any:
        return []

    def erase(self, engine: Engine, subject: Subject) -> int:
        return 0


def _ident(type_col: str, value_col: str) -> str:
    return _in(f"({type_col} || chr(31) || {value_col})", "idents")


BUILTIN: tuple[Any, ...] = (
    TableStore("events", (Part("events", " OR ".join((
        _in(_MSG, "msgs"), _in("user_id", "ids"), _in("anonymous_id", "ids"), _in("previous_id", "ids"),
        _in("device_id", "devices"), _in("advertising_id", "ads"))), "timestamp, message_id"),)),
    PayloadStore("raw_events", "raw_events", "raw_id"),
    PayloadStore("failed_events", "failed_events", "failure_id"),
    TableStore("message_ids", (Part("message_ids", _in(_MSG, "msgs"), "first_seen", scrub=False),)),
    TableStore("identity", (
        Part("identities", f"{_in('profile_id', 'pids')} OR {_ident('identifier_type', 'value')}", "identifier_type, value"),
        Part("identity_edges", f"{_ident('a_type', 'a_value')} OR {_ident('b_type', 'b_value')}", "event_time",
             pairs=(("a_type", "a_value"), ("b_type", "b_value"))),
        Part("identity_blocked", f"{_ident('identifier_type', 'value')} OR {_ident('other_type', 'other_value')} "
             f"OR {_in('profile_a', 'pids')} OR {_in('profile_b', 'pids')}", "event_time",
             pairs=(("identifier_type", "value"), ("other_type", "other_value")), profile_columns=("profile_a", "profile_b")),
        Part("profile_merges", f"{_in('surviving_profile_id', 'pids')} OR {_in('merged_profile_id', 'pids')}", "merged_at",
             profile_columns=("surviving_profile_id", "merged_profile_id")),
        Part("identity_links", f"{_ident('a_type', 'a_value')} OR {_ident('b_type', 'b_value')}", "created_at",
             pairs=(("a_type", "a_value"), ("b_type", "b_value"))),
        Part("identity_overrides", f"{_in('profile_id', 'pids')} OR "
             "list_has_any(CAST(json_extract_string(identifiers, '$[*].value') AS VARCHAR[]), CAST($values AS VARCHAR[]))",
             "created_at"),
    )),
    TableStore("profiles", (
        Part("profiles", _in("profile_id", "pids"), "profile_id"),
        Part("event_profiles", f"{_in('profile_id', 'pids')} OR {_in(_MSG, 'msgs')}", "timestamp"),
    )),
    TableStore("consent", (
        Part("consent_log", f"{_in('profile_id', 'pids')} OR {_ident('subject_type', 'subject_value')}", "log_id"),
        Part("consent_conflicts", _in("profile_id", "pids"), "detected_at"),
    )),
    VaultStore(),
    AuditStore(),
    RequestsStore(),
    # segments (refinery/segments/): membership history, the entered/exited outbox, computed trait values
    TableStore("segments", (
        Part("segment_members", _in("profile_id", "pids"), "segment, entered_at", scrub=False),
        Part("segment_events", _in("profile_id", "pids"), "event_id", scrub=False),
        Part("computed_trait_values", _in("profile_id", "pids"), "name", scrub=False),
    )),
    EmptyStore("features", "feature values and the online store (the features stage registers its store)"),
)

NO_PERSONAL_DATA: dict[str, str] = {
    "sources": "source names, hashed write keys and settings",
    "imports": "import jobs: file paths and hashes, the mapping, counts and the job's error (no row values)",
    "schema_migrations": "the storage version",
    "identity_resolutions": "one row per resolution run: its rules and counts",
    "consent_syncs": "one row per consent job run: counts and category names",
    "api_tokens": "staff API tokens (hashed), their names and roles",
    "audit_head": "the audit log's last sequence number and hash",
    "retention_*": "retention overrides per source and retention runs with counts",
    # segments: definitions and run counts (a rule's literals compare against tokens; docs/segments.md)
    "segments": "segment definitions: names, rule text, descriptions, who changed them",
    "segment_versions": "every saved rule of every segment, with who saved it",
    "segment_runs": "one row per segment recomputation: counts, status and input fingerprints",
    "computed_traits": "computed trait definitions: names, expressions, counts",
    "suppression_list": "keyed hashes of erased identifiers (neither the values nor their tokens), kept so the person stays erased",
    # features: definitions only (docs/features.md); feature values of a person will live in the online store
    "features": "feature definitions: names, expressions or checked SQL, windows, owners",
    "feature_versions": "every saved feature definition, with who saved it",
}


def register_builtin() -> None:
    for store in BUILTIN:
        if store.name not in REGISTRY.stores:
            REGISTRY.register(store)
    for table, reason in NO_PERSONAL_DATA.items():
        REGISTRY.declare_no_personal_data(table, reason)
    # activation (refinery/activation/personal.py): which destinations hold a profile, and the outbox's records
    from refinery.activation.personal import register as register_activation

    register_activation()
    # features (refinery/features/personal.py): feature values per profile in the online store
    from refinery.features.personal import register as register_features

    register_features()


register_builtin()

