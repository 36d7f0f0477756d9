"""The key-value store's API: dict behaviour, transactions, types, errors, reopen."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import walstore
from walstore import format as fmt


def reopen(path: Path, **kw: object) -> walstore.Store:
    return walstore.open(path, segment_size=1 << 16, **kw)  # type: ignore[arg-type]


def test_dict_interface_survives_reopen(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "db"
    with reopen(path) as db:
        db["user:1"] = {"name": "Ada"}
        db[b"raw"] = b"\x00\xff"
        db["text"] = "héllo"
        db["n"] = 42
        db["gone"] = 1
        del db["gone"]
        assert db.delete("never") is False
        assert len(db) == 4
        assert sorted(map(repr, db)) == sorted(map(repr, ["user:1", b"raw", "text", "n"]))
        assert "n" in db and "gone" not in db
    with reopen(path) as db:
        assert db.recovery.backend == backend
        assert db.recovery.closed_cleanly
        assert db.to_dict() == {"user:1": {"name": "Ada"}, b"raw": b"\x00\xff", "text": "héllo", "n": 42}
        assert db.get("missing", 7) == 7


def test_str_and_bytes_keys_are_distinct(tmp_path: Path, backend: str) -> None:
    with reopen(tmp_path / "db") as db:
        db["a"] = 1
        db[b"a"] = 2
    with reopen(tmp_path / "db") as db:
        assert db["a"] == 1 and db[b"a"] == 2


def test_value_read_now_equals_value_after_reopen(tmp_path: Path, backend: str) -> None:
    with reopen(tmp_path / "db") as db:
        db["t"] = (1, 2)  # JSON: a tuple comes back as a list, now and after reopen
        assert db["t"] == [1, 2]
    with reopen(tmp_path / "db") as db:
        assert db["t"] == [1, 2]


def test_transaction_is_one_record_all_or_nothing(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "db"
    with reopen(path) as db:
        db["b"] = 0
        before = db.last_seq
        with db.transaction() as tx:
            tx["a"] = 1
            del tx["b"]
            assert tx["a"] == 1 and "b" not in tx and "b" in db
        assert db.last_seq == before + 1
        with pytest.raises(RuntimeError):
            with db.transaction() as tx:
                tx["c"] = 3
                raise RuntimeError("abort")
        assert "c" not in db
        assert db.last_seq == before + 1
        with db.transaction():
            pass  # empty: no record
        assert db.last_seq == before + 1
    with reopen(path) as db:
        assert db.to_dict() == {"a": 1}


def test_transaction_used_after_block_raises(tmp_path: Path) -> None:
    with reopen(tmp_path / "db") as db:
        with db.transaction() as tx:
            tx["a"] = 1
        with pytest.raises(walstore.TransactionClosedError):
            tx["b"] = 2
        with pytest.raises(walstore.TransactionClosedError):
            tx["a"]


def test_wrong_types_and_unencodable_values_write_nothing(tmp_path: Path) -> None:
    with reopen(tmp_path / "db") as db:
        seq = db.last_seq
        with pytest.raises(walstore.KeyTypeError):
            db[1] = "x"  # type: ignore[index]
        with pytest.raises(walstore.CodecError):
            db["k"] = object()
        with pytest.raises(walstore.CodecError):
            db["nan"] = float("nan")
        with pytest.raises(walstore.CodecError):
            with db.transaction() as tx:
                tx["ok"] = 1
                tx["bad"] = {1, 2}
        assert db.last_seq == seq and len(db) == 0


def test_closed_store_raises(tmp_path: Path) -> None:
    db = reopen(tmp_path / "db")
    db["a"] = 1
    db.close()
    db.close()  # idempotent
    for action in (lambda: db["a"], lambda: db.__setitem__("a", 2), db.sync, lambda: len(db), db.transaction):
        with pytest.raises(walstore.StoreClosedError):
            action()


def test_second_opener_gets_lock_error_naming_pid(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with reopen(path):
        with pytest.raises(walstore.StoreLockedError) as err:
            reopen(path)
        assert str(os.getpid()) in str(err.value) and str(path) in str(err.value)
        code = (
            "import walstore,sys\n"
            "try:\n walstore.open(sys.argv[1])\nexcept walstore.StoreLockedError as e:\n"
            " print(e); sys.exit(3)\n"
        )
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
        assert out.returncode == 3, out.stderr
        assert f"process {os.getpid()}" in out.stdout


def test_pickle_codec_by_name_and_codec_mismatch_refused(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with walstore.open(path, codec="pickle") as db:
        db["s"] = {1, 2}
    with pytest.raises(walstore.WalstoreError, match="codec 'pickle'"):
        walstore.open(path)
    with walstore.open(path, codec="pickle") as db:
        assert db["s"] == {1, 2}


def test_directory_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(walstore.NotAStoreError):
        walstore.open(tmp_path / "other")
    with pytest.raises(walstore.NotAStoreError):
        walstore.open(tmp_path / "missing", create=False)


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db"
    with reopen(path) as db:
        db["a"] = 1
    seg = sorted(path.glob("seg-*.wal"))[0]
    data = bytearray(seg.read_bytes())
    data[8:10] = (fmt.FORMAT_VERSION + 1).to_bytes(2, "little")
    data[60:64] = fmt.crc(bytes(data[:60])).to_bytes(4, "little")
    seg.write_bytes(bytes(data))
    with pytest.raises(walstore.FormatVersionError, match="newer walstore"):
        reopen(path)


def test_segments_roll_and_chain(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "db"
    with walstore.open(path, segment_size=4096) as db:
        for i in range(300):
            db[f"k{i}"] = "v" * 40
        assert db.stats()["segment_rolls"] > 3
    segs = sorted(path.glob("seg-*.wal"))
    assert len(segs) > 3
    for a, b in zip(segs, segs[1:]):
        hb = fmt.decode_file_header(b.read_bytes()[:64])
        assert hb.prev_size == a.stat().st_size  # sealed segments are truncated to their records
    with walstore.open(path, segment_size=4096) as db:
        assert len(db) == 300 and db["k299"] == "v" * 40


@pytest.mark.parametrize("mode", ["sync", "interval", "none"])
def test_durability_modes_roundtrip(tmp_path: Path, mode: str, backend: str) -> None:
    path = tmp_path / "db"
    with walstore.open(path, durability=mode, interval_ms=5) as db:
        for i in range(50):
            db[f"k{i}"] = i
        db.put("forced", 1, durability="sync")
        with db.transaction(durability="sync") as tx:
            tx["t"] = 1
        db.sync()
        assert db.stats()["durable_seq"] == db.last_seq
    with walstore.open(path) as db:
        assert len(db) == 52


def test_group_commit_shares_fsyncs(tmp_path: Path) -> None:
    """Eight threads committing at once need fewer fsyncs than commits (no timing involved)."""
    path = tmp_path / "db"
    barrier = threading.Barrier(8)
    with walstore.open(path) as db:

        def work(t: int) -> None:
            barrier.wait()
            for i in range(100):
                db[f"{t}:{i}"] = i

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = db.stats()
        assert stats["commits"] == 800
        assert stats["fsyncs"] < stats["commits"]
        assert stats["durable_seq"] == stats["last_seq"] == 800
    with walstore.open(path) as db:
        assert len(db) == 800


def test_iteration_is_safe_while_writing(tmp_path: Path) -> None:
    with walstore.open(tmp_path / "db", durability="none") as db:
        for i in range(100):
            db[str(i)] = i
        for k in db:
            db[k + "x"] = 1
        assert len(db) == 200


def test_unknown_durability_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    with reopen(tmp_path / "db") as db:
        with pytest.raises(ValueError, match="durability"):
            db.put("a", 1, durability="Sync")
        with pytest.raises(ValueError, match="durability"):
            with db.transaction(durability="always") as tx:
                tx["b"] = 2
        with pytest.raises(ValueError, match="durability"):
            walstore.open(tmp_path / "other", durability="fast")
        assert len(db) == 0 and db.last_seq == 0


def _prepare_next_segment(db: walstore.Store, size: int) -> None:
    """Put until the next segment is prepared (the active one half full); wait for it."""
    w = db._writer
    i = 0
    while w._prealloc_thread is None and not w._prealloc_ready:
        db[f"k{i % 100}"] = b"v" * 1000
        i += 1
    assert w._seg.offset * 2 >= size  # not before half full
    thread = w._prealloc_thread
    if thread is not None:
        thread.join()


def test_prepared_segment_is_kept_across_close_and_open(tmp_path: Path, backend: str) -> None:
    """The next segment a writer prepared (zeros written and fsynced, then named
    prealloc.ready) is taken by the next open's first roll, not written again."""
    path = tmp_path / "db"
    size = 1 << 20
    with walstore.open(path, segment_size=size) as db:
        _prepare_next_segment(db, size)
        model = db.to_dict()
    ready = path / fmt.PREALLOC_READY_NAME
    assert ready.stat().st_size == size and not (path / fmt.PREALLOC_NAME).exists()
    assert ready.read_bytes() == bytes(size)
    inode = ready.stat().st_ino
    with walstore.open(path, segment_size=size) as db:
        w = db._writer
        assert w._prealloc_ready and w._prealloc_thread is None  # adopted: nothing written
        rolls, i = w.rolls, 0
        while w.rolls == rolls:
            db[f"n{i}"] = b"w" * 1000
            i += 1
        assert os.stat(w._seg.path).st_ino == inode  # the roll renamed it into place
        assert not ready.exists() or ready.stat().st_ino != inode  # (the next one, after the roll)
        model = db.to_dict()
    with walstore.open(path, segment_size=size) as db:
        assert db.to_dict() == model


