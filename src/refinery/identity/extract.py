"""Identifier extraction: every identifier every clean event carries, normalised and checked
against the blocking rules, in SQL over `events` (constant templates, rendered by the engine).

Where identifiers come from (docs/identity.md has the table):
- columns `anonymous_id`, `user_id`, `device_id`, `advertising_id`, and `previous_id` of alias calls
  (typed `user_id` when that value is some event's user id, else `anonymous_id`);
- `traits.email` / `traits.phone`, and `context.traits.email` / `.phone` (track calls, imports);
- `context.externalIds[*]`: `{id, type}` pairs, the type lower-cased (imports put the CRM id here,
  named by the mapping's `crm_id.name`). A `userId` that is also one of the event's external ids
  is that external id (an import mapping `user_id: customer_id` with `crm_id: customer_id` says the
  user id *is* the CRM id), not a web user id;
- identifiers a user declares by path in the rules file (`identifiers: [{type, path, sources}]`).

Produces the temporary table `_idr_occ` (one row per event and identifier) for `resolve.py`.
Phones and values with characters outside printable ASCII go through `normalise.py` once per
distinct value (phonenumbers and NFKC do not exist in SQL); the rest is normalised in SQL.
"""

from __future__ import annotations

import pyarrow as pa
from sqlglot import exp

from refinery.identity import sql
from refinery.identity.rules import PII_TYPES, IdentityRules
from refinery.privacy.normalise import Normalised, normalise
from refinery.privacy.pii import reveal, token_for, tokenising
from refinery.privacy.tokens import is_token
from refinery.storage.engine import Engine

_RULE = "CASE WHEN type = 'alias' THEN 'alias' WHEN import_id IS NOT NULL THEN 'import_row' ELSE 'same_event' END"
_REGION = "coalesce(json_extract_string(traits, '$.country'), json_extract_string(context, '$.traits.country'))"

#: One branch per place an identifier can sit; the slots are filled with parsed fragments.
_BRANCH = """
SELECT message_id, source, timestamp AS ts, __rule AS rule, __kind AS kind, CAST(__value AS VARCHAR) AS raw,
       __region AS region
FROM events WHERE __cond
"""

#: Built-in places: (type, value expression, condition).
_BUILTIN: tuple[tuple[str, str, str], ...] = (
    ("anonymous_id", "anonymous_id", "TRUE"),
    ("user_id", "user_id", "NOT coalesce(list_contains(json_extract_string(context, '$.externalIds[*].id'), user_id), FALSE)"),
    ("previous_id", "previous_id", "type = 'alias'"),
    ("email", "json_extract_string(traits, '$.email')", "TRUE"),
    ("email", "json_extract_string(context, '$.traits.email')", "TRUE"),
    ("phone", "json_extract_string(traits, '$.phone')", "TRUE"),
    ("phone", "json_extract_string(context, '$.traits.phone')", "TRUE"),
    ("device_id", "device_id", "TRUE"),
    ("advertising_id", "advertising_id", "TRUE"),
)

_EXTERNAL = """
SELECT message_id, source, timestamp AS ts, __rule AS rule,
       coalesce(lower(json_extract_string(x, '$.type')), '') AS kind, json_extract_string(x, '$.id') AS raw, NULL AS region
FROM (SELECT *, unnest(json_extract(context, '$.externalIds[*]')) AS x FROM events
      WHERE json_extract(context, '$.externalIds') IS NOT NULL) t
"""


def _branch(kind: str, value: exp.Expression, condition: exp.Expression) -> exp.Expression:
    region = sql.fragment(_REGION) if kind == "phone" else exp.Null()
    return sql.template(_BRANCH, rule=sql.fragment(_RULE), kind=sql.lit(kind), value=value, region=region, cond=condition)


def occurrences_select(rules: IdentityRules) -> exp.Expression:
    """Every (event, identifier type, raw value) pair, as a UNION ALL over the places identifiers sit."""
    parts = [_branch(k, sql.fragment(v), sql.fragment(c)) for k, v, c in _BUILTIN]
    parts.append(sql.template(_EXTERNAL, rule=sql.fragment(_RULE)))
    for d in rules.declared:
        value = exp.Anonymous(this="json_extract_string", expressions=[exp.column(d.column), sql.lit(d.json_path)])
        where = sql.in_list(exp.column("source"), d.sources) if d.sources else exp.true()
        parts.append(_branch(d.type, value, where))
    union: exp.Expression = parts[0]
    for p in parts[1:]:
        union = exp.union(union, p, distinct=False)
    return union


