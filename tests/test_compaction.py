"""Compaction: snapshots by temp file + fsync + rename, on demand and automatic, under load."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from storetools import ENOSPC, FailingFileAPI, crash, flip_bit

import walstore
from walstore import format as fmt
from walstore import snapshot
from walstore.crashfs import FaultyFileAPI


def names(path: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in path.glob(pattern))


def test_compact_writes_snapshot_and_drops_covered_segments(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "db"
    with walstore.open(path, segment_size=4096, auto_compact=False) as db:
        for i in range(400):
            db[f"k{i % 50}"] = i
        db[b"bin"] = b"\x00\x01"
        db["text"] = "t"
        db["json"] = {"a": [1, 2]}
        del db["k0"]
        model = db.to_dict()
        assert len(names(path, "seg-*.wal")) > 3
        info = db.compact()
        assert info is not None and info.seq == db.last_seq
        assert names(path, "snap-*.snap") == [fmt.snapshot_name(info.seq)]
        assert names(path, "seg-*.wal") == [fmt.segment_name(info.seq + 1)]
        assert db.compact() is None  # nothing new since
        db["after"] = 1
        model["after"] = 1
    with walstore.open(path, segment_size=4096) as db:
        assert db.to_dict() == model
        assert db.recovery.snapshot_seq == info.seq
        assert isinstance(db[b"bin"], bytes) and db["json"] == {"a": [1, 2]}


def test_next_segment_is_prepared_after_a_roll_and_after_a_compaction_not_during_it(
    tmp_path: Path, backend: str, monkeypatch: Any
) -> None:
    """After an ordinary roll the next segment is prepared at once, so that a compaction's
    seal finds it ready and waits for nothing. The compaction's own roll leaves it until
    the compaction is over (the snapshot's writes go first), and then it starts at once,
    with the new segment nearly empty, so that a compaction soon after finds it ready."""
    path = tmp_path / "db"
    size = 1 << 20
    with walstore.open(path, segment_size=size, auto_compact=False) as db:
        w = db._writer
        i = 0
        while w.rolls == 0:
            db[f"k{i % 100}"] = b"v" * 1000
            i += 1
        assert w._seg.offset * 4 < size  # the new segment is nearly empty...
        thread = w._prealloc_thread
        assert thread is not None or w._prealloc_ready  # ...and the next is being prepared
        if thread is not None:
            thread.join()
        assert (path / fmt.PREALLOC_READY_NAME).exists()
        started_while_compacting: list[bool] = []
        real_start = w._start_prealloc

        def start() -> None:
            started_while_compacting.append(db._compact_lock.locked())
            real_start()

        monkeypatch.setattr(w, "_start_prealloc", start)
        rolls = w.rolls
        assert db.compact() is not None
        assert w.rolls == rolls + 1  # the seal rolled into the prepared segment at once
        assert started_while_compacting == [True]  # once, at the compaction's end...
        assert w._seg.offset * 4 < size
        thread = w._prealloc_thread
        assert thread is not None or w._prealloc_ready  # ...with the new segment nearly empty
        if thread is not None:
            thread.join()
        assert db._compact_lock.acquire(blocking=False)  # (and the compaction is over)
        db._compact_lock.release()
        db["one more"] = b"v"
        rolls = w.rolls
        assert db.compact() is not None  # a second compaction at once...
        assert w.rolls == rolls + 1 and started_while_compacting == [True, True]  # ...found it ready
        model = db.to_dict()
    with walstore.open(path, segment_size=size) as db:
        assert db.to_dict() == model


def test_snapshot_alone_with_empty_log_reopens(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "db"
    with walstore.open(path, auto_compact=False) as db:
        db["a"] = 1
        db.compact()
    with walstore.open(path) as db:
        assert db.to_dict() == {"a": 1}
        db.compact()  # a second compaction over an empty log changes nothing
    with walstore.open(path) as db:
        assert db.to_dict() == {"a": 1}


def test_writers_keep_committing_during_background_compaction(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "db"
    with walstore.open(path, segment_size=8192, auto_compact=False, durability="none") as db:
        for i in range(2000):
            db[f"k{i}"] = i
        stop = threading.Event()
        written: dict[str, int] = {}

        def writer() -> None:
            j = 0
            while not stop.is_set() or j < 200:
                db[f"w{j % 300}"] = j
                written[f"w{j % 300}"] = j
                j += 1

        t = threading.Thread(target=writer)
        t.start()
        for _ in range(3):
            db.compact()
        stop.set()
        t.join()
        model = db.to_dict()
        assert all(model[k] == v for k, v in written.items())
    with walstore.open(path, segment_size=8192) as db:
        assert db.to_dict() == model


def test_automatic_compaction_bounds_disk_use_and_reopen(tmp_path: Path) -> None:
    """10,000 keys overwritten 200,000 times (bench/compaction.py runs 1,000,000, and
    measures how far a writer that never waits gets ahead of the background compactions).
    Every 20,000 puts the writer lets a running compaction finish, so how many compactions
    run does not depend on how fast this machine writes compared with how fast it compacts."""
    path = tmp_path / "db"
    live = 0
    peak = 0
    with walstore.open(
        path, durability="none", segment_size=1 << 20, compact_min_bytes=2 << 20, compact_ratio=1.0
    ) as db:
        for i in range(200_000):
            db[f"key{i % 10_000:06d}"] = b"v" * 50
            if i % 5000 == 0:
                peak = max(peak, du(path))
            if i % 20_000 == 0 and db._compact_thread is not None:
                db._compact_thread.join()
        live = sum(len(k) + 50 for k in db)
        assert db.stats()["compactions"] >= 3
    peak = max(peak, du(path))
    assert peak < 20 * live + (8 << 20), (peak, live)
    with walstore.open(path) as db:
        assert len(db) == 10_000


def du(path: Path) -> int:
    """Bytes of the store's files; a file a background compaction removes meanwhile counts 0."""
    total = 0
    for p in path.iterdir():
        try:
            total += p.stat().st_size if p.is_file() else 0
        except FileNotFoundError:
            pass
    return total


def compacted(db: walstore.Store, keys: range) -> snapshot.SnapshotInfo:
    """k{i} = i for each i in `keys`, then a compaction: its snapshot's info."""
    for i in keys:
        db[f"k{i}"] = i
    info = db.compact()
    assert info is not None
    return info


def test_corrupt_newest_snapshot_with_log_gone_is_a_clear_error(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "db"
    with walstore.open(path, segment_size=4096, auto_compact=False) as db:
        info = compacted(db, range(300))
    flip_bit(Path(info.path), 200)
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file() and p.name != "LOCK"}
    with pytest.raises(walstore.CorruptionError) as err:
        walstore.open(path, segment_size=4096)
    assert os.path.basename(info.path) in str(err.value) and "cannot be rebuilt" in str(err.value)
    after = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file() and p.name != "LOCK"}
    assert after == before


