"""Base snapshots: the whole state as of one sequence number, written atomically.

Guarantees:

* A snapshot becomes part of the store only whole: it is written to a
  temporary file, fsynced, renamed into place, and the directory is fsynced.
  Only after that are the segments it covers removed.
* A snapshot is valid only if every record's CRC checks and its final
  SNAPSHOT_END record counts match; anything else is invalid as a whole.
* A failed write (ENOSPC, EIO) removes the temporary file and changes
  nothing else.

How it is written (none of this changes what is durable when): records are
framed into page-aligned blocks (in C, without the GIL, for the C replayer;
a second thread fills the next block while one is written), written with
O_DIRECT where the filesystem takes it, in pieces that shrink on a slow disk,
with a few write-behind fdatasyncs; the last block is zero-padded and the
file cut back with ftruncate before the fsync.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol, TypeVar

from . import format as fmt
from . import reader, replay
from .errors import CorruptionError, DiskFullError, SnapshotError
from .fileapi import OSFileAPI

if TYPE_CHECKING:
    from .writer import BurstWriter

CHUNK_BYTES = 1 << 20
"""Target payload size of one SNAPSHOT_DATA record."""

_OPH_PACK = fmt.OP_HEADER.pack
_VSTR = fmt.VALUE_STR << fmt.VALUE_KIND_SHIFT
_VCODEC = fmt.VALUE_CODEC << fmt.VALUE_KIND_SHIFT


class CodecBytes(bytes):
    """A value's codec-encoded bytes, kept as they were logged (not decoded)."""


def list_snapshots(directory: str) -> list[tuple[int, str]]:
    """(seq, path) of every snapshot file, newest first."""
    found = []
    for name in os.listdir(directory):
        m = fmt.SNAPSHOT_NAME.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(directory, name)))
    found.sort(reverse=True)
    return found


