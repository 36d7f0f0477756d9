"""Each damage case the Foundation names: what open() does, on both replayers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from storetools import (
    EIO,
    FailingFileAPI,
    build,
    crash,
    flip_bit,
    quarantine_files,
    record_offsets,
    segments,
)

import walstore
from walstore import format as fmt


def snapshot_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file() and p.name != "LOCK"}


def open_small(path: Path) -> walstore.Store:
    return walstore.open(path, segment_size=1 << 16)


def test_truncated_last_record_is_a_torn_tail(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "db"
    build(path, 20, close=False, preallocate=False)
    seg = segments(path)[-1]
    last_off = record_offsets(seg)[-1][0]
    cut = last_off + 40  # the header is whole, the payload is cut short
    lost = seg.read_bytes()[last_off:cut]
    os.truncate(seg, cut)
    with open_small(path) as db:
        assert db.to_dict() == {f"k{i}": i for i in range(19)}
        torn = db.recovery.torn_tail
        assert torn is not None and torn.offset == last_off and torn.seq == 20
        assert torn.reason == "bad-length"
    bins = [p for p in quarantine_files(path) if p.suffix == ".bin"]
    assert len(bins) == 1 and bins[0].read_bytes() == lost
    report = json.loads(bins[0].with_suffix(".json").read_text())
    assert report["offset"] == last_off and report["first_lost_seq"] == 20


def test_truncated_sealed_segment_is_corruption(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "db"
    build(path, 200, segment_size=2048)
    segs = segments(path)
    assert len(segs) >= 3
    middle = segs[1]
    os.truncate(middle, middle.stat().st_size - 8)
    before = snapshot_bytes(path)
    with pytest.raises(walstore.CorruptionError) as err:
        walstore.open(path, segment_size=2048)
    assert middle.name in str(err.value)
    assert snapshot_bytes(path) == before


def test_flipped_bit_mid_log_is_corruption_naming_file_offset_seq(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "db"
    build(path, 30, close=False)
    seg = segments(path)[-1]
    off, _, seq = record_offsets(seg)[10]
    flip_bit(seg, off + 40)
    before = snapshot_bytes(path)
    with pytest.raises(walstore.CorruptionError) as err:
        open_small(path)
    e = err.value
    assert (e.path, e.offset, e.seq, e.reason) == (str(seg), off, seq, "bad-crc")
    assert seg.name in str(e) and f"offset {off}" in str(e) and f"sequence number {seq}" in str(e)
    assert snapshot_bytes(path) == before, "a refused open must change nothing on disk"
    assert not (path / fmt.QUARANTINE_DIR).exists()


def test_flipped_bit_in_last_record_of_closed_log_is_corruption(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "db"
    build(path, 10, close=True)
    seg = segments(path)[-1]
    recs = record_offsets(seg)
    assert recs[-1][1] == fmt.REC_CLOSE
    off, _, seq = recs[-2]
    flip_bit(seg, off + 33)
    with pytest.raises(walstore.CorruptionError) as err:
        open_small(path)
    assert err.value.seq == seq == 10


def test_flipped_bit_in_last_record_after_crash_is_cut_and_kept(tmp_path: Path, backend: str) -> None:
    """The documented limit: nothing after it proves the last record was synced."""
    path = tmp_path / "db"
    build(path, 10, close=False)
    seg = segments(path)[-1]
    off, _, seq = record_offsets(seg)[-1]
    flip_bit(seg, off + 33)
    with open_small(path) as db:
        assert len(db) == 9
        assert db.recovery.torn_tail is not None and db.recovery.torn_tail.seq == 10
        assert db.recovery.quarantined is not None
    assert any(p.suffix == ".bin" for p in quarantine_files(path))


@pytest.mark.parametrize("where", ["after-records", "end-of-file"])
def test_garbage_appended_is_cut_and_kept(tmp_path: Path, backend: str, where: str) -> None:
    path = tmp_path / "db"
    model = build(path, 15, close=True)
    seg = segments(path)[-1]
    end = record_offsets(seg)[-1][0] + fmt.FRAME_HEADER_SIZE
    garbage = bytes(range(1, 200))
    data = bytearray(seg.read_bytes())
    at = end if where == "after-records" else len(data)
    data[at : at + len(garbage)] = garbage
    seg.write_bytes(bytes(data))
    with open_small(path) as db:
        assert db.to_dict() == model
        assert db.recovery.torn_tail is not None
        db["after"] = 1
    kept = b"".join(p.read_bytes() for p in quarantine_files(path) if p.suffix == ".bin")
    assert garbage in kept
    with open_small(path) as db:
        assert db["after"] == 1 and db.recovery.torn_tail is None


def test_zero_filled_tail_parses_as_the_clean_end(tmp_path: Path, backend: str) -> None:
    """An append whose size survived but whose data did not: zeros, what a crash leaves."""
    path = tmp_path / "db"
    build(path, 12, close=False, preallocate=False)
    seg = segments(path)[-1]
    off = record_offsets(seg)[-3][0]
    size = seg.stat().st_size
    with open(seg, "r+b") as f:
        f.seek(off)
        f.write(bytes(size - off))
    with open_small(path) as db:
        assert db.to_dict() == {f"k{i}": i for i in range(9)}
        db["k9"] = "again"
    with open_small(path) as db:
        assert db["k9"] == "again" and len(db) == 10


def test_zeroed_region_mid_log_is_corruption(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "db"
    build(path, 20, close=False)
    seg = segments(path)[-1]
    recs = record_offsets(seg)
    off = recs[5][0]
    with open(seg, "r+b") as f:
        f.seek(off)
        f.write(bytes(recs[7][0] - off))
    with pytest.raises(walstore.CorruptionError) as err:
        open_small(path)
    assert err.value.reason == "zero-header-then-data" and err.value.seq == 6


def test_segment_from_another_store_is_refused(tmp_path: Path, backend: str) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    build(a, 200, segment_size=2048)
    build(b, 200, segment_size=2048)
    victim = segments(a)[1]
    shutil.copyfile(segments(b)[1], victim)
    with pytest.raises(walstore.CorruptionError) as err:
        walstore.open(a, segment_size=2048)
    assert err.value.reason == "foreign-store" and victim.name in str(err.value)


def test_missing_middle_segment_is_corruption(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "db"
    build(path, 200, segment_size=2048)
    segs = segments(path)
    segs[2].unlink()
    with pytest.raises(walstore.CorruptionError) as err:
        walstore.open(path, segment_size=2048)
    assert err.value.reason == "missing-segment"


def test_fsync_failure_poisons_and_nothing_acknowledged_is_lost(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "db"
    fs = FailingFileAPI()
    db = walstore.open(path, segment_size=1 << 16, fs=fs)
    acked = {}
    for i in range(5):
        db[f"k{i}"] = i
        acked[f"k{i}"] = i
    fs.fail["fdatasync"] = (fs.calls["fdatasync"], EIO)
    with pytest.raises(walstore.StorePoisonedError) as err:
        db["k5"] = 5
    assert "fdatasync" in str(err.value)
    with pytest.raises(walstore.StorePoisonedError):
        db["k6"] = 6  # refused: a retried fsync could lie
    with pytest.raises(walstore.StorePoisonedError):
        db.sync()
    db._core.abandon()
    with open_small(path) as db2:
        state = db2.to_dict()
    for k, v in acked.items():
        assert state[k] == v
    assert "k6" not in state


def test_write_failure_poisons_and_state_is_unchanged(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "db"
    fs = FailingFileAPI()
    db = walstore.open(path, segment_size=1 << 16, fs=fs)
    db["a"] = 1
    fs.fail["pwrite"] = (fs.calls["pwrite"], EIO)
    with pytest.raises(walstore.StorePoisonedError):
        db["b"] = 2
    assert "b" not in db
    with pytest.raises(walstore.StorePoisonedError):
        db["c"] = 3
    crash(db)
    with open_small(path) as db2:
        assert db2.to_dict() == {"a": 1}


def test_group_commit_error_reaches_every_covered_committer(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "db"
    fs = FailingFileAPI()
    db = walstore.open(path, segment_size=1 << 16, fs=fs)
    db["x"] = 0
    fs.fail["fdatasync"] = (fs.calls["fdatasync"], EIO)
    errors: list[BaseException] = []
    acked: list[int] = []
    barrier = threading.Barrier(6)

    def work(i: int) -> None:
        barrier.wait()
        try:
            db[f"t{i}"] = i
            acked.append(i)
        except walstore.WalstoreError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert acked == [] and len(errors) == 6
    assert all(isinstance(e, walstore.StorePoisonedError) for e in errors)
    db._core.abandon()


def _damage_middle_crc(path: Path) -> None:
    seg = segments(path)[1]
    off = record_offsets(seg)[3][0]
    flip_bit(seg, off + 40)


def _damage_last_tail(path: Path) -> None:
    seg = segments(path)[-1]
    off = record_offsets(seg)[-1][0]
    os.truncate(seg, off + 40)


def _damage_middle_missing(path: Path) -> None:
    os.unlink(segments(path)[2])


def _damage_later_header(path: Path) -> None:
    flip_bit(segments(path)[3], 20)


def _damage_cut_sealed(path: Path) -> None:
    seg = segments(path)[1]
    os.truncate(seg, seg.stat().st_size - 8)


@pytest.mark.parametrize(
    "damage",
    [None, _damage_middle_crc, _damage_last_tail, _damage_middle_missing, _damage_later_header, _damage_cut_sealed],
)
def test_scanning_ahead_judges_and_replays_exactly_as_one_at_a_time(tmp_path: Path, damage: object) -> None:
    """inspect_log(scan_ahead=True), as open() calls it: the next segment mapped and scanned
    in a helper thread while this one is applied. Same state, same verdict, same exception
    (type and message) as scanning one segment at a time, on a clean log and on each damage."""
    from native_support import outcome, require_native

    from walstore import replay

    native = require_native()
    path = tmp_path / "db"
    build(path, 300, close=damage is not _damage_last_tail, segment_size=2048, preallocate=False)
    assert len(segments(path)) >= 5
    if callable(damage):
        damage(path)
    store_id = walstore.core.read_identity(str(path)).store_id

    def run(ahead: bool) -> tuple[object, ...]:
        replayer = native.KVReplayer()
        keep: list[object] = []

        def inspect() -> object:
            state = replay.inspect_log(str(path), store_id, 0, replayer, keep, scan_ahead=ahead)
            return (repr(state), replayer.finish(bytes))

        return outcome(inspect)

    one_at_a_time = run(False)
    ahead = run(True)
    assert ahead == one_at_a_time
    if damage is None or damage is _damage_last_tail:
        assert ahead[0] == "ok"
    else:
        assert ahead[0] == "raised"


def test_open_scans_the_next_segment_in_a_helper_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the C scanner, open() maps and scans every segment after the first in the helper
    thread, while the one before is applied; the pure-Python scanner (which holds the GIL)
    scans them all in the caller's thread. The state is the same."""
    import threading

    from walstore import native, replay

    path = tmp_path / "db"
    model = build(path, 300, segment_size=2048)
    where: list[str] = []
    real = replay._load_segment

    def spy(seg: str, store_id: bytes) -> object:
        where.append(threading.current_thread().name)
        return real(seg, store_id)

    monkeypatch.setattr(replay, "_load_segment", spy)
    with walstore.open(path, segment_size=2048) as db:
        assert db.to_dict() == model
    assert len(where) == len(segments(path)) >= 5
    assert where[0] == threading.current_thread().name
    if native.AVAILABLE:
        assert all(name.startswith("walstore-scan") for name in where[1:])
    else:
        assert set(where) == {threading.current_thread().name}
