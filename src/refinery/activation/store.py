"""Destinations and syncs: define, change, delete and read them.

A **destination** is a name, a registered kind, the consent purpose it serves, and a configuration
validated by the kind's pydantic model. Fields typed `SecretStr` are secrets: sealed with the
vault (`Vault.seal_secret`, bound to `destination:<name>:<field>`) into `destination_secrets`,
never stored in clear, never returned (shown as `***`), never logged or audited.

A **sync** connects a segment to a destination: a mode (`full`, `diff`, `mirror`), a mapping
`{output field: source}` where a source is a profile trait, a computed trait or `profile_id`,
and a schedule (`realtime`, an interval in minutes, or `manual`). The segment must exist and
every mapping source must be known to the store (a typo is refused with a suggestion).

Changes run inside the writer and are audited in their own transaction, as segments' are. SQL is
constant text with bound parameters.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, SecretStr, ValidationError

from refinery.activation.destination import PURPOSES, DestinationType, get_type
from refinery.activation.errors import (
    ActivationError,
    DestinationExists,
    DestinationInUse,
    DestinationNotFound,
    SyncExists,
    SyncNotFound,
    UnknownMappingSource,
)
from refinery.governance import audit
from refinery.governance.principal import Principal
from refinery.storage.engine import Engine

#: Destination and sync names: as segment names.
NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")
#: Output field names in a mapping: what the destination receives.
FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
MODES = ("full", "diff", "mirror")
SCHEDULES = ("realtime", "interval", "manual")
PROFILE_ID = "profile_id"
SECRET_SHOWN = "***"
MAX_MAPPING = 100
MAX_BATCH = 100_000


def _iso(at: datetime | None) -> str | None:
    return at.astimezone(UTC).isoformat() if at is not None else None


def _json(value: Any) -> dict[str, Any]:
    loaded = json.loads(value) if isinstance(value, str) else value
    return dict(loaded) if isinstance(loaded, dict) else {}


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise ActivationError(
            f"{what.capitalize()} name {name!r} is not allowed.",
            fix="Use 1-64 lower-case letters, digits, '_' or '-', starting with a letter or digit, e.g. 'crm_webhook'.",
            field="name",
        )
    return name


def check_purpose(purpose: str) -> str:
    if purpose not in PURPOSES:
        raise ActivationError(
            f"Unknown purpose {purpose!r}.",
            fix=f"Declare the consent purpose the destination serves: one of {', '.join(PURPOSES)}.", field="purpose",
        )
    return purpose


# --- destinations -------------------------------------------------------------------------------

@dataclass(frozen=True)
class DestinationDef:
    name: str
    kind: str
    purpose: str
    config: dict[str, Any]          # without secrets
    secret_fields: tuple[str, ...]  # the fields sealed in destination_secrets
    description: str | None
    enabled: bool
    created_by: str
    created_at: datetime
    updated_by: str
    updated_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """As the API and CLI show it: secrets as `***`, never their values."""
        d = asdict(self)
        d["config"] = {**self.config, **{f: SECRET_SHOWN for f in self.secret_fields}}
        d["secret_fields"] = list(self.secret_fields)
        d["created_at"], d["updated_at"] = _iso(self.created_at), _iso(self.updated_at)
        return d


def secret_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """The fields of a configuration model typed `SecretStr` (or `SecretStr | None`)."""
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        args = typing.get_args(ann) if isinstance(ann, types.UnionType) or typing.get_origin(ann) is typing.Union else ()
        if ann is SecretStr or SecretStr in args:
            out.append(name)
    return tuple(out)


def validate_config(dtype: DestinationType, config: Mapping[str, Any]) -> BaseModel:
    """The configuration as the kind's model reads it; errors name the field, never echo values (secrets)."""
    if not isinstance(config, Mapping):
        raise ActivationError("The configuration is not an object.", fix="Give the fields as a JSON object.", field="config")
    try:
        return dtype.config_model.model_validate(dict(config))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "config"
        fields = ", ".join(dtype.config_model.model_fields)
        raise ActivationError(
            f"Destination kind {dtype.kind!r}: config.{where}: {first.get('msg', 'invalid')}"
            + (f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else "") + ".",
            fix=f"Correct config.{where}; the {dtype.kind} kind takes: {fields}.", field=f"config.{where}",
        ) from None


