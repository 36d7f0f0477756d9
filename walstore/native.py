"""The C replayer (`walstore._walstore_native`, built by `_native/_ffi_build.py`).

Guarantees: `scan_records` returns the same ScanResult as
`walstore.reader.scan_records` (the `detail` wording included) on any input;
`KVReplayer` builds the same dict, in the same order, and the same snapshot
payloads, byte for byte, as `walstore.kvreplay.PyKVReplayer`; `crc32c` equals the `crc32c` package.
`AVAILABLE` is true when the module is built and `WALSTORE_PURE` is not "1";
the functions here work whenever the module is built (`BUILT`).
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
from collections.abc import Callable, Generator, Iterator
from typing import Any

from . import format as fmt
from . import reader
from .kvreplay import (
    KV_EFAILED,
    SNAPSHOT_CHUNK_BYTES,
    Buffer,
    check_chunk_bytes,
    decoded,
    kv_error,
)
from .reader import ScanResult

try:
    from ._walstore_native import ffi as _ffi
    from ._walstore_native import lib as _lib
except ImportError:  # no compiler at install time: the pure-Python replayer is used
    _ffi = None
    _lib = None

BUILT: bool = _lib is not None
"""The compiled module imported."""
AVAILABLE: bool = BUILT and os.environ.get("WALSTORE_PURE") != "1"
"""The C replayer is in use: built, and not turned off by WALSTORE_PURE=1."""

_U64 = 1 << 64
_U32 = 1 << 32
_RUN = 5  # WS_KV_RUN_FIELDS: blob offset, count, key length, value length, op flags
_ITER_UNPACK_MIN = 4  # runs at least this long are split by struct.iter_unpack
_DICT_IN_C = sys.implementation.name == "cpython"  # ws_kv_build_dict takes id() as an address
_DICT_CHUNK = 1 << 16  # keys per ws_kv_build_dict call: the GIL is free between calls
PREFAULT_OBJECTS = True  # finish populates its new objects' pages ahead where it can (docs/NATIVE.md)
PREFETCH_TABLE = True  # finish reads the dict's table ahead of its inserts where it can (docs/NATIVE.md)
_ITEMS = 256  # keys per ws_kv_items call in the Python loop


def backend() -> str:
    """Which replayer this process uses: "c" or "python"."""
    return "c" if AVAILABLE else "python"


def _require() -> Any:
    if _lib is None:
        raise RuntimeError("walstore's C replayer is not built (no C compiler at install time?)")
    return _lib


def crc32c(data: Buffer, value: int = 0) -> int:
    """CRC32C of `data` continuing from `value`, with the CPU's CRC instructions when it has them."""
    lib = _require()
    with _ffi.from_buffer(data) as cbuf:
        return int(lib.ws_crc32c(value & 0xFFFFFFFF, cbuf, len(cbuf)))


def crc32c_table(data: Buffer, value: int = 0) -> int:
    """CRC32C by the portable table path, whatever the CPU (for tests)."""
    lib = _require()
    with _ffi.from_buffer(data) as cbuf:
        return int(lib.ws_crc32c_table(value & 0xFFFFFFFF, cbuf, len(cbuf)))


def touch_pages(buf: Buffer) -> None:
    """Make every page of a writable buffer exist (a zero written into each 4 KiB), in C
    without the GIL, so that a later fill does not stop at a page fault per 4 KiB."""
    lib = _require()
    with _ffi.from_buffer(buf, require_writable=True) as cbuf:
        lib.ws_snapshot_touch(cbuf, len(cbuf))


@contextlib.contextmanager
def yielding() -> Iterator[None]:
    """Yield points on for the calling thread while the block runs (_native/yieldpoint.h):
    its C loops (scan, replay, snapshot framing, page making) give a waiting thread the
    core after every 100 us of work. For a compaction's threads, so that a committer
    whose fdatasync returned does not wait for a core. A no-op without the C module."""
    if _lib is None:
        yield
        return
    was = _lib.ws_set_yielding(1)
    try:
        yield
    finally:
        _lib.ws_set_yielding(was)


def yields() -> int:
    """sched_yield calls made by the calling thread's yield points so far (0 without C)."""
    return 0 if _lib is None else int(_lib.ws_yields())


