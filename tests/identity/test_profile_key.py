"""A profile is keyed by its oldest identifier: (first_seen, type priority, type, value), exactly,
including ties on time and priority (two emails in one event), whatever the node ids are."""

from __future__ import annotations

import hashlib

from identity_helpers import Identity, event


def _pid(kind: str, value: str) -> str:
    return "prof_" + hashlib.md5(f"{kind}:{value}".encode()).hexdigest()[:24]  # noqa: S324 - an id, not security


def test_ties_on_time_and_priority_are_broken_by_value(ident: Identity) -> None:
    values = [f"{c}{i}@shop.io" for i in range(6) for c in "zyx"]
    for i in range(0, len(values), 2):
        ident.send(event("track", event="Viewed", minutes=0, anonymousId=f"a{i}",
                         traits={"email": values[i]}, context={"traits": {"email": values[i + 1]}}))
    # Chain the pairs into one profile with later events: the oldest pair decides.
    for i in range(0, len(values) - 2, 2):
        ident.send(event("track", event="Viewed", minutes=5, anonymousId=f"b{i}", traits={"email": values[i + 1]}, context={"traits": {"email": values[i + 2]}}))
    ident.resolve()
    # Values compare in their stored form: tokens, when pseudonymising.
    assert {ident.profile("email", v) for v in values} == {_pid("email", min(ident.stored("email", v) for v in values))}


def test_priority_then_type_then_time(ident: Identity) -> None:
    ident.send(event(anonymousId="cookie", userId="u1", minutes=3), event(anonymousId="cookie", traits={"email": "e@shop.io"}, minutes=1))
    ident.resolve()
    # The email was seen first (minute 1), so it keys the profile, though a user id ranks higher.
    assert ident.profile("user_id", "u1") == _pid("email", ident.stored("email", "e@shop.io"))
    ident.send(event(userId="u2", anonymousId="c2", traits={"email": "f@shop.io"}, minutes=0))
    ident.resolve()
    assert ident.profile("email", "f@shop.io") == _pid("user_id", "u2")
