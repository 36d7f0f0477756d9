"""The C KVReplayer against PyKVReplayer: the same dict, in the same order, and the same errors."""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from native_support import frame, mutated, outcome, require_native, segment_records, snapshot_records

from walstore import format as fmt
from walstore import reader
from walstore.errors import ReplayError
from walstore.kvreplay import PyKVReplayer, make_kv_replayer

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PUT, DELETE, CALL = fmt.OP_PUT, fmt.OP_DELETE, fmt.OP_CALL


@pytest.fixture(scope="module")
def native() -> Any:
    return require_native()


def decode(data: bytes) -> Any:
    """A codec stand-in that fails on some inputs, so decode errors are compared too."""
    if data[:1] == b"\xff":
        raise ValueError(f"undecodable {data[:4]!r}")
    return ("decoded", data)


def replay_both(native: Any, ranges: list[tuple[Any, int, int]]) -> tuple[Any, ...]:
    """Feed both replayers the same ranges; compare each step's outcome, return the final one."""
    py, c = PyKVReplayer(), native.KVReplayer()
    for buf, start, end in ranges:
        want = outcome(lambda r=py, b=buf, s=start, e=end: r.apply_range(b, s, e))
        got = outcome(lambda r=c, b=buf, s=start, e=end: r.apply_range(b, s, e))
        assert got == want
    want = outcome(lambda: py.finish(decode))
    got = outcome(lambda: c.finish(decode))
    assert got == want
    return want


def scanned(buf: bytes, start: int, first_seq: int, mask: int) -> tuple[bytes, int, int]:
    return buf, start, reader.scan_records(buf, start, first_seq, mask).end


@st.composite
def logs(draw: st.DrawFn) -> tuple[bytes, int, int]:
    """A scanned range: a segment or snapshot log, maybe damaged, cut at the scan's end."""
    first_seq = draw(st.integers(1, 50))
    if draw(st.integers(0, 3)) == 0:
        body, mask = draw(snapshot_records(first_seq)), reader.SNAPSHOT_TYPES
    else:
        body, mask = draw(segment_records(first_seq)), reader.SEGMENT_TYPES
    head = fmt.FileHeader(fmt.KIND_SEGMENT, bytes(16), first_seq).encode()
    buf = draw(mutated(head + body)) if draw(st.booleans()) else head + body
    return scanned(buf, fmt.FILE_HEADER_SIZE, first_seq, mask)


@SETTINGS
@given(ranges=st.lists(logs(), min_size=1, max_size=3), kinds=st.lists(st.sampled_from("bam"), min_size=3))
def test_same_dict_as_reference(native: Any, ranges: list[tuple[bytes, int, int]], kinds: list[str]) -> None:
    wrapped = []
    for (buf, start, end), kind in zip(ranges, kinds, strict=False):
        b: Any = buf if kind == "b" else bytearray(buf) if kind == "a" else memoryview(buf)
        wrapped.append((b, start, end))
    replay_both(native, wrapped)


@SETTINGS
@given(data=st.binary(max_size=600), start=st.integers(0, 700), length=st.integers(0, 700))
def test_same_errors_on_unscanned_ranges(native: Any, data: bytes, start: int, length: int) -> None:
    """Ranges that were never scanned: framing and op checks must agree, and never read out of bounds."""
    replay_both(native, [(data, start, start + length)])


@settings(max_examples=100, deadline=None)
@given(ranges=st.lists(logs(), min_size=1, max_size=2))
def test_unscanned_tails(native: Any, ranges: list[tuple[bytes, int, int]]) -> None:
    """The same logs, replayed to the end of the buffer whatever the scan said."""
    replay_both(native, [(buf, start, len(buf)) for buf, start, _ in ranges])


def ops_log(*ops: bytes) -> bytes:
    return b"".join(frame(fmt.REC_COMMIT, i + 1, i, op) for i, op in enumerate(ops))


def test_last_writer_wins_and_dict_order(native: Any) -> None:
    log = ops_log(
        fmt.encode_op(PUT, 0, b"a", b"1"),
        fmt.encode_op(PUT, fmt.op_flags(True, fmt.VALUE_STR), b"a", b"un"),  # a str key: another key
        fmt.encode_op(PUT, 0, b"b", b"2"),
        fmt.encode_op(PUT, 0, b"c", b"3"),
        fmt.encode_op(PUT, 0, b"a", b"4"),  # keeps its place
        fmt.encode_op(DELETE, 0, b"b"),
        fmt.encode_op(PUT, 0, b"b", b"5"),  # deleted then put: goes last
        fmt.encode_op(DELETE, 0, b"c"),
        fmt.encode_op(PUT, fmt.op_flags(False, fmt.VALUE_CODEC), b"d", b"[1]"),
        fmt.encode_op(DELETE, 0, b"never-there"),
    )
    result = replay_both(native, [(log, 0, len(log))])
    assert result == ("ok", [(b"a", b"4"), ("a", "un"), (b"b", b"5"), (b"d", ("decoded", b"[1]"))])