def test_snapshot_holding_a_delete_is_corruption_not_applied(tmp_path: Path, backend: str) -> None:
    """A snapshot is the whole state: only PUTs. A DELETE in one, even with a correct CRC,
    is damage named by file and offset, not an operation to apply."""
    from walstore.fileapi import OSFileAPI

    path = tmp_path / "db"
    with walstore.open(path, segment_size=4096, auto_compact=False) as db:
        for i in range(50):
            db[f"k{i}"] = i
        info = db.compact()
    assert info is not None and names(path, "seg-*.wal") != []
    snap = Path(info.path)
    store_id = fmt.decode_file_header(snap.read_bytes()[: fmt.FILE_HEADER_SIZE]).store_id
    put = fmt.encode_op(fmt.OP_PUT, fmt.op_flags(True, fmt.VALUE_BYTES), b"k0", b"v")
    delete = fmt.encode_op(fmt.OP_DELETE, fmt.op_flags(True, fmt.VALUE_BYTES), b"k1", b"")
    snapshot.write_snapshot(OSFileAPI(), str(path), store_id, info.seq, [put + delete])
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file() and p.name != "LOCK"}
    with pytest.raises(walstore.CorruptionError) as err:
        walstore.open(path, segment_size=4096)
    assert snap.name in str(err.value)
    assert f"not a put at payload offset {len(put)}" in str(err.value)
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file() and p.name != "LOCK"} == before


