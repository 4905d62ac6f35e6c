"""Rules as a JSON tree for the visual builder, and back: rule text <-> typed AST <-> tree.

The tree is a view of the AST (ast.py), not a second language: `from_text` parses the text with
the language's own parser and turns the AST into a tree; `to_text` prints a tree as canonical rule
text, which the same parser reads back. Both record where each tree node sits in the text
(`Located.spans`: JSON pointers into the tree -> offsets), so an error the checker raises at a line
and column is shown at the node it belongs to (`locate`).

The format (version 1; every node is a JSON object with a `kind`):

    {"version": 1, "root": GROUP, "policy": null | {"mode": "profiles"} | {"mode": "persons", "threshold": 0.9}}
    GROUP      {"kind": "group", "op": "and" | "or" | "not", "children": [NODE...]}
    performed  {"kind": "performed", "event": NAME|null, "where": GROUP|null, "frequency": {"op": ">=", "count": 1},
                "window": WINDOW|null, "negated": false, "note": null}
    aggregate  {"kind": "aggregate", "func": count|sum|avg|min|max|distinct_count|most_frequent|first_time|last_time,
                "path": PATH|null, "event": NAME|null, "where": GROUP|null, "op": OP, "values": [VALUE...],
                "window": WINDOW|null, "negated": false, "note": null}
    sequence   {"kind": "sequence", "steps": [{"event": NAME, "where": GROUP|null}...], "within": {"amount": 1, "unit": "day"},
                "window": WINDOW|null, "negated": false, "note": null}
    trait      {"kind": "trait", "path": PATH, "op": OP, "values": [VALUE...], "negated": false, "note": null}
    segment    {"kind": "segment", "name": NAME, "negated": false, "note": null}
    raw        {"kind": "raw", "text": "rule text", "note": null}
    compare    {"kind": "compare", "path": PATH, "op": OP, "values": [VALUE...], "negated": false}   (inside `where` only)
    WINDOW     {"kind": "last", "amount": 7, "unit": "day"} | {"kind": "between", "start": VALUE, "end": VALUE}
               | {"kind": "since", "start": VALUE} | {"kind": "before", "end": VALUE}
    VALUE      {"type": "string"|"number"|"boolean"|"date"|"datetime"|"ago", "value": ...}
               (date "2026-01-31", datetime "2026-01-31T09:30:00Z", ago "30 days")

A `where` is a group (and/or) of comparisons; the root is a group (and/or). `negated` is the
language's `not` in front of one condition; a `not` group negates a group. `note` is a comment
(`-- ...`) written before a condition. A condition with a comment *inside* it cannot be shown field
by field without losing the comment, so it becomes a `raw` node that keeps its text exactly.

Canonical trees (what `from_text` returns) round-trip exactly: `from_text(to_text(t)) == t`;
`canonical(t)` is the canonical tree of any valid tree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, cast

from refinery.segments import ast
from refinery.segments.errors import SegmentError
from refinery.segments.parse import parse

VERSION = 1
UNITS = ("second", "minute", "hour", "day", "week")
FREQUENCY_OPS = {">=": "at least", "<=": "at most", "=": "exactly", ">": "more than", "<": "fewer than"}
FUNCS = ("count", "sum", "avg", "min", "max", "distinct_count", "most_frequent", "first_time", "last_time")
#: Functions that take a path (`sum(total)`, `most frequent category`); the others take none.
PATH_FUNCS = ("sum", "avg", "min", "max", "distinct_count", "most_frequent")
OPS = ast.OPERATORS
#: How many values each operator takes: (at least, at most).
ARITY = {"in": (1, 10_000), "not_in": (1, 10_000), "between": (2, 2), "is_set": (0, 0), "is_not_set": (0, 0)}
VALUE_TYPES = ("string", "number", "boolean", "date", "datetime", "ago")
TIME_TYPES = ("date", "datetime", "ago")
CONDITION_KINDS = ("performed", "aggregate", "sequence", "trait", "segment", "raw")
MAX_DEPTH = 40
_OP_TEXT = {"starts_with": "starts with", "ends_with": "ends with", "is_set": "is set", "is_not_set": "is not set",
            "not_in": "not in"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_AGO = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s+(second|minute|hour|day|week)s?\s*\Z", re.I)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}\Z")


class TreeError(SegmentError):
    """A tree the builder cannot print as a rule: names the node (a JSON pointer) and the fix."""

    code = "segment_tree_error"

    def __init__(self, message: str, *, pointer: str, fix: str):
        super().__init__(message, fix=fix, pointer=pointer)
        self.pointer = pointer


@dataclass
class Located:
    """Text with the place of each tree node in it: (pointer, start, end) offsets, outermost first."""

    text: str
    spans: list[tuple[str, int, int]] = field(default_factory=list)


@dataclass
class Printed(Located):
    """`to_text`'s answer: the text, where each node went, and what is wrong with the tree (if anything,
    the text is a best effort and does not parse)."""

    problems: list[TreeError] = field(default_factory=list)


@dataclass
class Converted(Located):
    """`from_text`'s answer: the tree, and the spans of its nodes in the text it came from."""

    tree: dict[str, Any] = field(default_factory=dict)


