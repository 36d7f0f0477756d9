"""Recovery: read a store's segments, judge damage by the watermark rule, replay.

`inspect_log` reads and judges without changing anything (the CLI's view).
`cut_torn_tail` is the only repair `open()` makes: it keeps the cut bytes in
`quarantine/` first. Everything else that is wrong raises CorruptionError,
naming the file, offset and sequence number, with nothing on disk changed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import mmap
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Optional, Protocol

from . import format as fmt
from . import native as _native
from . import reader
from .errors import CorruptionError, FormatVersionError, NotAStoreError
from .failpoints import hit
from .fileapi import OSFileAPI

backend = _native.backend
"""Which replayer this process uses: "c" or "python"."""


def scan_records(buf: reader.Buffer, start: int, first_seq: int, type_mask: int) -> reader.ScanResult:
    """The C scanner when in use (walstore.native.AVAILABLE), else the Python reference; same verdicts."""
    if _native.AVAILABLE:
        return _native.scan_records(buf, start, first_seq, type_mask)
    return reader.scan_records(buf, start, first_seq, type_mask)


class RangeReplayer(Protocol):
    """Applies the records in [start, end) of an already-scanned buffer to a state."""

    def apply_range(self, buf: reader.Buffer, start: int, end: int) -> None: ...


@dataclass
class SegmentView:
    """One segment as recovery sees it."""

    path: str
    header: fmt.FileHeader
    size: int
    scan: reader.ScanResult

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass
class TornTail:
    """Bytes past the durable point that recovery cuts off (and keeps in quarantine)."""

    path: str
    offset: int
    end: int
    seq: int
    reason: str
    detail: str

    @property
    def length(self) -> int:
        return self.end - self.offset


@dataclass
class LogState:
    """The verdict on a store's log."""

    segments: list[SegmentView] = field(default_factory=list)
    torn: Optional[TornTail] = None
    last_seq: int = 0
    closed_cleanly: bool = False


