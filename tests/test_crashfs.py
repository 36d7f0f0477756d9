"""Tests of walstore.crashfs itself: the recorder, the crash model, and the fault injector.

The crash-state tests are only as good as the model: these check that
it drops what no sync covered, keeps what one did, tears writes only within
the bytes written, needs a directory fsync for names, never counts writes a
failed fsync should have covered, and that the recorder matches the real
directory, resolves descriptors to files, and is safe across threads.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from typing import Any

import crashcheck as cc
import pytest

from walstore import crashfs
from walstore.crashfs import (
    CREATE,
    DIRSYNC,
    DROP,
    GARBAGE,
    KEEP,
    RENAME,
    SECTOR,
    SYNC,
    TORN,
    WRITE,
    ZERO,
    Choice,
    CrashModel,
    CrashState,
    FaultyFileAPI,
    Op,
    RecordingFileAPI,
    SimulatedCrash,
    Snapshot,
)
from walstore.fileapi import OSFileAPI

W = os.O_WRONLY | os.O_CREAT
RW = os.O_RDWR | os.O_CREAT


def _durable(model: CrashModel, i: int | None = None) -> crashfs.Image:
    return model.image_at(len(model) if i is None else i, {})


def _everything(model: CrashModel, i: int | None = None) -> crashfs.Image:
    n = len(model) if i is None else i
    return model.image_at(n, {op.index: Choice(KEEP) for op in model.pending(n)})


def test_records_operations_and_resolves_descriptors(tmp_path: Any) -> None:
    rec = RecordingFileAPI(tmp_path / "r")
    d = os.path.join(rec.root, "d")
    rec.mkdir(d)
    rec.fsync_dir(rec.root)
    fd = rec.open(os.path.join(d, "a.tmp"), RW)
    rec.pwrite(fd, b"hello", 0)
    rec.fallocate(fd, 0, 100)
    rec.fdatasync(fd)
    rec.rename(os.path.join(d, "a.tmp"), os.path.join(d, "a"))
    rec.pwrite(fd, b"!", 5)  # the descriptor now names d/a
    rec.ftruncate(fd, 6)
    rec.fsync(fd)
    rec.close(fd)
    rec.fsync_dir(d)
    rec.unlink(os.path.join(d, "a"))
    kinds = [(op.kind, op.path) for op in rec.ops]
    assert kinds == [
        ("mkdir", "d"),
        ("dirsync", ""),
        ("create", "d/a.tmp"),
        ("write", "d/a.tmp"),
        ("fallocate", "d/a.tmp"),
        ("sync", "d/a.tmp"),
        ("rename", "d/a.tmp"),
        ("write", "d/a"),
        ("truncate", "d/a"),
        ("sync", "d/a"),
        ("close", "d/a"),
        ("dirsync", "d"),
        ("unlink", "d/a"),
    ]
    ops = rec.ops
    assert ops[6].dst == "d/a"
    assert len({op.ino for op in ops if op.path.startswith("d/a")}) == 1
    assert ops[5].start == 5 and ops[9].start == 9
    text = crashfs.format_ops(ops, upto=7)
    assert "crash here" in text and "d/a.tmp -> d/a" in text


def test_final_image_is_the_real_directory(tmp_path: Any) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "old").write_bytes(b"before")
    rec = RecordingFileAPI(tmp_path / "r")
    fd = rec.open(os.path.join(rec.root, "old"), os.O_RDWR)
    rec.pwrite(fd, b"X", 2)
    rec.close(fd)
    fd = rec.open(os.path.join(rec.root, "new"), W)
    rec.pwrite(fd, b"abc", 10)
    rec.close(fd)
    model = rec.model()
    assert model.final_image() == crashfs.read_tree(rec.root)
    assert _durable(model) == {"old": b"before"}  # nothing synced: the start


def test_unsynced_data_is_lost_synced_data_is_kept(tmp_path: Any) -> None:
    rec = RecordingFileAPI(tmp_path / "r")
    fd = rec.open(os.path.join(rec.root, "f"), W)
    rec.fsync_dir(rec.root)
    rec.pwrite(fd, b"one", 0)
    rec.fdatasync(fd)
    rec.pwrite(fd, b"two", 3)
    model = rec.model()
    assert _durable(model) == {"f": b"one"}
    assert _everything(model) == {"f": b"onetwo"}
    assert _durable(model, 2) == {"f": b""}  # the create is durable, the data not yet


def test_prewritten_zeros_fall_back_to_zeros(tmp_path: Any) -> None:
    rec = RecordingFileAPI(tmp_path / "r")
    fd = rec.open(os.path.join(rec.root, "seg"), W)
    rec.pwrite(fd, bytes(4096), 0)
    rec.fdatasync(fd)
    rec.fsync_dir(rec.root)
    rec.pwrite(fd, b"record", 64)
    model = rec.model()
    assert _durable(model) == {"seg": bytes(4096)}
    img = _everything(model)["seg"]
    assert img is not None and img[64:70] == b"record" and len(img) == 4096


def test_names_need_a_directory_fsync(tmp_path: Any) -> None:
    rec = RecordingFileAPI(tmp_path / "r")
    fd = rec.open(os.path.join(rec.root, "x.tmp"), W)
    rec.pwrite(fd, b"data", 0)
    rec.fsync(fd)  # fsync of the file does not make its name durable
    rec.close(fd)
    assert _durable(rec.model()) == {}
    rec.fsync_dir(rec.root)
    rec.rename(os.path.join(rec.root, "x.tmp"), os.path.join(rec.root, "x"))
    model = rec.model()
    assert _durable(model) == {"x.tmp": b"data"}
    assert _everything(model) == {"x": b"data"}
    rec.fsync_dir(rec.root)
    assert _durable(rec.model()) == {"x": b"data"}


def test_rename_that_reached_the_disk_without_its_create(tmp_path: Any) -> None:
    rec = RecordingFileAPI(tmp_path / "r")
    fd = rec.open(os.path.join(rec.root, "t"), W)
    rec.pwrite(fd, b"zz", 0)
    rec.fdatasync(fd)
    rec.rename(os.path.join(rec.root, "t"), os.path.join(rec.root, "u"))
    model = rec.model()
    ren = [op for op in model.ops if op.kind == RENAME][0]
    assert model.image_at(len(model), {ren.index: Choice(KEEP)}) == {"u": b"zz"}


def test_files_in_a_lost_directory_are_unreachable(tmp_path: Any) -> None:
    rec = RecordingFileAPI(tmp_path / "r")
    q = os.path.join(rec.root, "q")
    rec.mkdir(q)
    fd = rec.open(os.path.join(q, "f"), W)
    rec.fsync(fd)
    rec.close(fd)
    rec.fsync_dir(q)  # q's entries are durable, q itself is not
    assert _durable(rec.model()) == {}
    rec.fsync_dir(rec.root)
    assert _durable(rec.model()) == {"q": None, "q/f": b""}


def test_a_sync_covers_only_what_was_written_before_it_began() -> None:
    # Thread A's fdatasync began at index 2; thread B's write (index 2) landed while it ran.
    init = Snapshot({"f": 1}, {1: b""}, set())
    ops = [
        Op(0, WRITE, "f", 1, 0, b"aaaa"),
        Op(1, "open", "f", 1),
        Op(2, WRITE, "f", 1, 4, b"bbbb"),
        Op(3, SYNC, "f", 1, start=2),
    ]
    model = CrashModel(init, ops)
    assert model.cover[0] == 3 and model.cover[2] == crashfs.NEVER
    assert _durable(model) == {"f": b"aaaa"}
    assert [op.index for op in model.pending(4)] == [2]


def test_a_failed_fsync_covers_nothing_ever() -> None:
    init = Snapshot({"f": 1}, {1: b""}, set())
    ops = [
        Op(0, WRITE, "f", 1, 0, b"lost"),
        Op(1, crashfs.SYNC_FAILED, "f", 1, start=1),
        Op(2, WRITE, "f", 1, 4, b"kept"),
        Op(3, SYNC, "f", 1, start=3),  # a retry "succeeds"
    ]
    model = CrashModel(init, ops)
    assert model.cover[0] == crashfs.NEVER and model.cover[2] == 3
    assert _durable(model) == {"f": bytes(4) + b"kept"}


def test_torn_write_sectors() -> None:
    init = Snapshot({"f": 1}, {1: b"\x01" * 600}, set())
    # 1536 bytes at offset 100: pieces [100,512) [512,1024) [1024,1536) [1536,1636)
    data = bytes(range(256)) * 6
    ops = [Op(0, WRITE, "f", 1, 100, data)]
    model = CrashModel(init, ops)
    assert crashfs.sector_pieces(100, len(data)) == [(100, 512), (512, 1024), (1024, 1536), (1536, 1636)]
    img = model.image_at(1, {0: Choice(TORN, (KEEP, DROP, ZERO, GARBAGE), seed=7)})["f"]
    assert img is not None
    assert img[:100] == b"\x01" * 100  # bytes the write did not touch are never damaged
    assert img[100:512] == data[:412]
    assert img[512:600] == b"\x01" * 88 and img[600:1024] == bytes(424)  # dropped: old bytes, then the hole
    assert img[1024:1536] == bytes(512)
    assert len(img) == 1636 and img[1536:1636] != data[1436:] and img[1536:1636] != bytes(100)
    again = model.image_at(1, {0: Choice(TORN, (KEEP, DROP, ZERO, GARBAGE), seed=7)})
    assert again["f"] == img  # garbage is seeded
    assert all(b % SECTOR == 0 for a, b in crashfs.sector_pieces(100, len(data))[:-1])


def test_size_survived_data_did_not() -> None:
    init = Snapshot({"f": 1}, {1: b"head"}, set())
    ops = [Op(0, WRITE, "f", 1, 2, b"XXXXXX")]
    model = CrashModel(init, ops)
    assert model.image_at(1, {0: Choice(ZERO)}) == {"f": b"head" + bytes(4)}
    assert model.image_at(1, {0: Choice(KEEP)}) == {"f": b"heXXXXXX"}
    assert model.image_at(1, {}) == {"f": b"head"}


def test_variants_cover_every_kind_and_are_seeded(tmp_path: Any) -> None:
    rec = RecordingFileAPI(tmp_path / "r")
    fd = rec.open(os.path.join(rec.root, "f"), W)
    rec.pwrite(fd, b"x" * 2000, 0)
    rec.pwrite(fd, b"y" * 700, 2000)
    model = rec.model()
    names = {st.variant.split(" ")[0] for st in model.variants(len(model), random.Random(1))}
    assert {"durable", "all", "prefix", "random", "torn", "sizes", "last", "directory"} <= names
    a = [(s.index, s.variant, s.choices) for s in crashfs.iter_states(model, 5)]
    b = [(s.index, s.variant, s.choices) for s in crashfs.iter_states(model, 5)]
    assert a == b
    assert len(list(crashfs.iter_states(model, 5, limit=3))) == 3
    many = list(crashfs.iter_states(model, 5, limit=200))
    assert len(many) > len(a)  # a bigger budget adds random variants


def test_crash_points_and_describe(tmp_path: Any) -> None:
    rec = RecordingFileAPI(tmp_path / "r")
    fd = rec.open(os.path.join(rec.root, "f"), W)
    rec.pwrite(fd, b"abc", 0)
    rec.close(fd)
    model = rec.model()
    assert model.crash_points() == [0, 1, 2, 3]
    st = CrashState(2, "all reached the disk", {0: Choice(KEEP), 1: Choice(KEEP)}, 9)
    text = st.describe(model)
    assert "crash at operation 2" in text and "0:keep" in text


def test_materialize_and_digest(tmp_path: Any) -> None:
    img: crashfs.Image = {"a": None, "a/b": b"1", "c": b""}
    d = crashfs.materialize(img, tmp_path / "m")
    assert crashfs.read_tree(d) == img
    assert crashfs.image_digest(img) == crashfs.image_digest(dict(reversed(list(img.items()))))
    assert crashfs.image_digest(img) != crashfs.image_digest({**img, "c": b"\0"})
    with pytest.raises(FileExistsError):
        crashfs.materialize(img, d)


def test_outside_the_root_is_not_recorded(tmp_path: Any) -> None:
    rec = RecordingFileAPI(tmp_path / "r")
    fd = rec.open(str(tmp_path / "elsewhere"), W)
    rec.pwrite(fd, b"x", 0)
    rec.fdatasync(fd)
    rec.close(fd)
    rec.fsync_dir(str(tmp_path))
    assert rec.ops == []


def test_files_made_outside_the_api_are_adopted(tmp_path: Any) -> None:
    rec = RecordingFileAPI(tmp_path / "r")
    with open(os.path.join(rec.root, "LOCKISH"), "wb") as f:
        f.write(b"pid")
    fd = rec.open(os.path.join(rec.root, "LOCKISH"), os.O_RDWR)
    rec.pwrite(fd, b"P", 0)
    rec.close(fd)
    model = rec.model()
    assert _durable(model) == {"LOCKISH": b"pid"}
    assert model.final_image() == {"LOCKISH": b"Pid"}


def test_clone_is_recorded_as_a_copy(tmp_path: Any) -> None:
    rec = RecordingFileAPI(tmp_path / "r")
    src = os.path.join(rec.root, "src")
    with open(src, "wb") as f:
        f.write(b"s" * 5000)
    rec2 = RecordingFileAPI(tmp_path / "r")
    rec2.clone(src, os.path.join(rec2.root, "dst"))
    ops = rec2.ops
    assert [op.kind for op in ops] == [CREATE, WRITE, "close"]
    assert rec2.model().final_image()["dst"] == b"s" * 5000


def test_threads_are_recorded_safely(tmp_path: Any) -> None:
    rec = RecordingFileAPI(tmp_path / "r")
    n_threads, n_writes = 4, 50

    def work(t: int) -> None:
        fd = rec.open(os.path.join(rec.root, f"f{t}"), W)
        for k in range(n_writes):
            rec.pwrite(fd, bytes([t]) * 10, k * 10)
            if k % 7 == 0:
                rec.fdatasync(fd)
        rec.close(fd)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ops = rec.ops
    assert [op.index for op in ops] == list(range(len(ops)))
    assert sum(op.kind == WRITE for op in ops) == n_threads * n_writes
    assert rec.model().final_image() == crashfs.read_tree(rec.root)


def test_kill_after_and_revive(tmp_path: Any) -> None:
    rec = RecordingFileAPI(tmp_path / "r")
    fd = rec.open(os.path.join(rec.root, "f"), W)
    rec.kill_after(2)
    rec.pwrite(fd, b"ok", 0)
    with pytest.raises(SimulatedCrash):
        rec.pwrite(fd, b"no", 2)
    with pytest.raises(SimulatedCrash):
        rec.fsync_dir(rec.root)
    assert rec.dead
    with open(os.path.join(rec.root, "f"), "rb") as f:
        assert f.read() == b"ok"
    with pytest.raises(OSError):
        os.fstat(fd)  # the dead process's descriptors are closed
    zombie_ready = threading.Event()
    release = threading.Event()
    result: list[BaseException] = []

    def zombie() -> None:
        zombie_ready.set()
        release.wait()
        try:
            rec.fsync_dir(rec.root)
        except SimulatedCrash as exc:
            result.append(exc)

    t = threading.Thread(target=zombie)
    t.start()
    zombie_ready.wait()
    rec.revive()
    release.set()
    t.join()
    assert result, "a thread of the dead process was allowed to touch the disk"
    fd = rec.open(os.path.join(rec.root, "g"), W)
    rec.close(fd)
    assert [op.kind for op in rec.ops][-4:] == ["crash", "restart", CREATE, "close"]


# ---- FaultyFileAPI ----------------------------------------------------------------------


def test_fault_fires_on_the_nth_call_only(tmp_path: Any) -> None:
    fs = FaultyFileAPI()
    fs.fail("fdatasync", nth=3)
    fd = fs.open(str(tmp_path / "f"), W)
    fs.fdatasync(fd)
    fs.fdatasync(fd)
    with pytest.raises(OSError) as e:
        fs.fdatasync(fd)
    assert e.value.errno == errno.EIO
    fs.fdatasync(fd)
    fs.close(fd)
    assert fs.calls["fdatasync"] == 4 and len(fs.fired) == 1


def test_space_fault_until_cleared_and_partial_writes(tmp_path: Any) -> None:
    fs = FaultyFileAPI()
    fs.fail("space", nth=2, err=errno.ENOSPC, times=0, partial=0.5)
    fd = fs.open(str(tmp_path / "f"), W)  # space call 1: creates the file
    for _ in range(3):
        with pytest.raises(OSError) as e:
            fs.pwrite(fd, b"abcdefgh", 0)
        assert e.value.errno == errno.ENOSPC
    assert (tmp_path / "f").read_bytes() == b"abcd"  # the failing write stored a prefix
    with pytest.raises(OSError):
        fs.open(str(tmp_path / "g"), W)  # creating a file needs space too
    fs.fsync(fd)  # not a space call
    fs.clear()
    fs.pwrite(fd, b"abcdefgh", 0)
    fs.close(fd)
    assert (tmp_path / "f").read_bytes() == b"abcdefgh"


def test_fault_path_filter_and_rename(tmp_path: Any) -> None:
    fs = FaultyFileAPI()
    fs.fail("rename", path="seg-")
    (tmp_path / "a").write_bytes(b"")
    fs.rename(str(tmp_path / "a"), str(tmp_path / "b"))
    (tmp_path / "c").write_bytes(b"")
    with pytest.raises(OSError):
        fs.rename(str(tmp_path / "c"), str(tmp_path / "seg-1"))
    assert (tmp_path / "c").exists() and not (tmp_path / "seg-1").exists()


def test_short_writes_are_completed_by_the_retry_loop(tmp_path: Any) -> None:
    fs = FaultyFileAPI(short_writes=5)
    fd = fs.open(str(tmp_path / "f"), W)
    data = bytes(range(200))
    assert fs.pwrite(fd, data, 3) == 200
    fs.close(fd)
    assert (tmp_path / "f").read_bytes() == bytes(3) + data
    assert fs.short_write_count >= 200 // 5 - 1
    plain = OSFileAPI()
    fd = plain.open(str(tmp_path / "g"), W)
    plain.pwrite(fd, data, 0)  # without the fault, nothing is shortened
    plain.close(fd)
    assert fs.short_write_count < 60


def test_failed_fsync_is_reported_to_a_recorder_below(tmp_path: Any) -> None:
    rec = RecordingFileAPI(tmp_path / "r")
    fs = FaultyFileAPI(rec)
    fs.fail("fdatasync")
    fd = fs.open(os.path.join(rec.root, "f"), W)
    fs.fsync_dir(rec.root)
    fs.pwrite(fd, b"data", 0)
    with pytest.raises(OSError):
        fs.fdatasync(fd)
    fs.fdatasync(fd)  # "succeeds": the data is still not durable
    fs.close(fd)
    model = rec.model()
    assert [op.kind for op in model.ops].count(crashfs.SYNC_FAILED) == 1
    assert _durable(model) == {"f": b""}


def test_record_round_trips_through_json(tmp_path: Any) -> None:
    rec = RecordingFileAPI(tmp_path / "r")
    fd = rec.open(os.path.join(rec.root, "f"), W)
    rec.pwrite(fd, b"\x00\xff", 0)
    rec.fdatasync(fd)
    rec.fsync_dir(rec.root)
    rec.close(fd)
    model = rec.model()
    cc.save_record(model, str(tmp_path / "rec.json"))
    again = cc.load_record(str(tmp_path / "rec.json"))
    assert again.ops == model.ops and again.cover == model.cover
    assert again.final_image() == model.final_image()
    assert [op.kind for op in again.ops].count(DIRSYNC) == 1


def test_slow_syncs_still_sync(tmp_path: Any) -> None:
    rec = RecordingFileAPI(tmp_path / "r")
    fs = FaultyFileAPI(rec, sync_delay=0.001)
    fd = fs.open(os.path.join(rec.root, "f"), W)
    fs.pwrite(fd, b"x", 0)
    fs.fdatasync(fd)
    fs.close(fd)
    assert [op.kind for op in rec.ops] == [CREATE, WRITE, SYNC, "close"]
