"""The log writer: appends COMMIT records, group commit, segments, preallocation.

Guarantees (docs/GUARANTEES.md has the full statement):

* Records are written in sequence-number order, and the in-memory state is
  changed in the same order, under one lock, only after the record's write
  succeeded.
* A `sync` commit returns only after an fdatasync that *started after its
  record was written* has returned. Concurrent committers share one
  fdatasync (group commit): a leader syncs everything written so far, the
  others wait for it.
* A failed write (other than a full disk) or a failed fdatasync poisons the
  writer: every waiter covered by that sync gets the error, and every later
  write raises StorePoisonedError. The writer never retries an fsync.
* A full disk fails only that commit: nothing is applied, the log stays valid.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import struct
import sys
import threading
import time
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, NoReturn, Optional

from . import failpoints as _fp
from . import format as fmt
from .errors import (
    DiskFullError,
    InvalidOptionError,
    RecordTooLargeError,
    StoreClosedError,
    StoreForkedError,
    StorePoisonedError,
)
from .failpoints import hit
from .fileapi import OSFileAPI
from .options import MIN_SEGMENT_SIZE, check_bool, check_int, check_interval_ms

SYNC = "sync"
INTERVAL = "interval"
NONE = "none"
DURABILITY_MODES = (SYNC, INTERVAL, NONE)

BurstWriter = Callable[[int, memoryview, int], float]
"""`burst(fd, data, offset)`: wait while concurrent commits take their turn at the disk,
then, holding the log's commit syncs, write all of `data` at `offset` of `fd` and fdatasync
`fd`; the seconds the write and fdatasync took (the waits not counted); OSError on failure."""

_ZERO_CHUNK = bytes(1 << 20)
PREALLOC_BURST_BYTES = 24 << 20
"""Preparing the next segment with the C writer: zeros written and fdatasynced this many
bytes at a time, each burst on its turn between commits' syncs (a 64 MiB write and
fdatasync in one go held a concurrent commit up for 30-40 ms on the development VM)."""
_zero_map: Optional[mmap.mmap] = None


def _zero_burst() -> memoryview:
    """PREALLOC_BURST_BYTES of zeros: an anonymous map never written, so it takes no memory."""
    global _zero_map
    if _zero_map is None:
        _zero_map = mmap.mmap(-1, PREALLOC_BURST_BYTES)
    return memoryview(_zero_map)


_HS = fmt.FRAME_HEADER_SIZE
_FRAME_PACK = fmt.FRAME_HEADER.pack
_FRAME_OP_PACK = struct.Struct("<" + fmt.FRAME_HEADER.format.lstrip("<") + fmt.OP_HEADER.format.lstrip("<")).pack
_U32_PACK = fmt.U32.pack
_PADS = [bytes(i) for i in range(fmt.ALIGN)]
_crc = fmt.crc


@dataclass
class WriterOptions:
    """Tunables of the log writer."""

    durability: str = SYNC
    interval_ms: float = 100.0
    segment_size: int = 64 << 20
    preallocate: bool = True

    def __post_init__(self) -> None:
        """InvalidOptionError for a wrong type or value, before anything is opened."""
        check_durability(self.durability)
        self.interval_ms = check_interval_ms(self.interval_ms)
        check_int("segment_size", self.segment_size, MIN_SEGMENT_SIZE)
        check_bool("preallocate", self.preallocate)


def check_durability(durability: Any) -> str:
    if not isinstance(durability, str) or durability not in DURABILITY_MODES:
        raise InvalidOptionError(f"durability must be one of {DURABILITY_MODES}, not {durability!r}")
    return durability


class FlushSchedule:
    """When `interval` mode's background flushes start: `interval` seconds after the previous
    one started, or as soon as it ends if it ran longer than that.

    So a commit acknowledged at time t is covered by a flush that starts by
    t + max(interval, the rest of the flush running at t), not a whole interval after
    that flush ends (docs/GUARANTEES.md states the bound)."""

    def __init__(self, interval: float, now: float) -> None:
        self.interval = interval
        self.next_start = now + interval

    def delay(self, now: float) -> float:
        """Seconds until the next flush should start (0: start it now)."""
        return max(0.0, self.next_start - now)

    def ran(self, started: float, ended: float) -> None:
        """A flush (or a look that found nothing to flush) started at `started`, ended at `ended`."""
        self.next_start = max(started + self.interval, ended)


@dataclass
class ActiveSegment:
    """The segment being appended to."""

    path: str
    fd: int
    first_seq: int
    offset: int
    """Where the next record goes."""
    file_size: int
    """Bytes allocated (pre-written) in the file."""
    mapping: Optional[mmap.mmap] = None
    """A shared writable map of the pre-written region, when records are written through it."""

    def unmap(self) -> None:
        if self.mapping is not None:
            self.mapping.close()
            self.mapping = None


def mappable(fs: OSFileAPI, seg: ActiveSegment, preallocate: bool) -> bool:
    """Records may be copied into a shared map of `seg` instead of pwritten.

    Only on Linux, only over pre-written (allocated, zeroed) space, so a
    write can never meet a full disk; only with the plain OS file API, so a
    recording or fault-injecting layer sees every write as a pwrite. A
    process crash loses nothing written to the map (the pages belong to the
    kernel); fdatasync makes them durable exactly as it does pwrite's.
    """
    return (
        preallocate
        and sys.platform.startswith("linux")
        and type(fs).pwrite is OSFileAPI.pwrite
        and seg.file_size > seg.offset
        and os.environ.get("WALSTORE_NO_MMAP") != "1"
    )


def map_for_writes(fs: OSFileAPI, seg: ActiveSegment, preallocate: bool) -> None:
    """Map `seg` for lazy-mode writes where `mappable`; a failed map means pwrite."""
    if mappable(fs, seg, preallocate):
        try:
            seg.mapping = mmap.mmap(seg.fd, seg.file_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError):
            seg.mapping = None


def write_zeros(fs: OSFileAPI, fd: int, start: int, end: int) -> None:
    """Pre-write zero bytes in [start, end): allocated, zeroed space for later overwrites."""
    pos = start
    while pos < end:
        n = min(len(_ZERO_CHUNK), end - pos)
        fs.pwrite(fd, memoryview(_ZERO_CHUNK)[:n], pos)
        pos += n


def _too_large(n: int) -> NoReturn:
    raise RecordTooLargeError(
        f"a commit of {n:,} bytes exceeds the {fmt.MAX_PAYLOAD:,}-byte record limit; nothing was written"
    )


class LogWriter:
    """Appends records to the active segment; rolls segments; syncs by group commit."""

    def __init__(
        self,
        fs: OSFileAPI,
        directory: str,
        store_id: bytes,
        segment: ActiveSegment,
        last_seq: int,
        options: WriterOptions,
    ) -> None:
        self._fs = fs
        self._dir = directory
        self._store_id = store_id
        self._seg = segment
        self._opts = options
        self._seg_size = options.segment_size
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._last_seq = last_seq
        self._written_seq = last_seq
        self._durable_seq = last_seq
        self._syncing = False
        self._draining = False
        self._sync_done = threading.Event()
        self._event_taken = False
        self._poison: Optional[BaseException] = None
        self._closed = False
        self._open_seq = last_seq
        self.log_bytes = 0
        """Bytes of records written since open or since the last `seal_for_snapshot`."""
        self.compact_at = float("inf")
        """`on_threshold` is called (without the lock) after a commit leaves `log_bytes` above this."""
        self.on_threshold: Optional[Callable[[], None]] = None
        self.fsyncs = 0
        self.rolls = 0
        self._prealloc_thread: Optional[threading.Thread] = None
        self._prealloc_ready = self._adopt_prealloc()
        self._uncut: Optional[ActiveSegment] = None  # sealed for a snapshot, cut by finish_seal
        self._forked: Optional[str] = None  # why writes are refused in a fork() child
        self._flusher: Optional[threading.Thread] = None
        self._stop_flusher = threading.Event()
        self._attach(segment)
        self._maybe_prealloc()
        if options.durability == INTERVAL:
            self._flusher = threading.Thread(target=self._flush_loop, name="walstore-flush", daemon=True)
            self._flusher.start()

    # ---- state -----------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def commits(self) -> int:
        """Commits since open (each takes exactly one sequence number)."""
        return self._last_seq - self._open_seq

    @property
    def durable_seq(self) -> int:
        return self._durable_seq

    @property
    def segment(self) -> ActiveSegment:
        return self._seg

    @property
    def lock(self) -> threading.Condition:
        """The writer's lock: held while a record is written and applied."""
        return self._cond

    def _check_usable(self) -> None:
        if self._closed:
            if self._forked is not None:
                raise StoreForkedError(self._forked)
            raise StoreClosedError("the store is closed")
        if self._poison is not None:
            raise StorePoisonedError(
                f"an earlier write or fsync failed ({self._poison}); the store refuses writes until it is reopened"
            ) from self._poison

    def _wake(self) -> None:
        """(Lock held.) Wake everyone waiting on the lock's condition and on the current sync.

        A new event is made only when a follower took the current one: a lone
        committer's syncs cost no event at all.
        """
        self._cond.notify_all()
        if self._event_taken:
            event = self._sync_done
            self._sync_done = threading.Event()
            self._event_taken = False
            event.set()

    def _attach(self, seg: ActiveSegment) -> None:
        """Start writing to `seg` (maps it for lazy-mode writes where possible)."""
        map_for_writes(self._fs, seg, self._opts.preallocate)

    def _detach(self, seg: ActiveSegment) -> None:
        """Stop writing to `seg` (before it is truncated or closed)."""
        seg.unmap()

    def detach_in_fork_child(self, why: str) -> None:
        """(In a fork() child, the only thread.) Refuse every write with StoreForkedError(why)
        and make close() a no-op, touching no file. The locks are new ones: a thread of the
        parent may have held the old ones at the fork, and it does not exist here."""
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._forked = why
        self._closed = True

    def _poison_with(self, exc: BaseException) -> None:
        if self._poison is None:
            self._poison = exc
        self._wake()

    def _logged_not_applied(self, seq: int, exc: BaseException) -> NoReturn:
        """(Lock held.) Commit `seq` is in the log but `exc` came before it was applied to
        the state (apply raised, or an interrupt such as KeyboardInterrupt came between the
        write and the apply): the state lags the log, so the store refuses writes until it
        is reopened (which rebuilds the state from the log). An Exception becomes
        StorePoisonedError; KeyboardInterrupt and SystemExit are raised as they are."""
        self._poison_with(exc)
        if isinstance(exc, Exception):
            raise StorePoisonedError(
                f"applying commit {seq} failed after it was logged: {exc!r}; reopen the store"
            ) from exc
        raise exc

    # ---- commit ----------------------------------------------------------------

    def commit(self, payload: bytes, apply: Callable[[], None], durability: Optional[str] = None) -> int:
        """Log `payload` as one COMMIT, then run `apply` under the lock; return its seq.

        `apply` runs only if the record was written; it must not raise. With
        `sync` durability the call returns after the record is on disk.
        """
        n = len(payload)
        if n > fmt.MAX_PAYLOAD:
            _too_large(n)
        size = _HS + ((n + 7) & ~7)
        with self._mutex:
            seg = self._seg
            if self._draining or self._closed or self._poison is not None or seg.offset + size > self._seg_size:
                seg = self._reserve(size)
            seq = self._last_seq + 1
            body = _FRAME_PACK(n, fmt.REC_COMMIT, 0, 0, 0, seq, self._durable_seq) + payload + _PADS[-n & 7]
            wait = self._append(_U32_PACK(_crc(body)) + body, seq, size, seg, apply, None, None, durability)
        if wait:
            self._await_durable(seq)
        if self.log_bytes > self.compact_at:
            self._threshold_reached()
        return seq

    def commit_op(
        self,
        op: int,
        flags: int,
        key: bytes,
        value: bytes,
        apply: Callable[[Any, Any], Any],
        arg1: Any,
        arg2: Any,
        durability: Optional[str] = None,
    ) -> int:
        """`commit` of a one-operation payload, framed in one step; then `apply(arg1, arg2)`.

        The same record, byte for byte, as `commit(encode_op(op, flags, key, value), ...)`:
        this is the hot path of `db[key] = value`.
        """
        n = fmt.OP_HEADER_SIZE + len(key) + len(value)
        if n > fmt.MAX_PAYLOAD:
            _too_large(n)
        size = _HS + ((n + 7) & ~7)
        with self._mutex:
            seg = self._seg
            if self._draining or self._closed or self._poison is not None or seg.offset + size > self._seg_size:
                seg = self._reserve(size)
            seq = self._last_seq + 1
            body = (
                _FRAME_OP_PACK(n, fmt.REC_COMMIT, 0, 0, 0, seq, self._durable_seq, op, flags, 0, len(key), len(value))
                + key
                + value
                + _PADS[-n & 7]
            )
            wait = self._append(_U32_PACK(_crc(body)) + body, seq, size, seg, apply, arg1, arg2, durability)
        if wait:
            self._await_durable(seq)
        if self.log_bytes > self.compact_at:
            self._threshold_reached()
        return seq

    def take_turn(self) -> None:
        """For a background task sharing the disk (compaction's seal and cleanup), before an
        operation that makes the disk busy: wait for commits to have their turn (the C
        writer: as before a burst; the pure-Python writer does not wait)."""

    def held_turn(self) -> AbstractContextManager[object]:
        """For a background step that makes the disk busy without writing (unlinking a
        covered file): `with writer.held_turn(): ...` waits as `take_turn` does, then holds
        commits' syncs until the block ends (the C writer; the pure-Python writer neither
        waits nor holds). The block must not wait for a commit."""
        return contextlib.nullcontext()

    def burst_writer(self) -> Optional[BurstWriter]:
        """For a background writer sharing the disk (a snapshot): a function that writes one
        burst and fdatasyncs it, after giving concurrent commits their turn (see
        `BurstWriter`); None when this writer cannot pace one (the pure-Python writer: the
        snapshot then writes through the file API on its own)."""
        return None

    def set_compact_at(self, log_bytes: float) -> None:
        """Call `on_threshold` after commits that leave more than `log_bytes` since the last seal."""
        self.compact_at = log_bytes

    def _threshold_reached(self) -> None:
        if self.on_threshold is not None:
            self.on_threshold()

    def _reserve(self, size: int) -> ActiveSegment:
        """(Lock held.) Refuse if closed or poisoned; roll if the record does not fit."""
        while self._draining:  # a roll or close waits for the in-flight sync: let it through
            self._cond.wait()
        if self._closed or self._poison is not None:
            self._check_usable()
        seg = self._seg
        if seg.offset + size > self._seg_size and seg.offset > fmt.FILE_HEADER_SIZE:
            self._roll(expect=seg)
            seg = self._seg
            if self._closed or self._poison is not None:
                self._check_usable()
        return seg

    def _append(
        self,
        frame: bytes,
        seq: int,
        size: int,
        seg: ActiveSegment,
        apply: Callable[..., Any],
        arg1: Any,
        arg2: Any,
        durability: Optional[str],
    ) -> bool:
        """(Lock held.) Write the framed record and apply it; True if the caller must then
        wait for its sync (`_await_durable`, without the lock)."""
        if _fp._armed:
            _fp.hit("commit.before_write")
        if durability is None:
            mode = self._opts.durability
        else:
            mode = check_durability(durability)
        m = seg.mapping
        end = seg.offset + len(frame)
        try:
            if m is not None and end <= seg.file_size and mode != SYNC:
                # Lazy modes copy into the map: no syscall. A sync commit pays an fdatasync
                # anyway, and a page dirtied through the map costs that fdatasync more (it
                # must be write-protected again) than a pwrite does.
                m[seg.offset : end] = frame
                seg.offset = end
            else:
                self._write(frame)
            if _fp._armed:
                _fp.hit("commit.after_write")
            if self._prealloc_thread is None and seg.offset * 2 >= self._seg_size:
                self._maybe_prealloc()
            self._last_seq = seq
            self._written_seq = seq
            self.log_bytes += size
            if arg1 is None:
                apply()
            else:
                apply(arg1, arg2)
        except (DiskFullError, StorePoisonedError):
            raise  # the write path decided: nothing was logged, or the store is poisoned
        except BaseException as exc:
            if seg.offset >= end:  # the record is in the log (an interrupt before that: it is not)
                self._logged_not_applied(seq, exc)
            raise
        if _fp._armed:
            _fp.hit("commit.after_apply")
        return mode == SYNC

    def _await_durable(self, seq: int) -> None:
        """(Lock not held.) Return once an fdatasync that began after `seq` was written has
        returned; lead one when none is running.

        A follower waits on the current sync's event, not on the writer's lock, so the
        committers a sync releases return at once instead of queueing for the lock.
        """
        while self._durable_seq < seq:
            event = self._sync_done
            if self._poison is not None or self._closed:
                with self._mutex:
                    self._check_usable()
            if self._syncing or self._draining:
                self._event_taken = True
                # The timeout only covers the instant between taking the event and marking
                # it taken, when a sync may end without setting it; the loop then looks again.
                event.wait(0.005)
                continue
            with self._mutex:
                self._wait_durable(seq)
        if _fp._armed:
            _fp.hit("commit.after_sync")

    def _write(self, frame: bytes) -> None:
        """Write `frame` at the segment's offset. ENOSPC: undo and raise; other errors poison."""
        seg = self._seg
        try:
            self._fs.pwrite(seg.fd, frame, seg.offset)
        except OSError as exc:
            self._write_failed(exc, len(frame))
        seg.offset += len(frame)
        if seg.offset > seg.file_size:
            seg.file_size = seg.offset

    def _write_failed(self, exc: OSError, size: int) -> NoReturn:
        """Raise for a failed write of `size` bytes at the segment's offset: DiskFullError
        after undoing it (ENOSPC, EDQUOT), else StorePoisonedError after poisoning."""
        seg = self._seg
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            end = seg.offset + size
            inside = min(end, seg.file_size) - seg.offset
            if inside > 0:
                # Part of the frame may have landed in allocated space: zero it, so a
                # later CLOSE is not followed by a stray partial record.
                try:
                    self._fs.pwrite(seg.fd, bytes(inside), seg.offset)
                except OSError:
                    pass  # overwritten by the next record anyway
            if end > seg.file_size:
                try:
                    self._fs.ftruncate(seg.fd, max(seg.file_size, seg.offset))
                except OSError as exc2:
                    self._poison_with(exc2)
                    raise StorePoisonedError(f"could not undo a write on a full disk: {exc2}") from exc2
            raise DiskFullError(exc.errno, f"disk full while writing to {seg.path}; the commit was not made") from exc
        self._poison_with(exc)
        raise StorePoisonedError(f"write to {seg.path} failed: {exc}; the store refuses writes") from exc

    def _wait_durable(self, seq: int) -> None:
        """Block (lock held) until an fdatasync that began after `seq` was written has returned."""
        while self._durable_seq < seq:
            if self._poison is not None:
                self._check_usable()
            if self._closed:
                raise StoreClosedError("the store was closed while a commit waited for its sync")
            if self._syncing or self._draining:
                self._cond.wait()
                continue
            self._sync_leader()
            if self._durable_seq >= seq and self._written_seq > self._durable_seq and not self._draining:
                # Records were written during that sync and their committers are waiting:
                # lead their sync at once (this thread already runs) rather than leave the
                # disk idle while a woken follower gets going. One chained sync at most.
                self._sync_leader()

    def _sync_leader(self) -> None:
        """Lead one fdatasync covering every record written so far (lock held on entry and exit)."""
        self._syncing = True
        target = self._written_seq
        fd = self._seg.fd
        error: Optional[OSError] = None
        self._cond.release()
        try:
            try:
                self._fs.fdatasync(fd)
            except OSError as exc:
                error = exc
        finally:
            self._cond.acquire()
            self._syncing = False
        if error is not None:
            self._poison_with(error)
            raise StorePoisonedError(
                f"fdatasync of {self._seg.path} failed: {error}; commits it covered are not"
                " acknowledged and the store refuses writes until it is reopened"
            ) from error
        self.fsyncs += 1
        if target > self._durable_seq:
            self._durable_seq = target
        self._wake()

    def _sync_holding_lock(self, force: bool = False) -> None:
        """fdatasync the active segment without letting go of the lock (rolls, close).

        Skipped when every record is already durable, unless `force` (the CLOSE record).
        """
        if self._durable_seq >= self._written_seq and not force:
            return
        target = self._written_seq
        try:
            self._fs.fdatasync(self._seg.fd)
        except OSError as exc:
            self._poison_with(exc)
            raise StorePoisonedError(
                f"fdatasync of {self._seg.path} failed: {exc}; commits it covered are not"
                " acknowledged and the store refuses writes until it is reopened"
            ) from exc
        self.fsyncs += 1
        self._durable_seq = target
        self._wake()

    def wait_durable(self, seq: int) -> None:
        """(Lock not held.) Block until commit `seq` is on stable storage, sharing syncs."""
        if self.durable_seq >= seq:
            return
        with self._mutex:
            self._check_usable()
        self._await_durable(seq)

    def sync(self) -> None:
        """Make every record written so far durable (group commit with any concurrent syncs)."""
        with self._cond:
            self._check_usable()
            self._wait_durable(self._written_seq)

    def _flush_loop(self) -> None:
        """`interval` mode: make every record durable within one interval (FlushSchedule).

        A flush joins a sync already running rather than skipping its turn: a record
        written after that sync began still needs the next one."""
        schedule = FlushSchedule(self._opts.interval_ms / 1000.0, time.monotonic())
        while not self._stop_flusher.wait(schedule.delay(time.monotonic())):
            started = time.monotonic()
            with self._cond:
                if self._closed or self._poison is not None:
                    return
                target = self._written_seq
                if target > self._durable_seq:
                    try:
                        self._wait_durable(target)
                    except (StorePoisonedError, StoreClosedError):
                        return
            schedule.ran(started, time.monotonic())

    # ---- segments --------------------------------------------------------------

    def seal_for_snapshot(self) -> int:
        """Seal the active segment if it holds records, so a snapshot at the returned seq
        covers whole segments; later commits go to a new segment.

        The sealed segment is synced but not yet cut back to its records (recovery reads
        the zeros after them as its end): `finish_seal` does that once the compaction is
        over, unless the snapshot made the segment redundant and it was removed whole.
        Cutting it here would free its unused preallocated space only to free the rest
        moments later, and on a filesystem mounted with `discard` each is a trim that
        commits queue behind."""
        if self._opts.preallocate:  # prepare the next segment first, without holding up commits
            with self._mutex:
                if self._prealloc_thread is None and not self._prealloc_ready:
                    self._start_prealloc()
                thread = self._prealloc_thread
            if thread is not None:
                thread.join()
        with self._mutex:
            self._check_usable()
            old = self._roll(seal_later=True) if self._seg.offset > fmt.FILE_HEADER_SIZE else None
            self.log_bytes = 0
            seq = self._last_seq
        if old is not None:
            self.finish_seal(())  # one pending at most: a failed compaction's, if not yet cut
            self._uncut = old
        return seq

    def finish_seal(self, removed: Collection[str]) -> None:
        """After a compaction's snapshot: close the segment `seal_for_snapshot` left uncut if
        its name is in `removed` (the snapshot covers it: it is about to be unlinked, or
        was), else cut it back to its records and fsync it (on its turn, without holding up
        commits). Idempotent."""
        old, self._uncut = self._uncut, None
        if old is None:
            return
        if os.path.basename(old.path) in removed:
            try:
                self._fs.close(old.fd)
            except OSError:
                pass  # covered: nothing of it is read again
            return
        self.take_turn()
        self._seal(old, locked=False)

    def _drain_syncs(self) -> None:
        """Wait (lock held) for an in-flight sync to end; no new commit or sync starts meanwhile."""
        self._draining = True
        try:
            while self._syncing:
                self._cond.wait()
        finally:
            self._draining = False
            self._wake()

    def _roll(self, expect: Optional[ActiveSegment] = None, seal_later: bool = False) -> Optional[ActiveSegment]:
        """Seal the active segment and start the next one (lock held).

        With `expect`, nothing happens if the active segment is no longer
        `expect` once in-flight syncs have drained (someone else rolled it).
        With `seal_later`, the old segment is returned instead of cut back and
        fsynced: the caller passes it to `_seal` once it has let go of the lock.

        Order: fdatasync the old segment; create, fsync and rename the new one
        and fsync the directory (ENOSPC here leaves the old segment active and
        nothing changed); then truncate the old segment to its records.
        """
        self._drain_syncs()
        if expect is not None and self._seg is not expect:
            return None  # another committer rolled while this one waited
        old = self._seg
        # Sync with the lock held: no record may slip into the old segment after this
        # sync began, or the new segment's header (renamed into place next) could vouch
        # for a record that never reached the disk.
        self._sync_holding_lock()
        hit("roll.after_sync_old")
        try:
            new = create_segment(
                self._fs,
                self._dir,
                self._store_id,
                self._last_seq + 1,
                self._last_seq,
                old.offset,
                self._opts,
                prealloc_ready=self._take_prealloc(),
            )
        except OSError as exc:
            if os.path.exists(os.path.join(self._dir, fmt.segment_name(self._last_seq + 1))):
                # The rename happened, the directory fsync after it failed: the new segment is
                # in place, so a record written to the old one would break the chain
                # (missing-segment at the next open). Refuse writes; a reopen continues there.
                self._poison_with(exc)
                raise StorePoisonedError(
                    f"creating segment {self._last_seq + 1} failed after it was renamed into place:"
                    f" {exc}; the store refuses writes until it is reopened"
                ) from exc
            raise
        hit("roll.after_create")
        self._detach(old)
        self._seg = new
        self._attach(new)
        self.rolls += 1
        self._maybe_prealloc(after_roll=not seal_later)
        if seal_later:
            return old
        self._seal(old, locked=True)
        return None

    def _seal(self, old: ActiveSegment, locked: bool) -> None:
        """Cut the sealed segment `old` back to its records, fsync and close it; poison on failure.

        May run without the lock (`locked=False`): nothing writes to `old` any more,
        and until it is cut, recovery reads the zeros after its records as its end.
        """
        try:
            try:
                self._fs.ftruncate(old.fd, old.offset)
                self._fs.fsync(old.fd)
            finally:
                self._fs.close(old.fd)
        except OSError as exc:
            if locked:
                self._poison_with(exc)
            else:
                with self._cond:
                    self._poison_with(exc)
            raise StorePoisonedError(f"sealing {old.path} failed: {exc}") from exc

    def _take_prealloc(self) -> bool:
        t = self._prealloc_thread
        if t is not None:
            t.join()
            self._prealloc_thread = None
        ready = self._prealloc_ready
        self._prealloc_ready = False
        return ready

    def _adopt_prealloc(self) -> bool:
        """Keep the next segment an earlier writer prepared (prealloc.ready: segment_size
        zero bytes, fsynced before it got that name) if it has this store's segment size
        and preallocation is on; else remove it. So an open does not write 64 MiB again."""
        path = os.path.join(self._dir, fmt.PREALLOC_READY_NAME)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return False
        if self._opts.preallocate and size == self._opts.segment_size:
            return True
        try:
            self._fs.unlink(path)
        except OSError:
            pass  # harmless: never taken, and the next one prepared is renamed over it
        return False

    def prepare_next_segment(self) -> None:
        """Once a compaction has succeeded: start preparing the next segment unless it is ready
        or being prepared. (The compaction's own roll leaves that to now, so that the
        zeros' bursts do not compete with the snapshot's; before, it waited for the new
        segment to be half full, and a compaction soon after waited for the zeros.)"""
        with self._mutex:
            if not self._closed and self._forked is None:
                self._maybe_prealloc(after_roll=True)

    def _maybe_prealloc(self, after_roll: bool = False) -> None:
        """Start preparing the next segment right after a roll, once the active one is
        half full (after open), or when a compaction has succeeded (`prepare_next_segment`).
        So a compaction almost always finds the next segment ready, and its seal does not
        wait for 64 MiB of zeros paced between commits."""
        if (
            self._opts.preallocate
            and self._prealloc_thread is None
            and not self._prealloc_ready
            and (after_roll or self._seg.offset * 2 >= self._opts.segment_size)
        ):
            self._start_prealloc()

    def _start_prealloc(self) -> None:
        if self._prealloc_thread is not None:
            return
        self._prealloc_ready = False
        t = threading.Thread(target=self._prealloc, name="walstore-prealloc", daemon=True)
        self._prealloc_thread = t
        t.start()

    def _prealloc(self) -> None:
        """Prepare the next segment: segment_size zero bytes written to prealloc.tmp and
        fsynced (in bursts paced between commits' syncs where this writer has a burst
        writer), then renamed prealloc.ready, which the next roll, or the next open, takes."""
        path = os.path.join(self._dir, fmt.PREALLOC_NAME)
        burst = self.burst_writer()
        try:
            fd = self._fs.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                if burst is None:
                    write_zeros(self._fs, fd, 0, self._opts.segment_size)
                    self._fs.fdatasync(fd)
                else:
                    zeros = _zero_burst()
                    for pos in range(0, self._opts.segment_size, len(zeros)):
                        burst(fd, zeros[: min(len(zeros), self._opts.segment_size - pos)], pos)
            finally:
                self._fs.close(fd)
            # Named ready only once its zeros are on disk; without a directory fsync, a
            # crash may leave the old name, which the next open removes.
            self._fs.rename(path, os.path.join(self._dir, fmt.PREALLOC_READY_NAME))
            self._prealloc_ready = True
        except OSError:
            # A full disk or an I/O error here only costs the next roll its head start;
            # the roll itself reports a failure.
            try:
                self._fs.unlink(path)
            except OSError:
                pass

    # ---- close -----------------------------------------------------------------

    def close(self) -> None:
        """Sync, write a CLOSE record, sync it, and close the segment. Idempotent.

        Two syncs: the CLOSE record's watermark claims every record before it is
        durable, which is only true once the first sync has returned.
        """
        if self._forked is not None:
            return  # a fork() child: the files are the parent's
        try:
            self.finish_seal(())  # a segment a failed compaction sealed
        except StorePoisonedError:
            pass  # recorded: no CLOSE record below
        with self._cond:
            if self._closed:
                return
            self._drain_syncs()
            try:
                if self._poison is None:
                    # Both syncs hold the lock: no commit may land between them and the CLOSE.
                    self._sync_holding_lock()
                    hit("close.after_sync")
                    frame = fmt.encode_frame(fmt.REC_CLOSE, self._last_seq, self._last_seq, b"")
                    self._write(frame)
                    hit("close.after_close_record")
                    self._sync_holding_lock(force=True)
            finally:
                self._closed = True
                self._stop_flusher.set()
                self._wake()
        if self._flusher is not None:
            self._flusher.join()
        self._take_prealloc()
        self._detach(self._seg)
        self._fs.close(self._seg.fd)

    def abandon(self) -> None:
        """Close file descriptors without writing anything (tests, poisoned stores)."""
        with self._cond:
            self._closed = True
            self._stop_flusher.set()
            self._wake()
        if self._flusher is not None:
            self._flusher.join()
        self._take_prealloc()
        self._detach(self._seg)
        for fd in [self._seg.fd] + ([self._uncut.fd] if self._uncut is not None else []):
            try:
                self._fs.close(fd)
            except OSError:
                pass
        self._uncut = None