def read_file(path: str) -> bytes | mmap.mmap:
    """The whole file, mapped read-only (or read, when it is empty)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def list_segments(directory: str) -> list[tuple[int, str]]:
    """(first_seq, path) of every segment file, in sequence order."""
    found = []
    for name in os.listdir(directory):
        m = fmt.SEGMENT_NAME.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(directory, name)))
    found.sort()
    return found


def check_header(path: str, data: reader.Buffer, kind: int, store_id: bytes) -> fmt.FileHeader:
    """Decode a file header and check its kind and store id; raise a named error."""
    try:
        header = fmt.decode_file_header(memoryview(data)[: fmt.FILE_HEADER_SIZE])
    except fmt.HeaderError as exc:
        if exc.newer_version is not None:
            raise FormatVersionError(f"{path}: {exc.reason}") from None
        raise CorruptionError(path, 0, None, "bad-header", exc.reason) from None
    if header.kind != kind:
        raise CorruptionError(path, 0, None, "bad-header", f"file kind {header.kind}, expected {kind}")
    if header.store_id != store_id:
        raise CorruptionError(
            path,
            0,
            None,
            "foreign-store",
            f"belongs to store {header.store_id.hex()}, this store is {store_id.hex()}",
        )
    return header


def _load_segment(path: str, store_id: bytes) -> tuple[reader.Buffer, fmt.FileHeader, reader.ScanResult]:
    """A segment mapped, its header checked and its records scanned: read-only, so it may run
    in another thread ahead of the segment being applied."""
    data = read_file(path)
    header = check_header(path, data, fmt.KIND_SEGMENT, store_id)
    return data, header, scan_records(data, fmt.FILE_HEADER_SIZE, header.first_seq, reader.SEGMENT_TYPES)


def inspect_log(
    directory: str,
    store_id: bytes,
    after_seq: int = 0,
    replayer: Optional[RangeReplayer] = None,
    keep: Optional[list[reader.Buffer]] = None,
    until_seq: Optional[int] = None,
    scan_ahead: bool = False,
) -> LogState:
    """Read every segment holding records after `after_seq`, judge damage, optionally replay.

    Raises CorruptionError for damage the watermark rule says was synced, for
    a broken segment chain, and for foreign or damaged headers. A torn tail is
    reported in the result, not cut. `keep` receives the mapped buffers the
    replayer may still point into.

    With `scan_ahead` (and the C scanner, and a replayer), the next segment is mapped and
    scanned in a helper thread while this one is applied (both in C, without the GIL): the
    same checks in the same order, the same result and the same exceptions, on two cores.
    """
    state = LogState(last_seq=after_seq)
    segs = list_segments(directory)
    if until_seq is not None:  # compaction: only the sealed segments up to the snapshot point
        segs = [(first, path) for first, path in segs if first <= until_seq]
    # Skip segments wholly covered by the base snapshot: those starting at or before
    # `after_seq` whose successor also starts at or before after_seq + 1.
    start_index = 0
    for i, (first, _path) in enumerate(segs):
        if first <= after_seq + 1:
            start_index = i
    segs = segs[start_index:]
    max_durable = 0
    prev: Optional[SegmentView] = None
    ahead = scan_ahead and replayer is not None and _native.AVAILABLE and len(segs) > 1
    pool = ThreadPoolExecutor(1, thread_name_prefix="walstore-scan") if ahead else None
    loading: Optional[Future[tuple[reader.Buffer, fmt.FileHeader, reader.ScanResult]]] = None
    try:
        for index, (name_seq, path) in enumerate(segs):
            if loading is not None:
                data, header, scan = loading.result()
                loading = None
            else:
                data, header, scan = _load_segment(path, store_id)
            if pool is not None and index + 1 < len(segs):
                loading = pool.submit(_load_segment, segs[index + 1][1], store_id)
            _check_chain(path, name_seq, header, prev, after_seq)
            max_durable = max(max_durable, scan.max_durable, scan.resync_max_durable)
            torn = _check_damage(path, scan, index == len(segs) - 1, max_durable)
            if torn is not None:
                state.torn = torn
            if replayer is not None:
                skip_to = fmt.FILE_HEADER_SIZE
                if header.first_seq <= after_seq:
                    skip_to = _offset_after(data, fmt.FILE_HEADER_SIZE, scan.end, after_seq)
                replayer.apply_range(data, skip_to, scan.end)
            prev = SegmentView(path, header, len(data), scan)
            if keep is not None:
                keep.append(data)
            elif isinstance(data, mmap.mmap) and replayer is None:
                data.close()
            state.segments.append(prev)
            state.last_seq = max(state.last_seq, scan.last_seq)
            state.closed_cleanly = scan.closed and scan.damage is None
    finally:
        if loading is not None:  # a segment before it raised: the one loaded ahead goes unused
            with contextlib.suppress(Exception):  # its own error comes second to the one raised
                unused = loading.result()[0]
                if isinstance(unused, mmap.mmap):
                    unused.close()
        if pool is not None:
            pool.shutdown()
    return state


def _check_chain(path: str, name_seq: int, header: fmt.FileHeader, prev: Optional[SegmentView], after_seq: int) -> None:
    """The segment's header against its name and its predecessor (the chain)."""
    if header.first_seq != name_seq:
        raise CorruptionError(path, 0, None, "bad-header", f"header says first sequence number {header.first_seq}")
    expected_first = (prev.scan.last_seq + 1) if prev is not None else None
    if prev is not None:
        if header.first_seq != expected_first or header.prev_seq != prev.scan.last_seq:
            raise CorruptionError(
                path,
                0,
                expected_first,
                "missing-segment",
                f"starts at {header.first_seq} (predecessor recorded {header.prev_seq}),"
                f" but {prev.name} ends at {prev.scan.last_seq}",
            )
        if header.prev_size != prev.scan.end:
            raise CorruptionError(
                prev.path,
                prev.scan.end,
                prev.scan.last_seq + 1,
                "segment-size",
                f"{prev.name} holds {prev.scan.end} bytes of records, the next segment recorded {header.prev_size}",
            )
    elif header.first_seq > after_seq + 1:
        raise CorruptionError(
            path,
            0,
            after_seq + 1,
            "missing-segment",
            f"the log starts at {header.first_seq} but the state so far ends at {after_seq}",
        )


def _check_damage(path: str, scan: reader.ScanResult, last: bool, max_durable: int) -> Optional[TornTail]:
    """The torn tail a scan found, if the watermark rule allows cutting it; else CorruptionError."""
    if scan.damage is not None:
        expected = scan.last_seq + 1
        if not last:
            raise CorruptionError(
                path,
                scan.end,
                expected,
                scan.damage,
                (scan.detail + "; " if scan.detail else "") + "a later segment exists, so this one was synced",
            )
        if max_durable >= expected:
            raise CorruptionError(
                path,
                scan.end,
                expected,
                scan.damage,
                (scan.detail + "; " if scan.detail else "")
                + f"a record's durable watermark ({max_durable}) shows this data was synced",
            )
        return TornTail(path, scan.end, scan.data_end, expected, scan.damage, scan.detail)
    if not last and scan.data_end != scan.end:  # pragma: no cover - data_end == end when clean
        raise CorruptionError(path, scan.end, scan.last_seq + 1, "segment-size", "data after the end")
    return None


