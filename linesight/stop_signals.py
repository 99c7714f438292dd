"""Stop signals for the commands that run a line of their own (`linesight demo`, `linesight
sim`): the first Ctrl-C, SIGTERM or SIGHUP ends the run and every piece is stopped, and no
further signal may cut that stop short (the pieces run in sessions of their own, or in threads
that a killed interpreter would leave half done)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(BaseException):  # noqa: N818 - a signal, not an error
    # BaseException, like KeyboardInterrupt: no `except Exception` on the way may swallow it.
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """A handler for Ctrl-C, SIGTERM and SIGHUP in a command that runs pieces it must stop.

    The first one ends the run (KeyboardInterrupt for Ctrl-C, else Stopped) and the pieces are
    stopped; any further one, and any while they stop, only gets a "please wait".
    """

    def __init__(self) -> None:
        self.stopping = False
        self._told = False

    def __call__(self, signum: int, frame: object) -> None:
        if not self.stopping:
            self.stopping = True
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise Stopped(signum)
        if not self._told:
            self._told = True
            # Not print(): the handler may run in the middle of another print to stdout.
            with contextlib.suppress(OSError, ValueError):
                os.write(sys.stdout.fileno(), b"\nstopping, please wait ...\n")


@contextlib.contextmanager
def hold_signals() -> Iterator[None]:
    """Within the block, stop signals are only noted (in the main thread; elsewhere Python
    delivers none)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # The command's handler when it is there, so "please wait" is said once in all.
    current = signal.getsignal(signal.SIGINT)
    noted = current if isinstance(current, StopSignals) else StopSignals()
    noted.stopping = True
    previous = {sig: signal.signal(sig, noted) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Within the block, a stop signal is only noted; when the block ends it is raised again,
    for the handler that was there before (in the main thread; elsewhere Python delivers none)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _: arrived.append(signum))
                for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if arrived:
            signal.raise_signal(arrived[0])
