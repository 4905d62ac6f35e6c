"""Per-source token buckets: a steady rate with a burst, refusing with 429 and Retry-After."""

from __future__ import annotations

import time
from dataclasses import dataclass

from refinery.errors import RateLimited


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, rate: float, burst: float, clock: object = time.monotonic):
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str, cost: int, rate: float | None = None) -> None:
        """Spend `cost` tokens for `key` or raise RateLimited saying when to retry."""
        r = self.rate if rate is None else rate
        if r <= 0:
            return
        burst = max(self.burst if rate is None else max(self.burst, r), float(cost))
        now = self._clock()  # type: ignore[operator]
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
            fix="Retry after the Retry-After header's seconds, or raise the source's rate limit.",
        )
