"""The log writer with its hot path in C (`_native/logwrite.c`), used when the C module is built.

Same records, byte for byte, and the same guarantees as `walstore.writer.LogWriter`
(the reference, which this subclasses); what moves to C, called without the GIL:

* framing and writing a COMMIT: the frame is built with hardware CRC32C and
  copied into the mapped pre-written segment (lazy modes) or pwritten (sync);
* group commit: a waiting committer sleeps in C, and the first one that finds
  no fdatasync running leads the next, covering every record written so far.
  A follower needs no GIL to take its turn, so the disk is not left idle while
  Python threads wake up.

Only with the plain OS file API: a recording or fault-injecting layer (the
crash simulator, fault tests) gets the pure-Python writer, which routes every
write and sync through it. Rolls, CLOSE, snapshots' seals and error handling
are the reference writer's code, run with C syncs paused.

In the lazy modes a store's `db[key] = value` can skip Python altogether
(`_native/fastput.c`, `bind_fast_put`): the C slot does what `commit_op` does
for a str or bytes key and value, under the same lock, while the writer's gate
is open (it is shut, under the lock, when the writer closes or is poisoned).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, Optional

from . import failpoints as _fp
from . import format as fmt
from .errors import StoreClosedError, StorePoisonedError
from .fileapi import OSFileAPI
from .writer import (
    INTERVAL,
    NONE,
    SYNC,
    ActiveSegment,
    BurstWriter,
    FlushSchedule,
    LogWriter,
    WriterOptions,
    mappable,
)

try:
    from ._walstore_native import ffi as _ffi
    from ._walstore_native import lib as _lib

    BUILT = hasattr(_lib, "ws_log_put_op")
except ImportError:  # no compiler at install time
    _ffi = _lib = None
    BUILT = False

if BUILT:
    _put = _lib.ws_log_put
    _put_op = _lib.ws_log_put_op
    _wait = _lib.ws_log_commit_wait
    _last_seq = _lib.ws_log_last_seq
    _NOTIFY = _lib.WS_LOG_NOTIFY
    _SEQ = _NOTIFY - 1
    _NO_ROOM = _lib.WS_LOG_NO_ROOM
    _TOO_BIG = _lib.WS_LOG_TOO_BIG
    _CLOSED = _lib.WS_LOG_CLOSED
    _FAILED = _lib.WS_LOG_FAILED

GIL_TURN_SPIN_US = 500
"""Group commit: the longest a committer whose sync ended yields its CPU, rather than
sleeping, until the committer ahead of it lets go of the GIL (`_native/gilturn.h`;
docs/NATIVE.md, "Handing the GIL between committers"). 0 turns it off."""


def set_gil_turn_spin(max_us: int) -> None:
    """Set GIL_TURN_SPIN_US for the whole process (0: committers sleep for the GIL)."""
    global GIL_TURN_SPIN_US
    if isinstance(max_us, bool) or not isinstance(max_us, int) or not 0 <= max_us <= 1_000_000:
        raise ValueError(f"the spin limit is an int from 0 to 1,000,000 us, not {max_us!r}")
    GIL_TURN_SPIN_US = max_us
    if BUILT:
        _lib.ws_turn_set_spin(max_us)


def gil_turn_stats() -> dict[str, int]:
    """The GIL turn's counters since the process started: claims (committers back from a
    sync wait), spun (claims that yielded for the turn), timeouts (claims that gave up at
    the limit) and hold_ns (the average time a committer keeps the turn)."""
    if not BUILT:
        return {"claims": 0, "spun": 0, "timeouts": 0, "hold_ns": 0}
    c = _ffi.new("uint64_t[4]")
    _lib.ws_turn_stats(c, c + 1, c + 2, c + 3)
    return {"claims": c[0], "spun": c[1], "timeouts": c[2], "hold_ns": c[3]}


if BUILT:
    # Without a GIL (free-threaded CPython) there is nothing to hand on.
    set_gil_turn_spin(GIL_TURN_SPIN_US if getattr(sys, "_is_gil_enabled", lambda: True)() else 0)

_fast_base: Optional[type] = None
_fast_base_made = False


def fast_put_base() -> Optional[type]:
    """The C type whose `__setitem__` is the fast put (`_native/fastput.c`), made once; None
    where it cannot be made (not built, not CPython)."""
    global _fast_base, _fast_base_made
    if not _fast_base_made:  # two threads may both get here: C makes the type once
        _fast_base_made = True
        if BUILT and hasattr(_lib, "ws_fastput_type"):
            out: dict[str, type] = {}
            if _lib.ws_fastput_type(id(out)) == _lib.WS_FASTPUT_OK:
                _fast_base = out["FastSetItem"]
    return _fast_base


def usable(fs: OSFileAPI) -> bool:
    """The C writer can serve a store on `fs`: built, in use (see `walstore.backend()`), plain OS files."""
    from . import native

    return BUILT and native.AVAILABLE and type(fs) is OSFileAPI and os.name == "posix"


_LAZY = {SYNC: 0, INTERVAL: 1, NONE: 1}
"""Durability mode -> the C append's `lazy` flag (copy into the map, no wait)."""


