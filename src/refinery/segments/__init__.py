"""Segments: a rule language compiled to SQL (docs/segments.md).

The language: `parse` (text -> AST), `check` (names, types, limits), `compile_rule` (-> sqlglot).
"""

from __future__ import annotations

from refinery.segments.catalog import Catalog, build_catalog
from refinery.segments.compile import (
    PERSONS_TABLE,
    CompileContext,
    Compiled,
    CompiledMany,
    Condition,
    compile_many,
    compile_rule,
)
from refinery.segments.errors import (
    RuleLimitError,
    SegmentCycleError,
    SegmentError,
    SegmentSyntaxError,
    SegmentTypeError,
    UnknownNameError,
)
from refinery.segments.parse import parse, parse_trait

__all__ = [
    "PERSONS_TABLE", "Catalog", "CompileContext", "Compiled", "CompiledMany", "Condition", "RuleLimitError", "SegmentCycleError",
    "SegmentError", "SegmentSyntaxError", "SegmentTypeError", "UnknownNameError", "build_catalog", "compile_many", "compile_rule",
    "parse", "parse_trait",
]
