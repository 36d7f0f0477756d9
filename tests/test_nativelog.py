"""The C log writer (walstore/nativelog.py, _native/logwrite.c) against the pure-Python reference.

Both writers must leave the same bytes on disk for the same commits, and the C
one must keep every guarantee of the reference: group commit, poisoning after
a failed fdatasync or write, a full disk failing only its commit, rolls and
close under concurrent committers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from storetools import FailingFileAPI, next_segment_then_compaction, segments

import walstore
from walstore import nativelog
from walstore.errors import DiskFullError, StoreClosedError, StorePoisonedError
from walstore.writer import LogWriter


def _c_writer_in_use() -> bool:
    from walstore import native

    return nativelog.BUILT and native.AVAILABLE


pytestmark = pytest.mark.skipif(
    not _c_writer_in_use()
    and (os.environ.get("WALSTORE_REQUIRE_NATIVE") != "1" or os.environ.get("WALSTORE_PURE") == "1"),
    reason="the C writer is not in use here (not built, or WALSTORE_PURE=1); WALSTORE_REQUIRE_NATIVE=1"
    " without WALSTORE_PURE makes these fail instead",
)


def _workload(db: walstore.Store) -> None:
    for i in range(300):
        db[f"k{i % 37}"] = f"value {i}" * (i % 5)
        if i % 7 == 0:
            db.delete(f"k{(i * 3) % 37}")
        if i % 50 == 0:
            with db.transaction() as tx:
                tx["t"] = {"i": i}
                tx[b"bytes"] = b"\x00" * i
        if i % 60 == 0:
            db.put("lazy", i, durability="none")


@pytest.mark.parametrize("durability", ["sync", "none", "interval"])
def test_same_bytes_as_the_reference_writer(tmp_path: Path, monkeypatch: Any, durability: str) -> None:
    from walstore import native

    files = {}
    for name, available in (("c", True), ("python", False)):
        monkeypatch.setattr(native, "AVAILABLE", available)
        path = tmp_path / name
        with walstore.open(path, durability=durability, segment_size=4096, auto_compact=False) as db:
            assert isinstance(db._writer, nativelog.NativeLogWriter) == available
            _workload(db)
            state = db.to_dict()
        files[name] = ([p.read_bytes() for p in segments(path)], state)
    c_segs, c_state = files["c"]
    py_segs, py_state = files["python"]
    assert c_state == py_state
    assert len(c_segs) == len(py_segs) > 3  # rolls happened
    for a, b in zip(c_segs, py_segs):
        if durability == "interval":
            # Background flushes land at different moments: the watermarks (and so the
            # CRCs) may differ. Everything else must not.
            a, b = _without_watermarks(a), _without_watermarks(b)
        # Segment headers carry each store's own id (and a CRC over it).
        assert a[:16] == b[:16] and a[32:60] == b[32:60] and a[64:] == b[64:]


def test_state_machine_commits_take_the_c_path_with_the_same_bytes(tmp_path: Path, monkeypatch: Any) -> None:
    from machines import PQ

    from walstore import native

    files = {}
    for name, available in (("c", True), ("python", False)):
        monkeypatch.setattr(native, "AVAILABLE", available)
        path = tmp_path / name
        with walstore.open_machine(path, PQ, segment_size=4096, auto_compact=False) as store:
            assert isinstance(store._writer, nativelog.NativeLogWriter) == available
            q = store.state
            for i in range(200):
                q.push(i % 7, f"item {i}")
                if i % 3 == 0:
                    q.pop()
                if i % 40 == 0:
                    with store.transaction() as tx:
                        tx.call(PQ.push, 9, "in a transaction")
                        tx.call(PQ.pop)
            contents = q.contents()
        files[name] = ([p.read_bytes() for p in segments(path)], contents)
    (c_segs, c_contents), (py_segs, py_contents) = files["c"], files["python"]
    assert c_contents == py_contents
    assert len(c_segs) == len(py_segs) > 3
    for a, b in zip(c_segs, py_segs):
        assert a[:16] == b[:16] and a[32:60] == b[32:60] and a[64:] == b[64:]


def _without_watermarks(seg: bytes) -> bytes:
    out = bytearray(seg)
    for off, _type, _seq in record_offsets_of(seg):
        out[off : off + 4] = bytes(4)
        out[off + 24 : off + 32] = bytes(8)
    return bytes(out)


def record_offsets_of(seg: bytes) -> list[tuple[int, int, int]]:
    from walstore import format as fmt
    from walstore import reader

    out: list[tuple[int, int, int]] = []
    first = fmt.decode_file_header(seg[:64]).first_seq
    reader.scan_records(seg, 64, first, reader.SEGMENT_TYPES, lambda t, q, o, p: out.append((o, t, q)))
    return out


def test_not_used_under_a_recording_file_api(tmp_path: Path) -> None:
    with walstore.open(tmp_path / "s", fs=FailingFileAPI()) as db:
        assert type(db._writer) is LogWriter
    with walstore.open(tmp_path / "t") as db:
        assert type(db._writer) is nativelog.NativeLogWriter


def test_threads_share_fsyncs_across_rolls_and_compaction(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with walstore.open(path, segment_size=8192, auto_compact=False) as db:
        before = db.stats()

        def work(t: int) -> None:
            for i in range(150):
                db[f"{t}:{i % 10}"] = i

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        db.compact()
        for th in threads:
            th.join()
        after = db.stats()
        expected = {f"{t}:{i}": 140 + i for t in range(8) for i in range(10)}
        assert db.to_dict() == expected
        assert after["segment_rolls"] > before["segment_rolls"]
        assert after["commits"] - before["commits"] == 1200
        assert after["durable_seq"] == after["last_seq"]
    with walstore.open(path) as db:
        assert db.to_dict() == expected


def test_failed_fdatasync_reaches_every_covered_committer_and_poisons(tmp_path: Path) -> None:
    path = tmp_path / "s"
    db = walstore.open(path)
    db["before"] = 1
    w = db._writer
    assert isinstance(w, nativelog.NativeLogWriter)
    w.inject_faults(sync_errno=errno.EIO)
    errors: list[BaseException] = []
    done = threading.Barrier(5)

    def commit(i: int) -> None:
        try:
            db[f"k{i}"] = i
        except BaseException as exc:  # noqa: BLE001 - collected for the assertions
            errors.append(exc)
        done.wait()

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    done.wait()
    for th in threads:
        th.join()
    # The first sync failed; every commit it covered failed, and no later sync was tried
    # (the writer never retries): all four commits report the failure.
    assert len(errors) == 4 and all(isinstance(e, StorePoisonedError) for e in errors)
    with pytest.raises(StorePoisonedError):
        db["after"] = 2
    with pytest.raises(StorePoisonedError):
        db.sync()
    db._core.abandon()
    with walstore.open(path) as db2:
        assert db2["before"] == 1
        assert "after" not in db2


def test_failed_write_poisons_and_changes_nothing(tmp_path: Path) -> None:
    db = walstore.open(tmp_path / "s")
    db["a"] = 1
    db._writer.inject_faults(write_errno=errno.EIO)  # type: ignore[attr-defined]
    with pytest.raises(StorePoisonedError):
        db["b"] = 2
    assert "b" not in db.to_dict()
    with pytest.raises(StorePoisonedError):
        db["c"] = 3
    db._core.abandon()
    with walstore.open(tmp_path / "s") as db2:
        assert db2.to_dict() == {"a": 1}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_fails_only_that_commit(tmp_path: Path, code: int) -> None:
    with walstore.open(tmp_path / "s", preallocate=False) as db:
        db["a"] = 1
        db._writer.inject_faults(write_errno=code)  # type: ignore[attr-defined]
        with pytest.raises(DiskFullError):
            db["b"] = 2
        assert "b" not in db
        db["c"] = 3
    with walstore.open(tmp_path / "s") as db:
        assert db.to_dict() == {"a": 1, "c": 3}


def test_close_while_committers_run(tmp_path: Path) -> None:
    db = walstore.open(tmp_path / "s")
    acknowledged: list[int] = []
    stop = threading.Event()
    refused: list[BaseException] = []

    def work(t: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                db[f"{t}:{i}"] = i
            except (StoreClosedError, StorePoisonedError) as exc:
                refused.append(exc)
                return
            acknowledged.append(1)
            i += 1

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    while len(acknowledged) < 200:
        threading.Event().wait(0.001)
    db.close()
    stop.set()
    for th in threads:
        th.join(timeout=30)
        assert not th.is_alive()
    assert all(isinstance(e, StoreClosedError) for e in refused)
    with walstore.open(tmp_path / "s") as db2:
        assert len(db2) >= len(acknowledged)


def test_interval_mode_flushes_in_the_background(tmp_path: Path) -> None:
    with walstore.open(tmp_path / "s", durability="interval", interval_ms=5) as db:
        db["a"] = 1
        seq = db.last_seq
        for _ in range(2000):
            if db.stats()["durable_seq"] >= seq:
                break
            threading.Event().wait(0.005)
        assert db.stats()["durable_seq"] >= seq


def test_oversized_record_goes_to_its_own_segment(tmp_path: Path) -> None:
    with walstore.open(tmp_path / "s", segment_size=4096) as db:
        db["small"] = b"x"
        db["big"] = b"y" * 10000
        db["after"] = b"z"
    with walstore.open(tmp_path / "s") as db:
        assert db["big"] == b"y" * 10000 and db["after"] == b"z"


@pytest.mark.parametrize("durability", ["sync", "none"])
def test_thresholds_reached_by_c_appends(tmp_path: Path, durability: str) -> None:
    """C appends flag the commit that crosses half a segment (prepare the next one) and the
    one that crosses the compaction threshold (start a compaction)."""
    path = tmp_path / "s"
    with walstore.open(path, durability=durability, segment_size=64 << 10, compact_min_bytes=200 << 10) as db:
        assert isinstance(db._writer, nativelog.NativeLogWriter)
        i = 0
        while db._writer.segment.offset < (40 << 10):
            db[f"k{i % 50}"] = b"v" * 100
            i += 1
        next_segment_then_compaction(db, path, i)
        expected = db.to_dict()
    with walstore.open(path) as db:
        assert db.to_dict() == expected


# ---- sharing the disk with a background writer: ws_log_gap / ws_log_burst ----------


@contextlib.contextmanager
def committing(db: walstore.Store) -> Iterator[list[int]]:
    """A thread committing to `db` in a loop (sync mode) until the block ends; yields the
    count of its commits (a one-item list), once its first 5 fdatasyncs have run."""
    stop = threading.Event()
    done = [0]

    def commit() -> None:
        while not stop.is_set():
            db[f"k{done[0] % 10}"] = done[0]
            done[0] += 1

    t = threading.Thread(target=commit)
    t.start()
    try:
        while db._writer.fsyncs < 5:  # the committer is running
            pass
        yield done
    finally:
        stop.set()
        t.join()


def wait_for_commits(done: list[int], n: int) -> None:
    """Until the committer of `committing` has made n more commits."""
    mark = done[0]
    while done[0] < mark + n:
        pass


def test_gap_on_an_idle_log_returns_once_it_is_quiet(tmp_path: Path) -> None:
    """No commit syncs or waits: ws_log_gap returns 0 (idle) after idle_us, not at max_us."""
    lib = nativelog._lib
    with walstore.open(tmp_path / "db", auto_compact=False) as db:
        db["k"] = 1
        assert lib.ws_log_gap(db._writer._log, 64, 2000, 60_000_000) == 0


def test_gap_lets_commits_sync_then_starts_behind_one(tmp_path: Path) -> None:
    """With a sync-mode committer running, ws_log_gap(syncs=N) returns 1: N of its fdatasyncs
    completed during the gap, and the next one had started when it returned."""
    lib = nativelog._lib
    with walstore.open(tmp_path / "db", auto_compact=False) as db, committing(db):
        before = db._writer.fsyncs
        rc = lib.ws_log_gap(db._writer._log, 20, 1_000_000, 60_000_000)
        after = db._writer.fsyncs
    assert rc == 1
    assert after - before >= 20


def test_burst_writes_everything_and_syncs(tmp_path: Path) -> None:
    """ws_log_burst writes all of the buffer at the offset (a short write is continued),
    fdatasyncs, and reports a failure as OSError with its errno."""
    with walstore.open(tmp_path / "db", auto_compact=False) as db:
        burst = db._writer.burst_writer()
        assert burst is not None
        target = tmp_path / "out.bin"
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            data = os.urandom(3 << 20)
            assert burst(fd, memoryview(data), 4096) >= 0.0
            assert burst(fd, memoryview(b"head"), 0) >= 0.0
        finally:
            os.close(fd)
        assert target.read_bytes() == b"head" + bytes(4092) + data
        with pytest.raises(OSError) as info:
            burst(fd, memoryview(b"x"), 0)  # closed
        assert info.value.errno == errno.EBADF


@contextlib.contextmanager
def store_with_burst(tmp_path: Path) -> Iterator[tuple[walstore.Store, Any, Any, int]]:
    """(store, its C log, its burst writer, an fd open on tmp_path/out.bin); all closed after."""
    with walstore.open(tmp_path / "db", auto_compact=False) as db:
        burst = db._writer.burst_writer()
        assert burst is not None
        fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            yield db, db._writer._log, burst, fd
        finally:
            os.close(fd)


def test_a_burst_holds_the_commit_syncs_and_commits_go_on_after_it(tmp_path: Path) -> None:
    """While a burst is written and fdatasynced no commit's sync runs (none ends during it),
    and the commits waiting for one go on once it is done."""
    lib = nativelog._lib
    with store_with_burst(tmp_path) as (db, log, burst, fd):
        data = memoryview(os.urandom(8 << 20))
        with committing(db) as done:
            for i in range(4):
                burst(fd, data, i * len(data))
                wait_for_commits(done, 3)  # commits go on after each burst
        bursts, syncs_during = lib_stats(lib, log)
    assert bursts >= 4  # four bursts, some perhaps in parts (a slow disk: see the next test)
    assert syncs_during == 0  # without the hold, some of ~30 syncs per burst end during it


def test_a_burst_after_a_commit_sync_waits_for_the_committer_to_come_back(tmp_path: Path) -> None:
    """A burst that finds a commit's sync running lets that commit return, and starts its
    write once the committer waits again (its next commit then waits for the burst alone)."""
    lib = nativelog._lib
    out = nativelog._ffi.new("uint64_t[2]")
    with store_with_burst(tmp_path) as (db, log, burst, fd):
        data = memoryview(os.urandom(1 << 20))
        with committing(db) as done:
            for i in range(8):
                burst(fd, data, i * len(data))
                wait_for_commits(done, 3)
        lib.ws_log_arrival_stats(log, out, out + 1)
    waited, arrived = int(out[0]), int(out[1])
    assert waited >= 1  # one committer syncing back to back: bursts start behind its syncs
    assert arrived >= 1  # and it came back (within 1 ms) before the burst's write


def test_a_burst_on_a_slower_disk_than_last_time_goes_in_parts(tmp_path: Path) -> None:
    """A burst that would take over BURST_PART_MAX_S at the rate the last one ran goes in parts
    (each its own hold, at least 1 MiB, multiples of 4096), and the file is exact; the rate is
    then the one measured, so a burst sized for it goes whole."""
    lib = nativelog._lib
    data = os.urandom(5 << 20)
    with store_with_burst(tmp_path) as (_db, log, burst, fd):
        bps = int((1 << 20) / nativelog.BURST_PART_MAX_S)  # as if 1 MiB took the whole limit
        lib.ws_log_set_burst_rate(log, bps)
        before, _ = lib_stats(lib, log)
        burst(fd, memoryview(data), 0)
        parts, _ = lib_stats(lib, log)
        measured = int(lib.ws_log_burst_rate(log))
        burst(fd, memoryview(data[: 1 << 20]), len(data))  # 1 MiB: whole at any rate
        after, _ = lib_stats(lib, log)
    assert (tmp_path / "out.bin").read_bytes() == data + data[: 1 << 20]
    assert parts - before >= 2  # the first part (1 MiB, the 5 cut evenly) ran at this disk's rate, then the rest
    assert measured != bps and measured > 0
    assert after - parts == 1


def test_a_logs_first_burst_goes_in_a_small_first_part_then_at_the_rate_measured(tmp_path: Path) -> None:
    """Before any rate is known, the first part of a burst is at most 4 MiB (BURST_FIRST_PART),
    so a slow disk cannot hold a commit for a whole burst sized for nothing; the rest goes at
    the rate that part ran. With a rate known, the same burst goes whole."""
    lib = nativelog._lib
    data = os.urandom(8 << 20)
    with store_with_burst(tmp_path) as (_db, log, burst, fd):
        assert int(lib.ws_log_burst_rate(log)) == 0  # a new log: no burst yet
        before, _ = lib_stats(lib, log)
        burst(fd, memoryview(data), 0)
        first, _ = lib_stats(lib, log)
        assert int(lib.ws_log_burst_rate(log)) > 0  # measured on the 4 MiB part
        lib.ws_log_set_burst_rate(log, 100 * len(data))  # as if the whole burst took 10 ms
        burst(fd, memoryview(data), len(data))
        second, _ = lib_stats(lib, log)
    assert (tmp_path / "out.bin").read_bytes() == data + data
    assert first - before >= 2  # 4 MiB first, then the rest
    assert second - first == 1


def test_a_held_turn_holds_the_commit_syncs_and_releases_them_on_error(tmp_path: Path) -> None:
    """`with writer.held_turn():` no commit's sync ends inside the block (a committer keeps
    trying), the commits go on after it, also when the block raises; holds nest."""
    lib = nativelog._lib
    with walstore.open(tmp_path / "db", auto_compact=False) as db:
        log = db._writer._log
        inside = []
        with committing(db) as done:
            for i in range(3):
                try:
                    with db._writer.held_turn():
                        before = db._writer.fsyncs
                        with db._writer.held_turn():  # nested: still held after the inner block
                            pass
                        dfd = os.open(tmp_path, os.O_RDONLY)
                        try:
                            for _ in range(20):  # about 20 commit syncs' time
                                os.fsync(dfd)
                        finally:
                            os.close(dfd)
                        inside.append(db._writer.fsyncs - before)
                        if i == 1:
                            raise RuntimeError("the step failed")
                except RuntimeError:
                    pass
                wait_for_commits(done, 3)  # commits go on after each turn, raised or not
        holds, syncs_during = lib_stats(lib, log)
    assert holds == 6  # three turns, each with one nested
    assert syncs_during == 0
    assert inside == [0, 0, 0]  # the one running when the turn began had ended


def lib_stats(lib: Any, log: Any) -> tuple[int, int]:
    out = nativelog._ffi.new("uint64_t[2]")
    lib.ws_log_hold_stats(log, out, out + 1)
    return int(out[0]), int(out[1])


def test_reference_writer_has_no_burst_writer(tmp_path: Path, monkeypatch: Any) -> None:
    from walstore import native

    monkeypatch.setattr(native, "AVAILABLE", False)
    with walstore.open(tmp_path / "db", auto_compact=False) as db:
        assert type(db._writer) is LogWriter
        assert db._writer.burst_writer() is None
        db._writer.take_turn()  # does not wait
