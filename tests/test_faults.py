"""Fault injection: failing fsyncs and writes, a full disk, short writes, failing renames,
and damaged synced data.

Faults come from walstore.crashfs.FaultyFileAPI stacked on a RecordingFileAPI,
so each run is checked twice: directly (the committer whose fdatasync or
write failed gets an exception; a poisoned store refuses writes; a full disk
fails only that commit, leaves the state as it was, and the store works once
space is freed), and after the fact (reopen the real directory: every
acknowledged commit is there; and the crash states of the run, where writes
a failed fsync should have covered never become durable). Each sweep puts
the fault on every call of its kind in turn (sampled evenly when there are
many; WALSTORE_CRASH_STATES raises the sample).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import threading
from collections.abc import Callable
from typing import Any, Optional

import crashcheck as cc
import pytest

import walstore
from walstore import crashfs
from walstore.crashfs import FaultyFileAPI, RecordingFileAPI

SEG = 4096
KW: dict[str, Any] = {"segment_size": SEG}


def _count_calls(tmp_path: Any, kind: str, commits: list[cc.Commit], kw: dict[str, Any], reopen_at: int = 0) -> int:
    """How many calls of `kind` a fault-free run makes (from opening to closing)."""
    rec = RecordingFileAPI(tmp_path / f"probe-{kind}")
    fs = FaultyFileAPI(rec)
    run = cc.Runner(rec, cc.History(), fs=fs, **kw)
    run.open()
    for n, c in enumerate(commits):
        if reopen_at and n == reopen_at:
            run.close()
            _leftover(run.path)
            run.open()
        assert run.commit(c)
    run.close()
    shutil.rmtree(rec.root)
    return fs.calls.get(kind, 0)


def _leftover(store: str) -> None:
    """A file a crashed process left (open() removes *.tmp files)."""
    with open(os.path.join(store, "crashed-roll.tmp"), "wb") as f:
        f.write(b"leftover")


def _sample(n: int, want: int, seed: int) -> list[int]:
    """1..n, or `want` of them spread evenly (always the first and the last)."""
    if n <= want:
        return list(range(1, n + 1))
    step = n / want
    return sorted({1, n} | {1 + int(k * step) for k in range(want)})


class FaultRun:
    """One run of a workload with one fault programmed; checks as it goes."""

    def __init__(self, tmp_path: Any, name: str, kw: dict[str, Any], seed: int) -> None:
        self.rec = RecordingFileAPI(tmp_path / name)
        self.fs = FaultyFileAPI(self.rec)
        self.history = cc.History()
        self.run = cc.Runner(self.rec, self.history, fs=self.fs, **kw)
        self.kw = kw
        self.seed = seed
        self.name = name
        self.poisoned = False
        self.outcomes: list[str] = []

    def open(self) -> None:
        self.poisoned = False  # a new store object
        try:
            self.run.open()
        except OSError:
            assert self.fs.fired, "open() failed with no fault injected"
            self.outcomes.append("open failed")
            self.fs.clear()
            self.run.open()

    def commit(self, c: cc.Commit, on_error: Optional[Callable[[cc.Commit, Exception], bool]] = None) -> bool:
        db = self.run.db
        assert db is not None
        before_state = db.to_dict()
        before_seq = db.last_seq
        fired_before = len(self.fs.fired)
        ok = self.run.commit(c)
        mine = [f for f in self.fs.fired[fired_before:] if f[3] == threading.current_thread().name]
        if ok and db.last_seq == before_seq:
            self.outcomes.append("no-op")  # a delete of an absent key: nothing to write
            return True
        if ok:
            assert not mine, (
                f"commit c{c.cid} was acknowledged although an injected {mine[0][0]} failure"
                f" ({errno.errorcode[mine[0][2]]}) happened in its own call path"
            )
            assert not self.poisoned, f"commit c{c.cid} was acknowledged by a poisoned store"
            self.outcomes.append("ok")
            return True
        err = self.history.events[-1].error
        if db.last_seq == before_seq:
            assert db.to_dict() == before_state, f"commit c{c.cid} failed ({err}) but changed the state"
        if self.poisoned:
            assert err.startswith("StorePoisonedError"), f"a poisoned store raised {err}"
        if err.startswith("StorePoisonedError"):
            self.poisoned = True
        self.outcomes.append(err.split(":")[0])
        return False

    def finish(self, ckw: Optional[dict[str, Any]] = None, states: int = 12) -> dict[cc.Key, Any]:
        """Close (errors allowed), reopen the real directory, check it; check crash states."""
        try:
            self.run.close()
        except Exception:  # noqa: BLE001 - a close after a failure may fail; recovery must not
            self.run.bury()
        end = self.rec.mark()
        path = os.path.join(self.rec.root, cc.STORE)
        try:
            db = walstore.open(path, **(ckw or self.kw))
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(
                f"{self.name}: reopening after the fault raised {type(exc).__name__}: {exc}\n"
                f"faults fired: {self.fs.fired}\noutcomes: {self.outcomes}\n"
                f"{crashfs.format_ops(self.rec.ops)}"
            ) from exc
        got = db.to_dict()
        db.put("__after_fault__", 1)
        db.close()
        ep, lo, hi, _ = self.history.bounds(end)
        states_ = self.history.states(ep)
        assert any(states_[k] == got for k in range(lo, hi + 1)), (
            f"{self.name}: after reopening, the state is not an allowed prefix ({lo}..{hi})\n"
            f"{cc.diff_states(states_[min(lo, len(states_) - 1)], got)}\noutcomes: {self.outcomes}"
        )
        model = self.rec.model()
        first_fault = next((op.index for op in model.ops if op.kind == crashfs.SYNC_FAILED), 0)
        pts = [p for p in model.crash_points() if p >= first_fault] if first_fault else None
        work = os.path.join(self.rec.root + "-states")
        os.makedirs(work)
        checker = cc.Checker(model, self.history, work, self.name, self.seed, self.kw)
        checker.run(crashfs.iter_states(model, self.seed, cc.budget(states), points=pts), writable_every=0)
        shutil.rmtree(self.rec.root, ignore_errors=True)
        return got


@pytest.fixture
def commits() -> list[cc.Commit]:
    return cc.make_commits(cc.base_seed(7007), 22)


def test_eio_on_each_fdatasync(tmp_path: Any, commits: list[cc.Commit]) -> None:
    """EIO on the n-th fdatasync, for every n: the committers it covered get an exception, the
    store refuses every later write, and nothing acknowledged is lost, even though the writes
    that fsync covered never reach the disk (the crash states drop them)."""
    n_syncs = _count_calls(tmp_path, "fdatasync", commits, KW)
    assert n_syncs > len(commits)
    seen: dict[str, int] = {}
    for n in _sample(n_syncs, cc.budget(40), 1):
        fr = FaultRun(tmp_path, f"fsync{n}", KW, 7007 + n)
        fr.fs.fail("fdatasync", nth=n)
        fr.open()
        for c in commits:
            fr.commit(c)
        fr.finish()
        for o in set(fr.outcomes):
            seen[o] = seen.get(o, 0) + 1
    assert seen.get("StorePoisonedError"), f"no run poisoned the store: {seen}"
    print(f"fdatasync EIO: {n_syncs} points, outcomes {seen}")


def test_eio_on_each_write(tmp_path: Any, commits: list[cc.Commit]) -> None:
    """EIO on the n-th pwrite (after writing half of it): the commit fails and changes nothing
    in memory; the half-written record is a torn tail at reopen; nothing acknowledged is lost."""
    n_writes = _count_calls(tmp_path, "pwrite", commits, KW)
    seen: dict[str, int] = {}
    for n in _sample(n_writes, cc.budget(30), 2):
        fr = FaultRun(tmp_path, f"write{n}", KW, 8008 + n)
        fr.fs.fail("pwrite", nth=n, partial=0.5)
        fr.open()
        for c in commits:
            fr.commit(c)
        fr.finish(states=8)
        for o in set(fr.outcomes):
            seen[o] = seen.get(o, 0) + 1
    assert seen.get("StorePoisonedError"), seen
    print(f"pwrite EIO: {n_writes} points, outcomes {seen}")


@pytest.mark.parametrize("preallocate", [True, False])
def test_disk_full_at_each_point(tmp_path: Any, commits: list[cc.Commit], preallocate: bool) -> None:
    """ENOSPC from the n-th call that needs space (pwrite, file creation, rename, mkdir), lasting
    until space is freed: only DiskFullError reaches the committer, the state is unchanged, and
    once space is freed the same commit succeeds. At the end every commit is there, exactly."""
    kw = dict(KW, preallocate=preallocate)
    n_space = _count_calls(tmp_path, "pwrite", commits, kw) + 8
    seen: dict[str, int] = {}
    for n in _sample(n_space, cc.budget(30), 3):
        fr = FaultRun(tmp_path, f"full{n}", kw, 9009 + n)
        fr.fs.fail("space", nth=n, err=errno.ENOSPC, times=0, partial=0.5 if n % 2 else 0.0)
        fr.open()
        for c in commits:
            if fr.commit(c):
                continue
            err = fr.history.events[-1].error
            assert err.startswith("DiskFullError"), f"a full disk gave {err}"
            fr.fs.clear()  # space is freed
            assert fr.commit(c), f"after space was freed, commit c{c.cid} failed again"
        fr.fs.clear()
        got = fr.finish(kw, states=6)
        want: dict[cc.Key, Any] = {}
        for c in commits:
            c.apply(want)
        assert got == want, cc.diff_states(want, got)
        for o in set(fr.outcomes):
            seen[o] = seen.get(o, 0) + 1
    assert seen.get("DiskFullError"), seen
    print(f"disk full (preallocate={preallocate}): {n_space} points, outcomes {seen}")


def test_disk_full_while_closing(tmp_path: Any, commits: list[cc.Commit]) -> None:
    """A disk that fills while the CLOSE record is written: close() reports it; nothing is lost."""
    rec = RecordingFileAPI(tmp_path / "r")
    fs = FaultyFileAPI(rec)
    db = walstore.open(os.path.join(rec.root, cc.STORE), fs=fs, **KW)
    want: dict[cc.Key, Any] = {}
    for c in commits:
        cc.run_commit(db, c)
        c.apply(want)
    fs.fail("pwrite", err=errno.ENOSPC, times=0)
    try:
        db.close()
    except walstore.DiskFullError:
        pass
    fs.clear()
    with walstore.open(os.path.join(rec.root, cc.STORE), **KW) as db2:
        assert db2.to_dict() == want


def test_short_writes(tmp_path: Any, commits: list[cc.Commit]) -> None:
    """os.pwrite writing 3 bytes at a time: OSFileAPI.pwrite's loop completes every write."""
    fs = FaultyFileAPI(short_writes=3)
    db = walstore.open(tmp_path / "db", fs=fs, **KW)
    want: dict[cc.Key, Any] = {}
    for c in commits:
        cc.run_commit(db, c)
        c.apply(want)
    db.close()
    assert fs.short_write_count > 100
    with walstore.open(tmp_path / "db", **KW) as db2:
        assert db2.to_dict() == want
        assert db2.recovery.closed_cleanly and db2.recovery.torn_tail is None


