"""Mapping files: canonical form, and errors that name the key and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refinery.errors import ConfigurationError
from refinery.ingest.mapping import column_uses, load_mapping_file, validate_mapping

DATA = Path(__file__).parent / "data"


def test_yaml_file_loads_into_canonical_form() -> None:
    m = load_mapping_file(DATA / "crm_contacts.yaml")
    assert m["type"] == "identify"
    assert m["user_id"] == "customer_id"
    assert m["traits"]["email"] == {"column": "email", "type": "string"}
    assert m["traits"]["lifetime_value"] == {"column": "lifetime_value", "type": "double"}
    assert m["crm_id"] == {"column": "sf_id", "name": "salesforce_id"}
    assert m["timestamp"] == {"column": "updated_at", "format": "%Y-%m-%d %H:%M:%S"}
    assert m["row_key"] == ["customer_id", "updated_at"]
    assert m["encoding"] == "utf-8"
    # the canonical form is valid input again, unchanged (the server re-validates what the CLI sends)
    assert validate_mapping(json.loads(json.dumps(m))) == m


def test_json_file_and_track_mapping(tmp_path: Path) -> None:
    p = tmp_path / "orders.json"
    p.write_text(json.dumps({"type": "track", "event": {"column": "kind"}, "anonymous_id": "visitor",
                             "properties": {"total": {"column": "total", "type": "integer"}, "shop": {"value": "eu"}}}))
    m = load_mapping_file(p)
    assert m["event"] == {"column": "kind"}
    assert m["properties"]["shop"] == {"value": "eu"}
    # without row_key, every mapped column is the key
    assert m["row_key"] == sorted(["kind", "visitor", "total"])
    assert column_uses(m)["total"] == "properties.total"


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        ({"type": "identify", "user_id": "id", "trait": {}}, "trait", ["unknown key 'trait'", "Did you mean 'traits'?"]),
        ({"user_id": "id"}, "type", ["type is missing", "type: identify"]),
        ({"type": "identfy", "user_id": "id"}, "type", ["'identfy'", "Did you mean 'identify'?"]),
        ({"type": "identify", "email": "email"}, "user_id", ["neither user_id nor anonymous_id", "user_id: <column"]),
        ({"type": "track", "user_id": "id"}, "event", ["needs event"]),
        ({"type": "identify", "user_id": "id", "event": "X"}, "event", ["only for type: track"]),
        ({"type": "identify", "user_id": "id", "timestamp": {"column": "t", "format": "dd/mm/yyyy"}}, "timestamp.format", ["strptime"]),
        ({"type": "identify", "user_id": "id", "encoding": "cp1252"}, "encoding", ["not supported", "latin-1"]),
        ({"type": "identify", "user_id": "id", "traits": {"x": {"column": "a", "type": "float"}}}, "traits.x.type", ["Did you mean 'double'?"]),
        ({"type": "identify", "user_id": "id", "csv": {"delimeter": ";"}}, "csv.delimeter", ["Did you mean 'delimiter'?"]),
        ({"type": "identify", "user_id": "id", "row_key": []}, "row_key", ["row_key must be a list"]),
        ({"type": "identify", "user_id": 3}, "user_id", ["must name a column"]),
    ],
)
def test_errors_name_the_key_and_the_fix(raw: dict, field: str, words: list[str]) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigurationError) as info:
        validate_mapping(raw)
    err = info.value
    assert err.field == field
    assert err.fix
    text = str(err)
    for w in words:
        assert w in text, text


def test_bad_yaml_is_reported_with_the_file(tmp_path: Path) -> None:
    p = tmp_path / "m.yaml"
    p.write_text("type: identify\nuser_id: [unclosed\n")
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        load_mapping_file(p)
    p.write_text("type: identify\nuser_id: id\nemial: e\n")
    with pytest.raises(ConfigurationError, match=r"m\.yaml.*'emial'.*Did you mean 'email'"):
        load_mapping_file(p)
