"""The sign-in limit under a guesser who never stops."""

from __future__ import annotations

from station_ui.security import LockPolicy, SignInLimiter


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_guesser_who_keeps_going_for_days_stays_locked_out() -> None:
    """Each lock doubles up to the cap; the lock count itself grows without end while the
    guessing goes on. After about 1024 locks (3.6 days of guessing one badge) the doubling must
    not overflow: that raised on every failure and left the badge with no lock at all."""
    clock = _Clock()
    limiter = SignInLimiter(clock)
    policy = LockPolicy()
    for _ in range(2000 * policy.max_failures):
        clock.now += limiter.locked_for("badge:op-7") + 1
        limiter.fail("badge:op-7", policy)
    clock.now += limiter.locked_for("badge:op-7") + 1
    for _ in range(policy.max_failures - 1):
        assert limiter.fail("badge:op-7", policy) == 0
    assert limiter.fail("badge:op-7", policy) == policy.max_lock_s
    assert limiter.locked_for("badge:op-7") == policy.max_lock_s