def crc32c_impl() -> str:
    """The CRC32C implementation in use: "sse4.2", "armv8-crc" or "table"."""
    return str(_ffi.string(_require().ws_crc32c_impl()).decode())


def _is_bytes_buffer(mv: memoryview) -> bool:
    return mv.itemsize == 1 and mv.ndim == 1 and mv.c_contiguous


def scan_records(buf: Buffer, start: int, first_seq: int, type_mask: int = reader.SEGMENT_TYPES) -> ScanResult:
    """`reader.scan_records` (without the callback) in C: the same result on any input.

    Arguments outside what C represents (negative or past-the-end `start`,
    `first_seq` outside u64, `type_mask` outside u32, a buffer that is not
    flat bytes) are handed to the Python reference, so the result is still equal.
    """
    lib = _require()
    mv = memoryview(buf)
    size = mv.nbytes
    if not (_is_bytes_buffer(mv) and 0 <= start <= size and 0 <= first_seq < _U64 and 0 <= type_mask < _U32):
        return reader.scan_records(mv, start, first_seq, type_mask)
    out = _ffi.new("ws_scan_result *")
    with _ffi.from_buffer("uint8_t[]", mv) as cbuf:
        lib.ws_scan_records(cbuf, size, start, first_seq, type_mask, out)
    last_seq = out.last_commit if out.have_commit else first_seq - 1
    damage = None
    detail = ""
    if out.damage:
        damage = _ffi.string(lib.ws_damage_name(out.damage)).decode()
        detail = _detail(out.detail, out.detail_a, out.detail_b, last_seq, first_seq)
    return ScanResult(
        end=out.end,
        last_seq=last_seq,
        max_durable=out.max_durable,
        records=out.records,
        closed=bool(out.closed),
        damage=damage,
        detail=detail,
        resync_max_durable=out.resync_max_durable,
        resync_records=out.resync_records,
        data_end=out.data_end,
    )


def _detail(code: int, a: int, b: int, last_seq: int, first_seq: int) -> str:
    """reader.scan_records' wording of a damage detail, from the C scanner's code."""
    lib = _lib
    if code == lib.WS_DETAIL_COMMIT_SEQ:
        return f"sequence number {a}, expected {last_seq + 1}"
    if code == lib.WS_DETAIL_COMMIT_WATERMARK:
        return f"watermark {a} not below {b}"
    if code == lib.WS_DETAIL_CLOSE_SEQ:
        return f"close record carries {a}, expected {last_seq}"
    if code == lib.WS_DETAIL_CLOSE_WATERMARK:
        return f"close watermark {a} != {b}"
    if code == lib.WS_DETAIL_SNAPSHOT_SEQ:
        return f"snapshot record carries {a}/{b}, expected {first_seq}"
    if code == lib.WS_DETAIL_OPS_CUT_SHORT:
        return "operation header cut short"
    if code == lib.WS_DETAIL_OPS_BAD_OP:
        return f"bad operation at payload offset {a}"
    if code == lib.WS_DETAIL_OPS_NOT_PUT:
        return f"a snapshot operation that is not a put at payload offset {a}"
    if code == lib.WS_DETAIL_OPS_BAD_FLAGS:
        return f"bad operation flags at payload offset {a}"
    if code == lib.WS_DETAIL_OPS_LENGTHS:
        return f"operation lengths run past the payload at offset {a}"
    if code == lib.WS_DETAIL_SNAPSHOT_END_SIZE:
        return "snapshot end record of the wrong size"
    return ""


