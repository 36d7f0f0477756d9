"""Helpers for the C replayer's tests: loading it, and hypothesis strategies for logs.

Tests that need the compiled module call `require_native()`: it fails when
WALSTORE_REQUIRE_NATIVE=1 and the module is missing, and skips loudly otherwise.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import pytest
from hypothesis import strategies as st

from walstore import format as fmt
from walstore import reader

U64 = (1 << 64) - 1
FRAME_REST = struct.Struct("<IBBHIQQ")


def require_native() -> Any:
    """walstore.native with its compiled module, or fail/skip (see module docstring)."""
    from walstore import native

    if native.BUILT:
        return native
    if os.environ.get("WALSTORE_REQUIRE_NATIVE") == "1":
        pytest.fail("walstore._walstore_native is not built, and WALSTORE_REQUIRE_NATIVE=1")
    pytest.skip(
        "SKIPPED: walstore._walstore_native (the C replayer) is not built here; "
        "run `pip install -e .` with a C compiler, or set WALSTORE_REQUIRE_NATIVE=1 to make this fail"
    )


def outcome(fn: Callable[[], Any]) -> tuple[Any, ...]:
    """("ok", result) or ("raised", type, message): what a call did, for comparing two implementations."""
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - any exception must match the other side's
        return ("raised", type(exc), str(exc))
    if isinstance(result, reader.ScanResult):
        return ("ok", asdict(result))
    if isinstance(result, dict):
        return ("ok", list(result.items()))
    return ("ok", result)


def frame(
    rtype: int,
    seq: int,
    durable: int,
    payload: bytes,
    *,
    flags: int = 0,
    res16: int = 0,
    res32: int = 0,
    pad: bytes | None = None,
    length: int | None = None,
) -> bytes:
    """A record frame with any field values and a correct CRC (unlike encode_frame's checks)."""
    n = len(payload)
    padding = pad if pad is not None else bytes(fmt.padded(n) - n)
    body = (
        FRAME_REST.pack(n if length is None else length, rtype, flags, res16, res32, seq & U64, durable & U64)
        + payload
        + padding
    )
    return struct.pack("<I", fmt.crc(body)) + body


def blob(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


KEY_TEXTS = [t.encode() for t in ["", "a", "b", "k1", "ключ", "\u00e9"]] * 5 + [b"\xc3"]  # rarely not UTF-8
# Keys around the C table's 16 inline bytes: 15, 16, and longer ones sharing those 16.
HEAD16 = bytes(range(16))
KEY_BYTES = [b"", b"a", b"b", b"k1", b"\xff\xfe", HEAD16[:15], HEAD16, HEAD16 + b"x", HEAD16 + b"y", HEAD16 + b"xz"]


@st.composite
def op_bytes(draw: st.DrawFn, allow_call: bool = True, puts_only: bool = False) -> bytes:
    """One encoded operation; a small key space, so keys are overwritten and deleted."""
    ops = [fmt.OP_PUT] * 5 + ([] if puts_only else [fmt.OP_DELETE] * 2) + ([fmt.OP_CALL] if allow_call else [])
    op = draw(st.sampled_from(ops))
    key_str = draw(st.booleans())
    key = draw(st.sampled_from(KEY_TEXTS if key_str else KEY_BYTES))
    kind = draw(st.sampled_from([fmt.VALUE_BYTES, fmt.VALUE_STR, fmt.VALUE_CODEC]))
    if kind == fmt.VALUE_STR:
        value = draw(st.text(max_size=8)).encode("utf-8", "surrogatepass")
    else:
        size = draw(st.one_of(st.integers(0, 24), st.integers(0, 30000)))
        value = blob(draw(st.integers(0, 1 << 30)), size) if size > 24 else draw(st.binary(max_size=size))
    if op == fmt.OP_DELETE and draw(st.booleans()):
        value = b""
    return fmt.encode_op(op, fmt.op_flags(key_str, kind), key, value)


def payloads(allow_call: bool = True, puts_only: bool = False) -> st.SearchStrategy[bytes]:
    return st.lists(op_bytes(allow_call, puts_only), max_size=3).map(b"".join)


@st.composite
def odd_frame(draw: st.DrawFn, expected: int) -> bytes:
    """A frame with a correct CRC and one fault: type, reserved field, number, watermark, payload."""
    rtype = draw(st.sampled_from([fmt.REC_COMMIT, fmt.REC_CLOSE]))
    seq = expected if rtype == fmt.REC_COMMIT else expected - 1
    durable = seq - 1 if rtype == fmt.REC_COMMIT else seq
    payload = draw(payloads()) if rtype == fmt.REC_COMMIT else b""
    flags = res16 = res32 = 0
    pad = None
    fault = draw(st.sampled_from(["type", "reserved", "seq", "watermark", "payload", "padding", "none"]))
    if fault == "type":
        rtype = draw(st.sampled_from([0, 3, 4, 5, 6, 31, 32, 255]))
        if rtype == fmt.REC_SNAPSHOT_END:
            payload = draw(st.sampled_from([bytes(16), b"", bytes(24)]))
    elif fault == "reserved":
        flags, res16, res32 = draw(st.sampled_from([(1, 0, 0), (0, 1, 0), (0, 0, 1 << 31)]))
    elif fault == "seq":
        seq = draw(st.sampled_from([seq - 1, seq + 1, seq + 2, 0, U64]))
    elif fault == "watermark":
        durable = draw(st.sampled_from([seq, seq + 1, seq - 1, U64]))
    elif fault == "payload":
        rtype = fmt.REC_COMMIT
        seq, durable = expected, expected - 1
        payload = draw(
            st.one_of(
                st.binary(min_size=1, max_size=40),
                st.just(fmt.encode_op(fmt.OP_PUT, 0, b"k", b"v")[:-1]),
                st.just(fmt.encode_op(fmt.OP_PUT, 0, b"k", b"v") + b"\x01"),
                st.sampled_from(
                    [bytes([4, 0, 0, 0]), bytes([1, 8, 0, 0]), bytes([1, 6, 0, 0]), bytes([1, 0, 1, 0])]
                ).map(lambda h: h + bytes(8)),
            )
        )
    elif fault == "padding":
        payload = payload + b"\x01"
        pad = b"\x01" * (fmt.padded(len(payload)) - len(payload))
    return frame(rtype, seq, durable, payload, flags=flags, res16=res16, res32=res32, pad=pad)


@st.composite
def segment_records(draw: st.DrawFn, first_seq: int, allow_call: bool = True) -> bytes:
    """Valid COMMIT/CLOSE records (sometimes with an odd one among them) from first_seq."""
    out = []
    seq = first_seq - 1
    for _ in range(draw(st.integers(0, 10))):
        what = draw(st.sampled_from(["commit"] * 6 + ["close", "odd"]))
        if what == "commit" and seq + 1 <= U64:
            seq += 1
            durable = draw(st.integers(0, seq - 1)) if seq > 0 else 0
            out.append(frame(fmt.REC_COMMIT, seq, durable, draw(payloads(allow_call))))
        elif what == "close" and seq >= 0:
            out.append(frame(fmt.REC_CLOSE, seq, seq, b""))
        elif what == "odd":
            out.append(draw(odd_frame(seq + 1)))
    return b"".join(out)


@st.composite
def snapshot_records(draw: st.DrawFn, first_seq: int) -> bytes:
    """SNAPSHOT_DATA records (PUTs; now and then a DELETE or CALL, which is damage there) and a
    SNAPSHOT_END, all carrying first_seq."""
    s = first_seq & U64
    out = [
        frame(fmt.REC_SNAPSHOT_DATA, s, s, draw(payloads(draw(st.integers(0, 9)) == 0, draw(st.integers(0, 9)) > 0)))
        for _ in range(draw(st.integers(0, 4)))
    ]
    if draw(st.booleans()):
        out.append(frame(fmt.REC_SNAPSHOT_END, s, s, struct.pack("<QQ", len(out), 0)))
    if draw(st.booleans()):
        out.append(draw(odd_frame(s)))
    return b"".join(out)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` damaged the ways disks and crashes do: cut, flipped, zeroed, garbage, copies."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(["cut", "flip", "zero-tail", "zero-range", "garbage", "zeros", "overwrite", "copy"]))
        n = len(buf)
        if how == "cut" and n:
            del buf[draw(st.integers(0, n - 1)) :]
        elif how == "flip" and n:
            i = draw(st.integers(0, n - 1))
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif how == "zero-tail" and n:
            i = draw(st.integers(0, n - 1))
            buf[i:] = bytes(n - i)
        elif how == "zero-range" and n:
            i = draw(st.integers(0, n - 1)) & ~7
            buf[i : i + 40] = bytes(len(buf[i : i + 40]))
        elif how == "garbage":
            buf += draw(st.binary(min_size=1, max_size=64))
        elif how == "zeros":
            buf += bytes(draw(st.integers(1, 200)))
        elif how == "overwrite" and n:
            i = draw(st.integers(0, n - 1))
            junk = draw(st.binary(min_size=1, max_size=16))
            buf[i : i + len(junk)] = junk
        elif how == "copy" and n >= 8:
            i = draw(st.integers(0, n // 8 - 1)) * 8
            j = draw(st.integers(i, n))
            buf += buf[i:j]
    return bytes(buf)


MASKS = [reader.SEGMENT_TYPES, reader.SNAPSHOT_TYPES, reader.IDENTITY_TYPES, 0, 0xFFFFFFFF]


@st.composite
def scan_cases(draw: st.DrawFn) -> tuple[bytes, int, int, int]:
    """(buf, start, first_seq, type_mask) over valid, damaged and random logs."""
    first_seq = draw(st.one_of(st.integers(1, 1000), st.sampled_from([0, 1, 2, 1 << 63, U64 - 2, U64])))
    kind = draw(st.sampled_from(["segment"] * 4 + ["snapshot", "random"]))
    if kind == "segment":
        body = draw(segment_records(first_seq))
        mask = reader.SEGMENT_TYPES
    elif kind == "snapshot":
        body = draw(snapshot_records(first_seq))
        mask = reader.SNAPSHOT_TYPES
    else:
        body = draw(st.binary(max_size=600))
        mask = draw(st.sampled_from(MASKS))
    if draw(st.integers(0, 9)) == 0:
        mask = draw(st.one_of(st.sampled_from(MASKS), st.integers(0, 0xFFFFFFFF)))
    header_kind = fmt.KIND_SEGMENT if kind == "segment" else fmt.KIND_SNAPSHOT
    if draw(st.booleans()):
        head = fmt.FileHeader(header_kind, bytes(16), first_seq & U64).encode()
        start = fmt.FILE_HEADER_SIZE
    else:
        head, start = b"", 0
    buf = draw(mutated(head + body))
    if draw(st.integers(0, 19)) == 0:
        start = draw(st.integers(0, len(buf) + 9))
    return buf, start, first_seq, mask
