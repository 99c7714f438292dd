"""The sign-in limit under a guesser who never stops."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from edge_agent.store import StationStore
from station_ui import auth
from station_ui.security import LockPolicy, SignInLimiter, verify_pin
from tests.support import wait_for
from tests.unit.test_station_ui import (
    _HASHES,
    OPERATOR_PIN,
    SUPERVISOR_PIN,
    FakeClock,
    csrf_of,
    make_app,
)


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


# --- sign-ins sent at once ---------------------------------------------------------------------
# The server answers on several threads, so a guesser can send many sign-ins at the same moment.
# Each PIN check below is counted and then held until every sign-in sent is either in its check
# or answered: all of them race the limit, whatever the scheduling, and the count says how many
# PINs were tried against the store.


class _HeldPinChecks:
    """The real PIN check, counted, and held until `release`."""

    def __init__(self) -> None:
        self.checked = 0
        self._released = False
        self._change = threading.Condition()

    def __call__(self, pin: str, stored: str) -> bool:
        with self._change:
            self.checked += 1
            self._change.wait_for(lambda: self._released, timeout=60)
        return verify_pin(pin, stored)

    def release(self) -> None:
        with self._change:
            self._released = True
            self._change.notify_all()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    store = StationStore(tmp_path / "data")
    store.upsert_operator("op-7", "Ana Operator", "operator", _HASHES[OPERATOR_PIN])
    store.upsert_operator("sup-1", "Sam Supervisor", "supervisor", _HASHES[SUPERVISOR_PIN])
    yield make_app(store, FakeClock())
    store.close()


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> _HeldPinChecks:
    checks = _HeldPinChecks()
    monkeypatch.setattr(auth, "verify_pin", checks)
    return checks


def _send_at_once(
    app: Flask, held: _HeldPinChecks, attempts: list[tuple[str, str]], *, checked: int
) -> list[int]:
    """Each (badge, PIN) from its own browser, all at once; released once `checked` PIN checks
    are held and every other sign-in is answered. The statuses, in the order given."""
    browsers = [app.test_client() for _ in attempts]
    tokens = [csrf_of(browser) for browser in browsers]
    statuses: list[int] = [0] * len(attempts)

    def send(n: int) -> None:
        badge, pin = attempts[n]
        form = {"badge": badge, "pin": pin, "csrf_token": tokens[n]}
        statuses[n] = browsers[n].post("/login", data=form).status_code

    threads = [threading.Thread(target=send, args=(n,)) for n in range(len(attempts))]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: held.checked + sum(map(bool, statuses)) >= len(attempts), 60,
                 "every sign-in to be in its PIN check or answered")
        assert held.checked == checked, f"{held.checked} PINs checked, {checked} expected"
    finally:
        held.release()
        for thread in threads:
            thread.join(timeout=60)
    return statuses


def test_wrong_pins_sent_at_once_get_no_more_checks_than_the_limit(
    app: Flask, held: _HeldPinChecks
) -> None:
    """16 wrong PINs at once for one badge: 5 are checked, the 5th failure locks the badge and
    the other 11 wait for the lock unchecked (the check and the count were two steps, so every
    one of the 16 was checked before the first failure was counted)."""
    statuses = _send_at_once(app, held, [("op-7", "1111")] * 16, checked=5)
    assert sorted(statuses) == [401] * 4 + [429] * 12
    browser = app.test_client()
    form = {"badge": "op-7", "pin": OPERATOR_PIN, "csrf_token": csrf_of(browser)}
    assert browser.post("/login", data=form).status_code == 429  # locked, even the right PIN


def test_the_right_pin_sent_while_the_limit_is_being_checked_waits_for_the_lock(
    app: Flask, held: _HeldPinChecks
) -> None:
    """Five wrong PINs in their check hold every try the badge has left: the right PIN sent
    meanwhile is not checked, and the five failures lock the badge. (The right PIN goes once
    the five are in their check: sent with them, it may reach the limit first and be one of
    the five checked, which is the limit working too.)"""
    wrong = [app.test_client() for _ in range(5)]
    tokens = [csrf_of(browser) for browser in wrong]
    statuses: list[int] = [0] * 5

    def send(n: int) -> None:
        form = {"badge": "op-7", "pin": "1111", "csrf_token": tokens[n]}
        statuses[n] = wrong[n].post("/login", data=form).status_code

    right = app.test_client()
    right_form = {"badge": "op-7", "pin": OPERATOR_PIN, "csrf_token": csrf_of(right)}
    right_status: list[int] = []
    threads = [threading.Thread(target=send, args=(n,)) for n in range(5)]
    threads.append(threading.Thread(
        target=lambda: right_status.append(right.post("/login", data=right_form).status_code)))
    for thread in threads[:5]:
        thread.start()
    try:
        wait_for(lambda: held.checked == 5, 60, "the five wrong PINs in their check")
        threads[5].start()
        time.sleep(0.2)  # the right PIN at the limit (a check it got would be a 6th)
        assert held.checked == 5, "the right PIN was checked beside the five"
    finally:
        held.release()
        for thread in threads:
            if thread.is_alive() or thread.ident is not None:
                thread.join(timeout=60)
    assert held.checked == 5
    assert right_status == [429]
    assert sorted(statuses) == [401] * 4 + [429]


def test_sign_ins_within_the_limit_are_checked_side_by_side(
    app: Flask, held: _HeldPinChecks
) -> None:
    """The limit is kept without one slow PIN check holding up the others: both PINs are in
    their check at once, and both operators sign in."""
    statuses = _send_at_once(app, held, [("op-7", OPERATOR_PIN), ("sup-1", SUPERVISOR_PIN)],
                             checked=2)
    assert statuses == [302, 302]


def test_a_sign_in_the_store_cannot_check_gives_its_try_back(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store locked past its busy timeout answers 503 and counts as no try: otherwise five
    such sign-ins would hold the badge's tries for ever and lock its operator out."""
    store = app.extensions["station_ui"].store

    def locked(badge: str) -> None:
        raise sqlite3.OperationalError("database is locked")

    browser = app.test_client()
    with monkeypatch.context() as patched:
        patched.setattr(store, "operator", locked)
        for _ in range(LockPolicy().max_failures + 1):
            form = {"badge": "op-7", "pin": OPERATOR_PIN, "csrf_token": csrf_of(browser)}
            assert browser.post("/login", data=form).status_code == 503
    form = {"badge": "op-7", "pin": OPERATOR_PIN, "csrf_token": csrf_of(browser)}
    assert browser.post("/login", data=form).status_code == 302


