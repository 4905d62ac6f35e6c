"""The segments catalog is cached per store (building it reads every event's keys), and a rule that
names something newer than the cached catalog still compiles: the cache is rebuilt once, at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from refinery.segments import store
from refinery.segments.catalog import cached_catalog
from refinery.segments.errors import UnknownNameError
from support import event, fresh_runtime, write_events


def test_the_catalog_is_reused_and_a_new_name_is_found_without_waiting(tmp_path: Path) -> None:
    with fresh_runtime(tmp_path) as rt:
        write_events(rt, event("track", userId="u1", event="Order Completed", properties={"total": 5}))
        first = cached_catalog(rt.engine)
        assert cached_catalog(rt.engine) is first  # nothing changed: the same object

        # A new property arrives; within the cache's minute the cached catalog does not know it...
        write_events(rt, event("track", userId="u2", event="Order Completed", properties={"total": 9, "coupon": "X"}))
        assert cached_catalog(rt.engine) is first and "coupon" not in first.events["Order Completed"]
        # ...yet a rule naming it compiles: the store retries with a fresh catalog.
        compiled = store.compile_text(rt.engine, "performed 'Order Completed' where coupon = 'X'")
        assert compiled.realtime is not None
        assert "coupon" in cached_catalog(rt.engine).events["Order Completed"]
        # A name nobody sent is still an error, with its suggestion.
        with pytest.raises(UnknownNameError, match="did you mean 'coupon'"):
            store.compile_text(rt.engine, "performed 'Order Completed' where coupn = 'X'")
