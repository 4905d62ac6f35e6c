"""Stable profile ids: re-running changes nothing, ids survive new data, merges and splits are
recorded, and the result does not depend on the order events arrived in."""

from __future__ import annotations

import random
from pathlib import Path

from identity_helpers import Identity, event

from refinery.runtime import Runtime
from refinery.settings import Settings


def test_rerun_changes_nothing(ident: Identity) -> None:
    ident.send(event(anonymousId="a1", userId="u1", traits={"email": "x@shop.io"}), event(anonymousId="fam", userId="u1"),
               event(anonymousId="fam", userId="u2"), event(userId="undefined"))
    ident.resolve()
    tables = ("identities", "identity_edges", "identity_blocked", "profile_merges")
    before = {t: sorted(map(str, ident.rows(f"SELECT * FROM {t}"))) for t in tables}  # noqa: S608 - constant names
    report = ident.resolve()
    assert (report.merges, report.unmerges) == (0, 0)
    assert {t: sorted(map(str, ident.rows(f"SELECT * FROM {t}"))) for t in tables} == before  # noqa: S608


def test_ids_survive_new_data_and_merges_are_recorded_then_undone(ident: Identity) -> None:
    ident.send(event(anonymousId="laptop", userId="u1", minutes=0), event("page", anonymousId="phone", minutes=1))
    ident.resolve()
    known, anonymous = ident.profile("user_id", "u1"), ident.profile("anonymous_id", "phone")
    assert known != anonymous

    # New data: the phone logs in. The older profile survives; the merge is recorded with its evidence.
    ident.send(event(anonymousId="phone", userId="u1", minutes=2), event(anonymousId="tablet", userId="u1", minutes=3))
    report = ident.resolve()
    assert report.merges == 1
    assert ident.profile("user_id", "u1") == ident.profile("anonymous_id", "phone") == known
    [merge] = ident.rows("SELECT * FROM profile_merges")
    assert (merge["surviving_profile_id"], merge["merged_profile_id"], merge["undone_at"]) == (known, anonymous, None)
    assert '"b_value":"phone"' in merge["evidence"] and '"a_value":"u1"' in merge["evidence"]

    # Someone else logs in on that phone: it is now shared, leaves u1, and its old profile id returns.
    ident.send(event(anonymousId="phone", userId="u2", minutes=4))
    report = ident.resolve()
    assert report.unmerges == 1
    assert ident.profile("anonymous_id", "phone") == anonymous
    assert ident.profile("user_id", "u1") == known
    [merge] = ident.rows("SELECT * FROM profile_merges")
    assert merge["undone_at"] is not None and merge["undone_reason"].startswith("split")


def test_order_of_arrival_does_not_matter(tmp_path: Path) -> None:
    events = [event(anonymousId=f"a{i % 7}", userId=f"u{i % 5}" if i % 3 else None,
                    traits={"email": f"p{i % 4}@shop.io"} if i % 2 else {}, minutes=i) for i in range(60)]
    events += [event("alias", previousId="u1", userId="u2", minutes=61), event(anonymousId="k", userId="u3", minutes=62)]
    results = []
    for seed in (1, 2, 3):
        shuffled = events[:]
        random.Random(seed).shuffle(shuffled)
        rt = Runtime.open(Settings(data_dir=tmp_path / f"d{seed}", admin_token="t"))
        try:
            ident = Identity(rt)
            for i in range(0, len(shuffled), 9):
                ident.send(*shuffled[i:i + 9])
            ident.resolve()
            results.append((ident.assignment(), sorted(map(str, ident.rows(
                "SELECT kind, reason, identifier_type, value, other_value, profile_a, profile_b FROM identity_blocked")))))
        finally:
            rt.close()
    assert results[0] == results[1] == results[2]
    assert len(set(results[0][0].values())) > 1
