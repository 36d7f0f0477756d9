"""The durable log behind every store: directory, lock, identity, recovery, writer.

`LogCore.open` either creates a store or recovers one: it replays the log
into the caller's replayer, cuts a torn tail (keeping the bytes in
quarantine/), and leaves a writer positioned after the last valid record.
A state machine (the key-value store, or an application's own) sits on top
and calls `commit(payload, apply, durability)`.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import secrets
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from . import format as fmt
from . import reader, replay, snapshot
from .errors import (
    CorruptionError,
    InvalidOptionError,
    NotAStoreError,
    StoreClosedError,
    StoreForkedError,
    StoreLockedError,
    WalstoreError,
)
from .fileapi import DEFAULT, OSFileAPI
from .nativelog import make_writer
from .options import check_bool
from .writer import ActiveSegment, LogWriter, WriterOptions, create_segment


@dataclass
class Identity:
    """What IDENTITY records: the store id and the codec it was created with."""

    store_id: bytes
    codec: str
    created: str
    kind: str = "kv"
    """What state the log holds: "kv" (walstore.open) or "machine:<Class>" (walstore.open_machine)."""


def read_identity(directory: str) -> Identity:
    """Read and check IDENTITY; raise NotAStoreError, FormatVersionError or CorruptionError."""
    replay.require_store(directory)
    path = os.path.join(directory, fmt.IDENTITY_NAME)
    with open(path, "rb") as f:
        data = f.read()
    try:
        header = fmt.decode_file_header(data)
    except fmt.HeaderError as exc:
        if exc.newer_version is not None:
            from .errors import FormatVersionError

            raise FormatVersionError(f"{path}: {exc.reason}") from None
        raise NotAStoreError(f"{path}: {exc.reason}") from None
    meta: dict[str, Any] = {}

    def take(rtype: int, seq: int, off: int, payload: memoryview) -> None:
        meta.update(json.loads(bytes(payload).decode("utf-8")))

    scan = reader.scan_records(data, fmt.FILE_HEADER_SIZE, 0, reader.IDENTITY_TYPES, take)
    if scan.damage is not None or not meta:
        from .errors import CorruptionError

        raise CorruptionError(path, scan.end, None, scan.damage or "bad-payload", "IDENTITY is damaged")
    return Identity(
        header.store_id,
        str(meta.get("codec", "json")),
        str(meta.get("created", "")),
        str(meta.get("kind", "kv")),
    )


def write_identity(fs: OSFileAPI, directory: str, identity: Identity) -> None:
    """Write IDENTITY by temp file, fsync, rename and directory fsync."""
    meta = json.dumps({"codec": identity.codec, "created": identity.created, "kind": identity.kind}).encode()
    data = fmt.FileHeader(fmt.KIND_IDENTITY, identity.store_id).encode() + fmt.encode_frame(fmt.REC_META, 0, 0, meta)
    final = os.path.join(directory, fmt.IDENTITY_NAME)
    tmp = final + fmt.TMP_SUFFIX
    fd = fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        fs.pwrite(fd, data, 0)
        fs.fsync(fd)
    finally:
        fs.close(fd)
    fs.rename(tmp, final)
    fs.fsync_dir(directory)


def _make_dirs(fs: OSFileAPI, path: str) -> None:
    """mkdir -p, durably: each new directory's parent is fsynced."""
    parent = os.path.dirname(path)
    if parent and parent != path and not os.path.isdir(parent):
        _make_dirs(fs, parent)
    fs.mkdir(path)
    fs.fsync_dir(parent or ".")


class StoreLock:
    """The one-writer-process lock: flock(LOCK_EX | LOCK_NB) on LOCK, holding our pid."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, fmt.LOCK_NAME)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_pid(directory)
            os.close(self._fd)
            raise StoreLockedError(directory, holder) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def holder_pid(directory: str) -> Optional[int]:
    """The pid written in LOCK by its last holder, if readable."""
    try:
        with open(os.path.join(directory, fmt.LOCK_NAME)) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def is_locked(directory: str) -> bool:
    """True if some process holds the store's writer lock."""
    path = os.path.join(directory, fmt.LOCK_NAME)
    if not os.path.exists(path):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@dataclass
