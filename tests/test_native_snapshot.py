"""`snapshot_payloads`: the C KVReplayer against PyKVReplayer, byte for byte, and against the state.

Both replayers turn the surviving keys into SNAPSHOT_DATA payloads of PUT
operations (docs/FORMAT.md), in dict order, at most `chunk_bytes` each unless
one operation alone is longer. The C tests fail instead of skipping when
WALSTORE_REQUIRE_NATIVE=1 and the module is not built (native_support).
"""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from native_support import op_bytes, require_native

import walstore
from walstore import format as fmt
from walstore import snapshot
from walstore.errors import ReplayError
from walstore.fileapi import OSFileAPI
from walstore.kvreplay import PyKVReplayer

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PUT, DELETE = fmt.OP_PUT, fmt.OP_DELETE
OHS = fmt.OP_HEADER_SIZE
Raw = dict[tuple[bytes, int], tuple[bytes, int]]


@pytest.fixture(scope="module")
def native() -> Any:
    return require_native()


def commit_log(txns: list[list[bytes]], first_seq: int = 1, close: bool = False) -> bytes:
    """COMMIT records (one per transaction), maybe a CLOSE: a valid segment body."""
    out = [fmt.encode_frame(fmt.REC_COMMIT, first_seq + i, first_seq + i - 1, b"".join(t)) for i, t in enumerate(txns)]
    if close and txns:
        last = first_seq + len(txns) - 1
        out.append(fmt.encode_frame(fmt.REC_CLOSE, last, last, b""))
    return b"".join(out)


def model_state(logs: list[bytes]) -> Raw:
    """The surviving state by an independent walk: (key, key-is-str) -> (value, value kind), in dict order."""
    state: Raw = {}
    for log in logs:
        off = 0
        while off < len(log):
            length, rtype = fmt.FRAME_HEADER.unpack_from(log, off + 4)[:2]
            payload = log[off + fmt.FRAME_HEADER_SIZE : off + fmt.FRAME_HEADER_SIZE + length]
            if rtype in (fmt.REC_COMMIT, fmt.REC_SNAPSHOT_DATA):
                for op in fmt.iter_ops(payload):
                    key = (op.key, op.flags & fmt.KEY_STR)
                    if op.op == PUT:
                        state[key] = (op.value, op.flags & fmt.VALUE_KIND_MASK)
                    else:
                        state.pop(key, None)
            off += fmt.frame_size(length)
    return state


def decoded(payloads: list[bytes]) -> Raw:
    """The payloads decoded back, checking each key appears once and every op is a PUT."""
    out: Raw = {}
    for p in payloads:
        for op in fmt.iter_ops(p):
            assert op.op == PUT
            key = (op.key, op.flags & fmt.KEY_STR)
            assert key not in out, f"key {key!r} twice"
            out[key] = (op.value, op.flags & fmt.VALUE_KIND_MASK)
    return out


def check_chunking(payloads: list[bytes], chunk_bytes: int) -> None:
    """No empty payload; each within chunk_bytes or a single op; greedy (the next op would not have fit)."""
    for i, p in enumerate(payloads):
        ops = list(fmt.iter_ops(p))
        assert ops, "empty payload"
        if len(p) > chunk_bytes:
            assert len(ops) == 1, f"payload {i}: {len(p)} bytes > {chunk_bytes} with {len(ops)} ops"
        if i + 1 < len(payloads):
            nxt = next(fmt.iter_ops(payloads[i + 1]))
            assert len(p) + OHS + len(nxt.key) + len(nxt.value) > chunk_bytes, "payload cut early"


def feed(replayer: Any, bufs: list[Any]) -> None:
    for b in bufs:
        replayer.apply_range(b, 0, len(memoryview(b).cast("B")))


def wrap(buf: bytes, kind: str) -> Any:
    return buf if kind == "b" else bytearray(buf) if kind == "a" else memoryview(buf)


transactions = st.lists(st.lists(op_bytes(allow_call=False), min_size=1, max_size=4), max_size=25)
chunk_sizes = st.one_of(st.integers(1, 64), st.integers(1, 40000), st.just(snapshot.CHUNK_BYTES))


@SETTINGS
@given(
    logs=st.lists(st.tuples(transactions, st.booleans(), st.booleans()), min_size=1, max_size=3),
    kinds=st.lists(st.sampled_from("bam"), min_size=3, max_size=3),
    chunk_bytes=chunk_sizes,
)
def test_c_payloads_equal_python_and_state(
    native: Any, logs: list[tuple[list[list[bytes]], bool, bool]], kinds: list[str], chunk_bytes: int
) -> None:
    """Random logs (puts, deletes, overwrites; str and bytes keys; all value kinds), some as
    SNAPSHOT_DATA bases, over several buffers: the same payloads, decoding to the state."""
    bufs = []
    for txns, as_snapshot, close in logs:
        if as_snapshot:
            body = b"".join(fmt.encode_frame(fmt.REC_SNAPSHOT_DATA, 7, 7, b"".join(t)) for t in txns)
            body += fmt.encode_frame(fmt.REC_SNAPSHOT_END, 7, 7, fmt.SNAPSHOT_END_PAYLOAD.pack(len(txns), 0))
        else:
            body = commit_log(txns, close=close)
        bufs.append(body)
    py, c = PyKVReplayer(), native.KVReplayer()
    feed(py, bufs)
    feed(c, [wrap(b, k) for b, k in zip(bufs, kinds, strict=False)])
    want = list(py.snapshot_payloads(chunk_bytes))
    got = list(c.snapshot_payloads(chunk_bytes))
    assert got == want
    state = model_state(bufs)
    assert list(decoded(got).items()) == list(state.items())  # every survivor once, in dict order
    check_chunking(got, chunk_bytes)
    # finished: empty, and usable again
    for r in (py, c):
        assert len(r) == 0
        assert list(r.snapshot_payloads()) == []
        feed(r, bufs)
        assert len(r) == len(state)