def kv_payloads(items: Iterable[tuple[Any, Any]], chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """PUT operations for (key, value) pairs, grouped into payloads of about `chunk_bytes`.

    Values are bytes (stored as bytes), str, or CodecBytes (stored as codec-encoded).
    """
    parts: list[bytes] = []
    size = 0
    for key, value in items:
        if type(key) is str:
            kb, kf = key.encode("utf-8"), fmt.KEY_STR
        else:
            kb, kf = key, 0
        if type(value) is str:
            vb, vf = value.encode("utf-8"), _VSTR
        elif isinstance(value, CodecBytes):
            vb, vf = value, _VCODEC
        else:
            vb, vf = value, 0
        op = _OPH_PACK(fmt.OP_PUT, kf | vf, 0, len(kb), len(vb)) + kb + vb
        parts.append(op)
        size += len(op)
        if size >= chunk_bytes:
            yield b"".join(parts)
            parts = []
            size = 0
    if parts:
        yield b"".join(parts)


@dataclass
class SnapshotInfo:
    """A snapshot written or loaded."""

    path: str
    seq: int
    size: int
    records: int
    ops: int
    started: float = 0.0
    """time.perf_counter() when write_snapshot began (the state was captured by then)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per step of write_snapshot: "fill" (copying, framing and CRCs, summed over the
    blocks), "write" (pwrite calls), "sync" (write-behind fdatasyncs), "fsync", "rename",
    "dir_fsync", and "total" (from the call, the temp file's creation included, to the
    directory fsync); "direct" is 1.0 when the writes used O_DIRECT, else 0.0; "writes" counts
    the pwrite calls of the records (not seconds)."""
    quarantined: list[str] = field(default_factory=list)
    """Newer snapshots the compaction found damaged (failing their checks) and moved to
    quarantine/, with a report, instead of leaving them to be removed as covered later."""


class FrameSource(Protocol):
    """Whole snapshot records appended to a buffer: `walstore.native.SnapshotFrames`, or `PayloadFrames`."""

    @property
    def records(self) -> int: ...

    def fill_into(self, buf: Any, start: int) -> int: ...

    def close(self) -> None: ...


class PayloadFrames:
    """SNAPSHOT_DATA payloads framed in Python (the FrameSource of an iterable of payloads)."""

    record_room = 0

    def __init__(self, payloads: Iterable[bytes], seq: int, count_ops: bool) -> None:
        self._it = iter(payloads)
        self._seq = seq
        self._count = count_ops
        self._pending: Optional[bytes] = None
        self.records = 0
        self.ops = 0

    def fill_into(self, buf: Any, start: int) -> int:
        """Append whole records from `start` while they fit; bytes added, 0 at the end, or minus
        the size of a record that does not fit in an empty buffer."""
        with memoryview(buf) as mv:
            at, size = start, len(mv)
            while True:
                frame = self._pending
                if frame is None:
                    payload = next(self._it, None)
                    if payload is None:
                        break
                    if self._count:
                        self.ops += _count_ops(payload)
                    frame = fmt.encode_frame(fmt.REC_SNAPSHOT_DATA, self._seq, self._seq, payload)
                    self.records += 1
                if len(frame) > size - at:
                    self._pending = frame
                    return at - start if at > start else -len(frame)
                mv[at : at + len(frame)] = frame
                at += len(frame)
                self._pending = None
            return at - start

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def kv_source(replayer: Any, seq: int, chunk_bytes: Optional[int] = None) -> Any:
    """What a key-value compaction hands to write_snapshot: the replayer's records framed in
    C (`snapshot_frames`) when it has them, else its payloads (of CHUNK_BYTES by default).
    Close it when done."""
    chunk = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    frames = getattr(replayer, "snapshot_frames", None)
    if frames is not None:
        return frames(seq, chunk)
    return replayer.snapshot_payloads(chunk)


ALIGN = 4096
"""O_DIRECT writes: buffer address, length and file offset are multiples of this."""

BLOCK_BYTES = 1 << 20
"""About this many bytes per write (at least one record of a full chunk: the buffer is
written whenever it cannot take another). Smaller blocks leave less of
the snapshot queued at the disk ahead of a concurrent commit; 1 MiB writes with O_DIRECT
ran as fast as 4 MiB ones on the development machine."""

DIRECT = True
"""Write the snapshot with O_DIRECT where the filesystem takes it (falls back to buffered
writes). Each write then waits for the disk, so at most one block of the snapshot is ever
queued ahead of a concurrent commit's fdatasync; no dirty pages pile up for the final
fsync; and no page-cache memory is taken (or first touched) for 128 MB of snapshot."""

OVERLAP = True
"""Fill the next block in a second thread while this one is written (double buffering)."""

WRITE_TARGET_S = 0.002
WRITE_MIN = 64 << 10
"""O_DIRECT writes are cut into pieces that each take about WRITE_TARGET_S (sized at the
rate the last one ran, within WRITE_MIN and BLOCK_BYTES): a commit's fdatasync never waits
behind more than about that much of the snapshot, on a slow disk as on a fast one."""

BURST_BYTES = 24 << 20
BURST_TARGET_S = 0.025
"""With a burst writer (the C log writer's, which paces each write between commits'
syncs), the snapshot goes in bursts: a write and fdatasync of up to BURST_BYTES, sized to
take about BURST_TARGET_S at the rate the last one ran (see `_Out._adapt`). One commit
(sometimes two or three) waits behind each burst, by no more than about that; the commits
between bursts do not wait at all. Many small pieces instead leave most commits waiting
behind one (the p99 then grows); one write of the whole snapshot would hold up the commit
behind it for the whole of it."""

TAIL_MERGE = 4
"""The last block may be up to 1 + 1/TAIL_MERGE blocks (see `_Blocks.fill`): traced, a
1,000,000-key snapshot (128 MB) ended with 24 MiB and then 2 MiB, two bursts each holding
up a commit, where one of 26 MiB does."""

SYNC_FIRST = 16 << 20
SYNC_MIN = 4 << 20
SYNC_MAX = 64 << 20
SYNC_TARGET_S = 0.015
"""Write-behind fdatasync: the first after SYNC_FIRST bytes, then whenever the bytes since the
last one would take about SYNC_TARGET_S to sync at the rate the last one ran (within
SYNC_MIN..SYNC_MAX), so no single flush (and no commit's fdatasync queued behind it) waits
long, and the final fsync has little left to do."""


_direct_refused = False
"""Set when an O_DIRECT write failed with EINVAL (a device with a larger block size, say):
later snapshots in this process are written buffered."""


def write_snapshot(
    fs: OSFileAPI,
    directory: str,
    store_id: bytes,
    seq: int,
    payloads: Any,
    ops: Optional[int] = None,
    burst: Optional[BurstWriter] = None,
    prepared: Optional[PreparedBuffers] = None,
) -> SnapshotInfo:
    """Write `snap-<seq>.snap` atomically from SNAPSHOT_DATA payloads (an iterable of bytes)
    or from a FrameSource (whole records, e.g. `kv_source`'s).

    Order: temp file, every record (with write-behind fdatasyncs), fsync, rename,
    directory fsync. On any failure the temp file is removed and SnapshotError
    (DiskFullError for a full disk) is raised; the store is as it was. `ops`,
    when the caller knows it, saves counting the operations (required with a
    FrameSource). The source is closed when this returns or raises.
    With `burst` (the log writer's `burst_writer()`), every write is a burst written and
    fdatasynced by it between concurrent commits' syncs, instead of `fs.pwrite`;
    `prepared` buffers (the caller closes them) are used where their size fits.
    """
    started = time.perf_counter()
    source: Any
    if hasattr(payloads, "fill_into"):
        source = payloads
        if ops is None:
            source.close()
            raise ValueError("write_snapshot: pass ops with a frame source")
    else:
        source = PayloadFrames(payloads, seq, count_ops=ops is None)
    final = os.path.join(directory, fmt.snapshot_name(seq))
    tmp = final + fmt.TMP_SUFFIX
    t: dict[str, float] = {"fill": 0.0, "write": 0.0, "sync": 0.0, "writes": 0.0}
    out = _Out(fs, tmp, t, burst)
    try:
        try:
            header = fmt.FileHeader(fmt.KIND_SNAPSHOT, store_id, seq).encode()
            blocks = _Blocks(source, header, t, out.block, prepared)
            out.open()
            produced = _produce(blocks, OVERLAP)
            try:
                for slot, aligned, pending, last in produced:  # noqa: B007 - the last one is used below
                    if last:
                        break
                    out.write(blocks.bufs[slot], aligned)
            finally:
                produced.close()  # the fill thread has ended when this returns
            if ops is None:
                ops = source.ops if isinstance(source, PayloadFrames) else 0
            records = source.records
        finally:
            source.close()
        end = fmt.encode_frame(fmt.REC_SNAPSHOT_END, seq, seq, fmt.SNAPSHOT_END_PAYLOAD.pack(records, ops))
        buf = blocks.take(slot, pending + len(end) + ALIGN, keep=pending)
        buf[pending : pending + len(end)] = end
        pending += len(end)
        size_on_disk = out.finish(buf, pending)
        blocks.close()
        t0 = time.perf_counter()
        fs.fsync(out.fd)
        t1 = time.perf_counter()
        fs.close(out.fd)
        out.fd = -1
        fs.rename(tmp, final)
        t2 = time.perf_counter()
        fs.fsync_dir(directory)
        t3 = time.perf_counter()
        t.update(fsync=t1 - t0, rename=t2 - t1, dir_fsync=t3 - t2, total=t3 - started)
        t["direct"] = float(out.direct)
    except BaseException as exc:
        if out.fd >= 0:
            try:
                fs.close(out.fd)
            except OSError:
                pass
        try:
            fs.unlink(tmp)
        except OSError:
            pass
        if not isinstance(exc, OSError):
            raise
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(exc.errno, f"disk full writing snapshot {final}; nothing changed") from exc
        raise SnapshotError(f"writing snapshot {final} failed: {exc}; nothing changed") from exc
    return SnapshotInfo(final, seq, size_on_disk, records, ops, started, t)


def _new_buffer(size: int) -> mmap.mmap:
    """A page-aligned anonymous buffer, as O_DIRECT wants."""
    return mmap.mmap(-1, size)


def _buffer_size(block: int, room: int = 0) -> int:
    return _round_up(max(block, room) + 2 * ALIGN, ALIGN)


def idle_priority() -> bool:
    """Run the calling thread at idle CPU priority (Linux SCHED_IDLE) from now on; False
    where that is not available. For helper threads whose work can wait: with two cores,
    one such thread making pages while the compaction replays and the writer commits
    left the writer's thread waiting 2 to 4 ms for a core after an fdatasync, every
    8 ms or so; at idle priority it takes a core at once."""
    policy = getattr(os, "SCHED_IDLE", None)
    if policy is None or not hasattr(os, "sched_setscheduler"):
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))  # 0: the calling thread
    except OSError:
        return False
    return True