def test_keys_that_share_the_inline_head(native: Any) -> None:
    """The C table keeps a key's first 16 bytes in its entry: keys equal there but not after
    (or of other lengths) stay distinct keys, and equal ones are found, whatever the table
    holds (many keys, so the table is rebuilt in between)."""
    head = b"0123456789abcdef"
    names = [head[:15], head, head + b"x", head + b"y", head + b"xy", head + b"x" * 40, head + b"y" * 40]
    ops = []
    for round_ in range(3):
        for i in range(2000):  # filler, so the table grows and is rebuilt around them
            ops.append(fmt.encode_op(PUT, 0, b"filler-%d-%d" % (round_, i), b"f"))
        for j, name in enumerate(names):
            ops.append(fmt.encode_op(PUT, 0, name, b"%d-%d" % (round_, j)))
        ops.append(fmt.encode_op(DELETE, 0, names[(round_ * 3) % len(names)]))
        ops.append(fmt.encode_op(PUT, fmt.op_flags(True, fmt.VALUE_STR), names[round_], b"text"))
    log = frame(fmt.REC_COMMIT, 1, 0, b"".join(ops))
    status, items = replay_both(native, [(log, 0, len(log))])
    assert status == "ok"
    got = dict(items)
    assert got[head + b"x"] == b"2-2" and got[head + b"x" * 40] == b"2-5" and got[head[:15]] == b"2-0"
    assert head + b"y" * 40 not in got  # deleted in the last round
    assert got["0123456789abcdef"] == "text"  # the str key with those bytes: another key


def test_many_keys_grow_and_shrink(native: Any) -> None:
    """Enough keys to rebuild the table many times, with deletes leaving dead entries."""
    ops = [fmt.encode_op(PUT, 0, b"%06d" % i, b"v%d" % i) for i in range(5000)]
    ops += [fmt.encode_op(DELETE, 0, b"%06d" % i) for i in range(0, 5000, 3)]
    ops += [fmt.encode_op(PUT, fmt.op_flags(True, fmt.VALUE_STR), b"%06d" % i, b"s") for i in range(0, 5000, 7)]
    log = frame(fmt.REC_COMMIT, 1, 0, b"".join(ops))
    assert replay_both(native, [(log, 0, len(log))])[0] == "ok"


def test_large_table(native: Any) -> None:
    """400,000 keys: the slot and entry tables pass 4 MiB and are mapped on their own (2 MiB pages)."""
    n = 400_000
    ops = [fmt.encode_op(PUT, 0, b"%07d" % i, b"%d" % (i % 97)) for i in range(n)]
    ops += [fmt.encode_op(DELETE, 0, b"%07d" % i) for i in range(0, n, 5)]
    ops += [fmt.encode_op(PUT, 0, b"%07d" % i, b"again") for i in range(0, n, 10)]
    log = frame(fmt.REC_COMMIT, 1, 0, b"".join(ops))
    status, items = replay_both(native, [(log, 0, len(log))])
    assert status == "ok" and len(items) == n - n // 5 + n // 10


def test_call_is_an_error_and_poisons(native: Any) -> None:
    log = ops_log(fmt.encode_op(PUT, 0, b"a", b"1"), fmt.encode_op(CALL, 0, b"app.add", b"[1]"))
    for r in (PyKVReplayer(), native.KVReplayer()):
        with pytest.raises(ReplayError, match="CALL"):
            r.apply_range(log, 0, len(log))
        with pytest.raises(ReplayError, match="raised before"):
            r.finish(decode)


def test_bad_ranges(native: Any) -> None:
    log = ops_log(fmt.encode_op(PUT, 0, b"a", b"1"))
    for start, end in ((-1, 8), (8, 4), (0, len(log) + 1)):
        replay_both(native, [(log, start, end)])
    for r in (PyKVReplayer(), native.KVReplayer()):
        with pytest.raises(ValueError):
            r.apply_range(log, 0, len(log) + 8)


def test_mapped_files_are_released(native: Any, tmp_path: Path) -> None:
    """The C table points into the mmap until finish; then the mmap can be closed."""
    path = tmp_path / "seg"
    log = ops_log(*(fmt.encode_op(PUT, 0, b"k%d" % i, os.urandom(20)) for i in range(100)))
    path.write_bytes(log)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    r = native.KVReplayer()
    r.apply_range(mm, 0, len(log))
    with pytest.raises(BufferError):
        mm.close()  # exported to the C table: cannot be unmapped under it
    got = r.finish(decode)
    mm.close()
    py = PyKVReplayer()
    py.apply_range(log, 0, len(log))
    assert list(got.items()) == list(py.finish(decode).items())


def test_finish_resets(native: Any) -> None:
    log = ops_log(fmt.encode_op(PUT, 0, b"a", b"1"))
    for r in (PyKVReplayer(), native.KVReplayer()):
        r.apply_range(log, 0, len(log))
        assert r.finish(decode) == {b"a": b"1"}
        assert r.finish(decode) == {}


def test_make_kv_replayer_follows_available(native: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "AVAILABLE", True)
    assert isinstance(make_kv_replayer(), native.KVReplayer)
    monkeypatch.setattr(native, "AVAILABLE", False)
    assert isinstance(make_kv_replayer(), PyKVReplayer)
