"""Import mappings: how a file's columns become Segment identify or track calls.

A mapping is a small YAML or JSON document (see docs/import.md). `validate_mapping` turns what a
user wrote into one canonical dict (JSON-serialisable, stored with each import, and valid input
to itself again); `load_mapping_file` reads and validates a file. Every error names the key at
fault, what was found, and the fix. No file or database access beyond reading the mapping file.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import yaml

from refinery.errors import ConfigurationError

FORMATS = ("csv", "jsonl", "parquet")
CALL_TYPES = ("identify", "track")
VALUE_TYPES = ("auto", "string", "integer", "double", "boolean", "timestamp", "json")
#: Timestamp formats besides strptime patterns (anything containing '%').
TIMESTAMP_FORMATS = ("iso", "epoch_s", "epoch_ms")
ENCODINGS = {"utf-8": "utf-8", "utf8": "utf-8", "utf-16": "utf-16", "utf16": "utf-16",
             "latin-1": "latin-1", "latin1": "latin-1", "iso-8859-1": "latin-1"}
_CSV_DEFAULTS: dict[str, Any] = {"delimiter": ",", "quote": '"', "escape": '"', "header": True, "skip": 0}
_TOP_KEYS = (
    "version", "type", "format", "encoding", "csv", "row_key", "user_id", "anonymous_id", "email", "phone", "crm_id",
    "event", "timestamp", "traits", "properties",
)


def _err(message: str, fix: str, key: str) -> ConfigurationError:
    return ConfigurationError(f"Mapping: {message}", fix=fix, field=key)


_SYNONYMS = {"float": "double", "number": "double", "decimal": "double", "numeric": "double", "int": "integer",
             "long": "integer", "bigint": "integer", "bool": "boolean", "str": "string", "text": "string", "varchar": "string"}


def _suggest(word: str, choices: tuple[str, ...] | list[str]) -> str:
    synonym = _SYNONYMS.get(word.lower())
    close = [synonym] if synonym in choices else difflib.get_close_matches(word, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _column(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise _err(f"{key} must name a column (a non-empty string), got {value!r}.", f"Write e.g. `{key.split('.')[-1]}: customer_id`.", key)
    return value


def _value_spec(value: Any, key: str) -> dict[str, Any]:
    """A trait or property: `column`, `{column, type}` or `{value}` (a constant)."""
    if isinstance(value, str):
        return {"column": _column(value, key), "type": "auto"}
    if isinstance(value, dict):
        unknown = set(value) - {"column", "type", "value"}
        if unknown:
            bad = sorted(unknown)[0]
            raise _err(f"unknown key {key}.{bad}.{_suggest(bad, ('column', 'type', 'value'))}",
                       "Use {column: <name>, type: <type>} or {value: <constant>}.", f"{key}.{bad}")
        if "value" in value:
            if "column" in value:
                raise _err(f"{key} has both column and value.", "Keep one: a column to read, or a constant value.", key)
            return {"value": value["value"]}
        if "column" not in value:
            raise _err(f"{key} needs a column.", f"Write {key}: {{column: <name>, type: string}}.", key)
        kind = value.get("type", "auto")
        if kind not in VALUE_TYPES:
            raise _err(f"{key}.type {kind!r} is not a type.{_suggest(str(kind), VALUE_TYPES)}",
                       f"Use one of: {', '.join(VALUE_TYPES)}.", f"{key}.type")
        if kind == "timestamp":
            raise _err(f"{key}.type timestamp needs a format.", "Use type: string, or map the event time with the top-level `timestamp` key.", f"{key}.type")
        return {"column": _column(value["column"], f"{key}.column"), "type": kind}
    raise _err(f"{key} must be a column name or an object, got {type(value).__name__}.",
               f"Write {key}: <column> or {key}: {{column: <column>, type: double}}.", key)


def _fields(value: Any, key: str) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _err(f"{key} must be an object of name: column pairs, got {type(value).__name__}.",
                   f"Write {key}:\\n  plan: plan_column", key)
    out: dict[str, dict[str, Any]] = {}
    for name, spec in value.items():
        if not isinstance(name, str) or not name:
            raise _err(f"{key} has an empty or non-text name {name!r}.", "Give every field a text name.", key)
        out[name] = _value_spec(spec, f"{key}.{name}")
    return out


def _timestamp(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = {"column": value}
    if not isinstance(value, dict) or "column" not in value:
        raise _err("timestamp must be a column name or {column, format}.",
                   "Write timestamp: {column: created_at, format: '%Y-%m-%d %H:%M:%S'} (or format: iso).", "timestamp")
    unknown = set(value) - {"column", "format"}
    if unknown:
        bad = sorted(unknown)[0]
        raise _err(f"unknown key timestamp.{bad}.{_suggest(bad, ('column', 'format'))}", "Use column and format.", f"timestamp.{bad}")
    fmt = value.get("format", "iso")
    if not isinstance(fmt, str) or (fmt not in TIMESTAMP_FORMATS and "%" not in fmt):
        raise _err(f"timestamp.format {fmt!r} is not a format.",
                   "Use iso, epoch_s, epoch_ms, or a strptime pattern such as '%d/%m/%Y %H:%M'.", "timestamp.format")
    return {"column": _column(value["column"], "timestamp.column"), "format": fmt}


def _csv_options(value: Any) -> dict[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise _err("csv must be an object of reader options.", "Write csv: {delimiter: ';', encoding: latin-1}.", "csv")
    unknown = set(value) - set(_CSV_DEFAULTS)
    if unknown:
        bad = sorted(unknown)[0]
        raise _err(f"unknown key csv.{bad}.{_suggest(bad, tuple(_CSV_DEFAULTS))}",
                   f"Use one of: {', '.join(_CSV_DEFAULTS)}.", f"csv.{bad}")
    opts = {**_CSV_DEFAULTS, **value}
    for k in ("delimiter", "quote", "escape"):
        v = opts[k]
        if not isinstance(v, str) or len(v) > 1 or (k == "delimiter" and not v):
            raise _err(f"csv.{k} must be one character, got {v!r}.", f"Write csv: {{{k}: ';'}} ('' for none, except delimiter).", f"csv.{k}")
    if not isinstance(opts["header"], bool) or opts["header"] is not True:
        raise _err("csv.header must be true: columns are mapped by their header names.",
                   "Add a header line to the file naming each column.", "csv.header")
    if not isinstance(opts["skip"], int) or isinstance(opts["skip"], bool) or opts["skip"] < 0:
        raise _err(f"csv.skip must be a whole number of lines, got {opts['skip']!r}.", "Write csv: {skip: 2}.", "csv.skip")
    return opts


def validate_mapping(raw: Any) -> dict[str, Any]:
    """Check a mapping and return its canonical form (see the module docstring)."""
    if not isinstance(raw, dict):
        raise _err(f"a mapping is an object, got {type(raw).__name__}.", "Start the file with `type: identify` or `type: track`.", "")
    for key in raw:
        if key not in _TOP_KEYS:
            raise _err(f"unknown key {key!r}.{_suggest(str(key), _TOP_KEYS)}", f"Use only: {', '.join(_TOP_KEYS)}.", str(key))
    if raw.get("version", 1) != 1:
        raise _err(f"version {raw.get('version')!r} is not supported.", "Write version: 1 (or leave it out).", "version")
    call = raw.get("type")
    if call not in CALL_TYPES:
        raise _err(f"type is {'missing' if call is None else repr(call)}.{_suggest(str(call), CALL_TYPES) if call else ''}",
                   "Write type: identify (people and their traits) or type: track (events).", "type")
    fmt = raw.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise _err(f"format {fmt!r} is not a format.{_suggest(str(fmt), FORMATS)}",
                   f"Use one of: {', '.join(FORMATS)} (or leave it out to use the file extension).", "format")

    enc = str(raw.get("encoding", "utf-8")).strip().lower()
    if enc not in ENCODINGS:
        raise _err(f"encoding {raw.get('encoding')!r} is not supported.{_suggest(enc, tuple(ENCODINGS))}",
                   "Use utf-8, utf-16 or latin-1, or convert the file to UTF-8 first (e.g. iconv -f cp1252 -t utf-8).", "encoding")
    out: dict[str, Any] = {"version": 1, "type": call, "format": fmt, "encoding": ENCODINGS[enc], "csv": _csv_options(raw.get("csv"))}
    for key in ("user_id", "anonymous_id"):
        out[key] = _column(raw[key], key) if raw.get(key) is not None else None
    if out["user_id"] is None and out["anonymous_id"] is None:
        raise _err("neither user_id nor anonymous_id is mapped; every Segment call needs one.",
                   "Add user_id: <column holding your customer id> (or anonymous_id: <column>).", "user_id")

    traits = _fields(raw.get("traits"), "traits")
    for key in ("email", "phone"):
        if raw.get(key) is not None:
            if key in traits:
                raise _err(f"{key} is mapped twice (top level and traits.{key}).", "Keep one of them.", key)
            traits[key] = {"column": _column(raw[key], key), "type": "string"}
    out["crm_id"] = None
    if raw.get("crm_id") is not None:
        spec = raw["crm_id"]
        if isinstance(spec, str):
            spec = {"column": spec}
        if not isinstance(spec, dict) or set(spec) - {"column", "name"} or "column" not in spec:
            raise _err("crm_id must be a column name or {column, name}.",
                       "Write crm_id: {column: sf_id, name: salesforce_id}.", "crm_id")
        name = spec.get("name", "crm_id")
        if not isinstance(name, str) or not name:
            raise _err(f"crm_id.name must be text, got {name!r}.", "Write crm_id: {column: sf_id, name: salesforce_id}.", "crm_id.name")
        out["crm_id"] = {"column": _column(spec["column"], "crm_id.column"), "name": name}
    out["traits"] = traits
    out["properties"] = _fields(raw.get("properties"), "properties")

    event = raw.get("event")
    if call == "track":
        if event is None:
            raise _err("a track mapping needs event.", "Write event: Order Completed (a constant) or event: {column: event_name}.", "event")
        if isinstance(event, str) and event.strip():
            out["event"] = {"value": event}
        elif isinstance(event, dict) and set(event) in ({"column"}, {"value"}):
            out["event"] = {"column": _column(event["column"], "event.column")} if "column" in event else {"value": str(event["value"])}
        else:
            raise _err(f"event must be a name or {{column: ...}}, got {event!r}.",
                       "Write event: Order Completed or event: {column: event_name}.", "event")
    else:
        if event is not None:
            raise _err("event is only for type: track.", "Remove event, or set type: track.", "event")
        if out["properties"]:
            raise _err("properties are only for type: track; identify calls carry traits.", "Rename properties to traits.", "properties")
    out["timestamp"] = _timestamp(raw.get("timestamp"))

    row_key = raw.get("row_key")
    if row_key is None:
        row_key = sorted(column_uses(out))
    elif isinstance(row_key, str):
        row_key = [row_key]
    if not isinstance(row_key, list) or not row_key or not all(isinstance(c, str) and c for c in row_key):
        raise _err(f"row_key must be a list of column names, got {row_key!r}.",
                   "Write row_key: [order_id] (the columns that make a row unique).", "row_key")
    out["row_key"] = list(row_key)
    return out


def column_uses(mapping: dict[str, Any]) -> dict[str, str]:
    """Every column a canonical mapping reads -> the first mapping key that reads it (for errors)."""
    uses: dict[str, str] = {}
    for key in ("user_id", "anonymous_id"):
        if mapping.get(key):
            uses.setdefault(mapping[key], key)
    for key in ("crm_id", "timestamp", "event"):
        spec = mapping.get(key)
        if spec and "column" in spec:
            uses.setdefault(spec["column"], f"{key}.column")
    for group in ("traits", "properties"):
        for name, spec in mapping.get(group, {}).items():
            if "column" in spec:
                uses.setdefault(spec["column"], f"{group}.{name}")
    for col in mapping.get("row_key") or []:
        uses.setdefault(col, "row_key")
    return uses


def load_mapping_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping file and validate it; returns the canonical mapping."""
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except OSError as e:
        raise ConfigurationError(f"Cannot read the mapping file {p}: {e.strerror}.", fix="Pass an existing, readable file to --mapping.") from e
    except UnicodeDecodeError as e:
        raise ConfigurationError(f"The mapping file {p} is not UTF-8 text.", fix="Save it as UTF-8.") from e
    try:
        raw = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigurationError(f"The mapping file {p} is not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: {e}",
                                 fix="Fix the syntax; see docs/import.md for examples.") from e
    try:
        return validate_mapping(raw)
    except ConfigurationError as e:
        raise ConfigurationError(f"{p}: {e.message}", fix=e.fix, field=e.field) from e