def _secret_name(destination: str, field: str) -> str:
    return f"destination:{destination}:{field}"


_DEST_COLUMNS = "name, kind, purpose, config, description, enabled, created_by, created_at, updated_by, updated_at"


def _destination(engine: Engine, row: tuple[Any, ...], cursor: Any) -> DestinationDef:
    name, kind, purpose, config, description, enabled, cby, cat, uby, uat = row
    secrets = engine.fetch_all("SELECT field FROM destination_secrets WHERE destination = ? ORDER BY field", [name], cursor=cursor)
    return DestinationDef(str(name), str(kind), str(purpose), _json(config), tuple(str(f) for (f,) in secrets), description,
                          bool(enabled), str(cby), cat, str(uby), uat)


def find_destination(engine: Engine, name: str, *, cursor: Any = None) -> DestinationDef | None:
    cur = cursor if cursor is not None else engine.reader()
    rows = engine.fetch_all(f"SELECT {_DEST_COLUMNS} FROM destinations WHERE name = ?", [name], cursor=cur)  # noqa: S608 - constant text
    return _destination(engine, rows[0], cur) if rows else None


def get_destination(engine: Engine, name: str, *, cursor: Any = None) -> DestinationDef:
    found = find_destination(engine, name, cursor=cursor)
    if found is None:
        known = [d.name for d in list_destinations(engine, cursor=cursor)]
        raise DestinationNotFound(
            f"No destination {name!r}.",
            fix=f"Use one of: {', '.join(known)}." if known else "Create one first: refinery destinations create NAME --kind KIND --purpose PURPOSE",
            field="destination",
        )
    return found


def list_destinations(engine: Engine, *, cursor: Any = None) -> list[DestinationDef]:
    cur = cursor if cursor is not None else engine.reader()
    rows = engine.fetch_all(f"SELECT {_DEST_COLUMNS} FROM destinations ORDER BY name", cursor=cur)  # noqa: S608 - constant text
    return [_destination(engine, r, cur) for r in rows]


def _split(dtype: DestinationType, model: BaseModel) -> tuple[dict[str, Any], dict[str, str]]:
    """(public config, {secret field: clear value}) of a validated configuration."""
    secrets = secret_fields(dtype.config_model)
    public = model.model_dump(mode="json", exclude=set(secrets))
    clear: dict[str, str] = {}
    for f in secrets:
        value = getattr(model, f)
        if isinstance(value, SecretStr):
            clear[f] = value.get_secret_value()
    return public, clear


def _save_secrets(engine: Engine, vault: Any, name: str, clear: Mapping[str, str]) -> None:
    engine.execute("DELETE FROM destination_secrets WHERE destination = ?", [name])
    for f, value in sorted(clear.items()):
        engine.execute("INSERT INTO destination_secrets (destination, field, sealed) VALUES (?, ?, ?)",
                       [name, f, vault.seal_secret(_secret_name(name, f), value)])


def unsealed_secrets(engine: Engine, vault: Any, name: str, *, cursor: Any = None) -> dict[str, str]:
    rows = engine.fetch_all("SELECT field, sealed FROM destination_secrets WHERE destination = ?", [name],
                            cursor=cursor if cursor is not None else engine.reader())
    return {str(f): vault.unseal_secret(_secret_name(name, str(f)), bytes(s)) for f, s in rows}


def live_config(engine: Engine, vault: Any, dest: DestinationDef, *, cursor: Any = None) -> BaseModel:
    """The destination's full configuration (secrets unsealed) as its kind's model: for its factory only."""
    dtype = get_type(dest.kind)
    return validate_config(dtype, {**dest.config, **unsealed_secrets(engine, vault, dest.name, cursor=cursor)})


