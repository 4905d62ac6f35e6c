"""Text -> parse tree (Lark, LALR) -> typed AST (ast.py), with limits on size and depth.

`parse(text)` reads a rule, `parse_trait(text)` a computed trait. Syntax errors say where, what was
found and what could come there instead, in the words of the language rather than the grammar's.
"""

from __future__ import annotations

import functools
from datetime import UTC, date, datetime
from importlib import resources
from typing import Any

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from refinery.segments import ast
from refinery.segments.errors import RuleLimitError, SegmentError, SegmentSyntaxError

#: Limits that keep a rule cheap to check, compile and run; a rule beyond them is refused.
MAX_CHARS = 20_000
MAX_NODES = 2_000
MAX_DEPTH = 40


@functools.cache
def parser() -> Lark:
    grammar = resources.files("refinery.segments").joinpath("grammar.lark").read_text(encoding="utf-8")
    return Lark(grammar, start=["rule", "trait"], parser="lalr", propagate_positions=True,
                maybe_placeholders=False)


def parse(text: str) -> ast.Rule:
    """A rule's AST; raises SegmentSyntaxError or RuleLimitError pointing at the place."""
    rule = _build(text, "rule")
    assert isinstance(rule, ast.Rule)
    return rule


def parse_trait(text: str) -> ast.TraitDefinition:
    """A computed trait's AST: `[name =] aggregate [window]`."""
    trait = _build(text, "trait")
    assert isinstance(trait, ast.TraitDefinition)
    return trait


def _build(text: str, start: str) -> Any:
    if len(text) > MAX_CHARS:
        raise RuleLimitError(f"the rule is {len(text):,} characters long; the limit is {MAX_CHARS:,}",
                             text=text, fix="split it into segments and combine them with `in segment '...'`.")
    if not text.strip():
        raise SegmentSyntaxError("the rule is empty", text=text, span=_point(text, 0),
                                 fix="write a condition, for example `performed 'Order Completed' in last 30 days`.")
    try:
        tree = parser().parse(text, start=start)
    except UnexpectedInput as e:
        raise _syntax_error(text, e) from None
    _check_size(text, tree)
    try:
        return _ToAst(text).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, SegmentError):
            raise e.orig_exc from None
        raise


