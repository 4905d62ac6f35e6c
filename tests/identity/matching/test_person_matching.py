"""Person-record matching: real Splink on a real DuckDB, over generated records with known truth."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from person_data import PersonRecords, make_person_records

from refinery.identity.matching import (
    LINK_SCHEMA,
    PERSON_RECORD,
    MatchingError,
    MissingExtraError,
    PersonMatchConfig,
    PersonMatchResult,
    match_person_records,
)
from refinery.identity.matching import person_records_from_events as from_events
from refinery.ingest.importer import run_import
from refinery.runtime import Runtime

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def person_records() -> PersonRecords:
    return make_person_records()


@pytest.fixture(scope="module")
def scored(person_records: PersonRecords) -> PersonMatchResult:
    """Every pair the model scored at 0.001 or more (one training run shared by the tests below)."""
    return match_person_records(person_records.table, PersonMatchConfig(threshold=0.001), now=NOW)


def _scores(result: PersonMatchResult) -> dict[frozenset[str], float]:
    return {frozenset((r["a_value"], r["b_value"])): r["score"] for r in result.links.to_pylist()}


def test_true_pairs_score_above_the_threshold_and_others_below(scored: PersonMatchResult, person_records: PersonRecords) -> None:
    scores = _scores(scored)
    threshold = PersonMatchConfig().threshold
    found = {pair for pair, s in scores.items() if s >= threshold}
    missed = person_records.truth - found
    false = found - person_records.truth
    assert not false, f"false links: {sorted(map(sorted, false))}"
    # Each duplicate carries two kinds of damage (typos, missing values, reformatting); all are recoverable here.
    assert len(missed) <= len(person_records.truth) * 0.03, f"missed: {[(sorted(p), scores.get(p)) for p in missed]}"
    assert scored.trained, "EM must have trained on at least one block"
    assert set(scored.fields) == {"first_name", "last_name", "dob", "address", "city", "postcode", "email", "phone"}


def test_namesakes_and_self_pairs_are_not_links(scored: PersonMatchResult, person_records: PersonRecords) -> None:
    scores = _scores(scored)
    for pair in person_records.namesakes:  # same first and last name and city, nothing else in common
        assert scores.get(pair, 0.0) < 0.5, (sorted(pair), scores.get(pair))
    assert all(r["a_value"] != r["b_value"] or r["a_type"] != r["b_type"] for r in scored.links.to_pylist())


def test_household_members_sharing_contacts_are_guarded(person_records: PersonRecords) -> None:
    """Two people sharing email, phone, address and surname (a couple) outscore any threshold in a
    plain Fellegi-Sunter model; the household guard (first name and date of birth both contradict) keeps them apart."""
    rows = person_records.table.to_pylist()
    spouses = []
    for i in (30, 40, 50):
        base = next(r for r in rows if r["id_value"] == f"C-{i:04d}")
        first = "margaret" if base["first_name"] != "margaret" else "susan"
        y, m, d = base["dob"].split("-")
        dob = f"{int(y) - 4}-{int(m) % 12 + 1:02d}-{d}"  # a few years apart: no strong evidence against on its own
        spouses.append({**base, "record_id": f"s{i}", "id_value": f"S-{i:04d}", "first_name": first, "dob": dob})
    result = match_person_records(pa.Table.from_pylist(rows + spouses, schema=person_records.table.schema), PersonMatchConfig(threshold=0.001))
    linked = [r for r in result.links.to_pylist() if r["a_value"].startswith("S-") or r["b_value"].startswith("S-")]
    assert linked == [] or all(r["score"] < 0.5 for r in linked), linked
    assert result.guarded >= 1
    assert result.links.num_rows >= len(person_records.truth)  # the others still match


def test_links_have_the_identity_links_shape_and_explain_themselves(scored: PersonMatchResult) -> None:
    links = scored.links
    assert links.schema == LINK_SCHEMA
    rows = links.to_pylist()
    assert {r["method"] for r in rows} == {PERSON_RECORD}
    assert {r["model_version"] for r in rows} == {scored.model_version}
    assert all(0.0 <= r["score"] <= 1.0 and r["removed_at"] is None and r["created_at"] == NOW for r in rows)
    assert len({r["link_id"] for r in rows}) == len(rows)
    assert all((r["a_type"], r["a_value"]) < (r["b_type"], r["b_value"]) for r in rows)
    for r in rows:
        ev = json.loads(r["evidence"])
        assert {f["field"] for f in ev["fields"]} == set(scored.fields)
        # The score is the prior plus the fields' match weights, turned into a probability.
        total = ev["prior_match_weight"] + sum(f["match_weight"] for f in ev["fields"])
        assert total == pytest.approx(ev["match_weight"], abs=0.02)
        assert r["score"] == pytest.approx(2**total / (1 + 2**total), abs=1e-3)
    typo = next(
        json.loads(r["evidence"])
        for r in rows
        if any(f["field"] == "first_name" and f["level"].startswith("Damerau") for f in json.loads(r["evidence"])["fields"])
    )
    assert typo["records"][0] != typo["records"][1]


def test_same_input_same_model_version_same_links(scored: PersonMatchResult, person_records: PersonRecords) -> None:
    again = match_person_records(person_records.table, PersonMatchConfig(threshold=0.9, threads=1), now=NOW)
    assert again.model_version == scored.model_version  # the threshold and thread count are not part of the model
    kept = scored.links.filter(pa.compute.greater_equal(scored.links["score"], 0.9))
    assert again.links.equals(kept)


def test_other_data_or_settings_give_another_model_version(scored: PersonMatchResult, person_records: PersonRecords) -> None:
    changed = person_records.table.slice(1)
    other = match_person_records(changed, PersonMatchConfig(threshold=0.9), now=NOW)
    assert other.model_version != scored.model_version
    reseeded = match_person_records(person_records.table, PersonMatchConfig(threshold=0.9, seed=7), now=NOW)
    assert reseeded.model_version != scored.model_version
    assert not set(other.links["link_id"].to_pylist()) & set(scored.links["link_id"].to_pylist())


def test_fields_left_empty_are_not_compared() -> None:
    rows = [
        {"record_id": "1", "id_type": "crm_id", "id_value": "A", "first_name": "ann", "last_name": "lee", "email": "ann@example.com"},
        {"record_id": "2", "id_type": "crm_id", "id_value": "B", "first_name": "ann", "last_name": "lee", "email": "ann@example.com"},
        {"record_id": "3", "id_type": "crm_id", "id_value": "C", "first_name": "bob", "last_name": "ray", "email": "bob@example.com"},
    ]
    result = match_person_records(pa.Table.from_pylist(rows), PersonMatchConfig(threshold=0.5))
    assert result.fields == ("first_name", "last_name", "email")
    assert result.records == 3


def test_bad_input_is_refused_with_the_field_and_fix() -> None:
    with pytest.raises(MatchingError, match="id_value") as e:
        match_person_records(pa.Table.from_pylist([{"record_id": "1", "id_type": "crm_id"}]))
    assert e.value.field == "id_value" and e.value.fix
    dup = [{"record_id": "1", "id_type": "crm_id", "id_value": "A"}] * 2
    with pytest.raises(MatchingError, match="record_id must be unique"):
        match_person_records(pa.Table.from_pylist(dup))
    with pytest.raises(MatchingError, match="given_name"):
        match_person_records(pa.Table.from_pylist([{"record_id": "1", "id_type": "t", "id_value": "A", "given_name": "x"}]))
    with pytest.raises(MatchingError, match="no id_type"):
        match_person_records(pa.Table.from_pylist([{"record_id": "1", "id_type": None, "id_value": "A"}]))
    with pytest.raises(MatchingError, match="threshold"):
        PersonMatchConfig(threshold=1.5)


def test_a_missing_splink_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "splink", None)  # what Python does when the package is not installed
    with pytest.raises(MissingExtraError, match=r"refinery-dmp\[ml\]"):
        match_person_records(pa.Table.from_pylist([{"record_id": "1", "id_type": "t", "id_value": "A"}]))


def test_person_records_come_from_imported_identify_calls(runtime: Runtime, tmp_path: Path) -> None:
    """CRM rows imported with a crm_id mapping become person records keyed by that id, and match."""
    csv = tmp_path / "crm.csv"
    csv.write_text(
        "customer_id,first_name,last_name,email,phone,city\n"
        "C-1,Ann,Lee,ann.lee@example.com,+44 7700 900123,Leeds\n"
        "C-2,Anne,Lee, ANN.LEE@example.com ,07700 900123,Leeds\n"
        "C-3,Bob,Ray,bob@example.com,,York\n"
    )
    mapping = {
        "type": "identify", "user_id": "customer_id", "crm_id": {"column": "customer_id", "name": "crm_id"},
        "email": "email", "phone": "phone",
        "traits": {"firstName": "first_name", "lastName": "last_name", "city": "city"},
        "row_key": ["customer_id"],
    }  # fmt: skip
    runtime.writer.call(lambda e: runtime.sources.create(e, "crm", kind="import"))
    run_import(runtime, csv, source="crm", mapping=mapping)
    records = from_events(runtime.engine, source="crm")
    rows = sorted(records.to_pylist(), key=lambda r: r["id_value"])
    assert [(r["id_type"], r["id_value"], r["first_name"], r["city"]) for r in rows] == [
        ("crm_id", "C-1", "Ann", "Leeds"), ("crm_id", "C-2", "Anne", "Leeds"), ("crm_id", "C-3", "Bob", "York"),
    ]  # fmt: skip
    assert rows[1]["email"] and rows[1]["phone"]
    assert from_events(runtime.engine, source="web").num_rows == 0
    result = match_person_records(records, PersonMatchConfig(threshold=0.5))
    assert result.records == 3 and set(result.fields) >= {"first_name", "last_name", "email", "phone", "city"}


def test_a_changed_comparison_level_is_a_new_model_version(monkeypatch: pytest.MonkeyPatch) -> None:
    from refinery.identity.matching import person

    fields = ("first_name", "last_name", "email")
    before = person.model_version(PersonMatchConfig(), fields, "digest")
    assert person.model_version(PersonMatchConfig(threshold=0.5), fields, "digest") == before
    monkeypatch.setattr(person, "COMPARISONS", (("first_name", "name"), ("last_name", "name"), ("email", "code")))
    assert person.model_version(PersonMatchConfig(), fields, "digest") != before
