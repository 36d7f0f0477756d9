"""The `walstore` command: inspect, verify, dump, recover, export and import a store.

Guarantees:

* `info`, `verify`, `dump` and `export` never write to the store, and work
  while a writer holds it (they read up to a valid point; a tail being
  written right now is reported as "in progress").
* `recover`, `compact` and `import` take the store's writer lock and refuse
  (exit 5) while another process holds it. `recover` deletes nothing: what
  it removes goes to `<store>/quarantine/` with a JSON report.
* Errors are one line on stderr, never a traceback; exit codes are listed
  in EXIT_CODES (and `walstore --help`).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator, Sequence
from typing import IO, Any, NoReturn, Optional, TextIO

from . import core, reader, recover, replay
from . import format as fmt
from .errors import (
    CorruptionError,
    FormatVersionError,
    NotAStoreError,
    StoreLockedError,
    WalstoreError,
)
from .progress import Progress

EXIT_OK = 0
EXIT_TORN = 1
EXIT_CORRUPT = 2
EXIT_USAGE = 3
EXIT_STORE = 4
EXIT_LOCKED = 5
EXIT_ABORTED = 6

EXIT_CODES = {
    EXIT_OK: "success; verify/dump: the log is clean",
    EXIT_TORN: "verify/dump: only a torn tail past the durable point, or a newer snapshot that fails its"
    " checks (open() would cut it, or set it aside)",
    EXIT_CORRUPT: "data before the durable point is damaged (corruption); recover: this mode cannot repair it",
    EXIT_USAGE: "usage error: bad arguments, --yes missing when not interactive, command not available",
    EXIT_STORE: "cannot use the store: missing, not a store, newer format version, permission, I/O error, bad input",
    EXIT_LOCKED: "the store is locked by a running writer (commands that change a store)",
    EXIT_ABORTED: "recover: the operator declined; nothing was changed",
}

PROG = "walstore"


class CLIError(Exception):
    """A one-line error for the operator, with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 3 for usage errors (2 means corruption here)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _out() -> TextIO:
    return sys.stdout


def _emit_json(obj: Any) -> None:
    _out().write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _n(x: int) -> str:
    return f"{x:,}"


# ---------------------------------------------------------------------------
# Key and value encodings (export, import, dump --json)
#
#   str                         -> a JSON string
#   bytes                       -> {"b64": "<base64>"}
#   codec value, json codec     -> {"json": <the JSON value as stored>}
#   codec value, other codec    -> {"codec": "<name>", "b64": "<base64 of the encoded bytes>"}
#
# Keys are str or bytes only. Every form is a string or an object with one
# distinguishing member, so a line decodes to exactly one key and value.


def key_to_json(key: str | bytes) -> Any:
    if isinstance(key, str):
        return key
    return {"b64": base64.b64encode(key).decode("ascii")}


