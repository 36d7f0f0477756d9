"""Examine a store's log without changing it, and repair it when asked.

This is the logic behind `walstore info/verify/dump/recover`; it is
importable and has no command-line concerns.

Guarantees:

* `analyze` and `walk_segment` never write. They read a store that a writer
  is appending to consistently: sealed segments are mapped, the last one is
  copied (a writer may truncate it when it rolls), and damage at the end of
  the last segment of a locked store is reported as `in-progress`, never as
  corruption, unless it stays put across re-reads and the watermark rule
  says it was synced.
* `analyze` judges damage exactly as `walstore.replay.inspect_log` (and so
  `open()`) does, by the durable-watermark rule of docs/FORMAT.md, but goes
  on past the first problem so that every segment gets a verdict.
* `execute` never deletes: bytes it cuts are copied (and fsynced) into
  `quarantine/<run>/` before they are zeroed, files it removes are renamed
  there, and a JSON report of the run is written next to them. Every record
  before the first damage is kept. The caller must hold the store's lock.
* `skip-damaged` builds its new segments completely (fsynced) in the run
  directory before swapping them in; an interrupted swap is finished by the
  next `recover` run (`resume_interrupted`).
"""

from __future__ import annotations

import datetime as _dt
import json
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from . import core, reader, replay
from . import format as fmt
from .errors import CorruptionError, FormatVersionError, ReplayError, WalstoreError
from .fileapi import DEFAULT, OSFileAPI

MODES = ("torn-tail", "last-consistent", "skip-damaged")
"""recover modes, named after what they keep."""

MODE_HELP = {
    "torn-tail": "cut only a torn tail past the durable point, as open() does; refuse if synced data is damaged",
    "last-consistent": "keep every record up to the first damage; quarantine everything after it,"
    " later segments included",
    "skip-damaged": "also keep the valid records after the damage, renumbered, in rewritten segments;"
    " only the damaged records are lost",
}

_HS = fmt.FRAME_HEADER_SIZE
_FH = fmt.FILE_HEADER_SIZE
_RERUN_DELAY = 0.05
_REPORT_NAME = "report.json"

Buffer = Union[bytes, bytearray, memoryview, mmap.mmap]


# ---------------------------------------------------------------------------
# Reading files


def load_segment(path: str, copy: bool) -> Buffer:
    """A segment's bytes: mapped read-only, or copied when `copy` (a live writer may truncate it)."""
    if copy:
        with open(path, "rb") as f:
            return f.read()
    return replay.read_file(path)


def _b(data: Buffer) -> reader.Buffer:
    """A segment buffer as the scanner and replayers take it (the same union, mmap included)."""
    return data


def close_buffer(buf: object) -> None:
    """Unmap a mapped segment (left to the garbage collector while views of it are alive)."""
    if isinstance(buf, mmap.mmap):
        try:
            buf.close()
        except BufferError:
            pass


def nonzero_end(buf: Buffer, start: int) -> int:
    """Offset just past the last non-zero byte at or after `start`, rounded up to 8 (within the buffer)."""
    mv = memoryview(buf)
    end = len(mv)
    step = 1 << 16
    while end > start:
        lo = max(start, end - step)
        stripped = bytes(mv[lo:end]).rstrip(b"\0")
        if stripped:
            return min(len(mv), fmt.padded(lo + len(stripped)))
        end = lo
    return start


# ---------------------------------------------------------------------------
# Walking records, past damage if asked


@dataclass
class Record:
    """A record that parses (valid CRC, sane header, payload decodes)."""

    offset: int
    rtype: int
    seq: int
    durable: int
    length: int
    payload: memoryview
    after_damage: bool
    """True when the record was found by resynchronising past damage."""

    @property
    def size(self) -> int:
        return _HS + fmt.padded(self.length)


@dataclass
class DamagedRange:
    """Bytes in [offset, end) that hold no valid record."""

    offset: int
    end: int
    reason: str
    detail: str
    header: Optional[dict[str, int]]
    """The frame header fields as they read at `offset` (unverified), when 32 bytes are there."""


def frame_header_as_read(buf: Buffer, off: int) -> Optional[dict[str, int]]:
    if len(buf) - off < _HS:
        return None
    (stored_crc,) = fmt.U32.unpack_from(buf, off)
    length, rtype, flags, _r16, _r32, seq, durable = fmt.FRAME_HEADER.unpack_from(buf, off + 4)
    return {"type": rtype, "length": length, "seq": seq, "durable": durable, "flags": flags, "crc": stored_crc}


def _resync_at(mv: memoryview, p: int, stop: int) -> Optional[tuple[int, int, int]]:
    """(offset, type, seq) of the first 8-byte boundary in [p, stop) holding a fully valid record."""
    while p + _HS <= stop:
        if not reader.plausible_frame(mv, p, reader.SEGMENT_TYPES):
            p += fmt.ALIGN
            continue
        checked = reader.check_frame(mv, p, reader.SEGMENT_TYPES)
        assert checked is not None
        rtype, length, seq, durable, reason = checked
        if not reason:
            if rtype == fmt.REC_COMMIT:
                if durable < seq and not reader.check_ops(mv[p + _HS : p + _HS + length]):
                    return p, rtype, seq
            elif durable == seq:
                return p, rtype, seq
        p += fmt.ALIGN
    return None


class StopWalk(Exception):
    """Raised by an on_record callback to end a walk early."""


