"""SQL features: for what the aggregate syntax cannot say, one read-only SELECT returning
`profile_id, value`, one row per profile, over the events as of a moment written `$as_of`:

    SELECT ep.profile_id, count(DISTINCT json_extract_string(e.properties, '$.sku')) AS value
    FROM events e JOIN event_profiles ep ON ep.source = e.source AND ep.message_id = e.message_id
    WHERE e.timestamp > $as_of - INTERVAL 30 DAY
    GROUP BY ep.profile_id

Checked with sqlglot (`storage.query.check_read_only`: one query, nothing that writes, reads files
or settings), then narrower: only `events` and `event_profiles`, no clock or random functions, the
outer SELECT names exactly `profile_id` and `value`. Point-in-time correctness is not trusted to
the author: every `events` is replaced by the events that had happened *and* been received by
`$as_of`, every `event_profiles` by the attributions of events that had happened by then.
"""

from __future__ import annotations

from sqlglot import exp

from refinery.errors import QueryError
from refinery.features.errors import FeatureSQLError
from refinery.storage.query import check_read_only

#: What a SQL feature may read.
TABLES = ("events", "event_profiles")
#: The evaluated moment, as written in a SQL feature.
MOMENT = "as_of"
_CLOCK = frozenset({"now", "current_timestamp", "current_date", "current_time", "today", "get_current_timestamp",
                    "get_current_time", "localtimestamp", "localtime", "transaction_timestamp", "random", "uuid",
                    "gen_random_uuid", "currenttimestamp", "currentdate", "currenttime", "rand"})


def check_sql(sql: str, dialect: str = "duckdb") -> exp.Query:
    """The checked SELECT (comments stripped, CTEs renamed), `$as_of` still in it; raises FeatureSQLError."""
    try:
        tree = check_read_only(sql, dialect)
    except QueryError as e:
        raise FeatureSQLError(f"The SQL feature was refused: {e.message}", fix=e.fix, field="sql") from None
    if not isinstance(tree, exp.Query):
        raise FeatureSQLError("A SQL feature is one SELECT.", fix="Write SELECT profile_id, value FROM ... GROUP BY profile_id.", field="sql")
    for table in tree.find_all(exp.Table):
        if not isinstance(table.this, exp.Identifier):
            raise FeatureSQLError("Table functions are not allowed in a SQL feature.", fix=f"Read {' and '.join(TABLES)} only.", field="sql")
        if table.name.lower() not in TABLES and not table.name.startswith("_cte"):
            raise FeatureSQLError(f"A SQL feature cannot read {table.name!r}: only events are known as of a past moment.",
                                  fix=f"Read {' and '.join(TABLES)} only (profile traits: use an expression feature or a computed trait).",
                                  field="sql")
    for node in tree.find_all(exp.Func):
        name = (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()
        if name.replace("_", "") in {c.replace("_", "") for c in _CLOCK} or isinstance(
                node, (exp.CurrentTimestamp, exp.CurrentDate, exp.CurrentTime, exp.Rand)):
            raise FeatureSQLError(f"{name}() would make the feature depend on when it runs, not on the moment asked for.",
                                  fix=f"Write ${MOMENT} for the evaluated moment, e.g. e.timestamp > ${MOMENT} - INTERVAL 30 DAY.",
                                  field="sql")
    for param in tree.find_all(exp.Placeholder, exp.Parameter):
        if param.name != MOMENT:
            raise FeatureSQLError(f"Unknown parameter {param.sql(dialect)!r} in the SQL feature.",
                                  fix=f"The only parameter is ${MOMENT}, the evaluated moment.", field="sql")
    names = [n.lower() for n in tree.named_selects]
    if names != ["profile_id", "value"]:
        raise FeatureSQLError(f"A SQL feature returns the columns profile_id and value; this one returns {', '.join(names) or 'none'}.",
                              fix="Select exactly two columns: ... AS profile_id, ... AS value.", field="sql")
    return tree


def as_of(tree: exp.Query, moment: exp.Expr) -> exp.Query:
    """`tree` reading only what was known at `moment`: `$as_of` is `moment`, `events` the events
    that had happened and been received by then, `event_profiles` the attributions of events that
    had happened by then. The tables keep their aliases."""
    tree = tree.copy()
    for node in list(tree.find_all(exp.Placeholder, exp.Parameter)):
        node.replace(moment.copy())
    for table in list(tree.find_all(exp.Table)):
        name = table.name.lower()
        if name not in TABLES:
            continue
        bounds = [exp.LTE(this=exp.column("timestamp"), expression=moment.copy())]
        if name == "events":
            bounds.append(exp.LTE(this=exp.column("received_at"), expression=moment.copy()))
        known = exp.select("*").from_(exp.to_table(name)).where(exp.and_(*bounds))
        table.replace(exp.Subquery(this=known, alias=exp.TableAlias(this=exp.to_identifier(table.alias_or_name))))
    return tree