def value_to_json(value: Any, codec: str) -> Any:
    if isinstance(value, recover.Coded):
        if codec == "json":
            try:
                return {"json": json.loads(bytes(value).decode("utf-8"))}
            except (UnicodeDecodeError, ValueError):
                pass
        return {"codec": codec, "b64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, str):
        return value
    return {"b64": base64.b64encode(bytes(value)).decode("ascii")}


def _b64(obj: dict[str, Any], what: str) -> bytes:
    try:
        return base64.b64decode(str(obj["b64"]), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{what}: bad base64 ({exc})") from None


def key_from_json(obj: Any) -> str | bytes:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict) and set(obj) == {"b64"}:
        return _b64(obj, "key")
    raise ValueError('a key is a string or {"b64": ...}')


def value_from_json(obj: Any) -> tuple[Any, Optional[str]]:
    """(value, codec name or None): None for str/bytes; "json" for {"json":...}; the codec for raw ones."""
    if isinstance(obj, str):
        return obj, None
    if isinstance(obj, dict):
        if set(obj) == {"b64"}:
            return _b64(obj, "value"), None
        if set(obj) == {"json"}:
            return obj["json"], "json"
        if set(obj) == {"codec", "b64"} and isinstance(obj["codec"], str):
            return _b64(obj, "value"), obj["codec"]
    raise ValueError('a value is a string, {"b64": ...}, {"json": ...} or {"codec": ..., "b64": ...}')


# ---------------------------------------------------------------------------
# Shared helpers


def _store_dir(path: str) -> str:
    """Check that `path` is a readable store directory; raise CLIError (exit 4) if not."""
    if not os.path.exists(path):
        raise CLIError(f"{path}: no such directory", EXIT_STORE)
    if not os.path.isdir(path):
        raise CLIError(f"{path}: not a directory", EXIT_STORE)
    if not os.access(path, os.R_OK | os.X_OK):
        raise CLIError(f"{path}: permission denied", EXIT_STORE)
    if not os.path.exists(os.path.join(path, fmt.IDENTITY_NAME)):
        raise CLIError(
            f"{path}: not a walstore store (no {fmt.IDENTITY_NAME} file); give the store's directory",
            EXIT_STORE,
        )
    return path


def _segments_total(path: str) -> int:
    total = 0
    for _first, p in replay.list_segments(path):
        try:
            total += os.path.getsize(p)
        except OSError:
            pass
    return total


def _analyze(path: str, *, with_state: bool = True, writer_running: Optional[bool] = None) -> recover.Analysis:
    with Progress(_segments_total(path), "scanning") as bar:
        return recover.analyze(path, with_state=with_state, writer_running=writer_running, on_bytes=bar.advance)


def _seq_range(seg: recover.SegmentInfo) -> str:
    if seg.scan is None:
        return "(bad header)"
    if seg.scan.last_seq < seg.first_seq:
        return f"seq {seg.first_seq}.. (empty)"
    return f"seq {seg.first_seq}..{seg.scan.last_seq}"


# ---------------------------------------------------------------------------
# info and verify


def _verdict_line(a: recover.Analysis) -> str:
    d = a.damage
    v = a.verdict
    if v == "clean":
        if a.writer_running:
            return f"clean so far (a writer is running; valid up to seq {a.last_seq})"
        if a.closed_cleanly:
            return f"clean (closed cleanly at seq {a.last_seq})"
        return f"clean (not closed: the last writer crashed or is running; last seq {a.last_seq})"
    if v == "snapshot-rejected" or d is None:
        names = ", ".join(x.name for x in a.rejected_snapshots)
        return (
            f"SNAPSHOT REJECTED: {names} failed its checks; open() will use the older base and the log,"
            f" and move it to quarantine/ (last seq {a.last_seq})"
        )
    if v == "in-progress":
        return (
            f"a writer (pid {a.holder_pid or '?'}) is appending: {d.length} bytes in progress at"
            f" {d.segment}:{d.offset}; valid up to seq {a.last_seq}"
        )
    if v == "torn-tail":
        return (
            f"TORN TAIL: {d.length} bytes at {d.segment}:{d.offset} (seq {d.seq}) past the durable point;"
            f" open() will cut them and keep them in quarantine/"
        )
    return f"CORRUPT: {d.describe()}"


def _snap_text(snap: recover.SnapshotInfo) -> str:
    if snap.role == "base":
        return f"valid, {_n(snap.ops)} entries: the base open() replays"
    if snap.role == "rejected":
        return f"INVALID ({snap.problem}): open() skips it and moves it to quarantine/"
    if snap.valid:
        return "valid, older than the base (not read)"
    return f"INVALID ({snap.problem}), older than the base (not read)"


def _info_text(a: recover.Analysis) -> str:
    ident = a.identity
    lines = [
        f"store        {os.path.abspath(a.directory)}",
        f"store id     {ident.store_id.hex()}",
        f"format       version {fmt.FORMAT_VERSION}",
        f"codec        {ident.codec}",
        f"created      {ident.created}",
        f"replayer     {a.backend}",
    ]
    if a.writer_running:
        lines.append(f"writer       running: pid {a.holder_pid or '?'} holds the lock (read-only view)")
    else:
        lines.append("writer       none (not locked)")
    if a.snapshots:
        for snap in a.snapshots:
            lines.append(f"snapshot     {snap.name}  seq {snap.seq}  {_n(snap.size)} B  {_snap_text(snap)}")
    else:
        lines.append("snapshot     none")
    total = sum(s.size for s in a.segments)
    lines.append(f"segments     {len(a.segments)} ({_n(total)} bytes)")
    for s in a.segments:
        lines.append(f"  {s.name}  {_seq_range(s):<18} {_n(s.size):>12} B  {s.describe_verdict()}")
    if a.prepared_bytes is not None:
        lines.append(
            f"prepared     {fmt.PREALLOC_READY_NAME}  {_n(a.prepared_bytes)} B of zeros: the next"
            " segment, taken by the next roll (not part of the state)"
        )
    lines.append(f"verdict      {_verdict_line(a)}")
    if a.state is not None:
        if a.verdict == "corruption":
            lines.append(
                f"opens to     nothing: open() raises CorruptionError. Before the damage:"
                f" {_n(a.state.keys)} keys, {_n(a.state.bytes)} bytes, seq {a.last_seq}"
            )
        else:
            lines.append(f"opens to     {_n(a.state.keys)} keys, {_n(a.state.bytes)} bytes, last seq {a.last_seq}")
    elif a.state_note:
        lines.append(f"opens to     {a.state_note}")
    if a.quarantine_files:
        lines.append(f"quarantine   {a.quarantine_files} files in {fmt.QUARANTINE_DIR}/")
    for r in a.interrupted_runs:
        lines.append(f"WARNING      recover run {r} was interrupted; run `walstore recover` to finish it")
    return "\n".join(lines) + "\n"


def _verify_exit(a: recover.Analysis) -> int:
    v = a.verdict
    if v == "corruption":
        return EXIT_CORRUPT
    if v in ("torn-tail", "snapshot-rejected"):
        return EXIT_TORN
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    path = _store_dir(args.dir)
    a = _analyze(path)
    try:
        if args.json:
            _emit_json(a.to_dict())
        else:
            _out().write(_info_text(a))
    finally:
        a.close()
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    path = _store_dir(args.dir)
    a = _analyze(path, with_state=False)
    try:
        code = _verify_exit(a)
        if args.json:
            doc = a.to_dict()
            doc["exit_code"] = code
            _emit_json(doc)
            return code
        out = _out()
        for snap in a.snapshots:
            out.write(f"{snap.name}: seq {snap.seq}: {_snap_text(snap)}\n")
        for seg in a.segments:
            out.write(f"{seg.name}: {_seq_range(seg)}, {seg.records} records: {seg.describe_verdict()}\n")
        out.write(_verdict_line(a) + "\n")
        if code == EXIT_TORN and a.verdict == "torn-tail":
            out.write("the torn tail was never acknowledged; `walstore recover` (or open()) cuts it\n")
        elif code == EXIT_CORRUPT:
            out.write("synced data is damaged; see `walstore recover --help` (try --dry-run first)\n")
        return code
    finally:
        a.close()


# ---------------------------------------------------------------------------
# dump


def _short(text: str, limit: int, full: bool) -> str:
    if full or len(text) <= limit:
        return text
    return text[:limit] + f"...(+{len(text) - limit})"


def _key_text(key: bytes, is_str: bool, full: bool) -> str:
    if is_str:
        return _short(repr(key.decode("utf-8", "replace")), 80, full)
    return _short(repr(key), 80, full)


def _value_text(value: bytes, kind: int, codec: str, full: bool) -> str:
    if kind == fmt.VALUE_STR:
        return "str " + _short(repr(value.decode("utf-8", "replace")), 60, full)
    if kind == fmt.VALUE_BYTES:
        return "bytes " + _short(repr(value), 60, full)
    if codec == "json":
        return "json " + _short(value.decode("utf-8", "replace"), 60, full)
    head = value if full else value[:16]
    more = "" if full or len(value) <= 16 else "..."
    return f"{codec} <{len(value)} bytes> {head.hex()}{more}"


def _op_json(op: fmt.Op, codec: str, full: bool) -> dict[str, Any]:
    key: Any = op.key.decode("utf-8", "replace") if op.key_is_str else key_to_json(op.key)
    out: dict[str, Any] = {"op": fmt.OP_NAMES.get(op.op, str(op.op)), "key": key}
    if op.op == fmt.OP_DELETE:
        return out
    value = op.value
    truncated = not full and len(value) > 256
    if truncated:
        value = value[:256]
    kind = op.value_kind
    if kind == fmt.VALUE_STR:
        out["value"] = value.decode("utf-8", "replace")
    elif kind == fmt.VALUE_BYTES:
        out["value"] = {"b64": base64.b64encode(value).decode("ascii")}
    elif codec == "json" and not truncated:
        out["value"] = value_to_json(recover.Coded(value), codec)
    else:
        out["value"] = {"codec": codec, "b64": base64.b64encode(value).decode("ascii")}
    out["value_size"] = len(op.value)
    if truncated:
        out["truncated"] = True
    return out


def _judge_dump_damage(
    seg_index: int, segs: int, scan_hint: Optional[reader.ScanResult], running: bool, expected: Optional[int]
) -> str:
    """Torn tail or corruption, by the watermark rule, from what this segment shows."""
    if seg_index != segs - 1:
        return "corruption"
    if scan_hint is not None and expected is not None and scan_hint.resync_max_durable >= expected:
        return "corruption"
    return "in-progress" if running else "torn-tail"


class _DumpPrinter:
    def __init__(self, args: argparse.Namespace, codec: str, out: TextIO) -> None:
        self.args = args
        self.codec = codec
        self.out = out
        self.records = 0
        self.seg_name = ""
        self.bar: Optional[Progress] = None
        self.bar_pos = 0

    def progress(self, bar: Progress, seg_start: int) -> None:
        """Move `bar` along within a segment as records go by (every 1024 records)."""
        self.bar = bar
        self.bar_pos = seg_start

    def _tick(self, rec: recover.Record) -> None:
        if self.bar is not None and self.records % 1024 == 0:
            self.bar.advance(max(0, rec.offset - self.bar_pos))
            self.bar_pos = max(self.bar_pos, rec.offset)

    def in_range(self, seq: int) -> bool:
        a = self.args
        return (a.from_seq is None or seq >= a.from_seq) and (a.to_seq is None or seq <= a.to_seq)

    def segment(self, seg: recover.SegmentInfo, size: int, note: str) -> None:
        self.seg_name = seg.name
        if self.args.json:
            self.out.write(
                json.dumps(
                    {
                        "type": "segment",
                        "segment": seg.name,
                        "first_seq": seg.name_seq,
                        "size": size,
                        "note": note or None,
                    }
                )
                + "\n"
            )
        else:
            extra = f"  {note}" if note else ""
            self.out.write(f"# {seg.name}  first seq {seg.name_seq}  {_n(size)} bytes{extra}\n")

    def record(self, rec: recover.Record) -> None:
        a = self.args
        if a.to_seq is not None and rec.seq > a.to_seq and not rec.after_damage:
            raise recover.StopWalk
        if not self.in_range(rec.seq):
            return
        self.records += 1
        self._tick(rec)
        name = fmt.RECORD_TYPE_NAMES.get(rec.rtype, str(rec.rtype))
        ops: list[fmt.Op] = []
        bad = ""
        if rec.rtype == fmt.REC_COMMIT:
            try:
                ops = list(fmt.iter_ops(rec.payload))
            except fmt.PayloadError as exc:  # pragma: no cover - the scanner checked the payload
                bad = str(exc)
        if a.json:
            doc: dict[str, Any] = {
                "type": name,
                "segment": self.seg_name,
                "offset": rec.offset,
                "seq": rec.seq,
                "durable": rec.durable,
                "length": rec.length,
                "after_damage": rec.after_damage,
            }
            if rec.rtype == fmt.REC_COMMIT:
                doc["ops"] = [_op_json(op, self.codec, a.full) for op in ops]
            self.out.write(json.dumps(doc) + "\n")
            return
        mark = "  [after damage]" if rec.after_damage else ""
        nops = f"  {len(ops)} op{'s' if len(ops) != 1 else ''}" if rec.rtype == fmt.REC_COMMIT else ""
        self.out.write(
            f"seq {rec.seq:<8} durable {rec.durable:<8} {name:<7} @{rec.offset:<9} len {rec.length}{nops}{mark}\n"
        )
        for op in ops:
            key = _key_text(op.key, op.key_is_str, a.full)
            if op.op == fmt.OP_PUT:
                value = _value_text(op.value, op.value_kind, self.codec, a.full)
                self.out.write(f"    put    {key} = {value}\n")
            elif op.op == fmt.OP_DELETE:
                self.out.write(f"    delete {key}\n")
            else:
                value = _value_text(op.value, fmt.VALUE_CODEC, self.codec, a.full)
                self.out.write(f"    call   {key} args {value}\n")
        if bad:
            self.out.write(f"    (payload does not decode: {bad})\n")

    def damage(self, d: recover.DamagedRange, verdict: str) -> None:
        if self.args.json:
            self.out.write(
                json.dumps(
                    {
                        "type": "damaged",
                        "segment": self.seg_name,
                        "offset": d.offset,
                        "end": d.end,
                        "bytes": d.end - d.offset,
                        "reason": d.reason,
                        "detail": d.detail,
                        "verdict": verdict or None,
                        "header_as_read": d.header,
                    }
                )
                + "\n"
            )
            return
        h = d.header
        reads = ""
        if h is not None:
            tname = fmt.RECORD_TYPE_NAMES.get(h["type"], f"type {h['type']}")
            reads = f"; header reads: {tname} seq {h['seq']} durable {h['durable']} length {h['length']}"
        what = f" [{verdict}]" if verdict else ""
        detail = f" ({d.detail})" if d.detail else ""
        self.out.write(
            f"!! DAMAGED @{d.offset}..{d.end} ({_n(d.end - d.offset)} bytes): {d.reason}{detail}{reads}{what}\n"
        )


def cmd_dump(args: argparse.Namespace) -> int:
    path = _store_dir(args.dir)
    ident = core.read_identity(path)
    running = core.is_locked(path)
    out = _out()
    printer = _DumpPrinter(args, ident.codec, out)
    listed = replay.list_segments(path)
    worst = EXIT_OK
    show_bar = not out.isatty()
    total = _segments_total(path)
    prev_last: Optional[int] = None
    from . import snapshot as snapmod

    for seq, spath in snapmod.list_snapshots(path)[:1]:
        name = os.path.basename(spath)
        if args.json:
            out.write(json.dumps({"type": "snapshot", "snapshot": name, "seq": seq}) + "\n")
        else:
            out.write(f"# {name}: the state as of seq {seq} (not dumped); the log follows\n")
    with Progress(total, "dumping", enabled=None if show_bar else False) as bar:
        for i, (first, spath) in enumerate(listed):
            nxt = listed[i + 1][0] if i + 1 < len(listed) else None
            if args.from_seq is not None and nxt is not None and nxt <= args.from_seq:
                prev_last = nxt - 1
                bar.advance(os.path.getsize(spath))
                continue
            if args.to_seq is not None and first > args.to_seq:
                break
            seg = recover.SegmentInfo(os.path.basename(spath), spath, 0, first)
            data = recover.load_segment(spath, copy=i == len(listed) - 1)
            try:
                size = len(data)
                seg_done = bar.done + size
                printer.progress(bar, 0)
                try:
                    header = replay.check_header(spath, recover._b(data), fmt.KIND_SEGMENT, ident.store_id)
                    note = ""
                    if header.first_seq != first:
                        note = f"BAD HEADER: says first seq {header.first_seq}"
                    elif prev_last is not None and header.first_seq != prev_last + 1:
                        note = f"CHAIN BROKEN: expected first seq {prev_last + 1} (missing segment?)"
                except CorruptionError as exc:
                    header = None
                    note = f"BAD HEADER ({exc.reason}): {str(exc).split('; ', 1)[-1]}"
                printer.segment(seg, size, note)
                if note:
                    worst = EXIT_CORRUPT
                    if not args.raw:
                        out.write("stopping at the damage; --raw goes on past it\n" if not args.json else "")
                        break
                    if header is None and not seg_magic_own(data, ident.store_id):
                        continue
                scan_hint = (
                    replay.scan_records(
                        recover._b(data),
                        fmt.FILE_HEADER_SIZE,
                        header.first_seq if header else first,
                        reader.SEGMENT_TYPES,
                    )
                    if header is not None
                    else None
                )
                expected = scan_hint.last_seq + 1 if scan_hint is not None else None
                verdict = ""
                if scan_hint is not None and scan_hint.damage is not None:
                    verdict = _judge_dump_damage(i, len(listed), scan_hint, running, expected)
                damages: list[recover.DamagedRange] = []

                def on_damage(
                    d: recover.DamagedRange,
                    verdict: str = verdict,
                    seen: list[recover.DamagedRange] = damages,
                ) -> None:
                    seen.append(d)
                    printer.damage(d, verdict if len(seen) == 1 else "")

                try:
                    recover.walk_segment(
                        data,
                        fmt.FILE_HEADER_SIZE,
                        header.first_seq if header else None,
                        printer.record,
                        on_damage,
                        resync=args.raw,
                    )
                except recover.StopWalk:
                    break
                if damages:
                    code = {"corruption": EXIT_CORRUPT, "torn-tail": EXIT_TORN}.get(verdict, EXIT_CORRUPT)
                    if verdict == "in-progress":
                        code = EXIT_OK
                    worst = max(worst, code)
                    if not args.raw:
                        if not args.json and verdict != "in-progress":
                            out.write("stopping at the damage; --raw goes on past it\n")
                        break
                prev_last = scan_hint.last_seq if scan_hint is not None else None
            finally:
                bar.advance(max(0, seg_done - bar.done))
                recover.close_buffer(data)
    out.flush()
    return worst


def seg_magic_own(data: recover.Buffer, store_id: bytes) -> bool:
    """The file starts with walstore's magic and carries this store's id (a header worth resyncing)."""
    head = bytes(memoryview(data)[:32])
    return head[:8] == fmt.MAGIC and head[16:32] == store_id


# ---------------------------------------------------------------------------
# recover


def _plan_text(plan: recover.Plan) -> str:
    a = plan.analysis
    d = a.damage
    lines = []
    if d is not None:
        lines.append(f"damage:   {d.kind}: {d.describe()}")
    lines.append(f"mode:     {plan.mode} ({recover.MODE_HELP[plan.mode]})")
    salvaged = ""
    if plan.mode == "skip-damaged":
        salvaged = f", plus {_n(plan.salvaged)} salvaged records after the damage"
    lines.append(f"keeps:    every record up to seq {plan.kept_last_seq}{salvaged}")
    for act in plan.actions:
        seq = f", seq {act.first_seq}..{act.last_seq}" if act.first_seq is not None else ""
        if act.action == "cut":
            lines.append(
                f"  cut   {act.segment} bytes {act.offset}..{act.end} ({_n(act.bytes)} B,"
                f" {act.records} valid records{seq}) -> quarantine; reason: {act.reason}"
            )
        elif act.action == "move" and fmt.SNAPSHOT_NAME.match(act.segment):
            lines.append(f"  move  {act.segment} ({_n(act.bytes)} B) -> quarantine; {act.reason}")
        elif act.action == "move":
            lines.append(
                f"  move  {act.segment} ({_n(act.bytes)} B, holds {act.records} records{seq})"
                f" -> quarantine; {act.reason}"
            )
        else:
            lines.append(f"  write new segment files: {act.records} records{seq}; {act.reason}")
    for note in plan.notes:
        lines.append(f"note:     {note}")
    return "\n".join(lines) + "\n"


def _loss_banner(plan: recover.Plan) -> str:
    if plan.dropped_commits == 0 and plan.dropped_bytes == 0:
        return ""
    ranges = ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in plan.dropped_ranges) or "none"
    commits = f"{_n(plan.dropped_commits)} COMMIT{'S' if plan.dropped_commits != 1 else ''}"
    single = len(plan.dropped_ranges) == 1 and plan.dropped_ranges[0][0] == plan.dropped_ranges[0][1]
    numbers = "sequence number" if single else "sequence numbers"
    text = (
        f"!!! DATA LOSS: {commits} ({numbers} {ranges}) AND {_n(plan.dropped_bytes)}"
        " BYTES WILL BE DROPPED from the log (kept in quarantine/, nothing is deleted) !!!"
    )
    if plan.mode == "torn-tail":
        text = (
            f"{_n(plan.dropped_bytes)} bytes past the durable point will be cut (seq {ranges}, never"
            " acknowledged by a sync commit) and kept in quarantine/"
        )
    if plan.mode == "skip-damaged" and plan.salvaged:
        text += (
            f"\n!!! {_n(plan.salvaged)} valid records after the damage are KEPT WITH NEW SEQUENCE"
            " NUMBERS; they were written by an application that had seen the lost commits !!!"
        )
    return text + "\n"


