"""Checks: names against the catalog (with suggestions), types of comparisons, personal fields,
regexes, windows, limits, and `in segment` references (inlined, cycles refused).

`check(rule, ctx)` returns the rule with the types it inferred filled in (`Compare.field_type`,
`Compare.personal`, `Aggregate.value_type`), computed traits resolved, and the checked rules of
the segments it references; it raises a SegmentError subclass pointing at the offending place.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from refinery.segments import ast
from refinery.segments.catalog import Catalog, suggest
from refinery.segments.errors import (
    RuleLimitError,
    SegmentCycleError,
    SegmentError,
    SegmentTypeError,
    UnknownNameError,
)

if TYPE_CHECKING:
    from refinery.segments.compile import CompileContext

#: Event fields a filter names directly; any other name is a key of `properties`.
EVENT_FIELDS: dict[str, str] = {"event": "string", "type": "string", "source": "string", "timestamp": "timestamp"}
#: JSON columns of an event a path may start with.
JSON_ROOTS = ("properties", "context", "traits")
MAX_CONDITIONS = 64
MAX_SEGMENT_DEPTH = 8

_ORDER_OPS = ("<", "<=", ">", ">=", "between")
_TEXT_OPS = ("contains", "starts_with", "ends_with", "matches")
_OP_WORDS = {"starts_with": "starts with", "ends_with": "ends with", "in": "in (...)", "not_in": "not in (...)",
             "is_set": "is set", "is_not_set": "is not set"}


def op_word(op: str) -> str:
    return _OP_WORDS.get(op, op)


@dataclass(frozen=True)
class EventField:
    """Where an event path lives: a column (`event`, `type`, ...) or a JSON path under a column."""

    column: str
    json: tuple[str | int, ...] = ()
    type: str = "unknown"


def event_field(path: ast.Path) -> EventField:
    parts = path.parts
    head = parts[0]
    if len(parts) == 1 and isinstance(head, str) and head in EVENT_FIELDS:
        return EventField(head, (), EVENT_FIELDS[head])
    if isinstance(head, str) and head in JSON_ROOTS and len(parts) > 1:
        return EventField(head, parts[1:])
    return EventField("properties", parts)


def trait_parts(path: ast.Path) -> tuple[str | int, ...]:
    """A trait path under `profiles.traits`: `traits.x` and `x` are the same trait."""
    parts = path.parts
    return parts[1:] if parts[0] == "traits" and len(parts) > 1 else parts


@dataclass(frozen=True)
class Checked:
    """A checked rule: its AST with types filled in, and the checked rules of the segments it uses."""

    rule: ast.Rule
    segments: Mapping[str, Checked] = field(default_factory=dict)


def check(rule: ast.Rule, ctx: CompileContext, *, name: str | None = None, _stack: tuple[str, ...] = ()) -> Checked:
    return _Checker(ctx, rule.text, name, _stack).rule(rule)


def check_trait(trait: ast.TraitDefinition, ctx: CompileContext) -> ast.TraitDefinition:
    checker = _Checker(ctx, trait.text, None, ())
    aggregate = checker.aggregate(trait.aggregate)
    if trait.window:
        checker.window(trait.window)
    return dataclasses.replace(trait, aggregate=aggregate)


class _Checker:
    def __init__(self, ctx: CompileContext, text: str, name: str | None, stack: tuple[str, ...]):
        self.ctx = ctx
        self.catalog: Catalog = ctx.catalog
        self.text = text
        self.name = name
        self.stack = (*stack, name) if name else stack
        self.segments: dict[str, Checked] = {}

    def error(self, cls: type[SegmentError], message: str, span: ast.Span, fix: str, **details: Any) -> SegmentError:
        return cls(message, text=self.text, span=span, fix=fix, **details)

    # --- rules ----------------------------------------------------------------------------------
    def rule(self, rule: ast.Rule) -> Checked:
        if rule.policy and rule.policy.mode == "persons" and not 0.0 < rule.policy.threshold <= 1.0:
            raise self.error(RuleLimitError, f"link threshold {rule.policy.threshold:g} is outside (0, 1]",
                             rule.policy.span, "use a match probability such as `counted by persons above 0.9`.")
        expr = self.node(rule.expr)
        count = len(ast.conditions(expr)) + sum(_condition_count(c) for c in self.segments.values())
        if count > MAX_CONDITIONS:
            raise self.error(RuleLimitError, f"the rule has {count} conditions (segments included); the limit is "
                             f"{MAX_CONDITIONS}", rule.span, "split it into smaller segments, or use `in (...)` "
                             "for many values of one field.")
        for seg_name, seg in self.segments.items():
            if _policy(seg.rule) != _policy(rule):
                ref = next(c for c in ast.conditions(expr) if isinstance(c, ast.SegmentRef) and c.name == seg_name)
                raise self.error(SegmentTypeError, f"segment '{seg_name}' counts {_policy(seg.rule)}, this rule "
                                 f"counts {_policy(rule)}", ref.span, "give both rules the same `counted by` clause.")
        return Checked(dataclasses.replace(rule, expr=expr), dict(self.segments))

    def node(self, node: ast.Node) -> ast.Node:
        if isinstance(node, ast.And):
            return dataclasses.replace(node, items=tuple(self.node(i) for i in node.items))
        if isinstance(node, ast.Or):
            return dataclasses.replace(node, items=tuple(self.node(i) for i in node.items))
        if isinstance(node, ast.Not):
            return dataclasses.replace(node, item=self.node(node.item))
        if isinstance(node, ast.Performed):
            return self.performed(node)
        if isinstance(node, ast.AggregateCondition):
            return self.aggregate_condition(node)
        if isinstance(node, ast.Sequence):
            return self.sequence(node)
        if isinstance(node, ast.TraitCondition):
            return self.trait_condition(node)
        if isinstance(node, ast.SegmentRef):
            self.segment_ref(node)
            return node
        raise self.error(SegmentError, "this is not a condition", node.span, "see docs/segments.md.")

    # --- events ---------------------------------------------------------------------------------
    def event_ref(self, ref: ast.EventRef) -> None:
        if ref.name is None or not self.catalog.strict or ref.name in self.catalog.events:
            return
        hint = suggest(ref.name, self.catalog.events)
        known = ", ".join(f"'{e}'" for e in sorted(self.catalog.events)[:8]) or "none yet"
        raise self.error(UnknownNameError, f"unknown event '{ref.name}'" + (f"; did you mean '{hint}'?" if hint else ""),
                         ref.span, f"use an event the catalog has seen ({known}{', ...' if len(self.catalog.events) > 8 else ''}); "
                         "names are case-sensitive.", suggestion=hint)

    def performed(self, node: ast.Performed) -> ast.Performed:
        self.event_ref(node.event)
        where = self.filter(node.where, _events_of(node.event, None)) if node.where else None
        if node.frequency.count < 0:
            raise self.error(RuleLimitError, "a count cannot be negative", node.frequency.span,
                             "use 0 or more, e.g. `at least 1 time`.")
        if node.window:
            self.window(node.window)
        return dataclasses.replace(node, where=where)

    def sequence(self, node: ast.Sequence) -> ast.Sequence:
        steps = []
        for step in node.steps:
            self.event_ref(step.event)
            where = self.filter(step.where, _events_of(step.event, None)) if step.where else None
            steps.append(dataclasses.replace(step, where=where))
        if node.within.delta <= timedelta(0):
            raise self.error(RuleLimitError, f"`within {node.within.text()}` has no length", node.within.span,
                             "give the sequence a positive time, e.g. `within 1 day`.")
        if node.window:
            self.window(node.window)
        return dataclasses.replace(node, steps=tuple(steps))

    def window(self, window: ast.Window) -> None:
        if window.last is not None and window.last.delta <= timedelta(0):
            raise self.error(RuleLimitError, f"the window `in last {window.last.text()}` has no length "
                             "(it must be longer than zero)", window.span,
                             "use a positive length, e.g. `in last 7 days`, or leave the window out for all time.")
        for bound in (window.start, window.end):
            if bound is not None:
                self.time_literal(bound)
        if window.start is not None and window.end is not None:
            lo, hi = _bound_key(window.start), _bound_key(window.end)
            if lo is not None and hi is not None and lo > hi:
                raise self.error(RuleLimitError, "the window ends before it starts", window.span,
                                 "put the earlier time first: `between 2026-01-01 and 2026-02-01`.")
            if window.start.type == "ago" and window.end.type == "ago":
                a, b = cast(ast.Duration, window.start.value), cast(ast.Duration, window.end.value)
                if a.delta <= b.delta:
                    raise self.error(RuleLimitError, "the window has no length", window.span,
                                     "put the earlier time first: `between 30 days ago and 7 days ago`.")

    def time_literal(self, lit: ast.Literal) -> None:
        if lit.type == "ago" and cast(ast.Duration, lit.value).amount < 0:
            raise self.error(RuleLimitError, "a time cannot be a negative amount ago", lit.span,
                             "write a positive amount, e.g. `30 days ago`.")

    def filter(self, node: ast.Filter, events: frozenset[str] | None) -> ast.Filter:
        """Check a condition on one event's fields; `events`: the events it can be about (None: any)."""
        if isinstance(node, (ast.And, ast.Or)):
            if isinstance(node, ast.And):
                events = _narrow(node, events)
            return dataclasses.replace(node, items=tuple(self.filter(cast(ast.Filter, i), events) for i in node.items))
        if isinstance(node, ast.Not):
            return dataclasses.replace(node, item=self.filter(cast(ast.Filter, node.item), events))
        if isinstance(node, ast.Compare):
            return self.event_compare(node, _narrow(node, events))
        raise self.error(SegmentError, "a `where` condition compares an event's fields", node.span,
                         "write comparisons such as `total > 100`.")

    def event_compare(self, node: ast.Compare, events: frozenset[str] | None) -> ast.Compare:
        f = event_field(node.path)
        field_type = f.type
        personal = None
        if f.column == "properties" and f.json:
            key = f.json[0]
            props = self.catalog.properties(events)
            if isinstance(key, int):
                raise self.error(SegmentTypeError, "properties is an object, not a list", node.path.span,
                                 "start the path with a property name, e.g. `items[0].sku`.")
            if key not in props and self.catalog.strict:
                where = _where_text(events)
                hint = suggest(key, props)
                raise self.error(UnknownNameError, f"unknown property '{key}' on {where}"
                                 + (f"; did you mean '{hint}'?" if hint else ""), node.path.span,
                                 f"use a property the catalog has seen on {where} ({_list(props)}), or `properties['...']` "
                                 "for a key that is a keyword.", suggestion=hint)
            field_type = props.get(key, "unknown") if len(f.json) == 1 else "unknown"
            if key in self.catalog.personal_properties and len(f.json) == 1:
                personal = key
        elif f.column == "traits" and len(f.json) == 1 and f.json[0] in self.catalog.personal_traits:
            personal = cast(str, f.json[0])
        if f.column == "event" and self.catalog.strict:
            for lit in node.values:
                if lit.type == "string":
                    self.event_ref(ast.EventRef(cast(str, lit.value), lit.span))
        return self.compare(node, field_type, personal, f"'{node.path.text()}'")

    # --- comparisons ------------------------------------------------------------------------------
    def compare(self, node: ast.Compare, field_type: str, personal: str | None, what: str) -> ast.Compare:
        self.values(node.op, node.values, field_type, personal, what, node.span)
        return dataclasses.replace(node, field_type=field_type, personal=_kind(personal))

    def values(self, op: str, values: tuple[ast.Literal, ...], field_type: str, personal: str | None,
               what: str, span: ast.Span) -> None:
        if op in ("is_set", "is_not_set"):
            return
        if field_type in ("object", "array"):
            raise self.error(SegmentTypeError, f"{what} is {'an' if field_type == 'object' else 'a'} {field_type}; "
                             f"`{op_word(op)}` compares single values", span,
                             f"compare a field inside it (`{what.strip(chr(39))}.key` or `[0]`), or test `is set`.")
        if personal and (op in _TEXT_OPS or op in _ORDER_OPS):
            raise self.error(SegmentTypeError, f"{what} is a personal field, stored as a token (docs/privacy.md); "
                             f"`{op_word(op)}` cannot look inside a token", span,
                             "compare the whole value with `=`, `!=` or `in (...)`, or test `is set`.")
        kinds = {v.value_type for v in values}
        if len(kinds) > 1:
            raise self.error(SegmentTypeError, f"the values compared with {what} mix types ({', '.join(sorted(kinds))})",
                             values[-1].span, "use values of one type.")
        kind = kinds.pop()
        for v in values:
            if v.type == "ago":
                self.time_literal(v)
        if op in _TEXT_OPS:
            if kind != "string":
                raise self.error(SegmentTypeError, f"`{op_word(op)}` takes a string, not a {kind}", values[0].span,
                                 f"quote the value: {what} {op_word(op)} 'text'.")
            if field_type not in ("string", "unknown"):
                raise self.error(SegmentTypeError, f"{what} is a {field_type}; `{op_word(op)}` works on text",
                                 span, _fix_for(field_type))
            if op == "matches":
                try:
                    check_pattern(cast(str, values[0].value))
                except RegexRefused as e:
                    raise self.error(RuleLimitError if e.catastrophic else SegmentTypeError, e.message,
                                     values[0].span, e.fix) from None
            return
        if op in _ORDER_OPS:
            if kind not in ("number", "timestamp"):
                raise self.error(SegmentTypeError, f"`{op_word(op)}` orders numbers and times, not a {kind}",
                                 values[0].span, "use = or in (...) for text, or compare a number or a date.")
            if op == "between" and _literal_key(values[0]) is not None and _literal_key(values[1]) is not None \
                    and _literal_key(values[0]) > _literal_key(values[1]):
                raise self.error(SegmentTypeError, "`between` has its bounds the wrong way round", span,
                                 "put the smaller value first: `between 18 and 30`.")
        if not _compatible(field_type, kind):
            raise self.error(SegmentTypeError, f"{what} is a {field_type}; it cannot be compared with a {kind}",
                             values[0].span, _fix_for(field_type))

    def aggregate(self, agg: ast.Aggregate) -> ast.Aggregate:
        self.event_ref(agg.event)
        events = _events_of(agg.event, None)
        where = self.filter(agg.where, events) if agg.where else None
        if where is not None:
            events = _narrow(where, events)
        value_type = "number"
        if agg.func in ("first_time", "last_time"):
            value_type = "timestamp"
        elif agg.path is not None:
            fake = ast.Compare(agg.path, "is_set", (), agg.path.span)
            checked = self.event_compare(fake, events)
            field_type = checked.field_type or "unknown"
            if checked.personal and agg.func != "distinct_count":
                raise self.error(SegmentTypeError, f"'{agg.path.text()}' is a personal field, stored as a token; "
                                 f"`{agg.func.replace('_', ' ')}` of tokens means nothing", agg.path.span,
                                 "count them instead: `count(distinct ...)`.")
            if agg.func in ("sum", "avg") and field_type not in ("number", "unknown"):
                raise self.error(SegmentTypeError, f"'{agg.path.text()}' is a {field_type}; `{agg.func}` adds numbers",
                                 agg.path.span, "sum or average a numeric property, or use `count(distinct ...)`.")
            if agg.func in ("min", "max", "most_frequent"):
                value_type = field_type
        return dataclasses.replace(agg, where=where, value_type=value_type)

    def aggregate_condition(self, node: ast.AggregateCondition) -> ast.AggregateCondition:
        agg = self.aggregate(node.aggregate)
        if node.window:
            self.window(node.window)
        self.values(node.op, node.values, agg.value_type or "unknown", None, f"`{_agg_word(agg)}`", node.span)
        return dataclasses.replace(node, aggregate=agg)

    # --- profiles ---------------------------------------------------------------------------------
    def trait_condition(self, node: ast.TraitCondition) -> ast.Node:
        cmp = node.compare
        parts = trait_parts(cmp.path)
        head = parts[0]
        if len(parts) == 1 and isinstance(head, str) and head in self.ctx.computed_traits and cmp.path.parts[0] != "traits":
            return self.computed_trait(node, head)
        if isinstance(head, int):
            raise self.error(SegmentTypeError, "traits is an object, not a list", cmp.path.span,
                             "start the path with a trait name.")
        known = {**self.catalog.traits, **{k: "unknown" for k in self.ctx.computed_traits}}
        if head not in self.catalog.traits and self.catalog.strict:
            hint = suggest(head, known)
            raise self.error(UnknownNameError, f"unknown trait '{head}'" + (f"; did you mean '{hint}'?" if hint else ""),
                             cmp.path.span, f"use a trait profiles have ({_list(known)}) or a computed trait; "
                             "to test an event's property, use `performed '...' where ...`.", suggestion=hint)
        field_type = self.catalog.traits.get(head, "unknown") if len(parts) == 1 else "unknown"
        personal = head if len(parts) == 1 and head in self.catalog.personal_traits else None
        return dataclasses.replace(node, compare=self.compare(cmp, field_type, personal, f"'{cmp.path.text()}'"))

    def computed_trait(self, node: ast.TraitCondition, name: str) -> ast.ComputedTraitCondition:
        from refinery.segments.parse import parse_trait

        try:
            trait = check_trait(parse_trait(self.ctx.computed_traits[name]), self.ctx)
        except SegmentError as e:
            raise self.error(type(e), f"computed trait '{name}' does not compile: {e.message}", node.span,
                             f"fix the computed trait '{name}' first.") from None
        cmp = node.compare
        self.values(cmp.op, cmp.values, trait.aggregate.value_type or "unknown", None, f"'{name}'", cmp.span)
        return ast.ComputedTraitCondition(name, trait.aggregate, trait.window, cmp.op, cmp.values, node.span)

    def segment_ref(self, node: ast.SegmentRef) -> None:
        from refinery.segments.parse import parse

        if node.name == self.name or node.name in self.stack:
            path = " -> ".join([*self.stack, node.name]) if node.name in self.stack else f"{node.name} -> {node.name}"
            raise self.error(SegmentCycleError, f"segment '{node.name}' includes itself ({path})", node.span,
                             "remove the reference, or move the shared conditions into a third segment both use.",
                             cycle=[*self.stack, node.name])
        if node.name not in self.ctx.segments:
            hint = suggest(node.name, self.ctx.segments)
            raise self.error(UnknownNameError, f"unknown segment '{node.name}'" + (f"; did you mean '{hint}'?" if hint else ""),
                             node.span, f"use an existing segment ({_list(self.ctx.segments)}).", suggestion=hint)
        if len(self.stack) >= MAX_SEGMENT_DEPTH:
            raise self.error(RuleLimitError, f"segments nest more than {MAX_SEGMENT_DEPTH} deep here", node.span,
                             "refer to fewer levels of segments.")
        if node.name in self.segments:
            return
        try:
            inner = check(parse(self.ctx.segments[node.name]), self.ctx, name=node.name,
                          _stack=self.stack if self.stack else (self.name or "this rule",))
        except SegmentCycleError as e:
            raise self.error(SegmentCycleError, e.message, node.span, e.fix or "", cycle=e.details.get("cycle")) from None
        except SegmentError as e:
            raise self.error(type(e), f"segment '{node.name}' does not compile: {e.message}", node.span,
                             f"fix segment '{node.name}' first.") from None
        self.segments[node.name] = inner