def create_segment(
    fs: OSFileAPI,
    directory: str,
    store_id: bytes,
    first_seq: int,
    prev_seq: int,
    prev_size: int,
    options: WriterOptions,
    prealloc_ready: bool = False,
) -> ActiveSegment:
    """Create segment `first_seq` durably: header (and zeros) written and synced, renamed, dir synced.

    Raises DiskFullError (nothing left behind) when the disk is full.
    """
    final = os.path.join(directory, fmt.segment_name(first_seq))
    header = fmt.FileHeader(fmt.KIND_SEGMENT, store_id, first_seq, prev_seq, prev_size).encode()
    prealloc_path = os.path.join(directory, fmt.PREALLOC_READY_NAME)
    tmp = prealloc_path if prealloc_ready else final + fmt.TMP_SUFFIX
    fd = -1
    try:
        if prealloc_ready:
            fd = fs.open(tmp, os.O_RDWR)
            size = os.fstat(fd).st_size
        else:
            fd = fs.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            size = fmt.FILE_HEADER_SIZE
            if options.preallocate:
                write_zeros(fs, fd, fmt.FILE_HEADER_SIZE, options.segment_size)
                size = max(size, options.segment_size)
        fs.pwrite(fd, header, 0)
        fs.fdatasync(fd)
        fs.rename(tmp, final)
        fs.fsync_dir(directory)
    except OSError as exc:
        if fd >= 0:
            fs.close(fd)
        try:
            if not prealloc_ready:
                fs.unlink(tmp)
        except OSError:
            pass
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(exc.errno, f"disk full creating segment {final}; the commit was not made") from exc
        raise
    return ActiveSegment(final, fd, first_seq, fmt.FILE_HEADER_SIZE, size)
