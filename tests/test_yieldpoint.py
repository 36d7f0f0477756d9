"""Yield points (_native/yieldpoint.h): a thread that turns them on gives up the core in its
long C loops; every other thread's loops, and open()'s replay, are unchanged."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from native_support import frame, require_native

import walstore
from walstore import format as fmt
from walstore import reader, snapshot


@pytest.fixture(scope="module")
def native() -> Any:
    return require_native()


@pytest.fixture(scope="module")
def big_log() -> bytes:
    """About 24 MiB of valid COMMITs: a scan of it takes milliseconds, far over 100 us."""
    value = bytes(range(256)) * 4
    return b"".join(
        frame(fmt.REC_COMMIT, s, s - 1, fmt.encode_op(fmt.OP_PUT, 0, b"k%d" % (s % 5000), value))
        for s in range(1, 24_000)
    )


def scan_yields(native: Any, buf: bytes, on: bool) -> tuple[int, Any]:
    """(yields made, replay length) by scanning and replaying buf in this thread."""
    before = native.yields()
    if on:
        with native.yielding():
            result = native.scan_records(buf, 0, 1, reader.SEGMENT_TYPES)
            r = native.KVReplayer()
            r.apply_range(buf, 0, result.end)
    else:
        result = native.scan_records(buf, 0, 1, reader.SEGMENT_TYPES)
        r = native.KVReplayer()
        r.apply_range(buf, 0, result.end)
    assert result.damage is None and result.records == 23_999
    return native.yields() - before, len(r)


def test_yield_points_run_only_in_the_thread_that_asked(native: Any, big_log: bytes) -> None:
    got: dict[str, tuple[int, Any]] = {}
    other = threading.Thread(target=lambda: got.setdefault("other", scan_yields(native, big_log, False)))
    other.start()
    got["on"] = scan_yields(native, big_log, True)
    other.join()
    got["off"] = scan_yields(native, big_log, False)
    assert got["on"][0] > 0
    assert got["off"][0] == 0 and got["other"][0] == 0
    assert got["on"][1] == got["off"][1] == got["other"][1] == 5000  # same result either way


def test_yielding_is_restored_after_the_block(native: Any) -> None:
    lib = native._lib
    with native.yielding():
        with native.yielding():
            pass
        assert lib.ws_set_yielding(1) == 1  # still on inside the outer block
    assert lib.ws_set_yielding(0) == 0  # off again after it


def test_a_compaction_yields_and_open_does_not(native: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """open()'s replay runs in the caller's thread without yield points; a compaction's
    capture (the C replay of the sealed log) runs in a helper thread at idle CPU priority,
    with them; the caller's thread is left as it was."""
    monkeypatch.setattr(native, "AVAILABLE", True)  # the C replayer, even under WALSTORE_PURE=1
    assert walstore.backend() == "c"
    path = tmp_path / "db"
    value = b"v" * 100
    with walstore.open(path, durability="none", auto_compact=False) as db:
        for i in range(100_000):
            db[b"%016d" % i] = value
        db.sync()
    seen: dict[str, int] = {}
    real = snapshot.at_idle_priority

    def spy(work: Any) -> Any:
        def watched() -> Any:
            before = native.yields()
            result = work()
            seen["yields"] = native.yields() - before
            seen["thread"] = threading.get_ident()
            if hasattr(os, "sched_getscheduler"):
                seen["policy"] = os.sched_getscheduler(0)
            return result

        return real(watched)

    monkeypatch.setattr(snapshot, "at_idle_priority", spy)
    before = native.yields()
    policy = os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else None
    with walstore.open(path, auto_compact=False) as db:  # replays 100,000 records in this thread
        assert native.yields() == before
        info = db.compact()  # wait=True: the capture runs in a helper thread, waited for
        assert info is not None
        assert seen["yields"] > 0 and seen["thread"] != threading.get_ident()
        if policy is not None and hasattr(os, "SCHED_IDLE"):
            assert seen["policy"] == os.SCHED_IDLE
            assert os.sched_getscheduler(0) == policy  # this thread's policy unchanged
        assert native._lib.ws_set_yielding(0) == 0  # this thread's yield points stay off
        assert len(db) == 100_000


def test_at_idle_priority_returns_and_raises_what_the_work_does() -> None:
    """snapshot.at_idle_priority: the work's result, or its exception raised in the caller;
    the work runs in another thread (at SCHED_IDLE where Linux has it), this one unchanged."""
    here = threading.get_ident()
    policy = os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else None

    def work() -> tuple[int, Any]:
        return threading.get_ident(), os.sched_getscheduler(0) if policy is not None else None

    thread, its_policy = snapshot.at_idle_priority(work)
    assert thread != here
    if policy is not None and hasattr(os, "SCHED_IDLE"):
        assert its_policy == os.SCHED_IDLE
        assert os.sched_getscheduler(0) == policy

    def fails() -> None:
        raise ValueError("from the helper")

    with pytest.raises(ValueError, match="from the helper"):
        snapshot.at_idle_priority(fails)


def test_a_compaction_finishes_with_every_core_busy(native: Any, tmp_path: Path) -> None:
    """The capture runs at SCHED_IDLE: with a busy loop on every core it gets only what they
    leave, but it still ends, the snapshot is right, and commits go on meanwhile. (On the
    dev VM: 0.23 s idle, 3.2 s with two busy loops on its two cores, 300,000 keys.)"""
    import subprocess
    import sys

    path = tmp_path / "db"
    burners: list[subprocess.Popen[bytes]] = []
    with walstore.open(path, durability="none", auto_compact=False) as db:
        for i in range(50_000):
            db[b"%016d" % i] = b"v" * 100
        db.sync()
        committed = []
        started = threading.Event()

        def commit_meanwhile(stop: threading.Event) -> None:
            i = 0
            while not stop.is_set():
                db.put(b"during%06d" % i, b"x", durability="sync")
                committed.append(i)
                started.set()
                i += 1

        try:
            burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
            stop = threading.Event()
            committer = threading.Thread(target=commit_meanwhile, args=(stop,))
            committer.start()
            try:
                assert started.wait(60)  # a hang guard, not a timing check: the committer runs
                before = len(committed)
                info = db.compact()
                during = len(committed) - before
            finally:
                stop.set()
                committer.join()
        finally:
            for b in burners:
                b.kill()
                b.wait()
        assert info is not None and info.seq <= db.last_seq
        assert during > 0  # commits went on while the compaction ran
        model = db.to_dict()
    with walstore.open(path) as db:
        assert db.recovery.snapshot_seq == info.seq
        assert db.to_dict() == model