class RecoveryInfo:
    """What `open()` found and did."""

    backend: str
    snapshot_seq: int
    """The base snapshot replayed (0: none)."""
    rejected_snapshots: list[str]
    """Newer snapshots that failed their checks and were moved to quarantine/."""
    last_seq: int
    segments: int
    closed_cleanly: bool
    torn_tail: Optional[replay.TornTail]
    quarantined: Optional[str]
    created: bool


class LogCore:
    """An open store directory: the lock, the identity, the recovered log and its writer."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        replayer_factory: Callable[[Identity], replay.RangeReplayer],
        *,
        codec_name: str,
        kind: str = "kv",
        options: WriterOptions,
        create: bool = True,
        fs: Optional[OSFileAPI] = None,
    ) -> None:
        check_bool("create", create)  # WriterOptions checked the log's options
        if fs is not None and not isinstance(fs, OSFileAPI):
            raise InvalidOptionError(f"fs must be a walstore.fileapi.OSFileAPI, not {type(fs).__name__}")
        self.fs = fs or DEFAULT
        self.path = os.fspath(path)
        self.options = options
        created = False
        if not os.path.isdir(self.path):
            if not create:
                raise NotAStoreError(f"{self.path!r} does not exist")
            _make_dirs(self.fs, os.path.abspath(self.path))
        self.lock = StoreLock(self.path)
        try:
            if not os.path.exists(os.path.join(self.path, fmt.IDENTITY_NAME)):
                self._refuse_foreign_directory()
                ident = Identity(
                    secrets.token_bytes(16),
                    codec_name,
                    _dt.datetime.now(_dt.timezone.utc).isoformat(),
                    kind,
                )
                write_identity(self.fs, self.path, ident)
                created = True
            self.identity = read_identity(self.path)
            if self.identity.kind.partition(":")[0] != kind.partition(":")[0]:
                opener = "walstore.open" if self.identity.kind == "kv" else "walstore.open_machine"
                raise WalstoreError(
                    f"store {self.path!r} holds {self.identity.kind!r} state, not {kind!r}; open it with {opener}"
                )
            if self.identity.codec != codec_name:
                raise WalstoreError(
                    f"store {self.path!r} was created with codec {self.identity.codec!r},"
                    f" not {codec_name!r}; open it with codec={self.identity.codec!r}"
                )
            self.replayer = replayer_factory(self.identity)
            self._buffers: list[reader.Buffer] = []
            self.snapshot_seq, rejected = self._load_snapshot()
            try:
                state = replay.inspect_log(
                    self.path, self.identity.store_id, self.snapshot_seq, self.replayer, self._buffers, scan_ahead=True
                )
            except CorruptionError as exc:
                if rejected:
                    path, why = rejected[0]
                    raise CorruptionError(
                        path,
                        why.offset,
                        why.seq,
                        why.reason,
                        f"{why}; the log it covered is gone, so the state cannot be rebuilt without it (then: {exc})",
                    ) from exc
                raise
            self.rejected_snapshots = [p for p, _ in rejected]
            self._remove_leftovers()  # only once the log is known good: a refused open changes nothing
            # A process that died may have left directory entries nobody fsynced (a segment
            # renamed into place, quarantine/): make them, and the removals above, durable
            # before anything is acknowledged on top of them.
            self.fs.fsync_dir(self.path)
            for path in self.rejected_snapshots:
                # The older snapshot and the complete log rebuilt the state without it.
                replay.quarantine_file(self.fs, self.path, path, "snapshot failed its checks; not needed")
            quarantined = None
            if state.torn is not None:
                quarantined = replay.cut_torn_tail(self.fs, self.path, state.torn)
            self.recovery = RecoveryInfo(
                replay.backend(),
                self.snapshot_seq,
                self.rejected_snapshots,
                state.last_seq,
                len(state.segments),
                state.closed_cleanly,
                state.torn,
                quarantined,
                created,
            )
            self.writer = self._start_writer(state)
        except BaseException:
            self.lock.release()
            raise
        self._closed = False
        self._forked: Optional[str] = None
        self._owner_pid = os.getpid()
        _open_cores.add(self)

    def _detach_in_fork_child(self) -> None:
        """(In a fork() child, the only thread.) Closed from now on, for reads too (the
        parent's state moves on), with StoreForkedError; close() touches neither the parent's
        files nor its writer lock: a CLOSE record or a cut segment would break the parent's
        log, and unlocking the shared lock file would unlock it for the parent too."""
        if self._closed:
            return
        self._forked = (
            f"store {self.path!r} was opened by process {self._owner_pid}; this process"
            f" ({os.getpid()}) is a fork() child of it and cannot use it (the log and the"
            " writer lock are the parent's, and the state it inherited goes stale); open the"
            " store in the child once the parent has closed it"
        )
        self._closed = True
        self.writer.detach_in_fork_child(self._forked)

    def _load_snapshot(self) -> tuple[int, list[tuple[str, CorruptionError]]]:
        """Feed the newest valid snapshot to the replayer; return its seq (0: none) and the rejected."""
        found, rejected = snapshot.newest_valid_snapshot(self.path, self.identity.store_id)
        if found is None:
            return 0, rejected
        seq, _path, data, scan = found
        self.replayer.apply_range(data, fmt.FILE_HEADER_SIZE, scan.end)
        self._buffers.append(data)
        return seq, rejected

    def release_buffers(self) -> None:
        """Drop the mapped segment files recovery kept for the replayer."""
        for buf in self._buffers:
            close = getattr(buf, "close", None)
            if close is not None:
                close()
        self._buffers = []

    def _refuse_foreign_directory(self) -> None:
        """A directory with files but no IDENTITY is not ours to take over."""
        own = {fmt.LOCK_NAME}
        others = [n for n in os.listdir(self.path) if n not in own and not n.endswith(fmt.TMP_SUFFIX)]
        if others:
            raise NotAStoreError(
                f"{self.path!r} is not empty and is not a walstore store (no {fmt.IDENTITY_NAME});"
                f" found {sorted(others)[:3]}"
            )

    def _remove_leftovers(self) -> None:
        for name in os.listdir(self.path):
            if name.endswith(fmt.TMP_SUFFIX):
                self.fs.unlink(os.path.join(self.path, name))

    def _start_writer(self, state: replay.LogState) -> LogWriter:
        opts = self.options
        if state.segments:
            last = state.segments[-1]
            fd = self.fs.open(last.path, os.O_RDWR)
            # Records a crashed process left in the page cache become durable here,
            # so every recovered record is covered by the watermark of what follows.
            self.fs.fdatasync(fd)
            seg = ActiveSegment(last.path, fd, last.header.first_seq, last.scan.end, os.fstat(fd).st_size)
        else:
            seg = create_segment(
                self.fs, self.path, self.identity.store_id, state.last_seq + 1, state.last_seq, 0, opts
            )
        return make_writer(self.fs, self.path, self.identity.store_id, seg, state.last_seq, opts)

    def check_open(self) -> None:
        if self._closed:
            if self._forked is not None:
                raise StoreForkedError(self._forked)
            raise StoreClosedError(f"store {self.path!r} is closed")

    def wait_durable(self, seq: int) -> None:
        """Block until commit `seq` is on stable storage, as a `sync` commit would.

        For a state machine that calls `writer.commit(..., durability="none")`
        under a lock of its own and waits outside it: waiters share fdatasyncs
        (group commit). Raises StorePoisonedError if a sync failed before
        covering `seq`.
        """
        self.writer.wait_durable(seq)

    def close(self) -> None:
        """Write the CLOSE record, sync, release the lock. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _open_cores.discard(self)
        try:
            self.writer.close()
        finally:
            self.release_buffers()
            self.lock.release()

    def abandon(self) -> None:
        """Release everything without writing (after a poisoning error, or in tests)."""
        if self._closed:
            return
        self._closed = True
        _open_cores.discard(self)
        self.writer.abandon()
        self.release_buffers()
        self.lock.release()


_open_cores: weakref.WeakSet[LogCore] = weakref.WeakSet()
"""The stores open in this process, for `_after_fork_in_child`."""


def _after_fork_in_child() -> None:
    for core in list(_open_cores):
        core._detach_in_fork_child()
    _open_cores.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