def create_destination(engine: Engine, vault: Any, actor: Principal, name: str, kind: str, purpose: str,
                       config: Mapping[str, Any], description: str | None = None) -> DestinationDef:
    """Save a destination (inside the writer); its configuration is checked by its kind's model first."""
    check_name(name, "destination")
    check_purpose(purpose)
    dtype = get_type(kind)
    if find_destination(engine, name, cursor=engine.reader()) is not None:
        raise DestinationExists(f"Destination {name!r} exists already.",
                                fix=f"Change it with: refinery destinations update {name} ..., or choose another name.", field="name")
    model = validate_config(dtype, config)
    public, clear = _split(dtype, model)
    at = datetime.now(UTC)
    engine.execute(
        f"INSERT INTO destinations ({_DEST_COLUMNS}) VALUES (?, ?, ?, ?, ?, TRUE, ?, ?, ?, ?)",  # noqa: S608 - constant text
        [name, kind, purpose, json.dumps(public, sort_keys=True), description, actor.name, at, actor.name, at],
    )
    _save_secrets(engine, vault, name, clear)
    audit.record(engine, actor, "destinations.create", f"destination:{name}",
                 {"kind": kind, "purpose": purpose, "fields": sorted(public), "secret_fields": sorted(clear)})
    return DestinationDef(name, kind, purpose, public, tuple(sorted(clear)), description, True, actor.name, at, actor.name, at)


def update_destination(engine: Engine, vault: Any, actor: Principal, name: str, *, config: Mapping[str, Any] | None = None,
                       purpose: str | None = None, description: str | None = None, enabled: bool | None = None) -> DestinationDef:
    """Change a destination (inside the writer). `config` replaces the configuration; a secret field
    left out keeps its sealed value."""
    dest = get_destination(engine, name, cursor=engine.reader())
    if purpose is not None:
        check_purpose(purpose)
    changed: dict[str, Any] = {}
    public, secret_names = dest.config, list(dest.secret_fields)
    if config is not None:
        dtype = get_type(dest.kind)
        kept = {f: v for f, v in unsealed_secrets(engine, vault, name, cursor=engine.reader()).items() if f not in config}
        model = validate_config(dtype, {**kept, **config})
        public, clear = _split(dtype, model)
        _save_secrets(engine, vault, name, clear)
        secret_names = sorted(clear)
        changed["fields"] = sorted(public)
        changed["secrets_changed"] = sorted(f for f in clear if f in config)
    at = datetime.now(UTC)
    new = DestinationDef(name, dest.kind, purpose or dest.purpose, public, tuple(secret_names),
                         dest.description if description is None else description,
                         dest.enabled if enabled is None else enabled, dest.created_by, dest.created_at, actor.name, at)
    engine.execute(
        "UPDATE destinations SET purpose = ?, config = ?, description = ?, enabled = ?, updated_by = ?, updated_at = ? WHERE name = ?",
        [new.purpose, json.dumps(public, sort_keys=True), new.description, new.enabled, actor.name, at, name],
    )
    if purpose is not None and purpose != dest.purpose:
        changed["purpose"] = purpose
    if enabled is not None:
        changed["enabled"] = enabled
    audit.record(engine, actor, "destinations.update", f"destination:{name}", changed)
    return new


def delete_destination(engine: Engine, actor: Principal, name: str) -> dict[str, Any]:
    """Delete a destination (inside the writer); refused while a sync sends to it. Its outbox and
    dead letters go with it (there is nothing left to deliver them to)."""
    get_destination(engine, name, cursor=engine.reader())
    users = [s.name for s in list_syncs(engine, cursor=engine.reader()) if s.destination == name]
    if users:
        raise DestinationInUse(f"Destination {name!r} is used by sync(s) {', '.join(users)}.",
                               fix="Delete those syncs first: refinery syncs delete NAME", field="name")
    pending = engine.fetch_all("SELECT count(*) FROM activation_batches WHERE destination = ? AND status IN ('pending', 'delivering')",
                               [name])[0][0]
    engine.execute("DELETE FROM activation_records WHERE batch_id IN (SELECT batch_id FROM activation_batches WHERE destination = ?)", [name])
    engine.execute("DELETE FROM activation_batches WHERE destination = ?", [name])
    engine.execute("DELETE FROM activation_dead_letters WHERE destination = ?", [name])
    engine.execute("DELETE FROM destination_secrets WHERE destination = ?", [name])
    engine.execute("DELETE FROM destinations WHERE name = ?", [name])
    audit.record(engine, actor, "destinations.delete", f"destination:{name}", {"pending_batches_dropped": int(pending)})
    return {"name": name, "deleted": True, "pending_batches_dropped": int(pending)}


