"""When a link decides that another client keeps taking its client id's session over, and when
it decides that this is over: pure logic, on a clock the tests move by hand."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from linesight.mqtt import (
    SHORT_SESSION_S,
    SHORT_SESSIONS_IN_A_ROW,
    LinkConfig,
    LostHow,
    TakeoverWatch,
    loss_after_refusals,
)

STABLE_S = 60.0


def _session(watch: TakeoverWatch, start: float, lasted: float, how: LostHow) -> bool:
    watch.connected(start)
    return watch.lost(start + lasted, how)


def test_session_taken_over_is_a_conflict_at_once_and_only_begins_once() -> None:
    watch = TakeoverWatch(STABLE_S)
    assert _session(watch, 0.0, 1000.0, "taken_over")
    assert watch.conflict == "taken_over"
    assert not _session(watch, 1030.0, 30.0, "taken_over")  # the same conflict, not a new one
    assert watch.conflict == "taken_over"


def test_connections_closed_soon_after_being_accepted_are_a_conflict_after_some_in_a_row() -> None:
    watch = TakeoverWatch(STABLE_S)
    now = 0.0
    for _ in range(SHORT_SESSIONS_IN_A_ROW - 1):
        assert not _session(watch, now, 0.5, "closed")
        now += 1.0
    assert watch.conflict is None
    assert _session(watch, now, 0.5, "closed")
    assert watch.conflict == "closed_soon"


def test_a_connection_that_lasted_resets_the_count() -> None:
    watch = TakeoverWatch(STABLE_S)
    now = 0.0
    for _ in range(SHORT_SESSIONS_IN_A_ROW - 1):
        _session(watch, now, 0.5, "closed")
        now += 1.0
    _session(watch, now, SHORT_SESSION_S + 1, "closed")  # a broker restart, say
    now += SHORT_SESSION_S + 2
    for _ in range(SHORT_SESSIONS_IN_A_ROW - 1):
        assert not _session(watch, now, 0.5, "closed")
        now += 1.0
    assert watch.conflict is None


def test_a_disconnect_the_broker_explained_otherwise_is_no_sign_and_resets_the_count() -> None:
    watch = TakeoverWatch(STABLE_S)
    now = 0.0
    for _ in range(SHORT_SESSIONS_IN_A_ROW - 1):
        _session(watch, now, 0.5, "closed")
        now += 1.0
    assert not _session(watch, now, 0.5, "other")
    now += 1.0
    assert not _session(watch, now, 0.5, "closed")
    assert watch.conflict is None


def test_a_loss_without_a_connection_counts_for_nothing() -> None:
    watch = TakeoverWatch(STABLE_S)
    for _ in range(SHORT_SESSIONS_IN_A_ROW + 1):
        assert not watch.lost(1.0, "closed")
    assert watch.conflict is None


def test_the_conflict_stands_while_connections_are_taken_before_they_last() -> None:
    watch = TakeoverWatch(STABLE_S)
    _session(watch, 0.0, 5.0, "taken_over")
    # Each twin backing off `takeover_retry_s`, each keeps the connection about that long.
    now = 35.0
    for _ in range(5):
        assert not watch.settle(now + 29.0)
        watch.connected(now)
        assert not watch.settle(now + STABLE_S - 1)
        watch.lost(now + STABLE_S - 1, "taken_over")
        now += STABLE_S + 30
    assert watch.conflict == "taken_over"


def test_the_conflict_is_over_once_a_connection_has_lasted_the_stable_time() -> None:
    watch = TakeoverWatch(STABLE_S)
    _session(watch, 0.0, 5.0, "taken_over")
    watch.connected(35.0)
    assert not watch.settle(35.0 + STABLE_S - 0.1)
    assert watch.settle(35.0 + STABLE_S)  # still connected: over all the same
    assert watch.conflict is None
    assert not watch.settle(35.0 + STABLE_S + 1)  # over once, reported once


def test_a_new_takeover_after_the_conflict_was_over_begins_a_new_one() -> None:
    watch = TakeoverWatch(STABLE_S)
    _session(watch, 0.0, 5.0, "taken_over")
    watch.connected(35.0)
    end = 35.0 + 2 * STABLE_S
    assert watch.settle(end)
    assert watch.lost(end, "taken_over")


def test_the_short_count_starts_again_after_a_conflict_ends() -> None:
    watch = TakeoverWatch(STABLE_S)
    now = 0.0
    for _ in range(SHORT_SESSIONS_IN_A_ROW):
        _session(watch, now, 0.5, "closed")
        now += 1.0
    watch.connected(now)
    assert watch.settle(now + STABLE_S)
    now += STABLE_S
    assert not watch.lost(now, "closed")  # lasted: no sign
    assert not _session(watch, now + 1, 0.5, "closed")
    assert watch.conflict is None


def test_the_stable_time_must_be_positive() -> None:
    with pytest.raises(ValueError, match="stable_s"):
        TakeoverWatch(0.0)


@pytest.mark.parametrize("value", [0, 0.05, 3601])
def test_takeover_retry_out_of_range_is_refused_with_its_name(value: float) -> None:
    with pytest.raises(ValidationError, match="takeover_retry_s"):
        LinkConfig(url="mqtt://127.0.0.1", client_id="s1", takeover_retry_s=value)


def test_takeover_retry_has_a_default() -> None:
    assert LinkConfig(url="mqtt://127.0.0.1", client_id="s1").takeover_retry_s == 30.0


def test_a_connect_the_broker_does_not_take_starts_the_run_of_short_sessions_again() -> None:
    """A broker that keeps crashing is down between its short sessions, so connects fail; a
    twin never stops this link from connecting. Only a run with no failed connect counts."""
    watch = TakeoverWatch(STABLE_S)
    now = 0.0
    for _ in range(3 * SHORT_SESSIONS_IN_A_ROW):
        for _ in range(SHORT_SESSIONS_IN_A_ROW - 1):
            assert not _session(watch, now, 0.5, "closed")
            now += 1.0
        watch.connect_failed()  # the broker restarting: connection refused
        now += 1.0
    assert watch.conflict is None


@pytest.mark.parametrize(
    ("how", "refused_here", "refusals_known", "counted"),
    [
        ("closed", True, True, "other"),  # the refusal's PUBACK was read on this connection
        ("closed", False, True, "other"),  # the close came before its PUBACK could be read
        ("closed", False, False, "closed"),  # nothing refused: a close soon after connecting
        ("taken_over", False, True, "taken_over"),  # the broker said so: a twin all the same
        ("other", False, True, "other"),
    ],
)
def test_a_close_while_the_broker_refuses_publishes_is_not_put_down_to_a_twin(
    how: LostHow, refused_here: bool, refusals_known: bool, counted: LostHow
) -> None:
    assert loss_after_refusals(how, refused_here, refusals_known) == counted


def test_closes_after_refusals_whose_puback_was_not_read_are_no_conflict() -> None:
    """Mosquitto closes the connection after each refused publish; when the socket fails before
    the PUBACK is read, only the refusal known from earlier tells why."""
    watch = TakeoverWatch(STABLE_S)
    now = 0.0
    for _ in range(SHORT_SESSIONS_IN_A_ROW + 2):
        _session(watch, now, 0.5, loss_after_refusals("closed", False, True))
        now += 1.0
    assert watch.conflict is None