class KVReplayer:
    """Last-writer-wins KV replay in C; the same contract as `kvreplay.PyKVReplayer`.

    The C table points into the buffers given to `apply_range`: they stay
    exported (an mmap cannot be closed, a bytearray not resized) until
    `finish` returns or raises, `apply_range` raises, or the generator of
    `snapshot_payloads` ends or is closed.
    """

    def __init__(self) -> None:
        _require()
        self._kv: Any = _new_table()
        self._buffers: list[Any] = []
        self._failed = False

    def apply_range(self, buf: Buffer, start: int, end: int) -> None:
        """Apply the records in [start, end) of an already-scanned buffer; raise ReplayError on misuse."""
        if self._failed:
            raise kv_error(KV_EFAILED, 0)
        mv = memoryview(buf)
        if not _is_bytes_buffer(mv):
            mv = mv.cast("B")
        size = mv.nbytes
        if not (0 <= start <= end <= size):
            self._fail()
            raise kv_error(_lib.WS_KV_ERANGE, start, f"range [{start}, {end}) of a {size}-byte buffer")
        cbuf = _ffi.from_buffer("uint8_t[]", mv)
        self._buffers.append(cbuf)
        err = _ffi.new("uint64_t *")
        rc = _lib.ws_kv_apply_range(self._kv, cbuf, size, start, end, err)
        if rc:
            self._fail()
            raise kv_error(rc, err[0], "")

    def __len__(self) -> int:
        return int(_lib.ws_kv_len(self._kv))

    def finish(self, decode: Callable[[bytes], Any]) -> dict[Any, Any]:
        """The state as a dict (str keys for text keys; bytes, str or decode(bytes) values), then reset."""
        if self._failed:
            raise kv_error(KV_EFAILED, 0)
        try:
            return self._build(decode)
        finally:
            self._release()
            _ffi.release(self._kv)
            self._kv = _new_table()

    def snapshot_payloads(self, chunk_bytes: int = SNAPSHOT_CHUNK_BYTES) -> Generator[bytes, None, None]:
        """The state as SNAPSHOT_DATA payloads, byte for byte as `PyKVReplayer.snapshot_payloads`.

        The table and the buffers it points into move to the generator, and the
        replayer is finished (empty) at once. Each payload is filled by one C call
        that copies the operations straight from the buffers, without the GIL;
        Python then copies it once into the bytes yielded. The buffers stay
        exported until the generator ends or is closed: close it before closing
        an mmap under it.
        """
        if self._failed:
            raise kv_error(KV_EFAILED, 0)
        chunk = check_chunk_bytes(chunk_bytes)
        kv, buffers = self._kv, self._buffers
        self._kv, self._buffers = _new_table(), []
        return _c_snapshot_payloads(kv, buffers, chunk)

    def snapshot_frames(self, seq: int, chunk_bytes: int = SNAPSHOT_CHUNK_BYTES) -> SnapshotFrames:
        """The payloads of `snapshot_payloads`, as whole SNAPSHOT_DATA records (seq = durable =
        `seq`) framed in C into reused blocks (walstore.snapshot.write_snapshot's fast path).

        As `snapshot_payloads`, the table and its buffers move to the result and the
        replayer is finished at once; close the result to release them.
        """
        if self._failed:
            raise kv_error(KV_EFAILED, 0)
        chunk = check_chunk_bytes(chunk_bytes)
        if not 0 <= seq < _U64:
            raise ValueError(f"seq must fit in 64 bits, not {seq!r}")
        kv, buffers = self._kv, self._buffers
        self._kv, self._buffers = _new_table(), []
        return SnapshotFrames(kv, buffers, seq, chunk)

    def _build(self, decode: Callable[[bytes], Any]) -> dict[Any, Any]:
        """The dict made in C (CPython only; elsewhere `_build_blob`), codec values decoded here.

        C makes the keys and the bytes and str values and inserts them in dict
        order; a codec value goes in raw and its key on a list, decoded after.
        Where C fails (out of memory, bad UTF-8) the listed codec values, all of
        keys before that one, are decoded first, then Python does the rest with
        the reference's code. So decode is called once per codec value, in dict
        order, and the same exception is raised as by PyKVReplayer.
        """
        if not _DICT_IN_C:
            return self._build_blob(decode)
        out: dict[Any, Any] = {}
        codec_keys: list[Any] = []
        cursor = _ffi.new("uint64_t *")
        build = _lib.ws_kv_build_dict
        live = int(_lib.ws_kv_len(self._kv))
        while True:
            limit = min(_DICT_CHUNK, max(1, live - len(out)))  # every key is new to `out`
            flags = (PREFAULT_OBJECTS and _lib.WS_KV_DICT_PREFAULT) | (PREFETCH_TABLE and _lib.WS_KV_DICT_PREFETCH)
            rc = build(self._kv, id(out), id(codec_keys), cursor, limit, flags)
            if rc != _lib.WS_KV_DICT_MORE:
                break
        if rc == _lib.WS_KV_DICT_UNSUPPORTED:  # pragma: no cover - checked by _DICT_IN_C
            return self._build_blob(decode)
        for key in codec_keys:
            out[key] = decode(out[key])
        if rc == _lib.WS_KV_DICT_FAILED:
            self._build_from(int(cursor[0]), out, decode)
        return out

    def _build_from(self, entry: int, out: dict[Any, Any], decode: Callable[[bytes], Any]) -> None:
        """Insert the keys from entry number `entry` on into `out`, in Python (PyKVReplayer.finish's code)."""
        cursor = _ffi.new("uint64_t *", entry)
        items = _ffi.new("ws_kv_item[]", _ITEMS)
        while n := _lib.ws_kv_items(self._kv, cursor, items, _ITEMS):
            for it in items[0:n]:
                kb = _ffi.buffer(it.key, it.klen)[:]
                vb = _ffi.buffer(it.key + it.klen, it.vlen)[:]
                key, value = decoded(kb, it.flags & fmt.KEY_STR, vb, it.flags & fmt.VALUE_KIND_MASK, decode)
                out[key] = value

    def _build_blob(self, decode: Callable[[bytes], Any]) -> dict[Any, Any]:
        """The dict made in Python from one exported copy of the keys and values."""
        sizes = _ffi.new("uint64_t[2]")
        _lib.ws_kv_export_sizes(self._kv, sizes, sizes + 1)
        blob_size, n_runs = int(sizes[0]), int(sizes[1])
        blob = _new_raw("uint8_t[]", max(blob_size, 1))
        runs = _new_raw("uint64_t[]", max(n_runs * _RUN, 1))
        if _lib.ws_kv_export(self._kv, blob, blob_size, runs, n_runs) != n_runs:  # pragma: no cover
            raise RuntimeError("ws_kv_export: inconsistent sizes")
        self._release()  # every key and value is in `blob` now
        data = memoryview(_ffi.buffer(blob, blob_size))
        out: dict[Any, Any] = {}
        table = _ffi.unpack(runs, n_runs * _RUN)
        for i in range(0, n_runs * _RUN, _RUN):
            at, count, klen, vlen, flags = table[i : i + _RUN]
            width = klen + vlen
            if count >= _ITER_UNPACK_MIN and width:
                pairs: Any = struct.iter_unpack(f"{klen}s{vlen}s", data[at : at + count * width])
            else:
                pairs = (
                    [
                        (bytes(data[o : o + klen]), bytes(data[o + klen : o + width]))
                        for o in range(at, at + count * width, width)
                    ]
                    if width
                    else [(b"", b"")] * count
                )
            if flags == 0:
                if out:
                    out.update(pairs)
                else:
                    out = dict(pairs)  # a little faster than update, for the first run
                continue
            key_str = flags & fmt.KEY_STR
            kind = flags & fmt.VALUE_KIND_MASK
            for kb, vb in pairs:
                key, value = decoded(kb, key_str, vb, kind, decode)
                out[key] = value
        return out

    def _fail(self) -> None:
        self._failed = True
        self._release()

    def _release(self) -> None:
        """Stop pointing into the callers' buffers (so an mmap can be closed)."""
        for cbuf in self._buffers:
            _ffi.release(cbuf)
        self._buffers = []