# --- syncs -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SyncDef:
    name: str
    segment: str
    destination: str
    mode: str
    mapping: dict[str, str]
    schedule: str
    interval_minutes: int | None
    batch_size: int | None
    enabled: bool
    event_cursor: int
    last_planned_at: datetime | None
    created_by: str
    created_at: datetime
    updated_by: str
    updated_at: datetime

    @property
    def schedule_text(self) -> str:
        return f"every {self.interval_minutes} minutes" if self.schedule == "interval" else self.schedule

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("last_planned_at", "created_at", "updated_at"):
            d[k] = _iso(d[k])
        d["schedule_text"] = self.schedule_text
        return d


def parse_schedule(text: str | int) -> tuple[str, int | None]:
    """`realtime`, `manual`, or an interval in minutes (`15`, `15m`, `every 15 minutes`)."""
    raw = str(text).strip().lower()
    if raw in ("realtime", "real-time", "manual"):
        return ("realtime" if raw.startswith("real") else "manual"), None
    m = re.fullmatch(r"(?:every\s+)?(\d{1,6})\s*(?:m|min|mins|minute|minutes)?", raw)
    if m and 0 < int(m.group(1)) <= 525_600:
        return "interval", int(m.group(1))
    raise ActivationError(f"Schedule {text!r} is not understood.",
                          fix="Use realtime, manual, or an interval in minutes such as 15 (at most a year).", field="schedule")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ActivationError(f"Unknown sync mode {mode!r}.",
                              fix="Use full (send every member each run), diff (who entered and who left) or mirror "
                                  "(diff, plus members whose mapped fields changed).", field="mode")
    return mode


def check_batch_size(size: int | None) -> int | None:
    if size is not None and not (isinstance(size, int) and 1 <= size <= MAX_BATCH):
        raise ActivationError(f"Batch size {size!r} is out of range.", fix=f"Use 1 to {MAX_BATCH}, or leave it out.", field="batch_size")
    return size


def mapping_sources(engine: Engine, catalog: Any = None) -> tuple[set[str], set[str]]:
    """(profile traits, computed traits) a mapping may name, read outside the writer (the catalog scans events)."""
    from refinery.segments import computed
    from refinery.segments.catalog import cached_catalog

    cat = catalog if catalog is not None else cached_catalog(engine)
    return set(cat.traits), set(computed.expressions(engine))


def check_mapping(mapping: Mapping[str, str], traits: set[str], computed_traits: set[str], dtype: DestinationType | None = None) -> dict[str, str]:
    from refinery.segments.catalog import suggest

    if not isinstance(mapping, Mapping) or not mapping:
        raise ActivationError("The mapping is empty.", fix="Map at least one output field, e.g. --map id=profile_id --map email=email.",
                              field="mapping")
    if len(mapping) > MAX_MAPPING:
        raise ActivationError(f"The mapping has {len(mapping)} fields; at most {MAX_MAPPING}.", fix="Map fewer fields.", field="mapping")
    known = traits | computed_traits | {PROFILE_ID}
    out: dict[str, str] = {}
    for target, source in mapping.items():
        if not isinstance(target, str) or not FIELD.match(target):
            raise ActivationError(f"Output field name {target!r} is not allowed.",
                                  fix="Use 1-64 letters, digits, '_', '.' or '-', starting with a letter or '_'.", field="mapping")
        if not isinstance(source, str) or source not in known:
            hint = suggest(str(source), known)
            raise UnknownMappingSource(
                f"Mapping {target}={source!r}: no trait or computed trait {source!r}"
                + (f"; did you mean {hint!r}?" if hint else "."),
                fix=(f"Use {hint!r}" if hint else "Use a trait the profiles have")
                + f" (traits: {', '.join(sorted(traits)[:20]) or 'none yet'}; computed traits: "
                f"{', '.join(sorted(computed_traits)) or 'none'}; or profile_id).",
                field=f"mapping.{target}",
            )
        out[target] = source
    needs = dtype.needs_fields if dtype is not None else ()
    if needs and not set(needs) & set(out):
        raise ActivationError(
            f"Destination kind {dtype.kind!r} needs one of the output fields {', '.join(needs)} in the mapping."  # type: ignore[union-attr]
            , fix=f"Map one, e.g. --map {needs[0]}={needs[0]}.", field="mapping")
    return out


