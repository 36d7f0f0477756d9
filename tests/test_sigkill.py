"""SIGKILL a sync-mode writer at random moments; every acknowledged commit must survive.

Default 200 kills (WALSTORE_KILLS overrides). Seeded: a failure prints the seed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from killwriter import state_after

import walstore

KILLS = int(os.environ.get("WALSTORE_KILLS", "200"))
HERE = Path(__file__).parent


def run_until_killed(path: Path, delay: float) -> tuple[int, int, int]:
    """Start the writer, SIGKILL it after `delay` s; return (resumed_at, last_attempted, last_acked)."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "killwriter.py"), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=HERE,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.split())
            ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not ready.wait(30):
        proc.kill()
        raise AssertionError(f"writer did not start: {proc.stderr.read() if proc.stderr else ''}")
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join(10)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr.read() if proc.stderr else "")
    resumed = int(lines[0][1])
    attempted = max((int(n) for tag, n in lines if tag == "A"), default=resumed - 1)
    acked = max((int(n) for tag, n in lines if tag == "K"), default=resumed - 1)
    return resumed, attempted, acked


def test_sigkill_never_loses_an_acknowledged_commit(tmp_path: Path) -> None:
    seed = int(os.environ.get("WALSTORE_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    path = tmp_path / "db"
    walstore.open(path, segment_size=1 << 14).close()
    durable_next = 0
    torn_tails = 0
    for kill in range(KILLS):
        delay = rng.choice([0.0, 0.001, 0.005, 0.02, 0.05, rng.random() * 0.1])
        resumed, attempted, acked = run_until_killed(path, delay)
        ctx = f"seed={seed} kill={kill} delay={delay} resumed={resumed} attempted={attempted} acked={acked}"
        assert resumed == durable_next, ctx
        with walstore.open(path, segment_size=1 << 14) as db:
            n = db.get("next", 0)
            assert acked + 1 <= n <= attempted + 1, f"{ctx}: state holds {n} commits"
            assert db.to_dict() == state_after(n), f"{ctx}: not the state after a prefix of commits"
            torn_tails += db.recovery.torn_tail is not None
        durable_next = n
    assert durable_next > 0
    print(f"{KILLS} kills, {durable_next} commits survived, {torn_tails} torn tails cut (seed {seed})")
