"""`station.db` locked by another process for longer than SQLite's busy timeout (a backup tool,
an engineer's `sqlite3` shell left in a transaction): the station must lose no message. Real
agent with its relay process, real broker, a real second process holding the write lock."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from edge_agent.agent import Agent
from edge_agent.store import DB_FILE, DEFAULT_BUSY_TIMEOUT_S, StationStore
from linesight import protocol as p
from linesight.broker import Broker
from tests.support import Receipter, station_config, wait_for

PARTS = 150
# Holds the write lock until its stdin closes.
LOCKER = textwrap.dedent(
    """
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    sys.stdin.read()
    conn.execute("ROLLBACK")
    """
)


def test_a_store_locked_longer_than_the_busy_timeout_loses_no_decision(
    tmp_path: Path, broker: Broker
) -> None:
    receipter = Receipter(broker.url)
    config = station_config(tmp_path, broker.url, source="synthetic:seed=21,rate=30",
                            automation="full", max_parts=PARTS, outbox__receipt_wait_s=30)
    agent = Agent(config)
    finished = threading.Event()
    threading.Thread(target=lambda: (agent.run(), finished.set()), daemon=True).start()
    locker: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: len(receipter.stored.get("press-01", {})) >= 10, 30, "10 messages")
        locker = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(tmp_path / DB_FILE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        assert locker.stdout is not None and locker.stdout.readline() == b"locked\n"
        # The fault lasts longer than a writer waits for the lock.
        time.sleep(DEFAULT_BUSY_TIMEOUT_S + 2)
        assert locker.stdin is not None
        locker.stdin.close()
        assert locker.wait(10) == 0
        assert finished.wait(120), "the agent did not finish delivering"
        stored = receipter.stored["press-01"]
        decisions = [m for m in stored.values() if isinstance(m, p.Decision)]
        assert sorted(stored) == list(range(len(stored))), "seqs are contiguous"
        assert len({d.part_id for d in decisions}) == agent.parts_inspected == PARTS, (
            f"decisions lost while the store was locked; faults: {agent.faults}"
        )
    finally:
        if locker is not None:
            if locker.poll() is None:
                locker.kill()
                locker.wait(10)
            for pipe in (locker.stdin, locker.stdout):
                if pipe is not None:
                    pipe.close()
        agent.stop()
        finished.wait(30)
        receipter.close()
    with StationStore(tmp_path) as store:
        assert store.outbox_depth() == 0
