"""Base snapshots: the whole state as of one sequence number, written atomically.

Guarantees:

* A snapshot becomes part of the store only whole: it is written to a
  temporary file, fsynced, renamed into place, and the directory is fsynced.
  Only after that are the segments it covers removed.
* A snapshot is valid only if every record's CRC checks and its final
  SNAPSHOT_END record counts match; anything else is invalid as a whole.
* A failed write (ENOSPC, EIO) removes the temporary file and changes
  nothing else.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

from . import format as fmt
from . import reader, replay
from .errors import CorruptionError, DiskFullError, SnapshotError
from .fileapi import OSFileAPI

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


SYNC_EVERY = 16 << 20
"""Write-behind: an fdatasync every this many bytes, so the final fsync has little left to
flush and a concurrent commit's fdatasync never waits behind a whole snapshot."""


def write_snapshot(
    fs: OSFileAPI,
    directory: str,
    store_id: bytes,
    seq: int,
    payloads: Iterable[bytes],
    ops: Optional[int] = None,
) -> SnapshotInfo:
    """Write `snap-<seq>.snap` atomically from SNAPSHOT_DATA payloads.

    Order: temp file, every record (synced every SYNC_EVERY bytes), fsync,
    rename, directory fsync. On any failure the temp file is removed and
    SnapshotError (DiskFullError for a full disk) is raised; the store is as
    it was. `ops`, when the caller knows it, saves counting the operations.
    """
    final = os.path.join(directory, fmt.snapshot_name(seq))
    tmp = final + fmt.TMP_SUFFIX
    fd = -1
    try:
        fd = fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        offset = fs.pwrite(fd, fmt.FileHeader(fmt.KIND_SNAPSHOT, store_id, seq).encode(), 0)
        records = counted = 0
        batch: list[bytes] = []
        batch_size = 0
        synced_at = 0
        behind = _WriteBehind(fs, fd)
        try:
            for payload in payloads:
                if ops is None:
                    counted += _count_ops(payload)
                frame = fmt.encode_frame(fmt.REC_SNAPSHOT_DATA, seq, seq, payload)
                records += 1
                batch.append(frame)
                batch_size += len(frame)
                if batch_size >= 4 * CHUNK_BYTES:
                    offset += fs.pwrite(fd, b"".join(batch), offset)
                    batch, batch_size = [], 0
                    if offset - synced_at >= SYNC_EVERY and behind.request():
                        synced_at = offset
        finally:
            behind.finish()
        if ops is None:
            ops = counted
        batch.append(
            fmt.encode_frame(fmt.REC_SNAPSHOT_END, seq, seq, fmt.SNAPSHOT_END_PAYLOAD.pack(records, ops))
        )
        offset += fs.pwrite(fd, b"".join(batch), offset)
        fs.fsync(fd)
        fs.close(fd)
        fd = -1
        fs.rename(tmp, final)
        fs.fsync_dir(directory)
    except OSError as exc:
        if fd >= 0:
            try:
                fs.close(fd)
            except OSError:
                pass
        try:
            fs.unlink(tmp)
        except OSError:
            pass
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(exc.errno, f"disk full writing snapshot {final}; nothing changed") from exc
        raise SnapshotError(f"writing snapshot {final} failed: {exc}; nothing changed") from exc
    return SnapshotInfo(final, seq, offset, records, ops)


class _WriteBehind:
    """fdatasyncs of a file being written, in a background thread, one at a time.

    They only spread the flushing out (the final fsync is what makes the file
    durable), so a request while one is running is declined and an error is
    kept for `finish`, which raises it.
    """

    def __init__(self, fs: OSFileAPI, fd: int) -> None:
        self._fs = fs
        self._fd = fd
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[OSError] = None

    def _run(self) -> None:
        try:
            self._fs.fdatasync(self._fd)
        except OSError as exc:
            self._error = exc

    def request(self) -> bool:
        """Start an fdatasync unless one is running; True if started."""
        if self._thread is not None and self._thread.is_alive():
            return False
        if self._error is not None:
            raise self._error
        self._thread = threading.Thread(target=self._run, name="walstore-snapshot-sync", daemon=True)
        self._thread.start()
        return True

    def finish(self) -> None:
        """Wait for the running fdatasync; raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error


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
            path, end_off, header.first_seq, "bad-payload",
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


def remove_covered(fs: OSFileAPI, directory: str, seq: int, keep: int = 1) -> list[str]:
    """Remove snapshots older than the newest `keep` at or below `seq`, and the segments
    wholly covered by the oldest snapshot kept. Returns the names removed.

    Call only once snapshot `seq` is durable (renamed and directory fsynced).
    """
    removed: list[str] = []
    snaps = [(s, p) for s, p in list_snapshots(directory) if s <= seq]
    if not snaps:
        return removed
    kept = snaps[: max(1, keep)]
    oldest_kept = kept[-1][0]
    for _seq, path in snaps[len(kept):]:
        fs.unlink(path)
        removed.append(os.path.basename(path))
    segs = replay.list_segments(directory)
    for (_first, path), (next_first, _next) in zip(segs, segs[1:]):
        if next_first <= oldest_kept + 1:
            fs.unlink(path)
            removed.append(os.path.basename(path))
    if removed:
        fs.fsync_dir(directory)
    return removed
