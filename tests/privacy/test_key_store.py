"""The key store's fetches (privacy/keys.py): misses read in one query per call (any number of keys,
in any order, with repeats), a bulk read not remembered in the cache, destroyed keys left out."""

from __future__ import annotations

import os
from pathlib import Path

from refinery.privacy.keys import KeyStore, seal, unseal


def test_many_keys_in_one_call(tmp_path: Path) -> None:
    master = os.urandom(32)
    store = KeyStore(tmp_path / "keys.sqlite", master, cache_size=1_000)
    ids = [f"sk_{i:032x}" for i in range(40_000)]  # more than SQLite's bound-variable limit
    made = store.get(ids, create=True)
    sealed = {k: seal(made[k], k.encode(), k.encode()) for k in ids[::997]}
    store.close()

    again = KeyStore(tmp_path / "keys.sqlite", master, cache_size=1_000)  # a cold cache: every key read from the file
    asked = [*reversed(ids), *ids[:50]]  # any order, repeats
    got = again.get(asked, create=False)
    assert set(got) == set(ids)
    assert all(unseal(got[k], data, k.encode()) == k.encode() for k, data in sealed.items())
    assert len(again._cache) == 0  # a bulk read (more than a quarter of the cache) is not remembered

    few = again.get(ids[:10], create=False)
    assert len(few) == 10 and set(again._cache) == set(ids[:10])  # a small read is
    assert again.destroy(ids[:5]) == 5
    left = again.get([*ids[:10], "sk_never_made"], create=False)
    assert set(left) == set(ids[5:10])  # destroyed (and unknown) keys are absent, from the cache too
    again.close()