def _check_size(text: str, tree: Tree[Token]) -> None:
    """Refuse trees too large or deep before anything recursive walks them."""
    nodes = 0
    stack: list[tuple[Tree[Token] | Token, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if depth > MAX_DEPTH:
            span = _span_of(text, node)
            raise RuleLimitError(f"the rule nests {MAX_DEPTH}+ levels deep; the limit is {MAX_DEPTH}",
                                 text=text, span=span, fix="flatten the parentheses, or move parts into segments "
                                 "of their own and combine them with `in segment '...'`.")
        if isinstance(node, Tree):
            stack.extend((c, depth + 1) for c in node.children)
    if nodes > MAX_NODES:
        raise RuleLimitError(f"the rule has {nodes:,} syntax nodes; the limit is {MAX_NODES:,}", text=text,
                             span=_point(text, 0), fix="split it into segments and combine them with "
                             "`in segment '...'`, or use `in (...)` instead of many `or`s.")


def _point(text: str, pos: int, length: int = 1) -> ast.Span:
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return ast.Span(pos, pos + length, line, column, line, column + length)


def _span_of(text: str, node: Tree[Token] | Token) -> ast.Span:
    if isinstance(node, Token):
        return _token_span(node)
    meta = node.meta
    if getattr(meta, "empty", True):
        return _point(text, 0)
    return ast.Span(meta.start_pos, meta.end_pos, meta.line, meta.column, meta.end_line, meta.end_column)


def _token_span(t: Token) -> ast.Span:
    return ast.Span(t.start_pos or 0, t.end_pos or 0, t.line or 1, t.column or 1, t.end_line or 1, t.end_column or 1)


# What a terminal is called in an error message.
_WORDS = {
    "CMP": "a comparison (=, !=, <, <=, >, >=)", "STRING": "a quoted string", "SIGNED_NUMBER": "a number",
    "INT": "a whole number", "NAME": "a name", "DATE": "a date (2026-01-31)", "DATETIME": "a time (2026-01-31T09:30:00Z)",
    "UNIT": "a unit (seconds, minutes, hours, days, weeks)", "IN_LAST": "`in last`", "AGG_FN": "sum, avg, min or max",
    "FIRST_LAST": "`first` or `last`", "LPAR": "`(`", "RPAR": "`)`", "LSQB": "`[`", "RSQB": "`]`", "DOT": "`.`",
    "COMMA": "`,`", "EQUAL": "`=`", "$END": "the end of the rule",
}


def _word(terminal: str) -> str:
    if terminal in _WORDS:
        return _WORDS[terminal]
    return "`" + terminal.lstrip("_").lower() + "`"


def _syntax_error(text: str, e: UnexpectedInput) -> SegmentSyntaxError:
    pos = e.pos_in_stream if e.pos_in_stream is not None else len(text)
    if isinstance(e, UnexpectedCharacters):
        found = text[pos]
        span = _point(text, pos)
        message = f"unexpected character {found!r} at line {span.line}, column {span.column}"
        fix = ("quote strings with single quotes ('like this'; double a quote inside: 'it''s')."
               if found in "`’‘“”" else "remove it, or quote it as part of a string.")
        if found == "!":
            fix = "write `!=` for 'not equal', or `not` before a condition."
        return SegmentSyntaxError(message, text=text, span=span, fix=fix)
    expected: set[str] = set()
    if isinstance(e, (UnexpectedToken, UnexpectedEOF)):
        expected = {str(x) for x in e.expected}
    words = sorted({_word(x) for x in expected if x not in ("WS", "COMMENT")})
    options = ", ".join(words[:12]) + (" ..." if len(words) > 12 else "")
    if isinstance(e, UnexpectedToken) and e.token.type != "$END":
        token = e.token
        span = _token_span(token)
        message = f"unexpected {str(token)!r} at line {span.line}, column {span.column}"
    else:
        span = _point(text, len(text.rstrip()) or 0)
        message = "the rule ends too early"
    fix = f"expected {options}." if options else "check the rule against docs/segments.md."
    if expected & {"_WHERE"} and isinstance(e, UnexpectedToken) and e.token.type in ("_AND", "_OR"):
        fix += " (`where` takes one comparison; put several in parentheses: `where (a > 1 and b = 'x')`.)"
    return SegmentSyntaxError(message, text=text, span=span, fix=fix)


_UNITS = {"second": "second", "minute": "minute", "hour": "hour", "day": "day", "week": "week"}


def _unit(token: Token) -> str:
    word = str(token).lower()
    return _UNITS[word[:-1] if word.endswith("s") else word]


def _unquote(token: Token) -> str:
    raw = str(token)
    quote = raw[0]
    return raw[1:-1].replace(quote * 2, quote)


def _number(token: Token) -> float:
    return float(str(token))


@v_args(meta=True)
class _ToAst(Transformer[Token, Any]):
    """Parse tree -> AST. Each method gets the node's meta (positions) and its transformed children."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def _span(self, meta: Any) -> ast.Span:
        if getattr(meta, "empty", True):
            return _point(self.text, 0)
        return ast.Span(meta.start_pos, meta.end_pos, meta.line, meta.column, meta.end_line, meta.end_column)

    # --- top level --------------------------------------------------------------------------
    def rule(self, meta: Any, children: list[Any]) -> ast.Rule:
        expr = children[0]
        policy = children[1] if len(children) > 1 else None
        return ast.Rule(_as_condition(expr), policy, self.text, self._span(meta))

    def trait(self, meta: Any, children: list[Any]) -> ast.TraitDefinition:
        name = str(children.pop(0)) if isinstance(children[0], Token) else None
        aggregate = children[0]
        window = children[1] if len(children) > 1 else None
        return ast.TraitDefinition(name, aggregate, window, self.text, self._span(meta))

    def by_profiles(self, meta: Any, children: list[Any]) -> ast.Policy:
        return ast.Policy("profiles", 1.0, self._span(meta))

    def by_persons(self, meta: Any, children: list[Any]) -> ast.Policy:
        threshold = _number(children[0]) if children else 0.9
        return ast.Policy("persons", threshold, self._span(meta))

    # --- boolean structure ----------------------------------------------------------------
    def or_(self, meta: Any, children: list[Any]) -> ast.Node:
        return ast.Or(tuple(children), self._span(meta)) if len(children) > 1 else children[0]

    def and_(self, meta: Any, children: list[Any]) -> ast.Node:
        return ast.And(tuple(children), self._span(meta)) if len(children) > 1 else children[0]

    def not_(self, meta: Any, children: list[Any]) -> ast.Not:
        return ast.Not(children[0], self._span(meta))

    # --- conditions -------------------------------------------------------------------------
    def segment_ref(self, meta: Any, children: list[Any]) -> ast.SegmentRef:
        return ast.SegmentRef(_unquote(children[0]), self._span(meta))

    def performed(self, meta: Any, children: list[Any]) -> ast.Performed:
        event = children[0]
        where = next((c for c in children[1:] if isinstance(c, _Where)), None)
        frequency = next((c for c in children[1:] if isinstance(c, ast.Frequency)), None)
        window = next((c for c in children[1:] if isinstance(c, ast.Window)), None)
        span = self._span(meta)
        return ast.Performed(event, where.filter if where else None, frequency or ast.Frequency(">=", 1, span),
                             window, span)

    def agg_condition(self, meta: Any, children: list[Any]) -> ast.AggregateCondition:
        aggregate, (op, values) = children[0], children[1]
        window = children[2] if len(children) > 2 else None
        return ast.AggregateCondition(aggregate, op, values, window, self._span(meta))

    def sequence(self, meta: Any, children: list[Any]) -> ast.Sequence:
        steps = tuple(c for c in children if isinstance(c, ast.Step))
        within = next(c for c in children if isinstance(c, ast.Duration))
        window = next((c for c in children if isinstance(c, ast.Window)), None)
        return ast.Sequence(steps, within, window, self._span(meta))

    def step(self, meta: Any, children: list[Any]) -> ast.Step:
        where = children[1].filter if len(children) > 1 else None
        return ast.Step(children[0], where, self._span(meta))

    def compare(self, meta: Any, children: list[Any]) -> ast.Compare:
        path, (op, values) = children
        return ast.Compare(path, op, values, self._span(meta))

    def event_ref(self, meta: Any, children: list[Any]) -> ast.EventRef:
        return children[0]

    def event_name(self, meta: Any, children: list[Any]) -> ast.EventRef:
        return ast.EventRef(_unquote(children[0]), self._span(meta))

    def any_event(self, meta: Any, children: list[Any]) -> ast.EventRef:
        return ast.EventRef(None, self._span(meta))

    def where(self, meta: Any, children: list[Any]) -> _Where:
        return _Where(children[0])

    # --- frequency and windows ---------------------------------------------------------------
    def _frequency(self, op: str, meta: Any, children: list[Any]) -> ast.Frequency:
        return ast.Frequency(op, int(children[0]), self._span(meta))

    def at_least(self, meta: Any, children: list[Any]) -> ast.Frequency:
        return self._frequency(">=", meta, children)

    def at_most(self, meta: Any, children: list[Any]) -> ast.Frequency:
        return self._frequency("<=", meta, children)

    def exactly(self, meta: Any, children: list[Any]) -> ast.Frequency:
        return self._frequency("=", meta, children)

    def more_than(self, meta: Any, children: list[Any]) -> ast.Frequency:
        return self._frequency(">", meta, children)

    def fewer_than(self, meta: Any, children: list[Any]) -> ast.Frequency:
        return self._frequency("<", meta, children)

    def last(self, meta: Any, children: list[Any]) -> ast.Window:
        _, amount, unit = children
        span = self._span(meta)
        return ast.Window(last=ast.Duration(_number(amount), _unit(unit), span), span=span)

    def between_times(self, meta: Any, children: list[Any]) -> ast.Window:
        return ast.Window(start=children[0], end=children[1], span=self._span(meta))

    def since(self, meta: Any, children: list[Any]) -> ast.Window:
        return ast.Window(start=children[0], span=self._span(meta))

    def before(self, meta: Any, children: list[Any]) -> ast.Window:
        return ast.Window(end=children[0], span=self._span(meta))

    def duration(self, meta: Any, children: list[Any]) -> ast.Duration:
        return ast.Duration(_number(children[0]), _unit(children[1]), self._span(meta))

    # --- aggregates ------------------------------------------------------------------------
    def _aggregate(self, func: str, path: ast.Path | None, source: _Source | None, meta: Any,
                   extra: ast.Filter | None = None) -> ast.Aggregate:
        span = self._span(meta)
        event = source.event if source and source.event else ast.EventRef(None, span)
        where = source.where if source else None
        if extra is not None:
            where = extra if where is None else ast.And((extra, where), span)
        return ast.Aggregate(func, path, event, where, span)

    def agg(self, meta: Any, children: list[Any]) -> ast.Aggregate:
        source = children[2] if len(children) > 2 else None
        return self._aggregate(str(children[0]).lower(), children[1], source, meta)

    def distinct_count(self, meta: Any, children: list[Any]) -> ast.Aggregate:
        return self._aggregate("distinct_count", children[0], children[1] if len(children) > 1 else None, meta)

    def count(self, meta: Any, children: list[Any]) -> ast.Aggregate:
        source = next((c for c in children if isinstance(c, _Source)), None)
        condition = next((c for c in children if not isinstance(c, _Source)), None)
        return self._aggregate("count", None, source, meta, condition)

    def count_of(self, meta: Any, children: list[Any]) -> ast.Aggregate:
        return self._aggregate("count", None, children[0], meta)

    def most_frequent(self, meta: Any, children: list[Any]) -> ast.Aggregate:
        return self._aggregate("most_frequent", children[0], children[1] if len(children) > 1 else None, meta)

    def time_of(self, meta: Any, children: list[Any]) -> ast.Aggregate:
        func = str(children[0]).lower() + "_time"
        return self._aggregate(func, None, children[1] if len(children) > 1 else None, meta)

    def source(self, meta: Any, children: list[Any]) -> _Source:
        event = next((c for c in children if isinstance(c, ast.EventRef)), None)
        where = next((c.filter for c in children if isinstance(c, _Where)), None)
        return _Source(event, where)

    # --- comparisons ---------------------------------------------------------------------------
    def cmp(self, meta: Any, children: list[Any]) -> tuple[str, tuple[ast.Literal, ...]]:
        op = str(children[0])
        return ("!=" if op == "<>" else op), (children[1],)

    def contains(self, meta: Any, children: list[Any]) -> tuple[str, tuple[ast.Literal, ...]]:
        return "contains", (children[0],)

    def starts_with(self, meta: Any, children: list[Any]) -> tuple[str, tuple[ast.Literal, ...]]:
        return "starts_with", (children[0],)

    def ends_with(self, meta: Any, children: list[Any]) -> tuple[str, tuple[ast.Literal, ...]]:
        return "ends_with", (children[0],)

    def matches(self, meta: Any, children: list[Any]) -> tuple[str, tuple[ast.Literal, ...]]:
        return "matches", (children[0],)

    def in_(self, meta: Any, children: list[Any]) -> tuple[str, tuple[ast.Literal, ...]]:
        return "in", tuple(children)

    def not_in(self, meta: Any, children: list[Any]) -> tuple[str, tuple[ast.Literal, ...]]:
        return "not_in", tuple(children)

    def between(self, meta: Any, children: list[Any]) -> tuple[str, tuple[ast.Literal, ...]]:
        return "between", tuple(children)

    def is_set(self, meta: Any, children: list[Any]) -> tuple[str, tuple[ast.Literal, ...]]:
        return "is_set", ()

    def is_not_set(self, meta: Any, children: list[Any]) -> tuple[str, tuple[ast.Literal, ...]]:
        return "is_not_set", ()

    def path(self, meta: Any, children: list[Any]) -> ast.Path:
        parts: list[str | int] = []
        for c in children:
            if c.type == "INT":
                parts.append(int(c))
            elif c.type == "STRING":
                parts.append(_unquote(c))
            else:
                parts.append(str(c))
        return ast.Path(tuple(parts), self._span(meta))

    # --- literals --------------------------------------------------------------------------
    def string(self, meta: Any, children: list[Any]) -> ast.Literal:
        return ast.Literal(_unquote(children[0]), "string", _token_span(children[0]))

    def number(self, meta: Any, children: list[Any]) -> ast.Literal:
        return ast.Literal(_number(children[0]), "number", _token_span(children[0]))

    def true(self, meta: Any, children: list[Any]) -> ast.Literal:
        return ast.Literal(True, "boolean", self._span(meta))

    def false(self, meta: Any, children: list[Any]) -> ast.Literal:
        return ast.Literal(False, "boolean", self._span(meta))

    def date(self, meta: Any, children: list[Any]) -> ast.Literal:
        token = children[0]
        span = _token_span(token)
        try:
            return ast.Literal(date.fromisoformat(str(token)), "date", span)
        except ValueError:
            raise SegmentSyntaxError(f"{str(token)!r} is not a date", text=self.text, span=span,
                                     fix="write dates as YYYY-MM-DD, for example 2026-01-31.") from None

    def datetime(self, meta: Any, children: list[Any]) -> ast.Literal:
        token = children[0]
        span = _token_span(token)
        try:
            value = datetime.fromisoformat(str(token).replace("Z", "+00:00"))
        except ValueError:
            raise SegmentSyntaxError(f"{str(token)!r} is not a time", text=self.text, span=span,
                                     fix="write times as YYYY-MM-DDTHH:MM[:SS][Z|+HH:MM], for example 2026-01-31T09:30:00Z.") from None
        return ast.Literal(value if value.tzinfo else value.replace(tzinfo=UTC), "datetime", span)

    def ago(self, meta: Any, children: list[Any]) -> ast.Literal:
        span = self._span(meta)
        return ast.Literal(ast.Duration(_number(children[0]), _unit(children[1]), span), "ago", span)


class _Where:
    def __init__(self, filter: ast.Filter):
        self.filter = filter


class _Source:
    def __init__(self, event: ast.EventRef | None, where: ast.Filter | None):
        self.event = event
        self.where = where


def _as_condition(node: Any) -> ast.Node:
    """A rule-level comparison is a condition on a profile trait."""
    if isinstance(node, ast.Compare):
        return ast.TraitCondition(node, node.span)
    if isinstance(node, ast.And):
        return ast.And(tuple(_as_condition(i) for i in node.items), node.span)
    if isinstance(node, ast.Or):
        return ast.Or(tuple(_as_condition(i) for i in node.items), node.span)
    if isinstance(node, ast.Not):
        return ast.Not(_as_condition(node.item), node.span)
    return node