_NO_LIMIT = (1 << 64) - 1
GAP_SYNCS = 48
GAP_IDLE_US = 2000
GAP_MAX_US = 30000
"""Before each burst of a background writer (a snapshot), commits get GAP_SYNCS fdatasyncs
undisturbed since the last burst, or GAP_MAX_US, whichever comes first; a log with no
commit syncing or waiting for GAP_IDLE_US is idle and the burst goes at once. One commit
then waits behind each burst of about `snapshot.BURST_TARGET_S`, and the
GAP_SYNCS after it do not. 48 rather than 64: the snapshot write went from 0.49-0.57 to
0.56-0.64 of a raw write (bench/compaction.py), the p99 as noisy either way."""

GATHER_MAX_US = 200
"""Group commit: the longest a committer about to lead a sync waits for the committers
the last sync released to publish their next records (see ws_log_set_gather; also at
most half the last sync's time; 0 turns gathering off)."""

GAP_FULL_BYTES = 8 << 20
"""A burst smaller than this (the snapshot's last, say) waits for a share of GAP_SYNCS in
proportion to its size: the commit behind it waits that much less."""

BURST_PART_MAX_S = 0.045
"""A burst that would take longer than this at the rate the log's last burst ran (the next
segment's zeros, or the snapshot's previous burst) goes in parts of that size, each after
its own gap (equal parts, multiples of 4096): one commit waits for each whole burst (its
syncs held), so this bounds that wait under the 50 ms stall target. The snapshot sizes its bursts to take
`snapshot.BURST_TARGET_S` (25 ms) at the rate its previous one ran, so parts are cut only
when the disk is slower than that: its first burst (24 MiB) on a disk in a slow state."""


def _os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _c_field(get: str, put: str, doc: str) -> Any:
    """A property of NativeLogWriter kept in the C log: `get(log)` reads it, `put(log, v)` sets it."""

    def fget(self: NativeLogWriter) -> int:
        return int(getattr(_lib, get)(self._log))

    def fset(self: NativeLogWriter, value: int) -> None:
        getattr(_lib, put)(self._log, value)

    return property(fget, fset, doc=doc)