@SETTINGS
@given(txns=transactions, chunk_bytes=chunk_sizes)
def test_python_payloads_match_state(txns: list[list[bytes]], chunk_bytes: int) -> None:
    """The reference alone (runs without the C module)."""
    log = commit_log(txns)
    py = PyKVReplayer()
    py.apply_range(log, 0, len(log))
    got = list(py.snapshot_payloads(chunk_bytes))
    assert list(decoded(got).items()) == list(model_state([log]).items())
    check_chunking(got, chunk_bytes)


def utf8_ok(state: Raw) -> bool:
    try:
        for (kb, kstr), (vb, vkind) in state.items():
            if kstr:
                kb.decode("utf-8")
            if vkind == fmt.VALUE_STR << fmt.VALUE_KIND_SHIFT:
                vb.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@SETTINGS
@given(txns=transactions)
def test_same_bytes_as_the_dict_path(native: Any, txns: list[list[bytes]]) -> None:
    """Joined, the payloads are the bytes compaction wrote before: kv_payloads over finish(CodecBytes)."""
    log = commit_log(txns)
    if not utf8_ok(model_state([log])):
        return  # the dict path cannot decode a text key or value that is not UTF-8; these copy it as logged
    for make in (PyKVReplayer, native.KVReplayer):
        a, b = make(), make()
        a.apply_range(log, 0, len(log))
        b.apply_range(log, 0, len(log))
        old = b"".join(snapshot.kv_payloads(a.finish(snapshot.CodecBytes).items()))
        assert b"".join(b.snapshot_payloads()) == old


def big_log() -> tuple[bytes, list[int]]:
    """Ops of known sizes: op sizes 12+1+v for the values listed (keys 'a'..)."""
    sizes = [10, 20, 100, 5, 300, 0, 40]
    ops = [fmt.encode_op(PUT, 0, bytes([97 + i]), b"x" * v) for i, v in enumerate(sizes)]
    return commit_log([[op] for op in ops]), [OHS + 1 + v for v in sizes]


@pytest.mark.parametrize("which", ["c", "python"])
def test_chunk_boundaries(which: str) -> None:
    make = require_native().KVReplayer if which == "c" else PyKVReplayer
    log, op_sizes = big_log()

    def run(chunk: int) -> list[int]:
        r = make()
        r.apply_range(log, 0, len(log))
        return [len(p) for p in r.snapshot_payloads(chunk)]

    # op sizes: 23 33 113 18 313 13 53
    assert run(1) == op_sizes  # each op alone, also the ones longer than chunk_bytes
    assert run(56) == [56, 113, 18, 313, 13, 53]  # 23+33 exactly full; oversize ops alone
    assert run(57) == [56, 113, 18, 313, 13, 53]
    assert run(66) == [56, 113, 18, 313, 66]
    assert run(131) == [56, 113 + 18, 313, 66]
    assert run(1 << 20) == [sum(op_sizes)]


@pytest.mark.parametrize("which", ["c", "python"])
@pytest.mark.parametrize("bad", [0, -1, fmt.MAX_PAYLOAD + 1, 1.5, "100"])
def test_bad_chunk_bytes(which: str, bad: Any) -> None:
    make = require_native().KVReplayer if which == "c" else PyKVReplayer
    log, _ = big_log()
    r = make()
    r.apply_range(log, 0, len(log))
    with pytest.raises((ValueError, TypeError)):
        r.snapshot_payloads(bad)
    assert len(r) == 7  # nothing taken


@pytest.mark.parametrize("which", ["c", "python"])
def test_empty_and_all_deleted(which: str) -> None:
    make = require_native().KVReplayer if which == "c" else PyKVReplayer
    assert list(make().snapshot_payloads()) == []
    log = commit_log([[fmt.encode_op(PUT, 0, b"k", b"v")], [fmt.encode_op(DELETE, 0, b"k", b"")]])
    r = make()
    r.apply_range(log, 0, len(log))
    assert list(r.snapshot_payloads(1)) == []


@pytest.mark.parametrize("which", ["c", "python"])
def test_failed_replayer_refuses(which: str) -> None:
    make = require_native().KVReplayer if which == "c" else PyKVReplayer
    r = make()
    with pytest.raises(ReplayError):
        r.apply_range(b"\x00" * 40, 0, 40)  # type 0
    with pytest.raises(ReplayError, match="raised before"):
        r.snapshot_payloads()


