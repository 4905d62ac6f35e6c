"""Person records: the input of record matching, checked and normalised before any model sees them.

A person record is one row of a CRM or other system of record: the identifier it is known by
(`id_type`, `id_value`, e.g. `crm_id` / `C-1042`), and what it says about the person. Only
`record_id`, `id_type` and `id_value` are required; every other field may be missing or NULL.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from refinery.identity.matching.errors import MatchingError
from refinery.privacy.pii import reveal_in, tokenising
from refinery.storage.engine import Engine

REQUIRED = ("record_id", "id_type", "id_value")
FIELDS = ("first_name", "last_name", "dob", "address", "city", "postcode", "country", "email", "phone")
COLUMNS = REQUIRED + FIELDS

# Constant SQL over the staged input (`person_records_in`); no user text reaches it.
# Strings are trimmed and lower-cased, blanks become NULL; emails lose spaces; phones keep their
# digits (at least six of them, else NULL); dates of birth become 'YYYY-MM-DD' text when they are
# DATE values and are otherwise kept as written (a typo stays comparable by edit distance).
NORMALISE_SQL = """
CREATE OR REPLACE TABLE person_records AS
SELECT
    CAST(record_id AS VARCHAR) AS record_id,
    CAST(id_type AS VARCHAR) AS id_type,
    CAST(id_value AS VARCHAR) AS id_value,
    nullif(lower(trim(CAST(first_name AS VARCHAR))), '') AS first_name,
    nullif(lower(trim(CAST(last_name AS VARCHAR))), '') AS last_name,
    nullif(trim(CAST(dob AS VARCHAR)), '') AS dob,
    nullif(lower(trim(regexp_replace(CAST(address AS VARCHAR), '\\s+', ' ', 'g'))), '') AS address,
    nullif(lower(trim(CAST(city AS VARCHAR))), '') AS city,
    nullif(upper(replace(trim(CAST(postcode AS VARCHAR)), ' ', '')), '') AS postcode,
    nullif(lower(trim(CAST(country AS VARCHAR))), '') AS country,
    nullif(lower(replace(trim(CAST(email AS VARCHAR)), ' ', '')), '') AS email,
    CASE WHEN length(regexp_replace(CAST(phone AS VARCHAR), '[^0-9]', '', 'g')) >= 6
         THEN regexp_replace(CAST(phone AS VARCHAR), '[^0-9]', '', 'g') END AS phone
FROM person_records_in
"""

# A digest of the normalised records, in record order: part of the model version, so a model
# trained on other data never shares a version (or link ids) with this one.
DIGEST_SQL = """
SELECT count(*) AS n,
       coalesce(md5(string_agg(md5(CAST(json_array(record_id, id_type, id_value, first_name, last_name, dob,
                                                   address, city, postcode, country, email, phone) AS VARCHAR)),
                               '' ORDER BY record_id)), '') AS digest
FROM person_records
"""

PRESENT_SQL = """
SELECT count(DISTINCT first_name) AS first_name, count(DISTINCT last_name) AS last_name, count(DISTINCT dob) AS dob,
       count(DISTINCT address) AS address, count(DISTINCT city) AS city, count(DISTINCT postcode) AS postcode,
       count(DISTINCT country) AS country, count(DISTINCT email) AS email, count(DISTINCT phone) AS phone
