"""AST -> sqlglot: a rule becomes one SELECT of profile ids, an explanation, or SQL text.

Shape of the query (one pass over the events for every aggregate, not a subquery per profile):

    WITH agg AS (             -- one row per profile: each event condition as an aggregate with FILTER
        SELECT ep.profile_id AS unit, count(*) FILTER (WHERE ...) AS c1, sum(...) FILTER (...) AS c2
        FROM events e JOIN event_profiles ep ON ...
        WHERE e.received_at <= as_of AND e.timestamp <= as_of   -- as of (also on ep.timestamp)
          AND (<condition 1's filter> OR <condition 2's filter> ...)  -- only events something counts
        GROUP BY unit),
      seq_c3 AS (...),        -- a sequence: window functions over the steps' events, per profile
      freq_c4 AS (...)        -- most frequent value: counts per value, the first by count
    SELECT p.profile_id FROM profiles p LEFT JOIN agg ON ... WHERE <the rule over c1, c2, ...>

Windows are relative to `as_of`, rendered as literal timestamps; only events received by then
count, so a past audience can be reproduced exactly. Comparisons use two-valued logic: a missing
value compares false (so `not plan = 'pro'` includes profiles without a plan). User text only
ever enters as sqlglot literals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import cast

from sqlglot import exp

from refinery.profiles.policy import TraitPolicy
from refinery.segments import ast
from refinery.segments.catalog import Catalog, build_catalog
from refinery.segments.check import Checked, check, event_field, trait_parts
from refinery.segments.errors import SegmentTypeError
from refinery.segments.parse import parse
from refinery.storage.engine import parse as parse_sql

#: The relation (profile_id, person_id) a rule `counted by persons` reads; the caller registers it
#: (`persons_relation`) with the groups refinery.profiles.persons computes for the threshold.
PERSONS_TABLE = "segment_persons"
ASOF_TRAITS = "asof_traits"  # the CTE of traits as of the evaluated moment (CompileContext.traits_as_of)

__all__ = ["PERSONS_TABLE", "CompileContext", "Compiled", "CompiledMany", "Condition", "build_catalog", "compile_many",
           "compile_rule", "time_bounds"]


@dataclass(frozen=True)
class CompileContext:
    catalog: Catalog
    segments: Mapping[str, str] = field(default_factory=dict)         # name -> rule text, for `in segment`
    computed_traits: Mapping[str, str] = field(default_factory=dict)  # name -> expression text
    engine_dialect: str = "duckdb"
    tokenise: Callable[[str, str], str] | None = None                 # (kind, normal value) -> token
    phone_region: str | None = None   # phone literals without a country code; None: the catalog's (the store's)
    # Set: trait conditions read each profile's traits as of the evaluated moment, merged under this
    # policy from the identify calls received by then (an audience of the past, reproduced exactly).
    # None: the `profiles` table's traits, which are the traits now (runs, previews and tails at now).
    traits_as_of: TraitPolicy | None = None


@dataclass(frozen=True)
class Condition:
    """One leaf of a rule, as explain reports it: `id` (c1, c2, ...; `c3.c1` inside segment c3
    refers to), its kind, its text in the rule and where it is."""

    id: str
    kind: str  # event | trait | segment | sequence
    text: str
    span: ast.Span
    segment: str | None = None  # the segment whose rule it comes from (None: this rule)


@dataclass(frozen=True)
class Compiled:
    rule: ast.Rule
    conditions: tuple[Condition, ...]
    segments_referenced: frozenset[str]
    realtime: bool
    checked: Checked = field(repr=False, compare=False, default=None)  # type: ignore[assignment]
    ctx: CompileContext = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    @property
    def persons_threshold(self) -> float | None:
        """The link threshold when the rule counts persons (the caller registers PERSONS_TABLE)."""
        p = self.rule.policy
        return p.threshold if p is not None and p.mode == "persons" else None

    def members(self, as_of: datetime, *, among: str | None = None) -> exp.Select:
        """SELECT profile_id of every member as of `as_of` (one column, one row per profile).
        `among`: a table (or registered relation) of profile ids; only those are evaluated (an
        incremental run over the profiles whose inputs changed; not for rules counted by persons)."""
        if among is not None and self.persons_threshold is not None:
            raise ValueError("a rule counted by persons is evaluated for every person, never among some profiles")
        return _Query(self, _utc(as_of), among=among).members()

    def explain(self, profile_id: str, as_of: datetime) -> exp.Select:
        """Rows (condition_id, held BOOLEAN, value VARCHAR) for one profile, in condition order."""
        return _Query(self, _utc(as_of), profile_id).explain()

    def sql(self, as_of: datetime, dialect: str = "duckdb") -> str:
        return self.members(as_of).sql(dialect=dialect, pretty=True)


def compile_rule(text: str, ctx: CompileContext, *, name: str | None = None) -> Compiled:
    """Parse, check and compile a rule; raises SegmentError subclasses. `name`: the segment's own
    name, so a reference to itself is refused as a cycle."""
    checked = check(parse(text), ctx, name=name)
    conditions = tuple(_conditions(checked))
    return Compiled(checked.rule, conditions, frozenset(_referenced(checked)), _realtime(checked), checked, ctx)


@dataclass(frozen=True)
class CompiledMany:
    """Many rules evaluated together. Those counted by profiles (`batched`) share one scan of the
    events: their aggregates are columns of one `agg`, their sequences and most-frequent values
    CTEs of one query, and `members` returns (segment, profile_id) for all of them at once. A rule
    counted by persons reads the persons relation at its own threshold, so it runs alone
    (`alone`: use `compiled[name].members`)."""

    compiled: Mapping[str, Compiled]
    batched: tuple[str, ...]
    alone: tuple[str, ...]

    def members(self, as_of: datetime) -> exp.Select | None:
        """SELECT segment, profile_id of every member of every batched rule as of `as_of`
        (None when no rule is batched)."""
        if not self.batched:
            return None
        return _many(self, _utc(as_of))

    def sql(self, as_of: datetime, dialect: str = "duckdb") -> str | None:
        q = self.members(as_of)
        return None if q is None else q.sql(dialect=dialect, pretty=True)


def compile_many(rules: Mapping[str, str], ctx: CompileContext) -> CompiledMany:
    """Compile each rule (by name: `in segment` cycles through it are found) for one evaluation
    of them all; raises the first rule's SegmentError."""
    compiled = {name: compile_rule(text, ctx, name=name) for name, text in rules.items()}
    batched = tuple(n for n, c in compiled.items() if c.persons_threshold is None)
    alone = tuple(n for n, c in compiled.items() if c.persons_threshold is not None)
    return CompiledMany(compiled, batched, alone)