def _confirm(prompt: str) -> bool:
    sys.stderr.write(prompt)
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")


def cmd_recover(args: argparse.Namespace) -> int:
    path = _store_dir(args.dir)
    out = _out()
    lock: Optional[core.StoreLock] = None
    if not args.dry_run:
        lock = core.StoreLock(path)  # StoreLockedError -> exit 5
    try:
        resumed: list[str] = []
        if lock is not None:
            resumed = recover.resume_interrupted(path)
            for r in resumed:
                sys.stderr.write(f"finished the interrupted recover run {os.path.basename(r)}\n")
        a = _analyze(path, with_state=False, writer_running=False if lock is not None else None)
        try:
            plan = recover.plan_recovery(a, args.mode, args.segment_size)
            if plan.refused:
                if args.json:
                    _emit_json({**plan.to_dict(), "exit_code": EXIT_CORRUPT})
                else:
                    sys.stderr.write(f"{PROG} recover: refusing: {plan.refused}\n")
                if a.verdict == "in-progress":
                    return EXIT_LOCKED
                return EXIT_CORRUPT
            if plan.nothing_to_do:
                if args.json:
                    _emit_json({**plan.to_dict(), "status": "nothing to do", "resumed": resumed})
                else:
                    out.write(f"nothing to recover: {_verdict_line(a)}\n")
                return EXIT_OK
            if not args.json:
                out.write(_plan_text(plan))
            banner = _loss_banner(plan)
            if args.dry_run:
                if args.json:
                    _emit_json({**plan.to_dict(), "status": "dry run: nothing changed"})
                else:
                    sys.stderr.write(banner)
                    out.write("dry run: nothing changed\n")
                return EXIT_OK
            sys.stderr.write(banner)
            if not args.yes:
                if not sys.stdin.isatty():
                    raise CLIError(
                        "refusing to change the store without confirmation: not interactive;"
                        " re-run with --yes (or --dry-run to see the plan)",
                        EXIT_USAGE,
                    )
                if not _confirm("Proceed? [y/N] "):
                    sys.stderr.write("aborted; nothing was changed\n")
                    return EXIT_ABORTED
            report = recover.execute(plan)
        finally:
            a.close()
        after = recover.analyze(path, writer_running=False)
        try:
            report["after"] = {
                "verdict": after.verdict,
                "last_seq": after.last_seq,
                "keys": after.state.keys if after.state else None,
            }
            ok = after.verdict == "clean"
        finally:
            after.close()
        recover.write_report(os.path.dirname(os.path.join(path, str(report["report"]))), report)
        if args.json:
            _emit_json(report)
        else:
            out.write(f"done. report: {report['report']}\n")
            ar = report["after"]
            if ok:
                out.write(f"the store now opens: {ar['keys']} keys, last seq {ar['last_seq']}\n")
            else:
                out.write(f"WARNING: the store still has problems ({ar['verdict']}); run `walstore verify`\n")
        return EXIT_OK if ok else EXIT_CORRUPT
    finally:
        if lock is not None:
            lock.release()