def _block_reason(rules: IdentityRules) -> exp.Expression:
    """The reason a normalised `value` of type `kind` is blocked, or NULL."""
    value, kind = exp.column("value"), exp.column("kind")
    case = exp.Case()
    case = case.when(sql.template("NOT regexp_full_match(kind, '[a-z][a-z0-9_.]{0,63}')"), sql.lit("invalid_type"))
    case = case.when(sql.template("value = ''"), sql.lit("empty"))
    case = case.when(sql.template("length(value) > __n", n=sql.lit(rules.max_value_length)), sql.lit("too_long"))
    case = case.when(sql.in_list(exp.Lower(this=value), rules.blocked_values), sql.lit("blocked_value"))
    for p in rules.blocked_patterns:
        cond: exp.Expression = exp.Anonymous(this="regexp_full_match", expressions=[value.copy(), sql.lit("(?i)" + p.pattern)])
        if p.types:
            cond = exp.and_(sql.in_list(kind.copy(), p.types), cond).assert_is(exp.Expression)
        case = case.when(cond, sql.lit(f"blocked_pattern:{p.name}"))
    return case


def extract(engine: Engine, rules: IdentityRules) -> int:
    """Build `_idr_occ(message_id, source, ts, rule, kind, value, reason)`; returns its row count."""
    protect = tokenising(engine)
    python_kinds = sorted({"phone", *PII_TYPES}) if protect else ["phone"]
    raw = sql.template(
        "CREATE OR REPLACE TEMP TABLE _idr_raw AS SELECT *, (__py_kind OR NOT regexp_full_match(raw, '[ -~]*')) AS needs_py "
        "FROM (__occ) WHERE raw IS NOT NULL",
        occ=occurrences_select(rules), py_kind=sql.in_list(exp.column("kind"), python_kinds),
    )
    engine.execute(raw)

    # Personal types (when pseudonymising), phones and non-ASCII values go through Python once per
    # distinct (type, raw, region): normalised, checked, and given their stored form (a token).
    # The clean zone already holds tokens for personal fields: their values come from the vault,
    # only to apply the blocking rules; the token stays the stored form.
    distinct = engine.fetch_all(sql.template("SELECT DISTINCT kind, raw, region FROM _idr_raw WHERE needs_py"))
    clear = reveal(engine, [t for k, t, _ in distinct if k in PII_TYPES and is_token(t)]) if protect else {}
    kinds, raws, regions, values, reasons, stored = [], [], [], [], [], []
    for kind, text, region in distinct:
        token = text if kind in PII_TYPES and is_token(text) else None
        if token is not None and token not in clear:
            n = Normalised(token)  # its person was erased (or the vault does not know it): nothing to check
        else:
            n = normalise(kind, clear.get(text, text), region, rules.phone_region)
        kinds.append(kind)
        raws.append(text)
        regions.append(region)
        values.append(n.value)
        reasons.append(n.reason)
        stored.append(token or (token_for(engine, kind, n.value) if kind in PII_TYPES else None))
    engine.register("_idr_pydict", pa.table({
        "kind": pa.array(kinds, pa.string()), "raw": pa.array(raws, pa.string()), "region": pa.array(regions, pa.string()),
        "value": pa.array(values, pa.string()), "reason": pa.array(reasons, pa.string()), "stored": pa.array(stored, pa.string()),
    }))
    try:
        sql.run(engine, """
            CREATE OR REPLACE TEMP TABLE _idr_norm AS
            SELECT r.message_id, r.source, r.ts, r.rule, r.kind, r.raw,
                   CASE WHEN r.needs_py THEN d.value WHEN r.kind = 'email' THEN lower(trim(r.raw)) ELSE trim(r.raw) END AS value,
                   CASE WHEN r.needs_py THEN d.reason END AS pre_reason, d.stored
            FROM _idr_raw r LEFT JOIN _idr_pydict d
              ON d.kind = r.kind AND d.raw = r.raw AND d.region IS NOT DISTINCT FROM r.region
        """)
    finally:
        engine.unregister("_idr_pydict")
    # An alias's previousId is a user id if some event has it as one, else an anonymous id.
    sql.run(engine, """
        UPDATE _idr_norm SET kind = CASE WHEN value IN (SELECT value FROM _idr_norm WHERE kind = 'user_id')
                                         THEN 'user_id' ELSE 'anonymous_id' END
        WHERE kind = 'previous_id'
    """)
    shown = sql.template(
        "CASE WHEN value IS NULL THEN left(trim(raw), 64) WHEN length(value) > __n THEN left(value, 64) || '...#' || md5(value) ELSE value END",
        n=sql.lit(rules.max_value_length),
    )
    sql.run(engine, """
        CREATE OR REPLACE TEMP TABLE _idr_occ AS
        SELECT DISTINCT message_id, source, ts, rule, kind, coalesce(stored, __shown) AS value, reason
        FROM (SELECT message_id, source, ts, rule, kind, raw, value, stored,
                     coalesce(pre_reason, __reason) AS reason FROM _idr_norm) t
    """, shown=shown, reason=_block_reason(rules))
    sql.run(engine, "DROP TABLE _idr_raw")
    sql.run(engine, "DROP TABLE _idr_norm")
    return int(sql.scalar(engine, "SELECT count(*) FROM _idr_occ"))