def _many(many: CompiledMany, as_of: datetime) -> exp.Select:
    """WITH agg, seq_*, freq_* (shared), base AS MATERIALIZED (profile_id, one boolean per rule)
    SELECT 'a' AS segment, profile_id FROM base WHERE s1 UNION ALL ..."""
    q = _Query(many.compiled[many.batched[0]], as_of)
    held = []
    for i, name in enumerate(many.batched, start=1):
        checked = many.compiled[name].checked
        held.append(exp.alias_(q.node(checked, checked.rule.expr, f"s{i}."), f"s{i}"))
    base = q._final(exp.select(_col("profile_id", "p"), *held), exp.true())
    union: exp.Expr | None = None
    for i, name in enumerate(many.batched, start=1):
        part = exp.select(exp.alias_(exp.Literal.string(name), "segment"), exp.column("profile_id")).from_("base") \
            .where(exp.column(f"s{i}"))
        union = part if union is None else exp.union(union, part, distinct=False)
    assert union is not None
    out = exp.select("segment", "profile_id").from_(exp.Subquery(this=union, alias="m"))
    with_ = base.args.pop("with_", None)  # the CTEs go to the top, beside `base`
    for cte in with_.expressions if with_ is not None else []:
        out = out.with_(cte.alias, as_=cte.this)
    return out.with_("base", as_=base, materialized=True)


def _conditions(checked: Checked, prefix: str = "", segment: str | None = None) -> list[Condition]:
    out: list[Condition] = []
    text = checked.rule.text
    for i, c in enumerate(ast.conditions(checked.rule.expr), start=1):
        cid = f"{prefix}c{i}"
        out.append(Condition(cid, _kind(c), text[c.span.start:c.span.end], c.span, segment))
        if isinstance(c, ast.SegmentRef):
            out.extend(_conditions(checked.segments[c.name], cid + ".", c.name))
    return out


def _kind(c: ast.Condition) -> str:
    if isinstance(c, ast.TraitCondition):
        return "trait"
    if isinstance(c, ast.SegmentRef):
        return "segment"
    if isinstance(c, ast.Sequence):
        return "sequence"
    return "event"


def _referenced(checked: Checked) -> set[str]:
    out = set(checked.segments)
    for inner in checked.segments.values():
        out |= _referenced(inner)
    return out


def _realtime(checked: Checked) -> bool:
    """Rules the real-time evaluator can keep up to date event by event: profiles (not persons),
    and conditions that are counts, sequences, traits or segments that are real time themselves."""
    if checked.rule.policy is not None and checked.rule.policy.mode == "persons":
        return False
    for c in ast.conditions(checked.rule.expr):
        if isinstance(c, ast.AggregateCondition) and c.aggregate.func != "count":
            return False
        if isinstance(c, ast.ComputedTraitCondition) and c.aggregate.func != "count":
            return False
        if _moves_with_time(c):
            return False
    return all(_realtime(s) for s in checked.segments.values())


def _moves_with_time(node: object) -> bool:
    """Whether a `N ago` value sits in a comparison (a `where`, a step's filter, a trait or a
    count's comparison) rather than in a window: then every stored event's or trait's answer moves
    with the clock, which the real-time evaluator's timers do not follow."""
    if isinstance(node, ast.Window):
        return False  # windows with `ago` bounds are the evaluator's business
    if isinstance(node, ast.Literal):
        return node.type == "ago"
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return any(_moves_with_time(getattr(node, f.name)) for f in dataclasses.fields(node))
    if isinstance(node, (tuple, list)):
        return any(_moves_with_time(x) for x in node)
    return False


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# --- times ---------------------------------------------------------------------------------------
def instant(lit: ast.Literal, as_of: datetime) -> datetime:
    """An absolute time of a literal: a date's midnight (UTC), a time, or as_of minus `N units ago`."""
    if lit.type == "ago":
        return as_of - cast(ast.Duration, lit.value).delta
    if lit.type == "date":
        d = cast(date, lit.value)
        return datetime(d.year, d.month, d.day, tzinfo=UTC)
    return _utc(cast(datetime, lit.value))