# ---------------------------------------------------------------------------
# compact, export, import


def _open_existing(path: str) -> Any:
    import walstore

    ident = core.read_identity(path)
    sizes = [os.path.getsize(p) for _s, p in replay.list_segments(path)]
    extra: dict[str, Any] = {"segment_size": max(sizes)} if sizes and max(sizes) >= 4096 else {}
    try:
        return walstore.open(path, create=False, codec=ident.codec, **extra)
    except ValueError as exc:
        raise CLIError(str(exc), EXIT_STORE) from None


def cmd_compact(args: argparse.Namespace) -> int:
    path = _store_dir(args.dir)
    from .store import Store

    if not hasattr(Store, "compact"):
        raise CLIError("compact: not available in this version (Store.compact() is not implemented yet)", EXIT_USAGE)
    before = _segments_total(path)
    db = _open_existing(path)
    try:
        result = db.compact()
    finally:
        db.close()
    after = _segments_total(path)
    out = _out()
    if result is None:
        out.write(f"nothing to compact in {path}: the newest snapshot already covers the log\n")
        return EXIT_OK
    out.write(
        f"compacted {path}: snapshot {os.path.basename(result.path)} (seq {result.seq},"
        f" {_n(result.ops)} entries, {_n(result.size)} bytes);"
        f" segments {_n(before)} -> {_n(after)} bytes\n"
    )
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    path = _store_dir(args.dir)
    analysis, state = recover.load_state(path, allow_prefix=args.prefix)
    codec = analysis.identity.codec
    if analysis.verdict == "corruption":
        sys.stderr.write(f"exporting the {len(state)} keys before the damage (seq {analysis.last_seq})\n")
    elif analysis.verdict in ("torn-tail", "in-progress"):
        sys.stderr.write(f"note: {_verdict_line(analysis)}; exported up to seq {analysis.last_seq}\n")
    out: IO[str] = _out() if args.output == "-" else open(args.output, "w")  # noqa: SIM115
    try:
        dumps = json.dumps
        for key, value in state.items():
            out.write(dumps({"key": key_to_json(key), "value": value_to_json(value, codec)}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
        else:
            out.flush()
    return EXIT_OK


def _lines(source: str) -> Iterator[tuple[int, str]]:
    f: IO[str] = sys.stdin if source == "-" else open(source, encoding="utf-8")  # noqa: SIM115
    try:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line
    finally:
        if f is not sys.stdin:
            f.close()


def cmd_import(args: argparse.Namespace) -> int:
    import walstore

    from .codec import get_codec

    if args.batch < 1:
        raise CLIError("--batch must be at least 1", EXIT_USAGE)
    path = args.dir
    if args.file != "-" and not os.path.isfile(args.file):
        raise CLIError(f"{args.file}: no such file", EXIT_STORE)
    if os.path.exists(os.path.join(path, fmt.IDENTITY_NAME)):
        db = _open_existing(path)
    else:
        if os.path.isdir(path) and [n for n in os.listdir(path) if n != fmt.LOCK_NAME]:
            raise CLIError(f"{path}: not empty and not a walstore store", EXIT_STORE)
        db = walstore.open(path, codec=args.codec)
    codec = get_codec(core.read_identity(path).codec)
    count = 0
    batches = 0
    try:
        tx = db.transaction()
        pending = 0
        for n, line in _lines(args.file):
            try:
                doc = json.loads(line)
                if not isinstance(doc, dict) or set(doc) != {"key", "value"}:
                    raise ValueError('each line is {"key": ..., "value": ...}')
                key = key_from_json(doc["key"])
                value, vcodec = value_from_json(doc["value"])
                if vcodec is not None and vcodec != "json":
                    if vcodec != codec.name:
                        raise ValueError(f"the value was encoded by codec {vcodec!r}; this store uses {codec.name!r}")
                    value = codec.decode(value)
            except ValueError as exc:
                tx.rollback()
                raise CLIError(f"{args.file}:{n}: {exc}; {count} records were imported before it", EXIT_STORE) from None
            tx[key] = value
            pending += 1
            count += 1
            if pending >= args.batch:
                tx.commit()
                batches += 1
                tx = db.transaction()
                pending = 0
        if pending:
            tx.commit()
            batches += 1
        else:
            tx.rollback()
        keys = len(db)
    finally:
        db.close()
    _out().write(f"imported {_n(count)} records in {batches} transactions; the store holds {_n(keys)} keys\n")
    return EXIT_OK


# ---------------------------------------------------------------------------
# bench (walstore/bench.py, another engineer's module)


def run_bench(argv: Sequence[str]) -> int:
    try:
        from . import bench
    except ModuleNotFoundError as exc:
        if exc.name in ("walstore.bench", f"{__package__}.bench"):
            raise CLIError("bench: not available in this version (walstore/bench.py is missing)", EXIT_USAGE) from None
        raise
    parser = _Parser(prog=f"{PROG} bench", description="Measure commit throughput and latency.")
    bench.add_arguments(parser)
    args = parser.parse_args(list(argv))
    return int(bench.run(args))


# ---------------------------------------------------------------------------
# demo

_CHILD = r"""
import os, sys, walstore
db = walstore.open(sys.argv[1], durability="sync", segment_size=4096)
out = sys.stdout
out.write("child: acknowledged seq")
for i in range(1, int(sys.argv[2]) + 3):
    db[f"order:{i:04d}"] = {"n": i, "total": i * 7}
    out.write(f" {db.last_seq}")
    out.flush()
os._exit(0)  # only if the failpoint did not fire: die without closing all the same
"""


def _find_record(path: str, store_id: bytes, seq: int) -> Optional[tuple[str, int, int]]:
    """(segment path, offset, frame size) of the COMMIT carrying `seq`, if present."""
    for _first, spath in reversed(replay.list_segments(path)):
        data = recover.load_segment(spath, copy=True)
        header = fmt.decode_file_header(memoryview(data)[: fmt.FILE_HEADER_SIZE])
        found: list[tuple[str, int, int]] = []

        def note(rec: recover.Record, spath: str = spath, found: list[tuple[str, int, int]] = found) -> None:
            if rec.rtype == fmt.REC_COMMIT and rec.seq == seq:
                found.append((spath, rec.offset, rec.size))

        recover.walk_segment(data, fmt.FILE_HEADER_SIZE, header.first_seq, note, None, resync=False)
        if found:
            return found[0]
    return None


def cmd_demo(args: argparse.Namespace) -> int:
    import walstore

    out = _out()
    if args.dir:
        path = args.dir
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise CLIError(f"{path}: choose a new or empty directory for the demo", EXIT_STORE)
    else:
        path = tempfile.mkdtemp(prefix="walstore-demo-")
    rng = random.Random(args.seed)
    kill_at = rng.randint(12, 30)
    point = rng.choice(["commit.after_write", "commit.after_sync"])
    where = {
        "commit.after_write": "after writing its record, before the fdatasync",
        "commit.after_sync": "after the fdatasync, before returning to the caller",
    }[point]
    out.write(f"walstore demo: store {path}\n")
    out.write(f"a child process commits orders in sync mode; it will die (SIGKILL) during commit {kill_at}, {where}\n")
    out.flush()
    env = dict(os.environ)
    env["WALSTORE_FAILPOINT"] = f"{point}:{kill_at}"
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, path, str(kill_at)], stdout=subprocess.PIPE, env=env, text=True
    )
    assert proc.stdout is not None
    acked: list[int] = []
    buf = ""
    while True:
        chunk = proc.stdout.read(1)
        if not chunk:
            break
        out.write(chunk)
        out.flush()
        buf += chunk
    proc.wait()
    for tok in buf.split()[3:]:
        if tok.isdigit():
            acked.append(int(tok))
    out.write("\n")
    died = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    if proc.returncode == -signal.SIGKILL:
        died = "SIGKILL"
    last_ack = max(acked) if acked else 0
    out.write(f"child died ({died}); the last commit it acknowledged was seq {last_ack}\n")
    ident = core.read_identity(path)
    if last_ack >= kill_at:
        out.write("the kill point was never reached (failpoints off?); the child stopped without closing\n")
    elif point == "commit.after_write":
        rec = _find_record(path, ident.store_id, kill_at)
        if rec is not None:
            spath, off, size = rec
            cut = size // 2
            with open(spath, "r+b") as f:
                f.seek(off + size - cut)
                f.write(bytes(cut))
            out.write(
                f"simulating a power cut: commit {kill_at} was never synced, so the demo zeroes its"
                f" last {cut} bytes (as a lost page would) in {os.path.basename(spath)}\n"
            )
    else:
        out.write(f"commit {kill_at} was synced but never acknowledged: a power cut cannot take it back\n")
    db = walstore.open(path)
    try:
        r = db.recovery
        missing = [i for i in range(1, last_ack + 1) if f"order:{i:04d}" not in db]
        out.write(f"reopened: {len(db)} orders, last seq {db.last_seq} (replayer: {r.backend})\n")
        if missing:
            out.write(f"LOST ACKNOWLEDGED COMMITS: {missing}\n")
        else:
            out.write(f"every acknowledged commit (1..{last_ack}) is present\n")
        if db.last_seq > last_ack:
            out.write(f"seq {db.last_seq} survived too: it was durable; only its acknowledgement was lost\n")
        t = r.torn_tail
        if t is not None:
            out.write(
                f"torn tail cut: {t.length} bytes at {os.path.basename(t.path)} offset {t.offset}"
                f" (seq {t.seq}, never acknowledged) -> {os.path.relpath(r.quarantined or '', path)}\n"
            )
        else:
            out.write("no torn tail to cut\n")
    finally:
        db.close()
    out.write(f"look around: {PROG} info {path}; {PROG} dump {path} --from {max(1, last_ack - 2)}\n")
    return EXIT_OK if not missing else EXIT_CORRUPT


