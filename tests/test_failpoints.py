"""Named failpoints: a writer process SIGKILLed at each step of commit, roll, close, recovery.

For every name in walstore.failpoints.POINTS, a writer subprocess
(tests/crashcheck.py writer) runs with WALSTORE_FAILPOINT=<name>:<n>: small
segments so rolls happen, a close at the end, and for the recovery points a
store prepared with a torn tail. The test checks that the process died by
SIGKILL at that point, then reopens the store with each replay path and
checks the process-crash promise: every commit whose record was written is
there (a process crash loses nothing, in any durability mode), nothing later
is, and the store takes writes. A point added to POINTS without a scenario
here fails the test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from typing import Any

import crashcheck as cc
import pytest

import walstore
from walstore import failpoints
from walstore import format as fmt

SEG = 4096
COUNT = 40

# Per point family: (durability, count) runs. The count picks which pass through the point dies.
SCENARIOS: dict[str, list[tuple[str, int]]] = {
    "commit.": [("sync", 1), ("sync", 9), ("interval", 6)],
    "roll.": [("sync", 1), ("sync", 3)],
    "close.": [("sync", 1), ("none", 1)],
    "recovery.": [("sync", 1)],
    "commit.after_sync": [("sync", 1), ("sync", 9)],  # only a sync commit waits for the sync
}
# How many of the attempted commits a kill at the point leaves in the log.
WRITTEN = {
    "commit.before_write": -1,  # the commit in flight was not written
    "commit.after_write": 0,
    "commit.after_apply": 0,
    "commit.after_sync": 0,
}


def _cases() -> list[tuple[str, str, int]]:
    out = []
    for point in failpoints.POINTS:
        family = point.split(".")[0] + "."
        for mode, n in SCENARIOS.get(point, SCENARIOS.get(family, [("?", 0)])):
            out.append((point, mode, n))
    return out


def _reopen_each_backend(path: str, monkeypatch: Any, tmp: str) -> dict[str, tuple[dict[cc.Key, Any], Any]]:
    """Open copies of the store with each replay path: backend -> (state, recovery info)."""
    out: dict[str, tuple[dict[cc.Key, Any], Any]] = {}
    native = cc.native_module()
    built = native is not None and getattr(native, "BUILT", False)
    if not built and os.environ.get("WALSTORE_REQUIRE_NATIVE") == "1":
        pytest.fail("the C replayer is not built, and WALSTORE_REQUIRE_NATIVE=1")
    for name in ("python", "c") if built else ("python",):
        copy = os.path.join(tmp, f"reopen-{name}")
        shutil.copytree(path, copy)
        with monkeypatch.context() as m:
            if native is not None:
                m.setattr(native, "AVAILABLE", name == "c")
            assert walstore.backend() == name
            db = walstore.open(copy, segment_size=SEG)
            try:
                out[name] = (db.to_dict(), db.recovery)
                db.put("__after_kill__", name)
                want = db.to_dict()
            finally:
                db.close()
            with walstore.open(copy, segment_size=SEG) as db2:
                assert db2.to_dict() == want, "a commit made after recovery was lost at the next open"
    return out


def _prepare_torn_tail(path: str, seed: int) -> dict[cc.Key, Any]:
    """A store whose last segment ends in half a record (a crash while writing it)."""
    db = walstore.open(path, segment_size=SEG)
    state: dict[cc.Key, Any] = {}
    for c in cc.writer_commits(seed, 0, 20):
        if cc.run_commit(db, c):
            c.apply(state)
    last = db.last_seq
    db._core.abandon()
    rec = cc.log_records(path)[-1]
    frame = fmt.encode_frame(fmt.REC_COMMIT, last + 1, last, fmt.encode_op(fmt.OP_PUT, 1, b"torn", b"v" * 300))
    with open(rec.path, "r+b") as f:
        f.seek(rec.offset + rec.size)
        f.write(frame[: len(frame) // 2])
    return state


@pytest.mark.parametrize("point,mode,n", _cases())
def test_failpoint(tmp_path: Any, monkeypatch: Any, point: str, mode: str, n: int) -> None:
    if mode == "?":
        pytest.fail(f"failpoint {point!r} has no scenario in tests/test_failpoints.py (SCENARIOS)")
    seed = cc.base_seed(13013) + n
    path = str(tmp_path / "db")
    base: dict[cc.Key, Any] = {}
    count = COUNT
    if point.startswith("recovery."):
        base = _prepare_torn_tail(path, seed + 1)
        count = 0
    env = cc.backend_env("python")
    env["WALSTORE_FAILPOINT"] = f"{point}:{n}"
    argv = [sys.executable, cc.CRASHCHECK, "writer", "--dir", path, "--seed", str(seed)]
    argv += ["--count", str(count), "--segment-size", str(SEG), "--durability", mode, "--close"]
    proc = subprocess.run(argv, env=env, capture_output=True, timeout=120)
    out = proc.stdout.decode()
    assert proc.returncode == -signal.SIGKILL, (
        f"the writer was not killed at {point}:{n} (exit {proc.returncode})\n"
        f"stdout:\n{out[-2000:]}\nstderr:\n{proc.stderr.decode()[-3000:]}"
    )
    lines = out.split()
    attempted = lines.count("T")
    acked = lines.count("A")
    commits = cc.writer_commits(seed, 0, count)
    states = [dict(base)]
    for c in commits[:attempted]:
        cur = dict(states[-1])
        c.apply(cur)
        states.append(cur)
    results = _reopen_each_backend(path, monkeypatch, str(tmp_path))
    for backend, (got, info) in results.items():
        match = [k for k in range(acked, attempted + 1) if states[k] == got]
        assert match, (
            f"{point}:{n} ({mode}), recovered by {backend}: not the state after {acked}..{attempted}"
            f" commits\n{cc.diff_states(states[acked], got)}\nrecovery: {info}"
        )
        if point in WRITTEN:
            want = attempted + WRITTEN[point]
            # (a delete of an absent key writes nothing, so states can repeat: compare states)
            assert states[want] == got, f"{point}: expected the state after {want} commits, got prefix {match}"
        if point.startswith("close."):
            assert attempted == acked == count and got == states[count]
        if point == "recovery.after_quarantine":
            assert info.torn_tail is not None, "the torn tail was not found again after a kill before the cut"
        if point.startswith("recovery."):
            assert got == base and os.listdir(os.path.join(path, fmt.QUARANTINE_DIR))
