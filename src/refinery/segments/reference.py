"""The reference evaluator: a checked rule's members over plain Python data, by the letter of
docs/segments.md. It is the specification the compiled SQL (compile.py) and the real-time
evaluator (realtime.py) are tested against (tests/segments/test_agreement.py), so it is written
to be obviously right rather than fast: every condition looks at every event of the unit.

Input: events shaped like rows of `events` with their `profile_id` (from `event_profiles`):
`event`, `type`, `name`, `source`, `properties`, `traits`, `context` (dicts or JSON text),
`timestamp`, `received_at` (aware datetimes); and each profile's traits. Values read from JSON
behave as DuckDB's `->>` then TRY_CAST do: text of the value, then the type the rule compares it
with, or nothing when it does not convert.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, cast

from refinery.segments import ast
from refinery.segments.check import Checked, event_field, trait_parts
from refinery.segments.compile import Compiled, instant, time_bounds, window_bounds

__all__ = ["compare", "event_name", "event_value", "json_text", "members", "typed", "unit_holds"]

Tokenise = Callable[[str, str], str]

_NUMBER = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$")
_BOOLEAN = {"true": True, "t": True, "yes": True, "y": True, "1": True, "on": True,
            "false": False, "f": False, "no": False, "n": False, "0": False, "off": False}


# --- values ------------------------------------------------------------------------------------------
def json_text(value: Any) -> str | None:
    """A JSON value as DuckDB's `->>` gives it: strings as they are, others as JSON text, null as None."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def json_at(obj: Any, parts: tuple[str | int, ...]) -> Any:
    """The value at a path inside a JSON object (None when any step is missing)."""
    if isinstance(obj, str):
        obj = json.loads(obj)
    for p in parts:
        if isinstance(p, int):
            if not isinstance(obj, list) or not -len(obj) <= p < len(obj):
                return None
            obj = obj[p]
        else:
            if not isinstance(obj, dict) or p not in obj:
                return None
            obj = obj[p]
    return obj


def typed(text: str | None, kind: str) -> Any:
    """JSON text read as `kind` (TRY_CAST): a float, a bool, an aware datetime, or the text itself."""
    if text is None:
        return None
    if kind == "number":
        if not _NUMBER.match(text):
            return None
        number = float(text)
        return number if math.isfinite(number) else None
    if kind == "boolean":
        return _BOOLEAN.get(text.strip().lower())
    if kind == "timestamp":
        try:
            moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return text


def event_name(ev: Mapping[str, Any]) -> str | None:
    """The event's name as the catalog gives it: the track event, else the page/screen name, else the type."""
    for key in ("event", "name", "type"):
        if ev.get(key) is not None:
            return cast(str, ev[key])
    return None


def event_value(ev: Mapping[str, Any], path: ast.Path, kind: str | None) -> Any:
    """A field of an event: `event`, `type`, `source`, `timestamp` columns, or a JSON path read as
    `kind` (None: as text, what `count(distinct ...)` counts)."""
    f = event_field(path)
    if f.json:
        text = json_text(json_at(ev.get(f.column), f.json))
        return text if kind is None else typed(text, kind)
    if f.column == "event":
        return event_name(ev)
    return ev.get(f.column)


def _literal(lit: ast.Literal, as_of: datetime) -> Any:
    if lit.type == "number":
        return float(cast(float, lit.value))
    if lit.value_type == "timestamp":
        return instant(lit, as_of)
    return lit.value


_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}


def compare(value: Any, op: str, values: tuple[ast.Literal, ...], as_of: datetime) -> bool:
    """`value op values` in two-valued logic: a missing value compares false. Times compare through
    `time_bounds` (a date stands for its whole day), as the compiler does."""
    if op == "is_set":
        return value is not None
    if op == "is_not_set":
        return value is None
    if value is None:
        return False
    kind = values[0].value_type
    if kind == "timestamp" and op in ("=", "!=", "<", "<=", ">", ">=", "between"):
        if not isinstance(value, datetime):
            return False
        bounds = time_bounds("=" if op == "!=" else op, values, as_of)
        inside = all(_ORDER[o](value, at) for o, at in bounds)
        return not inside if op == "!=" else inside
    lits = [_literal(v, as_of) for v in values]
    if isinstance(value, bool) != isinstance(lits[0], bool) and op not in ("in", "not_in"):
        return False
    if op in _ORDER:
        return _ORDER[op](value, lits[0])
    if op == "contains":
        return lits[0] in value
    if op == "starts_with":
        return cast(str, value).startswith(lits[0])
    if op == "ends_with":
        return cast(str, value).endswith(lits[0])
    if op == "matches":
        return re.search(lits[0], value) is not None
    if op == "in":
        return value in lits
    if op == "not_in":
        return value not in lits
    if op == "between":
        return bool(lits[0] <= value <= lits[1])
    raise ValueError(op)