def locate(spans: list[tuple[str, int, int]], start: int, end: int | None = None) -> str | None:
    """The innermost tree node whose text holds offset `start` (an error's start); for an error at the
    very end of a node (`the rule ends too early`), the innermost node ending there."""
    holding = [(e - s, p) for p, s, e in spans if s <= start < e]
    if not holding:
        holding = [(e - s, p) for p, s, e in spans if s < e == start]
    if not holding:
        return None
    width = min(w for w, _ in holding)
    return [p for w, p in holding if w == width][-1]


# --- values ---------------------------------------------------------------------------------------

def number_text(x: float) -> str:
    """A number as the grammar's SIGNED_NUMBER writes it, exactly (integers without a point)."""
    if float(x).is_integer() and abs(x) < 1e16:
        return str(int(x))
    return repr(float(x))


def duration_text(amount: float, unit: str) -> str:
    return f"{number_text(amount)} {unit}{'' if amount == 1 else 's'}"


def quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def datetime_text(at: datetime) -> str:
    at = (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC)
    return (f"{at.year:04d}-{at.month:02d}-{at.day:02d}T{at.hour:02d}:{at.minute:02d}:{at.second:02d}"
            + (f".{at.microsecond:06d}" if at.microsecond else "") + "Z")


def path_text(parts: tuple[str | int, ...]) -> str:
    """A path as the grammar reads it: a name first, then `.name`, `[0]` or `['odd key']`."""
    out = str(parts[0])
    for p in parts[1:]:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _NAME.match(p):
            out += "." + p
        else:
            out += "[" + quote(p) + "]"
    return out


def _value_of(lit: ast.Literal) -> dict[str, Any]:
    v = lit.value
    if lit.type == "ago":
        assert isinstance(v, ast.Duration)
        return {"type": "ago", "value": duration_text(v.amount, v.unit)}
    if lit.type == "datetime":
        assert isinstance(v, datetime)
        return {"type": "datetime", "value": datetime_text(v)}
    if lit.type == "date":
        assert isinstance(v, date)
        return {"type": "date", "value": v.isoformat()}
    if lit.type == "number":
        assert isinstance(v, float)
        return {"type": "number", "value": int(v) if v.is_integer() and abs(v) < 1e16 else v}
    return {"type": lit.type, "value": v}


# --- text -> tree ------------------------------------------------------------------------------------

