"""`Compiled.realtime`: a `N ago` value in a comparison moves with the clock for every stored event
or trait, which the real-time evaluator's timers do not follow; in a window it is fine."""

from __future__ import annotations

from pathlib import Path

import pytest

from refinery.segments.compile import CompileContext, build_catalog, compile_rule
from refinery.segments.realtime import NotRealtime, RealtimeSegments
from support import event, fresh_runtime, write_events

MOVING = [
    "performed 'Order Completed' where timestamp > 3 days ago",
    "signed_up < 30 days ago",
    "count(event = 'Order Completed' and timestamp > 2 days ago) >= 1",
    "'Order Completed' where timestamp < 1 day ago then 'Order Completed' within 1 day",
]
WINDOWED = ["performed 'Order Completed' in last 3 days", "performed 'Order Completed' between 30 days ago and 7 days ago"]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> CompileContext:
    with fresh_runtime(Path(tmp_path_factory.mktemp("rt"))) as rt:
        write_events(rt, event("track", userId="u", event="Order Completed", properties={"total": 3}),
                     event("identify", userId="u", traits={"signed_up": "2026-01-01T00:00:00Z"}))
        return CompileContext(catalog=build_catalog(rt.engine), segments={}, computed_traits={})


@pytest.mark.parametrize("rule", MOVING)
def test_ago_in_a_comparison_is_not_real_time(ctx: CompileContext, rule: str) -> None:
    assert compile_rule(rule, ctx).realtime is False


@pytest.mark.parametrize("rule", WINDOWED)
def test_ago_in_a_window_is_real_time_and_the_evaluator_takes_it(ctx: CompileContext, rule: str) -> None:
    compiled = compile_rule(rule, ctx)
    assert compiled.realtime is True
    live = RealtimeSegments()
    try:
        live.add("s", compiled)
    except NotRealtime as e:  # pragma: no cover - the failure this test exists to catch
        pytest.fail(f"the evaluator refuses a rule the compiler calls real time: {e}")
