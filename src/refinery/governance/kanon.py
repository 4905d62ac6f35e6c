"""k-anonymity for aggregate reports: a group seen from fewer than k people is not shown.

An aggregate report (counts grouped by something) can single a person out when a group is small:
"1 person in postcode 75011 bought product X" is that person. Reports served to roles without
`pii:read` therefore drop every group whose count of *distinct people* is below `k` (the
`min_group_size` setting, 10 by default) and say how many groups they dropped - never what was in
them. Decision: docs/decisions/0017-k-anonymity.md; what is covered: docs/governance.md.

Pure functions, no I/O:

- `suppress(rows, k, people=...)`: a report's rows (dicts with a distinct-people count) -> the rows
  shown and the number of groups suppressed (`Suppression`);
- `threshold(select, k, person)`: a sqlglot pass for an aggregate SELECT (its GROUP BY groups) ->
  the query of the groups shown (HAVING count(DISTINCT person) >= k) and the query counting the
  groups suppressed;
- `check_aggregate(select, tables)`: refuses a query whose answer is not groups of people: anything
  but one aggregate SELECT over one person-keyed table, without subqueries, windows, or aggregates
  that return a member's value (min, max, list, ...);
- `PERSON_TABLES`: the person-keyed tables such a query may read, each with its `_person` column
  (the profile, else the identifier), which is what "distinct people" counts.

Who is a person: the deterministic profile (`event_profiles.profile_id`, `identities.profile_id`);
events or identifiers no resolution has placed yet count by their own user id or anonymous id (or
identifier). Two profiles of one person count as two: resolve identities before relying on a
report of few groups. Events without any identifier count as nobody (NULL), which can only
suppress more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlglot import exp

from refinery.errors import QueryError

#: The default minimum group size (the `min_group_size` setting's default).
DEFAULT_K = 10
#: The column each person-keyed table gains in aggregate queries: who the row is about.
PERSON = "_person"

#: Tables an aggregate query may read, as the relation it really reads: the table plus `_person`.
#: Constant SQL (no user text), parsed once per query by sqlglot.
PERSON_TABLES: dict[str, str] = {
    "events": (
        "SELECT e.*, COALESCE(ep.profile_id, 'user_id:' || e.user_id, 'anonymous_id:' || e.anonymous_id) AS _person "
        "FROM events AS e LEFT JOIN event_profiles AS ep ON ep.source = e.source AND ep.message_id = e.message_id"
    ),
    "event_profiles": "SELECT ep.*, ep.profile_id AS _person FROM event_profiles AS ep",
    "profiles": "SELECT p.*, p.profile_id AS _person FROM profiles AS p",
    "identities": (
        "SELECT i.*, COALESCE(i.profile_id, i.identifier_type || ':' || i.value) AS _person FROM identities AS i"
    ),
    "consent_log": (
        "SELECT c.*, COALESCE(i.profile_id, c.subject_type || ':' || c.subject_value) AS _person "
        "FROM consent_log AS c LEFT JOIN identities AS i ON i.identifier_type = c.subject_type AND i.value = c.subject_value"
    ),
    # segment sizes and their history are the marketer's aggregate: members are profiles
    "segment_members": "SELECT m.*, m.profile_id AS _person FROM segment_members AS m",
}

#: Aggregates whose value is about the group, not one member of it (as BigQuery's and Snowflake's
#: aggregation policies allow): counts, sums, means, spreads, and/or over booleans.
ALLOWED_AGGREGATES: tuple[type[exp.AggFunc], ...] = (
    exp.Count, exp.CountIf, exp.ApproxDistinct, exp.Sum, exp.Avg,
    exp.Stddev, exp.StddevPop, exp.StddevSamp, exp.Variance, exp.VariancePop,
    exp.LogicalAnd, exp.LogicalOr,
)
_ALLOWED_NAMES = "count, count_if, approx_count_distinct, sum, avg, stddev, variance, bool_and, bool_or"


def check_k(k: int) -> int:
    """A minimum group size must be a whole number of at least 2 (1 would suppress nothing)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise QueryError(f"Minimum group size {k!r} is not a whole number of at least 2.",
                         fix="Set min_group_size to 2 or more (the default is 10).", field="min_group_size")
    return k


