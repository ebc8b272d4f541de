"""A small in-process sliding-window rate limiter for the public endpoints."""

from __future__ import annotations

import time
from collections import deque


class RateLimiter:
    """At most ``limit`` hits per ``window`` seconds per key (0 = unlimited)."""

    def __init__(self, limit: int, window: float, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self.hits: dict[str, deque[float]] = {}

    def hit(self, key: str, now: float | None = None, n: int = 1) -> float:
        """Record ``n`` hits at once; returns 0 if all are allowed (and records them), else
        the seconds until they would be (and records none)."""
        if self.limit <= 0 or n <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        q = self.hits.get(key)
        if q is None:
            if len(self.hits) >= self.max_keys:
                self._prune(now)
            q = self.hits[key] = deque()
        while q and q[0] <= now - self.window:
            q.popleft()
        if len(q) + n > self.limit:
            if n > self.limit:  # can never fit: wait a whole window
                return self.window
            return max(0.0, q[len(q) + n - self.limit - 1] + self.window - now)
        q.extend([now] * n)
        return 0.0

    def _prune(self, now: float) -> None:
        for key in [k for k, q in self.hits.items() if not q or q[-1] <= now - self.window]:
            del self.hits[key]
        if len(self.hits) >= self.max_keys:  # still full: forget the oldest half
            for key in list(self.hits)[: self.max_keys // 2]:
                del self.hits[key]