def _condition_count(checked: Checked) -> int:
    return len(ast.conditions(checked.rule.expr)) + sum(_condition_count(c) for c in checked.segments.values())


def _policy(rule: ast.Rule) -> str:
    if rule.policy is None or rule.policy.mode == "profiles":
        return "profiles"
    return f"persons above {rule.policy.threshold:g}"


def _kind(personal: str | None) -> str | None:
    from refinery.privacy.tokens import kind_of

    return kind_of(personal) if personal else None


def _events_of(ref: ast.EventRef, events: frozenset[str] | None) -> frozenset[str] | None:
    return events if ref.name is None else frozenset([ref.name])


def _narrow(node: ast.Filter, events: frozenset[str] | None) -> frozenset[str] | None:
    """The events a filter can be about: `event = 'X'` / `event in (...)` among its conjuncts narrow it."""
    items: Iterable[ast.Node] = node.items if isinstance(node, ast.And) else (node,)
    for item in items:
        if isinstance(item, ast.Compare) and item.path.parts == ("event",) and item.op in ("=", "in"):
            names = frozenset(str(v.value) for v in item.values if v.type == "string")
            events = names if events is None else events & names
    return events


def _where_text(events: frozenset[str] | None) -> str:
    if events is None:
        return "any event"
    return " or ".join(f"'{e}'" for e in sorted(events)) or "no event"