def _c_snapshot_payloads(kv: Any, buffers: list[Any], chunk_bytes: int) -> Generator[bytes, None, None]:
    """Run ws_kv_snapshot_chunk over a detached table; release it and its buffers at the end."""
    try:
        sizes = _ffi.new("uint64_t[2]")
        _lib.ws_kv_export_sizes(kv, sizes, sizes + 1)
        total = int(sizes[0]) + fmt.OP_HEADER_SIZE * int(_lib.ws_kv_len(kv))
        size = max(1, min(chunk_bytes, total))
        out = _new_raw("uint8_t[]", size)
        cursor = _ffi.new("uint64_t *")
        need = _ffi.new("uint64_t *")
        chunk = _lib.ws_kv_snapshot_chunk
        while True:
            n = chunk(kv, cursor, chunk_bytes, out, size, need)
            if n > 0:
                yield _ffi.buffer(out, n)[:]
            elif n == 0:
                return
            else:  # one op longer than chunk_bytes: a payload of its own
                big = _new_raw("uint8_t[]", int(need[0]))
                n = chunk(kv, cursor, chunk_bytes, big, int(need[0]), need)
                if n <= 0:  # pragma: no cover - the C contract
                    raise RuntimeError("ws_kv_snapshot_chunk: inconsistent sizes")
                yield _ffi.buffer(big, n)[:]
                del big
    finally:
        for cbuf in buffers:
            _ffi.release(cbuf)
        _ffi.release(kv)


