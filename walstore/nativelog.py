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
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any, NoReturn, Optional

from . import failpoints as _fp
from . import format as fmt
from .errors import StoreClosedError, StorePoisonedError
from .fileapi import OSFileAPI
from .writer import INTERVAL, NONE, SYNC, ActiveSegment, LogWriter, WriterOptions, mappable

try:
    from ._walstore_native import ffi as _ffi
    from ._walstore_native import lib as _lib

    BUILT = hasattr(_lib, "ws_log_append_op")
except ImportError:  # no compiler at install time
    _ffi = _lib = None
    BUILT = False

if BUILT:
    _append = _lib.ws_log_append
    _append_op = _lib.ws_log_append_op
    _wait = _lib.ws_log_wait
    _NO_ROOM = _lib.WS_LOG_NO_ROOM
    _TOO_BIG = _lib.WS_LOG_TOO_BIG
    _CLOSED = _lib.WS_LOG_CLOSED
    _FAILED = _lib.WS_LOG_FAILED


def usable(fs: OSFileAPI) -> bool:
    """The C writer can serve a store on `fs`: built, in use (see `walstore.backend()`), plain OS files."""
    from . import native

    return BUILT and native.AVAILABLE and type(fs) is OSFileAPI and os.name == "posix"


_LAZY = {SYNC: 0, INTERVAL: 1, NONE: 1}
"""Durability mode -> the C append's `lazy` flag (copy into the map, no wait)."""


def _os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


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
        self._py_fsyncs = 0
        self._lazy = 0 if options.durability == SYNC else 1
        _lib.ws_log_set_limit(self._log, options.segment_size)
        super().__init__(fs, directory, store_id, segment, last_seq, options)

    # ---- state kept in C -------------------------------------------------------

    @property
    def _written_seq(self) -> int:
        return int(_lib.ws_log_written(self._log))

    @_written_seq.setter
    def _written_seq(self, seq: int) -> None:
        _lib.ws_log_publish(self._log, seq)

    @property
    def _durable_seq(self) -> int:
        return int(_lib.ws_log_durable(self._log))

    @_durable_seq.setter
    def _durable_seq(self, seq: int) -> None:
        _lib.ws_log_mark_durable(self._log, seq)

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

    def _detach(self, seg: ActiveSegment) -> None:
        _lib.ws_log_set_segment(self._log, -1, 0)

    def _drain_syncs(self) -> None:
        """Nothing to do: every caller (roll, close) holds a C pause, which drained them."""

    def _roll(self, expect: Optional[ActiveSegment] = None) -> None:
        _lib.ws_log_pause(self._log)
        try:
            super()._roll(expect)
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
            seg = self._seg
            seq = self._last_seq + 1
            r = _append(self._log, seq, seg.offset, fmt.REC_COMMIT, payload, len(payload), lazy)
            if r > 0:
                self._appended(seg, seq, r)
                try:
                    apply()
                except BaseException as exc:
                    self._apply_failed(seq, exc)
            elif r < _NO_ROOM and r != _TOO_BIG:
                self._append_failed(r, len(payload))
        if r <= 0:  # no room (roll) or too big: the reference path, nothing was written
            return super().commit(payload, apply, durability)
        if not lazy:
            self._await_durable(seq)
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
        lazy = self._lazy if durability is None else _LAZY.get(durability) if isinstance(durability, str) else None
        if lazy is None or _fp._armed:
            return super().commit_op(op, flags, key, value, apply, arg1, arg2, durability)
        with self._mutex:
            if self._closed or self._poison is not None:
                self._check_usable()
            seg = self._seg
            seq = self._last_seq + 1
            r = _append_op(self._log, seq, seg.offset, op | flags << 8, key, len(key), value, len(value), lazy)
            if r > 0:  # `_appended`, inlined: this is `db[key] = value`
                seg.offset += r
                self._last_seq = seq
                self.log_bytes += r
                if self._prealloc_thread is None and seg.offset * 2 >= self._seg_size:
                    self._maybe_prealloc()
                try:
                    apply(arg1, arg2)
                except BaseException as exc:
                    self._apply_failed(seq, exc)
            elif r < _NO_ROOM and r != _TOO_BIG:
                self._append_failed(r, fmt.OP_HEADER_SIZE + len(key) + len(value))
        if r <= 0:
            return super().commit_op(op, flags, key, value, apply, arg1, arg2, durability)
        if not lazy:
            self._await_durable(seq)
        return seq

    def _appended(self, seg: ActiveSegment, seq: int, size: int) -> None:
        seg.offset += size
        self._last_seq = seq
        self.log_bytes += size
        if self._prealloc_thread is None and seg.offset * 2 >= self._seg_size:
            self._maybe_prealloc()

    def _apply_failed(self, seq: int, exc: BaseException) -> NoReturn:
        self._poison_with(exc)
        raise StorePoisonedError(
            f"applying commit {seq} failed after it was logged: {exc!r}; reopen the store"
        ) from exc

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
        interval = self._opts.interval_ms / 1000.0
        while not self._stop_flusher.wait(interval):
            if self._closed or self._poison is not None:
                return
            target = self._written_seq
            if target > self._durable_seq:
                try:
                    self._await_durable(target)
                except (StorePoisonedError, StoreClosedError):
                    return

    # ---- failure and close -----------------------------------------------------

    def inject_faults(self, sync_errno: int = 0, write_errno: int = 0) -> None:
        """Tests: the next C fdatasync reports `sync_errno` (after running), the next C
        pwrite fails with `write_errno` (without writing); 0 for no fault."""
        _lib.ws_log_inject(self._log, sync_errno, write_errno)

    def _poison_with(self, exc: BaseException) -> None:
        super()._poison_with(exc)
        _lib.ws_log_fail(self._log, getattr(exc, "errno", None) or errno.EIO)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            _lib.ws_log_pause(self._log)
        try:
            super().close()
        finally:
            _lib.ws_log_fail(self._log, 0)
            _lib.ws_log_resume(self._log)

    def abandon(self) -> None:
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