_SYNC_COLUMNS = ("name, segment, destination, mode, mapping, schedule, interval_minutes, batch_size, enabled, event_cursor, "
                 "last_planned_at, created_by, created_at, updated_by, updated_at")


def _sync(row: tuple[Any, ...]) -> SyncDef:
    (name, segment, destination, mode, mapping, schedule, interval, batch, enabled, cursor, last, cby, cat, uby, uat) = row
    return SyncDef(str(name), str(segment), str(destination), str(mode), {str(k): str(v) for k, v in _json(mapping).items()},
                   str(schedule), None if interval is None else int(interval), None if batch is None else int(batch), bool(enabled),
                   int(cursor), last, str(cby), cat, str(uby), uat)


def find_sync(engine: Engine, name: str, *, cursor: Any = None) -> SyncDef | None:
    rows = engine.fetch_all(f"SELECT {_SYNC_COLUMNS} FROM syncs WHERE name = ?", [name],  # noqa: S608 - constant text
                            cursor=cursor if cursor is not None else engine.reader())
    return _sync(rows[0]) if rows else None


def get_sync(engine: Engine, name: str, *, cursor: Any = None) -> SyncDef:
    found = find_sync(engine, name, cursor=cursor)
    if found is None:
        known = [s.name for s in list_syncs(engine, cursor=cursor)]
        raise SyncNotFound(f"No sync {name!r}.",
                           fix=f"Use one of: {', '.join(known)}." if known else "Create one first: refinery syncs create NAME --segment S --destination D --map F=SOURCE",
                           field="sync")
    return found


def list_syncs(engine: Engine, *, cursor: Any = None) -> list[SyncDef]:
    rows = engine.fetch_all(f"SELECT {_SYNC_COLUMNS} FROM syncs ORDER BY name",  # noqa: S608 - constant text
                            cursor=cursor if cursor is not None else engine.reader())
    return [_sync(r) for r in rows]


def create_sync(engine: Engine, actor: Principal, name: str, segment: str, destination: str, mapping: Mapping[str, str], *,
                mode: str = "diff", schedule: str | int = "manual", batch_size: int | None = None,
                sources: tuple[set[str], set[str]] | None = None) -> SyncDef:
    """Save a sync (inside the writer). Pass `sources` (from `mapping_sources`, read before: it scans events)."""
    from refinery.segments import store as segments

    check_name(name, "sync")
    check_mode(mode)
    check_batch_size(batch_size)
    kind, interval = parse_schedule(schedule)
    cur = engine.reader()
    segments.get(engine, segment, cursor=cur)
    dest = get_destination(engine, destination, cursor=cur)
    if find_sync(engine, name, cursor=cur) is not None:
        raise SyncExists(f"Sync {name!r} exists already.", fix=f"Change it with: refinery syncs update {name} ..., or choose another name.",
                         field="name")
    traits, computed_traits = sources if sources is not None else mapping_sources(engine)
    checked = check_mapping(mapping, traits, computed_traits, get_type(dest.kind))
    at = datetime.now(UTC)
    # A real-time sync starts from the segment's current members (its first run plans them all),
    # then follows the membership changes recorded after that.
    start = int(engine.fetch_all("SELECT coalesce(max(event_id), 0) FROM segment_events")[0][0]) if kind == "realtime" else 0
    engine.execute(
        f"INSERT INTO syncs ({_SYNC_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, TRUE, ?, NULL, ?, ?, ?, ?)",  # noqa: S608 - constant text
        [name, segment, destination, mode, json.dumps(checked, sort_keys=True), kind, interval, batch_size, start,
         actor.name, at, actor.name, at],
    )
    audit.record(engine, actor, "syncs.create", f"sync:{name}",
                 {"segment": segment, "destination": destination, "mode": mode, "schedule": kind, "fields": sorted(checked)})
    return SyncDef(name, segment, destination, mode, checked, kind, interval, batch_size, True, start, None, actor.name, at, actor.name, at)