def _offset_after(data: reader.Buffer, start: int, end: int, seq: int) -> int:
    """Offset of the first record carrying a sequence number above `seq`."""
    found = end

    def note(rtype: int, rseq: int, off: int, payload: memoryview) -> None:
        nonlocal found
        if rseq > seq and off < found:
            found = off

    reader.scan_records(memoryview(data)[:end], start, _first_seq(data), reader.SEGMENT_TYPES, note)
    return found


def _first_seq(data: reader.Buffer) -> int:
    return fmt.decode_file_header(memoryview(data)[: fmt.FILE_HEADER_SIZE]).first_seq


def _utc_stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def quarantine_bytes(
    fs: OSFileAPI, directory: str, source: str, offset: int, data: bytes, report: dict[str, object]
) -> str:
    """Durably save `data` (cut from `source` at `offset`) and a JSON report in quarantine/."""
    qdir = os.path.join(directory, fmt.QUARANTINE_DIR)
    if not os.path.isdir(qdir):
        fs.mkdir(qdir)
        fs.fsync_dir(directory)
    base = f"{_utc_stamp()}-{os.path.basename(source)}-{offset}"
    bin_path = os.path.join(qdir, base + ".bin")
    for path, content in ((bin_path, data), (bin_path[:-4] + ".json", _json_bytes(report))):
        fd = fs.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fs.pwrite(fd, content, 0)
            fs.fsync(fd)
        finally:
            fs.close(fd)
    fs.fsync_dir(qdir)
    return bin_path


def _json_bytes(obj: dict[str, object]) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def quarantine_file(fs: OSFileAPI, directory: str, path: str, why: str, action: str = "open") -> str:
    """Move a whole file into quarantine/ (never delete it), with a JSON report next to it;
    `action` names what found it ("open", "compaction")."""
    qdir = os.path.join(directory, fmt.QUARANTINE_DIR)
    if not os.path.isdir(qdir):
        fs.mkdir(qdir)
        fs.fsync_dir(directory)
    dest = os.path.join(qdir, f"{_utc_stamp()}-{os.path.basename(path)}")
    report = {
        "action": action,
        "kind": "file",
        "file": os.path.basename(path),
        "reason": why,
        "bytes": os.path.getsize(path),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    fd = fs.open(dest + ".json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fs.pwrite(fd, _json_bytes(report), 0)
        fs.fsync(fd)
    finally:
        fs.close(fd)
    fs.rename(path, dest)
    fs.fsync_dir(qdir)
    fs.fsync_dir(directory)
    return dest


def cut_torn_tail(fs: OSFileAPI, directory: str, torn: TornTail, action: str = "open") -> str:
    """Copy the torn bytes into quarantine/, then zero them in the segment and sync. Returns the copy's path."""
    with open(torn.path, "rb") as f:
        f.seek(torn.offset)
        data = f.read(torn.length)
    report: dict[str, object] = {
        "action": action,
        "kind": "torn-tail",
        "segment": os.path.basename(torn.path),
        "offset": torn.offset,
        "bytes": len(data),
        "first_lost_seq": torn.seq,
        "reason": torn.reason,
        "detail": torn.detail,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "note": "bytes past the durable point: never acknowledged by a sync commit",
    }
    saved = quarantine_bytes(fs, directory, torn.path, torn.offset, data, report)
    hit("recovery.after_quarantine")
    fd = fs.open(torn.path, os.O_RDWR)
    try:
        fs.pwrite(fd, bytes(len(data)), torn.offset)
        fs.fdatasync(fd)
    finally:
        fs.close(fd)
    hit("recovery.after_cut")
    return saved


def report_dict(state: LogState) -> dict[str, object]:
    """A JSON-able summary of a LogState (for reports and the CLI)."""
    return {
        "last_seq": state.last_seq,
        "closed_cleanly": state.closed_cleanly,
        "torn": asdict(state.torn) if state.torn else None,
        "segments": [
            {
                "name": s.name,
                "first_seq": s.header.first_seq,
                "last_seq": s.scan.last_seq,
                "size": s.size,
                "records": s.scan.records,
                "end": s.scan.end,
                "damage": s.scan.damage,
            }
            for s in state.segments
        ],
    }


def require_store(directory: str) -> None:
    """Raise NotAStoreError unless `directory` holds a store's IDENTITY file."""
    if not os.path.isdir(directory):
        raise NotAStoreError(f"{directory!r} does not exist or is not a directory")
    if not os.path.exists(os.path.join(directory, fmt.IDENTITY_NAME)):
        raise NotAStoreError(f"{directory!r} is not a walstore store (no {fmt.IDENTITY_NAME} file)")


OnRecord = Callable[[int, int, int, memoryview], None]
