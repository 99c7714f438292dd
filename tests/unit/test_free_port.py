"""free_port() hands out ports the kernel never gives to anyone else on its own.

A port picked by binding port 0 comes from the ephemeral range, the same range every outgoing
connection's local port comes from: between the pick and the server's bind, any client on the
machine (a station connecting to its broker, under two test workers) could take it. CI saw it
once: a station's metrics port was taken between the two. Ports outside that range are only
ever taken by a program binding them by number."""

from __future__ import annotations

import random
import socket

import pytest

from linesight.broker import ephemeral_port_range, free_port, port_candidates


def test_candidates_lie_outside_the_ephemeral_range_and_above_the_fixed_ports() -> None:
    candidates = port_candidates((32768, 60999))
    assert candidates, "no candidates"
    assert all(16384 <= port < 32768 or 60999 < port <= 65535 for port in candidates)
    assert 16384 in candidates and 32767 in candidates and 61000 in candidates
    assert 65535 in candidates and 32768 not in candidates and 60999 not in candidates


def test_a_range_covering_every_port_leaves_no_candidates() -> None:
    assert port_candidates((1024, 65535)) == []


def test_the_machines_range_is_read_and_the_port_is_outside_it_and_bindable() -> None:
    low, high = ephemeral_port_range()
    assert 0 < low <= high <= 65535
    ports = {free_port(random.Random(seed)) for seed in range(20)}
    assert len(ports) > 1, "the pick is not random"
    for port in ports:
        assert not low <= port <= high
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


def test_a_taken_port_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        monkeypatch.setattr("linesight.broker.port_candidates", lambda _range: [taken, taken])
        # Every candidate taken: the kernel's own pick, as before.
        assert free_port(random.Random(1)) != taken
