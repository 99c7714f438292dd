"""The outbox under kill -9: a real child process enqueues until SIGKILL, then the store reopens."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from edge_agent.store import StationStore
from linesight import protocol as p

STATION = "st-crash"
# Prints each seq only after enqueue has returned, so every printed seq was committed.
CHILD = textwrap.dedent(
    """
    import sys
    from edge_agent.store import StationStore
    from linesight import protocol as p

    topic = p.Topics().station("st-crash", p.Channel.DECISION)

    def build(seq):
        return p.Decision(
            station="st-crash", seq=seq, part_id=f"part-{seq}",
            decided_by=p.DecidedBy.OPERATOR, label=None, action=p.Action.REVIEW,
            review_reason=p.ReviewReason.HUMAN_ONLY, model=None, latency_ms=0.0,
            automation=p.AutomationLevel.HUMAN_ONLY, mode=p.DeploymentMode.NONE,
        )

    store = StationStore(sys.argv[1])
    print("ready", flush=True)
    while True:
        message = store.enqueue(topic, 1, build)
        print(message.seq, flush=True)
    """
)
ROUNDS = 3


def run_and_kill(data_dir: Path, rng: random.Random) -> list[int]:
    """Start a child enqueuing into `data_dir`, SIGKILL it at a random moment, return its seqs."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        first = child.stdout.readline()
        assert first == b"ready\n", child.stderr.read() if child.stderr else first
        time.sleep(rng.uniform(0.2, 0.8))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        # Not communicate(): it reads the pipe itself and would miss what readline() above
        # already buffered (seqs printed before the parent got to read "ready").
        assert child.stderr is not None
        out, err = child.stdout.read(), child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for pipe in (child.stdout, child.stderr):
            if pipe is not None:
                pipe.close()
    assert child.returncode == -signal.SIGKILL, err.decode(errors="replace")
    # A line cut short by the kill was never reported as returned; only whole lines count.
    whole = out.split(b"\n")[:-1]
    return [int(line) for line in whole]


def test_every_returned_enqueue_survives_sigkill(tmp_data_dir: Path) -> None:
    rng = random.Random()  # a different kill point each run; the seed is in the failure message
    seed = rng.randrange(2**32)
    rng.seed(seed)
    reported_total = 0
    expected_first = 0
    for round_no in range(ROUNDS):
        reported = run_and_kill(tmp_data_dir, rng)
        assert reported, f"seed {seed}: round {round_no} enqueued nothing before the kill"
        reported_total += len(reported)
        assert reported[0] == expected_first, f"seed {seed}: seq did not continue"
        with StationStore(tmp_data_dir) as store:
            rows = store.pending(limit=1_000_000)
            seqs = [row.seq for row in rows]
            last = store.last_seq()
            # Every seq the child saw returned is on disk; at most one more committed unseen.
            assert set(reported) <= set(seqs), f"seed {seed}: lost {set(reported) - set(seqs)}"
            assert seqs == list(range(len(seqs))), f"seed {seed}: seqs not contiguous from 0"
            assert last == seqs[-1] and last - reported[-1] in (0, 1), f"seed {seed}"
            for row in rows:
                assert p.parse(p.Decision, row.payload).seq == row.seq
            assert store.outbox_depth() == len(seqs)
            expected_first = last + 1
    assert reported_total > ROUNDS

    with StationStore(tmp_data_dir) as store:
        last = store.last_seq()
        topic = p.Topics().station(STATION, p.Channel.DECISION)
        following = store.enqueue(
            topic,
            1,
            lambda seq: p.Decision(
                station=STATION,
                seq=seq,
                part_id="after-crash",
                decided_by=p.DecidedBy.OPERATOR,
                label=None,
                action=p.Action.REVIEW,
                review_reason=p.ReviewReason.HUMAN_ONLY,
                model=None,
                latency_ms=0.0,
                automation=p.AutomationLevel.HUMAN_ONLY,
                mode=p.DeploymentMode.NONE,
            ),
        )
        assert following.seq == last + 1