@pytest.mark.parametrize("reopen_with", [{"segment_size": 2 << 20}, {"preallocate": False}])
def test_prepared_segment_that_does_not_fit_is_removed_at_open(tmp_path: Path, reopen_with: dict[str, object]) -> None:
    """A prepared segment of another size, or one left when preallocation is now off, is
    removed at open and never becomes a segment."""
    path = tmp_path / "db"
    size = 1 << 20
    with walstore.open(path, segment_size=size) as db:
        _prepare_next_segment(db, size)
        model = db.to_dict()
    assert (path / fmt.PREALLOC_READY_NAME).exists()
    with walstore.open(path, **{"segment_size": size, **reopen_with}) as db:  # type: ignore[arg-type]
        assert not db._writer._prealloc_ready
        assert not (path / fmt.PREALLOC_READY_NAME).exists()
        assert db.to_dict() == model


@pytest.mark.parametrize("how", ["setitem", "put", "transaction"])
def test_record_over_the_limit_is_refused_and_writes_nothing(tmp_path: Path, backend: str, how: str) -> None:
    """A commit whose payload would pass MAX_PAYLOAD (1 GiB) raises RecordTooLargeError,
    a WalstoreError and a ValueError; nothing is written and the store goes on."""
    path = tmp_path / "db"
    with walstore.open(path) as db:
        db["a"] = b"1"
        seq = db.last_seq
        value = bytes(fmt.MAX_PAYLOAD - fmt.OP_HEADER_SIZE)  # with the 1-byte key: one byte over
        with pytest.raises(walstore.RecordTooLargeError, match="record limit; nothing was written") as err:
            if how == "setitem":
                db["k"] = value
            elif how == "put":
                db.put("k", value, durability="sync")
            else:
                with db.transaction() as tx:
                    tx["k"] = value[: len(value) // 2]
                    tx["j"] = value[: len(value) // 2]
        del value
        assert isinstance(err.value, walstore.WalstoreError) and isinstance(err.value, ValueError)
        assert db.last_seq == seq and "k" not in db and "j" not in db
        db["b"] = b"2"
        model = db.to_dict()
    with walstore.open(path) as db:
        assert db.to_dict() == model == {"a": b"1", "b": b"2"}


def test_prepared_segment_that_cannot_be_removed_does_not_stop_the_store(tmp_path: Path, backend: str) -> None:
    """Something at prealloc.ready that is not a prepared segment and cannot be removed (a
    non-empty directory) is never taken: open works, segments roll into new files, and
    the state survives a reopen."""
    path = tmp_path / "db"
    size = 1 << 16
    with walstore.open(path, segment_size=size) as db:
        db["a"] = b"1"
    (path / fmt.PREALLOC_READY_NAME).mkdir()
    (path / fmt.PREALLOC_READY_NAME / "x").write_bytes(b"not ours")
    with walstore.open(path, segment_size=size) as db:
        assert not db._writer._prealloc_ready
        for i in range(200):
            db[f"k{i}"] = b"v" * 1000
        assert db._writer.rolls >= 2
        model = db.to_dict()
    assert (path / fmt.PREALLOC_READY_NAME / "x").read_bytes() == b"not ours"
    with walstore.open(path, segment_size=size) as db:
        assert db.to_dict() == model