def test_tries_in_progress_count_against_the_limit_until_settled() -> None:
    clock = _Clock()
    limiter = SignInLimiter(clock)
    policy = LockPolicy(max_failures=3)
    limits = {"badge:op-7": policy}
    assert [limiter.begin(limits) for _ in range(4)] == [0, 0, 0, policy.first_lock_s]
    limiter.release("badge:op-7")  # the store failed: no failure
    assert limiter.begin(limits) == 0
    limiter.succeed("badge:op-7")  # the right PIN: the other two stay reserved
    assert [limiter.begin(limits) for _ in range(2)] == [0, policy.first_lock_s]
    assert [limiter.fail("badge:op-7", policy) for _ in range(3)] == [0, 0, policy.first_lock_s]
    assert limiter.begin(limits) == policy.first_lock_s


def test_one_locked_key_reserves_nothing_on_the_others() -> None:
    limiter = SignInLimiter(_Clock())
    badge, address = LockPolicy(max_failures=1), LockPolicy(max_failures=2)
    limiter.fail("badge:op-7", badge)
    assert limiter.begin({"badge:op-7": badge, "addr:10.0.0.9": address}) == badge.first_lock_s
    assert limiter.begin({"badge:sup-1": badge, "addr:10.0.0.9": address}) == 0
    assert limiter.begin({"badge:op-8": badge, "addr:10.0.0.9": address}) == 0
    assert limiter.begin({"badge:op-9": badge, "addr:10.0.0.9": address}) > 0  # address full