def _list(names: Iterable[str], n: int = 8) -> str:
    names = sorted(names)
    return (", ".join(names[:n]) + (", ..." if len(names) > n else "")) or "none yet"


def _compatible(field_type: str, kind: str) -> bool:
    if field_type == "unknown" or field_type == kind:
        return True
    return field_type == "string" and kind == "timestamp"  # times sent as ISO text


def _fix_for(field_type: str) -> str:
    return {
        "number": "compare numbers with =, !=, <, >, between or in (...), e.g. `total > 100`.",
        "string": "compare text with =, !=, contains, starts with, ends with, matches or in (...) and a quoted value.",
        "boolean": "compare with true or false, e.g. `is_gift = true`.",
        "timestamp": "compare with a date or time, e.g. `> 2026-01-01` or `< 30 days ago`.",
    }.get(field_type, "see the types in docs/segments.md.")


def _agg_word(agg: ast.Aggregate) -> str:
    func = {"distinct_count": "count(distinct", "most_frequent": "most frequent", "first_time": "first time",
            "last_time": "last time"}.get(agg.func, agg.func)
    return func + (f" {agg.path.text()}" if agg.path else "")


def _literal_key(lit: ast.Literal) -> Any:
    if lit.type == "number":
        return lit.value
    return _bound_key(lit)


