"""Last-writer-wins replay of key-value operations: the pure-Python reference.

`PyKVReplayer` is exact and is what the C `KVReplayer` must agree with.
Records in the ranges given are assumed already scanned and valid; each
COMMIT applies whole, so a transaction is all or nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Union

from . import format as fmt
from .errors import ReplayError

Buffer = Union[bytes, bytearray, memoryview]
_FRAME = fmt.FRAME_HEADER
_OPH = fmt.OP_HEADER
_HS = fmt.FRAME_HEADER_SIZE
_OHS = fmt.OP_HEADER_SIZE
_VALUE_STR = fmt.VALUE_STR << fmt.VALUE_KIND_SHIFT
_VALUE_CODEC = fmt.VALUE_CODEC << fmt.VALUE_KIND_SHIFT


class PyKVReplayer:
    """Applies PUT/DELETE operations of records, in order, to a dict of raw entries."""

    def __init__(self) -> None:
        self._raw: dict[tuple[bytes, int], tuple[bytes, int]] = {}

    def apply_range(self, buf: Buffer, start: int, end: int) -> None:
        """Apply the records in [start, end) of `buf` (COMMIT and SNAPSHOT_DATA carry operations)."""
        mv = memoryview(buf)
        raw = self._raw
        off = start
        while off < end:
            length, rtype = _FRAME.unpack_from(mv, off + 4)[:2]
            pos = off + _HS
            off = pos + fmt.padded(length)
            if rtype != fmt.REC_COMMIT and rtype != fmt.REC_SNAPSHOT_DATA:
                continue
            stop = pos + length
            while pos < stop:
                op, flags, _r, klen, vlen = _OPH.unpack_from(mv, pos)
                pos += _OHS
                key = (bytes(mv[pos : pos + klen]), flags & fmt.KEY_STR)
                pos += klen
                if op == fmt.OP_PUT:
                    raw[key] = (bytes(mv[pos : pos + vlen]), flags & fmt.VALUE_KIND_MASK)
                elif op == fmt.OP_DELETE:
                    raw.pop(key, None)
                else:
                    raise ReplayError("a CALL operation in a key-value store's log")
                pos += vlen

    def finish(self, decode: Callable[[bytes], Any]) -> dict[Any, Any]:
        """The state: str keys for text keys, bytes/str/decoded values by kind."""
        out: dict[Any, Any] = {}
        for (kb, kstr), (vb, vkind) in self._raw.items():
            key = kb.decode("utf-8") if kstr else kb
            if vkind == 0:
                out[key] = vb
            elif vkind == _VALUE_STR:
                out[key] = vb.decode("utf-8")
            else:
                out[key] = decode(vb)
        self._raw = {}
        return out


def make_kv_replayer() -> Any:
    """The C replayer when the native module is available, else PyKVReplayer."""
    try:
        from . import native
    except ImportError:
        return PyKVReplayer()
    if native.AVAILABLE:
        return native.KVReplayer()
    return PyKVReplayer()
