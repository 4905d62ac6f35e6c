"""Bad input: every kind of bad rule is refused with the place (line, column, caret) and a fix."""

from __future__ import annotations

import logging

import pytest
from test_language_golden import AS_OF, CATALOG, CTX

from refinery.segments import (
    CompileContext,
    RuleLimitError,
    SegmentCycleError,
    SegmentError,
    SegmentSyntaxError,
    SegmentTypeError,
    UnknownNameError,
    compile_rule,
)
from refinery.segments.parse import MAX_DEPTH, parser


def refused(rule: str, kind: type[SegmentError], ctx: CompileContext = CTX) -> SegmentError:
    with pytest.raises(kind) as info:
        compile_rule(rule, ctx)
    err = info.value
    assert err.http_status == 400 and err.fix, err
    return err


def test_the_grammar_has_no_conflicts(caplog: pytest.LogCaptureFixture) -> None:
    """LALR conflicts would be resolved silently (shift wins); the grammar must have none."""
    from lark import Lark, logger

    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with caplog.at_level(logging.DEBUG, logger="lark"):
            grammar = parser().source_grammar
            Lark(grammar, start=["rule", "trait"], parser="lalr", debug=True)
    finally:
        logger.setLevel(level)
    assert not [r for r in caplog.records if "conflict" in r.getMessage().lower()]


def test_syntax_error_points_at_the_token_and_says_what_could_come() -> None:
    err = refused("plan = 'pro' and\n  performed 'Order Completed' in last days", SegmentSyntaxError)
    assert (err.line, err.column) == (2, 39)
    assert "a number" in (err.fix or "")
    text = str(err)
    assert "  2 |   performed 'Order Completed' in last days" in text
    assert text.splitlines()[2].index("^") == text.splitlines()[1].index("days")


def test_a_where_with_two_comparisons_needs_parentheses() -> None:
    # `and` after a where's one comparison joins the rule, so `url` is read as a trait here
    err = refused("performed 'page_view' where url contains 'a' and urll = 'b'", UnknownNameError)
    assert "unknown trait 'urll'" in err.message


def test_unknown_property_suggests_the_nearest() -> None:
    err = refused("count(event = 'page_view' and urll contains 'pricing') > 3 in last 7 days", UnknownNameError)
    assert err.message == "unknown property 'urll' on 'page_view'; did you mean 'url'?"
    assert (err.line, err.column, err.end_column) == (1, 31, 35)
    assert err.to_dict()["suggestion"] == "url"


def test_unknown_event_trait_and_segment_suggest() -> None:
    assert "did you mean 'Order Completed'?" in refused("performed 'Order Complete'", UnknownNameError).message
    assert "did you mean 'plan'?" in refused("plam = 'pro'", UnknownNameError).message
    assert "did you mean 'high_value'?" in refused("in segment 'high_valu'", UnknownNameError).message


@pytest.mark.parametrize("rule, words", [
    ("performed 'Order Completed' where total contains 'x'", "'total' is a number"),
    ("performed 'Order Completed' where total = 'x'", "cannot be compared with a string"),
    ("plan > 3", "'plan' is a string"),
    ("age starts with 'x'", "'age' is a number"),
    ("plan in ('a', 3)", "mix types"),
    ("sum(category) of 'Order Completed' > 3", "`sum` adds numbers"),
    ("age between 30 and 18", "wrong way round"),
    ("plan > 'a'", "orders numbers and times"),
])
def test_type_mismatches_are_refused(rule: str, words: str) -> None:
    assert words in refused(rule, SegmentTypeError).message


@pytest.mark.parametrize("rule", ["email contains 'gmail'", "email matches '.*'", "name starts with 'A'", "email > 'a'"])
def test_substrings_of_personal_fields_are_refused_because_they_are_tokens(rule: str) -> None:
    err = refused(rule, SegmentTypeError)
    assert "personal field, stored as a token" in err.message


def test_personal_equality_compiles_the_literal_through_the_tokeniser() -> None:
    sql = compile_rule("email = ' Ann@Example.COM'", CTX).sql(AS_OF)
    assert "'pii:email:<ann@example.com>'" in sql and "Ann@" not in sql


@pytest.mark.parametrize("pattern, kind, words", [
    ("(a+)+$", RuleLimitError, "nested repetition"),
    ("(x*)*y", RuleLimitError, "nested repetition"),
    ("(a|ab)*c", RuleLimitError, "alternatives"),
    ("a{5000}", RuleLimitError, "above 1000"),
    ("[a-", SegmentTypeError, "invalid regular expression"),
    ("(?<=x)y", SegmentTypeError, "lookahead and lookbehind"),
    ("(a)\\1", SegmentTypeError, "backreferences"),
])
def test_regexes_invalid_or_catastrophic_are_refused(pattern: str, kind: type[SegmentError], words: str) -> None:
    err = refused(f"performed 'page_view' where url matches '{pattern}'", kind)
    assert words in err.message


@pytest.mark.parametrize("rule", [
    "performed 'page_view' in last 0 days",
    "performed 'page_view' in last -3 days",
    "'page_view' then 'Order Completed' within 0 hours",
    "performed 'page_view' between 2026-02-01 and 2026-01-01",
    "performed 'page_view' between 7 days ago and 30 days ago",
])
def test_windows_of_no_length_are_refused(rule: str) -> None:
    refused(rule, RuleLimitError)


def test_segments_referring_to_themselves_are_refused() -> None:
    ctx = CompileContext(CATALOG, segments={"a": "in segment 'b'", "b": "plan = 'pro' and in segment 'a'", "c": "in segment 'c'"})
    err = refused("in segment 'a'", SegmentCycleError, ctx)
    assert "a -> b -> a" in err.message
    with pytest.raises(SegmentCycleError):
        compile_rule("plan = 'x' or in segment 'c'", ctx)
    with pytest.raises(SegmentCycleError):
        compile_rule("in segment 'a'", ctx, name="b")


def test_huge_rules_are_refused() -> None:
    refused("(" * (MAX_DEPTH + 5) + "plan = 'pro'" + ")" * (MAX_DEPTH + 5), RuleLimitError)
    refused(" or ".join(f"plan = 'p{i}'" for i in range(300)), RuleLimitError)
    refused("plan = '" + "x" * 30_000 + "'", RuleLimitError)


@pytest.mark.parametrize("literal", [
    "x'' OR 1=1; --", "x\\", "$.a\"]", "'' || (SELECT 1) || ''", "\\u0027",
])
def test_quotes_and_injection_attempts_stay_literals(literal: str) -> None:
    from sqlglot import exp

    from refinery.storage.engine import parse

    compiled = compile_rule(f"plan = '{literal}'", CTX)
    tree = parse(compiled.sql(AS_OF))
    strings = [s.this for s in tree.find_all(exp.Literal) if s.is_string]
    assert literal.replace("''", "'") in strings
    assert [t.name for t in tree.find_all(exp.Table)] == ["profiles"]


def test_a_backslash_does_not_escape_a_quote() -> None:
    """Quotes inside strings are doubled (SQL's way), so a backslash cannot end a string early."""
    err = refused("plan = 'x\\'; DROP TABLE profiles; --'", SegmentSyntaxError)
    assert (err.line, err.column) == (1, 12)


def test_errors_carry_their_place_to_http() -> None:
    body = refused("performed 'page_view' in last 0 days", RuleLimitError).to_dict()
    assert body["error"] == "segment_limit" and body["line"] == 1 and body["column"] == 23 and body["fix"]
