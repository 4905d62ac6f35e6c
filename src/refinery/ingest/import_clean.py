"""The import's SQL: a file's rows -> clean `events` rows, built from typed columns.

`import_select` is a pure function from a mapping, the file's shape and the file as a relation
to one SELECT (built with sqlglot) whose rows are ready to insert into `events`, plus:

- `_reason`, `_message`, `_field`, `_stage`: why a row cannot be loaded (NULL when it can). The
  import's own checks (empty key or user, bad timestamp or value) come first, then the
  collector's cleaning rules (time window), so an imported row meets the same rules as an event
  sent to the collector;
- `payload`: the Segment-shaped payload, built only for rows that fail (what `failed_events`
  keeps and replay reads), or for every row when plans must see it;
- `_h`: a 64-bit hash of the message id, for the importer's duplicate filter;
- `_nl`: line breaks inside the record's quoted values (CSV, when rows are numbered by line).

The SELECT has no join: DuckDB then keeps the file's order while it scans in parallel, which the
row numbers rely on.

Cleaning works on the typed columns directly: no per-row JSON payload is built and parsed again,
which is what the collector must do. The values are meant to equal what the collector's cleaning
gives the payload the importer would have sent (docs/decisions/0005-import-from-typed-columns.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlglot import exp

from refinery.ingest.clean import EVENT_COLUMNS, CleanRules
from refinery.ingest.import_pii import PiiSlot, PiiSql, pii_fields, region_expr
from refinery.privacy.tokens import PiiPolicy
from refinery.storage.engine import parse

LIBRARY = {"name": "refinery-import", "version": "1"}
#: Integers in this range become JSON numbers; whole numbers beyond it are kept exactly, as JSON
#: strings of their digits (a double would silently round them; many JSON readers would too).
INT64_RANGE = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class FileShape:
    """What the importer learnt about a file before reading it: format, columns (in order) and types."""

    format: str
    columns: dict[str, str]
    header_lines: int = 0  # lines before the first data row (CSV: skip + header)
    count_newlines: bool = False  # CSV: count line breaks inside quoted values (to number rows by line)


def template(sql: str, **slots: exp.Expr) -> exp.Expression:
    """Parse a constant SQL template and put sqlglot expressions where `__name` placeholders stand."""
    tree = parse(sql)
    for col in list(tree.find_all(exp.Column)):
        name = col.name
        if name.startswith("__") and name[2:] in slots:
            value = slots[name[2:]].copy()
            atomic = isinstance(value, (exp.Column, exp.Literal, exp.Func, exp.Cast, exp.Case, exp.Paren, exp.Array, exp.Null))
            col.replace(value if atomic else exp.Paren(this=value))
    for table in list(tree.find_all(exp.Table)):
        if table.name.startswith("__") and table.name[2:] in slots:
            table.replace(slots[table.name[2:]].copy())
    return tree


def lit(value: str) -> exp.Expr:
    return exp.Literal.string(value)


def quoted_table(name: str) -> exp.Table:
    """A table we named ourselves (never user text), quoted anyway."""
    return exp.Table(this=exp.to_identifier(name, quoted=True))


def _json_object(pairs: list[tuple[str, exp.Expr]]) -> exp.Expr:
    args: list[exp.Expr] = []
    for k, v in pairs:
        args.extend((lit(k), v.copy()))
    return exp.Anonymous(this="json_object", expressions=args)


def _is_null(e: exp.Expr) -> exp.Expr:
    return exp.Is(this=e.copy(), expression=exp.Null())


def _all(conds: list[exp.Expr]) -> exp.Expr:
    out = conds[0].copy()
    for c in conds[1:]:
        out = exp.And(this=out, expression=c.copy())
    return out


class _Columns:
    """How to read one column as text and as a value, per format (CSV: all text; JSON lines:
    JSON values; Parquet: native types)."""

    def __init__(self, shape: FileShape):
        self.shape = shape

    def ref(self, name: str) -> exp.Expr:
        return exp.column(exp.to_identifier(name, quoted=True))

    def text(self, name: str) -> exp.Expr:
        c = self.ref(name)
        if self.shape.format == "csv":
            return c
        if self.shape.format == "jsonl":
            return template("__c ->> '$'", c=c)
        return exp.cast(c, "VARCHAR")

    def value(self, name: str, kind: str) -> exp.Expr:
        """The JSON value to embed (NULL when a declared type does not fit)."""
        text = self.text(name)
        if kind == "integer":
            # Whole numbers of any size: 64-bit ones as numbers, bigger ones exactly, as digits.
            return template(
                "CASE WHEN TRY_CAST(__t AS BIGINT) IS NOT NULL AND NOT contains(trim(__t), '.') THEN to_json(CAST(__t AS BIGINT)) "
                "WHEN regexp_full_match(trim(__t), '[+-]?[0-9]+') THEN to_json(ltrim(trim(__t), '+')) END",
                t=text,
            )
        if kind in ("double", "boolean"):
            sql_type = {"double": "DOUBLE", "boolean": "BOOLEAN"}[kind]
            return template("to_json(__v)", v=exp.TryCast(this=text, to=exp.DataType.build(sql_type)))
        if kind == "string":
            return template("to_json(__t)", t=text)
        if kind == "json":
            if self.shape.format == "jsonl":
                return self.ref(name)
            if self.shape.format == "csv":
                return template("CASE WHEN json_valid(__t) THEN CAST(__t AS JSON) END", t=text)
            return self._native_json(name)
        # auto: text for CSV, the JSON value for JSON lines, the native value for Parquet
        if self.shape.format == "csv":
            return template("to_json(__t)", t=text)
        if self.shape.format == "jsonl":
            return self.ref(name)
        return self._native_json(name)

    def _native_json(self, name: str) -> exp.Expr:
        kind = self.shape.columns.get(name, "").upper().replace(" ", "")
        if kind in ("HUGEINT", "UHUGEINT", "UBIGINT") or re.fullmatch(r"DECIMAL\((19|[2-9][0-9]),0\)", kind):
            # Integers that may not fit in 64 bits: exact, by the integer rule (see INT64_RANGE)
            return self.value_of_text(self.text(name))
        return template("to_json(__c)", c=self.ref(name))

    @staticmethod
    def value_of_text(text: exp.Expr) -> exp.Expr:
        return template(
            "CASE WHEN TRY_CAST(__t AS BIGINT) IS NOT NULL THEN to_json(CAST(__t AS BIGINT)) ELSE to_json(__t) END", t=text
        )


def _timestamp_expr(cols: _Columns, spec: dict[str, str]) -> exp.Expr:
    text = cols.text(spec["column"])
    fmt = spec["format"]
    if fmt == "iso":
        return template("TRY_CAST(__t AS TIMESTAMPTZ)", t=text)
    if fmt in ("epoch_s", "epoch_ms"):
        scale = "1.0" if fmt == "epoch_s" else "1000.0"
        return template(
            f"CASE WHEN abs(TRY_CAST(__t AS DOUBLE) / {scale}) < 1e11 THEN to_timestamp(TRY_CAST(__t AS DOUBLE) / {scale}) END", t=text
        )
    return template("CAST(try_strptime(__t, __f) AS TIMESTAMPTZ)", t=text, f=lit(fmt))


def _truncated(text: exp.Expr) -> exp.Expr:
    return template("to_json(CASE WHEN length(__t) > 40 THEN left(__t, 37) || '...' ELSE __t END)", t=text)


@dataclass(frozen=True)
class ImportContext:
    """What the SELECT needs besides the mapping: whose rows, which import, when, which rules."""

    source: str
    import_id: str
    received_at: datetime
    rules: CleanRules
    with_payload: bool = False  # build `payload` for every row (plans must read it), not only failed ones
    policy: PiiPolicy | None = None  # personal fields become tokens (privacy/tokens.py); None: kept as they are
    pii: PiiSql | None = None  # builds the token expressions; required with a policy
    with_original: bool = False  # `_orig`: the row as read from the file (for the sealed raw zone)


def _checked(value: exp.Expr, text: exp.Expr) -> exp.Expr:
    """A typed value in a payload: the value, or the text as found when it does not fit the type
    (failed payloads keep what was in the file, so a replay cannot load a wrong value)."""
    return template("CASE WHEN __v IS NULL AND __t IS NOT NULL THEN to_json(__t) ELSE __v END", v=value, t=text)


def import_select(mapping: dict[str, Any], shape: FileShape, ctx: ImportContext, relation: exp.Expr) -> exp.Select:
    """SELECT every `events` column plus the failure columns, `payload`, `_h` and `_nl` over
    `relation` (the file's rows); see the module docstring."""
    cols = _Columns(shape)
    call = mapping["type"]
    checks: list[tuple[exp.Expr, str, exp.Expr, str, str]] = []  # (condition, reason, message, field, stage)
    values: dict[str, exp.Expr] = {}  # name -> expression, computed once in the inner SELECT

    if shape.format == "jsonl":
        checks.append((exp.column("_blank"), "blank_line", lit("The line is blank."), "", "import"))
        checks.append((
            exp.column("_not_object"), "invalid_json",
            template(
                "'The line is not a JSON object (it starts ' || to_json(_line_head) || '); write one JSON object per line, "
                "e.g. {\"user_id\": \"u1\"}.'"
            ),
            "", "import",
        ))

    key_texts = [cols.text(c) for c in mapping["row_key"]]
    nokey = _all([_is_null(t) for t in key_texts])
    values["_nokey"] = nokey
    checks.append((
        exp.column("_nokey"), "missing_row_key",
        lit(f"The row key ({', '.join(mapping['row_key'])}) is empty, so the row cannot get a stable message id; "
            "fill the column in the file or choose row_key columns that always have a value."),
        "/" + mapping["row_key"][0], "import",
    ))
    # 'imp-' + sha256(source, call type, key values): the same rows always get the same ids.
    values["message_id"] = template(
        "CASE WHEN __nokey THEN NULL ELSE 'imp-' || substr(sha256(__src || chr(31) || __call || chr(31) || "
        "CAST(to_json(__keys) AS VARCHAR)), 1, 32) END",
        nokey=nokey, src=lit(ctx.source), call=lit(call), keys=exp.Array(expressions=key_texts),
    )

    ids: dict[str, str] = {}
    for key, field_name in (("user_id", "userId"), ("anonymous_id", "anonymousId")):
        if mapping.get(key):
            values[key] = template("NULLIF(trim(__t), '')", t=cols.text(mapping[key]))
            ids[field_name] = key
    mapped_ids = [f"'{mapping[k]}' ({k})" for k in ("user_id", "anonymous_id") if mapping.get(k)]
    checks.append((
        _all([_is_null(exp.column(k)) for k in ids.values()]),
        "missing_identity",
        lit(f"The row has no user: column {' and '.join(mapped_ids)} is empty. Fill it in the file, or map "
            "anonymous_id to a column that always has a value."),
        "/userId" if mapping.get("user_id") else "/anonymousId", "import",
    ))

    if call == "track":
        spec = mapping["event"]
        if "value" in spec:
            values["event"] = lit(spec["value"])
        else:
            values["event"] = template("NULLIF(trim(__t), '')", t=cols.text(spec["column"]))
            checks.append((
                _is_null(exp.column("event")), "missing_event",
                lit(f"Column '{spec['column']}' (event) is empty; a track call needs an event name. "
                    "Fill it in the file or set event to a constant in the mapping."),
                "/event", "import",
            ))

    if mapping.get("timestamp"):
        ts = mapping["timestamp"]
        values["_ts_text"] = cols.text(ts["column"])
        values["_ts"] = _timestamp_expr(cols, ts)
        fmt_hint = "an ISO-8601 time such as 2026-01-31T12:00:00Z" if ts["format"] == "iso" else (
            f"{ts['format']} (epoch)" if ts["format"].startswith("epoch") else f"the format '{ts['format']}'")
        checks.append((
            _is_null(exp.column("_ts_text")), "missing_timestamp",
            lit(f"Column '{ts['column']}' (timestamp) is empty. Fill it in the file, or remove timestamp from the "
                "mapping to use the import time."),
            "/timestamp", "import",
        ))
        checks.append((
            _is_null(exp.column("_ts")), "invalid_timestamp",
            template(
                "'Column ' || __col || ' (timestamp) holds ' || __val || ', which is not ' || __hint || "
                "'; fix the value in the file or set timestamp.format in the mapping (e.g. ''%d/%m/%Y %H:%M'').'",
                col=lit(f"'{ts['column']}'"), val=_truncated(exp.column("_ts_text")), hint=lit(fmt_hint),
            ),
            "/timestamp", "import",
        ))

    # (group, name) -> (the value as JSON, its text when the value is known to be that text as a JSON string)
    sources: dict[tuple[str, str], tuple[exp.Expr, exp.Expr | None]] = {}

    def fields(group: str, where: str) -> list[tuple[str, exp.Expr]]:
        out: list[tuple[str, exp.Expr]] = []
        personal = pii_fields(ctx.policy, group, list(mapping.get(group, {})))
        for i, (name, spec) in enumerate(mapping.get(group, {}).items()):
            if "value" in spec:
                constant = template("CAST(__j AS JSON)", j=lit(orjson.dumps(spec["value"]).decode()))
                out.append((name, constant))
                sources[(group, name)] = (constant, None)
                continue
            slot = f"_{group[0]}{i}"
            values[slot] = cols.value(spec["column"], spec["type"])
            if spec["type"] not in ("auto", "string"):
                values[slot + "_t"] = cols.text(spec["column"])
                text = exp.column(slot + "_t")
                shown = lit("a personal value (not shown)") if name in personal else _truncated(text.copy())
                checks.append((
                    template("__t IS NOT NULL AND __v IS NULL", t=text, v=exp.column(slot)),
                    "invalid_value",
                    template(
                        "'Column ' || __col || ' (' || __where || ') holds ' || __val || ', which is not ' || __type || "
                        "'; fix the value in the file or change its type in the mapping.'",
                        col=lit(f"'{spec['column']}'"), where=lit(f"{where}.{name}"), val=shown,
                        type=lit("a " + spec["type"] if spec["type"] != "integer" else "an integer"),
                    ),
                    f"/{where}/{name}", "import",
                ))
                out.append((name, _checked(exp.column(slot), text)))
                sources[(group, name)] = (exp.column(slot), None)
            else:
                out.append((name, exp.column(slot)))
                if name in personal and (spec["type"] == "string" or shape.format == "csv"):
                    values[slot + "_s"] = cols.text(spec["column"])  # the value is to_json(this text)
                    sources[(group, name)] = (exp.column(slot), exp.column(slot + "_s"))
                else:
                    sources[(group, name)] = (exp.column(slot), None)
        return out

    traits = fields("traits", "traits")
    properties = fields("properties", "properties")
    context: list[tuple[str, exp.Expr]] = [("library", _json_object([(k, lit(v)) for k, v in LIBRARY.items()]))]
    if mapping.get("crm_id"):
        crm = mapping["crm_id"]
        values["_crm"] = cols.text(crm["column"])
        traits.append((crm["name"], template("to_json(_crm)")))
        sources[("traits", crm["name"])] = (template("to_json(_crm)"), exp.column("_crm"))
        context.append(("externalIds", template(
            "CASE WHEN _crm IS NULL THEN NULL ELSE json_array(json_object('id', _crm, 'type', __n, 'collection', 'users', 'encoding', 'none')) END",
            n=lit(crm["name"]),
        )))

    # --- personal fields: tokens in the clean columns, the values as found in the payload ------------
    pii_values, protected_traits, protected_props = _protect(ctx, traits, properties, sources)

    # --- the payload (what a failed row keeps) and the clean columns, from the same values ---------
    payload: list[tuple[str, exp.Expr]] = [("type", lit(call))]
    if call == "track":
        payload.append(("event", exp.column("event")))
    payload.extend((f, exp.column(k)) for f, k in ids.items())
    traits_obj = _json_object(traits)
    props_obj = _json_object(properties)
    clean_traits_obj = _json_object(protected_traits)
    clean_props_obj = _json_object(protected_props)
    clean_context = list(context)
    if call == "identify":
        payload.append(("traits", traits_obj))
    else:
        payload.append(("properties", props_obj))
        if traits:
            context.append(("traits", traits_obj.copy()))
            clean_context.append(("traits", clean_traits_obj.copy()))
    context_obj = _json_object(context)
    clean_context_obj = _json_object(clean_context)
    payload.append(("context", context_obj))
    if mapping.get("timestamp"):
        payload.append(("timestamp", template("COALESCE(strftime(_ts, '%Y-%m-%dT%H:%M:%S.%fZ'), _ts_text)")))
    payload.append(("messageId", exp.column("message_id")))

    event_time = exp.column("_ts") if mapping.get("timestamp") else exp.Null()
    received = template("CAST(__at AS TIMESTAMPTZ)", at=lit(ctx.received_at.isoformat()))
    name_expr: exp.Expr = exp.Null()
    if call == "track" and "name" in mapping.get("properties", {}):
        name_expr = template("NULLIF(trim(_props ->> '$.name'), '')")
    clean_cols: dict[str, exp.Expr] = {c: exp.Null() for c in EVENT_COLUMNS}
    clean_cols.update(
        message_id=exp.column("message_id"),
        source=lit(ctx.source),
        type=lit(call),
        event=exp.column("event") if call == "track" else exp.Null(),
        name=name_expr,
        user_id=exp.column("user_id") if "user_id" in values else exp.Null(),
        anonymous_id=exp.column("anonymous_id") if "anonymous_id" in values else exp.Null(),
        timestamp=template("COALESCE(__t, __r)", t=event_time.copy(), r=received.copy()),
        original_timestamp=event_time.copy(),
        received_at=received.copy(),
        properties=exp.column("_props") if call == "track" else exp.Null(),
        traits=exp.column("_traits") if call == "identify" or traits else exp.Null(),
        context=exp.column("_context"),
        library_name=lit(LIBRARY["name"]),
        import_id=lit(ctx.import_id),
        loaded_at=template("now()"),
    )
    typed = {
        "message_id": "VARCHAR", "source": "VARCHAR", "type": "VARCHAR", "event": "VARCHAR", "name": "VARCHAR",
        "user_id": "VARCHAR", "anonymous_id": "VARCHAR", "group_id": "VARCHAR", "previous_id": "VARCHAR",
        "timestamp": "TIMESTAMPTZ", "original_timestamp": "TIMESTAMPTZ", "sent_at": "TIMESTAMPTZ", "received_at": "TIMESTAMPTZ",
        "properties": "JSON", "traits": "JSON", "context": "JSON", "consent": "JSON", "raw_id": "BIGINT", "loaded_at": "TIMESTAMPTZ",
    }

    # The collector's cleaning rules that can apply to an imported row: the time window.
    skew = int(ctx.rules.max_future_skew_seconds)
    oldest = _iso(ctx.rules.min_event_time)
    checks.append((
        template(f"_time > __r + INTERVAL {skew} SECOND", r=received.copy()), "timestamp_in_future",
        template(f"'timestamp ' || strftime(_time, '%Y-%m-%dT%H:%M:%SZ') || ' is more than {skew} s after the event was received; "
                 "fix the client clock or the timestamp field (or raise max_future_skew_seconds).'"),
        "/timestamp", "clean",
    ))
    checks.append((
        template(f"_time < TIMESTAMPTZ '{oldest}'"), "timestamp_too_old",
        template(f"'timestamp ' || strftime(_time, '%Y-%m-%dT%H:%M:%SZ') || ' is before {oldest}; fix the timestamp field "
                 "(or lower min_event_time).'"),
        "/timestamp", "clean",
    ))

    # Stage 1: the values, once per row (only named values: a file column never clashes with them).
    passthrough: list[exp.Expr | str] = ["_blank", "_not_object", "_line_head"] if shape.format == "jsonl" else []
    if ctx.with_original:
        passthrough.append(_original(shape).as_("_orig"))
    stage1 = exp.select(*[v.as_(exp.to_identifier(k)) for k, v in values.items()], *passthrough,
                        _newlines(shape).as_("_nl")).from_(relation)
    # Stage 1b: the tokens and normal forms of personal values.
    if pii_values:
        stage1 = exp.select("*", *[v.as_(exp.to_identifier(k)) for k, v in pii_values.items()]).from_(stage1.subquery("_s1"))
    # Stage 2: the JSON objects and the event time.
    stage2 = exp.select(
        "*",
        clean_props_obj.as_("_props"), clean_traits_obj.as_("_traits"), clean_context_obj.as_("_context"),
        template("COALESCE(__t, __r)", t=event_time.copy(), r=received.copy()).as_("_time"),
    ).from_(stage1.subquery("_s1b" if pii_values else "_s1"))
    # Stage 3: the first failed check, and everything the writer needs.
    check = exp.Case()
    for i, (cond, *_rest) in enumerate(checks, 1):
        check = check.when(cond.copy(), exp.Literal.number(i))
    stage3 = exp.select("*", check.as_("_check")).from_(stage2.subquery("_s2"))
    reasons = exp.Array(expressions=[lit(c[1]) for c in checks])
    fields_ = exp.Array(expressions=[lit(c[3]) for c in checks])
    stages = exp.Array(expressions=[lit(c[4]) for c in checks])
    message = exp.Case(this=exp.column("_check"))
    for i, (_c, _r, msg, _f, _s) in enumerate(checks, 1):
        message = message.when(exp.Literal.number(i), msg.copy())
    payload_obj = exp.cast(_json_object(payload), "VARCHAR")
    out = [
        exp.cast(clean_cols[c], typed[c]).as_(c) if isinstance(clean_cols[c], exp.Null) and c in typed else clean_cols[c].as_(c)
        for c in EVENT_COLUMNS
    ]
    out += [
        template("list_extract(__a, _check)", a=reasons).as_("_reason"),
        message.as_("_message"),
        template("list_extract(__a, _check)", a=fields_).as_("_field"),
        template("list_extract(__a, _check)", a=stages).as_("_stage"),
        (payload_obj if ctx.with_payload else template("CASE WHEN _check IS NOT NULL THEN __p END", p=payload_obj)).as_("payload"),
        template("hash(message_id)").as_("_h"),
        exp.column("_nl"),
        *[exp.column(k) for k in pii_values],
    ]
    if ctx.with_original:
        out.append(exp.column("_orig"))
    return exp.select(*out).from_(stage3.subquery("_s3"))


def pii_slots(mapping: dict[str, Any], policy: PiiPolicy | None) -> list[PiiSlot]:
    """The personal fields of a mapping, in the order of the SELECT's `_pt<j>` / `_pn<j>` columns."""
    traits = list(mapping.get("traits", {}))
    if mapping.get("crm_id"):
        traits.append(mapping["crm_id"]["name"])
    out: list[PiiSlot] = []
    for group, names in (("traits", traits), ("properties", list(mapping.get("properties", {})))):
        out.extend(PiiSlot(group, n, k) for n, k in pii_fields(policy, group, names).items())
    return out


def _protect(
    ctx: ImportContext, traits: list[tuple[str, exp.Expr]], properties: list[tuple[str, exp.Expr]],
    sources: dict[tuple[str, str], tuple[exp.Expr, exp.Expr | None]],
) -> tuple[dict[str, exp.Expr], list[tuple[str, exp.Expr]], list[tuple[str, exp.Expr]]]:
    """The `_pt<j>` (token) and `_pn<j>` (normal form) expressions of each personal field, and the
    traits and properties with tokens in place of personal values (as `protect_event` leaves them)."""
    computed: dict[str, exp.Expr] = {}
    if ctx.policy is None or not ctx.policy.enabled:
        return computed, traits, properties
    if ctx.pii is None:
        raise ValueError("ImportContext.pii is required with a policy")
    region = region_expr(traits)
    out: dict[str, list[tuple[str, exp.Expr]]] = {}
    for group, pairs in (("traits", traits), ("properties", properties)):
        kinds = pii_fields(ctx.policy, group, [n for n, _ in pairs])
        out[group] = []
        for name, clear in pairs:
            if name not in kinds:
                out[group].append((name, clear))
                continue
            j = len(computed) // 2
            value, text = sources[(group, name)]
            token, normal = ctx.pii.protect(kinds[name], value, text, region)
            computed[f"_pt{j}"], computed[f"_pn{j}"] = token, normal
            out[group].append((name, template(f"CASE WHEN _pt{j} IS NULL THEN __c ELSE to_json(_pt{j}) END", c=clear)))
    return computed, out["traits"], out["properties"]


def _original(shape: FileShape) -> exp.Expr:
    """The row as read from the file, as JSON text: an object of every column (in the file's order)
    for CSV and Parquet, the line as a string for JSON lines."""
    if shape.format == "jsonl":
        return exp.cast(template("to_json(_line)"), "VARCHAR")  # the line as a JSON string: it may not be JSON
    args: list[exp.Expr] = []
    for c in shape.columns:
        args.extend((lit(c), exp.column(exp.to_identifier(c, quoted=True))))
    return exp.cast(exp.Anonymous(this="json_object", expressions=args), "VARCHAR")


def _newlines(shape: FileShape) -> exp.Expr:
    """Line breaks inside a CSV record's quoted values (0 for other formats), to number rows by line."""
    if shape.format != "csv" or not shape.count_newlines:
        return exp.cast(exp.Literal.number(0), "INTEGER")
    parts = [template("COALESCE(length(__c) - length(replace(__c, chr(10), '')), 0)", c=exp.column(exp.to_identifier(c, quoted=True)))
             for c in shape.columns]
    total = parts[0]
    for p in parts[1:]:
        total = exp.Add(this=total, expression=p)
    return exp.cast(total, "INTEGER")


def _iso(value: str) -> str:
    # Settings are validated text, but never let a quote through into SQL.
    if not all(ch.isalnum() or ch in "-:.+TZ " for ch in value):
        raise ValueError(f"min_event_time {value!r} is not an ISO-8601 time")
    return value


def reader_relation(shape: FileShape, mapping: dict[str, Any], path: str, rejects_table: str) -> tuple[exp.Expr, list[Any]]:
    """The file as a relation (a table function call with bound parameters) and its parameters."""
    opts = mapping["csv"]
    if shape.format == "csv":
        sql = ("SELECT * FROM read_csv(?, delim = ?, quote = ?, escape = ?, header = true, skip = ?, encoding = ?, "
               "auto_detect = false, all_varchar = true, columns = ?, store_rejects = true, rejects_table = ?, rejects_scan = ?)")
        params = [path, opts["delimiter"], opts["quote"], opts["escape"], opts["skip"], mapping["encoding"],
                  {c: "VARCHAR" for c in shape.columns}, rejects_table, rejects_table + "_scan"]
        return exp.Subquery(this=parse(sql), alias=exp.TableAlias(this=exp.to_identifier("_file"))), params
    if shape.format == "jsonl":
        from refinery.ingest.mapping import column_uses

        needed = column_uses(mapping)
        structure = orjson.dumps({c: "JSON" for c in needed}).decode()
        inner = template(
            "SELECT _line, _line IS NULL OR trim(_line) = '' AS _blank, "
            "_line IS NOT NULL AND trim(_line) <> '' AND NOT _is_object AS _not_object, "
            "left(_line, 20) AS _line_head, "
            "CASE WHEN _is_object THEN json_transform(_line, __structure) END AS _obj "
            # CASE guards evaluation, so invalid lines are never handed to json_type / json_transform
            "FROM (SELECT _line, CASE WHEN json_valid(_line) THEN json_type(_line) = 'OBJECT' ELSE false END AS _is_object "
            "FROM read_csv(?, delim = ?, quote = '', escape = '', header = false, encoding = ?, auto_detect = false, "
            "columns = {'_line': 'VARCHAR'}, store_rejects = true, rejects_table = ?, rejects_scan = ?))",
            structure=lit(structure),
        )
        outer = exp.select("_line", "_blank", "_not_object", "_line_head").from_(exp.Subquery(this=inner, alias=exp.TableAlias(this=exp.to_identifier("_lines"))))
        for c in needed:
            outer = outer.select(
                exp.StructExtract(this=exp.column("_obj"), expression=lit(c)).as_(exp.to_identifier(c, quoted=True)), append=True
            )
        return outer.subquery("_file"), [path, LINE_DELIMITER, mapping["encoding"], rejects_table, rejects_table + "_scan"]
    return exp.Subquery(this=parse("SELECT * FROM read_parquet(?)"), alias=exp.TableAlias(this=exp.to_identifier("_file"))), [path]


#: JSON text never holds a raw U+001F (control characters must be escaped), so splitting JSON lines on
#: it yields whole lines; a line that does contain one is not JSON and is rejected with its number.
LINE_DELIMITER = "\x1f"
