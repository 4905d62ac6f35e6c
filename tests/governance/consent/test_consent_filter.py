"""`ConsentService.allowed_filter` (the bulk check activation and exports use) against the rule in
plain Python and against the `profile_consent` relation, on random receipts over a random identity
graph in a real store: several identifiers per profile, identifiers of no profile, ties in time,
changes of mind, other purposes, opt-in and opt-out policies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlglot import exp

from refinery.governance.consent import (
    ConsentService,
    Signal,
    latest_per_identifier,
    profile_consent_relation,
    profile_state,
)
from refinery.governance.purposes import ConsentPolicy
from refinery.runtime import Runtime

T = datetime(2026, 1, 1, tzinfo=UTC)
PURPOSES = ("marketing", "analytics")
IDENTIFIERS = [("user_id", f"u{i}") for i in range(6)] + [("anonymous_id", f"a{i}") for i in range(6)]
PROFILES = [f"p{i}" for i in range(5)]

receipt = st.tuples(st.integers(0, len(IDENTIFIERS) - 1), st.sampled_from(PURPOSES), st.sampled_from(("granted", "denied")),
                    st.integers(0, 4))  # few distinct times: ties happen


def _load(rt: Runtime, owners: list[int | None], receipts: list[tuple[int, str, str, int]]) -> None:
    def write(e: object) -> None:
        eng = rt.engine
        eng.execute("DELETE FROM consent_log")
        eng.execute("DELETE FROM identities")
        for (kind, value), owner in zip(IDENTIFIERS, owners, strict=True):
            eng.execute("INSERT INTO identities (identifier_type, value, profile_id, status, first_seen, last_seen, event_count) "
                        "VALUES (?, ?, ?, 'linked', ?, ?, 1)", [kind, value, None if owner is None else PROFILES[owner], T, T])
        for n, (ident, purpose, state, minute) in enumerate(receipts, start=1):
            kind, value = IDENTIFIERS[ident]
            eng.execute("INSERT INTO consent_log (log_id, subject_type, subject_value, purpose, state, origin, source, chosen_at, "
                        "recorded_at) VALUES (?, ?, ?, ?, ?, 'api', 'api', ?, ?)",
                        [n, kind, value, purpose, state, T + timedelta(minutes=minute), T])

    rt.writer.call(write)


def _allowed(rt: Runtime, purpose: str, policy: ConsentPolicy, asked: list[str] = PROFILES, *, restricted: bool = False) -> set[str]:
    """The profiles among `asked` the filter lets through; `restricted`: with the identities of `asked` only
    (as delivery checks a batch), from a registered table."""
    cur = rt.engine.reader()
    idents = None
    if restricted:
        rows = rt.engine.fetch_arrow("SELECT identifier_type, value, profile_id FROM identities WHERE profile_id IN "
                                     "(SELECT unnest(CAST(? AS VARCHAR[])))", [asked], cursor=cur)
        rt.engine.register("_asked_identities", rows, cursor=cur)
        idents = exp.to_table("_asked_identities")
    cond = ConsentService.allowed_filter(exp.column("profile_id", table="p"), purpose, policy, identities=idents)
    query = exp.select("p.profile_id").from_(exp.Values(
        expressions=[exp.Tuple(expressions=[exp.Literal.string(p)]) for p in asked or ["none"]],
        alias=exp.TableAlias(this=exp.to_identifier("p"), columns=[exp.to_identifier("profile_id")]))).where(cond)
    try:
        return {str(r[0]) for r in rt.engine.fetch_all(query, cursor=cur)} & set(asked)
    finally:
        if restricted:
            rt.engine.unregister("_asked_identities", cursor=cur)


def _relation_states(rt: Runtime, purpose: str) -> dict[str, str]:
    query = exp.select("profile_id", "state").from_(exp.Subquery(this=profile_consent_relation(), alias=exp.TableAlias(
        this=exp.to_identifier("pc")))).where(exp.column("purpose").eq(exp.Literal.string(purpose)))
    return {str(p): str(s) for p, s in rt.engine.fetch_all(query, cursor=rt.engine.reader())}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(owners=st.lists(st.one_of(st.none(), st.integers(0, len(PROFILES) - 1)), min_size=len(IDENTIFIERS), max_size=len(IDENTIFIERS)),
       receipts=st.lists(receipt, max_size=25), asked=st.lists(st.sampled_from(PROFILES), unique=True))
def test_allowed_filter_agrees_with_the_rule_and_the_relation(runtime: Runtime, owners: list[int | None],
                                                              receipts: list[tuple[int, str, str, int]], asked: list[str]) -> None:
    _load(runtime, owners, receipts)
    signals = [Signal(IDENTIFIERS[i][0], IDENTIFIERS[i][1], purpose, state, T + timedelta(minutes=m), n)
               for n, (i, purpose, state, m) in enumerate(receipts, start=1)]
    latest = latest_per_identifier(signals)
    for purpose in PURPOSES:
        expected = {}
        for pid_index, pid in enumerate(PROFILES):
            mine = [s for (kind, value, _), s in latest.items()
                    if owners[IDENTIFIERS.index((kind, value))] == pid_index]
            expected[pid] = profile_state(purpose, mine).state
        relation = _relation_states(runtime, purpose)
        assert {p: relation.get(p, "unknown") for p in PROFILES} == expected
        for policy in (ConsentPolicy(), ConsentPolicy(frozenset({purpose}))):
            assert _allowed(runtime, purpose, policy) == {p for p in PROFILES if policy.allows(purpose, expected[p])}, (purpose, policy)
            # Restricted to a set of profiles' own identifiers (a delivery batch): the same answer for them.
            assert _allowed(runtime, purpose, policy, asked, restricted=True) == \
                {p for p in asked if policy.allows(purpose, expected[p])}, (purpose, policy, asked)