def walk_segment(
    buf: Buffer,
    start: int,
    first_seq: Optional[int],
    on_record: Callable[[Record], None],
    on_damage: Optional[Callable[[DamagedRange], None]] = None,
    *,
    resync: bool = True,
    resync_from: Optional[int] = None,
) -> None:
    """Visit the valid records of one segment buffer in order, from `start`.

    At damage, report the damaged range and (with `resync`) look on every
    8-byte boundary for the next record that parses, as reader._resync does,
    then go on with the segment rules from there. `first_seq=None` (a header
    that cannot be trusted) or `resync_from` start in resync mode. Raise
    StopWalk from `on_record` to stop.
    """
    mv = memoryview(buf)
    size = len(mv)
    pos = start
    seq = first_seq
    after = False
    pending: Optional[tuple[int, str, str, int]] = None  # damage offset, reason, detail, resync start
    if resync_from is not None:
        pending = (start, "resync", "", resync_from)
    elif seq is None:
        pending = (start, "bad-header", "segment header cannot be trusted", start)
    while True:
        if pending is None:
            assert seq is not None

            def note(rtype: int, rseq: int, off: int, payload: memoryview, is_after: bool = after) -> None:
                durable = fmt.FRAME_HEADER.unpack_from(mv, off + 4)[6]
                on_record(Record(off, rtype, rseq, durable, len(payload), payload, is_after))

            res = reader.scan_records(mv, pos, seq, reader.SEGMENT_TYPES, note)
            if res.damage is None:
                return
            pending = (res.end, res.damage, res.detail, res.end + fmt.ALIGN)
            stop = res.data_end
        else:
            stop = nonzero_end(mv, pending[3])
        off, reason, detail, search = pending
        pending = None
        if not resync:
            if on_damage is not None:
                on_damage(DamagedRange(off, max(stop, off), reason, detail, frame_header_as_read(mv, off)))
            return
        found = _resync_at(mv, search, max(stop, search))
        end = found[0] if found is not None else max(stop, off)
        if on_damage is not None and end > off:
            on_damage(DamagedRange(off, end, reason, detail, frame_header_as_read(mv, off)))
        if found is None:
            return
        pos, rtype, rseq = found
        seq = rseq if rtype == fmt.REC_COMMIT else rseq + 1
        after = True
        if pos >= size:  # pragma: no cover - found is always inside the buffer
            return


@dataclass
class RangeCount:
    """What a stretch of segment bytes holds: valid records and damaged bytes."""

    records: int = 0
    commits: int = 0
    first_seq: Optional[int] = None
    last_seq: Optional[int] = None
    damaged_bytes: int = 0
    damaged: list[DamagedRange] = field(default_factory=list)

    def add_record(self, rec: Record) -> None:
        self.records += 1
        if rec.rtype == fmt.REC_COMMIT:
            self.commits += 1
            if self.first_seq is None or rec.seq < self.first_seq:
                self.first_seq = rec.seq
            if self.last_seq is None or rec.seq > self.last_seq:
                self.last_seq = rec.seq

    def add_damage(self, d: DamagedRange) -> None:
        self.damaged_bytes += d.end - d.offset
        self.damaged.append(d)


def count_range(buf: Buffer, start: int, first_seq: Optional[int], *, resync_from: Optional[int] = None) -> RangeCount:
    """Count the valid records and damaged bytes from `start` on, resyncing past damage."""
    out = RangeCount()
    walk_segment(buf, start, first_seq, out.add_record, out.add_damage, resync_from=resync_from)
    return out


# ---------------------------------------------------------------------------
# Snapshots: checked by walstore.snapshot.check_snapshot, chosen as open() chooses them


@dataclass
class SnapshotInfo:
    name: str
    path: str
    seq: int
    size: int
    valid: bool
    role: str = ""
    """"base" (the one open() replays), "rejected" (newer than the base and invalid: open() moves it
    to quarantine/), or "older" (older than the base: open() never reads it)."""
    problem: str = ""
    records: int = 0
    ops: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seq": self.seq,
            "size": self.size,
            "valid": self.valid,
            "role": self.role,
            "problem": self.problem or None,
            "records": self.records,
            "ops": self.ops,
        }


def check_snapshot(path: str, store_id: bytes) -> tuple[SnapshotInfo, Buffer]:
    """Check one snapshot file completely; a snapshot with any damage is invalid as a whole."""
    from . import snapshot as snapmod

    name = os.path.basename(path)
    m = fmt.SNAPSHOT_NAME.match(name)
    data = replay.read_file(path)
    info = SnapshotInfo(name, path, int(m.group(1)) if m else -1, len(data), False)
    try:
        _seq, scan = snapmod.check_snapshot(path, _b(data), store_id)
    except CorruptionError as exc:
        msg = str(exc)
        info.problem = msg.split(": ", 1)[1] if msg.startswith("corruption in ") and ": " in msg else msg
        return info, data
    end = scan.end - fmt.frame_size(fmt.SNAPSHOT_END_PAYLOAD.size) + _HS
    info.records, info.ops = fmt.SNAPSHOT_END_PAYLOAD.unpack_from(data, end)
    info.valid = True
    return info, data


# ---------------------------------------------------------------------------
# The analysis


@dataclass
class Damage:
    """One problem in the log, judged by the watermark rule."""

    kind: str
    """"torn-tail", "in-progress" (torn tail of a store a writer holds) or "corruption"."""
    index: int
    """Position of the segment in Analysis.segments."""
    segment: str
    offset: int
    end: int
    """End of the damaged data in that file (the whole file for a header problem)."""
    seq: Optional[int]
    """The sequence number the record at `offset` should carry."""
    reason: str
    detail: str

    @property
    def length(self) -> int:
        return self.end - self.offset

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "segment": self.segment,
            "offset": self.offset,
            "end": self.end,
            "bytes": self.length,
            "seq": self.seq,
            "reason": self.reason,
            "detail": self.detail,
        }

    def describe(self) -> str:
        where = f"{self.segment} at offset {self.offset}"
        if self.seq is not None:
            where += f" (sequence number {self.seq})"
        text = f"{self.reason} in {where}"
        if self.detail:
            text += f": {self.detail}"
        return text


@dataclass
class SegmentInfo:
    """One segment file and its verdict."""

    name: str
    path: str
    size: int
    name_seq: int
    header: Optional[fmt.FileHeader] = None
    header_problem: str = ""
    own: bool = True
    """The header carries this store's id (or cannot be read at all)."""
    magic_ok: bool = False
    scan: Optional[reader.ScanResult] = None
    covered: bool = False
    """Wholly before the base snapshot: not read by open()."""
    problems: list[Damage] = field(default_factory=list)

    @property
    def first_seq(self) -> int:
        return self.header.first_seq if self.header is not None else self.name_seq

    @property
    def last_seq(self) -> Optional[int]:
        return self.scan.last_seq if self.scan is not None else None

    @property
    def records(self) -> int:
        return self.scan.records if self.scan is not None else 0

    @property
    def verdict(self) -> str:
        if self.covered:
            return "covered"
        kinds = {p.kind for p in self.problems}
        for k in ("corruption", "torn-tail", "in-progress"):
            if k in kinds:
                return k
        return "clean"

    def describe_verdict(self) -> str:
        if self.covered:
            return "covered by the snapshot (not read)"
        if not self.problems:
            assert self.scan is not None
            return "clean, closed" if self.scan.closed else "clean"
        parts = []
        for p in self.problems:
            if p.kind == "corruption":
                why = f"{p.reason}: {p.detail}" if p.detail else p.reason
                parts.append(f"CORRUPT at offset {p.offset} ({why})")
            elif p.kind == "in-progress":
                parts.append(f"write in progress at offset {p.offset} ({p.length} bytes past the records)")
            else:
                parts.append(f"torn tail of {p.length} bytes at offset {p.offset} after the durable point ({p.reason})")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        s = self.scan
        return {
            "name": self.name,
            "size": self.size,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "records": self.records,
            "end": s.end if s else None,
            "closed": bool(s and s.closed and s.damage is None),
            "max_durable": s.max_durable if s else None,
            "header_problem": self.header_problem or None,
            "verdict": self.verdict,
            "problems": [p.to_dict() for p in self.problems],
        }


