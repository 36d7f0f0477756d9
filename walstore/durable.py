"""What every store shares: the log it sits on, compaction, closing.

The key-value store (`walstore.open`) and an application's state machine
(`walstore.open_machine`) are two state machines on one mechanism: a
`LogCore` (directory, lock, identity, recovery, the group-committing
writer) and the compaction scheduling here. Each subclass says only how its
state is replayed, changed and snapshotted (`_compact_locked`).
"""

from __future__ import annotations

import os
import threading
from types import TracebackType
from typing import Any, Optional, TypeVar

from . import format as fmt
from . import snapshot
from .core import LogCore, RecoveryInfo
from .options import check_compaction
from .writer import LogWriter

_S = TypeVar("_S", bound="DurableStore")


class DurableStore:
    """A state kept durable by a `LogCore`; subclasses implement `_compact_locked`."""

    _core: LogCore
    _writer: LogWriter

    def _init_compaction(
        self, auto_compact: bool, compact_min_bytes: int, compact_ratio: float, keep_snapshots: int
    ) -> None:
        check_compaction(auto_compact, compact_min_bytes, compact_ratio, keep_snapshots)
        self._auto_compact = auto_compact
        self._compact_min_bytes = compact_min_bytes
        self._compact_ratio = compact_ratio
        self._keep_snapshots = keep_snapshots
        self._compact_lock = threading.Lock()
        self._compact_thread: Optional[threading.Thread] = None
        self._compact_at_bytes = float("inf")
        self._snapshot_seq = 0
        self._snapshot_size = 0
        self.compactions = 0
        self.last_compaction_error: Optional[BaseException] = None

    def _opened(self, core: LogCore) -> None:
        """After recovery: take the writer, and finish what an interrupted compaction left."""
        self._core = core
        self._writer = core.writer
        self._writer.on_threshold = self._maybe_auto_compact
        self._snapshot_seq = core.snapshot_seq
        if self._snapshot_seq:
            self._snapshot_size = os.path.getsize(os.path.join(core.path, fmt.snapshot_name(self._snapshot_seq)))
            snapshot.remove_covered(core.fs, core.path, self._snapshot_seq, self._keep_snapshots)
        self._compact_at = self._compact_threshold()

    @property
    def _compact_at(self) -> float:
        """Log bytes since the last snapshot past which a commit starts a compaction."""
        return self._compact_at_bytes

    @_compact_at.setter
    def _compact_at(self, log_bytes: float) -> None:
        self._compact_at_bytes = log_bytes
        writer = getattr(self, "_writer", None)
        if writer is not None:
            writer.set_compact_at(log_bytes)

    # ---- identity and state ----------------------------------------------------

    @property
    def path(self) -> str:
        return self._core.path

    @property
    def recovery(self) -> RecoveryInfo:
        """What open() found: replayer, snapshot used, torn tail cut (and where its bytes went)."""
        return self._core.recovery

    @property
    def closed(self) -> bool:
        return self._core._closed

    @property
    def last_seq(self) -> int:
        """Sequence number of the last commit."""
        return self._writer.last_seq

    def _log_stats(self) -> dict[str, Any]:
        """Counters of the log: commits and fsyncs since open (their ratio is the group-commit batch)."""
        w = self._writer
        return {
            "commits": w.commits,
            "fsyncs": w.fsyncs,
            "segment_rolls": w.rolls,
            "last_seq": w.last_seq,
            "durable_seq": w.durable_seq,
            "durability": self._core.options.durability,
            "backend": self._core.recovery.backend,
            "snapshot_seq": self._snapshot_seq,
            "snapshot_bytes": self._snapshot_size,
            "log_bytes_since_snapshot": w.log_bytes,
            "compactions": self.compactions,
            "last_compaction_error": repr(self.last_compaction_error) if self.last_compaction_error else None,
        }

    # ---- compaction ------------------------------------------------------------

    def _compact_threshold(self) -> float:
        if not self._auto_compact:
            return float("inf")
        return max(self._compact_min_bytes, self._compact_ratio * self._snapshot_size)

    def _maybe_auto_compact(self) -> None:
        """Start a background compaction unless one is running (the automatic policy)."""
        if self._core._closed or self._compact_lock.locked():
            return  # the running compaction re-arms the threshold when it ends
        self._compact_at = float("inf")
        self._start_compaction(wait=False, options={})
        if self._compact_thread is None or not self._compact_thread.is_alive():
            self._compact_at = self._compact_threshold()

    def _start_compaction(self, wait: bool, options: dict[str, Any]) -> Optional[snapshot.SnapshotInfo]:
        """Run `_compact_locked(**options)` now (wait) or in a background thread (returns None).

        One compaction at a time; a background failure is kept in
        `last_compaction_error` and never raised into a committer.
        """
        self._core.check_open()
        if not self._compact_lock.acquire(blocking=wait):
            return None
        if wait:
            try:
                return self._compacted(options)
            finally:
                self._compact_lock.release()

        def run() -> None:
            try:
                self._compacted(options)
            except BaseException as exc:
                self.last_compaction_error = exc
            finally:
                self._compact_lock.release()

        t = threading.Thread(target=run, name="walstore-compact", daemon=True)
        self._compact_thread = t
        t.start()
        return None

    def _compacted(self, options: dict[str, Any]) -> Optional[snapshot.SnapshotInfo]:
        try:
            info = self._compact_locked(**options)
            if info is not None:
                self._snapshot_seq = info.seq
                self._snapshot_size = info.size
                self.compactions += 1
                self.last_compaction_error = None
        finally:
            self._writer.finish_seal(())  # a failed compaction's sealed segment is cut back now
            self._compact_at = self._compact_threshold()
        # Not after a failure: it may be a full disk, and 64 MiB of zeros can wait until
        # the new segment is half full, as they would have before.
        self._writer.prepare_next_segment()
        return info

    def _compact_locked(self, **options: Any) -> Optional[snapshot.SnapshotInfo]:
        """Write a snapshot at a sequence number and drop what it covers (the compaction lock held)."""
        raise NotImplementedError

    def sync(self) -> None:
        """Make every commit so far durable (what `interval` and `none` modes hold back)."""
        self._core.check_open()
        self._writer.sync()

    # ---- close -----------------------------------------------------------------

    def close(self) -> None:
        """Wait for a running compaction, sync, mark the log cleanly closed, release the lock.

        Idempotent.
        """
        t = self._compact_thread
        if t is not None:
            t.join()
        self._core.close()

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()