# -- rows ------------------------------------------------------------------------------------------

Row = TypeVar("Row")


@dataclass
class Suppression(Generic[Row]):
    """The groups a report may show, and how many it had to suppress."""

    rows: list[Row]
    suppressed_groups: int
    k: int
    #: measures summed over the suppressed groups, when the caller asked for an "other" bucket and
    #: the bucket itself holds at least k people (else empty: its numbers would single them out).
    other: dict[str, Any] = field(default_factory=dict)

    def note(self) -> str:
        """The honest line a report prints under its table."""
        return f"suppressed groups: {self.suppressed_groups} (fewer than {self.k} people each)"


def suppress(rows: Iterable[Row], k: int, *, people: Callable[[Row], int | None] | str = "people",
             other: Iterable[str] = (), other_people: int | None = None) -> Suppression[Row]:
    """Keep the rows whose distinct-people count is at least `k`; count the others.

    `people` names the count in a dict row, or is a function of the row. A row whose count is
    unknown (None) is suppressed: a report never shows a group it cannot vouch for. With `other`
    (measure names) the suppressed groups' measures are summed into `Suppression.other`, but only
    when `other_people` - the exact number of distinct people across the suppressed groups, which
    the caller must count, since people can be in several groups - is at least `k`.
    """
    check_k(k)
    count = people if callable(people) else _key(people)
    shown: list[Row] = []
    hidden: list[Row] = []
    for row in rows:
        n = count(row)
        (shown if n is not None and n >= k else hidden).append(row)
    bucket: dict[str, Any] = {}
    measures = list(other)
    if measures and hidden and other_people is not None and other_people >= k:
        for name in measures:
            bucket[name] = sum((_key(name)(r) or 0) for r in hidden)
        bucket["people"] = other_people
    return Suppression(shown, len(hidden), k, bucket)


def _key(name: str) -> Callable[[Any], Any]:
    def get(row: Any) -> Any:
        return row.get(name) if isinstance(row, Mapping) else getattr(row, name, None)

    return get


# -- queries ---------------------------------------------------------------------------------------


def people_count(person: exp.Expression | None = None) -> exp.Expression:
    """`count(DISTINCT _person)`."""
    return exp.Count(this=exp.Distinct(expressions=[person if person is not None else exp.column(PERSON)]))