def test_flags_and_kinds_kept_as_logged(native: Any) -> None:
    """Key-is-str and value kinds 0/1/2 are copied, not re-derived; (b"k", bytes) and ("k", str) are two keys."""
    ops = [
        fmt.encode_op(PUT, fmt.op_flags(False, fmt.VALUE_BYTES), b"k", b"b"),
        fmt.encode_op(PUT, fmt.op_flags(True, fmt.VALUE_STR), b"k", "t\u00e9".encode()),
        fmt.encode_op(PUT, fmt.op_flags(True, fmt.VALUE_CODEC), b"c", b"\xff not decoded"),
        fmt.encode_op(PUT, fmt.op_flags(False, fmt.VALUE_STR), b"k", b"last"),  # overwrite: kind and value
        fmt.encode_op(PUT, fmt.op_flags(True, fmt.VALUE_BYTES), b"\xc3", b""),  # not UTF-8: copied anyway
    ]
    log = commit_log([ops])
    want = [
        fmt.encode_op(PUT, fmt.op_flags(False, fmt.VALUE_STR), b"k", b"last"),
        ops[1],
        ops[2],
        ops[4],
    ]
    for make in (PyKVReplayer, native.KVReplayer):
        r = make()
        r.apply_range(log, 0, len(log))
        assert list(r.snapshot_payloads()) == [b"".join(want)]


def test_order_is_dict_order(native: Any) -> None:
    """A key keeps its first place when overwritten; a PUT after a DELETE goes last."""
    put = [fmt.encode_op(PUT, 0, k, v) for k, v in [(b"a", b"1"), (b"b", b"2"), (b"c", b"3")]]
    log = commit_log(
        [
            put,
            [fmt.encode_op(PUT, 0, b"a", b"4")],
            [fmt.encode_op(DELETE, 0, b"b", b"")],
            [fmt.encode_op(PUT, 0, b"b", b"5")],
        ]
    )
    for make in (PyKVReplayer, native.KVReplayer):
        r = make()
        r.apply_range(log, 0, len(log))
        keys = [op.key for p in r.snapshot_payloads(1) for op in fmt.iter_ops(p)]
        assert keys == [b"a", b"c", b"b"]


def test_large_state_many_chunks(native: Any) -> None:
    """Thousands of keys with overwrites and deletes, against the reference, across table rebuilds."""
    txns = []
    for i in range(20000):
        k = f"{(i * 7919) % 6000:08d}".encode()
        if i % 11 == 0:
            txns.append([fmt.encode_op(DELETE, fmt.op_flags(i % 2 == 0, 0), k, b"")])
        else:
            txns.append([fmt.encode_op(PUT, fmt.op_flags(i % 2 == 0, i % 3), k, bytes([i % 251]) * (i % 200))])
    log = commit_log(txns)
    py, c = PyKVReplayer(), native.KVReplayer()
    py.apply_range(log, 0, len(log))
    c.apply_range(log, 0, len(log))
    want = list(py.snapshot_payloads(4096))
    got = list(c.snapshot_payloads(4096))
    assert got == want and len(got) > 50
    assert list(decoded(got).items()) == list(model_state([log]).items())


def test_mmap_stays_exported_until_the_generator_ends(native: Any, tmp_path: Path) -> None:
    log, _ = big_log()
    path = tmp_path / "seg"
    path.write_bytes(log)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    r = native.KVReplayer()
    r.apply_range(m, 0, len(m))
    gen = r.snapshot_payloads(60)
    assert len(r) == 0  # finished at once: the table moved to the generator
    r.apply_range(log, 0, len(log))  # and the replayer is usable again
    first = next(gen)
    with pytest.raises(BufferError):
        m.close()  # the generator's table still points into the map
    rest = list(gen)
    m.close()  # ended: released
    assert [first, *rest] == list(r.snapshot_payloads(60))

    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    r = native.KVReplayer()
    r.apply_range(m, 0, len(m))
    gen = r.snapshot_payloads(60)
    next(gen)
    gen.close()  # closed early: released too
    m.close()


@pytest.mark.parametrize("which", ["c", "python"])
def test_write_snapshot_round_trip(which: str, tmp_path: Path) -> None:
    """Payloads through snapshot.write_snapshot: a valid snapshot that replays to the same state."""
    make = require_native().KVReplayer if which == "c" else PyKVReplayer
    txns = [
        [fmt.encode_op(PUT, fmt.op_flags(i % 2 == 1, i % 3), f"k{i % 300}".encode(), b"v" * (i % 700))]
        for i in range(3000)
    ]
    log = commit_log(txns)
    r = make()
    r.apply_range(log, 0, len(log))
    store_id = bytes(range(16))
    info = snapshot.write_snapshot(OSFileAPI(), str(tmp_path), store_id, 3000, r.snapshot_payloads(8192))
    data = Path(info.path).read_bytes()
    seq, scan = snapshot.check_snapshot(info.path, data, store_id)
    assert seq == 3000 and info.ops == 300 and info.records > 10
    assert scan.end == len(data)
    loaded = PyKVReplayer()
    loaded.apply_range(data, fmt.FILE_HEADER_SIZE, scan.end)
    ref = PyKVReplayer()
    ref.apply_range(log, 0, len(log))
    assert list(loaded.finish(bytes).items()) == list(ref.finish(bytes).items())


def compacted_body(path: Path) -> tuple[bytes, dict[Any, Any]]:
    """Compact a store with str, bytes and codec values, overwrites and deletes; the snapshot's
    records (after the header, which carries the per-store id) and the state."""
    with walstore.open(path, segment_size=4096, auto_compact=False) as db:
        for i in range(600):
            db[f"k{i % 80}"] = i
            db[f"b{i % 40}".encode()] = bytes([i % 256]) * (i % 50)
            db[f"t{i % 30}"] = "text" * (i % 9)
            if i % 7 == 0:
                db.delete(f"k{(i * 3) % 80}")
        model = db.to_dict()
        info = db.compact()
        assert info is not None
    with walstore.open(path) as db:
        assert list(db.to_dict().items()) == list(model.items())
    return Path(info.path).read_bytes()[fmt.FILE_HEADER_SIZE :], model