class NativeLogWriter(LogWriter):
    """`LogWriter` whose commits, syncs and waits run in C; see the module docstring."""

    def __init__(
        self,
        fs: OSFileAPI,
        directory: str,
        store_id: bytes,
        segment: ActiveSegment,
        last_seq: int,
        options: WriterOptions,
    ) -> None:
        log = _lib.ws_log_new(last_seq)
        if log == _ffi.NULL:
            raise MemoryError("could not allocate the log writer")
        self._log = _ffi.gc(log, _lib.ws_log_free)
        _lib.ws_log_set_gather(log, GATHER_MAX_US)
        self._active = segment
        self._py_fsyncs = 0
        self._lazy = 0 if options.durability == SYNC else 1
        self._fast_gate = _ffi.new("int *", 1)
        """C fast puts run only while this is non-zero: shut (under the lock) on close and poisoning."""
        _lib.ws_log_set_limit(self._log, options.segment_size)
        super().__init__(fs, directory, store_id, segment, last_seq, options)

    # ---- state kept in C -------------------------------------------------------

    _last_seq = _c_field("ws_log_last_seq", "ws_log_set_last_seq", "the last seq assigned (C assigns it)")
    log_bytes = _c_field("ws_log_log_bytes", "ws_log_set_log_bytes", "bytes of records since the last seal")
    _written_seq = _c_field("ws_log_written", "ws_log_publish", "every record up to it is written")
    _durable_seq = _c_field("ws_log_durable", "ws_log_mark_durable", "every record up to it is durable")

    @property
    def _seg(self) -> ActiveSegment:
        """The active segment, its offset read from C (where appends move it)."""
        seg = self._active
        seg.offset = int(_lib.ws_log_offset(self._log))
        return seg

    @_seg.setter
    def _seg(self, seg: ActiveSegment) -> None:
        self._active = seg  # `_attach` gives C its offset

    @property
    def fsyncs(self) -> int:
        return self._py_fsyncs + int(_lib.ws_log_fsyncs(self._log))

    @fsyncs.setter
    def fsyncs(self, n: int) -> None:
        self._py_fsyncs = n - int(_lib.ws_log_fsyncs(self._log))

    # ---- segments --------------------------------------------------------------

    def _attach(self, seg: ActiveSegment) -> None:
        size = seg.file_size if mappable(self._fs, seg, self._opts.preallocate) else 0
        _lib.ws_log_set_segment(self._log, seg.fd, size)  # a failed map (< 0) means pwrite
        _lib.ws_log_set_offset(self._log, seg.offset)
        self._arm_notify()

    def _arm_notify(self) -> None:
        """Have C flag the commit that should start preparing the next segment, or cross `compact_at`."""
        half = (self._seg_size + 1) // 2  # `_maybe_prealloc`'s offset * 2 >= segment size
        prealloc = self._opts.preallocate and self._prealloc_thread is None and not self._prealloc_ready
        at = self.compact_at
        _lib.ws_log_set_notify(self._log, half if prealloc else _NO_LIMIT, int(at) + 1 if at < _NO_LIMIT else _NO_LIMIT)

    def set_compact_at(self, log_bytes: float) -> None:
        self.compact_at = log_bytes
        self._arm_notify()

    def take_turn(self) -> None:
        _lib.ws_log_gap(self._log, GAP_SYNCS, GAP_IDLE_US, GAP_MAX_US)

    @contextlib.contextmanager
    def held_turn(self) -> Iterator[None]:
        token = _ffi.new("uint64_t *")
        _lib.ws_log_hold(self._log, GAP_SYNCS, GAP_IDLE_US, GAP_MAX_US, token)
        try:
            yield
        finally:
            _lib.ws_log_release(self._log, token[0])

    def burst_writer(self) -> Optional[BurstWriter]:
        log = self._log

        def burst(fd: int, data: memoryview, offset: int) -> float:
            buf = _ffi.from_buffer(data)
            n = len(data)
            syncs = GAP_SYNCS if n >= GAP_FULL_BYTES else max(1, GAP_SYNCS * n // GAP_FULL_BYTES)
            rc = int(
                _lib.ws_log_burst(log, syncs, GAP_IDLE_US, GAP_MAX_US, int(BURST_PART_MAX_S * 1e9), fd, buf, n, offset)
            )
            if rc < 0:
                raise _os_error(-rc)
            return rc / 1e9

        return burst

    def _notified(self) -> None:
        """(Lock not held.) A C append crossed a notify threshold."""
        with self._mutex:
            self._maybe_prealloc()
            self._arm_notify()
        if self.log_bytes > self.compact_at:
            self._threshold_reached()

    def _write(self, frame: bytes) -> None:
        """(Lock held.) The reference write at the offset read from C; C's offset moves past it.

        The new offset is computed here, not read back from the segment object: a
        lock-free reader of `segment` may refresh that object's offset meanwhile.
        """
        start = int(_lib.ws_log_offset(self._log))
        super()._write(frame)
        _lib.ws_log_set_offset(self._log, start + len(frame))

    def _detach(self, seg: ActiveSegment) -> None:
        _lib.ws_log_set_segment(self._log, -1, 0)

    def _drain_syncs(self) -> None:
        """Nothing to do: every caller (roll, close) holds a C pause, which drained them."""

    def _roll(self, expect: Optional[ActiveSegment] = None, seal_later: bool = False) -> Optional[ActiveSegment]:
        _lib.ws_log_pause(self._log)
        try:
            return super()._roll(expect, seal_later)
        finally:
            _lib.ws_log_resume(self._log)

    # ---- commit ----------------------------------------------------------------

    def commit(self, payload: bytes, apply: Callable[[], None], durability: Optional[str] = None) -> int:
        lazy = self._lazy if durability is None else _LAZY.get(durability) if isinstance(durability, str) else None
        if lazy is None or _fp._armed:  # an unknown mode is refused there; failpoints are hit there
            return super().commit(payload, apply, durability)
        with self._mutex:
            if self._closed or self._poison is not None:
                self._check_usable()
            before, r = _last_seq(self._log), 0
            try:
                r = _put(self._log, fmt.REC_COMMIT, payload, len(payload), lazy)
                if r > 0:
                    apply()
            except BaseException as exc:  # apply failed, or an interrupt right after the append
                self._unapplied(r, before, exc)
            if r <= 0 and r < _NO_ROOM and r != _TOO_BIG:
                self._append_failed(r, len(payload))
        return self._committed(r, lazy) if r > 0 else super().commit(payload, apply, durability)

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
        lazy = self._lazy if durability is None else _LAZY.get(durability) if isinstance(durability, str) else None
        if lazy is None or _fp._armed:
            return super().commit_op(op, flags, key, value, apply, arg1, arg2, durability)
        with self._mutex:
            if self._closed or self._poison is not None:
                self._check_usable()
            before, r = _last_seq(self._log), 0
            try:
                r = _put_op(self._log, op | flags << 8, key, len(key), value, len(value), lazy)
                if r > 0:
                    apply(arg1, arg2)
            except BaseException as exc:  # apply failed, or an interrupt right after the append
                self._unapplied(r, before, exc)
            if r <= 0 and r < _NO_ROOM and r != _TOO_BIG:
                self._append_failed(r, fmt.OP_HEADER_SIZE + len(key) + len(value))
        if r <= 0:  # no room (a roll) or too big: the reference path; nothing was written
            return super().commit_op(op, flags, key, value, apply, arg1, arg2, durability)
        if r < _NOTIFY and lazy:  # `_committed`, inlined: this is `db[key] = value`
            return r  # type: ignore[no-any-return]
        return self._committed(r, lazy)

    def bind_fast_put(self, store: object, data: dict[Any, Any]) -> bool:
        """Let `store` (an instance of `fast_put_base()`) do `store[key] = value` in C, updating
        `data`, for as long as this writer's gate is open (in sync mode the slot also waits for
        the fdatasync, as `_committed` does). True if bound."""
        if fast_put_base() is None:
            return False
        acquire, release = self._mutex.acquire, self._mutex.release  # held for the call: C keeps them
        rc = _lib.ws_fastput_bind(
            id(store),
            self._log,
            self._fast_gate,
            id(self),
            id(data),
            id(acquire),
            id(release),
            id(_fp._armed),
            self._lazy,
        )
        return bool(rc == _lib.WS_FASTPUT_OK)

    def _committed(self, r: int, lazy: int) -> int:
        """(Lock not held.) After a C append returned `r` (a seq, maybe flagged): notify, wait."""
        if r >= _NOTIFY:
            r &= _SEQ
            self._notified()
        if not lazy:
            self._await_durable(r)
        return r

    def detach_in_fork_child(self, why: str) -> None:
        self._fast_gate[0] = 0  # the C slot sends every put to Python, which refuses it
        super().detach_in_fork_child(why)

    def _apply_failed(self, seq: int, exc: BaseException) -> NoReturn:
        """(Lock held.) The C slot's dict update failed after its append (fastput.c)."""
        self._logged_not_applied(seq, exc)

    def _unapplied(self, r: int, before: int, exc: BaseException) -> NoReturn:
        """(Lock held.) `exc` was raised between a C append and the end of its apply. If
        the record is in the log (`r` is its seq, or an interrupt came before `r` was set
        but the log's last seq moved on from `before`), the state lags the log: poison."""
        last = int(_last_seq(self._log))
        if r > 0 or last != before:
            self._logged_not_applied(r & _SEQ if r > 0 else last, exc)
        raise exc

    def _append_failed(self, rc: int, payload_size: int) -> NoReturn:
        """(Lock held.) A C append returned an error: nothing was published."""
        if rc == _FAILED:
            self._sync_failed(errno.EIO)
        self._write_failed(_os_error(-rc), fmt.frame_size(payload_size))

    def _sync_failed(self, code: int) -> NoReturn:
        """(Lock held.) The C log holds a failed sync's errno: poison and raise."""
        err = int(_lib.ws_log_error(self._log)) or code
        exc = _os_error(err)
        self._poison_with(exc)
        raise StorePoisonedError(
            f"fdatasync of {self._seg.path} failed: {self._poison}; commits it covered are not"
            " acknowledged and the store refuses writes until it is reopened"
        ) from self._poison

    def _await_durable(self, seq: int) -> None:
        rc = _wait(self._log, seq)
        if rc != 0:
            self._wait_failed(rc)
        if _fp._armed:
            _fp.hit("commit.after_sync")

    def _wait_failed(self, rc: int) -> NoReturn:
        """A C wait returned `rc`: the store was closed, or a sync failed (poison)."""
        with self._mutex:
            if rc == _CLOSED and self._poison is None:
                raise StoreClosedError("the store was closed while a commit waited for its sync")
            self._sync_failed(-rc if rc != _CLOSED else errno.EIO)

    def sync(self) -> None:
        with self._mutex:
            self._check_usable()
            target = self._written_seq
        self._await_durable(target)

    def _flush_loop(self) -> None:
        schedule = FlushSchedule(self._opts.interval_ms / 1000.0, time.monotonic())
        while not self._stop_flusher.wait(schedule.delay(time.monotonic())):
            started = time.monotonic()
            if self._closed or self._poison is not None:
                return
            target = self._written_seq
            if target > self._durable_seq:
                try:
                    self._await_durable(target)
                except (StorePoisonedError, StoreClosedError):
                    return
            schedule.ran(started, time.monotonic())

    # ---- failure and close -----------------------------------------------------

    def inject_faults(self, sync_errno: int = 0, write_errno: int = 0) -> None:
        """Tests: the next C fdatasync reports `sync_errno` (after running), the next C
        pwrite fails with `write_errno` (without writing); 0 for no fault."""
        _lib.ws_log_inject(self._log, sync_errno, write_errno)

    def _poison_with(self, exc: BaseException) -> None:
        self._fast_gate[0] = 0
        super()._poison_with(exc)
        _lib.ws_log_fail(self._log, getattr(exc, "errno", None) or errno.EIO)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._fast_gate[0] = 0  # no C fast put from here on: they take the lock and see it
            _lib.ws_log_pause(self._log)
        try:
            super().close()
        finally:
            _lib.ws_log_fail(self._log, 0)
            _lib.ws_log_resume(self._log)

    def abandon(self) -> None:
        self._fast_gate[0] = 0  # before anything below: fast puts from here on take `commit_op`
        _lib.ws_log_fail(self._log, 0)  # closed: no sync starts from here on
        _lib.ws_log_pause(self._log)  # and the running one, if any, has ended
        try:
            super().abandon()
        finally:
            _lib.ws_log_resume(self._log)


def make_writer(
    fs: OSFileAPI,
    directory: str,
    store_id: bytes,
    segment: ActiveSegment,
    last_seq: int,
    options: WriterOptions,
) -> LogWriter:
    """The C writer where `usable(fs)`, else the pure-Python reference writer."""
    cls = NativeLogWriter if usable(fs) else LogWriter
    return cls(fs, directory, store_id, segment, last_seq, options)