def time_bounds(op: str, values: tuple[ast.Literal, ...], as_of: datetime) -> list[tuple[str, datetime]]:
    """A comparison of a time with time literals as (operator, instant) pairs that must all hold.
    A date stands for its whole day: `= 2026-01-05` is that day, `<= 2026-01-05` includes it."""
    def day(lit: ast.Literal) -> tuple[datetime, datetime]:
        start = instant(lit, as_of)
        return (start, start + timedelta(days=1)) if lit.type == "date" else (start, start)

    if op == "between":
        lo, hi = day(values[0])[0], day(values[1])
        return [(">=", lo), ("<" if values[1].type == "date" else "<=", hi[1])]
    start, end = day(values[0])
    whole_day = values[0].type == "date"
    if op == "=":
        return [(">=", start), ("<", end)] if whole_day else [("=", start)]
    if op == "<":
        return [("<", start)]
    if op == "<=":
        return [("<", end)] if whole_day else [("<=", start)]
    if op == ">":
        return [(">=", end)] if whole_day else [(">", start)]
    if op == ">=":
        return [(">=", start)]
    raise ValueError(op)


def window_bounds(window: ast.Window | None, as_of: datetime) -> list[tuple[str, datetime]]:
    """The window as (operator, instant) pairs on the event time (besides `<= as_of`)."""
    if window is None:
        return []
    if window.last is not None:
        return [(">", as_of - window.last.delta)]
    out: list[tuple[str, datetime]] = []
    if window.start is not None:
        out.append((">=", instant(window.start, as_of)))
    if window.end is not None:
        end = instant(window.end, as_of)
        inclusive_end = window.start is not None  # `between a and b` includes b; `before b` does not
        if window.end.type == "date" and inclusive_end:
            out.append(("<", end + timedelta(days=1)))
        else:
            out.append(("<=" if inclusive_end else "<", end))
    return out


# --- SQL building blocks -------------------------------------------------------------------------
_CMP: dict[str, type[exp.Binary]] = {"=": exp.EQ, "!=": exp.NEQ, "<": exp.LT, "<=": exp.LTE, ">": exp.GT, ">=": exp.GTE}
_CASTS = {"number": "DOUBLE", "boolean": "BOOLEAN", "timestamp": "TIMESTAMPTZ"}


def ts_literal(moment: datetime) -> exp.Expr:
    return exp.cast(exp.Literal.string(_utc(moment).isoformat(sep=" ")), exp.DataType.build("TIMESTAMPTZ"))


def number_literal(value: float) -> exp.Expr:
    return exp.Literal.number(int(value) if float(value).is_integer() and abs(value) < 2**53 else repr(value))


def literal(lit: ast.Literal, as_of: datetime) -> exp.Expr:
    if lit.type == "string":
        return exp.Literal.string(cast(str, lit.value))
    if lit.type == "number":
        return number_literal(cast(float, lit.value))
    if lit.type == "boolean":
        return exp.Boolean(this=bool(lit.value))
    return ts_literal(instant(lit, as_of))


def json_path(parts: tuple[str | int, ...]) -> exp.JSONPath:
    nodes: list[exp.Expr] = [exp.JSONPathRoot()]
    for p in parts:
        nodes.append(exp.JSONPathSubscript(this=p) if isinstance(p, int) else exp.JSONPathKey(this=p))
    return exp.JSONPath(expressions=nodes)


def json_text(column: exp.Expr, parts: tuple[str | int, ...]) -> exp.Expr:
    """`column ->> '$.a.b[0]'`: the value as text (NULL when missing or JSON null)."""
    return exp.JSONExtractScalar(this=column, expression=json_path(parts))


def typed(text: exp.Expr, kind: str) -> exp.Expr:
    """A JSON text value read as `kind` (TRY_CAST: a value of another type reads as NULL)."""
    if kind in _CASTS:
        return exp.TryCast(this=text, to=exp.DataType.build(_CASTS[kind]))
    return text


def _and(items: list[exp.Expr]) -> exp.Expr:
    if not items:
        return exp.true()
    out = items[0]
    for item in items[1:]:
        out = exp.And(this=out, expression=item)
    return out


def _or(items: list[exp.Expr]) -> exp.Expr:
    out = items[0]
    for item in items[1:]:
        out = exp.Or(this=out, expression=item)
    return out


def _paren(e: exp.Expr) -> exp.Expr:
    # AND/OR are `exp.Func` subclasses since sqlglot 30: they need their parentheses all the same
    # (`NOT (a AND b)` is not `NOT a AND b`).
    atomic = isinstance(e, (exp.Column, exp.Boolean, exp.Paren, exp.Func)) and not isinstance(e, exp.Connector)
    return e if atomic else exp.Paren(this=e)


def _bound_exprs(value: exp.Expr, bounds: list[tuple[str, datetime]]) -> list[exp.Expr]:
    return [_CMP[op](this=value.copy(), expression=ts_literal(at)) for op, at in bounds]


def _false_if_null(e: exp.Expr) -> exp.Expr:
    return exp.Coalesce(this=_paren(e), expressions=[exp.false()])


def _positive(e: exp.Expr) -> exp.Expr:
    """`e` for a WHERE or FILTER, where NULL rejects a row as FALSE does: `COALESCE(x, FALSE)`
    under AND and OR only (never under NOT) becomes `x`. Sound because AND and OR are monotone
    (NULL lies between FALSE and TRUE): the row is kept exactly when it was. The bare comparison
    lets DuckDB push it into the table scan and turn the profiles' outer join into an inner one."""
    if isinstance(e, exp.Coalesce) and len(e.expressions) == 1 and isinstance(e.expressions[0], exp.Boolean) \
            and e.expressions[0].this is False:
        return _positive(e.this)
    if isinstance(e, (exp.And, exp.Or)):
        return type(e)(this=_positive(e.this), expression=_positive(e.expression))
    if isinstance(e, exp.Paren):
        inner = _positive(e.this)
        return exp.Paren(this=inner) if isinstance(inner, (exp.And, exp.Or)) else inner
    return e