def _bound_key(lit: ast.Literal) -> Any:
    """An absolute time's sort key (dates at midnight UTC); None for relative times."""
    from datetime import UTC

    if lit.type == "date":
        d = cast(date, lit.value)
        return datetime(d.year, d.month, d.day, tzinfo=UTC)
    if lit.type == "datetime":
        return lit.value
    return None



# --- regexes ---------------------------------------------------------------------------------------
MAX_PATTERN = 500
#: RE2 (DuckDB's regex engine) refuses counted repetition above 1,000.
MAX_REPEAT_COUNT = 1000

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import sre_constants
    import sre_parse


class RegexRefused(Exception):
    def __init__(self, message: str, fix: str, *, catastrophic: bool = False):
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.catastrophic = catastrophic


def check_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a `matches` pattern, refusing what is invalid, what RE2 (DuckDB) does not support
    (backreferences, lookarounds), and what can backtrack catastrophically in Python's engine
    (the reference and real-time evaluators): nested unbounded repetition such as `(a+)+`."""
    if len(pattern) > MAX_PATTERN:
        raise RegexRefused(f"the pattern is {len(pattern)} characters long; the limit is {MAX_PATTERN}",
                           "shorten it, or use contains / starts with / ends with.", catastrophic=True)
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise RegexRefused(f"invalid regular expression: {e.msg} at position {e.pos}",
                           "fix the pattern (RE2 syntax, as DuckDB's regexp_matches reads it).") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        parsed = sre_parse.parse(pattern)
    _walk_pattern(list(cast(Any, parsed)), inside_unbounded=False)
    return compiled


def _walk_pattern(items: list[Any], inside_unbounded: bool) -> None:
    for op, av in items:
        if op in (sre_constants.GROUPREF, sre_constants.GROUPREF_EXISTS):
            raise RegexRefused("backreferences are not supported", "match without referring back to a group "
                               "(DuckDB's RE2 engine has no backreferences).")
        if op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            raise RegexRefused("lookahead and lookbehind are not supported", "drop the (?=...), (?!...), "
                               "(?<=...) or (?<!...) part (DuckDB's RE2 engine has no lookarounds).")
        if op in (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT):
            lo, hi, sub = av
            unbounded = hi == sre_constants.MAXREPEAT
            if max(lo, 0 if unbounded else hi) > MAX_REPEAT_COUNT:
                raise RegexRefused(f"a repetition count above {MAX_REPEAT_COUNT}", "use a smaller count.",
                                   catastrophic=True)
            if inside_unbounded and (unbounded or hi > 1):
                raise RegexRefused("nested repetition such as (a+)+ can take exponential time",
                                   "repeat once: write (a+) or a+ instead of (a+)+.", catastrophic=True)
            _walk_pattern(list(sub), inside_unbounded or unbounded)
        elif op == sre_constants.SUBPATTERN:
            _walk_pattern(list(av[-1]), inside_unbounded)
        elif op == sre_constants.BRANCH:
            if inside_unbounded:
                _overlapping_branches(av[1])
            for branch in av[1]:
                _walk_pattern(list(branch), inside_unbounded)
        elif op in (sre_constants.ATOMIC_GROUP,):
            _walk_pattern(list(av), inside_unbounded)


def _overlapping_branches(branches: list[Any]) -> None:
    """Alternatives under unbounded repetition that can start alike, e.g. (a|ab)*: exponential
    backtracking in Python's engine. Only alternatives that begin with distinct literals pass."""
    firsts: set[int] = set()
    for branch in branches:
        items = list(branch)
        first = items[0] if items else None
        if first is None or first[0] != sre_constants.LITERAL or first[1] in firsts:
            raise RegexRefused("alternatives that can match alike under repetition, such as (a|ab)*, can take "
                               "exponential time", "make the alternatives start differently, or match a character "
                               "class instead: [ab]*.", catastrophic=True)
        firsts.add(first[1])


__all__ = ["EVENT_FIELDS", "Checked", "EventField", "RegexRefused", "check", "check_pattern", "check_trait",
           "event_field", "op_word", "trait_parts"]