@dataclass
class StateSummary:
    keys: int
    bytes: int
    """Total size of the keys and stored values (encoded)."""
    last_seq: int


@dataclass
class Analysis:
    """Everything `info` and `verify` report, and what `recover` plans from."""

    directory: str
    identity: core.Identity
    backend: str
    writer_running: bool
    holder_pid: Optional[int]
    snapshots: list[SnapshotInfo]
    base: Optional[SnapshotInfo]
    segments: list[SegmentInfo]
    problems: list[Damage]
    last_seq: int
    """Last sequence number before the first problem (what a repaired store keeps)."""
    closed_cleanly: bool
    state: Optional[StateSummary] = None
    state_note: str = ""
    quarantine_files: int = 0
    prepared_bytes: Optional[int] = None
    """Size of prealloc.ready, the next segment prepared in advance (None: there is none)."""
    interrupted_runs: list[str] = field(default_factory=list)
    buffers: list[Buffer] = field(default_factory=list)

    @property
    def damage(self) -> Optional[Damage]:
        """The first problem in log order: where recovery acts."""
        return self.problems[0] if self.problems else None

    @property
    def verdict(self) -> str:
        """ "clean", "snapshot-rejected", "in-progress", "torn-tail" or "corruption" (the worst first)."""
        kinds = {p.kind for p in self.problems}
        if "corruption" in kinds:
            return "corruption"
        for k in ("torn-tail", "in-progress"):
            if k in kinds:
                return k
        if self.rejected_snapshots:
            return "snapshot-rejected"
        return "clean"

    @property
    def rejected_snapshots(self) -> list[SnapshotInfo]:
        """Snapshots newer than the base that fail their checks: open() moves them to quarantine/."""
        return [s for s in self.snapshots if s.role == "rejected"]

    @property
    def base_seq(self) -> int:
        return self.base.seq if self.base is not None else 0

    def close(self) -> None:
        for buf in self.buffers:
            close_buffer(buf)
        self.buffers = []

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": os.path.abspath(self.directory),
            "store_id": self.identity.store_id.hex(),
            "format_version": fmt.FORMAT_VERSION,
            "codec": self.identity.codec,
            "created": self.identity.created,
            "backend": self.backend,
            "writer_running": self.writer_running,
            "holder_pid": self.holder_pid,
            "snapshot": self.base.to_dict() if self.base else None,
            "snapshots": [s.to_dict() for s in self.snapshots],
            "segments": [s.to_dict() for s in self.segments],
            "verdict": self.verdict,
            "damage": self.damage.to_dict() if self.damage else None,
            "problems": [p.to_dict() for p in self.problems],
            "last_seq": self.last_seq,
            "closed_cleanly": self.closed_cleanly,
            "state": (
                {"keys": self.state.keys, "bytes": self.state.bytes, "last_seq": self.state.last_seq}
                if self.state
                else None
            ),
            "state_note": self.state_note or None,
            "quarantine_files": self.quarantine_files,
            "prepared_segment_bytes": self.prepared_bytes,
            "interrupted_recover_runs": self.interrupted_runs,
        }


class _Coded(bytes):
    """A codec-encoded value, left undecoded (the tool never unpickles)."""


def _keep_coded(data: bytes) -> Any:
    return _Coded(data)


def _offset_after(buf: Buffer, start: int, end: int, first_seq: int, seq: int) -> int:
    found = end

    def note(rtype: int, rseq: int, off: int, payload: memoryview) -> None:
        nonlocal found
        if rseq > seq and off < found:
            found = off
            raise StopWalk

    try:
        reader.scan_records(memoryview(buf)[:end], start, first_seq, reader.SEGMENT_TYPES, note)
    except StopWalk:
        pass
    return found


