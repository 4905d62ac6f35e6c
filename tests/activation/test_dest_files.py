"""The files and ad-platform files destinations: what lands on disk, read back with independent
readers (csv, json, pyarrow), hashes checked against values computed here by hand."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from refinery.activation.adfiles import AdFilesConfig, AdFilesDestination
from refinery.activation.destination import TerminalDeliveryError, TransientDeliveryError, get_type
from refinery.activation.files import FilesConfig, FilesDestination, delivery_error


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _files(dest_context, fmt: str, folder: str = "out") -> FilesDestination:
    return FilesDestination(FilesConfig(folder=folder, format=fmt), dest_context())  # type: ignore[arg-type]


def test_jsonl_one_file_per_batch_named_by_its_id(tmp_path: Path, dest_context, dest_batch) -> None:
    dest = _files(dest_context, "jsonl")
    batch = dest_batch({"p1": {"email": "a@example.com", "tags": ["x", "y"]}}, ["p2"], batch_id="run-1.batch-0001")
    dest.deliver(batch)
    path = tmp_path / "data" / "exports" / "out" / "run-1.batch-0001.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [
        {"action": "add", "profile_id": "p1", "fields": {"email": "a@example.com", "tags": ["x", "y"]}},
        {"action": "remove", "profile_id": "p2", "fields": {}},
    ]
    # A repeat rewrites the same file with the same rows; nothing else appears, no temporary left behind.
    dest.deliver(batch)
    assert os.listdir(path.parent) == [path.name]
    assert [json.loads(line) for line in path.read_text().splitlines()] == lines


def test_csv_columns_and_values(tmp_path: Path, dest_context, dest_batch) -> None:
    dest = _files(dest_context, "csv", folder=str(tmp_path / "abs"))
    dest.deliver(dest_batch({"p1": {"plan": "gold", "ltv": 12.5, "vip": True, "action": "x"},
                             "p2": {"plan": None, "nested": {"a": 1}}}, ["p3"], batch_id="b-csv"))
    with open(tmp_path / "abs" / "b-csv.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [
        {"action": "add", "profile_id": "p1", "plan": "gold", "ltv": "12.5", "vip": "true", "field_action": "x", "nested": ""},
        {"action": "add", "profile_id": "p2", "plan": "", "ltv": "", "vip": "", "field_action": "", "nested": '{"a":1}'},
        {"action": "remove", "profile_id": "p3", "plan": "", "ltv": "", "vip": "", "field_action": "", "nested": ""},
    ]


def test_parquet_types_and_mixed_columns(tmp_path: Path, dest_context, dest_batch) -> None:
    dest = _files(dest_context, "parquet")
    dest.deliver(dest_batch({"p1": {"n": 3, "mixed": 1}, "p2": {"n": 4, "mixed": "two"}}, ["p3"], batch_id="b-pq"))
    table = pq.read_table(tmp_path / "data" / "exports" / "out" / "b-pq.parquet")
    assert table.column_names == ["action", "profile_id", "n", "mixed"]
    assert str(table.schema.field("n").type) == "int64"
    assert table.to_pylist() == [
        {"action": "add", "profile_id": "p1", "n": 3, "mixed": "1"},
        {"action": "add", "profile_id": "p2", "n": 4, "mixed": "two"},
        {"action": "remove", "profile_id": "p3", "n": None, "mixed": None},
    ]


def test_unsafe_batch_ids_get_a_stable_digest_name(tmp_path: Path, dest_context, dest_batch) -> None:
    dest = _files(dest_context, "jsonl")
    dest.deliver(dest_batch({"p1": {}}, batch_id="../../etc/passwd"))
    dest.deliver(dest_batch({"p1": {}}, batch_id="../../etc/passwd"))
    names = os.listdir(tmp_path / "data" / "exports" / "out")
    assert names == ["batch-" + sha("../../etc/passwd")[:32] + ".jsonl"]


def test_folder_may_not_climb_out_of_exports() -> None:
    with pytest.raises(ValueError, match="climbs out"):
        FilesConfig(folder="../keys", format="csv")


def test_unwritable_folder_is_terminal(tmp_path: Path, dest_context, dest_batch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores modes: make the folder a file instead
            locked.chmod(0o700)
            locked.rmdir()
            locked.write_text("a file, not a folder")
            target = str(locked / "sub")
        else:
            target = str(locked)
        dest = FilesDestination(FilesConfig(folder=target, format="csv"), dest_context())
        # Permission denied needs an operator (terminal); a path that is not a folder may be a lost mount.
        expected = TransientDeliveryError if locked.is_file() else TerminalDeliveryError
        with pytest.raises(expected) as err:
            dest.deliver(dest_batch({"p1": {}}))
        assert "Cannot write to" in str(err.value)
        assert isinstance(delivery_error(PermissionError(13, "Permission denied"), locked), TerminalDeliveryError)
    finally:
        if locked.is_dir():
            locked.chmod(0o700)


def test_registered_kinds() -> None:
    assert get_type("files").config_model is FilesConfig
    assert get_type("adfiles").config_model is AdFilesConfig
    assert set(get_type("adfiles").needs_fields) == {"email", "phone"}


# -- ad-platform files ---------------------------------------------------------------------------


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_meta_hashes_normalised_emails_and_digit_phones(tmp_path: Path, dest_context, dest_batch) -> None:
    dest = AdFilesDestination(AdFilesConfig(folder="ads"), dest_context())
    batch = dest_batch(
        {
            "p1": {"email": " Test@Example.com ", "phone": "(212) 555-0134"},
            "p2": {"email": ["one@example.org", "ONE@example.org", "two@example.org"]},
            "p3": {"phone": "+44 20 7946 0958"},
            "p4": {"email": "not-an-email", "phone": "12"},  # nothing usable
        },
        {"p5": {"email": "Gone@Example.com"}},  # a remove needs its identifiers too (needs_fields)
        batch_id="ads-1",
    )
    dest.deliver(batch)
    folder = tmp_path / "data" / "exports" / "ads"
    assert _rows(folder / "ads-1.add.csv") == [
        ["email", "phone"],
        [sha("test@example.com"), sha("12125550134")],
        [sha("one@example.org"), ""],
        [sha("two@example.org"), ""],
        ["", sha("442079460958")],
    ]
    assert _rows(folder / "ads-1.remove.csv") == [["email", "phone"], [sha("gone@example.com"), ""]]
    manifest = json.loads((folder / "ads-1.manifest.json").read_text())
    assert manifest["rows"] == {"add": 4, "remove": 1}
    assert manifest["profiles"] == {"add": 4, "remove": 1}
    assert manifest["skipped_no_identifier"] == {"add": ["p4"], "remove": []}
    text = "".join(p.read_text() for p in folder.iterdir())
    assert "example" not in text and "555" not in text  # no clear value on disk


def test_google_keeps_the_plus_and_reads_local_numbers_in_the_default_region(tmp_path: Path, dest_context, dest_batch) -> None:
    dest = AdFilesDestination(AdFilesConfig(folder="g", platform="google", default_region="gb"), dest_context())
    dest.deliver(dest_batch({"p1": {"email": "A@B.CO", "phone": "020 7946 0958"}}, batch_id="g-1"))
    assert _rows(tmp_path / "data" / "exports" / "g" / "g-1.add.csv") == [
        ["Email", "Phone"],
        [sha("a@b.co"), sha("+442079460958")],
    ]


def test_adfiles_repeat_is_idempotent(tmp_path: Path, dest_context, dest_batch) -> None:
    dest = AdFilesDestination(AdFilesConfig(folder="ads"), dest_context())
    batch = dest_batch({"p1": {"email": "x@example.com"}}, batch_id="rep")
    dest.deliver(batch)
    first = {p.name: p.read_bytes() for p in (tmp_path / "data" / "exports" / "ads").iterdir()}
    dest.deliver(batch)
    again = {p.name: p.read_bytes() for p in (tmp_path / "data" / "exports" / "ads").iterdir()}
    assert first == again and sorted(first) == ["rep.add.csv", "rep.manifest.json", "rep.remove.csv"]


def test_adfiles_region_must_be_a_country() -> None:
    with pytest.raises(ValueError, match="two-letter"):
        AdFilesConfig(folder="x", default_region="1A")