def update_sync(engine: Engine, actor: Principal, name: str, *, mapping: Mapping[str, str] | None = None, mode: str | None = None,
                schedule: str | int | None = None, batch_size: int | None = None, enabled: bool | None = None,
                sources: tuple[set[str], set[str]] | None = None) -> SyncDef:
    sync = get_sync(engine, name, cursor=engine.reader())
    changed: dict[str, Any] = {}
    new_mapping = sync.mapping
    if mapping is not None:
        traits, computed_traits = sources if sources is not None else mapping_sources(engine)
        dest = get_destination(engine, sync.destination, cursor=engine.reader())
        new_mapping = check_mapping(mapping, traits, computed_traits, get_type(dest.kind))
        changed["fields"] = sorted(new_mapping)
    if mode is not None:
        changed["mode"] = check_mode(mode)
    kind, interval = (sync.schedule, sync.interval_minutes) if schedule is None else parse_schedule(schedule)
    if schedule is not None:
        changed["schedule"] = kind
    if batch_size is not None:
        changed["batch_size"] = check_batch_size(batch_size)
    if enabled is not None:
        changed["enabled"] = enabled
    cursor = sync.event_cursor
    if kind == "realtime" and sync.schedule != "realtime":
        cursor = int(engine.fetch_all("SELECT coalesce(max(event_id), 0) FROM segment_events")[0][0])
    at = datetime.now(UTC)
    new = SyncDef(name, sync.segment, sync.destination, mode or sync.mode, new_mapping, kind, interval,
                  sync.batch_size if batch_size is None else batch_size, sync.enabled if enabled is None else enabled, cursor,
                  sync.last_planned_at, sync.created_by, sync.created_at, actor.name, at)
    engine.execute(
        "UPDATE syncs SET mode = ?, mapping = ?, schedule = ?, interval_minutes = ?, batch_size = ?, enabled = ?, event_cursor = ?, "
        "updated_by = ?, updated_at = ? WHERE name = ?",
        [new.mode, json.dumps(new.mapping, sort_keys=True), kind, interval, new.batch_size, new.enabled, cursor, actor.name, at, name],
    )
    audit.record(engine, actor, "syncs.update", f"sync:{name}", changed)
    return new


def delete_sync(engine: Engine, actor: Principal, name: str) -> dict[str, Any]:
    """Delete a sync (inside the writer): its batches not delivered yet are cancelled and what it
    knew about the destination's members is forgotten; the destination itself is left as it is."""
    get_sync(engine, name, cursor=engine.reader())
    cancelled = int(engine.fetch_all(
        "SELECT count(*) FROM activation_batches WHERE sync = ? AND status IN ('pending', 'delivering')", [name])[0][0])
    engine.execute("UPDATE activation_batches SET status = 'cancelled' WHERE sync = ? AND status IN ('pending', 'delivering')", [name])
    engine.execute("DELETE FROM activation_records WHERE batch_id IN (SELECT batch_id FROM activation_batches WHERE sync = ? "
                   "AND status = 'cancelled')", [name])
    engine.execute("UPDATE sync_runs SET status = 'cancelled', finished_at = ? WHERE sync = ? AND status IN ('planned', 'delivering')",
                   [datetime.now(UTC), name])
    held = int(engine.fetch_all("SELECT count(*) FROM sync_state WHERE sync = ?", [name])[0][0])
    engine.execute("DELETE FROM sync_state WHERE sync = ?", [name])
    engine.execute("DELETE FROM syncs WHERE name = ?", [name])
    audit.record(engine, actor, "syncs.delete", f"sync:{name}", {"batches_cancelled": cancelled, "state_rows": held})
    return {"name": name, "deleted": True, "batches_cancelled": cancelled, "state_rows_forgotten": held}