def analyze(
    directory: str | os.PathLike[str],
    *,
    writer_running: Optional[bool] = None,
    replayer: Optional[replay.RangeReplayer] = None,
    with_state: bool = True,
    on_bytes: Optional[Callable[[int], None]] = None,
) -> Analysis:
    """Read and judge the whole store; change nothing.

    Raises NotAStoreError, FormatVersionError, or CorruptionError when
    IDENTITY itself is damaged, and OSError (permissions). `writer_running`
    defaults to "some process holds the lock"; pass False when the caller
    holds it. `replayer` (default: a key-value replayer when `with_state`)
    receives every record before the first problem; its buffers stay
    mapped in `Analysis.buffers` until `close()`.
    """
    path = os.fspath(directory)
    identity = core.read_identity(path)
    running = core.is_locked(path) if writer_running is None else writer_running
    holder = core.holder_pid(path) if running else None
    store_id = identity.store_id
    # Snapshots: the newest valid one is the base the log continues from.
    from . import snapshot as snapmod

    snapshots: list[SnapshotInfo] = []
    snap_bufs: dict[str, Buffer] = {}
    base: Optional[SnapshotInfo] = None
    for _seq, spath in snapmod.list_snapshots(path):  # newest first, as open() looks
        info, data = check_snapshot(spath, store_id)
        if base is not None:
            info.role = "older"
        elif info.valid:
            info.role = "base"
            base = info
        else:
            info.role = "rejected"
        snapshots.append(info)
        snap_bufs[info.name] = data
    is_kv = identity.kind.partition(":")[0] == "kv"
    if replayer is None and with_state and is_kv:
        from .kvreplay import make_kv_replayer

        replayer = make_kv_replayer()
    analysis = Analysis(path, identity, replay.backend(), running, holder, snapshots, base, [], [], 0, False)
    if not is_kv:
        analysis.state_note = f"application state ({identity.kind}); open it with walstore.open_machine and its class"
    try:
        if replayer is not None and base is not None:
            sbuf = snap_bufs.pop(base.name)
            replayer.apply_range(_b(sbuf), _FH, len(sbuf))
            analysis.buffers.append(sbuf)
        for buf in snap_bufs.values():
            close_buffer(buf)
        after_seq = base.seq if base is not None else 0
        analysis.last_seq = after_seq
        listed = replay.list_segments(path)
        start_index = 0
        for i, (first, _p) in enumerate(listed):
            if first <= after_seq + 1:
                start_index = i
        segs: list[SegmentInfo] = []
        for i, (first, spath) in enumerate(listed):
            size = os.path.getsize(spath)
            segs.append(SegmentInfo(os.path.basename(spath), spath, size, first, covered=i < start_index))
        analysis.segments = segs
        live = [s for s in segs if not s.covered]
        max_durable = 0
        prev: Optional[SegmentInfo] = None
        prev_ok = False
        replay_on = True
        pending_damage: list[tuple[SegmentInfo, int]] = []
        for pos, seg in enumerate(live):
            index = segs.index(seg)
            last = pos == len(live) - 1
            data = _read_live(seg, copy=last, settle=last and running)
            if on_bytes is not None:
                on_bytes(seg.size)
            ok_header = _check_segment_header(seg, data, store_id, index)
            if ok_header:
                assert seg.header is not None
                h = seg.header
                if prev is not None and prev_ok and prev.scan is not None:
                    expected_first = prev.scan.last_seq + 1
                    if h.first_seq != expected_first or h.prev_seq != prev.scan.last_seq:
                        seg.problems.append(
                            Damage(
                                "corruption",
                                index,
                                seg.name,
                                0,
                                seg.size,
                                expected_first,
                                "missing-segment",
                                f"starts at {h.first_seq} (predecessor recorded {h.prev_seq}),"
                                f" but {prev.name} ends at {prev.scan.last_seq}",
                            )
                        )
                    elif h.prev_size != prev.scan.end:
                        prev.problems.append(
                            Damage(
                                "corruption",
                                segs.index(prev),
                                prev.name,
                                prev.scan.end,
                                prev.size,
                                prev.scan.last_seq + 1,
                                "segment-size",
                                f"{prev.name} holds {prev.scan.end} bytes of records,"
                                f" the next segment recorded {h.prev_size}",
                            )
                        )
                        replay_on = False
                elif prev is None and h.first_seq > after_seq + 1:
                    seg.problems.append(
                        Damage(
                            "corruption",
                            index,
                            seg.name,
                            0,
                            seg.size,
                            after_seq + 1,
                            "missing-segment",
                            f"the log starts at {h.first_seq} but the state so far ends at {after_seq}",
                        )
                    )
                seg.scan = replay.scan_records(_b(data), _FH, h.first_seq, reader.SEGMENT_TYPES)
                max_durable = max(max_durable, seg.scan.max_durable, seg.scan.resync_max_durable)
                if seg.scan.damage is not None:
                    pending_damage.append((seg, index))
            # Replay (and count as kept) the records before the first problem.
            kept = False
            if replay_on and not seg.problems and seg.scan is not None and seg.header is not None:
                kept = True
                if replayer is not None:
                    skip_to = _FH
                    if seg.header.first_seq <= after_seq:
                        skip_to = _offset_after(data, _FH, seg.scan.end, seg.header.first_seq, after_seq)
                    replayer.apply_range(_b(data), skip_to, seg.scan.end)
                analysis.last_seq = max(analysis.last_seq, seg.scan.last_seq)
                analysis.closed_cleanly = last and seg.scan.closed and seg.scan.damage is None
                if seg.scan.damage is not None:
                    replay_on = False
            else:
                replay_on = False
            if kept and replayer is not None:
                analysis.buffers.append(data)
            else:
                close_buffer(data)
            prev = seg
            prev_ok = ok_header and seg.scan is not None and seg.scan.damage is None and not seg.problems
        # Judge scan damage by the watermark rule, now that every watermark is known.
        for seg, index in pending_damage:
            scan = seg.scan
            assert scan is not None and scan.damage is not None
            expected = scan.last_seq + 1
            detail = scan.detail + "; " if scan.detail else ""
            if seg is not live[-1]:
                kind, detail = "corruption", detail + "a later segment exists, so this one was synced"
            elif max_durable >= expected:
                kind = "corruption"
                detail += f"a record's durable watermark ({max_durable}) shows this data was synced"
            else:
                kind = "in-progress" if running else "torn-tail"
                detail = scan.detail
            end = max(scan.data_end, scan.end)
            seg.problems.append(Damage(kind, index, seg.name, scan.end, end, expected, scan.damage, detail))
        for seg in segs:
            seg.problems.sort(key=lambda p: p.offset)
        analysis.problems = [p for seg in segs for p in seg.problems]
        if replayer is not None and with_state:
            _summarize_state(analysis, replayer)
    except BaseException:
        analysis.close()
        raise
    try:
        analysis.prepared_bytes = os.stat(os.path.join(path, fmt.PREALLOC_READY_NAME)).st_size
    except FileNotFoundError:
        pass
    qdir = os.path.join(path, fmt.QUARANTINE_DIR)
    if os.path.isdir(qdir):
        analysis.quarantine_files = sum(len(files) for _d, _s, files in os.walk(qdir))
        analysis.interrupted_runs = [os.path.basename(r) for r in interrupted_runs(path)]
    return analysis


def _summarize_state(analysis: Analysis, replayer: Any) -> None:
    if not hasattr(replayer, "finish"):
        return
    try:
        state = replayer.finish(_keep_coded)
    except ReplayError as exc:
        analysis.state_note = f"not a key-value store's log ({exc}); the state is the application's"
        return
    total = 0
    for k, v in state.items():
        total += len(k.encode("utf-8")) if isinstance(k, str) else len(k)
        total += len(v.encode("utf-8")) if isinstance(v, str) else len(v)
    analysis.state = StateSummary(len(state), total, analysis.last_seq)


def _read_live(seg: SegmentInfo, copy: bool, settle: bool) -> Buffer:
    """Read a segment; for the active segment of a running writer, re-read until damage holds still."""
    data = load_segment(seg.path, copy)
    seg.size = len(data)
    if not settle:
        return data
    last_end = -1
    for _ in range(3):
        try:
            h = fmt.decode_file_header(memoryview(data)[:_FH])
        except fmt.HeaderError:
            return data
        scan = replay.scan_records(_b(data), _FH, h.first_seq, reader.SEGMENT_TYPES)
        if scan.damage is None or scan.end == last_end:
            return data
        last_end = scan.end
        time.sleep(_RERUN_DELAY)
        data = load_segment(seg.path, copy)
        seg.size = len(data)
    return data