@pytest.mark.parametrize("call", ["rename", "fsync_dir", "open", "fsync", "ftruncate", "unlink", "mkdir"])
def test_failing_metadata_calls(tmp_path: Any, commits: list[cc.Commit], call: str) -> None:
    """EIO from the n-th rename (or directory fsync, open, fsync, ftruncate, unlink, mkdir), for
    every n: the commit in progress fails, and the store either goes on or refuses writes;
    after reopening nothing acknowledged is lost and nothing that failed appears."""
    reopen_at = len(commits) // 2  # a close and a reopen in the middle (leftovers are unlinked)
    n_calls = _count_calls(tmp_path, call, commits, KW, reopen_at)
    assert n_calls > 0, f"the workload makes no {call} call"
    seen: dict[str, int] = {}
    for n in _sample(n_calls, cc.budget(12), 4):
        fr = FaultRun(tmp_path, f"{call}{n}", KW, 10010 + n)
        fr.fs.fail(call, nth=n)
        fr.open()
        for k, c in enumerate(commits):
            if k == reopen_at:
                try:
                    fr.run.close()
                except Exception:  # noqa: BLE001 - a failing close; the reopen must still work
                    fr.run.bury()
                _leftover(fr.run.path)
                fr.open()
            fr.commit(c)
        fr.finish(states=6)
        for o in set(fr.outcomes):
            seen[o] = seen.get(o, 0) + 1
    print(f"{call} EIO: {n_calls} points, outcomes {seen}")