def two_snapshots(db: walstore.Store) -> tuple[snapshot.SnapshotInfo, snapshot.SnapshotInfo]:
    """k0..k199, a compaction, k200..k299, a compaction: both snapshots' infos."""
    return compacted(db, range(200)), compacted(db, range(200, 300))


def test_corrupt_newest_snapshot_falls_back_to_older_one_and_reports(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "db"
    with walstore.open(path, segment_size=4096, auto_compact=False, keep_snapshots=2) as db:
        first, newest = two_snapshots(db)
        model = db.to_dict()
    assert names(path, "snap-*.snap") == [os.path.basename(first.path), os.path.basename(newest.path)]
    flip_bit(Path(newest.path), 300)
    with walstore.open(path, segment_size=4096, keep_snapshots=2) as db:
        assert db.to_dict() == model
        assert db.recovery.snapshot_seq == first.seq
        assert db.recovery.rejected_snapshots == [newest.path]
    kept = [p.name for p in (path / fmt.QUARANTINE_DIR).iterdir()]
    assert any(n.endswith(os.path.basename(newest.path)) for n in kept)


def test_a_snapshot_damaged_after_open_is_quarantined_by_the_next_compaction(tmp_path: Path, backend: str) -> None:
    """A snapshot that goes bad while the store is open (checked good by open()) fails its
    checks at the next compaction, which rebuilds the state from the older snapshot and the
    log after it, and moves the damaged one to quarantine/ with a report, instead of keeping
    it until a later compaction removes it as covered, unreported."""
    import json

    path = tmp_path / "db"
    with walstore.open(path, segment_size=4096, auto_compact=False, keep_snapshots=2) as db:
        first, second = two_snapshots(db)
        flip_bit(Path(second.path), 300)
        for i in range(300, 350):
            db[f"k{i}"] = i
        third = db.compact()
        assert third is not None and third.seq == db.last_seq
        assert [os.path.basename(q) for q in third.quarantined] == [
            n for n in names(path / fmt.QUARANTINE_DIR, "*.snap") if n.endswith(os.path.basename(second.path))
        ]
        assert names(path, "snap-*.snap") == [os.path.basename(first.path), os.path.basename(third.path)]
        model = db.to_dict()
        for i in range(350, 360):
            db[f"k{i}"] = i
            model[f"k{i}"] = i
        assert db.compact() is not None  # and compactions go on
    (report,) = [json.loads(p.read_text()) for p in (path / fmt.QUARANTINE_DIR).glob("*.json")]
    assert report["action"] == "compaction" and report["file"] == os.path.basename(second.path)
    assert "failed its checks" in report["reason"]
    with walstore.open(path, segment_size=4096, keep_snapshots=2) as db:
        assert db.to_dict() == model
        assert db.recovery.rejected_snapshots == []


def test_compaction_with_the_only_snapshot_damaged_names_it_and_removes_nothing(tmp_path: Path, backend: str) -> None:
    """With the log the damaged snapshot covered gone, a compaction cannot rebuild the state:
    it fails naming the snapshot, writes and removes nothing, and the store keeps working."""
    path = tmp_path / "db"
    with walstore.open(path, segment_size=4096, auto_compact=False) as db:
        info = compacted(db, range(200))
        flip_bit(Path(info.path), 300)
        db["after"] = 1
        segments = names(path, "seg-*.wal")
        with pytest.raises(walstore.SnapshotError) as err:
            db.compact()
        assert os.path.basename(info.path) in str(err.value) and "nothing removed" in str(err.value)
        assert names(path, "snap-*.snap") == [os.path.basename(info.path)]
        assert set(segments) <= set(names(path, "seg-*.wal"))  # the seal started a segment; none went
        db["still"] = 2
        assert db["still"] == 2


def test_failed_snapshot_write_changes_nothing_and_does_not_poison(tmp_path: Path) -> None:
    fs = FailingFileAPI()
    path = tmp_path / "db"
    db = walstore.open(path, segment_size=4096, auto_compact=False, fs=fs)
    for i in range(100):
        db[f"k{i}"] = i
    db._writer.seal_for_snapshot()  # seal and cut now, so the only fsync left to fail is the snapshot's
    db._writer.finish_seal(())
    segs_before = names(path, "seg-*.wal")
    fs.fail["fsync"] = (fs.calls.get("fsync", 0), ENOSPC)
    with pytest.raises(walstore.DiskFullError):
        db.compact()
    del fs.fail["fsync"]
    assert names(path, "snap-*") == []  # the temp snapshot is gone too
    assert set(segs_before) <= set(names(path, "seg-*.wal"))
    db["after"] = 1  # writers are not poisoned by a failed snapshot
    assert db.compact() is not None
    db.close()
    with walstore.open(path, segment_size=4096) as db2:
        assert len(db2) == 101


def test_interrupted_compaction_leftovers_are_cleaned(tmp_path: Path, backend: str) -> None:
    """A temp snapshot, and a snapshot renamed into place whose old segments remain."""
    path = tmp_path / "db"
    db = walstore.open(path, segment_size=4096, auto_compact=False)
    for i in range(300):
        db[f"k{i}"] = i
    seq = db._writer.seal_for_snapshot()
    entries = {f"k{i}": i for i in range(300)}
    model = db.to_dict()
    crash(db)
    payloads = snapshot.kv_payloads((k, snapshot.CodecBytes(str(v).encode())) for k, v in entries.items())
    snapshot.write_snapshot(walstore.fileapi.DEFAULT, str(path), db._core.identity.store_id, seq, payloads)
    (path / (fmt.snapshot_name(seq + 5) + ".tmp")).write_bytes(b"half a snapshot")
    assert len(names(path, "seg-*.wal")) > 2
    with walstore.open(path, segment_size=4096) as db2:
        assert db2.to_dict() == model
        assert db2.recovery.snapshot_seq == seq
    assert names(path, "seg-*.wal") == [fmt.segment_name(seq + 1)]
    assert not list(path.glob("*.tmp"))


def _takes_o_direct(directory: Path) -> bool:
    """The filesystem under `directory` opens files with O_DIRECT (decided before the test, so a
    snapshot that should have used it and did not still fails the test)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    probe = directory / "direct.probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | flag, 0o644)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True


@pytest.mark.parametrize("op", ["open", "pwrite", "fdatasync", "ftruncate", "fsync", "rename"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_snapshot_write_failing_at_each_step_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, op: str, err: int
) -> None:
    """Every file operation of a snapshot write (several aligned writes, a write-behind
    fdatasync, the last block cut back by ftruncate under O_DIRECT, fsync, rename) failing:
    DiskFullError or SnapshotError, no temp file, the log as it was, writers not poisoned,
    and the next compaction succeeds."""
    if op == "ftruncate" and not _takes_o_direct(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT: a snapshot here is written buffered, no ftruncate")
    monkeypatch.setattr(snapshot, "CHUNK_BYTES", 200)
    monkeypatch.setattr(snapshot, "BLOCK_BYTES", 0)
    for name in ("SYNC_FIRST", "SYNC_MIN", "SYNC_MAX"):
        monkeypatch.setattr(snapshot, name, 2 * snapshot.ALIGN)
    fs = FaultyFileAPI()
    path = tmp_path / "db"
    db = walstore.open(path, segment_size=4096, auto_compact=False, fs=fs)
    for i in range(500):
        db[f"k{i % 300}"] = "v" * (i % 200)
    model = db.to_dict()
    db._writer.seal_for_snapshot()
    segs_before = names(path, "seg-*.wal")
    fault = fs.fail(op, nth=2 if op == "pwrite" else 1, err=err, path=".snap")
    with pytest.raises(walstore.SnapshotError if err != errno.ENOSPC else walstore.DiskFullError):
        db.compact()
    assert fault.fired == 1
    fs.clear()
    assert names(path, "snap-*") == []  # the temp snapshot is gone too
    assert names(path, "seg-*.wal") == segs_before
    db["after"] = 1  # writers are not poisoned by a failed snapshot
    model["after"] = 1
    assert db.compact() is not None
    db.close()
    with walstore.open(path, segment_size=4096) as db2:
        assert db2.to_dict() == model


def test_cleanup_takes_a_turn_for_each_file_it_removes(tmp_path: Path, backend: str) -> None:
    """remove_covered with a `turn`: each unlink and the directory fsync after it inside
    its own turn, so freeing a segment's blocks holds up one commit at most."""
    path = tmp_path / "db"
    with walstore.open(path, segment_size=4096, auto_compact=False, keep_snapshots=2) as db:
        for i in range(300):
            db[f"k{i % 50}"] = i
        first = db.compact()
        for i in range(300):
            db[f"k{i % 50}"] = -i
        model = db.to_dict()
        assert first is not None and db.compact() is not None
    turns: list[str] = []
    fs = walstore.fileapi.OSFileAPI()
    real_unlink, real_fsync_dir = fs.unlink, fs.fsync_dir
    inside = [False]

    def unlink(p: str) -> None:
        turns.append(f"unlink in turn: {inside[0]}")
        real_unlink(p)

    def fsync_dir(d: str) -> None:
        turns.append(f"fsync_dir in turn: {inside[0]}")
        real_fsync_dir(d)

    fs.unlink, fs.fsync_dir = unlink, fsync_dir  # type: ignore[method-assign]

    @contextlib.contextmanager
    def turn() -> Iterator[None]:
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    covered = names(path, "seg-*.wal")[:-1]
    assert len(covered) > 3  # the segments after the older snapshot, kept with it
    snapshot_seqs = [int(n[5:-5]) for n in names(path, "snap-*.snap")]
    assert len(snapshot_seqs) == 2
    removed = snapshot.remove_covered(fs, str(path), max(snapshot_seqs), 1, turn)
    assert sorted(removed) == sorted(covered + [fmt.snapshot_name(min(snapshot_seqs))])
    assert turns == ["unlink in turn: True", "fsync_dir in turn: True"] * len(removed)
    with walstore.open(path, segment_size=4096) as db:
        assert db.to_dict() == model


def test_a_covered_file_over_a_step_is_freed_a_step_per_turn(tmp_path: Path, monkeypatch: Any) -> None:
    """remove_covered with a `turn` frees a file bigger than 1.25 steps in several turns:
    renamed to its FREE_SUFFIX name (the rename fsynced) in the first, cut back by a step
    from its end in each, unlinked (and the directory fsynced) in the last; a crash between
    turns leaves only a `.tmp` file, which open() removes."""
    path = tmp_path / "db"
    with walstore.open(path, segment_size=64 << 10, auto_compact=False, preallocate=False) as db:
        for i in range(1500):
            db[f"k{i % 50}"] = "v" * 100
        seq = db.compact()
    assert seq is not None
    # make covered segments again (compact removed those it covered), and keep an older snapshot
    with walstore.open(path, segment_size=64 << 10, auto_compact=False, preallocate=False, keep_snapshots=2) as db:
        for i in range(1500):
            db[f"k{i % 50}"] = "w" * 100
        model = db.to_dict()
        assert db.compact() is not None
    snaps = sorted(int(n[5:-5]) for n in names(path, "snap-*.snap"))
    doomed = snapshot.covered_files(str(path), snaps[-1], 1)
    sizes = {p: os.path.getsize(p) for p in doomed}
    big = [p for p, n in sizes.items() if n > 20 << 10]
    assert big, sizes
    monkeypatch.setattr(snapshot, "FREE_STEP_FIRST", 16 << 10)
    monkeypatch.setattr(snapshot, "_free_rate", 0.0)
    calls: list[tuple[int, str, str, int]] = []
    fs = walstore.fileapi.OSFileAPI()
    turn_no = [0]
    inside = [False]
    fds: dict[int, str] = {}
    real = {n: getattr(fs, n) for n in ("unlink", "fsync_dir", "rename", "open", "ftruncate", "close")}

    def record(name: str) -> Any:
        def call(*args: Any) -> Any:
            assert name == "close" or inside[0], f"{name} outside a turn"
            if name in ("ftruncate", "close"):
                target = fds.get(args[0], "?")
            else:
                target = os.path.basename(str(args[-1] if name == "rename" else args[0]))
            size = args[1] if name == "ftruncate" else -1
            calls.append((turn_no[0], name, target, size))
            result = real[name](*args)
            if name == "open":
                fds[result] = os.path.basename(str(args[0]))
            return result

        return call

    for n in real:
        setattr(fs, n, record(n))

    @contextlib.contextmanager
    def turn() -> Iterator[None]:
        turn_no[0] += 1
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    removed = snapshot.remove_covered(fs, str(path), snaps[-1], 1, turn)
    assert sorted(removed) == sorted(os.path.basename(p) for p in doomed)
    for p in big:
        name = os.path.basename(p)
        freed = name + snapshot.FREE_SUFFIX
        mine = [c for c in calls if c[2] in (name, freed)]
        assert mine[0][1:3] == ("rename", freed), mine
        turns_used = sorted({c[0] for c in mine})
        in_turn = [[c[1] for c in calls if c[0] == t and c[1] != "close"] for t in turns_used]
        assert in_turn[0] == ["rename", "fsync_dir", "open", "ftruncate"], in_turn
        assert all(steps == ["ftruncate"] for steps in in_turn[1:-1]), in_turn
        assert in_turn[-1] == ["unlink", "fsync_dir"], in_turn
        cuts = [c[3] for c in mine if c[1] == "ftruncate"]
        assert len(cuts) == len(turns_used) - 1 >= 1  # one step a turn, then the unlink
        assert all(a - b == 16 << 10 for a, b in zip([sizes[p]] + cuts, cuts)), cuts
        assert cuts[-1] <= (16 << 10) * 5 // 4  # the last turn frees at most 1.25 steps
    assert not list(path.glob("*" + snapshot.FREE_SUFFIX))
    with walstore.open(path) as db:
        assert db.to_dict() == model


def test_the_free_step_follows_the_rate_the_last_big_step_ran_at(monkeypatch: Any) -> None:
    """FREE_STEP_FIRST before any rate; then FREE_STEP_MAX_S at the rate of the last step
    that freed at least FREE_STEP_MIN (smaller ones say little), never under FREE_STEP_MIN."""
    monkeypatch.setattr(snapshot, "_free_rate", 0.0)
    assert snapshot._free_step() == snapshot.FREE_STEP_FIRST
    snapshot._timed_free(1 << 20, lambda: None)  # too small to time
    assert snapshot._free_step() == snapshot.FREE_STEP_FIRST
    snapshot._timed_free(snapshot.FREE_STEP_MIN, time.sleep, 0.02)
    rate = snapshot._free_rate
    assert 0 < rate <= snapshot.FREE_STEP_MIN / 0.02
    step = snapshot._free_step()
    assert step % 4096 == 0 and step == max(snapshot.FREE_STEP_MIN, int(rate * snapshot.FREE_STEP_MAX_S) // 4096 * 4096)
    monkeypatch.setattr(snapshot, "_free_rate", 1e9)
    assert snapshot._free_step() == int(1e9 * snapshot.FREE_STEP_MAX_S) // 4096 * 4096
    monkeypatch.setattr(snapshot, "_free_rate", 1e6)
    assert snapshot._free_step() == snapshot.FREE_STEP_MIN


def test_covered_files_are_freed_smallest_first_and_the_first_sets_the_rate(tmp_path: Path, monkeypatch: Any) -> None:
    """With a turn, the smallest file goes first: one of FREE_STEP_MIN or more gives the
    rate before a bigger one is stepped (no measured rate: FREE_STEP_FIRST)."""
    monkeypatch.setattr(snapshot, "_free_rate", 0.0)
    monkeypatch.setattr(snapshot, "FREE_STEP_FIRST", 8 << 20)
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    big.write_bytes(b"b" * (12 << 20))
    small.write_bytes(b"s" * (5 << 20))
    fs = walstore.fileapi.OSFileAPI()
    seen: list[tuple[str, float]] = []
    real_unlink, real_rename = fs.unlink, fs.rename

    def unlink(p: str) -> None:
        seen.append((os.path.basename(p), snapshot._free_rate))
        real_unlink(p)

    def rename(src: str, dst: str) -> None:
        seen.append((os.path.basename(src), snapshot._free_rate))
        real_rename(src, dst)

    fs.unlink, fs.rename = unlink, rename  # type: ignore[method-assign]
    removed = snapshot.remove_covered(fs, str(tmp_path), 0, 1, contextlib.nullcontext, [str(big), str(small)])
    assert removed == ["small.bin", "big.bin"]
    assert seen[0] == ("small.bin", 0.0)
    assert seen[1][0].startswith("big.bin") and seen[1][1] > 0  # the big one starts with a measured rate
    assert not big.exists() and not small.exists()


def test_open_removes_a_covered_file_left_half_freed(tmp_path: Path) -> None:
    """A crash between the steps of freeing a covered file leaves `<name>.free.tmp`: open()
    removes it, and the state is whole."""
    path = tmp_path / "db"
    with walstore.open(path) as db:
        db["a"] = 1
    left = path / ("seg-00000000000000000001.wal" + snapshot.FREE_SUFFIX)
    left.write_bytes(b"x" * 5000)
    with walstore.open(path) as db:
        assert db.to_dict() == {"a": 1}
    assert not left.exists()


class RecordingFS(walstore.fileapi.OSFileAPI):
    """Records each close (by the path of the fd's file, renames followed) and unlink, in order."""

    def __init__(self) -> None:
        self.paths: dict[int, str] = {}
        self.events: list[tuple[str, str]] = []

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        fd = super().open(path, flags, mode)
        self.paths[fd] = path
        return fd

    def close(self, fd: int) -> None:
        self.events.append(("close", self.paths.pop(fd, "?")))
        super().close(fd)

    def unlink(self, path: str) -> None:
        self.events.append(("unlink", path))
        super().unlink(path)

    def rename(self, src: str, dst: str) -> None:
        super().rename(src, dst)
        for fd, p in self.paths.items():  # an fd opened under a temporary name
            if p == src:
                self.paths[fd] = dst


def test_the_sealed_segment_is_closed_before_its_unlink(tmp_path: Path) -> None:
    """The segment a compaction seals, covered by its snapshot, is closed before it is
    unlinked: its blocks are freed (and trimmed, on a filesystem mounted with `discard`)
    at the unlink, in that unlink's held turn, not at a close after it."""
    fs = RecordingFS()
    path = tmp_path / "db"
    with walstore.open(path, segment_size=64 << 10, auto_compact=False, fs=fs) as db:
        for i in range(100):
            db[f"k{i}"] = i
        sealed = db._writer._seg.path  # the active segment: the compaction seals it
        assert db.compact() is not None
        assert not os.path.exists(sealed)
    closes = [i for i, (what, p) in enumerate(fs.events) if what == "close" and p == sealed]
    unlinks = [i for i, (what, p) in enumerate(fs.events) if what == "unlink" and p == sealed]
    assert closes and unlinks == [unlinks[0]]
    assert closes[0] < unlinks[0], fs.events


def _chain_sizes(path: Path) -> list[tuple[int, int]]:
    """(file size, the next segment's prev_size) for every segment but the last."""
    segs = sorted(path.glob("seg-*.wal"))
    out = []
    for seg, nxt in zip(segs, segs[1:]):
        head = fmt.decode_file_header(nxt.read_bytes()[: fmt.FILE_HEADER_SIZE])
        out.append((seg.stat().st_size, head.prev_size))
    return out


def test_segment_sealed_for_a_snapshot_is_cut_after_it_or_removed(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The segment a compaction seals is cut back to its records once the compaction is
    over (kept with an older snapshot, or after a failed snapshot), or removed whole
    (covered by the new snapshot): never left longer than its successor says it is."""
    path = tmp_path / "db"
    with walstore.open(path, auto_compact=False, keep_snapshots=2) as db:
        for i in range(50):
            db[f"k{i}"] = i
        assert db.compact() is not None
        for i in range(50):
            db[f"k{i}"] = -i
        with monkeypatch.context() as m:

            def fail(*args: object, **kwargs: object) -> None:
                raise walstore.SnapshotError("injected")

            m.setattr(snapshot, "write_snapshot", fail)
            with pytest.raises(walstore.SnapshotError):
                db.compact()
        chain = _chain_sizes(path)
        assert chain and all(size == prev for size, prev in chain)  # cut after the failure
        db["x"] = 1
        assert db.compact() is not None  # keeps the older snapshot and the log after it
        chain = _chain_sizes(path)
        assert chain and all(size == prev for size, prev in chain)
        model = db.to_dict()
    with walstore.open(path) as db:
        assert db.to_dict() == model
