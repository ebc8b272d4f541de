"""The public endpoints' rate limiter: sliding window, several hits at once, bounded memory."""

from __future__ import annotations

from ciserver.web.ratelimit import SLOTS, RateLimiter


def test_limit_window_and_wait() -> None:
    rl = RateLimiter(3, 60.0)
    assert [rl.hit("a", now=t) for t in (0.0, 10.0, 20.0)] == [0.0, 0.0, 0.0]
    assert rl.hit("a", now=30.0) == 30.0  # the hit at 0 expires at 60
    assert rl.hit("b", now=30.0) == 0.0  # keys are apart
    assert rl.hit("a", now=60.5) == 0.0
    assert RateLimiter(0, 60.0).hit("a") == 0.0  # 0 = unlimited


def test_several_hits_at_once_fit_whole_or_not_at_all() -> None:
    rl = RateLimiter(5, 100.0)
    assert rl.hit("m", now=0.0, n=4) == 0.0
    assert rl.hit("m", now=50.0, n=2) == 50.0  # refused whole, nothing recorded
    assert rl.hit("m", now=50.0, n=1) == 0.0  # the fifth
    assert rl.hit("m", now=60.0, n=6) == 100.0  # can never fit
    assert rl.hit("m", now=101.0, n=4) == 0.0  # the first four expired; 1 + 4 = 5


def test_memory_per_key_is_bounded_by_slots() -> None:
    rl = RateLimiter(1_000_000, 86_400.0)
    for i in range(100_000):
        assert rl.hit("fan@example.com", now=i * 0.8, n=3) == 0.0
    assert len(rl.hits["fan@example.com"]) <= SLOTS + 1
    assert rl.totals["fan@example.com"] <= 300_000


def test_keys_beyond_the_maximum_are_pruned() -> None:
    rl = RateLimiter(5, 10.0, max_keys=100)
    for i in range(100):
        rl.hit(f"k{i}", now=0.0)
    rl.hit("late", now=20.0)  # the old keys' windows are over: they go
    assert list(rl.hits) == ["late"] and list(rl.totals) == ["late"]
    for i in range(150):
        rl.hit(f"x{i}", now=21.0)
    assert len(rl.hits) <= 100 and set(rl.hits) == set(rl.totals)