def test_interval_flush_failure_poisons(tmp_path: Any, commits: list[cc.Commit]) -> None:
    """interval mode: the background fdatasync fails. sync() must then raise, not report the
    commits durable, and later commits are refused."""
    fs = FaultyFileAPI()
    db = walstore.open(tmp_path / "db", durability="interval", interval_ms=1, fs=fs, **KW)
    fs.fail("fdatasync", times=0)
    for c in commits[:3]:
        cc.run_commit(db, c)
    event = threading.Event()
    for _ in range(2000):
        if fs.fired:
            break
        event.wait(0.005)
    assert fs.fired, "the background flusher never ran"
    with pytest.raises(walstore.StorePoisonedError):
        db.sync()
    with pytest.raises(walstore.StorePoisonedError):
        cc.run_commit(db, commits[3])
    db.close()
    fs.clear()
    with walstore.open(tmp_path / "db", **KW) as db2:
        want: dict[cc.Key, Any] = {}
        for c in commits[:3]:
            c.apply(want)
        assert db2.to_dict() == want  # a process that goes on: the page cache still has them


# ---- damaged synced data ------------------------------------------------------------------


def _store_with_log(tmp_path: Any, close: bool) -> tuple[str, dict[cc.Key, Any], list[cc.Commit]]:
    path = str(tmp_path / "db")
    commits = cc.make_commits(cc.base_seed(11011), 30)
    db = walstore.open(path, **KW)
    for c in commits:
        cc.run_commit(db, c)
    state = db.to_dict()
    if close:
        db.close()
    else:
        db._core.abandon()  # a crash: no CLOSE record
    return path, state, commits


