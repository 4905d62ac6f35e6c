"""Errors of the segment language: each points at a line and column of the rule and says how to fix it.

`str(error)` shows the message, the rule's line with a caret under the column, and the fix:

    unknown property 'urll' on 'page_view'; did you mean 'url'?
      1 | count(event = 'page_view' and urll contains 'pricing') > 3
        |                               ^^^^
    Fix: use one of the properties the catalog has seen on 'page_view' (url, path, referrer).

They reach HTTP as 400 with `line`, `column`, `end_column` and `fix` in the body.
"""

from __future__ import annotations

from typing import Any

from refinery.errors import RefineryError
from refinery.segments.ast import Span


class SegmentError(RefineryError):
    """A rule or computed trait that cannot be compiled. Carries where (line, column) and the fix."""

    http_status = 400
    code = "segment_error"

    def __init__(self, message: str, *, text: str = "", span: Span | None = None, fix: str | None = None,
                 **details: Any):
        self.text = text
        self.span = span
        self.line = span.line if span else None
        self.column = span.column if span else None
        super().__init__(message, fix=fix, line=self.line, column=self.column,
                         end_column=self.end_column, **details)

    @property
    def end_column(self) -> int | None:
        if self.span is None:
            return None
        if self.span.end_line == self.span.line:
            return self.span.end_column
        return None

    @property
    def caret(self) -> str:
        """The rule's line at fault with a caret under the column (empty without a position)."""
        if self.span is None or not self.text:
            return ""
        lines = self.text.splitlines() or [""]
        index = min(max(self.span.line - 1, 0), len(lines) - 1)
        line = lines[index]
        start = max(self.span.column - 1, 0)
        width = (self.end_column or start + 2) - 1 - start
        gutter = f"{self.span.line:>3} | "
        return f"{gutter}{line}\n{' ' * (len(gutter) - 2)}| {' ' * start}{'^' * max(width, 1)}"

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        if self.caret:
            body["caret"] = self.caret  # the rule's line with a caret under the fault, for any client to show
        return body

    def __str__(self) -> str:
        text = self.message
        caret = getattr(self, "caret", "")
        if caret:
            text += "\n" + caret
        if self.fix:
            text += f"\nFix: {self.fix}"
        return text


class SegmentSyntaxError(SegmentError):
    """The text does not follow the grammar."""

    code = "segment_syntax_error"


class UnknownNameError(SegmentError):
    """An event, property, trait or segment the catalog does not know."""

    code = "segment_unknown_name"


class SegmentTypeError(SegmentError):
    """An operator applied to a value of the wrong type (`total contains 'x'`), or to a personal field."""

    code = "segment_type_error"


class RuleLimitError(SegmentError):
    """A rule too large or deep, a window of no length, a regex that could run away."""

    code = "segment_limit"


class SegmentCycleError(SegmentError):
    """Segments that include each other through `in segment`."""

    code = "segment_cycle"