# ---------------------------------------------------------------------------
# The parser


_EPILOG = (
    """\
examples:
  walstore info data/app                       what is in the store, what open() would do
  walstore verify data/app && echo clean       exit 0 clean, 1 torn tail, 2 corruption
  walstore dump data/app --from 1200 --to 1210
  walstore dump data/app --raw --json | jq .   every record, past damage too
  walstore recover data/app --dry-run          the plan, without changing anything
  walstore recover data/app --mode last-consistent --yes
  walstore export data/app > app.jsonl         then: walstore import newdir app.jsonl
  walstore demo                                watch a crash and the recovery

exit codes:
"""
    + "\n".join(f"  {k}  {v}" for k, v in EXIT_CODES.items())
    + """

After a crash, start with `walstore verify`, then `walstore recover --dry-run`;
docs/RECOVERY.md is the runbook.
"""
)

_RECOVER_EPILOG = """\
modes (named after what they keep):
  torn-tail        (default) cut the torn tail past the durable point, exactly
                   what open() does; refuse (exit 2) if synced data is damaged
  last-consistent  keep every record before the first damage; cut the rest of
                   that segment and move every later segment to quarantine/
  skip-damaged     keep the records before the damage AND the valid records
                   after it: the log from the damage on is rewritten into new
                   segments with consecutive sequence numbers; only the
                   damaged records are lost (counted, loudly)

Nothing is deleted: cut bytes and removed files go to <store>/quarantine/<run>/
with report.json (segment, offset, sequence range, bytes and records dropped,
reason). Without --yes the plan is shown and you are asked; non-interactive
use needs --yes.

examples:
  walstore recover data/app --dry-run
  walstore recover data/app --mode last-consistent --dry-run --json
  walstore recover data/app --mode skip-damaged --yes
"""