def _check_segment_header(seg: SegmentInfo, data: Buffer, store_id: bytes, index: int) -> bool:
    """Decode and check the header; record a problem and return False when it is bad."""
    head = bytes(memoryview(data)[:_FH])
    seg.magic_ok = head[:8] == fmt.MAGIC
    if len(head) >= 32:
        seg.own = head[16:32] == store_id
    try:
        seg.header = replay.check_header(seg.path, _b(data), fmt.KIND_SEGMENT, store_id)
    except FormatVersionError:
        raise
    except CorruptionError as exc:
        seg.header_problem = exc.reason
        msg = str(exc)
        marker = f": {exc.reason}; "
        detail = msg.split(marker, 1)[1] if marker in msg else ""
        seg.problems.append(Damage("corruption", index, seg.name, 0, seg.size, None, exc.reason, detail))
        return False
    if seg.header.first_seq != seg.name_seq:
        seg.header_problem = "bad-header"
        seg.problems.append(
            Damage(
                "corruption",
                index,
                seg.name,
                0,
                seg.size,
                None,
                "bad-header",
                f"header says first sequence number {seg.header.first_seq}",
            )
        )
        return False
    return True


# ---------------------------------------------------------------------------
# Reading the log for dump and export


def load_state(
    directory: str | os.PathLike[str], *, allow_prefix: bool = False, writer_running: Optional[bool] = None
) -> tuple[Analysis, dict[Any, Any]]:
    """The key-value state as open() would build it; codec values stay undecoded, as `Coded` bytes.

    With a corrupt log, raise CorruptionError unless `allow_prefix`: then the
    state is the records before the first damage.
    """
    from .kvreplay import make_kv_replayer

    kind = core.read_identity(os.fspath(directory)).kind
    if kind.partition(":")[0] != "kv":
        raise WalstoreError(
            f"{os.fspath(directory)!r} holds application state ({kind}), not key-value state;"
            " this command needs walstore.open_machine and the application's class"
        )
    rp = make_kv_replayer()
    analysis = analyze(directory, writer_running=writer_running, replayer=rp, with_state=False)
    try:
        d = analysis.damage
        if analysis.verdict == "corruption" and not allow_prefix and d is not None:
            where = os.path.join(analysis.directory, d.segment)
            raise CorruptionError(where, d.offset, d.seq, d.reason, d.detail)
        try:
            state = rp.finish(_keep_coded)
        except ReplayError as exc:
            raise WalstoreError(f"not a key-value store's log: {exc}") from None
        return analysis, state
    finally:
        analysis.close()


Coded = _Coded


# ---------------------------------------------------------------------------
# Recovery plans


@dataclass
class Action:
    """One step of a recovery, with what it removes."""

    action: str
    """"cut" (bytes copied to quarantine, then zeroed), "move" (file renamed into quarantine), or
    "write" (a new segment file)."""
    segment: str
    offset: int = 0
    end: int = 0
    records: int = 0
    """Valid records in what is removed (or written)."""
    first_seq: Optional[int] = None
    last_seq: Optional[int] = None
    damaged_bytes: int = 0
    reason: str = ""
    saved_as: Optional[str] = None

    @property
    def bytes(self) -> int:
        return self.end - self.offset

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "segment": self.segment,
            "offset": self.offset,
            "end": self.end,
            "bytes": self.bytes,
            "records": self.records,
            "seq_range": [self.first_seq, self.last_seq] if self.first_seq is not None else None,
            "damaged_bytes": self.damaged_bytes,
            "reason": self.reason,
            "saved_as": self.saved_as,
        }


@dataclass
class Plan:
    """What `recover` will do. `execute` carries it out."""

    mode: str
    analysis: Analysis
    actions: list[Action] = field(default_factory=list)
    refused: str = ""
    """Why the mode cannot repair this store (nothing will be done)."""
    kept_last_seq: int = 0
    dropped_commits: int = 0
    dropped_bytes: int = 0
    dropped_ranges: list[list[int]] = field(default_factory=list)
    """Sequence number ranges [first, last] (old numbering) that the repaired store no longer has."""
    salvaged: int = 0
    renumbered: list[list[int]] = field(default_factory=list)
    """[old_first, old_last, new_first] for each run of salvaged records."""
    notes: list[str] = field(default_factory=list)
    target_segment_size: int = 0

    @property
    def nothing_to_do(self) -> bool:
        return not self.actions and not self.refused

    def to_dict(self) -> dict[str, Any]:
        a = self.analysis
        return {
            "mode": self.mode,
            "store": os.path.abspath(a.directory),
            "store_id": a.identity.store_id.hex(),
            "verdict_before": a.verdict,
            "damage": a.damage.to_dict() if a.damage else None,
            "refused": self.refused or None,
            "kept_last_seq": self.kept_last_seq,
            "dropped": {
                "commits": self.dropped_commits,
                "bytes": self.dropped_bytes,
                "seq_ranges": self.dropped_ranges,
            },
            "salvaged": {"commits": self.salvaged, "renumbered": self.renumbered},
            "actions": [x.to_dict() for x in self.actions],
            "notes": self.notes,
        }