def check_aggregate(select: exp.Expression, tables: Iterable[str] = PERSON_TABLES) -> exp.Select:
    """Refuse a query a k threshold cannot protect; return it as the `exp.Select` it must be.

    Allowed: `SELECT <group keys>, <aggregates> FROM <one person-keyed table> [WHERE ...]
    [GROUP BY ...] [HAVING ...] [ORDER BY ...] [LIMIT ...]`, the aggregates from
    `ALLOWED_AGGREGATES`. Each refusal says why and what to write instead."""
    known = ", ".join(sorted(tables))
    if not isinstance(select, exp.Select):
        raise QueryError(
            f"Without pii:read only one aggregate SELECT runs; this is a {select.key.upper()}.",
            fix="Write one SELECT ... GROUP BY over one table (no UNION), e.g. "
                "SELECT event, count(DISTINCT _person) AS people FROM events GROUP BY event.")
    if select.find(exp.With, exp.CTE) is not None:
        raise QueryError("Without pii:read, aggregate queries cannot use WITH.", fix="Write one SELECT ... GROUP BY.")
    read = sorted({t.name.lower() for t in select.find_all(exp.Table) if isinstance(t.this, exp.Identifier)})
    outside = [name for name in read if name not in set(tables)]
    if outside:
        raise QueryError(f"Without pii:read, aggregate queries read exactly one of: {known} (this reads: {', '.join(outside)}).",
                         fix="Query one of those tables; other tables hold no person to count.")
    for node in select.walk():
        if isinstance(node, (exp.Select, exp.Subquery)) and node is not select:
            raise QueryError("Without pii:read, aggregate queries cannot hold subqueries.",
                             fix="Write the condition in the WHERE clause of the one SELECT, or ask a user with pii:read.")
        if isinstance(node, exp.Window):
            raise QueryError("Without pii:read, aggregate queries cannot use window functions (OVER ...).",
                             fix="Group with GROUP BY; each group is shown only when it holds enough people.")
        if isinstance(node, exp.Join):
            raise QueryError("Without pii:read, aggregate queries read one table (no JOIN).",
                             fix=f"Query one of: {known}; events already carry _person (their profile).")
        if isinstance(node, exp.AggFunc) and not isinstance(node, ALLOWED_AGGREGATES):
            raise QueryError(
                f"Aggregate {node.sql_name().lower()}() can return one person's value, so it is not allowed without pii:read.",
                fix=f"Use {_ALLOWED_NAMES}.")
        if isinstance(node, exp.Anonymous):
            raise QueryError(
                f"Function {node.name.lower()}() is not one the checker knows, so it may be an aggregate that returns "
                "members' values (like histogram or list); it is not allowed without pii:read.",
                fix=f"Use standard SQL functions; aggregates: {_ALLOWED_NAMES}.")
    sources = [t for t in select.find_all(exp.Table)]
    if len(sources) != 1 or not isinstance(sources[0].this, exp.Identifier) or sources[0].name.lower() not in set(tables):
        names = ", ".join(sorted({t.name for t in sources})) or "none"
        raise QueryError(f"Without pii:read, aggregate queries read exactly one of: {known} (this reads: {names}).",
                         fix="Query one of those tables; other tables hold no person to count.")
    if not select.args.get("group") and not any(isinstance(p, exp.AggFunc) for e in select.expressions for p in e.walk()):
        raise QueryError(
            "Without pii:read, only aggregate queries run: this one returns rows, not groups.",
            fix="Group and count, e.g. SELECT event, count(*) AS events FROM events GROUP BY event "
                "(groups of fewer than min_group_size people are not shown).")
    return select


def person_keyed(select: exp.Select, tables: Mapping[str, str] = PERSON_TABLES, dialect: str = "duckdb") -> exp.Select:
    """Replace the query's one table by its person-keyed relation (the table plus `_person`),
    under the same alias, so `_person` resolves and the query's own column names still do."""
    import sqlglot

    select = select.copy()
    table = next(select.find_all(exp.Table))
    relation = sqlglot.parse_one(tables[table.name.lower()], read=dialect)
    table.replace(exp.Subquery(this=relation, alias=exp.TableAlias(this=exp.to_identifier(table.alias_or_name))))
    return select


def threshold(select: exp.Select, k: int, person: exp.Expression | None = None) -> tuple[exp.Select, exp.Select]:
    """(the groups shown, the count of groups suppressed) for an aggregate SELECT whose rows carry
    `person` (default `_person`): HAVING count(DISTINCT person) >= k, ANDed with its own HAVING;
    and SELECT count(*) over the same groups with fewer than k people."""
    check_k(k)
    people = people_count(person)
    own = select.args.get("having")
    own_condition = own.this if isinstance(own, exp.Having) else None

    def having(condition: exp.Expression) -> exp.Expression:
        if own_condition is None:
            return condition
        return exp.And(this=exp.Paren(this=own_condition.copy()), expression=condition)

    shown = select.copy()
    shown.set("having", exp.Having(this=having(exp.GTE(this=people.copy(), expression=exp.Literal.number(k)))))
    small = select.copy()
    for clause in ("order", "limit", "offset"):
        small.set(clause, None)
    small.set("having", exp.Having(this=having(exp.LT(this=people.copy(), expression=exp.Literal.number(k)))))
    counted = exp.select(exp.Count(this=exp.Star()).as_("suppressed_groups")).from_(small.subquery("_small"))
    return shown, counted
