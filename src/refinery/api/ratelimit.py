"""Per-source token buckets: a steady rate with a burst, refusing with 429 and Retry-After.

A source without its own limit uses the server default (`rate_limit_per_second` with
`rate_limit_burst`). A source with its own `rate_limit_per_second` gets a burst of one second of
that rate, so the limit it was given is the limit it sees. A single request larger than the burst
is never refused forever: the bucket may hold up to that request's cost.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from refinery.errors import RateLimited


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str, cost: int, rate: float | None = None) -> None:
        """Spend `cost` tokens for `key` or raise RateLimited saying when to retry."""
        if rate is None:
            r, burst = self.rate, self.burst
        else:
            r, burst = rate, rate
        if r <= 0:
            return
        burst = max(burst, float(cost))
        now = self._clock()
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(burst, now)
        b.tokens = min(burst, b.tokens + (now - b.updated) * r)
        b.updated = now
        if b.tokens >= cost:
            b.tokens -= cost
            return
        wait = (cost - b.tokens) / r
        raise RateLimited(
            f"Source {key!r} is over its rate limit of {r:g} events/s.",
            retry_after=wait,
            fix="Retry after the Retry-After header's seconds, or raise the source's rate_limit_per_second.",
            reason="rate_limited",
        )