def _union(names: list[frozenset[str] | None]) -> frozenset[str] | None:
    """All the event names some filter lets through (None when one lets any through)."""
    if not names or any(n is None for n in names):
        return None
    return frozenset().union(*cast(list[frozenset[str]], names))


def _names(node: ast.Filter) -> frozenset[str] | None:
    """The event names a `where` lets through, when it says (`event = 'x'`, `event in (...)`,
    and of such, or of such), else None."""
    if isinstance(node, ast.And):
        found = [n for n in (_names(cast(ast.Filter, i)) for i in node.items) if n is not None]
        return frozenset.intersection(*found) if found else None
    if isinstance(node, ast.Or):
        return _union([_names(cast(ast.Filter, i)) for i in node.items])
    if isinstance(node, ast.Compare) and node.op in ("=", "in") and all(v.type == "string" for v in node.values):
        f = event_field(node.path)
        if f.column == "event" and not f.json:
            return frozenset(cast(str, v.value) for v in node.values)
    return None


def _col(name: str, table: str) -> exp.Column:
    return exp.column(name, table=table)


class _Query:
    """Builds the members / explain SELECT of one compiled rule at one moment."""

    def __init__(self, compiled: Compiled, as_of: datetime, profile_id: str | None = None, among: str | None = None):
        self.among = among
        self.compiled = compiled
        self.ctx = compiled.ctx
        self.as_of = as_of
        self.profile_id = profile_id
        self.persons = compiled.persons_threshold is not None
        self.aggs: list[exp.Expr] = []            # aggregate columns of `agg`
        self.agg_filters: list[exp.Expr | None] = []  # each aggregate's FILTER condition (None: every row)
        self.prefilters: list[exp.Expr] | None = []  # the aggregates' filters, OR-ed: the scan's WHERE
        self.since: list[datetime | None] = []     # each aggregate's earliest event time (None: unbounded)
        self.names: list[frozenset[str] | None] = []  # each aggregate's event names (None: any event)
        self.ctes: list[tuple[str, exp.Expr]] = []
        self.joins: list[str] = []                       # CTEs joined to the profiles by unit
        self.trait_cols: list[exp.Expr] = []       # persons: trait conditions pooled per person
        self.counter = 0
        self.explained: list[tuple[str, exp.Expr, exp.Expr]] = []  # (id, held, value)
        self.trait_keys: list[str] = []            # traits_as_of: the top-level traits the rule reads

    # --- the units: profiles, or persons -----------------------------------------------------
    def _events_from(self, since: datetime | None = None, names: frozenset[str] | None = None) -> exp.Select:
        """SELECT ... FROM events e JOIN event_profiles ep [JOIN persons] WHERE as-of (+ explain's profile).

        `event_profiles.timestamp` is its event's `timestamp` (profiles/build.py and
        identity/incremental.py copy it), so the time bounds are repeated on it: the join then
        probes only the attributions in the window instead of every one (`since`: the earliest
        event time any condition of the scan counts). `names`: the only event names it counts;
        an event's name is `COALESCE(event, name, type)`, so it has `event` among them or no
        `event` at all, a test on one column that DuckDB runs in the scan, before reading the JSON."""
        q = exp.select().from_(exp.to_table("events").as_("e")).join(
            exp.to_table("event_profiles").as_("ep"),
            on=_and([exp.EQ(this=_col("source", "ep"), expression=_col("source", "e")),
                     exp.EQ(this=_col("message_id", "ep"), expression=_col("message_id", "e"))]))
        if self.persons:
            q = q.join(exp.to_table(PERSONS_TABLE).as_("pm"),
                       on=exp.EQ(this=_col("profile_id", "pm"), expression=_col("profile_id", "ep")))
        where: list[exp.Expr] = [exp.LTE(this=_col("received_at", "e"), expression=ts_literal(self.as_of)),
                                 exp.LTE(this=_col("timestamp", "e"), expression=ts_literal(self.as_of)),
                                 exp.LTE(this=_col("timestamp", "ep"), expression=ts_literal(self.as_of))]
        if since is not None:
            where.append(exp.GTE(this=_col("timestamp", "ep"), expression=ts_literal(since)))
        if names:
            event = _col("event", "e")
            where.append(exp.Paren(this=exp.Or(
                this=exp.In(this=event, expressions=[exp.Literal.string(n) for n in sorted(names)]),
                expression=exp.Is(this=event.copy(), expression=exp.Null()))))
        if self.profile_id is not None:
            where.append(self._unit_filter(_col("profile_id", "ep")))
        if self.among is not None:
            where.append(self._among(_col("profile_id", "ep")))
        return q.where(_and(where))

    def _among(self, column: exp.Expr) -> exp.Expr:
        assert self.among is not None
        return exp.In(this=column, query=exp.Subquery(this=exp.select("profile_id").from_(exp.to_table(self.among))))

    def _unit(self) -> exp.Expr:
        return _col("person_id", "pm") if self.persons else _col("profile_id", "ep")

    def _unit_filter(self, profile_col: exp.Expr) -> exp.Expr:
        """Restrict to the explained profile (or every profile of its person)."""
        assert self.profile_id is not None
        target = exp.Literal.string(self.profile_id)
        if not self.persons:
            return exp.EQ(this=profile_col, expression=target)
        person = parse_sql(f"SELECT person_id FROM {PERSONS_TABLE} WHERE profile_id = __p")  # noqa: S608 - constant
        person.find(exp.Column, bfs=True)
        for c in person.find_all(exp.Column):
            if c.name == "__p":
                c.replace(target)
        members = parse_sql(f"SELECT profile_id FROM {PERSONS_TABLE} WHERE person_id = (__q)")  # noqa: S608 - constant
        for c in list(members.find_all(exp.Column)):
            if c.name == "__q":
                c.replace(exp.Subquery(this=person))
        return exp.In(this=profile_col, query=exp.Subquery(this=members))

    # --- the rule ----------------------------------------------------------------------------
    def members(self) -> exp.Select:
        held = self.node(self.compiled.checked, self.compiled.checked.rule.expr, "")
        return self._final(exp.select(_col("profile_id", "p") if not self.persons else _col("profile_id", "pm")), held)

    def explain(self) -> exp.Select:
        self.node(self.compiled.checked, self.compiled.checked.rule.expr, "")
        base = self._final(exp.select(*[
            e for cid, held, value in self.explained for e in (
                exp.alias_(held, _safe(cid) + "__held"),
                exp.alias_(exp.cast(value, exp.DataType.build("VARCHAR")), _safe(cid) + "__value"))
        ]), exp.true())
        union: exp.Expr | None = None
        for cid, _, _ in self.explained:
            part = exp.select(exp.alias_(exp.Literal.string(cid), "condition_id"),
                              exp.alias_(exp.column(_safe(cid) + "__held"), "held"),
                              exp.alias_(exp.column(_safe(cid) + "__value"), "value")).from_("base")
            union = part if union is None else exp.union(union, part, distinct=False)
        assert union is not None
        out = exp.select("*").from_(exp.Subquery(this=union, alias="x"))
        with_ = base.args.pop("with_", None)  # the CTEs go to the top, beside `base`
        for cte in with_.expressions if with_ is not None else []:
            out = out.with_(cte.alias, as_=cte.this)
        return out.with_("base", as_=base)

    def _final(self, select: exp.Select, held: exp.Expr) -> exp.Select:
        if self.aggs:
            since = None if any(at is None for at in self.since) else min(cast(list[datetime], self.since))
            scan = self._events_from(since, _union(self.names))
            aggs = [a.copy() for a in self.aggs]
            if self.prefilters and len(self.prefilters) == 1:
                # the scan's WHERE is the one filter every aggregate has: no FILTER left to test
                aggs = [exp.alias_(a.this.this, a.alias) if f is not None and f == self.prefilters[0] else a
                        for a, f in zip(aggs, self.agg_filters, strict=True)]
            scan.set("expressions", [exp.alias_(self._unit(), "unit"), *aggs])
            if self.prefilters:
                scan = scan.where(_paren(_or([_paren(p.copy()) for p in self.prefilters])))
            scan = scan.group_by(exp.column("unit"))
            self.ctes.insert(0, ("agg", scan))
            self.joins.insert(0, "agg")
        if self.trait_keys and self.ctx.traits_as_of is not None:
            self.ctes = [(n, self._asof_traits(self.ctx.traits_as_of) if n == ASOF_TRAITS else b) for n, b in self.ctes]
        if self.persons:
            q = select.from_(exp.to_table(PERSONS_TABLE).as_("pm"))
            unit = _col("person_id", "pm")
            if self.trait_cols:
                traits = exp.select(exp.alias_(_col("person_id", "pm"), "unit"), *self.trait_cols).from_(
                    exp.to_table("profiles").as_("p")).join(
                    exp.to_table(PERSONS_TABLE).as_("pm"),
                    on=exp.EQ(this=_col("profile_id", "pm"), expression=_col("profile_id", "p")))
                if self.trait_keys:
                    traits = traits.join(exp.to_table(ASOF_TRAITS), join_type="LEFT",
                                         on=exp.EQ(this=_col("unit", ASOF_TRAITS), expression=_col("profile_id", "p")))
                traits = traits.group_by(_col("person_id", "pm"))
                self.ctes.append(("traits", traits))
                self.joins.append("traits")
            where_unit = self._unit_filter(_col("profile_id", "pm")) if self.profile_id else None
            if where_unit is not None:
                # explain: one row, for the profile asked about
                where_unit = exp.EQ(this=_col("profile_id", "pm"), expression=exp.Literal.string(cast(str, self.profile_id)))
        else:
            q = select.from_(exp.to_table("profiles").as_("p"))
            unit = _col("profile_id", "p")
            where_unit = (exp.EQ(this=_col("profile_id", "p"), expression=exp.Literal.string(self.profile_id))
                          if self.profile_id is not None else None)
            if self.among is not None:
                where_unit = self._among(_col("profile_id", "p"))
        for name in self.joins:
            q = q.join(exp.to_table(name), on=exp.EQ(this=_col("unit", name), expression=unit.copy()), join_type="LEFT")
        conditions = [_positive(held)] if not (isinstance(held, exp.Boolean) and held.this is True) else []
        if where_unit is not None:
            conditions.insert(0, where_unit)
        if conditions:
            q = q.where(_and(conditions))
        for name, body in self.ctes:
            q = q.with_(name, as_=body)
        return q

    def node(self, checked: Checked, node: ast.Node, prefix: str) -> exp.Expr:
        conds = ast.conditions(checked.rule.expr)
        if isinstance(node, ast.And):
            return _and([_paren(self.node(checked, i, prefix)) for i in node.items])
        if isinstance(node, ast.Or):
            return exp.Paren(this=_or([_paren(self.node(checked, i, prefix)) for i in node.items]))
        if isinstance(node, ast.Not):
            return exp.Not(this=_paren(self.node(checked, node.item, prefix)))
        index = next(i for i, c in enumerate(conds, start=1) if c is node)
        cid = f"{prefix}c{index}"
        held, value = self.condition(checked, cast(ast.Condition, node), cid)
        if not isinstance(node, ast.SegmentRef):  # a reference placed its own row before its conditions
            self.explained.append((cid, held, value))
        return held

    def condition(self, checked: Checked, c: ast.Condition, cid: str) -> tuple[exp.Expr, exp.Expr]:
        if isinstance(c, ast.Performed):
            agg = ast.Aggregate("count", None, c.event, c.where, c.span, "number")
            col = self._aggregate(agg, c.window, cid)
            f = c.frequency
            return _CMP[f.op](this=col, expression=exp.Literal.number(f.count)), col.copy()
        if isinstance(c, ast.AggregateCondition):
            col = self._aggregate(c.aggregate, c.window, cid)
            return self.compare(col, c.op, c.values, c.aggregate.value_type or "unknown", None), col.copy()
        if isinstance(c, ast.ComputedTraitCondition):
            col = self._aggregate(c.aggregate, c.window, cid)
            return self.compare(col, c.op, c.values, c.aggregate.value_type or "unknown", None), col.copy()
        if isinstance(c, ast.TraitCondition):
            return self.trait(c, cid)
        if isinstance(c, ast.Sequence):
            return self.sequence(c, cid)
        if isinstance(c, ast.SegmentRef):
            inner = checked.segments[c.name]
            held = self.node(inner, inner.rule.expr, cid + ".")
            # the reference's own row goes before its conditions
            row = (cid, held, exp.cast(held.copy(), exp.DataType.build("VARCHAR")))
            start = next(i for i, (k, _, _) in enumerate(self.explained) if k.startswith(cid + ".")) \
                if any(k.startswith(cid + ".") for k, _, _ in self.explained) else len(self.explained)
            self.explained.insert(start, row)
            return held, exp.Null()
        raise TypeError(type(c))

    # --- comparisons --------------------------------------------------------------------------
    def compare(self, value: exp.Expr, op: str, values: tuple[ast.Literal, ...], field_type: str,
                personal: str | None) -> exp.Expr:
        """`value op values` as a boolean that is never NULL; `value` is JSON text or typed already."""
        if op == "is_set":
            return exp.Not(this=exp.Is(this=value, expression=exp.Null()))
        if op == "is_not_set":
            return exp.Is(this=value, expression=exp.Null())
        kind = values[0].value_type
        if personal:
            values = tuple(self._token(v, personal) for v in values)
        if kind == "timestamp" and op in ("=", "<", "<=", ">", ">=", "between"):
            bounds = time_bounds(op, values, self.as_of)
            return _false_if_null(_and(_bound_exprs(value, bounds)))
        if kind == "timestamp" and op in ("!=",):
            bounds = time_bounds("=", values, self.as_of)
            return _false_if_null(exp.Not(this=_paren(_and(_bound_exprs(value, bounds)))))
        lits = [literal(v, self.as_of) for v in values]
        if op in _CMP:
            out: exp.Expr = _CMP[op](this=value, expression=lits[0])
        elif op == "contains":
            out = exp.func("contains", value, lits[0])
        elif op == "starts_with":
            out = exp.StartsWith(this=value, expression=lits[0])
        elif op == "ends_with":
            out = exp.func("ends_with", value, lits[0])
        elif op == "matches":
            out = exp.RegexpLike(this=value, expression=lits[0])
        elif op == "in":
            out = exp.In(this=value, expressions=lits)
        elif op == "not_in":
            out = exp.Not(this=exp.In(this=value, expressions=lits))
        elif op == "between":
            out = exp.Between(this=value, low=lits[0], high=lits[1])
        else:
            raise ValueError(op)
        return _false_if_null(out)

    def _token(self, lit: ast.Literal, kind: str) -> ast.Literal:
        from refinery.privacy.tokens import PiiPolicy, Tokeniser

        if self.ctx.tokenise is None:
            raise SegmentTypeError(f"'{kind}' is stored as a token, and this compilation has no tokeniser",
                                   fix="compile through the store (CompileContext.tokenise).")
        region = self.ctx.phone_region or self.ctx.catalog.phone_region
        normal = Tokeniser(b"\0" * 32, PiiPolicy(phone_region=region)).normal_form(kind, lit.value)
        return ast.Literal(self.ctx.tokenise(kind, normal), "string", lit.span)

    def operand(self, column: exp.Expr, parts: tuple[str | int, ...], values: tuple[ast.Literal, ...]) -> exp.Expr:
        """A JSON field read as the type of the values it is compared with."""
        text = json_text(column, parts) if parts else column
        kind = values[0].value_type if values else "string"
        return typed(text, kind) if parts else text

    def event_filter(self, node: ast.Filter) -> exp.Expr:
        if isinstance(node, ast.And):
            return _and([_paren(self.event_filter(cast(ast.Filter, i))) for i in node.items])
        if isinstance(node, ast.Or):
            return exp.Paren(this=_or([_paren(self.event_filter(cast(ast.Filter, i))) for i in node.items]))
        if isinstance(node, ast.Not):
            return exp.Not(this=_paren(self.event_filter(cast(ast.Filter, node.item))))
        assert isinstance(node, ast.Compare)
        f = event_field(node.path)
        if f.json:
            value = self.operand(_col(f.column, "e"), f.json, node.values)
        elif f.column == "event":
            value = event_name()
        else:
            value = _col(f.column, "e")
        return self.compare(value, node.op, node.values, node.field_type or "unknown", node.personal)

    # --- event conditions ---------------------------------------------------------------------
    def _event_condition(self, ref: ast.EventRef, where: ast.Filter | None,
                         window: ast.Window | None) -> tuple[exp.Expr, datetime | None, frozenset[str] | None]:
        """(the filter on events: name, window, then `where`, in the order they are cheapest to
        test; the earliest event time it lets through, None when unbounded; the event names it
        lets through, None when any)."""
        parts: list[exp.Expr] = []
        if ref.name is not None:
            parts.append(exp.EQ(this=event_name(), expression=exp.Literal.string(ref.name)))
        bounds = window_bounds(window, self.as_of)
        parts.extend(_bound_exprs(_col("timestamp", "e"), bounds))
        if where is not None:
            parts.append(_paren(self.event_filter(where)))
        since = min((at for op, at in bounds if op in (">", ">=")), default=None)
        names = frozenset([ref.name]) if ref.name is not None else (_names(where) if where is not None else None)
        return _positive(_and(parts)), since, names

    def _note_prefilter(self, full: exp.Expr) -> None:
        """The scan reads only events some aggregate counts: the OR of their whole filters (not
        only names and windows), so a single-condition rule's filter reaches the table scan."""
        if self.prefilters is None:
            return
        if isinstance(full, exp.Boolean):
            self.prefilters = None  # some condition reads every event
        elif all(full != p for p in self.prefilters):
            self.prefilters.append(full)

    def _aggregate(self, agg: ast.Aggregate, window: ast.Window | None, cid: str) -> exp.Expr:
        full, since, names = self._event_condition(agg.event, agg.where, window)
        alias = _safe(cid)
        value: exp.Expr | None = None
        if agg.path is not None:
            f = event_field(agg.path)
            raw = json_text(_col(f.column, "e"), f.json) if f.json else (event_name() if f.column == "event" else _col(f.column, "e"))
            value = typed(raw, agg.value_type or "string") if agg.func not in ("distinct_count",) else raw
            if agg.func in ("sum", "avg"):
                value = typed(raw, "number")
        if agg.func == "most_frequent":
            assert value is not None
            return self._most_frequent(value, full, since, names, alias)
        fn: exp.Expr
        if agg.func == "count":
            fn = exp.Count(this=exp.Star())
        elif agg.func == "distinct_count":
            fn = exp.Count(this=exp.Distinct(expressions=[value]))
        elif agg.func == "sum":
            fn = exp.Sum(this=value)
        elif agg.func == "avg":
            fn = exp.Avg(this=value)
        elif agg.func == "min":
            fn = exp.Min(this=value)
        elif agg.func == "max":
            fn = exp.Max(this=value)
        elif agg.func == "first_time":
            fn = exp.Min(this=_col("timestamp", "e"))
        elif agg.func == "last_time":
            fn = exp.Max(this=_col("timestamp", "e"))
        else:
            raise ValueError(agg.func)
        every = isinstance(full, exp.Boolean) and full.this is True
        if not every:
            fn = exp.Filter(this=fn, expression=exp.Where(this=full))
        same = next((a for a in self.aggs if a.this == fn), None)  # the same aggregate, twice: one column
        if same is not None:
            alias = same.alias
        else:
            self._note_prefilter(full)
            self.aggs.append(exp.alias_(fn, alias))
            self.agg_filters.append(None if every else full)
            self.since.append(since)
            self.names.append(names)
        col: exp.Expr = _col(alias, "agg")
        if agg.func in ("count", "distinct_count", "sum"):
            col = exp.Coalesce(this=col, expressions=[exp.Literal.number(0)])
        return col

    def _most_frequent(self, value: exp.Expr, full: exp.Expr, since: datetime | None, names: frozenset[str] | None,
                       alias: str) -> exp.Expr:
        name = f"freq_{alias}"
        counts = self._events_from(since, names)
        counts.set("expressions", [
            exp.alias_(self._unit(), "unit"), exp.alias_(value, "value"),
            exp.alias_(exp.Window(this=exp.RowNumber(), partition_by=[self._unit()],
                                  order=exp.Order(expressions=[exp.Ordered(this=exp.Count(this=exp.Star()), desc=True),
                                                               exp.Ordered(this=value.copy())])), "rn")])
        counts = counts.where(_and([_paren(full), exp.Not(this=exp.Is(this=value.copy(), expression=exp.Null()))]))
        counts = counts.group_by(exp.column("unit"), exp.column("value"))
        body = exp.select("unit", "value").from_(exp.Subquery(this=counts, alias="t")).where(
            exp.EQ(this=exp.column("rn"), expression=exp.Literal.number(1)))
        self.ctes.append((name, body))
        self.joins.append(name)
        return _col("value", name)

    def sequence(self, c: ast.Sequence, cid: str) -> tuple[exp.Expr, exp.Expr]:
        """Each step's rows carry the latest start of a chain reaching the step before, strictly
        earlier; the sequence holds where the last step's row is within `within` of that start."""
        alias = _safe(cid)
        name = f"seq_{alias}"
        steps = [self._event_condition(s.event, s.where, c.window) for s in c.steps]
        since = None if any(at is None for _, at, _ in steps) else min(at for _, at, _ in steps if at is not None)
        base = self._events_from(since, _union([n for _, _, n in steps]))
        us = exp.func("epoch_us", _col("timestamp", "e"))
        base.set("expressions", [exp.alias_(self._unit(), "unit"), exp.alias_(_col("timestamp", "e"), "ts"),
                                 exp.alias_(us, "us"),
                                 *[exp.alias_(_paren(full), f"is{i}") for i, (full, _, _) in enumerate(steps, start=1)]])
        base = base.where(_paren(_or([_paren(full) for full, _, _ in steps])))
        current: exp.Expr = base
        # start1 = us on step-1 rows; startk = max(start(k-1)) over strictly earlier rows of step k-1
        for k in range(2, len(steps) + 1):
            prev_start = exp.column("us") if k == 2 else exp.column(f"start{k - 1}")
            carried = exp.Case(ifs=[exp.If(this=exp.column(f"is{k - 1}"), true=prev_start)])
            window = exp.Window(this=exp.Max(this=carried), partition_by=[exp.column("unit")],
                                order=exp.Order(expressions=[exp.Ordered(this=exp.column("us"))]),
                                spec=exp.WindowSpec(kind="RANGE", start="UNBOUNDED", start_side="PRECEDING",
                                                    end=exp.Literal.number(1), end_side="PRECEDING"))
            current = exp.select("*", exp.alias_(window, f"start{k}")).from_(exp.Subquery(this=current, alias=f"s{k}"))
        n = len(steps)
        within_us = int(c.within.delta.total_seconds() * 1_000_000)
        done = _and([exp.column(f"is{n}"), exp.Not(this=exp.Is(this=exp.column(f"start{n}"), expression=exp.Null())),
                     exp.LTE(this=exp.Sub(this=exp.column("us"), expression=exp.column(f"start{n}")),
                             expression=exp.Literal.number(within_us))])
        body = exp.select(exp.column("unit"), exp.alias_(exp.Filter(this=exp.Min(this=exp.column("ts")),
                                                                     expression=exp.Where(this=done)), "done_at")) \
            .from_(exp.Subquery(this=current, alias="s")).group_by(exp.column("unit"))
        self.ctes.append((name, body))
        self.joins.append(name)
        done_at = _col("done_at", name)
        return exp.Not(this=exp.Is(this=done_at, expression=exp.Null())), done_at.copy()

    # --- traits -------------------------------------------------------------------------------
    def trait(self, c: ast.TraitCondition, cid: str) -> tuple[exp.Expr, exp.Expr]:
        cmp = c.compare
        parts = trait_parts(cmp.path)
        column = self._traits_column(str(parts[0]))
        raw = json_text(column, parts)
        held = self.compare(self.operand(column, parts, cmp.values), cmp.op, cmp.values,
                            cmp.field_type or "unknown", cmp.personal)
        if not self.persons:
            return held, raw
        alias = _safe(cid)
        self.trait_cols.append(exp.alias_(exp.func("bool_or", held), alias))
        self.trait_cols.append(exp.alias_(exp.func("string_agg", raw, exp.Literal.string(", ")), alias + "__value"))
        return exp.Coalesce(this=_col(alias, "traits"), expressions=[exp.false()]), _col(alias + "__value", "traits")


    def _traits_column(self, key: str) -> exp.Column:
        """The JSON traits a trait condition reads: the profile's, or (`traits_as_of`) those its
        identify calls received by the evaluated moment give under the trait policy."""
        policy = self.ctx.traits_as_of
        if policy is None:
            return _col("traits", "p")
        if key not in self.trait_keys:
            self.trait_keys.append(key)
        if not any(name == ASOF_TRAITS for name, _ in self.ctes):
            self.ctes.append((ASOF_TRAITS, exp.select("*")))  # filled in by _final, once every key is known
            if not self.persons:
                self.joins.append(ASOF_TRAITS)
        return _col("traits", ASOF_TRAITS)

    def _asof_traits(self, policy: TraitPolicy) -> exp.Expr:
        from refinery.profiles.build import traits_objects, winning_traits

        a = _col("profile_id", "a")
        where: list[exp.Expr] = [
            exp.LTE(this=_col("received_at", "e"), expression=ts_literal(self.as_of)),
            exp.LTE(this=_col("timestamp", "e"), expression=ts_literal(self.as_of)),
            exp.In(this=_col("key", "j"), expressions=[exp.Literal.string(k) for k in self.trait_keys])]
        if self.profile_id is not None:
            where.append(self._unit_filter(a))
        objects = traits_objects(winning_traits(policy, cast(exp.Expression, _and(where))))
        return exp.select(exp.alias_(exp.column("profile_id"), "unit"), exp.column("traits")).from_(
            exp.Subquery(this=objects, alias=exp.TableAlias(this=exp.to_identifier("o"))))


def event_name() -> exp.Expr:
    """An event's name as the catalog gives it: the track event, else the page/screen name, else the type."""
    return exp.Coalesce(this=_col("event", "e"), expressions=[_col("name", "e"), _col("type", "e")])


def _safe(cid: str) -> str:
    return cid.replace(".", "_")
