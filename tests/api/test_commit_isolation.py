"""`commit_isolating`: a commit that fails because of some items stores the rest and quarantines
those; a failure that is not about the items gives up after a bounded number of commits."""

from __future__ import annotations

import asyncio

import pytest

from refinery.api.collector import commit_isolating


class Store:
    """An in-memory store that refuses any commit holding an unquarantined poison item."""

    def __init__(self, broken: bool = False):
        self.rows: list[str] = []
        self.commits = 0
        self.broken = broken

    async def write(self, items: list[dict[str, object]]) -> list[str]:
        self.commits += 1
        if self.broken or any(it["poison"] and not it.get("quarantined") for it in items):
            raise RuntimeError("commit failed")
        self.rows.extend(str(it["id"]) for it in items)
        return ["failed" if it.get("quarantined") else "loaded" for it in items]


def quarantine(item: dict[str, object], error: Exception) -> None:
    item["quarantined"] = True


def items(n: int, poison: set[int]) -> list[dict[str, object]]:
    return [{"id": i, "poison": i in poison} for i in range(n)]


def test_no_failure_is_one_commit() -> None:
    store = Store()
    assert asyncio.run(commit_isolating(store.write, items(100, set()), quarantine)) == ["loaded"] * 100
    assert store.commits == 1


@pytest.mark.parametrize("poison", [{0}, {99}, {3, 70}, {10, 11, 12}])
def test_poison_items_are_quarantined_and_the_rest_stored_in_order(poison: set[int]) -> None:
    store = Store()
    outcomes = asyncio.run(commit_isolating(store.write, items(100, poison), quarantine))
    assert outcomes == ["failed" if i in poison else "loaded" for i in range(100)]
    assert sorted(map(int, store.rows)) == list(range(100)), "every item is stored once, poison ones as failed"
    assert store.commits < 20 * len(poison)


def test_a_failure_that_is_not_about_the_items_is_raised_after_a_bounded_number_of_commits() -> None:
    store = Store(broken=True)
    with pytest.raises(RuntimeError):
        asyncio.run(commit_isolating(store.write, items(2500, set()), quarantine, max_failures=64))
    assert store.commits <= 65
    assert store.rows == []
