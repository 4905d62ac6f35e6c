"""The typed syntax tree of rules and computed traits: frozen dataclasses, each with its source span.

`parse.py` builds it from Lark's parse tree; `check.py` validates it and fills in the types it
infers (`Compare.field_type`, `Compare.personal`, `Aggregate.value_type`); `compile.py` turns it
into sqlglot expressions and `reference.py` evaluates it in Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

#: Value types of the language. "unknown": a JSON value the catalog cannot type (deep paths).
TYPES = ("string", "number", "boolean", "timestamp", "unknown")


@dataclass(frozen=True)
class Span:
    """Where a node is in the text: 0-based offsets, 1-based line and column (end exclusive)."""

    start: int
    end: int
    line: int
    column: int
    end_line: int
    end_column: int


NO_SPAN = Span(0, 0, 1, 1, 1, 1)


@dataclass(frozen=True)
class Duration:
    amount: float
    unit: str  # second | minute | hour | day | week
    span: Span = field(default=NO_SPAN, compare=False)

    @property
    def delta(self) -> timedelta:
        return timedelta(**{self.unit + "s": self.amount})

    def text(self) -> str:
        n = int(self.amount) if float(self.amount).is_integer() else self.amount
        return f"{n} {self.unit}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class Literal:
    """A constant: `value` is str, float, bool, date, datetime, or a Duration for `N days ago`."""

    value: str | float | bool | date | datetime | Duration
    type: str  # string | number | boolean | date | datetime | ago
    span: Span = field(default=NO_SPAN, compare=False)

    @property
    def value_type(self) -> str:
        """The language type: dates, datetimes and `N days ago` are all timestamps."""
        return "timestamp" if self.type in ("date", "datetime", "ago") else self.type


@dataclass(frozen=True)
class Path:
    """A field: names and array indexes, e.g. `properties.items[0].sku` -> ('properties', 'items', 0, 'sku')."""

    parts: tuple[str | int, ...]
    span: Span = field(default=NO_SPAN, compare=False)

    def text(self) -> str:
        out = ""
        for p in self.parts:
            if isinstance(p, int):
                out += f"[{p}]"
            elif p.isidentifier():
                out += ("." if out else "") + p
            else:
                out += "['" + p.replace("'", "''") + "']"
        return out


@dataclass(frozen=True)
class Compare:
    """`path op values`: op is one of OPERATORS. Filled in by check: `field_type`, `personal` (the
    token kind when the field holds tokens) and `trait` (a computed trait's name)."""

    path: Path
    op: str
    values: tuple[Literal, ...]
    span: Span = field(default=NO_SPAN, compare=False)
    field_type: str | None = None
    personal: str | None = None


OPERATORS = ("=", "!=", "<", "<=", ">", ">=", "contains", "starts_with", "ends_with", "matches",
             "in", "not_in", "between", "is_set", "is_not_set")


@dataclass(frozen=True)
class And:
    items: tuple[Node, ...]
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Or:
    items: tuple[Node, ...]
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Not:
    item: Node
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Window:
    """Which events count: the last `last` before as_of, or from `start` (inclusive) to `end`
    (inclusive), either side open. Dates as bounds cover their whole day (UTC)."""

    last: Duration | None = None
    start: Literal | None = None
    end: Literal | None = None
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class EventRef:
    """An event name (`COALESCE(event, name, type)`, as the catalog names events); None: any event."""

    name: str | None
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Frequency:
    op: str  # >= | <= | = | > | <
    count: int
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Performed:
    """`performed EVENT [where F] [frequency] [window]`: how many such events, compared."""

    event: EventRef
    where: Filter | None
    frequency: Frequency
    window: Window | None
    span: Span = field(default=NO_SPAN, compare=False)


AGGREGATES = ("count", "sum", "avg", "min", "max", "distinct_count", "most_frequent", "first_time", "last_time")


@dataclass(frozen=True)
class Aggregate:
    """An aggregate over a profile's events: `func` of `path` over events of `event` matching `where`.
    `value_type` is filled in by check."""

    func: str
    path: Path | None
    event: EventRef
    where: Filter | None
    span: Span = field(default=NO_SPAN, compare=False)
    value_type: str | None = None


@dataclass(frozen=True)
class AggregateCondition:
    """`aggregate op values [window]`, e.g. `sum(total) of 'Order Completed' > 100 in last 30 days`."""

    aggregate: Aggregate
    op: str
    values: tuple[Literal, ...]
    window: Window | None
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Step:
    event: EventRef
    where: Filter | None
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Sequence:
    """`A then B [then C...] within D [window]`: each step strictly after the one before, the last
    no later than D after the first, every step inside the window."""

    steps: tuple[Step, ...]
    within: Duration
    window: Window | None
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class SegmentRef:
    name: str
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class TraitCondition:
    """A comparison on a profile's trait (`plan = 'pro'`)."""

    compare: Compare
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class ComputedTraitCondition:
    """A comparison on a computed trait: its aggregate, inlined, compared (filled in by check)."""

    name: str
    aggregate: Aggregate
    window: Window | None
    op: str
    values: tuple[Literal, ...]
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Policy:
    """Who the segment counts: `profiles` (deterministic) or `persons` joined by links >= threshold."""

    mode: str
    threshold: float = 0.9
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Rule:
    expr: Node
    policy: Policy | None
    text: str = field(default="", compare=False)
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class TraitDefinition:
    """A computed trait: `[name =] aggregate [window]`."""

    name: str | None
    aggregate: Aggregate
    window: Window | None
    text: str = field(default="", compare=False)
    span: Span = field(default=NO_SPAN, compare=False)


#: Conditions: the leaves of a rule, each compiled to one column.
Condition = Performed | AggregateCondition | Sequence | SegmentRef | TraitCondition | ComputedTraitCondition
#: A boolean expression over a rule's conditions, or over one event's fields (a Filter).
Node = (And | Or | Not | Performed | AggregateCondition | Sequence | SegmentRef | TraitCondition
        | ComputedTraitCondition | Compare)
Filter = And | Or | Not | Compare
CONDITIONS = (Performed, AggregateCondition, Sequence, SegmentRef, TraitCondition, ComputedTraitCondition)


def conditions(node: Node) -> list[Condition]:
    """The conditions of a rule expression, in the order they appear."""
    out: list[Condition] = []
    stack: list[Node] = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, (And, Or)):
            stack.extend(reversed(n.items))
        elif isinstance(n, Not):
            stack.append(n.item)
        elif isinstance(n, CONDITIONS):
            out.append(n)
    return out
