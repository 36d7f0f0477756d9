"""Helpers for tests that build stores and damage their files. Not a test module."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import walstore
from walstore import format as fmt
from walstore import reader
from walstore.fileapi import OSFileAPI


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("seg-*.wal"))


def crash(db: walstore.Store) -> None:
    """Drop the store like a killed process would: no CLOSE record, nothing more written."""
    db._core.abandon()


def record_offsets(seg: Path) -> list[tuple[int, int, int]]:
    """(offset, type, seq) of every valid record in a segment."""
    data = seg.read_bytes()
    first = fmt.decode_file_header(data[:64]).first_seq
    out: list[tuple[int, int, int]] = []

    def note(rtype: int, seq: int, off: int, payload: memoryview) -> None:
        out.append((off, rtype, seq))

    reader.scan_records(data, 64, first, reader.SEGMENT_TYPES, note)
    return out


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def build(path: Path, n: int, *, close: bool = True, **kw: Any) -> dict[str, int]:
    """A store with keys k0..k{n-1} = 0..n-1, one commit each; closed cleanly or crashed."""
    kw.setdefault("segment_size", 1 << 16)
    db = walstore.open(path, **kw)
    for i in range(n):
        db[f"k{i}"] = i
    if close:
        db.close()
    else:
        crash(db)
    return {f"k{i}": i for i in range(n)}


def quarantine_files(path: Path) -> list[Path]:
    q = path / fmt.QUARANTINE_DIR
    return sorted(q.iterdir()) if q.exists() else []


class FailingFileAPI(OSFileAPI):
    """Fails chosen operations: `fail[op] = (after_n_calls, errno)` raises on call number n+1."""

    def __init__(self) -> None:
        self.fail: dict[str, tuple[int, int]] = {}
        self.calls: dict[str, int] = {}

    def _maybe_fail(self, op: str) -> None:
        n = self.calls.get(op, 0) + 1
        self.calls[op] = n
        rule = self.fail.get(op)
        if rule is not None and n > rule[0]:
            raise OSError(rule[1], os.strerror(rule[1]) + f" (injected on {op} #{n})")

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        self._maybe_fail("pwrite")
        return super().pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        self._maybe_fail("fdatasync")
        super().fdatasync(fd)

    def fsync(self, fd: int) -> None:
        self._maybe_fail("fsync")
        super().fsync(fd)


EIO = errno.EIO
ENOSPC = errno.ENOSPC


def next_segment_then_compaction(db: walstore.Store, path: Path, i: int) -> int:
    """With the active segment past half (puts so far: `i`), check the next segment is being
    prepared and gets ready, then put until an automatic compaction has run; return the
    number of puts. For the notify thresholds of the C appends and of the C slot."""
    thread = db._writer._prealloc_thread
    assert thread is not None or db._writer._prealloc_ready  # started at half the segment
    if thread is not None:
        thread.join()
    assert (path / fmt.PREALLOC_READY_NAME).exists()
    while db.stats()["compactions"] == 0 and i < 20000:
        db[f"k{i % 50}"] = b"v" * 100
        i += 1
        t = db._compact_thread
        if t is not None:
            t.join()
    assert db.stats()["compactions"] >= 1
    assert db.stats()["segment_rolls"] >= 3
    return i