def comments(text: str) -> Iterator[tuple[int, int, str]]:
    """The comments of a rule (`-- ...` outside strings): start, end, and the words after `--`."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "'\"":
            j = i + 1
            while j < n:
                if text[j] == c:
                    if j + 1 < n and text[j + 1] == c:
                        j += 2
                        continue
                    break
                j += 1
            i = j + 1
        elif text.startswith("--", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            yield i, j, text[i + 2:j].strip()
            i = j
        else:
            i += 1


def from_text(text: str) -> Converted:
    """Parse `text` (SegmentSyntaxError / RuleLimitError on failure) and give its canonical tree."""
    rule = parse(text)
    return from_rule(rule, text)


def from_rule(rule: ast.Rule, text: str) -> Converted:
    b = _TreeBuilder(text)
    root = b.root(rule.expr, "/root")
    tree: dict[str, Any] = {"version": VERSION, "root": root, "policy": None}
    if rule.policy is not None:
        tree["policy"] = ({"mode": "profiles"} if rule.policy.mode == "profiles"
                          else {"mode": "persons", "threshold": rule.policy.threshold})
        b.spans.append(("/policy", rule.policy.span.start, rule.policy.span.end))
    b.attach_comments(tree)
    return Converted(text, b.spans, tree)


class _TreeBuilder:
    def __init__(self, text: str):
        self.text = text
        self.spans: list[tuple[str, int, int]] = []
        #: rule-level conditions in text order: the node, its span, its pointer
        self.leaves: list[tuple[dict[str, Any], int, int, str]] = []

    def mark(self, pointer: str, span: ast.Span) -> None:
        self.spans.append((pointer, span.start, span.end))

    def root(self, node: ast.Node, pointer: str) -> dict[str, Any]:
        if isinstance(node, (ast.And, ast.Or)):
            return self.node(node, pointer)
        self.mark(pointer, node.span)
        return {"kind": "group", "op": "and", "children": [self.node(node, pointer + "/children/0")]}

    def node(self, node: ast.Node, pointer: str) -> dict[str, Any]:
        self.mark(pointer, node.span)
        if isinstance(node, (ast.And, ast.Or)):
            op = "and" if isinstance(node, ast.And) else "or"
            return {"kind": "group", "op": op,
                    "children": [self.node(c, f"{pointer}/children/{i}") for i, c in enumerate(node.items)]}
        if isinstance(node, ast.Not):
            if isinstance(node.item, ast.CONDITIONS):
                out = self.condition(node.item, pointer)
                out["negated"] = True
                self.leaves.append((out, node.span.start, node.span.end, pointer))
                return out
            return {"kind": "group", "op": "not", "children": [self.node(node.item, pointer + "/children/0")]}
        out = self.condition(node, pointer)
        self.leaves.append((out, node.span.start, node.span.end, pointer))
        return out

    def condition(self, node: ast.Node, pointer: str) -> dict[str, Any]:
        out: dict[str, Any]
        if isinstance(node, ast.Performed):
            out = {"kind": "performed", "event": self.event(node.event, pointer),
                   "where": self.where(node.where, pointer + "/where"),
                   "frequency": {"op": node.frequency.op, "count": node.frequency.count},
                   "window": self.window(node.window, pointer)}
            if node.frequency.span != node.span:
                self.mark(pointer + "/frequency", node.frequency.span)
        elif isinstance(node, ast.AggregateCondition):
            agg = node.aggregate
            out = {"kind": "aggregate", "func": agg.func, "path": self.path(agg.path, pointer),
                   "event": self.event(agg.event, pointer), "where": self.where(agg.where, pointer + "/where"),
                   "op": node.op, "values": self.values(node.values, pointer),
                   "window": self.window(node.window, pointer)}
        elif isinstance(node, ast.Sequence):
            steps = []
            for i, step in enumerate(node.steps):
                sp = f"{pointer}/steps/{i}"
                self.mark(sp, step.span)
                steps.append({"event": self.event(step.event, sp), "where": self.where(step.where, sp + "/where")})
            self.mark(pointer + "/within", node.within.span)
            out = {"kind": "sequence", "steps": steps,
                   "within": {"amount": _num(node.within.amount), "unit": node.within.unit},
                   "window": self.window(node.window, pointer)}
        elif isinstance(node, ast.TraitCondition):
            cmp = node.compare
            out = {"kind": "trait", "path": self.path(cmp.path, pointer), "op": cmp.op,
                   "values": self.values(cmp.values, pointer)}
        elif isinstance(node, ast.SegmentRef):
            out = {"kind": "segment", "name": node.name}
        else:  # pragma: no cover - the parser makes no other conditions
            raise TypeError(f"not a condition: {node!r}")
        out["negated"] = False
        out["note"] = None
        return out

    def event(self, ref: ast.EventRef, pointer: str) -> str | None:
        if ref.name is not None:
            self.mark(pointer + "/event", ref.span)
        return ref.name

    def path(self, path: ast.Path | None, pointer: str) -> str | None:
        if path is None:
            return None
        self.mark(pointer + "/path", path.span)
        return path_text(path.parts)

    def values(self, values: tuple[ast.Literal, ...], pointer: str) -> list[dict[str, Any]]:
        for i, v in enumerate(values):
            self.mark(f"{pointer}/values/{i}", v.span)
        return [_value_of(v) for v in values]

    def window(self, window: ast.Window | None, pointer: str) -> dict[str, Any] | None:
        if window is None:
            return None
        self.mark(pointer + "/window", window.span)
        if window.last is not None:
            return {"kind": "last", "amount": _num(window.last.amount), "unit": window.last.unit}
        if window.start is not None and window.end is not None:
            return {"kind": "between", "start": _value_of(window.start), "end": _value_of(window.end)}
        if window.start is not None:
            return {"kind": "since", "start": _value_of(window.start)}
        assert window.end is not None
        return {"kind": "before", "end": _value_of(window.end)}

    def where(self, node: ast.Filter | None, pointer: str) -> dict[str, Any] | None:
        if node is None:
            return None
        if isinstance(node, (ast.And, ast.Or)):
            return self.filter(node, pointer)
        self.mark(pointer, node.span)
        return {"kind": "group", "op": "and", "children": [self.filter(node, pointer + "/children/0")]}

    def filter(self, node: ast.Filter, pointer: str) -> dict[str, Any]:
        self.mark(pointer, node.span)
        if isinstance(node, (ast.And, ast.Or)):
            op = "and" if isinstance(node, ast.And) else "or"
            return {"kind": "group", "op": op,
                    "children": [self.filter(cast(ast.Filter, c), f"{pointer}/children/{i}") for i, c in enumerate(node.items)]}
        if isinstance(node, ast.Not):
            if isinstance(node.item, ast.Compare):
                out = self.filter(node.item, pointer)
                out["negated"] = True
                return out
            return {"kind": "group", "op": "not", "children": [self.filter(cast(ast.Filter, node.item), pointer + "/children/0")]}
        return {"kind": "compare", "path": self.path(node.path, pointer), "op": node.op,
                "values": self.values(node.values, pointer), "negated": False}

    def attach_comments(self, tree: dict[str, Any]) -> None:
        """Comments before a condition become its note; a condition with a comment inside becomes raw text."""
        if not self.leaves:
            return
        notes: dict[int, list[str]] = {}
        for start, _end, words in comments(self.text):
            inside = next((i for i, (_, s, e, _p) in enumerate(self.leaves) if s < start < e), None)
            if inside is not None:
                node, s, e, pointer = self.leaves[inside]
                note = node.get("note")
                node.clear()
                node.update({"kind": "raw", "text": self.text[s:e], "note": note})
                self.spans = [x for x in self.spans if not x[0].startswith(pointer + "/")]  # its fields are text now
                continue
            after = next((i for i, (_, s, _e, _p) in enumerate(self.leaves) if s > start), len(self.leaves) - 1)
            notes.setdefault(after, []).append(words)
        for i, lines in notes.items():
            node = self.leaves[i][0]
            node["note"] = "\n".join(lines) if any(lines) else None


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() and abs(x) < 1e16 else x


# --- tree -> text ------------------------------------------------------------------------------------

def to_text(tree: Any) -> Printed:
    """The canonical rule text of `tree`, where each node went, and any problems (pointer, message, fix)."""
    p = _Printer()
    if not isinstance(tree, dict):
        p.problem("", "the tree is not a JSON object", "send {\"version\": 1, \"root\": {...}}.")
        return Printed(p.text(), p.spans, p.problems)
    if tree.get("version", VERSION) != VERSION:
        p.problem("/version", f"tree version {tree.get('version')!r} is not supported", f"send version {VERSION}.")
    p.root(tree.get("root"), "/root")
    policy = tree.get("policy")
    if policy is not None:
        p.emit("\n")
        with p.at("/policy"):
            p.policy(policy)
    return Printed(p.text(), p.spans, p.problems)


class _Printer:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.spans: list[tuple[str, int, int]] = []
        self.problems: list[TreeError] = []
        self.separator = ""

    def text(self) -> str:
        return "".join(self.parts)

    def emit(self, s: str) -> None:
        self.parts.append(s)
        self.size += len(s)

    def problem(self, pointer: str, message: str, fix: str) -> None:
        self.problems.append(TreeError(message, pointer=pointer, fix=fix))
        self.emit("?")

    class _At:
        def __init__(self, printer: _Printer, pointer: str):
            self.printer, self.pointer = printer, pointer

        def __enter__(self) -> None:
            self.start = self.printer.size
            self.index = len(self.printer.spans)
            self.printer.spans.append((self.pointer, self.start, self.start))

        def __exit__(self, *exc: object) -> None:
            self.printer.spans[self.index] = (self.pointer, self.start, self.printer.size)

    def at(self, pointer: str) -> _Printer._At:
        return _Printer._At(self, pointer)

    # --- structure -------------------------------------------------------------------------------
    def root(self, node: Any, pointer: str) -> None:
        if not _is_group(node) or node.get("op") not in ("and", "or"):
            self.problem(pointer, "the rule's root is not an and/or group", "send a group with op 'and' or 'or'.")
            return
        if not node.get("children"):
            self.problem(pointer, "the rule is empty", "add a condition, for example: performed 'Order Completed'.")
            return
        self.expr(node, pointer, None, 0)

    def expr(self, node: Any, pointer: str, parent: str | None, depth: int) -> None:
        """A node of the rule: a group (parenthesised inside and/or) or a condition."""
        if depth > MAX_DEPTH:
            self.problem(pointer, f"the rule nests deeper than {MAX_DEPTH} levels", "flatten the groups.")
            return
        if not isinstance(node, dict):
            self.problem(pointer, "this node is not a JSON object", "send a group or a condition.")
            return
        kind = node.get("kind")
        note = node.get("note") if kind in CONDITION_KINDS else None
        if note is not None and not isinstance(note, str):
            self.problem(pointer + "/note", "the note is not text", "write the note as text, or null.")
        elif note and note.strip():
            for line in note.strip().split("\n"):
                self.emit("-- " + line.strip() + "\n")
        self.emit(self.separator)  # a root group's `and`/`or`, after the note (notes go on lines of their own)
        self.separator = ""
        if kind == "group":
            self.group(node, pointer, parent, depth, self.expr, "condition")
            return
        if kind not in CONDITION_KINDS:
            self.problem(pointer, f"unknown node kind {kind!r}", f"use group or one of {', '.join(CONDITION_KINDS)}.")
            return
        with self.at(pointer):
            if kind == "raw":
                self.raw(node, pointer, parent)
                return
            if _flag(node, "negated"):
                self.emit("not ")
            getattr(self, kind)(node, pointer)

    def group(self, node: dict[str, Any], pointer: str, parent: str | None, depth: int, inner: Any, what: str) -> None:
        op = node.get("op")
        children = node.get("children")
        if op not in ("and", "or", "not") or not isinstance(children, list):
            self.problem(pointer, f"a group needs op and/or/not and a list of children (got op {op!r})",
                         "send {\"kind\": \"group\", \"op\": \"and\", \"children\": [...]}.")
            return
        if not children:
            self.problem(pointer, "this group is empty", f"add a {what} to it, or remove the group.")
            return
        if op == "not":
            if len(children) != 1:
                self.problem(pointer, f"a 'not' group holds one {what} or group, not {len(children)}",
                             "put the others in an and/or group inside it.")
                return
            with self.at(pointer):
                self.emit("not ")
                inner(children[0], pointer + "/children/0", "not", depth + 1)
            return
        if len(children) == 1:
            with self.at(pointer):
                inner(children[0], pointer + "/children/0", parent, depth + 1)
            return
        wrap = parent is not None
        with self.at(pointer):
            if wrap:
                self.emit("(")
            for i, child in enumerate(children):
                if i and depth == 0 and inner == self.expr:
                    self.emit("\n")
                    self.separator = f"{op} "
                elif i:
                    self.emit(f" {op} ")
                inner(child, f"{pointer}/children/{i}", op, depth + 1)
            if wrap:
                self.emit(")")

    def raw(self, node: dict[str, Any], pointer: str, parent: str | None) -> None:
        text = node.get("text")
        if not isinstance(text, str) or not text.strip():
            self.problem(pointer + "/text", "this raw rule part is empty", "write a condition in the rule language.")
            return
        text = text.strip()
        wrap = parent is not None
        self.emit("(" if wrap else "")
        self.emit(text)
        if "--" in text:
            self.emit("\n")
        self.emit(")" if wrap else "")

    # --- conditions -------------------------------------------------------------------------------
    def performed(self, node: dict[str, Any], pointer: str) -> None:
        self.emit("performed ")
        self.event(node, pointer, allow_any=True)
        self.where(node.get("where"), pointer + "/where")
        freq = node.get("frequency") or {"op": ">=", "count": 1}
        op, count = (freq.get("op"), freq.get("count")) if isinstance(freq, dict) else (None, None)
        if op not in FREQUENCY_OPS or not _is_int(count) or cast(int, count) < 0:
            with self.at(pointer + "/frequency"):
                self.emit(" ")
                self.problem(pointer + "/frequency", "the frequency needs an op (>=, <=, =, >, <) and a count of 0 or more",
                             "for example: at least 2 times.")
        elif (op, count) != (">=", 1):
            with self.at(pointer + "/frequency"):
                self.emit(f" {FREQUENCY_OPS[op]} {count} time{'' if count == 1 else 's'}")
        self.window(node.get("window"), pointer + "/window")

    def aggregate(self, node: dict[str, Any], pointer: str) -> None:
        func = node.get("func")
        if func not in FUNCS:
            self.problem(pointer + "/func", f"unknown aggregate {func!r}", f"use one of {', '.join(FUNCS)}.")
            return
        path = node.get("path")
        if func in PATH_FUNCS:
            if func == "distinct_count":
                self.emit("count(distinct ")
                self.path(path, pointer + "/path", "event")
                self.emit(")")
            elif func == "most_frequent":
                self.emit("most frequent ")
                self.path(path, pointer + "/path", "event")
            else:
                self.emit(f"{func}(")
                self.path(path, pointer + "/path", "event")
                self.emit(")")
            self.source(node, pointer)
        elif func in ("first_time", "last_time"):
            self.emit(f"{func.split('_')[0]} time")
            self.source(node, pointer)
        else:
            if node.get("event") is None:
                where = node.get("where")
                self.emit("count(")
                if where is not None:
                    with self.at(pointer + "/where"):
                        self.filter_group(where, pointer + "/where", None, 0)
                self.emit(")")
            else:
                self.emit("count")
                self.source(node, pointer)
        self.emit(" ")
        self.predicate(node, pointer)
        self.window(node.get("window"), pointer + "/window")

    def source(self, node: dict[str, Any], pointer: str) -> None:
        if node.get("event") is not None:
            self.emit(" of ")
            self.event(node, pointer, allow_any=False)
        self.where(node.get("where"), pointer + "/where")

    def sequence(self, node: dict[str, Any], pointer: str) -> None:
        steps = node.get("steps")
        if not isinstance(steps, list) or len(steps) < 2:
            self.problem(pointer + "/steps", "a sequence needs two steps or more", "add a step: 'A' then 'B'.")
            return
        for i, step in enumerate(steps):
            sp = f"{pointer}/steps/{i}"
            if i:
                self.emit(" then ")
            with self.at(sp):
                if not isinstance(step, dict):
                    self.problem(sp, "this step is not a JSON object", "send {\"event\": \"...\", \"where\": null}.")
                    continue
                self.event(step, sp, allow_any=False)
                self.where(step.get("where"), sp + "/where")
        self.emit(" within ")
        within = node.get("within")
        with self.at(pointer + "/within"):
            self.duration(within, pointer + "/within")
        self.window(node.get("window"), pointer + "/window")

    def trait(self, node: dict[str, Any], pointer: str) -> None:
        self.path(node.get("path"), pointer + "/path", "trait")
        self.emit(" ")
        self.predicate(node, pointer)

    def segment(self, node: dict[str, Any], pointer: str) -> None:
        name = node.get("name")
        self.emit("in segment ")
        if not isinstance(name, str) or not name:
            self.problem(pointer + "/name", "no segment chosen", "pick the segment to include.")
            return
        self.emit(quote(name))

    def compare(self, node: dict[str, Any], pointer: str) -> None:
        if _flag(node, "negated"):
            self.emit("not ")
        self.path(node.get("path"), pointer + "/path", "event")
        self.emit(" ")
        self.predicate(node, pointer)

    # --- parts ------------------------------------------------------------------------------------
    def event(self, node: dict[str, Any], pointer: str, *, allow_any: bool) -> None:
        name = node.get("event")
        if name is None and allow_any:
            self.emit("any event")
            return
        with self.at(pointer + "/event"):
            if not isinstance(name, str) or not name:
                self.problem(pointer + "/event", "no event chosen", "pick an event from the catalog.")
                return
            self.emit(quote(name))

    def where(self, where: Any, pointer: str) -> None:
        if where is None:
            return
        if not _is_group(where) or where.get("op") not in ("and", "or"):
            self.emit(" where ")
            self.problem(pointer, "a `where` is not an and/or group", "send a group of comparisons.")
            return
        children = where.get("children") or []
        if not children:
            return  # an empty where (the builder's, before a comparison is added) filters nothing
        self.emit(" where ")
        single = len(children) == 1 and isinstance(children[0], dict) and children[0].get("kind") == "compare" \
            and not _flag(children[0], "negated")
        with self.at(pointer):
            if single:
                self.filter_group(where, pointer, None, 0)
            else:
                self.emit("(")
                self.filter_group(where, pointer, None, 0)
                self.emit(")")

    def filter_group(self, node: Any, pointer: str, parent: str | None, depth: int) -> None:
        if depth > MAX_DEPTH:
            self.problem(pointer, f"the filter nests deeper than {MAX_DEPTH} levels", "flatten the groups.")
            return
        if not isinstance(node, dict):
            self.problem(pointer, "this node is not a JSON object", "send a group or a comparison.")
            return
        if node.get("kind") == "group":
            self.group(node, pointer, parent, depth, self.filter_group, "comparison")
            return
        if node.get("kind") != "compare":
            self.problem(pointer, f"a `where` holds comparisons and groups, not {node.get('kind')!r}",
                         "use {\"kind\": \"compare\", ...}.")
            return
        with self.at(pointer):
            self.compare(node, pointer)

    def path(self, path: Any, pointer: str, context: str) -> None:
        with self.at(pointer):
            if not isinstance(path, str) or not path.strip():
                self.problem(pointer, "no field chosen", "pick a property or trait, e.g. total or context.page.url.")
                return
            parts = parse_path(path.strip(), context)
            if parts is None:
                self.problem(pointer, f"{path!r} is not a field name",
                             "write a name (plan), a nested field (context.page.url, items[0].sku), or "
                             "properties['odd key'] for a key that is not a plain name or is a keyword.")
                return
            self.emit(path_text(parts))

    def predicate(self, node: dict[str, Any], pointer: str) -> None:
        op = node.get("op")
        values = node.get("values")
        if op not in OPS:
            self.problem(pointer + "/op", f"unknown operator {op!r}", f"use one of {', '.join(OPS)}.")
            return
        if not isinstance(values, list):
            values = []
        lo, hi = ARITY.get(op, (1, 1))
        if not lo <= len(values) <= hi:
            want = f"{lo}" if lo == hi else f"at least {lo}"
            self.emit(_OP_TEXT.get(op, op) + " ")
            self.problem(pointer + "/values", f"`{_OP_TEXT.get(op, op)}` takes {want} value{'' if hi == 1 else 's'}, "
                         f"not {len(values)}", "add or remove values.")
            return
        self.emit(_OP_TEXT.get(op, op))
        if op in ("in", "not_in"):
            self.emit(" (")
            for i, v in enumerate(values):
                if i:
                    self.emit(", ")
                self.value(v, f"{pointer}/values/{i}", VALUE_TYPES)
            self.emit(")")
        elif op == "between":
            self.emit(" ")
            self.value(values[0], pointer + "/values/0", VALUE_TYPES)
            self.emit(" and ")
            self.value(values[1], pointer + "/values/1", VALUE_TYPES)
        elif values:
            self.emit(" ")
            self.value(values[0], pointer + "/values/0", VALUE_TYPES)

    def value(self, value: Any, pointer: str, types: tuple[str, ...]) -> None:
        with self.at(pointer):
            text = value_text(value, types)
            if isinstance(text, str):
                self.emit(text)
            else:
                self.problem(pointer, text[0], text[1])

    def window(self, window: Any, pointer: str) -> None:
        if window is None:
            return
        self.emit(" ")
        with self.at(pointer):
            kind = window.get("kind") if isinstance(window, dict) else None
            if kind == "last":
                self.emit("in last ")
                self.duration(window, pointer)
            elif kind == "between":
                self.emit("between ")
                self.value(window.get("start"), pointer + "/start", TIME_TYPES)
                self.emit(" and ")
                self.value(window.get("end"), pointer + "/end", TIME_TYPES)
            elif kind == "since":
                self.emit("since ")
                self.value(window.get("start"), pointer + "/start", TIME_TYPES)
            elif kind == "before":
                self.emit("before ")
                self.value(window.get("end"), pointer + "/end", TIME_TYPES)
            else:
                self.problem(pointer, f"unknown window {kind!r}", "use last, between, since or before.")

    def duration(self, d: Any, pointer: str) -> None:
        amount = d.get("amount") if isinstance(d, dict) else None
        unit = d.get("unit") if isinstance(d, dict) else None
        if not _is_number(amount) or unit not in UNITS:
            self.problem(pointer, "a length needs an amount and a unit (second, minute, hour, day, week)",
                         "for example 7 days.")
            return
        self.emit(duration_text(float(cast(float, amount)), unit))

    def policy(self, policy: Any) -> None:
        mode = policy.get("mode") if isinstance(policy, dict) else None
        if mode == "profiles":
            self.emit("counted by profiles")
        elif mode == "persons":
            threshold = policy.get("threshold", 0.9)
            if not _is_number(threshold):
                self.problem("/policy/threshold", "the link threshold is not a number", "use a score such as 0.9.")
                return
            self.emit(f"counted by persons above {number_text(float(threshold))}")
        else:
            self.problem("/policy", f"unknown identity policy {mode!r}", "use profiles or persons.")


def _is_group(node: Any) -> bool:
    return isinstance(node, dict) and node.get("kind") == "group"


def _flag(node: dict[str, Any], key: str) -> bool:
    return node.get(key) is True


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def value_text(value: Any, types: tuple[str, ...]) -> str | tuple[str, str]:
    """A tree value as rule text, or (problem, fix)."""
    if not isinstance(value, dict) or value.get("type") not in types:
        got = value.get("type") if isinstance(value, dict) else value
        return f"a value of type {got!r} cannot go here", f"use one of {', '.join(types)}."
    kind, v = value["type"], value.get("value")
    if kind == "string":
        return quote(v) if isinstance(v, str) else ("the value is not text", "type some text.")
    if kind == "number":
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                return f"{v!r} is not a number", "type a number such as 3 or -2.5."
        return number_text(float(cast(float, v))) if _is_number(v) else (f"{v!r} is not a number", "type a number such as 3 or -2.5.")
    if kind == "boolean":
        return ("true" if v else "false") if isinstance(v, bool) else ("the value is not true or false", "pick true or false.")
    if kind == "date":
        try:
            if not isinstance(v, str) or not _DATE.match(v.strip()):
                raise ValueError
            return date.fromisoformat(v.strip()).isoformat()
        except ValueError:
            return f"{v!r} is not a date", "write it as YYYY-MM-DD, e.g. 2026-01-31."
    if kind == "datetime":
        try:
            if not isinstance(v, str) or not _DATE.match(v.strip()[:10]):
                raise ValueError
            return datetime_text(datetime.fromisoformat(v.strip().replace("Z", "+00:00")))
        except ValueError:
            return f"{v!r} is not a time", "write it as 2026-01-31T09:30:00Z."
    m = _AGO.match(v) if isinstance(v, str) else None
    if m is None:
        return f"{v!r} is not a time ago", "write an amount and a unit, e.g. 30 days."
    return duration_text(float(m.group(1)), m.group(2).lower()) + " ago"


def parse_path(text: str, context: str) -> tuple[str | int, ...] | None:
    """A field path as the grammar reads it where it would stand (`trait`: a rule-level comparison;
    `event`: a comparison on an event), or None when the text is not exactly one path there."""
    probe = f"{text} is set" if context == "trait" else f"performed any event where {text} is set"
    offset = 0 if context == "trait" else len("performed any event where ")
    try:
        rule = parse(probe)
    except SegmentError:
        return None
    node = rule.expr
    if rule.policy is not None:
        return None
    cmp = node.compare if isinstance(node, ast.TraitCondition) else (
        node.where if isinstance(node, ast.Performed) and node.frequency.op == ">=" and node.window is None else None)
    if not isinstance(cmp, ast.Compare) or cmp.op != "is_set":
        return None
    if cmp.path.span.start != offset or cmp.path.span.end != offset + len(text):
        return None
    return cmp.path.parts


# --- canonical trees --------------------------------------------------------------------------------

def canonical(tree: dict[str, Any]) -> dict[str, Any]:
    """The tree `from_text(to_text(tree))` gives (raises TreeError or SegmentError when it has none)."""
    printed = to_text(tree)
    if printed.problems:
        raise printed.problems[0]
    return from_text(printed.text).tree


def pointer_get(tree: Any, pointer: str) -> Any:
    """The node at a JSON pointer (`/root/children/0/where`), or None."""
    node = tree
    for part in [p for p in pointer.split("/") if p]:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node