def _seq(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a sequence number: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError("sequence numbers are positive")
    return v


def _size(text: str) -> int:
    t = text.strip().lower()
    mult = 1
    for suffix, m in (("k", 1 << 10), ("m", 1 << 20), ("g", 1 << 30)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
    try:
        v = int(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 65536, 64k, 64m)") from None
    if v < 4096:
        raise argparse.ArgumentTypeError("a segment is at least 4096 bytes")
    return v


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(
        prog=PROG,
        description="Inspect, verify, dump, repair, export and import a walstore store (a directory"
        " holding IDENTITY and seg-*.wal files).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"walstore {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, help_: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=description,
            epilog=epilog or None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    sp = add(
        "info",
        "what is in a store and what open() would do",
        "Show the store id, format version, replayer, snapshot, every segment with its sequence"
        " range, size and verdict, and what the store opens to. Read-only; works while a writer"
        " runs.",
        "example:\n  walstore info data/app\n  walstore info data/app --json",
    )
    sp.add_argument("dir", metavar="DIR", help="the store's directory")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_info)

    sp = add(
        "verify",
        "check every CRC, sequence number and watermark",
        "Check the whole store. Exit 0 when clean (a tail being written by a running writer counts"
        " as clean), 1 when only a torn tail would be cut, 2 when data before the durable point is"
        " damaged. Read-only.",
        "example:\n  walstore verify data/app; echo $?",
    )
    sp.add_argument("dir", metavar="DIR", help="the store's directory")
    sp.add_argument("--json", action="store_true", help="machine-readable output (with exit_code)")
    sp.set_defaults(func=cmd_verify)

    sp = add(
        "dump",
        "print every record, decoded",
        "Print the records of the log in order: type, sequence number, watermark, offset and the"
        " operations with their keys and (shortened) values. Streams segment by segment, so it"
        " works on logs larger than memory. Codec values are shown encoded: dump never unpickles."
        " Exit codes as for verify, for the part of the log read.",
        "examples:\n  walstore dump data/app --from 100 --to 120\n"
        "  walstore dump data/app --raw          also the records past damage, marked\n"
        "  walstore dump data/app --json --full  JSON lines, values whole",
    )
    sp.add_argument("dir", metavar="DIR", help="the store's directory")
    sp.add_argument("--from", dest="from_seq", type=_seq, metavar="SEQ", help="first sequence number to show")
    sp.add_argument("--to", dest="to_seq", type=_seq, metavar="SEQ", help="last sequence number to show")
    sp.add_argument("--json", action="store_true", help="one JSON object per line")
    sp.add_argument(
        "--raw",
        action="store_true",
        help="keep going past damage (resync on 8-byte boundaries), showing damaged ranges",
    )
    sp.add_argument("--full", action="store_true", help="do not shorten keys and values")
    sp.set_defaults(func=cmd_dump)

    sp = add(
        "recover",
        "repair a damaged store (nothing is deleted)",
        "Repair the store so that open() succeeds. Takes the store's lock: refuses while a writer runs.",
        _RECOVER_EPILOG,
    )
    sp.add_argument("dir", metavar="DIR", help="the store's directory")
    sp.add_argument("--mode", choices=recover.MODES, default="torn-tail", help="what to keep (see below)")
    sp.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    sp.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    sp.add_argument("--json", action="store_true", help="print the run's report as JSON")
    sp.add_argument(
        "--segment-size",
        type=_size,
        metavar="BYTES",
        help="skip-damaged: size of the rewritten segments (default: the largest existing)",
    )
    sp.set_defaults(func=cmd_recover)

    sp = add(
        "compact",
        "rewrite the store as a snapshot (when this version has it)",
        "Call Store.compact(): write a snapshot of the state and drop the segments it covers.",
    )
    sp.add_argument("dir", metavar="DIR", help="the store's directory")
    sp.set_defaults(func=cmd_compact)

    sp = add(
        "export",
        "write the state as JSON lines",
        'Write the state open() would build as JSON lines on stdout, one {"key": K, "value": V}'
        " per key. Read-only; streaming. Encoding: a str is a JSON string; bytes are"
        ' {"b64": "..."}; a codec value is {"json": <value>} (json codec) or'
        ' {"codec": "<name>", "b64": "..."} (other codecs, left encoded).',
        "examples:\n  walstore export data/app > app.jsonl\n  walstore export data/app --prefix > before-damage.jsonl",
    )
    sp.add_argument("dir", metavar="DIR", help="the store's directory")
    sp.add_argument(
        "--prefix",
        action="store_true",
        help="on a corrupt store, export the state before the first damage instead of failing",
    )
    sp.add_argument("-o", "--output", default="-", metavar="FILE", help="write here instead of stdout")
    sp.set_defaults(func=cmd_export)

    sp = add(
        "import",
        "load JSON lines (the export format) into a store",
        'Read {"key": K, "value": V} lines (the export format) and put them into the store,'
        " creating it if needed, in transactions of --batch records. Values encoded by another"
        " codec than the store's are refused. A pickle-codec value is unpickled: import only files"
        " you trust into pickle stores.",
        "examples:\n  walstore import newdir app.jsonl\n  gunzip -c app.jsonl.gz | walstore import newdir -",
    )
    sp.add_argument("dir", metavar="DIR", help="the store's directory (created if missing)")
    sp.add_argument("file", metavar="FILE", help="JSON lines file, or - for stdin")
    sp.add_argument("--batch", type=int, default=1000, metavar="N", help="records per transaction (1000)")
    sp.add_argument(
        "--codec", choices=("json", "pickle"), default="json", help="codec of a store created by the import (json)"
    )
    sp.set_defaults(func=cmd_import)

    sp = add(
        "bench",
        "measure commit throughput and latency",
        "Run walstore's benchmark (walstore/bench.py); `walstore bench --help` lists its options.",
    )
    sp.set_defaults(func=None)

    sp = add(
        "demo",
        "watch a crash and what recovery keeps",
        "A child process commits in sync mode, printing each acknowledged commit, and is killed in"
        " the middle of a commit at a random point. The store is reopened and the demo shows what"
        " survived: every acknowledged commit, and the torn tail (if any) that was cut and where its"
        " bytes went. Takes about a second.",
        "example:\n  walstore demo\n  walstore demo ./walstore-demo",
    )
    sp.add_argument("dir", metavar="DIR", nargs="?", help="a new or empty directory (default: a fresh temp dir)")
    sp.add_argument("--seed", type=int, help="random seed (the kill point)")
    sp.set_defaults(func=cmd_demo)
    return p


# ---------------------------------------------------------------------------
# Entry point


def _run(argv: list[str]) -> int:
    if argv and argv[0] == "bench":
        return run_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    func = args.func
    if func is None:  # pragma: no cover - bench is dispatched above
        return run_bench([])
    return int(func(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The console script. Returns the exit code (EXIT_CODES)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except CLIError as exc:
        return _error(str(exc), exc.code)
    except StoreLockedError as exc:
        return _error(f"{exc}; stop the writer first (read-only commands work meanwhile)", EXIT_LOCKED)
    except FormatVersionError as exc:
        return _error(f"{exc}; use a newer walstore", EXIT_STORE)
    except NotAStoreError as exc:
        return _error(str(exc), EXIT_STORE)
    except CorruptionError as exc:
        return _error(str(exc), EXIT_CORRUPT)
    except PermissionError as exc:
        return _error(f"permission denied: {exc.filename or exc}", EXIT_STORE)
    except FileNotFoundError as exc:
        return _error(f"no such file or directory: {exc.filename or exc}", EXIT_STORE)
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    except OSError as exc:
        return _error(f"I/O error: {exc}", EXIT_STORE)
    except WalstoreError as exc:
        return _error(str(exc), EXIT_STORE)
    except Exception as exc:
        if os.environ.get("WALSTORE_DEBUG"):
            raise
        return _error(f"internal error: {exc!r} (WALSTORE_DEBUG=1 shows the traceback)", EXIT_STORE)


def _silence_stdout() -> None:
    """After EPIPE (`walstore dump | head`), keep the interpreter's final flush quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _error(message: str, code: int) -> int:
    first = message.splitlines()[0] if message else "error"
    sys.stderr.write(f"{PROG}: {textwrap.shorten(first, 400, placeholder='...')}\n")
    return code