def test_compaction_snapshot_same_with_both_backends(
    native: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Store compaction goes through snapshot_payloads: the same snapshot bytes with either replayer."""
    monkeypatch.setattr(native, "AVAILABLE", True)
    assert walstore.backend() == "c"
    c_body, c_model = compacted_body(tmp_path / "c")
    monkeypatch.setattr(native, "AVAILABLE", False)
    assert walstore.backend() == "python"
    py_body, py_model = compacted_body(tmp_path / "py")
    assert c_model == py_model
    assert c_body == py_body


def test_c_copy_runs_without_the_gil(native: Any) -> None:
    """The copy into a payload is one C call that releases the GIL (cffi API mode): another
    Python thread runs during it. With a 1 s switch interval the main thread would otherwise
    keep the GIL for the whole call (tens of ms for 64 MiB), and the counter could not move."""
    import sys

    value = bytes(range(256)) * 1024  # 256 KiB
    log = commit_log([[fmt.encode_op(PUT, 0, f"{i:04d}".encode(), value)] for i in range(256)])
    counter = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            counter[0] += 1

    old = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    t = threading.Thread(target=spin)
    try:
        t.start()
        moved = []
        for _ in range(3):  # a loaded machine may not schedule the spinner in time: retry
            r = native.KVReplayer()
            r.apply_range(log, 0, len(log))
            gen = r.snapshot_payloads(64 << 20)
            while counter[0] == 0:
                stop.wait(0.001)  # let the spinner start (sleeping releases the GIL)
            before = counter[0]
            payload = next(gen)  # one C call fills the whole 64 MiB payload
            moved.append(counter[0] - before)
            assert len(payload) > 60 << 20
            gen.close()
            if moved[-1]:
                break
        assert moved[-1] > 0, f"no progress in another thread during the C copy: {moved}"
    finally:
        stop.set()
        sys.setswitchinterval(old)
        t.join()


def fill_all(frames: Any, size: int, start: int) -> bytes:
    """Every record `fill_into` appends to a buffer of `size` bytes from `start`, growing the
    buffer as it asks; the records concatenated."""
    out = bytearray()
    buf = bytearray(size)
    while True:
        n = frames.fill_into(buf, start)
        if n < 0:
            assert -n > len(buf) - start  # it asks only when the record did not fit
            buf = bytearray(start - n)
            continue
        if n == 0:
            return bytes(out)
        assert n % 8 == 0
        out += buf[start : start + n]


@SETTINGS
@given(
    txns=transactions,
    chunk_bytes=chunk_sizes,
    extra=st.integers(0, 3000),
    start=st.integers(0, 100),
)
def test_c_frames_equal_python_framing(
    native: Any, txns: list[list[bytes]], chunk_bytes: int, extra: int, start: int
) -> None:
    """`snapshot_frames`: whole SNAPSHOT_DATA records, byte for byte encode_frame around
    PyKVReplayer.snapshot_payloads, whatever the buffer's size and the offset filled from."""
    log = commit_log(txns)
    py, c = PyKVReplayer(), native.KVReplayer()
    py.apply_range(log, 0, len(log))
    c.apply_range(log, 0, len(log))
    want = [fmt.encode_frame(fmt.REC_SNAPSHOT_DATA, 9, 9, p) for p in py.snapshot_payloads(chunk_bytes)]
    frames = c.snapshot_frames(9, chunk_bytes)
    try:
        got = fill_all(frames, start + frames.record_room + extra, start)
        assert got == b"".join(want)
        assert frames.records == len(want)
    finally:
        frames.close()
    frames.close()  # idempotent
    assert len(c) == 0  # the replayer is finished at once, as by snapshot_payloads


def test_c_frames_refuse_a_buffer_below_one_record(native: Any) -> None:
    log = commit_log([[fmt.encode_op(PUT, 0, b"k", b"v" * 50)]])
    c = native.KVReplayer()
    c.apply_range(log, 0, len(log))
    frames = c.snapshot_frames(1, 64)
    try:
        with pytest.raises(ValueError):
            frames.fill_into(bytearray(frames.record_room - 1), 0)
        with pytest.raises(ValueError):
            frames.fill_into(bytearray(200), 201)
        assert fill_all(frames, frames.record_room, 0)
    finally:
        frames.close()
    with pytest.raises(ValueError):
        frames.fill_into(bytearray(200), 0)


def mixed_log() -> bytes:
    """3,000 puts over 300 keys, values up to 700 bytes, one value longer than a chunk."""
    txns = [
        [fmt.encode_op(PUT, fmt.op_flags(i % 2 == 1, i % 3), f"k{i % 300}".encode(), b"v" * (i % 700))]
        for i in range(3000)
    ]
    txns.append([fmt.encode_op(PUT, 0, b"huge", bytes(range(256)) * 300)])
    return commit_log(txns)


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("block", [0, 5000, 4 << 20])
def test_write_snapshot_same_file_from_c_frames_and_payloads(
    native: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool, block: int
) -> None:
    """write_snapshot from C-framed records and from Python payloads: the same file, byte for
    byte, with O_DIRECT or buffered writes, small or large blocks, write-behind syncs."""
    monkeypatch.setattr(snapshot, "DIRECT", direct)
    monkeypatch.setattr(snapshot, "BLOCK_BYTES", block)
    monkeypatch.setattr(snapshot, "SYNC_FIRST", 20000)
    monkeypatch.setattr(snapshot, "SYNC_MIN", 20000)
    log = mixed_log()
    store_id = bytes(range(16))
    files = []
    for name in ("c", "py"):
        r = native.KVReplayer() if name == "c" else PyKVReplayer()
        r.apply_range(log, 0, len(log))
        ops = len(r)
        d = tmp_path / name
        d.mkdir()
        src = snapshot.kv_source(r, 3001, 4096) if name == "c" else r.snapshot_payloads(4096)
        info = snapshot.write_snapshot(OSFileAPI(), str(d), store_id, 3001, src, ops=ops if name == "c" else None)
        data = Path(info.path).read_bytes()
        assert info.size == len(data) and info.ops == 301
        # write-behind syncs, except where one block holds the whole snapshot (written at the end)
        assert info.timings["sync"] > 0 or block >= len(data)
        seq, scan = snapshot.check_snapshot(info.path, data, store_id)
        assert seq == 3001 and scan.end == len(data)
        assert list((tmp_path / name).iterdir()) == [Path(info.path)]
        files.append(data)
    assert files[0] == files[1]


class RefusesDirect(OSFileAPI):
    """A filesystem without O_DIRECT: at open (EINVAL), or only once a write is tried."""

    def __init__(self, at_open: bool) -> None:
        self.at_open = at_open
        self.direct_fds: set[int] = set()

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        import errno
        import os

        direct = flags & getattr(os, "O_DIRECT", 0)
        if direct and self.at_open:
            raise OSError(errno.EINVAL, "no O_DIRECT here")
        fd = super().open(path, flags & ~direct, mode)
        if direct:
            self.direct_fds.add(fd)
        return fd

    def close(self, fd: int) -> None:
        self.direct_fds.discard(fd)
        super().close(fd)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        import errno

        if fd in self.direct_fds:
            raise OSError(errno.EINVAL, "O_DIRECT write refused")
        return super().pwrite(fd, data, offset)


@pytest.mark.parametrize("at_open", [True, False])
def test_write_snapshot_falls_back_to_buffered_writes(
    native: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at_open: bool
) -> None:
    monkeypatch.setattr(snapshot, "_direct_refused", False)  # restored after: other tests keep O_DIRECT
    log = mixed_log()
    r = native.KVReplayer()
    r.apply_range(log, 0, len(log))
    ops = len(r)
    store_id = bytes(range(16))
    info = snapshot.write_snapshot(RefusesDirect(at_open), str(tmp_path), store_id, 5, snapshot.kv_source(r, 5), ops)
    assert info.timings["direct"] == 0.0
    data = Path(info.path).read_bytes()
    assert snapshot.check_snapshot(info.path, data, store_id)[1].end == len(data) == info.size


@pytest.mark.parametrize("blocks_of_data", [0.3, 1.5, 2.5])
def test_the_last_records_go_out_with_the_end_record(native: Any, blocks_of_data: float) -> None:
    """A buffer the source could not fill is the last one: its records are written with the
    end record in one write, not as one more block and then a tail (two bursts, each
    holding up a commit). Both frame sources: Python payloads and the C table."""
    block = 64 << 10
    value = b"v" * 100
    n = int(blocks_of_data * block / (fmt.OP_HEADER_SIZE + 4 + len(value)))  # about that many blocks
    r = native.KVReplayer()
    log = b"".join(
        fmt.encode_frame(fmt.REC_COMMIT, i + 1, i, fmt.encode_op(fmt.OP_PUT, 0, b"%04d" % i, value)) for i in range(n)
    )
    r.apply_range(log, 0, len(log))
    items = [(b"%04d" % i, value) for i in range(n)]
    sources = {
        "python": snapshot.PayloadFrames(snapshot.kv_payloads(items, 4096), 7, count_ops=True),
        "c": snapshot.kv_source(r, 7, 4096),
    }
    for name, source in sources.items():
        blocks = snapshot._Blocks(source, bytes(64), {"fill": 0.0}, block, None)
        fills = []
        while True:
            slot, aligned, pending, last = blocks.fill(len(fills) % 2)
            fills.append((aligned, pending, last))
            if last:
                break
        source.close()
        blocks.close()
        total = 64 + sum(a for a, _p, _l in fills[:-1]) + fills[-1][1]
        assert [f[2] for f in fills] == [False] * (len(fills) - 1) + [True], name
        assert fills[-1][0] == 0  # the last holds everything left, written with the end record
        # one fill per buffer of data: no extra fill holding only a tail under 4 KiB
        assert len(fills) == -(-total // blocks.size), (name, fills, blocks.size)
        assert fills[-1][1] > 4096 or total < 4096, (name, fills)


def fill_blocks(source: Any, block: int) -> tuple[list[tuple[int, int, bool]], bytes, int]:
    """Every fill of `source` through _Blocks of `block` bytes: the fills, the bytes they
    hand out (the header, each aligned part, the last one whole) and the buffer size."""
    blocks = snapshot._Blocks(source, bytes(64), {"fill": 0.0}, block, None)
    fills: list[tuple[int, int, bool]] = []
    out = bytearray()
    while True:
        slot, aligned, pending, last = blocks.fill(len(fills) % 2)
        fills.append((aligned, pending, last))
        out += blocks.bufs[slot][: pending if last else aligned]
        # the buffers are made once, with room for a tail: the last one is not made anew
        assert len(blocks.bufs[slot]) == blocks.capacity
        if last:
            break
    size = blocks.size
    source.close()
    blocks.close()
    return fills, bytes(out), size


class WithoutBytesLeft:
    """A frame source that cannot tell what is left (as the Python one)."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.record_room = source.record_room

    def fill_into(self, buf: Any, start: int) -> int:
        return int(self.source.fill_into(buf, start))

    def close(self) -> None:
        self.source.close()


@pytest.mark.parametrize("blocks_of_data", [1.1, 2.15, 1.5])
def test_a_tail_within_a_quarter_block_goes_out_with_the_last_full_one(native: Any, blocks_of_data: float) -> None:
    """From the C table, what is left after a block but within a quarter more goes in that
    one buffer, the last (one burst, not a full one then a short one); half a block more
    still goes as one more. The bytes are the same as from a source that cannot tell what
    is left and fills one buffer per block."""
    block = 64 << 10
    value = b"v" * 100
    n = int(blocks_of_data * block / (fmt.OP_HEADER_SIZE + 4 + len(value)))
    log = b"".join(
        fmt.encode_frame(fmt.REC_COMMIT, i + 1, i, fmt.encode_op(fmt.OP_PUT, 0, b"%04d" % i, value)) for i in range(n)
    )
    sources = []
    for _ in range(2):
        r = native.KVReplayer()
        r.apply_range(log, 0, len(log))
        sources.append(snapshot.kv_source(r, 7, 4096))
    plain_fills, plain_bytes, size = fill_blocks(WithoutBytesLeft(sources[0]), block)
    c_fills, c_bytes, _ = fill_blocks(sources[1], block)
    assert c_bytes == plain_bytes
    assert len(plain_fills) == int(blocks_of_data) + 1, (plain_fills, size)
    assert plain_fills[-1][1] < size // snapshot.TAIL_MERGE or blocks_of_data == 1.5
    merged = blocks_of_data != 1.5
    assert len(c_fills) == len(plain_fills) - merged, (c_fills, size)
    assert [f[2] for f in c_fills] == [False] * (len(c_fills) - 1) + [True]


def test_bytes_left_counts_the_surviving_operations_still_to_come(native: Any) -> None:
    """SnapshotFrames.bytes_left: at least the bytes the records still to come take and at
    most a frame header and padding more per chunk; deleted keys count nothing; over
    `limit` it only says so."""
    value = b"w" * 50
    r = native.KVReplayer()
    ops = [fmt.encode_op(fmt.OP_PUT, 0, b"key%05d" % i, value) for i in range(3000)]
    ops += [fmt.encode_op(fmt.OP_DELETE, 0, b"key%05d" % i, b"") for i in range(0, 3000, 3)]
    log = b"".join(fmt.encode_frame(fmt.REC_COMMIT, i + 1, i, op) for i, op in enumerate(ops))
    r.apply_range(log, 0, len(log))
    chunk = 4096
    source = snapshot.kv_source(r, 9, chunk)
    try:
        buf = mmap.mmap(-1, 1 << 20)
        first = source.fill_into(buf, 0)
        assert 0 < first < 1 << 19
        left = source.bytes_left(1 << 30)
        rest = 0
        while n := source.fill_into(buf, 0):
            rest += n
        assert rest <= left <= rest + (rest // chunk + 1) * (fmt.FRAME_HEADER_SIZE + fmt.ALIGN)
        assert source.bytes_left(1 << 30) == fmt.FRAME_HEADER_SIZE + fmt.ALIGN  # nothing left
        buf.close()
    finally:
        source.close()
    r2 = native.KVReplayer()
    r2.apply_range(log, 0, len(log))
    whole = snapshot.kv_source(r2, 9, chunk)
    try:
        assert whole.bytes_left(1000) > 1000  # only "more than 1000"
        assert whole.bytes_left(1 << 30) >= 2000 * (fmt.OP_HEADER_SIZE + 8 + len(value))
    finally:
        whole.close()


class CountingFS(OSFileAPI):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        self.sizes.append(len(data))
        return super().pwrite(fd, data, offset)


@pytest.mark.parametrize("target", [0.0, 10.0])
def test_direct_write_size_adapts_to_the_disk(
    native: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: float
) -> None:
    """Writes that take longer than WRITE_TARGET_S shrink to WRITE_MIN; fast ones grow back
    to BLOCK_BYTES. Either way the file is the same."""
    monkeypatch.setattr(snapshot, "BLOCK_BYTES", 64 << 10)
    monkeypatch.setattr(snapshot, "WRITE_MIN", 4096)
    monkeypatch.setattr(snapshot, "WRITE_TARGET_S", target)
    log = mixed_log()
    r = native.KVReplayer()
    r.apply_range(log, 0, len(log))
    ops = len(r)
    fs = CountingFS()
    store_id = bytes(range(16))
    info = snapshot.write_snapshot(fs, str(tmp_path), store_id, 7, snapshot.kv_source(r, 7, 1000), ops)
    data = Path(info.path).read_bytes()
    assert snapshot.check_snapshot(info.path, data, store_id)[1].end == len(data)
    if not info.timings["direct"]:
        pytest.skip("no O_DIRECT on this filesystem: the write size does not adapt")
    body = fs.sizes[:-1]  # the last write is the padded tail
    if target == 0.0:
        assert body[0] == 64 << 10 and max(body[-3:]) == 4096
    else:
        assert max(body) == 64 << 10


def test_burst_size_follows_the_rate_the_last_one_ran() -> None:
    """Each full-size burst sizes the next to take BURST_TARGET_S at its rate: a slow one
    shrinks the next in proportion (not by half), a fast one at most doubles it, and the
    size stays within WRITE_MIN and BURST_BYTES."""
    out = snapshot._Out(OSFileAPI(), "unused", {}, burst=lambda fd, data, offset: 0.0)
    target, mib = snapshot.BURST_TARGET_S, 1 << 20
    assert out.piece == snapshot.BURST_BYTES == 24 * mib
    out._adapt(out.piece, target * 39 / 25)  # 24 MiB took 39 ms where 25 were the aim
    assert 15 * mib <= out.piece <= 15.4 * mib and out.piece % snapshot.ALIGN == 0
    before = out.piece
    out._adapt(before - snapshot.ALIGN, 10.0)  # a shorter (last) write says nothing
    assert out.piece == before
    out._adapt(out.piece, target * 0.8)  # a little fast: grows by 1.25
    assert before * 1.24 <= out.piece <= before * 1.25
    out._adapt(out.piece, target / 100)  # very fast: at most doubles, up to BURST_BYTES
    assert out.piece == snapshot.BURST_BYTES
    out._adapt(out.piece, 10.0)  # very slow: down to WRITE_MIN, not below
    assert out.piece == snapshot.WRITE_MIN


class RefusesLaterDirectWrites(OSFileAPI):
    """O_DIRECT accepted at open and for the first write, refused (EINVAL) after it."""

    def __init__(self) -> None:
        self.direct_fds: dict[int, int] = {}

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        import os

        fd = super().open(path, flags, mode)
        if flags & getattr(os, "O_DIRECT", 0):
            self.direct_fds[fd] = 0
        return fd

    def close(self, fd: int) -> None:
        self.direct_fds.pop(fd, None)
        super().close(fd)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        import errno

        if fd in self.direct_fds:
            self.direct_fds[fd] += 1
            if self.direct_fds[fd] > 1:
                raise OSError(errno.EINVAL, "O_DIRECT write refused")
        return super().pwrite(fd, data, offset)


def test_direct_refused_mid_snapshot_fails_it_and_the_next_is_buffered(
    native: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshot, "_direct_refused", False)
    monkeypatch.setattr(snapshot, "BLOCK_BYTES", 0)
    log = mixed_log()
    store_id = bytes(range(16))
    fs = RefusesLaterDirectWrites()
    results = []
    for _attempt in range(2):
        r = native.KVReplayer()
        r.apply_range(log, 0, len(log))
        ops = len(r)
        try:
            info = snapshot.write_snapshot(fs, str(tmp_path), store_id, 5, snapshot.kv_source(r, 5, 1000), ops)
        except walstore.SnapshotError:
            results.append("failed")
            assert list(tmp_path.iterdir()) == []
            continue
        results.append(info.timings["direct"])
        data = Path(info.path).read_bytes()
        assert snapshot.check_snapshot(info.path, data, store_id)[1].end == len(data)
    if results[0] == 0.0:
        pytest.skip("no O_DIRECT on this filesystem")
    assert results == ["failed", 0.0]


@pytest.mark.parametrize("direct", [True, False])
def test_snapshot_writes_every_block_as_a_burst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool) -> None:
    """With a burst writer, write_snapshot hands it every write of the snapshot (none goes
    to fs.pwrite), each at the end of what was written before, and the file is exact; the
    store's compaction passes the writer's burst_writer: with 4 committers running (the C
    writer paces each burst between their syncs), the snapshot and the state stay exact."""
    import threading

    monkeypatch.setattr(snapshot, "DIRECT", direct)
    monkeypatch.setattr(snapshot, "BURST_BYTES", 128 << 10)  # several bursts
    txns = [[fmt.encode_op(PUT, 0, f"k{i % 500}".encode(), b"v" * 900)] for i in range(5000)]
    log = commit_log(txns)
    r = PyKVReplayer()
    r.apply_range(log, 0, len(log))
    bursts: list[tuple[int, int]] = []

    def burst(fd: int, data: memoryview, offset: int) -> float:
        assert offset == sum(n for _o, n in bursts)
        bursts.append((offset, len(data)))
        assert os.pwrite(fd, data, offset) == len(data)
        os.fdatasync(fd)
        return 0.0

    class NoPwrite(OSFileAPI):
        def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
            raise AssertionError("a snapshot write bypassed the burst writer")

    info = snapshot.write_snapshot(NoPwrite(), str(tmp_path), bytes(16), 5000, r.snapshot_payloads(8192), burst=burst)
    assert len(bursts) >= 3 and len(bursts) == info.timings["writes"] + 1  # + the last block, with the end record
    data = Path(info.path).read_bytes()
    assert snapshot.check_snapshot(info.path, data, bytes(16))[1].end == len(data) == info.size

    path = tmp_path / "s"
    with walstore.open(path, segment_size=64 << 10, auto_compact=False) as db:
        for i in range(3000):
            db[f"k{i}"] = b"x" * 200
        stop = threading.Event()
        counts = [0] * 4

        def commit(t: int) -> None:
            while not stop.is_set():
                db[f"t{t}"] = counts[t]
                counts[t] += 1

        threads = [threading.Thread(target=commit, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        try:
            for _ in range(3):
                assert db.compact() is not None
        finally:
            stop.set()
            for th in threads:
                th.join()
        model = db.to_dict()
        assert all(model[f"t{t}"] == counts[t] - 1 for t in range(4) if counts[t])
    with walstore.open(path) as db:
        assert db.to_dict() == model


def test_prepared_buffers_are_the_ones_written_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """write_snapshot fills the buffers PreparedBuffers made (in its thread) when their
    size fits, and the snapshot is exact; close() frees what was not taken."""
    monkeypatch.setattr(snapshot, "BURST_BYTES", 256 << 10)
    txns = [[fmt.encode_op(PUT, 0, f"k{i % 500}".encode(), b"v" * 900)] for i in range(5000)]
    log = commit_log(txns)
    r = PyKVReplayer()
    r.apply_range(log, 0, len(log))
    prepared = snapshot.PreparedBuffers()
    taken: list[int] = []
    real_take = prepared.take

    def take(size: int) -> Any:
        buf = real_take(size)
        taken.append(buf is not None)
        return buf

    monkeypatch.setattr(prepared, "take", take)

    def burst(fd: int, data: memoryview, offset: int) -> float:
        os.pwrite(fd, data, offset)
        return 0.0

    info = snapshot.write_snapshot(
        OSFileAPI(), str(tmp_path), bytes(16), 5000, r.snapshot_payloads(8192), burst=burst, prepared=prepared
    )
    prepared.close()
    assert taken == [True, True]  # both slots' buffers came from it
    data = Path(info.path).read_bytes()
    assert snapshot.check_snapshot(info.path, data, bytes(16))[1].end == len(data)
    unused = snapshot.PreparedBuffers()
    unused.close()
    assert unused.take(unused.size) is None


def test_touch_pages_keeps_the_buffer_as_it_was(tmp_path: Path) -> None:
    """native.touch_pages writes a zero into each page of a fresh (zero) buffer: nothing
    changes but that its pages exist; a read-only buffer is refused."""
    native = require_native()
    buf = mmap.mmap(-1, (1 << 20) + 100)
    native.touch_pages(buf)
    assert buf[:] == bytes(len(buf))
    with pytest.raises((TypeError, BufferError)):
        native.touch_pages(b"read-only")
    buf.close()


def test_buffers_are_prepared_only_for_a_snapshot_that_may_fill_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compaction prepares the two burst buffers (and their pages) only when the last
    snapshot plus the segments after it could fill them: a small store's compaction does
    not make 48 MiB of pages it never uses."""
    from walstore import native

    if not native.AVAILABLE:
        require_native()
        if os.environ.get("WALSTORE_REQUIRE_NATIVE") == "1" and os.environ.get("WALSTORE_PURE") != "1":
            pytest.fail("the C module is built but not in use, and WALSTORE_REQUIRE_NATIVE=1")
        pytest.skip("the pure-Python writer has no burst writer (WALSTORE_PURE=1)")
    made: list[int] = []

    class Counting(snapshot.PreparedBuffers):
        def __init__(self, count: int = 2) -> None:
            made.append(count)
            super().__init__(count)

    monkeypatch.setattr(snapshot, "PreparedBuffers", Counting)
    with walstore.open(tmp_path / "db", auto_compact=False, segment_size=1 << 20) as db:
        for i in range(2000):
            db[f"k{i}"] = b"v" * 100
        assert db.compact() is not None
        assert made == []  # a few MiB of log: no prepared buffers
        monkeypatch.setattr(snapshot, "BURST_BYTES", 64 << 10)
        for i in range(2000):
            db[f"k{i}"] = b"w" * 100
        info = db.compact()
        assert info is not None and made == [2]
        model = db.to_dict()
    with walstore.open(tmp_path / "db") as db:
        assert db.to_dict() == model


def test_buffers_are_made_at_idle_cpu_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread that makes the burst buffers' pages runs at idle CPU priority (SCHED_IDLE,
    where Linux has it): on two cores it must not keep a committer waiting for a core."""
    policies: list[int] = []
    real = snapshot.idle_priority

    def recording() -> bool:
        ok = real()
        policies.append(os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else -1)
        return ok

    monkeypatch.setattr(snapshot, "idle_priority", recording)
    prepared = snapshot.PreparedBuffers(count=1)
    prepared.close()
    assert len(policies) == 1
    if hasattr(os, "SCHED_IDLE"):
        assert policies == [os.SCHED_IDLE]
    main_policy = os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else -1
    assert main_policy != getattr(os, "SCHED_IDLE", -2)  # only that thread


def test_idle_priority_applies_to_the_calling_thread_only() -> None:
    """idle_priority() changes the calling thread's policy, not the process's other threads."""
    if not hasattr(os, "SCHED_IDLE"):
        assert snapshot.idle_priority() is False
        return
    seen: list[tuple[bool, int]] = []
    t = threading.Thread(target=lambda: seen.append((snapshot.idle_priority(), os.sched_getscheduler(0))))
    t.start()
    t.join()
    assert seen == [(True, os.SCHED_IDLE)]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
