"""After a reset, how many messages the link sends one at a time (pure logic)."""

from __future__ import annotations

from linesight.mqtt import owed_one_by_one


def test_a_reset_with_messages_on_the_wire_owes_them_one_at_a_time() -> None:
    assert owed_one_by_one(0, reset=True, unacknowledged=3000, window=1000) == 1000
    assert owed_one_by_one(0, reset=True, unacknowledged=40, window=1000) == 40


def test_a_close_without_a_reset_or_without_messages_owes_nothing_more() -> None:
    assert owed_one_by_one(0, reset=False, unacknowledged=3000, window=1000) == 0
    assert owed_one_by_one(0, reset=True, unacknowledged=0, window=1000) == 0
    assert owed_one_by_one(7, reset=False, unacknowledged=3000, window=1000) == 7


def test_what_is_still_owed_is_not_forgotten_by_a_smaller_reset() -> None:
    assert owed_one_by_one(500, reset=True, unacknowledged=20, window=1000) == 500