def _ranges(seqs: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for s in sorted(seqs):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        elif not out or s > out[-1][1]:
            out.append([s, s])
    return out


def _merge(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def plan_recovery(analysis: Analysis, mode: str, segment_size: Optional[int] = None) -> Plan:
    """Decide what `mode` does to this store (reads the damaged part of the log again; changes nothing)."""
    plan = _plan_recovery(analysis, mode, segment_size)
    if plan.refused:
        plan.actions = []
    return plan


def _plan_recovery(analysis: Analysis, mode: str, segment_size: Optional[int]) -> Plan:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    plan = Plan(mode, analysis, kept_last_seq=analysis.last_seq)
    older_bad = [s.name for s in analysis.snapshots if s.role == "older" and not s.valid]
    if older_bad:
        plan.notes.append(
            f"invalid snapshots older than the base ({', '.join(older_bad)}) are left alone: open() never reads them"
        )
    d = analysis.damage
    if d is None or d.kind != "in-progress":
        for snap in analysis.rejected_snapshots:  # what open() does with them, too
            plan.actions.append(
                Action(
                    "move",
                    snap.name,
                    0,
                    snap.size,
                    0,
                    None,
                    None,
                    snap.size,
                    f"snapshot failed its checks ({snap.problem}); the older base"
                    " and the log rebuild the state without it",
                )
            )
    if d is None:
        return plan
    if d.kind == "in-progress":
        plan.refused = "a writer holds the store; its tail is being written right now"
        return plan
    if mode == "torn-tail":
        if d.kind != "torn-tail":
            plan.refused = (
                f"the damage is corruption of synced data, not a torn tail: {d.describe()}."
                " Choose --mode last-consistent (keep everything before the damage) or"
                " --mode skip-damaged (also keep the valid records after it)"
            )
            return plan
        seg = analysis.segments[d.index]
        data = load_segment(seg.path, copy=True)
        cnt = count_range(data, d.offset, None, resync_from=d.offset + fmt.ALIGN)
        plan.actions.append(
            Action(
                "cut",
                seg.name,
                d.offset,
                d.end,
                cnt.records,
                cnt.first_seq,
                cnt.last_seq,
                d.length,
                f"torn tail ({d.reason}) past the durable point",
            )
        )
        plan.dropped_bytes = d.length
        ranges: list[list[int]] = []
        if cnt.first_seq is not None and cnt.last_seq is not None:
            ranges.append([cnt.first_seq, cnt.last_seq])
        if d.seq is not None:
            ranges.append([d.seq, d.seq])  # the torn record itself (never acknowledged)
        plan.dropped_ranges = _merge(ranges)
        plan.dropped_commits = sum(b - a + 1 for a, b in plan.dropped_ranges)
        return plan
    if mode == "last-consistent":
        _plan_cut_and_move(plan, analysis, d)
        return plan
    _plan_skip_damaged(plan, analysis, d, segment_size)
    return plan


def _later_segments(analysis: Analysis, index: int) -> list[SegmentInfo]:
    return [s for s in analysis.segments[index + 1 :] if not s.covered]


def _segment_count(seg: SegmentInfo) -> RangeCount:
    """What a whole segment file holds (records that parse, resyncing past damage)."""
    data = load_segment(seg.path, copy=True)
    if not seg.magic_ok:
        return RangeCount(damaged_bytes=len(data))
    first = seg.header.first_seq if seg.header is not None else None
    return count_range(data, _FH, first)


def _plan_cut_and_move(plan: Plan, analysis: Analysis, d: Damage) -> None:
    seg = analysis.segments[d.index]
    dropped: list[list[int]] = []
    if d.offset >= _FH:
        data = load_segment(seg.path, copy=True)
        end = max(nonzero_end(data, d.offset), d.offset)
        if end > d.offset:
            cnt = count_range(data, d.offset, None, resync_from=d.offset + fmt.ALIGN)
            plan.actions.append(
                Action(
                    "cut",
                    seg.name,
                    d.offset,
                    end,
                    cnt.records,
                    cnt.first_seq,
                    cnt.last_seq,
                    cnt.damaged_bytes,
                    f"{d.kind}: {d.describe()}",
                )
            )
            plan.dropped_bytes += end - d.offset
            plan.dropped_commits += cnt.commits
            if cnt.first_seq is not None and cnt.last_seq is not None:
                dropped.append([cnt.first_seq, cnt.last_seq])
        moves = _later_segments(analysis, d.index)
    else:
        moves = [seg] + _later_segments(analysis, d.index)
    for s in moves:
        cnt = _segment_count(s)
        why = "the damaged segment" if s is seg else "after the damage point"
        if s.header_problem == "foreign-store" or (s.header is None and not s.own):
            why = "belongs to another store"
        elif s.header_problem:
            why += f" ({s.header_problem})"
        plan.actions.append(
            Action("move", s.name, 0, s.size, cnt.records, cnt.first_seq, cnt.last_seq, cnt.damaged_bytes, why)
        )
        plan.dropped_bytes += s.size
        if s.own:
            plan.dropped_commits += cnt.commits
            if cnt.first_seq is not None and cnt.last_seq is not None:
                dropped.append([cnt.first_seq, cnt.last_seq])
    # Everything after the kept prefix is gone from the log: the damaged record itself, and
    # whatever lies beyond it, whether it still parses or not.
    hi = max(
        [b for _a, b in dropped] + ([d.seq] if d.seq is not None and d.reason != "segment-size" else []), default=None
    )
    if hi is not None and hi > plan.kept_last_seq:
        plan.dropped_ranges = [[plan.kept_last_seq + 1, hi]]
    plan.dropped_commits = sum(b - a + 1 for a, b in plan.dropped_ranges)


@dataclass
class _SalvageSource:
    seg: SegmentInfo
    start: int
    first_seq: Optional[int]
    resync_from: Optional[int]


def _salvage_sources(analysis: Analysis, d: Damage) -> tuple[list[_SalvageSource], list[SegmentInfo]]:
    """Where skip-damaged looks for records, and the segments it ignores (another store's)."""
    seg = analysis.segments[d.index]
    sources: list[_SalvageSource] = []
    ignored: list[SegmentInfo] = []
    if d.offset >= _FH:
        if d.reason == "segment-size":
            pass  # all of this segment's records are kept; nothing damaged in it
        else:
            sources.append(_SalvageSource(seg, d.offset, None, d.offset + fmt.ALIGN))
        rest = _later_segments(analysis, d.index)
    else:
        rest = [seg] + _later_segments(analysis, d.index)
    for s in rest:
        if not s.magic_ok or not s.own:
            ignored.append(s)
        elif s.header is not None and s.header_problem == "":
            sources.append(_SalvageSource(s, _FH, s.header.first_seq, None))
        else:
            sources.append(_SalvageSource(s, _FH, None, _FH))
    return sources, ignored


def _walk_salvage(
    analysis: Analysis,
    d: Damage,
    kept_last: int,
    emit: Callable[[int, Record], None],
) -> tuple[int, int, int, list[SegmentInfo]]:
    """Walk the salvageable records in order; call emit(new_seq, record) for each kept COMMIT.

    A COMMIT is kept when its old sequence number is above every one kept
    before it. Returns (salvaged, out-of-order records, damaged bytes, the
    segments ignored as another store's).
    """
    sources, ignored = _salvage_sources(analysis, d)
    last_old = kept_last
    new_seq = kept_last
    salvaged = 0
    rejected = 0
    damaged = 0
    for src in sources:
        data = load_segment(src.seg.path, copy=True)
        try:

            def on_record(rec: Record) -> None:
                nonlocal last_old, new_seq, salvaged, rejected
                if rec.rtype != fmt.REC_COMMIT:
                    return
                if rec.seq <= last_old:
                    rejected += 1
                    return
                last_old = rec.seq
                new_seq += 1
                salvaged += 1
                emit(new_seq, rec)

            def on_damage(dr: DamagedRange) -> None:
                nonlocal damaged
                damaged += dr.end - dr.offset

            walk_segment(data, src.start, src.first_seq, on_record, on_damage, resync_from=src.resync_from)
        finally:
            close_buffer(data)
    return salvaged, rejected, damaged, ignored


def _plan_skip_damaged(plan: Plan, analysis: Analysis, d: Damage, segment_size: Optional[int]) -> None:
    kept_last = analysis.last_seq
    seg = analysis.segments[d.index]
    runs: list[list[int]] = []

    def emit(new_seq: int, rec: Record) -> None:
        if runs and rec.seq == runs[-1][1] + 1 and new_seq == runs[-1][2] + (runs[-1][1] - runs[-1][0]) + 1:
            runs[-1][1] = rec.seq
        else:
            runs.append([rec.seq, rec.seq, new_seq])

    salvaged, rejected, damaged, ignored = _walk_salvage(analysis, d, kept_last, emit)
    plan.salvaged = salvaged
    plan.renumbered = [r for r in runs if r[0] != r[2]]
    # Lost sequence numbers: the gaps between what is kept.
    lost: list[list[int]] = []
    prev = kept_last
    for a, b, _n in runs:
        if a > prev + 1:
            lost.append([prev + 1, a - 1])
        prev = b
    if not runs and d.seq is not None and d.reason != "segment-size":
        lost.append([d.seq, d.seq])  # the damaged record itself; nothing valid after it
    plan.dropped_ranges = lost
    plan.dropped_commits = sum(b - a + 1 for a, b in lost) + rejected
    plan.dropped_bytes = damaged
    # Files: the damaged segment (when it has a usable header) is rewritten with its valid prefix;
    # it and every later segment move to quarantine.
    originals = _later_segments(analysis, d.index)
    if not (d.reason == "segment-size" and d.offset >= _FH):
        originals.insert(0, seg)
    for s in originals:
        why = "replaced by rewritten segments"
        if s in ignored:
            why = "belongs to another store" if not s.own else "not a walstore segment"
            plan.dropped_bytes += s.size
        plan.actions.append(
            Action(
                "move",
                s.name,
                0,
                s.size,
                s.records,
                s.first_seq if s.scan else None,
                s.last_seq if s.scan else None,
                0,
                why,
            )
        )
    sizes = [s.size for s in analysis.segments]
    plan.target_segment_size = segment_size or max([4096] + sizes)  # the store's own segment size
    total_new = salvaged
    if plan.renumbered:
        plan.notes.append(
            "salvaged records get new sequence numbers: "
            + ", ".join(f"old {a}..{b} -> new {n}..{n + b - a}" for a, b, n in plan.renumbered)
        )
    if rejected:
        plan.notes.append(f"{rejected} valid-looking records out of sequence order were not kept")
    plan.actions.append(
        Action(
            "write",
            "(new segments)",
            0,
            0,
            total_new,
            kept_last + 1 if total_new else None,
            kept_last + total_new if total_new else None,
            0,
            f"the kept prefix of {seg.name} and {salvaged} salvaged records, renumbered",
        )
    )


# ---------------------------------------------------------------------------
# Carrying out a plan


def _stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def _write_file(fs: OSFileAPI, path: str, content: bytes) -> None:
    fd = fs.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        fs.pwrite(fd, content, 0)
        fs.fsync(fd)
    finally:
        fs.close(fd)


def write_report(run_dir: str, report: dict[str, Any], fs: Optional[OSFileAPI] = None) -> str:
    """Write a run's report.json atomically (temp file, fsync, rename, directory fsync)."""
    fs = fs or DEFAULT
    path = os.path.join(run_dir, _REPORT_NAME)
    tmp = path + ".part"
    _write_file(fs, tmp, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    fs.rename(tmp, path)
    fs.fsync_dir(run_dir)
    return path


def _make_run_dir(fs: OSFileAPI, directory: str, mode: str) -> str:
    qdir = os.path.join(directory, fmt.QUARANTINE_DIR)
    if not os.path.isdir(qdir):
        fs.mkdir(qdir)
        fs.fsync_dir(directory)
    run_dir = os.path.join(qdir, f"{_stamp()}-recover-{mode}")
    fs.mkdir(run_dir)
    fs.fsync_dir(qdir)
    return run_dir


def _cut(fs: OSFileAPI, path: str, offset: int, end: int, run_dir: str) -> str:
    """Copy [offset, end) of `path` into the run directory (fsynced), then zero it in place and sync."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(end - offset)
    saved = os.path.join(run_dir, f"{os.path.basename(path)}.{offset}-{offset + len(data)}.bin")
    _write_file(fs, saved, data)
    fs.fsync_dir(run_dir)
    fd = fs.open(path, os.O_RDWR)
    try:
        fs.pwrite(fd, bytes(len(data)), offset)
        fs.fdatasync(fd)
    finally:
        fs.close(fd)
    return saved


def _rel(directory: str, path: str) -> str:
    return os.path.relpath(path, directory)


class _SegmentBuilder:
    """Writes new segment files into a staging directory, rolling at a target size."""

    def __init__(self, fs: OSFileAPI, stage: str, store_id: bytes, target: int) -> None:
        self.fs = fs
        self.stage = stage
        self.store_id = store_id
        self.target = target
        self.files: list[dict[str, Any]] = []
        self._f: Any = None
        self._name = ""
        self._size = 0
        self._first = 0
        self._last = 0
        self._records = 0

    def start(self, header: fmt.FileHeader) -> None:
        self._name = fmt.segment_name(header.first_seq)
        self._f = open(os.path.join(self.stage, self._name), "wb")  # noqa: SIM115 - closed in finish()
        self._f.write(header.encode())
        self._size = _FH
        self._first = header.first_seq
        self._last = header.first_seq - 1
        self._records = 0

    def copy(self, data: memoryview, last_seq: int, records: int) -> None:
        self._f.write(data)
        self._size += len(data)
        self._last = last_seq
        self._records += records

    def append_commit(self, seq: int, payload: memoryview) -> None:
        frame = fmt.encode_frame(fmt.REC_COMMIT, seq, seq - 1, payload)
        if self._size + len(frame) > self.target and self._records > 0:
            prev_last, prev_size = self._last, self._size
            self.finish()
            self.start(fmt.FileHeader(fmt.KIND_SEGMENT, self.store_id, seq, prev_last, prev_size))
        self._f.write(frame)
        self._size += len(frame)
        self._last = seq
        self._records += 1

    def close_log(self) -> None:
        self._f.write(fmt.encode_frame(fmt.REC_CLOSE, self._last, self._last, b""))
        self._size += _HS
        self.finish()

    def finish(self) -> None:
        f = self._f
        f.flush()
        self.fs.fsync(f.fileno())
        f.close()
        self._f = None
        self.files.append(
            {
                "segment": self._name,
                "first_seq": self._first,
                "last_seq": self._last,
                "records": self._records,
                "bytes": self._size,
            }
        )


def execute(plan: Plan, fs: Optional[OSFileAPI] = None) -> dict[str, Any]:
    """Carry out `plan` (the caller holds the store's lock); return the run report (also saved)."""
    fs = fs or DEFAULT
    a = plan.analysis
    directory = a.directory
    if plan.refused or plan.nothing_to_do:
        raise WalstoreError(plan.refused or "nothing to recover")
    run_dir = _make_run_dir(fs, directory, plan.mode)
    report: dict[str, Any] = {
        "tool": "walstore recover",
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "run": _rel(directory, run_dir),
        "status": "running",
        **plan.to_dict(),
    }
    if plan.mode == "skip-damaged" and a.damage is not None:
        _execute_skip(plan, fs, run_dir, report)
    else:
        for act in plan.actions:
            path = os.path.join(directory, act.segment)
            if act.action == "cut":
                act.saved_as = _rel(directory, _cut(fs, path, act.offset, act.end, run_dir))
            elif act.action == "move":
                dest = os.path.join(run_dir, act.segment)
                fs.rename(path, dest)
                act.saved_as = _rel(directory, dest)
        fs.fsync_dir(directory)
        fs.fsync_dir(run_dir)
        report["actions"] = [x.to_dict() for x in plan.actions]
    report["status"] = "done"
    report["report"] = _rel(directory, os.path.join(run_dir, _REPORT_NAME))
    write_report(run_dir, report, fs)
    return report


def _execute_skip(plan: Plan, fs: OSFileAPI, run_dir: str, report: dict[str, Any]) -> None:
    a = plan.analysis
    d = a.damage
    assert d is not None
    directory = a.directory
    seg = a.segments[d.index]
    stage = os.path.join(run_dir, "new")
    fs.mkdir(stage)
    builder = _SegmentBuilder(fs, stage, a.identity.store_id, plan.target_segment_size)
    kept_last = a.last_seq
    if d.offset >= _FH and d.reason != "segment-size":
        assert seg.header is not None and seg.scan is not None
        builder.start(seg.header)
        data = load_segment(seg.path, copy=True)
        builder.copy(memoryview(data)[_FH : d.offset], seg.scan.last_seq, seg.scan.records)
    else:
        kept = [s for s in a.segments[: d.index] if not s.covered]
        if d.reason == "segment-size":
            kept = [s for s in a.segments[: d.index + 1] if not s.covered]
        prev_size = kept[-1].scan.end if kept and kept[-1].scan is not None else 0
        header = fmt.FileHeader(fmt.KIND_SEGMENT, a.identity.store_id, kept_last + 1, kept_last, prev_size)
        builder.start(header)

    def emit(new_seq: int, rec: Record) -> None:
        builder.append_commit(new_seq, rec.payload)

    _walk_salvage(a, d, kept_last, emit)
    builder.close_log()
    fs.fsync_dir(stage)
    moves = [x for x in plan.actions if x.action == "move"]
    journal = {
        "moves_out": [x.segment for x in moves],
        "moves_in": [f["segment"] for f in builder.files],
    }
    report["journal"] = journal
    report["new_segments"] = builder.files
    report["status"] = "staged"
    write_report(run_dir, report, fs)
    _swap(fs, directory, run_dir, journal)
    for x in moves:
        x.saved_as = _rel(directory, os.path.join(run_dir, x.segment))
    for x in plan.actions:
        if x.action == "write":
            x.segment = ", ".join(journal["moves_in"])
            x.saved_as = None
    report["actions"] = [x.to_dict() for x in plan.actions]


def _swap(fs: OSFileAPI, directory: str, run_dir: str, journal: dict[str, list[str]]) -> None:
    """Move the originals out and the new segments in; idempotent, so an interrupted swap can be redone."""
    for name in journal["moves_out"]:
        src, dst = os.path.join(directory, name), os.path.join(run_dir, name)
        if os.path.exists(src) and not os.path.exists(dst):
            fs.rename(src, dst)
    fs.fsync_dir(directory)
    fs.fsync_dir(run_dir)
    stage = os.path.join(run_dir, "new")
    for name in journal["moves_in"]:
        src, dst = os.path.join(stage, name), os.path.join(directory, name)
        if os.path.exists(src) and not os.path.exists(dst):
            fs.rename(src, dst)
    fs.fsync_dir(stage)
    fs.fsync_dir(directory)
    if not os.listdir(stage):
        os.rmdir(stage)  # empty: every new segment is in place


def interrupted_runs(directory: str) -> list[str]:
    """Run directories of skip-damaged recoveries that stopped between staging and the end of the swap."""
    qdir = os.path.join(directory, fmt.QUARANTINE_DIR)
    out: list[str] = []
    if not os.path.isdir(qdir):
        return out
    for name in sorted(os.listdir(qdir)):
        rp = os.path.join(qdir, name, _REPORT_NAME)
        if not os.path.isfile(rp):
            continue
        try:
            with open(rp) as f:
                status = json.load(f).get("status")
        except (OSError, ValueError):
            continue
        if status == "staged":
            out.append(os.path.join(qdir, name))
    return out


def resume_interrupted(directory: str, fs: Optional[OSFileAPI] = None) -> list[str]:
    """Finish the swap of every interrupted skip-damaged run (caller holds the lock); return their dirs."""
    fs = fs or DEFAULT
    done = []
    for run_dir in interrupted_runs(directory):
        with open(os.path.join(run_dir, _REPORT_NAME)) as f:
            report = json.load(f)
        journal = report.get("journal") or {}
        if not os.path.isdir(os.path.join(run_dir, "new")):
            os.mkdir(os.path.join(run_dir, "new"))
        _swap(
            fs,
            directory,
            run_dir,
            {"moves_out": list(journal.get("moves_out", [])), "moves_in": list(journal.get("moves_in", []))},
        )
        report["status"] = "done"
        report["resumed"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
        write_report(run_dir, report, fs)
        done.append(run_dir)
    return done
