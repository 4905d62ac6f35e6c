"""The token bucket as a pure function of a clock: steady rate, burst, per-key isolation."""

from __future__ import annotations

import pytest

from refinery.api.ratelimit import RateLimiter
from refinery.errors import RateLimited


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_source_limit_allows_one_second_then_refuses_with_the_wait() -> None:
    clock = Clock()
    rl = RateLimiter(rate=1000, burst=5000, clock=clock)
    for _ in range(5):
        rl.take("s", 1, rate=5)
    with pytest.raises(RateLimited) as e:
        rl.take("s", 1, rate=5)
    assert e.value.retry_after == pytest.approx(0.2)
    clock.now += 0.2
    rl.take("s", 1, rate=5)


def test_cost_counts_events_and_a_batch_larger_than_the_burst_can_pass() -> None:
    clock = Clock()
    rl = RateLimiter(rate=1000, burst=5000, clock=clock)
    rl.take("s", 50, rate=5)  # a fresh bucket holds up to one request's cost
    with pytest.raises(RateLimited) as e:
        rl.take("s", 50, rate=5)
    assert e.value.retry_after == pytest.approx(10)
    clock.now += 10
    rl.take("s", 50, rate=5)


def test_keys_are_independent_and_default_uses_the_server_burst() -> None:
    clock = Clock()
    rl = RateLimiter(rate=10, burst=30, clock=clock)
    rl.take("a", 30)
    with pytest.raises(RateLimited):
        rl.take("a", 1)
    rl.take("b", 30)


def test_zero_rate_disables_the_limit() -> None:
    rl = RateLimiter(rate=0, burst=0, clock=Clock())
    for _ in range(1000):
        rl.take("s", 100)