def tokenised(values: tuple[ast.Literal, ...], personal: str | None, tokenise: Tokenise | None) -> tuple[ast.Literal, ...]:
    """Literals compared with a personal field, as tokens (the field holds tokens)."""
    if not personal or tokenise is None:
        return values
    from refinery.privacy.tokens import Tokeniser

    normaliser = Tokeniser(b"\0" * 32)
    return tuple(ast.Literal(tokenise(personal, normaliser.normal_form(personal, v.value)), "string", v.span)
                 if v.type == "string" else v for v in values)


def operand_kind(path: ast.Path, values: tuple[ast.Literal, ...], json_path: bool) -> str | None:
    """What a field is read as: a JSON field as the type of the values it is compared with, else as is."""
    if not json_path:
        return None
    return values[0].value_type if values else "string"


# --- events ----------------------------------------------------------------------------------------
def filter_holds(node: ast.Filter, ev: Mapping[str, Any], as_of: datetime, tokenise: Tokenise | None) -> bool:
    if isinstance(node, ast.And):
        return all(filter_holds(cast(ast.Filter, i), ev, as_of, tokenise) for i in node.items)
    if isinstance(node, ast.Or):
        return any(filter_holds(cast(ast.Filter, i), ev, as_of, tokenise) for i in node.items)
    if isinstance(node, ast.Not):
        return not filter_holds(cast(ast.Filter, node.item), ev, as_of, tokenise)
    f = event_field(node.path)
    kind = operand_kind(node.path, node.values, bool(f.json))
    value = event_value(ev, node.path, kind if f.json else None)
    return compare(value, node.op, tokenised(node.values, node.personal, tokenise), as_of)


def in_window(moment: datetime, window: ast.Window | None, as_of: datetime) -> bool:
    return all(_ORDER[op](moment, at) for op, at in window_bounds(window, as_of))


def _matching(events: list[Mapping[str, Any]], ref: ast.EventRef, where: ast.Filter | None, window: ast.Window | None,
              as_of: datetime, tokenise: Tokenise | None) -> list[Mapping[str, Any]]:
    return [e for e in events if (ref.name is None or event_name(e) == ref.name)
            and in_window(e["timestamp"], window, as_of)
            and (where is None or filter_holds(where, e, as_of, tokenise))]


def aggregate(agg: ast.Aggregate, window: ast.Window | None, events: list[Mapping[str, Any]], as_of: datetime,
              tokenise: Tokenise | None) -> Any:
    """The aggregate over the unit's events (already limited to those received and happened by as_of).
    Counts, distinct counts and sums of nothing are 0; the others of nothing are None."""
    evs = _matching(events, agg.event, agg.where, window, as_of, tokenise)
    if agg.func == "count":
        return len(evs)
    if agg.func == "first_time":
        return min((e["timestamp"] for e in evs), default=None)
    if agg.func == "last_time":
        return max((e["timestamp"] for e in evs), default=None)
    assert agg.path is not None
    if agg.func == "distinct_count":
        return len({v for e in evs if (v := event_value(e, agg.path, None)) is not None})
    kind = "number" if agg.func in ("sum", "avg") else (agg.value_type or "string")
    if kind not in ("number", "boolean", "timestamp"):
        kind = "string"
    values = [v for e in evs if (v := event_value(e, agg.path, kind)) is not None]
    if agg.func == "sum":
        return float(sum(values)) if values else 0
    if agg.func == "avg":
        return sum(values) / len(values) if values else None
    if agg.func == "min":
        return min(values, default=None)
    if agg.func == "max":
        return max(values, default=None)
    if agg.func == "most_frequent":
        if not values:
            return None
        counts = Counter(values)
        top = max(counts.values())
        return min(v for v, n in counts.items() if n == top)
    raise ValueError(agg.func)


