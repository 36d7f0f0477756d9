"""The C scanner against the Python reference: the same ScanResult on any input.

A hypothesis differential test over valid logs, damaged logs (cut, bit-flipped,
zero-filled tails, garbage and copies appended, records with a correct CRC
but a wrong type, field, sequence number or payload) and random bytes.
"""

from __future__ import annotations

import mmap
import os
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from native_support import U64, frame, outcome, require_native, scan_cases, segment_records

from walstore import format as fmt
from walstore import reader, recover

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def native() -> Any:
    return require_native()


def check_same(native: Any, buf: Any, start: int, first_seq: int, mask: int) -> Any:
    want = outcome(lambda: reader.scan_records(buf, start, first_seq, mask))
    got = outcome(lambda: native.scan_records(buf, start, first_seq, mask))
    assert got == want, (start, first_seq, mask)
    return want


@SETTINGS
@given(case=scan_cases())
def test_same_result_as_reference(native: Any, case: tuple[bytes, int, int, int]) -> None:
    buf, start, first_seq, mask = case
    check_same(native, buf, start, first_seq, mask)


@SETTINGS
@given(data=st.binary(max_size=2000), start=st.integers(0, 80), first_seq=st.integers(0, 5))
def test_random_bytes(native: Any, data: bytes, start: int, first_seq: int) -> None:
    for mask in (reader.SEGMENT_TYPES, reader.SNAPSHOT_TYPES):
        check_same(native, data, start, first_seq, mask)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_buffer_types_and_unaligned_views(native: Any, data: st.DataObject) -> None:
    body = data.draw(segment_records(1))
    shift = data.draw(st.integers(0, 7))
    raw = bytes(shift) + fmt.FileHeader(fmt.KIND_SEGMENT, bytes(16), 1).encode() + body
    view = memoryview(raw)[shift:]
    want = check_same(native, view, 64, 1, reader.SEGMENT_TYPES)
    for buf in (bytes(view), bytearray(view)):
        assert outcome(lambda b=buf: native.scan_records(b, 64, 1, reader.SEGMENT_TYPES)) == want


def test_each_damage_name_is_reached(native: Any) -> None:
    """One hand-made case per damage name, so a name mismatch cannot hide in randomness."""
    ok = frame(fmt.REC_COMMIT, 1, 0, fmt.encode_op(fmt.OP_PUT, 0, b"k", b"v"))
    cases = {
        "short-header": ok + b"\x01" * 8,
        "zero-header-then-data": ok + bytes(40) + b"\x01",
        "bad-length": ok + frame(fmt.REC_COMMIT, 2, 1, b"", length=1 << 31),
        "bad-crc": ok + b"\x00\x00\x00\x01" + ok[4:],
        "bad-type": ok + frame(fmt.REC_META, 2, 1, b""),
        "bad-reserved": ok + frame(fmt.REC_COMMIT, 2, 1, b"", res32=1),
        "bad-seq": ok + frame(fmt.REC_COMMIT, 3, 1, b""),
        "bad-watermark": ok + frame(fmt.REC_CLOSE, 1, 0, b""),
        "bad-payload": ok + frame(fmt.REC_COMMIT, 2, 1, b"\x01" * 13),
    }
    for name, buf in cases.items():
        result = check_same(native, buf, 0, 1, reader.SEGMENT_TYPES)
        assert result[1]["damage"] == name, (name, result)


def test_sequence_number_edges(native: Any) -> None:
    """first_seq 0 (last_seq -1) and 2**64 - 1 (no next number), and arguments C hands back to Python."""
    for first_seq in (0, 1, U64 - 1, U64):
        for rec in (
            frame(fmt.REC_COMMIT, first_seq, 0, b""),
            frame(fmt.REC_CLOSE, first_seq - 1, first_seq - 1, b""),
            frame(fmt.REC_COMMIT, first_seq, first_seq - 1, b"") + frame(fmt.REC_COMMIT, first_seq + 1, 0, b""),
        ):
            for mask in (reader.SEGMENT_TYPES, 1 << 40 | reader.SEGMENT_TYPES):
                check_same(native, rec + b"\x07", 0, first_seq, mask)
    ok = frame(fmt.REC_COMMIT, 1, 0, b"")
    for start, first_seq in ((-8, 1), (len(ok) + 3, 1), (0, -1), (0, 1 << 64)):
        check_same(native, ok, start, first_seq, reader.SEGMENT_TYPES)


def test_mapped_segment_file(native: Any, tmp_path: Path) -> None:
    """A real segment file with a preallocated zero tail, read through mmap."""
    path = tmp_path / fmt.segment_name(1)
    records = [
        fmt.encode_frame(fmt.REC_COMMIT, s, s - 1, fmt.encode_op(fmt.OP_PUT, 0, b"k%d" % s, os.urandom(50)))
        for s in range(1, 200)
    ]
    path.write_bytes(fmt.FileHeader(fmt.KIND_SEGMENT, os.urandom(16), 1).encode() + b"".join(records) + bytes(1 << 16))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        result = check_same(native, mm, fmt.FILE_HEADER_SIZE, 1, reader.SEGMENT_TYPES)
    assert result[1]["damage"] is None and result[1]["records"] == 199


def _garbage_after_records(seed: int, garbage: int) -> bytes:
    """Three valid COMMITs, then `garbage` random bytes: damage, with nothing valid after."""
    ops = fmt.OP_HEADER.pack(fmt.OP_PUT, 0, 0, 1, 1) + b"kv"
    records = b"".join(frame(fmt.REC_COMMIT, s, s - 1, ops) for s in (1, 2, 3))
    return records + random.Random(seed).randbytes(garbage)


def test_search_past_damage_is_linear_on_garbage(monkeypatch: Any) -> None:
    """Past damage, the search for records that parse checks a CRC only where the type and
    reserved fields could be a record's: over 1 MiB of random bytes it CRCs at most as
    many bytes as there are (checking each CRC first CRC'd 5.9 MB here, growing with
    the square of the garbage), and the scanner and the recovery walk find nothing."""
    buf = _garbage_after_records(3, 1 << 20)
    crc_bytes = [0]
    real_crc = fmt.crc

    def counting_crc(data: Any, value: int = 0) -> int:
        crc_bytes[0] += len(data)
        return real_crc(data, value)

    monkeypatch.setattr(fmt, "crc", counting_crc)
    result = reader.scan_records(buf, 0, 1, reader.SEGMENT_TYPES)
    assert result.last_seq == 3 and result.damage and result.resync_records == 0
    assert crc_bytes[0] <= len(buf)
    crc_bytes[0] = 0
    assert recover._resync_at(memoryview(buf), result.end, len(buf)) is None
    assert crc_bytes[0] <= len(buf)


def test_c_search_past_damage_on_garbage_matches_the_reference(native: Any) -> None:
    """The C scanner's search past damage gives the reference's result over random bytes
    (it checks the same fields before the CRC)."""
    for seed in range(3):
        check_same(native, _garbage_after_records(seed, 1 << 18), 0, 1, reader.SEGMENT_TYPES)