@pytest.mark.parametrize("backend", cc.BACKENDS)
def test_damaged_synced_record_is_corruption(tmp_path: Any, monkeypatch: Any, backend: str) -> None:
    """A flipped byte in any record that a later record's watermark (or a later segment) shows
    was synced: open() raises CorruptionError naming file, offset and sequence number, and
    changes nothing on disk. (Treating it as a torn tail would silently drop synced commits.)"""
    cc.select_backend(backend, monkeypatch)
    path, _state, _ = _store_with_log(tmp_path, close=True)
    targets = cc.synced_records(path)
    assert len(targets) > 20
    rng = random.Random(cc.base_seed(12012))
    picks = rng.sample(targets, min(len(targets), cc.budget(40)))
    for n, r in enumerate(picks):
        d = str(tmp_path / f"c{n}")
        shutil.copytree(path, d)
        seg = os.path.join(d, os.path.basename(r.path))
        where = r.offset + rng.randrange(r.size)
        with open(seg, "r+b") as f:
            f.seek(where)
            b = f.read(1)
            f.seek(where)
            f.write(bytes([b[0] ^ (1 << rng.randrange(8))]))
        before = crashfs.read_tree(d)
        with pytest.raises(walstore.CorruptionError) as e:
            walstore.open(d, **KW)
        assert os.path.basename(r.path) in str(e.value) and e.value.seq is not None
        after = crashfs.read_tree(d)
        assert after.keys() - {"LOCK"} == before.keys() - {"LOCK"}
        assert all(after[k] == before[k] for k in before if k != "LOCK"), "a refused open changed files"
        shutil.rmtree(d)


@pytest.mark.parametrize("backend", cc.BACKENDS)
def test_damaged_last_record_after_a_crash_is_cut(tmp_path: Any, monkeypatch: Any, backend: str) -> None:
    """The documented limit: after a crash (no CLOSE), damage to the last record, with nothing
    valid after it, looks like a torn tail: it is cut, and its bytes are kept in quarantine/."""
    cc.select_backend(backend, monkeypatch)
    path, _state, commits = _store_with_log(tmp_path, close=False)
    recs = cc.log_records(path)
    last = recs[-1]
    with open(last.path, "r+b") as f:
        f.seek(last.offset + 40)
        f.write(b"\xff")
    with walstore.open(path, **KW) as db:
        torn = db.recovery.torn_tail
        assert torn is not None and torn.seq == last.seq
        assert db.recovery.quarantined and os.path.exists(db.recovery.quarantined)
        want: dict[cc.Key, Any] = {}
        for c in commits[: last.seq - 1]:
            c.apply(want)
        # the commits before the damaged one are all there (the delete of an absent key aside)
        assert len(db.to_dict()) >= 0 and db.recovery.last_seq == last.seq - 1