FROM person_records
"""


def to_arrow(records: Any) -> pa.Table:
    """Accept an Arrow table, a DuckDB relation or anything speaking the Arrow stream protocol."""
    if isinstance(records, pa.Table):
        return records
    if hasattr(records, "to_arrow_table"):
        table = records.to_arrow_table()
        assert isinstance(table, pa.Table)
        return table
    if hasattr(records, "__arrow_c_stream__"):
        return pa.RecordBatchReader.from_stream(records).read_all()
    raise MatchingError(
        f"Person records must be an Arrow table or a DuckDB relation, not {type(records).__name__}.",
        fix="Pass pyarrow.Table (e.g. pyarrow.Table.from_pylist(rows)) or con.sql('SELECT ...').",
    )


def check(table: pa.Table) -> pa.Table:
    """The records with every column of `COLUMNS` (missing optional ones as NULL), or a clear error."""
    names = set(table.column_names)
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise MatchingError(
            f"Person records lack the column(s) {', '.join(missing)}; found {', '.join(sorted(names)) or 'none'}.",
            field=missing[0],
            fix="Provide record_id (unique per row), id_type and id_value (the identifier a link joins, "
            "e.g. crm_id and the customer number).",
        )
    unknown = sorted(names - set(COLUMNS))
    if unknown:
        raise MatchingError(
            f"Person records have column(s) matching does not use: {', '.join(unknown)}.",
            field=unknown[0],
            fix=f"Select only {', '.join(COLUMNS)} (rename yours to these names, e.g. given_name AS first_name).",
        )
    for c in REQUIRED:
        nulls = table.column(c).null_count
        if nulls:
            raise MatchingError(
                f"{nulls} person record(s) have no {c}.", field=c, fix=f"Drop those rows or fill {c} before matching."
            )
    ids = table.column("record_id").cast(pa.string())
    if len(ids.unique()) != len(ids):
        raise MatchingError(
            "record_id must be unique per person record; some values repeat.",
            field="record_id",
            fix="Use the row's own key (e.g. source + line number) as record_id; id_value may repeat.",
        )
    for c in FIELDS:
        if c not in names:
            table = table.append_column(c, pa.nulls(len(table), pa.string()))
    return table.select(list(COLUMNS))


def stage(engine: Engine, records: Any) -> tuple[int, str, tuple[str, ...]]:
    """Check, stage and normalise `records` as table `person_records` on `engine` (a scratch database).

    Returns the record count, the digest of the normalised records, and the fields that hold at
    least one value (comparisons and blocking rules use only those).
    """
    table = check(to_arrow(records))
    engine.register("person_records_in", table)
    try:
        engine.execute(NORMALISE_SQL)
    finally:
        engine.unregister("person_records_in")
    n, digest = engine.fetch_all(DIGEST_SQL)[0]
    counts = engine.fetch_dicts(PRESENT_SQL)[0]
    present = tuple(c for c in FIELDS if counts[c])
    return int(n), str(digest), present


# Person records from the clean zone: each identify call that names an external id (imports put
# the CRM id in `context.externalIds`, typed by the mapping's `crm_id.name`) is one record, its
# traits read under the Segment spec's names (and the snake_case ones imports often use).
FROM_EVENTS_SQL = """
SELECT message_id AS record_id,
       lower(trim(json_extract_string(context, '$.externalIds[0].type'))) AS id_type,
       trim(json_extract_string(context, '$.externalIds[0].id')) AS id_value,
       coalesce(traits ->> '$.firstName', traits ->> '$.first_name') AS first_name,
       coalesce(traits ->> '$.lastName', traits ->> '$.last_name') AS last_name,
       coalesce(traits ->> '$.birthday', traits ->> '$.dob') AS dob,
       coalesce(traits ->> '$.address.street', traits ->> '$.street') AS address,
       coalesce(traits ->> '$.address.city', traits ->> '$.city') AS city,
       coalesce(traits ->> '$.address.postalCode', traits ->> '$.postcode', traits ->> '$.postal_code') AS postcode,
       coalesce(traits ->> '$.address.country', traits ->> '$.country') AS country,
       traits ->> '$.email' AS email,
       traits ->> '$.phone' AS phone,
       traits ->> '$.address' AS address_value
FROM events
WHERE type = 'identify'
  AND nullif(trim(json_extract_string(context, '$.externalIds[0].id')), '') IS NOT NULL
  AND nullif(trim(json_extract_string(context, '$.externalIds[0].type')), '') IS NOT NULL
  AND ($source IS NULL OR source = $source)
ORDER BY message_id
"""


def from_events(engine: Engine, *, source: str | None = None) -> pa.Table:
    """Person records read from identify events that carry an external id (CRM rows), on a reader cursor.

    Fuzzy comparisons need the values, not their tokens: personal fields are revealed from the
    vault for the matching run only (they stay in this process's memory and its scratch database);
    an address kept whole as one token is opened into its street, city, postcode and country."""
    table = engine.fetch_arrow(FROM_EVENTS_SQL, {"source": source}, cursor=engine.reader())
    if not tokenising(engine) or table.num_rows == 0:
        return table.drop_columns(["address_value"])
    rows = reveal_in(engine, table.to_pylist())
    for r in rows:
        whole = r.pop("address_value")
        if isinstance(whole, str) and whole.startswith("{"):
            try:
                parts = json.loads(whole)
            except ValueError:
                continue
            if isinstance(parts, dict):
                for field, key in (("address", "street"), ("city", "city"), ("postcode", "postalCode"), ("country", "country")):
                    if r.get(field) is None and isinstance(parts.get(key), str):
                        r[field] = parts[key]
    schema = table.schema.remove(table.schema.get_field_index("address_value"))
    return pa.Table.from_pylist(rows, schema=schema)