def sequence_holds(seq: ast.Sequence, events: list[Mapping[str, Any]], as_of: datetime, tokenise: Tokenise | None) -> bool:
    """Some events e1, ..., en match the steps in order, each strictly after the one before, with
    en no later than `within` after e1, all inside the window."""
    per_step = [sorted(e["timestamp"] for e in _matching(events, s.event, s.where, seq.window, as_of, tokenise))
                for s in seq.steps]
    within = seq.within.delta

    def chain(step: int, first: datetime, previous: datetime) -> bool:
        if step == len(per_step):
            return True
        return any(chain(step + 1, first, t) for t in per_step[step] if previous < t <= first + within)

    return any(chain(1, t, t) for t in per_step[0])


# --- rules -------------------------------------------------------------------------------------------
def unit_holds(checked: Checked, node: ast.Node, events: list[Mapping[str, Any]], traits: list[Mapping[str, Any]],
               as_of: datetime, tokenise: Tokenise | None) -> bool:
    """Whether a rule expression holds for one unit (a profile, or a person's profiles pooled):
    `events` received and happened by as_of, `traits` of each of its profiles."""
    if isinstance(node, ast.And):
        return all(unit_holds(checked, i, events, traits, as_of, tokenise) for i in node.items)
    if isinstance(node, ast.Or):
        return any(unit_holds(checked, i, events, traits, as_of, tokenise) for i in node.items)
    if isinstance(node, ast.Not):
        return not unit_holds(checked, node.item, events, traits, as_of, tokenise)
    if isinstance(node, ast.Performed):
        n = len(_matching(events, node.event, node.where, node.window, as_of, tokenise))
        return _ORDER[node.frequency.op](n, node.frequency.count)
    if isinstance(node, (ast.AggregateCondition, ast.ComputedTraitCondition)):
        value = aggregate(node.aggregate, node.window, events, as_of, tokenise)
        return compare(value, node.op, node.values, as_of)
    if isinstance(node, ast.Sequence):
        return sequence_holds(node, events, as_of, tokenise)
    if isinstance(node, ast.TraitCondition):
        return any(trait_holds(node.compare, t, as_of, tokenise) for t in traits)
    if isinstance(node, ast.SegmentRef):
        inner = checked.segments[node.name]
        return unit_holds(inner, inner.rule.expr, events, traits, as_of, tokenise)
    raise TypeError(f"not a condition: {type(node).__name__}")


def trait_holds(cmp: ast.Compare, traits: Mapping[str, Any], as_of: datetime, tokenise: Tokenise | None) -> bool:
    parts = trait_parts(cmp.path)
    text = json_text(json_at(traits, parts))
    kind = operand_kind(cmp.path, cmp.values, True)
    return compare(typed(text, kind or "string"), cmp.op, tokenised(cmp.values, cmp.personal, tokenise), as_of)


def received(events: Iterable[Mapping[str, Any]], as_of: datetime) -> list[Mapping[str, Any]]:
    """The events an evaluation at as_of sees: received and happened by then."""
    return [e for e in events if e["received_at"] <= as_of and e["timestamp"] <= as_of]


def members(compiled: Compiled, events: Iterable[Mapping[str, Any]], profiles: Mapping[str, Mapping[str, Any] | str],
            as_of: datetime, *, persons: Mapping[str, str] | None = None) -> set[str]:
    """The profile ids a rule selects as of `as_of`. `profiles`: profile id -> traits (a dict or JSON
    text); `persons` (for rules `counted by persons`): profile id -> person id."""
    as_of = as_of.replace(tzinfo=UTC) if as_of.tzinfo is None else as_of.astimezone(UTC)
    tokenise = compiled.ctx.tokenise if compiled.ctx is not None else None
    traits = {p: (json.loads(t) if isinstance(t, str) else dict(t)) for p, t in profiles.items()}
    seen = received(events, as_of)
    if compiled.persons_threshold is None:
        units = {p: [p] for p in traits}
    else:
        if persons is None:
            raise ValueError("a rule counted by persons needs the profile -> person map")
        units = {}
        for profile, person in persons.items():
            units.setdefault(person, []).append(profile)
    unit_of = {p: u for u, ps in units.items() for p in ps}
    by_unit: dict[str, list[Mapping[str, Any]]] = {u: [] for u in units}
    for e in seen:
        unit = unit_of.get(e["profile_id"])
        if unit is not None:
            by_unit[unit].append(e)
    out: set[str] = set()
    for unit, profile_ids in units.items():
        unit_traits = [traits.get(p, {}) for p in profile_ids if p in traits]
        if unit_holds(compiled.checked, compiled.checked.rule.expr, by_unit[unit], unit_traits, as_of, tokenise):
            out.update(profile_ids)
    return out
