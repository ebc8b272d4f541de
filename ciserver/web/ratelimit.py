"""A small in-process sliding-window rate limiter for the public endpoints."""

from __future__ import annotations

import time
from collections import deque

# Hits are counted in slots of window / SLOTS seconds: a key holds at most SLOTS + 1 entries
# however many hits it takes (a day's invite allowance per mailbox would otherwise keep one
# timestamp per invite for a day). The window slides by slots, so a hit may expire up to one
# slot early.
SLOTS = 24


class RateLimiter:
    """At most ``limit`` hits per ``window`` seconds per key (0 = unlimited)."""

    def __init__(self, limit: int, window: float, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.slot = window / SLOTS
        self.max_keys = max_keys
        self.hits: dict[str, deque[list[float]]] = {}  # key -> [[slot start, hits], ...]
        self.totals: dict[str, int] = {}

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
            self.totals[key] = 0
        total = self.totals[key]
        while q and q[0][0] <= now - self.window:
            total -= int(q.popleft()[1])
        self.totals[key] = total
        if total + n > self.limit:
            if n > self.limit:  # can never fit: wait a whole window
                return self.window
            need, freed = total + n - self.limit, 0
            for start, count in q:  # the oldest slots that must expire first
                freed += int(count)
                if freed >= need:
                    return max(0.0, start + self.window - now)
            return self.window
        if q and now - q[-1][0] < self.slot:
            q[-1][1] += n
        else:
            q.append([now, n])
        self.totals[key] = total + n
        return 0.0

    def _prune(self, now: float) -> None:
        for key in [k for k, q in self.hits.items()
                    if not q or q[-1][0] <= now - self.window]:
            del self.hits[key], self.totals[key]
        if len(self.hits) >= self.max_keys:  # still full: forget the oldest half
            for key in list(self.hits)[: self.max_keys // 2]:
                del self.hits[key], self.totals[key]
