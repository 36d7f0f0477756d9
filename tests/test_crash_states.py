"""Crash states: record a workload through RecordingFileAPI, then recover every crash state.

Each test records a real run (store creation, commits, segment rolls,
preallocation, syncs, close, reopen), then, at every operation index, builds
the on-disk states a power loss there can leave (walstore.crashfs: unsynced
operations dropped, kept, reordered, torn at sectors, appended as zeros,
directory entries lost), runs the real walstore.open() on each, and checks:
every commit acknowledged as durable before the crash is there, nothing
attempted after it is, the state is that after a prefix of the commits
(transactions whole), open() never raises, and the store takes writes after.
Both replay paths run (the C one when built; WALSTORE_REQUIRE_NATIVE=1 makes
its absence a failure). WALSTORE_CRASH_STATES=N scales the number of states
(1000 = the default), WALSTORE_CRASH_SEED=S changes the seed.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from typing import Any

import crashcheck as cc
import pytest

import walstore
from walstore import crashfs, snapshot
from walstore.crashfs import RecordingFileAPI

SEG = 4096


def _record(tmp_path: Any, name: str) -> tuple[RecordingFileAPI, cc.History]:
    return RecordingFileAPI(tmp_path / name), cc.History()


def _self_check(rec: RecordingFileAPI) -> None:
    """The model with every operation applied is exactly the real directory."""
    model = rec.model()
    final = model.final_image()
    real = crashfs.read_tree(rec.root, skip=lambda rel: os.path.basename(rel) == "LOCK")
    assert sorted(final) == sorted(real), "the recorder's namespace differs from the real directory"
    for rel in final:
        assert final[rel] == real[rel], f"the recorder's content of {rel} differs from the real file"


def _check_all(
    tmp_path: Any,
    rec: RecordingFileAPI,
    history: cc.History,
    label: str,
    seed: int,
    limit: int,
    open_kwargs: dict[str, Any],
) -> cc.Checker:
    _self_check(rec)
    model = rec.model()
    work = tmp_path / "states"
    work.mkdir()
    checker = cc.Checker(model, history, str(work), label, seed, open_kwargs)
    checker.run(crashfs.iter_states(model, seed, limit))
    assert checker.checked > 0
    print(
        f"{label}: {len(model)} operations, {checker.checked} crash states checked"
        f" ({checker.skipped_duplicates} duplicates skipped, {checker.torn_tails} with a torn tail)"
    )
    return checker


@pytest.mark.parametrize("backend", cc.BACKENDS)
def test_sync_workload(tmp_path: Any, monkeypatch: Any, backend: str) -> None:
    """Create, commit (puts, deletes, transactions, values over a sector and over a segment),
    roll segments with preallocation, sync, compact twice (snapshot, older snapshot and covered
    segments removed), close, reopen from the snapshot, commit, close: every crash state."""
    cc.select_backend(backend, monkeypatch)
    seed = cc.base_seed(1001)
    rec, hist = _record(tmp_path, "run")
    kw: dict[str, Any] = {"segment_size": SEG, "auto_compact": False}
    run = cc.Runner(rec, hist, **kw)
    run.open()
    commits = cc.make_commits(seed, 56)
    for c in commits[:40]:
        run.commit(c)
        if c.cid == 12:
            run.sync()
        if c.cid in (20, 33):
            run.compact()  # a snapshot, then the segments it covers removed
    run.close()
    run.open()  # recovery of a cleanly closed store, recorded too
    for c in commits[40:]:
        run.commit(c)
    run.close()
    checker = _check_all(tmp_path, rec, hist, "sync workload", seed, cc.budget(2200), kw)
    assert checker.torn_tails > 0, "no crash state had a torn tail: the model is not tearing anything"


@pytest.mark.parametrize("backend", cc.BACKENDS)
def test_automatic_compaction(tmp_path: Any, monkeypatch: Any, backend: str) -> None:
    """Background compactions (a tiny threshold) while commits go on, keeping two snapshots."""
    cc.select_backend(backend, monkeypatch)
    seed = cc.base_seed(1501)
    rec, hist = _record(tmp_path, "run")
    kw: dict[str, Any] = {"segment_size": SEG, "compact_min_bytes": 6000, "keep_snapshots": 2}
    run = cc.Runner(rec, hist, **kw)
    db = run.open()
    for c in cc.make_commits(seed, 40):
        run.commit(c)
    stats = db.stats()
    run.close()
    model = rec.model()
    snaps = sum(1 for op in model.ops if op.kind == crashfs.RENAME and op.dst.endswith(".snap"))
    assert snaps >= 2, f"only {snaps} snapshots were written: {stats}"
    _check_all(tmp_path, rec, hist, "automatic compaction", seed, cc.budget(900), kw)


def _one_compaction(tmp_path: Any, seed: int, check: Callable[[list[Any]], None], label: str, limit: int) -> None:
    """60 commits, a compaction (its file operations handed to `check`), 10 more commits,
    close; then every crash state of the whole run."""
    rec, hist = _record(tmp_path, "run")
    kw: dict[str, Any] = {"segment_size": SEG, "auto_compact": False}
    run = cc.Runner(rec, hist, **kw)
    run.open()
    commits = cc.make_commits(seed, 70, nkeys=60)
    for c in commits[:60]:
        run.commit(c)
    mark = rec.mark()
    run.compact()
    check(rec.ops[mark:])
    for c in commits[60:]:
        run.commit(c)
    run.close()
    _check_all(tmp_path, rec, hist, label, seed, limit, kw)


@pytest.mark.parametrize("backend", cc.BACKENDS)
def test_compaction_in_many_blocks(tmp_path: Any, monkeypatch: Any, backend: str) -> None:
    """Snapshot chunks, blocks and write-behind syncs made tiny, so one compaction is many
    aligned writes (O_DIRECT where the filesystem takes it), write-behind fdatasyncs, the
    zero-padded last block cut back by ftruncate, fsync, rename, directory fsync, unlinks:
    every crash state across them; and every file operation of the compaction is recorded."""
    cc.select_backend(backend, monkeypatch)
    monkeypatch.setattr(snapshot, "CHUNK_BYTES", 200)
    monkeypatch.setattr(snapshot, "BLOCK_BYTES", 0)  # the smallest: one aligned block a write
    for name in ("SYNC_FIRST", "SYNC_MIN", "SYNC_MAX"):
        monkeypatch.setattr(snapshot, name, 3 * snapshot.ALIGN)

    def check(ops: list[Any]) -> None:
        snap_ops = [op for op in ops if ".snap" in op.path]
        calls = [op.call or op.kind for op in snap_ops]
        # at least two block writes, a write-behind fdatasync, and the last block with the end record
        assert calls.count("pwrite") >= 3 and calls.count("fdatasync") >= 1, crashfs.format_ops(snap_ops)
        assert {"open", "fsync", "rename", "close"} <= set(calls), crashfs.format_ops(snap_ops)
        assert any(op.kind == crashfs.DIRSYNC for op in ops) and any(op.kind == crashfs.UNLINK for op in ops)

    _one_compaction(tmp_path, cc.base_seed(7007), check, "compaction in many blocks", cc.budget(900))


@pytest.mark.parametrize("backend", cc.BACKENDS)
def test_compaction_freeing_covered_files_in_steps(tmp_path: Any, monkeypatch: Any, backend: str) -> None:
    """The free step made tiny, so each covered file is renamed to its `.free.tmp` name,
    cut back from its end a step at a time and then unlinked: every crash state across
    those steps recovers the committed state (a half-freed file is a leftover open()
    removes)."""
    cc.select_backend(backend, monkeypatch)
    monkeypatch.setattr(snapshot, "FREE_STEP_FIRST", 1024)
    monkeypatch.setattr(snapshot, "_free_rate", 0.0)

    def check(ops: list[Any]) -> None:
        calls = [op.call or op.kind for op in ops if op.path.endswith(snapshot.FREE_SUFFIX)]
        assert calls.count("ftruncate") >= 2 and calls.count("unlink") >= 2, crashfs.format_ops(ops)

    _one_compaction(tmp_path, cc.base_seed(7117), check, "compaction freeing in steps", cc.budget(600))


@pytest.mark.parametrize("backend", cc.BACKENDS)
def test_no_preallocation(tmp_path: Any, monkeypatch: Any, backend: str) -> None:
    """preallocate=False: appends grow the file, so a crash can keep the size and lose the data."""
    cc.select_backend(backend, monkeypatch)
    seed = cc.base_seed(2002)
    rec, hist = _record(tmp_path, "run")
    kw: dict[str, Any] = {"segment_size": SEG, "preallocate": False}
    run = cc.Runner(rec, hist, **kw)
    run.open()
    for c in cc.make_commits(seed, 24):
        run.commit(c)
    run.close()
    _check_all(tmp_path, rec, hist, "no preallocation", seed, cc.budget(600), kw)


@pytest.mark.parametrize("backend", cc.BACKENDS)
def test_interval_and_none_modes(tmp_path: Any, monkeypatch: Any, backend: str) -> None:
    """interval mode (a background flusher) with sync() calls and per-commit sync overrides:
    what sync() or a sync commit acknowledged survives; the rest is a prefix."""
    cc.select_backend(backend, monkeypatch)
    seed = cc.base_seed(3003)
    rec, hist = _record(tmp_path, "run")
    kw: dict[str, Any] = {"segment_size": SEG, "durability": "interval", "interval_ms": 2}
    run = cc.Runner(rec, hist, **kw)
    run.open()
    rng = random.Random(seed)
    for c in cc.make_commits(seed, 30):
        if rng.random() < 0.15:
            c = cc.Commit(c.cid, c.ops, c.txn, "sync")
        elif rng.random() < 0.15:
            c = cc.Commit(c.cid, c.ops, c.txn, "none")
        run.commit(c)
        if c.cid % 9 == 0:
            run.sync()
    run.close()
    _check_all(tmp_path, rec, hist, "interval mode", seed, cc.budget(600), kw)


def _identifiable(c: cc.Commit, thread: int) -> cc.Commit:
    """A plain delete as a transaction that also records its commit id, so that its record in
    the log tells which commit it is (two threads may delete the same key)."""
    if c.txn or c.ops[0][0] == "put":
        return c
    return cc.Commit(c.cid, c.ops + (("put", f"t{thread}", c.cid),), True, c.durability)


@pytest.mark.parametrize("backend", cc.BACKENDS)
def test_group_commit_threads(tmp_path: Any, monkeypatch: Any, backend: str) -> None:
    """Three threads commit in sync mode at once (group commit): a commit is acknowledged only
    by an fdatasync that began after its record was written."""
    cc.select_backend(backend, monkeypatch)
    seed = cc.base_seed(4004)
    rec, hist = _record(tmp_path, "run")
    kw: dict[str, Any] = {"segment_size": SEG}
    db = walstore.open(os.path.join(rec.root, cc.STORE), fs=rec, **kw)
    per_thread = [
        [_identifiable(c, t) for c in cc.make_commits(seed + t, 10, first_cid=1000 * (t + 1), nkeys=6)]
        for t in range(3)
    ]
    for cs in per_thread:
        for c in cs:
            hist.commits[c.cid] = c
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def worker(cs: list[cc.Commit]) -> None:
        try:
            barrier.wait()
            for c in cs:
                ev = cc.Event("commit", rec.mark(), cid=c.cid)
                if cc.run_commit(db, c):  # (a delete of a key another thread removed logs nothing)
                    ev.ack = rec.mark()
                    ev.durable_on_ack = True
                    hist.add(ev)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(cs,)) for cs in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    stats = db.stats()
    db.close()
    hist.epochs[0].order.extend(cc.order_from_log(os.path.join(rec.root, cc.STORE), hist.commits.values()))
    assert len(hist.order) == len([e for e in hist.events if e.kind == "commit"])
    checker = _check_all(tmp_path, rec, hist, "group commit", seed, cc.budget(600), kw)
    print(f"group commit: {stats['commits']} commits, {stats['fsyncs']} fdatasyncs")
    assert checker.checked > 0


@pytest.mark.parametrize("backend", cc.BACKENDS)
def test_process_crash_then_power_loss(tmp_path: Any, monkeypatch: Any, backend: str) -> None:
    """The process dies at an operation (everything it wrote stays in the page cache), a new
    process recovers and commits, then the power fails: what the new process acknowledged must
    survive, so recovery must make durable what the dead process left unsynced (its directory
    entries included)."""
    cc.select_backend(backend, monkeypatch)
    seed = cc.base_seed(5005)
    kw: dict[str, Any] = {"segment_size": SEG}
    # One uninterrupted run to learn how many operations the first process makes.
    probe = RecordingFileAPI(tmp_path / "probe")
    prun = cc.Runner(probe, cc.History(), **kw)
    prun.open()
    commits = cc.make_commits(seed, 20)
    for c in commits[:14]:
        prun.commit(c)
    prun.close()
    total = probe.mark()
    rng = random.Random(seed)
    kills = sorted(set(rng.sample(range(1, total), min(total - 1, cc.budget(16)))))
    per_kill = max(8, cc.budget(640) // max(1, len(kills)))
    checked = 0
    for n, k in enumerate(kills):
        root = tmp_path / f"k{n}"
        rec = RecordingFileAPI(root)
        hist = cc.History()
        run = cc.Runner(rec, hist, **kw)
        rec.kill_after(k)
        try:
            run.open()
            for c in commits[:14]:
                run.commit(c)
            run.close()
        except cc.ProcessDied:
            pass
        restart_at = rec.mark()
        run.restart()
        for c in commits[14:]:
            run.commit(c)
        run.close()
        model = rec.model()
        pts = [p for p in model.crash_points() if p > restart_at]
        work = tmp_path / f"states{n}"
        work.mkdir()
        checker = cc.Checker(model, hist, str(work), f"process crash at operation {k}", seed + n, kw)
        checker.run(crashfs.iter_states(model, seed + n, per_kill, points=pts))
        checked += checker.checked
    print(f"process crash then power loss: {len(kills)} kill points, {checked} crash states")


@pytest.mark.parametrize("backend", cc.BACKENDS)
def test_recovery_is_idempotent(tmp_path: Any, monkeypatch: Any, backend: str) -> None:
    """Crash states with a torn tail (and some without): record their recovery, crash it at each
    operation, recover again: the same state every time, and open() never raises."""
    cc.select_backend(backend, monkeypatch)
    seed = cc.base_seed(6006)
    rec, hist = _record(tmp_path, "run")
    kw: dict[str, Any] = {"segment_size": SEG}
    run = cc.Runner(rec, hist, **kw)
    run.open()
    for c in cc.make_commits(seed, 20):
        run.commit(c)
    run.close()
    model = rec.model()
    work = tmp_path / "states"
    work.mkdir()
    checker = cc.Checker(model, hist, str(work), "idempotence base", seed, kw)
    checker.run(crashfs.iter_states(model, seed, cc.budget(250)), writable_every=0)
    torn = [(st, got) for st, got, t in checker.results if t]
    clean = [(st, got) for st, got, t in checker.results if not t]
    rng = random.Random(seed)
    picks = rng.sample(torn, min(len(torn), cc.budget(10))) + rng.sample(clean, min(len(clean), 2))
    assert torn, "no crash state with a torn tail to recover"
    total = 0
    for n, (st, got) in enumerate(picks):
        d = tmp_path / f"idem{n}"
        d.mkdir()
        total += cc.check_recovery_idempotent(model.image(st), got, str(d), seed + n, cc.budget(40), kw)
    print(f"recovery idempotence: {len(picks)} recovered states, {total} crash states of their recovery")