class SnapshotFrames:
    """Whole SNAPSHOT_DATA records of a detached C table, appended to a caller's buffer by
    `ws_snapshot_frames` (copy, framing and CRC32C in one C call, without the GIL)."""

    def __init__(self, kv: Any, buffers: list[Any], seq: int, chunk_bytes: int) -> None:
        self._kv: Any = kv
        self._buffers = buffers
        self._seq = seq
        self.chunk_bytes = chunk_bytes
        self.record_room = fmt.FRAME_HEADER_SIZE + fmt.padded(chunk_bytes)
        """Room a record of a full chunk takes: fill_into starts a record only with this much left."""
        self._cursor = _ffi.new("uint64_t *")
        self._records = _ffi.new("uint64_t *")
        self._need = _ffi.new("uint64_t *")

    @property
    def records(self) -> int:
        """SNAPSHOT_DATA records filled so far."""
        return int(self._records[0])

    def bytes_left(self, limit: int) -> int:
        """About the bytes the records still to come take (operations, plus a frame header and
        padding per full chunk), or a number over `limit` when the operations alone pass it."""
        if self._kv is None:
            raise ValueError("snapshot frames closed")
        ops = int(_lib.ws_kv_ops_bytes_from(self._kv, self._cursor[0], max(0, limit)))
        if ops > limit:
            return ops
        return ops + (ops // self.chunk_bytes + 1) * (fmt.FRAME_HEADER_SIZE + fmt.ALIGN)

    def fill_into(self, buf: Any, start: int) -> int:
        """Append whole records to the writable buffer `buf` from offset `start` while at least
        `record_room` bytes remain; return the bytes added (0 once every key is out). When the
        next operation alone is longer than a chunk and its record does not fit, nothing is
        added and minus that record's size is returned (call again with that much room)."""
        if self._kv is None:
            raise ValueError("snapshot frames closed")
        with _ffi.from_buffer("uint8_t[]", buf, require_writable=True) as cbuf:
            size = len(cbuf)
            if not 0 <= start <= size:
                raise ValueError(f"start {start} outside a {size}-byte buffer")
            n = _lib.ws_snapshot_frames(
                self._kv,
                self._cursor,
                self.chunk_bytes,
                self._seq,
                cbuf + start,
                size - start,
                self._records,
                self._need,
            )
        if n == -1:
            return -int(self._need[0])
        if n < 0:
            raise ValueError(f"a buffer of {size - start} bytes from {start} is below one record's room")
        return int(n)

    def close(self) -> None:
        """Release the table and the buffers it points into (idempotent)."""
        if self._kv is None:
            return
        for cbuf in self._buffers:
            _ffi.release(cbuf)
        self._buffers = []
        _ffi.release(self._kv)
        self._kv = None


def _new_table() -> Any:
    """A new C table with a random hash seed, freed when garbage."""
    kv = _lib.ws_kv_new(int.from_bytes(os.urandom(8), "little"))
    if kv == _ffi.NULL:
        raise MemoryError("cannot allocate the replay table")
    return _ffi.gc(kv, _lib.ws_kv_free)


def _new_raw(cdecl: str, n: int) -> Any:
    """An uninitialised C array (ffi.new would zero it first)."""
    return _new_uninit(cdecl, n)


_new_uninit: Any = _ffi.new_allocator(should_clear_after_alloc=False) if _ffi is not None else None
