"""Last-writer-wins replay of key-value operations: the pure-Python reference.

`PyKVReplayer` is exact and is what the C `native.KVReplayer` must agree with,
on results (the same dict, in the same order; the same snapshot payloads, byte
for byte) and on errors. A key is
(key bytes, key-is-str flag): PUT sets it, DELETE removes it. Records in the
ranges given are assumed already scanned; their framing is still checked,
so a wrong range raises ReplayError instead of misreading.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Generator
from typing import Any, NoReturn, Protocol, Union

from . import format as fmt
from .errors import ReplayError

Buffer = Union[bytes, bytearray, memoryview, mmap.mmap]
"""Anything exposing contiguous bytes; a mapped segment file is the usual one."""

# Error codes, as _native/kvreplay.h's WS_KV_* (tests/test_format_agreement.py checks).
KV_ERANGE = 1
KV_EFRAME = 2
KV_ETYPE = 3
KV_EOPS = 4
KV_ECALL = 5
KV_ENOMEM = 6
KV_EFAILED = 100  # Python only: the replayer raised before and must be replaced
SNAPSHOT_CHUNK_BYTES = 1 << 20  # snapshot.CHUNK_BYTES: the default payload size of snapshot_payloads
_MESSAGES = {
    KV_EFRAME: "a record frame runs past the end of the range",
    KV_ETYPE: "a record type that carries no key-value operations",
    KV_EOPS: "the operations do not fill the payload exactly",
    KV_ECALL: "a CALL operation in a key-value store's log",
}

VALUE_STR_FLAG = fmt.VALUE_STR << fmt.VALUE_KIND_SHIFT
VALUE_CODEC_FLAG = fmt.VALUE_CODEC << fmt.VALUE_KIND_SHIFT
_FLAG_BITS = fmt.KEY_STR | fmt.VALUE_KIND_MASK
_HS = fmt.FRAME_HEADER_SIZE
_OHS = fmt.OP_HEADER_SIZE
_LEN_TYPE = struct.Struct("<IB")  # frame length and type, at frame offset 4
_OPH = fmt.OP_HEADER


def kv_error(code: int, offset: int, note: str = "") -> Exception:
    """The exception for a replay error code (shared by both replayers, so they raise alike)."""
    if code == KV_ERANGE:
        return ValueError(f"apply_range: {note}")
    if code == KV_ENOMEM:
        return MemoryError("the replay table is out of memory")
    if code == KV_EFAILED:
        return ReplayError("this replayer raised before; make a new one")
    return ReplayError(f"record at offset {offset}: {_MESSAGES.get(code, f'error {code}')}")


def decoded(kb: bytes, key_str: int, vb: bytes, kind: int, decode: Callable[[bytes], Any]) -> tuple[Any, Any]:
    """A replayed entry as the store holds it: a str key where `key_str` (fmt.KEY_STR) is
    set, else bytes; a str, decode(vb) or bytes value by `kind` (VALUE_*_FLAG). The key
    is decoded first, so a bad key raises before the value is looked at."""
    key = kb.decode("utf-8") if key_str else kb
    if kind == VALUE_STR_FLAG:
        return key, vb.decode("utf-8")
    if kind == VALUE_CODEC_FLAG:
        return key, decode(vb)
    return key, vb


class KVReplayerLike(Protocol):
    """What `make_kv_replayer` returns."""

    def apply_range(self, buf: Buffer, start: int, end: int) -> None: ...

    def finish(self, decode: Callable[[bytes], Any]) -> dict[Any, Any]: ...

    def __len__(self) -> int: ...

    def snapshot_payloads(self, chunk_bytes: int = SNAPSHOT_CHUNK_BYTES) -> Generator[bytes, None, None]: ...


def check_chunk_bytes(chunk_bytes: int) -> int:
    """`chunk_bytes` as an int in 1..MAX_PAYLOAD (every payload must fit in a record), else ValueError."""
    n = int(chunk_bytes)
    if n != chunk_bytes or not 1 <= n <= fmt.MAX_PAYLOAD:
        raise ValueError(f"chunk_bytes must be an integer from 1 to {fmt.MAX_PAYLOAD}, not {chunk_bytes!r}")
    return n


class PyKVReplayer:
    """Applies the PUT/DELETE operations of records, in order, to a dict of raw entries."""

    def __init__(self) -> None:
        self._raw: dict[tuple[bytes, int], tuple[bytes, int]] = {}
        self._failed = False

    def apply_range(self, buf: Buffer, start: int, end: int) -> None:
        """Apply the records in [start, end): COMMIT and SNAPSHOT_DATA carry operations,
        CLOSE and SNAPSHOT_END none; anything else, a CALL, or bad framing raises ReplayError
        (the operations before it are applied; the replayer is then unusable)."""
        if self._failed:
            raise kv_error(KV_EFAILED, 0)
        mv = memoryview(buf)
        if not (mv.itemsize == 1 and mv.ndim == 1 and mv.c_contiguous):
            mv = mv.cast("B")
        size = mv.nbytes
        if not (0 <= start <= end <= size):
            self._failed = True
            raise kv_error(KV_ERANGE, start, f"range [{start}, {end}) of a {size}-byte buffer")
        off = start
        while off < end:
            if end - off < _HS:
                self._fail(KV_EFRAME, off)
            length, rtype = _LEN_TYPE.unpack_from(mv, off + 4)
            padded = fmt.padded(length)
            if length > fmt.MAX_PAYLOAD or padded > end - off - _HS:
                self._fail(KV_EFRAME, off)
            if rtype == fmt.REC_COMMIT or rtype == fmt.REC_SNAPSHOT_DATA:
                code = self._apply_ops(mv, off + _HS, off + _HS + length)
                if code:
                    self._fail(code, off)
            elif rtype != fmt.REC_CLOSE and rtype != fmt.REC_SNAPSHOT_END:
                self._fail(KV_ETYPE, off)
            off += _HS + padded

    def _apply_ops(self, mv: memoryview, pos: int, stop: int) -> int:
        """Apply one payload's operations (reader.check_ops' checks); 0 or an error code."""
        raw = self._raw
        while pos < stop:
            if stop - pos < _OHS:
                return KV_EOPS
            op, flags, reserved, klen, vlen = _OPH.unpack_from(mv, pos)
            if op < fmt.OP_PUT or op > fmt.OP_CALL or reserved:
                return KV_EOPS
            if flags & ~_FLAG_BITS or (flags >> fmt.VALUE_KIND_SHIFT) & 3 == 3:
                return KV_EOPS
            pos += _OHS
            if klen > stop - pos or vlen > stop - pos - klen:
                return KV_EOPS
            if op == fmt.OP_CALL:
                return KV_ECALL
            key = (bytes(mv[pos : pos + klen]), flags & fmt.KEY_STR)
            pos += klen
            if op == fmt.OP_PUT:
                raw[key] = (bytes(mv[pos : pos + vlen]), flags & fmt.VALUE_KIND_MASK)
            else:
                raw.pop(key, None)
            pos += vlen
        return 0

    def _fail(self, code: int, offset: int) -> NoReturn:
        self._failed = True
        raise kv_error(code, offset)

    def __len__(self) -> int:
        return len(self._raw)

    def finish(self, decode: Callable[[bytes], Any]) -> dict[Any, Any]:
        """The state as a dict, in dict order of first PUT (a PUT after a DELETE goes last):
        str keys for text keys, else bytes; bytes, str or decode(bytes) values by kind.
        Resets the replayer, also when a key or value fails to decode."""
        if self._failed:
            raise kv_error(KV_EFAILED, 0)
        raw, self._raw = self._raw, {}
        out: dict[Any, Any] = {}
        for (kb, kstr), (vb, vkind) in raw.items():
            key, value = decoded(kb, kstr, vb, vkind, decode)
            out[key] = value
        return out

    def snapshot_payloads(self, chunk_bytes: int = SNAPSHOT_CHUNK_BYTES) -> Generator[bytes, None, None]:
        """The state as SNAPSHOT_DATA payloads: one PUT operation per surviving key, in dict
        order (as `finish`), carrying the key and value bytes and the flags (key-is-str, value
        kind) of its last PUT as logged, nothing decoded. Ops are grouped while a payload stays
        within `chunk_bytes`; an op longer than that is alone in its payload. No state, no payload.

        The state is taken at the call (errors such as a failed replayer raise here), and the
        replayer is then finished: empty, as after `finish`. Close the generator if it is not
        run to the end (the C replayer keeps its buffers exported until it ends or is closed).
        """
        if self._failed:
            raise kv_error(KV_EFAILED, 0)
        chunk = check_chunk_bytes(chunk_bytes)
        raw, self._raw = self._raw, {}
        return _py_snapshot_payloads(raw, chunk)


def _py_snapshot_payloads(
    raw: dict[tuple[bytes, int], tuple[bytes, int]], chunk_bytes: int
) -> Generator[bytes, None, None]:
    pack = _OPH.pack
    put = fmt.OP_PUT
    parts: list[bytes] = []
    size = 0
    for (kb, kstr), (vb, vkind) in raw.items():
        op = pack(put, kstr | vkind, 0, len(kb), len(vb)) + kb + vb
        n = len(op)
        if size and n > chunk_bytes - size:
            yield b"".join(parts)
            parts, size = [], 0
        parts.append(op)
        size += n
        if size >= chunk_bytes:
            yield b"".join(parts)
            parts, size = [], 0
    if parts:
        yield b"".join(parts)


def make_kv_replayer() -> KVReplayerLike:
    """The C replayer when `native.AVAILABLE`, else PyKVReplayer."""
    try:
        from . import native
    except ImportError:  # pragma: no cover - native.py imports without the compiled module
        return PyKVReplayer()
    if native.AVAILABLE:
        return native.KVReplayer()
    return PyKVReplayer()