_T = TypeVar("_T")


def at_idle_priority(work: Callable[[], _T]) -> _T:
    """work() in a helper thread at idle CPU priority (`idle_priority`), yield points on;
    returns its result or raises its exception here. For a compaction's capture (the
    replay of the sealed log, in C without the GIL): the application's threads take a
    core before it, and its policy ends with the helper thread (an unprivileged thread
    cannot leave SCHED_IDLE)."""
    out: list[_T] = []
    failed: list[BaseException] = []

    def run() -> None:
        from . import native

        idle_priority()
        try:
            with native.yielding():
                out.append(work())
        except BaseException as exc:  # re-raised in the caller
            failed.append(exc)

    helper = threading.Thread(target=run, name="walstore-capture", daemon=True)
    helper.start()
    helper.join()
    if failed:
        raise failed[0]
    return out[0]


class PreparedBuffers:
    """The two write buffers of a burst-paced snapshot, made (their pages too, by the C
    module) in a background thread at idle CPU priority started before the state is
    captured, so that making their pages (60 MiB) is not on the snapshot's own time. `write_snapshot(prepared=...)`
    takes them; close() frees any left."""

    def __init__(self, count: int = 2) -> None:
        self.size = _buffer_size(BURST_BYTES + BURST_BYTES // TAIL_MERGE)  # _Blocks.capacity
        self._bufs: list[mmap.mmap] = []
        self._thread = threading.Thread(target=self._make, args=(count,), name="walstore-buffers", daemon=True)
        self._thread.start()

    def _make(self, count: int) -> None:
        from . import native

        idle_priority()
        with native.yielding():
            for _ in range(count):
                buf = _new_buffer(self.size)
                if native.BUILT:  # make its pages now (a fault per 4 KiB: ~1 ms per MiB on the dev VM)
                    native.touch_pages(buf)
                self._bufs.append(buf)

    def take(self, size: int) -> Optional[mmap.mmap]:
        """A prepared buffer of exactly `size` bytes, or None."""
        self._thread.join()
        return self._bufs.pop() if self._bufs and size == self.size else None

    def close(self) -> None:
        self._thread.join()
        for buf in self._bufs:
            buf.close()
        self._bufs.clear()


class _Blocks:
    """Page-aligned buffers filled with whole records from a source; the unaligned tail of
    each is carried to the front of the next, so every write but the last is aligned."""

    def __init__(
        self, source: Any, header: bytes, t: dict[str, float], block: int, prepared: Optional[PreparedBuffers]
    ) -> None:
        self.source = source
        self.t = t
        self.room = int(getattr(source, "record_room", 0))
        self.size = _buffer_size(block, self.room)  # what one buffer holds, the last one maybe more
        # What a buffer is made with: room for the last one to hold a tail (see fill). The pages
        # of prepared buffers are made beforehand; others' are made only where written.
        self.capacity = _buffer_size(block + block // TAIL_MERGE, self.room)
        self.bufs: list[mmap.mmap] = []
        self.carry = header
        self.prepared = prepared

    def take(self, slot: int, need: int, keep: int = 0) -> mmap.mmap:
        """Slot's buffer (made on first use), holding at least `need` bytes; a buffer made
        bigger keeps its first `keep` bytes."""
        while len(self.bufs) <= slot:
            made = self.prepared.take(self.capacity) if self.prepared is not None else None
            self.bufs.append(made if made is not None else _new_buffer(self.capacity))
        buf = self.bufs[slot]
        if len(buf) < need:
            bigger = mmap.mmap(-1, _round_up(need, ALIGN))
            bigger[:keep] = buf[:keep]
            buf.close()
            buf = self.bufs[slot] = bigger
        return buf

    def fill(self, slot: int) -> tuple[int, int, int, bool]:
        """Fill slot's buffer: (slot, bytes to write now, bytes in it, last). The last one
        holds everything left (no more records), to be written with the end record.

        A buffer is filled to `size`. When what is left is over that but within a quarter
        block more (a source that can tell, `bytes_left`), it is filled with all of it, up to
        `capacity`, and is the last: one write (a burst that holds up one commit) instead of
        a full one and a short one after it."""
        buf = self.take(slot, 0)
        pending = len(self.carry)
        buf[:pending] = self.carry
        extent = self.size
        bytes_left = getattr(self.source, "bytes_left", None)
        if bytes_left is not None:
            fits = extent - pending - max(self.room, ALIGN)  # fill_into stops short of room
            left = bytes_left(fits + self.size // TAIL_MERGE)
            if fits < left <= fits + self.size // TAIL_MERGE:
                extent = pending + left + self.room + 2 * ALIGN
        while True:
            if extent > len(buf):
                buf = self.take(slot, extent, keep=pending)
            t0 = time.perf_counter()
            n = self._fill_into(buf, pending, extent)
            self.t["fill"] += time.perf_counter() - t0
            if n >= 0:
                break
            extent = max(extent, pending - n + self.room + 2 * ALIGN)  # one record longer than a chunk
        if n == 0:
            self.carry = b""
            return slot, 0, pending, True
        pending += n
        if extent - pending >= max(self.room, ALIGN):
            # Room left: the source ran dry (or its next record is too big for the rest).
            # Ask once more; at the end, this buffer is the last, so its records go out with
            # the end record in one write, not two (each write is a burst that holds up a commit).
            more = self._fill_into(buf, pending, extent)
            if more == 0:
                self.carry = b""
                return slot, 0, pending, True
            pending += max(more, 0)  # negative: the next record does not fit here; it goes next
        aligned = pending // ALIGN * ALIGN
        self.carry = bytes(buf[aligned:pending])
        return slot, aligned, pending, False

    def _fill_into(self, buf: mmap.mmap, start: int, extent: int) -> int:
        """source.fill_into(buf[:extent], start)."""
        if extent >= len(buf):
            return int(self.source.fill_into(buf, start))
        with memoryview(buf) as whole, whole[:extent] as view:
            return int(self.source.fill_into(view, start))

    def close(self) -> None:
        for buf in self.bufs:
            try:
                buf.close()
            except BufferError:  # a file API kept a view of it: the collector frees it later
                pass
        self.bufs = []


def _produce(blocks: _Blocks, overlap: bool) -> Generator[tuple[int, int, int, bool], None, None]:
    """blocks.fill results in order; the caller writes each before asking for the next.

    With `overlap`, a second thread fills the other of two slots (in C, without the GIL)
    while the caller writes one: a slot is refilled only once the caller asked for the next
    block, i.e. finished writing it. The fill thread has ended when this generator is closed.
    """
    if not overlap:
        while True:
            item = blocks.fill(0)
            yield item
            if item[3]:
                return
    free: queue.SimpleQueue[Optional[int]] = queue.SimpleQueue()
    full: queue.SimpleQueue[Any] = queue.SimpleQueue()
    free.put(0)
    free.put(1)

    def run() -> None:
        from . import native

        try:
            with native.yielding():
                while True:
                    slot = free.get()
                    if slot is None:
                        return
                    item = blocks.fill(slot)
                    full.put(item)
                    if item[3]:
                        return
        except BaseException as exc:  # noqa: BLE001 - raised in the writing thread
            full.put(exc)

    thread = threading.Thread(target=run, name="walstore-snapshot-fill", daemon=True)
    thread.start()
    try:
        while True:
            got = full.get()
            if isinstance(got, BaseException):
                raise got
            yield got
            if got[3]:
                return
            free.put(got[0])
    finally:
        free.put(None)
        thread.join()


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


class _Out:
    """The temp file being written: aligned writes (O_DIRECT when it works), write-behind syncs."""

    def __init__(self, fs: OSFileAPI, path: str, t: dict[str, float], burst: Optional[BurstWriter] = None) -> None:
        self.fs = fs
        self.path = path
        self.t = t
        self.burst = burst
        self.fd = -1
        self.direct = False
        self.offset = 0  # file offset of the next write
        self.synced = 0
        self.sync_at = SYNC_FIRST
        # Bytes per buffer, the most per write, and the time one write should take at most.
        self.block, self.target = (BURST_BYTES, BURST_TARGET_S) if burst else (BLOCK_BYTES, WRITE_TARGET_S)
        self.piece = max(self.block, WRITE_MIN) // ALIGN * ALIGN

    def open(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        direct = getattr(os, "O_DIRECT", 0) if DIRECT and not _direct_refused else 0
        if direct:
            try:
                self.fd = self.fs.open(self.path, flags | direct, 0o644)
                self.direct = True
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # the filesystem does not take O_DIRECT: buffered
                    raise
        self.fd = self.fs.open(self.path, flags, 0o644)

    def _adapt(self, size: int, seconds: float) -> None:
        """O_DIRECT or bursts: size the next write to take about the target at the rate this
        full-size one ran (at most twice its size; within WRITE_MIN and the block size).

        Proportional, not halving: a 24 MiB burst that took 39 ms instead of 25 used to
        halve the bursts to 12 MiB for the rest of the snapshot (12 MiB took 13 to 24 ms,
        never the 8 ms that doubled them back), so twice as many bursts, each holding up
        a commit."""
        if not (self.direct or self.burst) or size < self.piece:
            return
        scale = 2.0 if seconds <= self.target / 2 else self.target / seconds
        top = max(self.block, WRITE_MIN)
        self.piece = max(WRITE_MIN, min(top, int(self.piece * scale))) // ALIGN * ALIGN

    def _pwrite(self, data: memoryview) -> float:
        """Write data at the end of the file (a burst, written and fdatasynced, if paced);
        the seconds the write took, not counting a burst's wait for commits."""
        global _direct_refused
        t = time.perf_counter()
        try:
            if self.burst is not None:
                took = self.burst(self.fd, data, self.offset)
                self.synced = self.offset + len(data)
                return took
            self.fs.pwrite(self.fd, data, self.offset)
        except OSError as exc:
            if not (self.direct and exc.errno == errno.EINVAL):
                raise
            _direct_refused = True  # this process writes its next snapshots buffered
            if self.offset != 0:  # records already handed out: this snapshot fails, the next one works
                raise
            # O_DIRECT accepted at open but not for writes: start over, buffered.
            self.fs.close(self.fd)
            self.fd = -1
            self.direct = False
            self.fd = self.fs.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fs.pwrite(self.fd, data, self.offset)
        return time.perf_counter() - t

    def write(self, buf: mmap.mmap, n: int) -> None:
        """Write buf[:n] (a multiple of ALIGN) at the end of the file; sync if due."""
        if n == 0:
            return
        t0 = time.perf_counter()
        with memoryview(buf) as mv:
            done = 0
            while done < n:
                piece = min(self.piece, n - done)
                self._adapt(piece, self._pwrite(mv[done : done + piece]))
                self.t["writes"] += 1
                done += piece
                self.offset += piece
        t1 = time.perf_counter()
        self.t["write"] += t1 - t0
        if self.offset - self.synced >= self.sync_at:
            self.fs.fdatasync(self.fd)
            dt = time.perf_counter() - t1
            rate = (self.offset - self.synced) / max(dt, 1e-6)
            self.sync_at = int(min(SYNC_MAX, max(SYNC_MIN, rate * SYNC_TARGET_S)))
            self.synced = self.offset
            self.t["sync"] += dt

    def finish(self, buf: mmap.mmap, pending: int) -> int:
        """Write the rest of buf[:pending] (padded with zeros to a block and cut back with
        ftruncate under O_DIRECT); return the file size."""
        size = self.offset + pending
        t0 = time.perf_counter()
        if pending:
            n = _round_up(pending, ALIGN) if self.direct else pending
            buf[pending:n] = bytes(n - pending)
            with memoryview(buf) as mv:
                self._pwrite(mv[:n])
            if n != pending:
                self.fs.ftruncate(self.fd, size)
        self.t["write"] += time.perf_counter() - t0
        return size


def _count_ops(payload: bytes) -> int:
    n = pos = 0
    end = len(payload)
    unpack = fmt.OP_HEADER.unpack_from
    while pos < end:
        _op, _f, _r, klen, vlen = unpack(payload, pos)
        pos += fmt.OP_HEADER_SIZE + klen + vlen
        n += 1
    return n


def check_snapshot(path: str, data: reader.Buffer, store_id: bytes) -> tuple[int, reader.ScanResult]:
    """Validate a whole snapshot; return (seq, scan). Raises CorruptionError naming what is wrong."""
    header = replay.check_header(path, data, fmt.KIND_SNAPSHOT, store_id)
    m = fmt.SNAPSHOT_NAME.match(os.path.basename(path))
    if m and int(m.group(1)) != header.first_seq:
        raise CorruptionError(path, 0, None, "bad-header", f"header says sequence number {header.first_seq}")
    scan = replay.scan_records(data, fmt.FILE_HEADER_SIZE, header.first_seq, reader.SNAPSHOT_TYPES)
    if scan.damage is not None:
        raise CorruptionError(path, scan.end, header.first_seq, scan.damage, scan.detail or "snapshot damaged")
    end_size = fmt.frame_size(fmt.SNAPSHOT_END_PAYLOAD.size)
    end_off = scan.end - end_size
    mv = memoryview(data)
    if scan.records == 0 or end_off < fmt.FILE_HEADER_SIZE or mv[end_off + 8] != fmt.REC_SNAPSHOT_END:
        raise CorruptionError(path, scan.end, header.first_seq, "bad-payload", "snapshot has no end record")
    records, _ops = fmt.SNAPSHOT_END_PAYLOAD.unpack_from(mv, end_off + fmt.FRAME_HEADER_SIZE)
    if records != scan.records - 1:
        raise CorruptionError(
            path,
            end_off,
            header.first_seq,
            "bad-payload",
            f"end record counts {records} data records, found {scan.records - 1}",
        )
    return header.first_seq, scan


def newest_valid_snapshot(
    directory: str, store_id: bytes
) -> tuple[Optional[tuple[int, str, reader.Buffer, reader.ScanResult]], list[tuple[str, CorruptionError]]]:
    """The newest snapshot that checks out, mapped, and the newer ones that did not (with why)."""
    rejected: list[tuple[str, CorruptionError]] = []
    for seq, path in list_snapshots(directory):
        data = replay.read_file(path)
        try:
            _seq, scan = check_snapshot(path, data, store_id)
        except CorruptionError as exc:
            rejected.append((path, exc))
            continue
        return (seq, path, data, scan), rejected
    return None, rejected


def covered_files(directory: str, seq: int, keep: int = 1) -> list[str]:
    """The paths `remove_covered` removes: snapshots older than the newest `keep` at or
    below `seq`, and the segments wholly covered by the oldest snapshot kept."""
    snaps = [(s, p) for s, p in list_snapshots(directory) if s <= seq]
    if not snaps:
        return []
    kept = snaps[: max(1, keep)]
    oldest_kept = kept[-1][0]
    doomed = [path for _seq, path in snaps[len(kept) :]]
    segs = replay.list_segments(directory)
    doomed += [path for (_first, path), (next_first, _n) in zip(segs, segs[1:]) if next_first <= oldest_kept + 1]
    return doomed


FREE_STEP_MAX_S = 0.03
"""With a turn (`remove_covered`), a covered file is freed in steps that each take about
this long at the rate the last step freed blocks at: freeing a file's blocks (and, on a
filesystem mounted with `discard`, trimming them) takes time in proportion to its size
(on the dev VM 64 MiB took 24 to 48 ms, 16 MiB 5 to 7 ms), and one commit waits for each
step."""
FREE_STEP_FIRST = 32 << 20
"""The step before any rate is known (in this process). Two bench runs in a slow spell
freed a 64 MiB segment in one turn before this was lowered, and held a commit 55.5 and
87.8 ms."""
FREE_STEP_MIN = 4 << 20
FREE_SUFFIX = ".free" + fmt.TMP_SUFFIX
"""A covered file freed in steps is first renamed to its name + this: a `.tmp` file, which
nothing reads and `open()` removes, so that a crash never leaves a cut file under a
segment's or snapshot's name."""

_free_rate = 0.0  # bytes a second the last timed step freed, in this process (0: none yet)


def _free_step() -> int:
    """Bytes one step should free: FREE_STEP_MAX_S at the last rate (FREE_STEP_FIRST before
    any), at least FREE_STEP_MIN, a multiple of 4096."""
    if _free_rate <= 0:
        return FREE_STEP_FIRST
    return max(FREE_STEP_MIN, int(_free_rate * FREE_STEP_MAX_S) // 4096 * 4096)


def _timed_free(freed: int, step: Callable[..., None], *args: Any) -> None:
    """Run `step(*args)`, which frees `freed` bytes, and keep the rate it ran at (when the
    step is big enough to tell)."""
    global _free_rate
    t0 = time.perf_counter()
    step(*args)
    took = time.perf_counter() - t0
    if freed >= FREE_STEP_MIN and took > 0:
        _free_rate = freed / took


def _size_or_zero(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _unlink_and_sync(fs: OSFileAPI, path: str, directory: str) -> None:
    fs.unlink(path)
    fs.fsync_dir(directory)


def _free_in_turns(
    fs: OSFileAPI, directory: str, path: str, turn: Callable[[], AbstractContextManager[object]]
) -> None:
    """Unlink `path` and fsync the directory, in held turns that each free about
    `_free_step()` bytes: a file over 1.25 steps is renamed to a FREE_SUFFIX name (the
    rename made durable in the first turn), cut back from its end a step per turn, and
    unlinked in the last."""
    left = os.stat(path).st_size
    step = _free_step()
    name, fd = path, -1
    try:
        while left > step + step // 4:
            with turn():
                if fd < 0:
                    name = path + FREE_SUFFIX
                    fs.rename(path, name)
                    fs.fsync_dir(directory)
                    fd = fs.open(name, os.O_WRONLY)
                _timed_free(step, fs.ftruncate, fd, left - step)
            left -= step
            step = _free_step()
    finally:
        if fd >= 0:
            fs.close(fd)
    with turn():
        _timed_free(left, _unlink_and_sync, fs, name, directory)


def remove_covered(
    fs: OSFileAPI,
    directory: str,
    seq: int,
    keep: int = 1,
    turn: Optional[Callable[[], AbstractContextManager[object]]] = None,
    doomed: Optional[list[str]] = None,
) -> list[str]:
    """Remove `covered_files(directory, seq, keep)` (or `doomed`, that list computed
    earlier). Returns the names removed.

    Call only once snapshot `seq` is durable (renamed and directory fsynced). With
    `turn` (the log writer's `held_turn`), each file is freed in its own turns, commits'
    syncs held meanwhile, a step of about FREE_STEP_MAX_S each (see `_free_in_turns`), so
    that freeing its blocks (a discard, on a filesystem mounted with it) holds up one
    commit per step, and for no longer than that. A file still open elsewhere is freed at
    its last close instead: close it first (the log writer's `finish_seal`).
    """
    removed: list[str] = []
    paths = covered_files(directory, seq, keep) if doomed is None else list(doomed)
    if turn is not None:
        # Smallest first: a file of FREE_STEP_MIN or more gives the rate the bigger ones are
        # stepped at. Any subset of covered files may go first: each is covered by the
        # durable snapshot, and open() skips and removes what a crash leaves.
        paths.sort(key=_size_or_zero)
    for path in paths:
        if turn is None:
            fs.unlink(path)
        else:
            _free_in_turns(fs, directory, path, turn)
        removed.append(os.path.basename(path))
    if removed and turn is None:
        fs.fsync_dir(directory)
    return removed
