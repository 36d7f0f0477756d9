"""`walstore bench`: measure what durability costs on the disk under a directory.

Guarantees:

* Everything is written inside a private temporary subdirectory of the named
  directory, which is removed afterwards, also on an error, Ctrl-C or
  SIGTERM (try/finally). Nothing else in the directory is touched.
* Raw figures are timed per operation in C (`walstore._walstore_bench`,
  CLOCK_MONOTONIC around each call) when that module is built, otherwise by a
  Python loop (os.pwrite / os.fdatasync with time.perf_counter_ns), and the
  output says which ("timer: python (C module not built)"). WALSTORE_PURE=1
  forces the Python timer.
* Every return code is checked. A failed write or sync stops the bench with
  an error (exit status 1), except the reported "n/a" cases: O_DIRECT refused
  with EINVAL, RWF_DSYNC refused with ENOSYS/EOPNOTSUPP.
* `--json` prints one JSON object (schema in docs/BENCHMARKS.md). Latencies
  are in microseconds; percentiles are nearest-rank, so p50 <= p99 <= p99.9
  <= max always holds.

Entry points: `add_arguments(parser)` and `run(args)` (the `walstore bench`
subcommand), and `main(argv)` for `python -m walstore.bench DIR`.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import math
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Optional, Protocol

from .fileapi import OSFileAPI
from .progress import Progress

SCHEMA_VERSION = 1
ETCD_FDATASYNC_P99_MS = 10.0
"""etcd's guideline: the 99th percentile of fdatasync on a WAL disk should stay under 10 ms."""
FAST_SYNC_US = 20.0
"""A sync faster than this (p50) cannot be a flush to stable storage on any device."""
FAST_SYNC_WRITE_BACK_US = 50.0
"""A sync faster than this (p50) on a "write back" cache device is probably not flushing it."""
FIO_TOLERANCE = 0.25

FULL_SIZES = (128, 512, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20)
QUICK_SIZES = (4 << 10,)
REFERENCE_SIZE = 4 << 10
KEY_LEN = 9
"""walstore keys are 9 ASCII bytes: "TT-IIIIII" (thread, index)."""
KEYS_PER_THREAD = 256
"""Keys are reused modulo this, so the in-memory state stays small."""

# Methods of rawio_run (_native/rawio.h).
OP_NOSYNC, OP_FSYNC, OP_FDATASYNC, OP_PLAIN, OP_RWF_DSYNC = 0, 1, 2, 3, 4

_O_DSYNC: int = getattr(os, "O_DSYNC", 0)
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
_O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)


class BenchError(Exception):
    """A measurement failed (an I/O error other than the reported n/a cases)."""


@dataclass(frozen=True)
class Method:
    """One raw way of making a write durable."""

    name: str
    label: str
    open_flags: int
    op: int

    @property
    def has_sync_call(self) -> bool:
        return self.op in (OP_FSYNC, OP_FDATASYNC)


METHODS = (
    Method("nosync", "write, no sync", 0, OP_NOSYNC),
    Method("fsync", "write+fsync", 0, OP_FSYNC),
    Method("fdatasync", "write+fdatasync", 0, OP_FDATASYNC),
    Method("o_dsync", "O_DSYNC write", _O_DSYNC, OP_PLAIN),
    Method("o_direct_dsync", "O_DIRECT|O_DSYNC", _O_DIRECT | _O_DSYNC, OP_PLAIN),
    Method("rwf_dsync", "pwritev2 RWF_DSYNC", 0, OP_RWF_DSYNC),
)
METHOD_BY_NAME = {m.name: m for m in METHODS}
MODES = ("append", "overwrite")
MODE_TITLES = {
    "append": "appending to a growing file",
    "overwrite": "overwriting a pre-written (zero-filled, fsynced) file",
}
DURABILITIES = ("sync", "interval", "none")


@dataclass(frozen=True)
class Profile:
    """How much to measure: `--quick` or the full run."""

    quick: bool
    sizes: tuple[int, ...]
    raw_max_bytes: int
    raw_max_ops: int
    raw_min_ops: int
    raw_budget_s: float
    commit_max_ops: int
    commit_min_ops: int
    commit_budget_s: float
    threads: tuple[int, ...]
    group_seconds: float
    snapshot_iters: int
    snapshot_size: int
    fio_rounds: int
    """--compare-fio alternates this many bench and fio runs."""
    fio_min_ops: int
    """--compare-fio runs at least this many writes (more if the raw run did more)."""
    floor_rounds: int
    """walstore's sync commits alternate with this many raw-floor runs."""

    def raw_ops(self, size: int) -> int:
        """Operations planned for one raw measurement of `size`-byte writes."""
        return max(self.raw_min_ops, min(self.raw_max_ops, self.raw_max_bytes // size))


QUICK = Profile(
    quick=True,
    sizes=QUICK_SIZES,
    raw_max_bytes=64 << 20,
    raw_max_ops=1000,
    raw_min_ops=50,
    raw_budget_s=0.35,
    commit_max_ops=1000,
    commit_min_ops=50,
    commit_budget_s=0.5,
    threads=(1, 4, 16),
    group_seconds=0.7,
    snapshot_iters=20,
    snapshot_size=1 << 20,
    fio_rounds=4,
    fio_min_ops=400,
    floor_rounds=2,
)
FULL = Profile(
    quick=False,
    sizes=FULL_SIZES,
    raw_max_bytes=128 << 20,
    raw_max_ops=5000,
    raw_min_ops=100,
    raw_budget_s=2.0,
    commit_max_ops=5000,
    commit_min_ops=100,
    commit_budget_s=2.0,
    threads=(1, 2, 4, 8, 16, 32, 64),
    group_seconds=2.0,
    snapshot_iters=100,
    snapshot_size=1 << 20,
    fio_rounds=5,
    fio_min_ops=1000,
    floor_rounds=4,
)


# ---- statistics --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyStats:
    """Summary of per-operation latencies, in microseconds (nearest-rank percentiles)."""

    count: int
    min: float
    mean: float
    p50: float
    p99: float
    p999: float
    max: float

    @classmethod
    def from_ns(cls, samples: Sequence[int]) -> LatencyStats:
        if not samples:
            raise ValueError("no samples")
        s = sorted(samples)
        n = len(s)

        def rank(q: float) -> float:
            return s[min(n - 1, max(0, math.ceil(q * n) - 1))] / 1000.0

        return cls(
            count=n,
            min=s[0] / 1000.0,
            mean=sum(s) / n / 1000.0,
            p50=rank(0.50),
            p99=rank(0.99),
            p999=rank(0.999),
            max=s[-1] / 1000.0,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "min": round(self.min, 3),
            "mean": round(self.mean, 3),
            "p50": round(self.p50, 3),
            "p99": round(self.p99, 3),
            "p999": round(self.p999, 3),
            "max": round(self.max, 3),
        }


def _lat_json(stats: Optional[LatencyStats]) -> Optional[dict[str, Any]]:
    return None if stats is None else stats.to_json()


# ---- raw timers --------------------------------------------------------------------------------------


class RawTimer(Protocol):
    """Runs rawio_run's loop: n writes of `size` bytes at offsets offset0 + i*size."""

    name: str
    note: str

    def has_rwf_dsync(self) -> bool: ...

    def run(
        self, fd: int, op: int, buf: mmap.mmap, size: int, n: int, min_ops: int, budget_ns: int
    ) -> tuple[int, list[int], list[int]]:
        """(ops done or -errno, per-op latency ns, per-op sync-call latency ns)."""
        ...


class CTimer:
    """The C loop in walstore._walstore_bench (_native/rawio.c)."""

    name = "c"
    note = "C (walstore._walstore_bench: clock_gettime(CLOCK_MONOTONIC) around each operation)"

    def __init__(self, module: Any) -> None:
        self._ffi: Any = module.ffi
        self._lib: Any = module.lib

    def has_rwf_dsync(self) -> bool:
        return bool(self._lib.rawio_has_rwf_dsync())

    def run(
        self, fd: int, op: int, buf: mmap.mmap, size: int, n: int, min_ops: int, budget_ns: int
    ) -> tuple[int, list[int], list[int]]:
        ffi = self._ffi
        lat = ffi.new("int64_t[]", n)
        syn = ffi.new("int64_t[]", n)
        cbuf = ffi.from_buffer(buf)
        try:
            rc = int(self._lib.rawio_run(fd, op, cbuf, size, 0, n, min_ops, budget_ns, lat, syn))
        finally:
            ffi.release(cbuf)
        if rc < 0:
            return rc, [], []
        return rc, [int(x) for x in ffi.unpack(lat, rc)], [int(x) for x in ffi.unpack(syn, rc)]


def _py_write_all(fd: int, op: int, view: memoryview, offset: int) -> None:
    done = 0
    size = len(view)
    while done < size:
        if op == OP_RWF_DSYNC:
            w = os.pwritev(fd, [view[done:]], offset + done, os.RWF_DSYNC)
        else:
            w = os.pwrite(fd, view[done:], offset + done)
        if w <= 0:
            raise OSError(errno.EIO, "write made no progress")
        done += w


class PyTimer:
    """The fallback: the same loop in Python, timed with time.perf_counter_ns."""

    name = "python"

    def __init__(self, why: str) -> None:
        self.note = f"python ({why})"

    def has_rwf_dsync(self) -> bool:
        return hasattr(os, "pwritev") and hasattr(os, "RWF_DSYNC")

    def run(
        self, fd: int, op: int, buf: mmap.mmap, size: int, n: int, min_ops: int, budget_ns: int
    ) -> tuple[int, list[int], list[int]]:
        clock = time.perf_counter_ns
        datasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)
        lat: list[int] = []
        syn: list[int] = []
        view = memoryview(buf)[:size]
        try:
            start = clock()
            for i in range(n):
                t0 = clock()
                _py_write_all(fd, op, view, i * size)
                t1 = clock()
                if op == OP_FSYNC:
                    os.fsync(fd)
                elif op == OP_FDATASYNC:
                    datasync(fd)
                t2 = clock()
                lat.append(t2 - t0)
                syn.append(t2 - t1)
                if budget_ns > 0 and i + 1 >= min_ops and t2 - start >= budget_ns:
                    break
        except OSError as exc:
            return -(exc.errno or errno.EIO), [], []
        finally:
            view.release()
        return len(lat), lat, syn


def select_timer() -> RawTimer:
    """The C timer when built and not disabled by WALSTORE_PURE=1, else the Python one."""
    if os.environ.get("WALSTORE_PURE", "") not in ("", "0"):
        return PyTimer("WALSTORE_PURE=1")
    try:
        module = importlib.import_module("walstore._walstore_bench")
    except ImportError:
        return PyTimer("C module not built")
    return CTimer(module)


# ---- context -----------------------------------------------------------------------------------------


def _unescape_mount(s: str) -> str:
    """Undo /proc/self/mountinfo's octal escapes (\\040 for a space, ...)."""
    out = []
    i = 0
    while i < len(s):
        if s[i] == "\\" and i + 4 <= len(s) and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mount_of(path: str, mountinfo: str = "/proc/self/mountinfo") -> Optional[dict[str, str]]:
    """The mount holding `path`: the longest mount point that contains it (the last such, if stacked)."""
    real = os.path.realpath(path)
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    best: Optional[dict[str, str]] = None
    best_len = -1
    for line in lines:
        parts = line.split()
        if "-" not in parts:
            continue
        sep = parts.index("-")
        if len(parts) < sep + 3 or sep < 6:
            continue
        mnt = _unescape_mount(parts[4])
        inside = real == mnt or mnt == "/" or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= best_len:
            best_len = len(mnt)
            best = {
                "mount_point": mnt,
                "dev": parts[2],
                "mount_options": parts[5],
                "fstype": parts[sep + 1],
                "source": _unescape_mount(parts[sep + 2]),
                "super_options": parts[sep + 3] if len(parts) > sep + 3 else "",
            }
    return best


def _read_sys(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def block_device_dir(dev: str, source: str) -> Optional[str]:
    """/sys directory of the whole disk behind `dev` ("maj:min") or `source`, if there is one."""
    candidates = [dev]
    if source.startswith("/dev/"):
        try:
            rdev = os.stat(source).st_rdev
            candidates.append(f"{os.major(rdev)}:{os.minor(rdev)}")
        except OSError:
            pass
    for mm in candidates:
        link = f"/sys/dev/block/{mm}"
        if os.path.exists(link):
            d = os.path.realpath(link)
            if os.path.exists(os.path.join(d, "partition")):
                d = os.path.dirname(d)
            return d
    return None


def gather_context(directory: str) -> dict[str, Any]:
    """Filesystem, mount options, device write cache and kernel of `directory` (None where unreadable)."""
    u = os.uname()
    ctx: dict[str, Any] = {
        "directory": os.path.realpath(directory),
        "kernel": f"{u.sysname} {u.release}",
        "machine": u.machine,
        "cpus": os.cpu_count(),
        "fstype": None,
        "mount_point": None,
        "mount_source": None,
        "mount_options": None,
        "super_options": None,
        "device": None,
        "write_cache": None,
        "rotational": None,
        "logical_block_size": None,
    }
    m = mount_of(directory)
    if m is None:
        return ctx
    ctx.update(
        fstype=m["fstype"],
        mount_point=m["mount_point"],
        mount_source=m["source"],
        mount_options=m["mount_options"],
        super_options=m["super_options"],
    )
    d = block_device_dir(m["dev"], m["source"])
    if d is not None:
        ctx["device"] = os.path.basename(d)
        ctx["write_cache"] = _read_sys(os.path.join(d, "queue", "write_cache"))
        rot = _read_sys(os.path.join(d, "queue", "rotational"))
        ctx["rotational"] = None if rot is None else rot == "1"
        lbs = _read_sys(os.path.join(d, "queue", "logical_block_size"))
        ctx["logical_block_size"] = int(lbs) if lbs and lbs.isdigit() else None
    return ctx


# ---- raw measurements --------------------------------------------------------------------------------


@dataclass
class RawResult:
    """One raw measurement: `method` at `size` bytes in `mode` (or n/a, with the reason)."""

    method: str
    mode: str
    size: int
    available: bool = True
    reason: Optional[str] = None
    ops: int = 0
    seconds: float = 0.0
    latency: Optional[LatencyStats] = None
    sync_latency: Optional[LatencyStats] = None
    samples_ns: list[int] = field(default_factory=list, repr=False)
    sync_samples_ns: list[int] = field(default_factory=list, repr=False)

    @property
    def ops_per_s(self) -> Optional[float]:
        return self.ops / self.seconds if self.available and self.seconds > 0 else None

    def to_json(self) -> dict[str, Any]:
        ops_s = self.ops_per_s
        return {
            "method": self.method,
            "mode": self.mode,
            "size": self.size,
            "available": self.available,
            "reason": self.reason,
            "ops": self.ops,
            "seconds": round(self.seconds, 6),
            "ops_per_s": None if ops_s is None else round(ops_s, 3),
            "latency_us": _lat_json(self.latency),
            "sync_latency_us": _lat_json(self.sync_latency),
        }


def _na(method: Method, mode: str, size: int, reason: str) -> RawResult:
    return RawResult(method.name, mode, size, available=False, reason=reason)


def pool_raw(parts: Sequence[RawResult]) -> RawResult:
    """One result from several runs of the same measurement (all samples together)."""
    first = parts[0]
    lat = [x for p in parts for x in p.samples_ns]
    syn = [x for p in parts for x in p.sync_samples_ns]
    res = RawResult(first.method, first.mode, first.size, ops=len(lat), seconds=sum(lat) / 1e9, samples_ns=lat)
    res.latency = LatencyStats.from_ns(lat)
    if syn:
        res.sync_latency = LatencyStats.from_ns(syn)
        res.sync_samples_ns = syn
    return res


def prewrite(path: str, nbytes: int) -> None:
    """Create `path` holding `nbytes` zero bytes, written and fsynced (like walstore's preallocation)."""
    fs = OSFileAPI()
    fd = fs.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        zeros = bytes(1 << 20)
        pos = 0
        while pos < nbytes:
            k = min(len(zeros), nbytes - pos)
            fs.pwrite(fd, memoryview(zeros)[:k], pos)
            pos += k
        fs.fsync(fd)
    finally:
        fs.close(fd)
    fs.fsync_dir(os.path.dirname(path) or ".")


def measure_raw(
    timer: RawTimer,
    work: str,
    method: Method,
    mode: str,
    size: int,
    n: int,
    min_ops: int,
    budget_s: float,
    buf: mmap.mmap,
    prewritten: str,
    block_size: Optional[int],
) -> RawResult:
    """Time `n` writes of `size` bytes with `method` (at least `min_ops`, then up to `budget_s` seconds)."""
    if method.name == "o_dsync" and not _O_DSYNC:
        return _na(method, mode, size, "no O_DSYNC on this platform")
    if method.name == "o_direct_dsync" and not (_O_DIRECT and _O_DSYNC):
        return _na(method, mode, size, "no O_DIRECT on this platform")
    if method.op == OP_RWF_DSYNC and not timer.has_rwf_dsync():
        return _na(method, mode, size, "pwritev2/RWF_DSYNC not available in this build")
    append = mode == "append"
    if append:
        path = os.path.join(work, f"append-{method.name}-{size}.dat")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    else:
        path = prewritten
        flags = os.O_WRONLY
    try:
        fd = os.open(path, flags | method.open_flags | _O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.EINVAL and method.open_flags:
            return _na(method, mode, size, f"open({method.label}) refused: EINVAL (not supported here)")
        raise BenchError(f"open {path}: {exc.strerror}") from exc
    try:
        rc, lat, syn = timer.run(fd, method.op, buf, size, n, min(n, min_ops), int(budget_s * 1e9))
        if rc > 0 and not append and method.op == OP_NOSYNC:
            os.fsync(fd)  # untimed: leave no dirty pages for the next method's first sync
    finally:
        os.close(fd)
        if append:
            os.unlink(path)
    if rc < 0:
        err = -rc
        name = errno.errorcode.get(err, str(err))
        if method.name == "o_direct_dsync" and err == errno.EINVAL:
            if block_size and size % block_size:
                why = f"EINVAL: O_DIRECT needs I/O aligned to the {block_size}-byte logical block size"
            else:
                why = "EINVAL: the filesystem refuses O_DIRECT writes of this size or alignment"
            return _na(method, mode, size, why)
        if method.op == OP_RWF_DSYNC and err in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            return _na(method, mode, size, f"{name}: the kernel or filesystem has no pwritev2 RWF_DSYNC")
        raise BenchError(f"{method.label} of {size} bytes to {path}: {name} ({os.strerror(err)})")
    if rc == 0:
        raise BenchError(f"{method.label}: no operation was timed")
    res = RawResult(method.name, mode, size, ops=rc, seconds=sum(lat) / 1e9, samples_ns=lat)
    res.latency = LatencyStats.from_ns(lat)
    if method.has_sync_call:
        res.sync_latency = LatencyStats.from_ns(syn)
        res.sync_samples_ns = syn
    return res


# ---- walstore measurements ---------------------------------------------------------------------------


class StoreLike(Protocol):
    """What the bench uses of a walstore Store."""

    def __setitem__(self, key: str, value: bytes) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


Opener = Callable[..., StoreLike]


def load_opener() -> tuple[Optional[Opener], str]:
    """walstore.open, or None and the reason it is not there."""
    try:
        module = importlib.import_module("walstore")
    except ImportError as exc:
        return None, f"walstore cannot be imported: {exc}"
    opener = getattr(module, "open", None)
    if not callable(opener):
        return None, "walstore.open is not in this build"
    return opener, ""


def _key(thread: int, i: int) -> str:
    return f"{thread % 100:02d}-{i % KEYS_PER_THREAD:06d}"


def value_for(record_size: int) -> bytes:
    """A value whose COMMIT frame (one PUT of a 9-byte str key) is exactly `record_size` bytes (8-aligned)."""
    payload = (record_size - 32) & ~7
    return os.urandom(max(1, payload - 12 - KEY_LEN))


Counters = tuple[Optional[int], Optional[int], Optional[int]]


def _counters(db: StoreLike) -> Counters:
    """(commits, fsyncs, segment_rolls) from db.stats(), None where it has no such counter."""
    try:
        st = db.stats()
    except Exception:  # noqa: BLE001 - stats are optional to the bench
        return None, None, None
    vals = [st.get(k) for k in ("commits", "fsyncs", "segment_rolls")]
    c, f, r = (v if isinstance(v, int) and not isinstance(v, bool) else None for v in vals)
    return c, f, r


@dataclass
class CommitResult:
    """walstore commits: one durability mode (threads=1) or one point of the group-commit curve."""

    durability: str
    threads: int
    commits: int
    seconds: float
    latency: LatencyStats
    fsyncs: Optional[int]
    batch: Optional[float]
    rolls: Optional[int]
    samples_ns: list[int] = field(default_factory=list, repr=False)

    @property
    def commits_per_s(self) -> float:
        return self.commits / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "durability": self.durability,
            "threads": self.threads,
            "commits": self.commits,
            "seconds": round(self.seconds, 6),
            "commits_per_s": round(self.commits_per_s, 3),
            "latency_us": self.latency.to_json(),
            "fsyncs": self.fsyncs,
            "commits_per_fsync": None if self.batch is None else round(self.batch, 3),
            "segment_rolls": self.rolls,
        }


def _deltas(before: Counters, after: Counters) -> tuple[Optional[int], Optional[float], Optional[int]]:
    """(fsyncs, commits per fsync, segment rolls) between two counter readings."""
    (c0, f0, r0), (c1, f1, r1) = before, after
    rolls = None if r0 is None or r1 is None else r1 - r0
    if c0 is None or f0 is None or c1 is None or f1 is None:
        return None, None, rolls
    fs = f1 - f0
    return fs, ((c1 - c0) / fs if fs > 0 else None), rolls


def measure_commits(
    opener: Opener,
    path: str,
    durability: str,
    record_size: int,
    profile: Profile,
    rounds: int = 1,
    between: Optional[Callable[[], None]] = None,
) -> CommitResult:
    """Time single-threaded `db[key] = value` commits with `durability` in a new store at `path`.

    The commits are split into `rounds` runs, with `between()` called before each (the raw
    floor is measured there, so that both see the same state of the disk).
    """
    db = opener(path, durability=durability)
    clock = time.perf_counter_ns
    try:
        value = value_for(record_size)
        for i in range(20):  # warm-up: first writes, preallocation thread start
            db[_key(0, i)] = value
        lat: list[int] = []
        budget = int(profile.commit_budget_s * 1e9 / rounds)
        max_ops = max(1, profile.commit_max_ops // rounds)
        min_ops = max(1, profile.commit_min_ops // rounds)
        before = _counters(db)
        i = 0
        for _ in range(rounds):
            if between is not None:
                between()
            start = clock()
            for k in range(max_ops):
                key = _key(0, i)
                i += 1
                t0 = clock()
                db[key] = value
                t1 = clock()
                lat.append(t1 - t0)
                if k + 1 >= min_ops and t1 - start >= budget:
                    break
        after = _counters(db)
    finally:
        db.close()
    fsyncs, batch, rolls = _deltas(before, after)
    stats = LatencyStats.from_ns(lat)
    return CommitResult(durability, 1, len(lat), sum(lat) / 1e9, stats, fsyncs, batch, rolls, lat)


def measure_group(opener: Opener, path: str, threads: int, record_size: int, seconds: float) -> CommitResult:
    """`threads` threads committing (durability=sync) for `seconds` to one new store at `path`."""
    db = opener(path, durability="sync")
    clock = time.perf_counter_ns
    value = value_for(record_size)
    stop = threading.Event()
    barrier = threading.Barrier(threads + 1)
    lats: list[list[int]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        mine = lats[t]
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        i = 0
        try:
            while not stop.is_set():
                key = _key(t, i)
                t0 = clock()
                db[key] = value
                mine.append(clock() - t0)
                i += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            stop.set()

    pool = [threading.Thread(target=worker, args=(t,), name=f"bench-{t}", daemon=True) for t in range(threads)]
    try:
        for i in range(20):
            db[_key(99, i)] = value
        for th in pool:
            th.start()
        before = _counters(db)
        barrier.wait()
        start = clock()
        stop.wait(seconds)
        stop.set()
        for th in pool:
            th.join()
        elapsed = (clock() - start) / 1e9
        after = _counters(db)
    finally:
        stop.set()
        barrier.abort()
        for th in pool:
            if th.is_alive():
                th.join(timeout=30)
        db.close()
    if errors:
        raise BenchError(f"a committing thread failed: {errors[0]!r}") from errors[0]
    allv = [x for lst in lats for x in lst]
    if not allv:
        raise BenchError(f"no commit finished with {threads} threads")
    fsyncs, batch, rolls = _deltas(before, after)
    stats = LatencyStats.from_ns(allv)
    return CommitResult("sync", threads, len(allv), elapsed, stats, fsyncs, batch, rolls, allv)


# ---- snapshot steps ----------------------------------------------------------------------------------

SNAPSHOT_STEPS = ("create", "write", "fsync", "close", "rename", "fsync_dir", "total")


def measure_snapshot(work: str, iters: int, size: int) -> dict[str, LatencyStats]:
    """What a snapshot pays: create temp + write + fsync + close + rename + directory fsync, per step."""
    fs = OSFileAPI()
    d = os.path.join(work, "snap")
    os.mkdir(d)
    data = os.urandom(size)
    tmp = os.path.join(d, "snapshot.tmp")
    final = os.path.join(d, "snapshot")
    clock = time.perf_counter_ns
    samples: dict[str, list[int]] = {s: [] for s in SNAPSHOT_STEPS}
    for _ in range(iters):
        t0 = clock()
        fd = fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        t1 = clock()
        try:
            fs.pwrite(fd, data, 0)
            t2 = clock()
            fs.fsync(fd)
            t3 = clock()
        finally:
            fs.close(fd)
        t4 = clock()
        fs.rename(tmp, final)
        t5 = clock()
        fs.fsync_dir(d)
        t6 = clock()
        for name, a, b in (
            ("create", t0, t1),
            ("write", t1, t2),
            ("fsync", t2, t3),
            ("close", t3, t4),
            ("rename", t4, t5),
            ("fsync_dir", t5, t6),
            ("total", t0, t6),
        ):
            samples[name].append(b - a)
    return {name: LatencyStats.from_ns(v) for name, v in samples.items()}


# ---- fio ---------------------------------------------------------------------------------------------


def _fio_latency(d: dict[str, Any]) -> LatencyStats:
    """fio's latency block as LatencyStats (us). fio's percentiles are histogram bins: clamped to min..max."""
    pct: dict[str, Any] = d.get("percentile", {})
    lo, hi = float(d["min"]) / 1000.0, float(d["max"]) / 1000.0

    def p(q: str) -> float:
        v = pct.get(q)
        return hi if v is None else min(hi, max(lo, float(v) / 1000.0))

    return LatencyStats(
        count=int(d.get("N", 0)),
        min=lo,
        mean=float(d["mean"]) / 1000.0,
        p50=p("50.000000"),
        p99=p("99.000000"),
        p999=p("99.900000"),
        max=hi,
    )


def fio_round(exe: str, work: str, size: int, count: int) -> tuple[float, LatencyStats, LatencyStats]:
    """One fio run: `count` writes of `size` with fdatasync after each. (ops/s, write lat, fdatasync lat)."""
    d = os.path.join(work, "fio")
    os.mkdir(d)
    cmd = fio_command(exe, d, size, count)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    if proc.returncode != 0:
        raise BenchError(f"fio failed: {proc.stderr.strip()[:300]}")
    try:
        job = json.loads(proc.stdout[proc.stdout.index("{") :])["jobs"][0]
        w = job["write"]
        return float(w["iops"]), _fio_latency(w["clat_ns"]), _fio_latency(job["sync"]["lat_ns"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise BenchError(f"could not read fio's output: {exc!r}") from exc


def fio_command(exe: str, directory: str, size: int, count: int) -> list[str]:
    """The fio command line: the etcd-style WAL test, `count` writes of `size` bytes in `directory`."""
    return [
        exe,
        "--name=walstore-bench",
        "--directory=" + directory.replace(":", "\\:"),
        "--rw=write",
        "--ioengine=sync",
        "--fdatasync=1",
        f"--bs={size}",
        f"--size={size * count}",
        "--percentile_list=50:99:99.9",
        "--output-format=json",
    ]


def median_stats(rounds: Sequence[LatencyStats]) -> LatencyStats:
    """Per-field median over rounds (min of mins, max of maxes, weighted mean): order is kept."""

    def med(xs: list[float]) -> float:
        ys = sorted(xs)
        return ys[(len(ys) - 1) // 2]

    total = sum(r.count for r in rounds)
    return LatencyStats(
        count=total,
        min=min(r.min for r in rounds),
        mean=sum(r.mean * r.count for r in rounds) / total if total else med([r.mean for r in rounds]),
        p50=med([r.p50 for r in rounds]),
        p99=med([r.p99 for r in rounds]),
        p999=med([r.p999 for r in rounds]),
        max=max(r.max for r in rounds),
    )


def compare_fio(
    timer: RawTimer, work: str, size: int, count: int, rounds: int, buf: mmap.mmap, block: Optional[int]
) -> dict[str, Any]:
    """Alternate `rounds` times: the bench's write+fdatasync appends, then fio's, same size and count.

    Alternating cancels most of the disk's drift over time. ops/s are totals over the rounds
    (all ops / all time); latency percentiles are medians of the per-round percentiles, for both.
    The agreement verdict (`within_tolerance`) is on the fdatasync p50: ops/s follow the mean,
    which a few multi-millisecond stalls move by 2x between back-to-back runs of the same tool.
    """
    out: dict[str, Any] = {"available": False, "reason": None, "size": size, "ops": count, "rounds": []}
    exe = shutil.which("fio")
    if exe is None:
        out["reason"] = "fio is not installed"
        return out
    out["version"] = _fio_version(exe)
    out["command"] = " ".join(["fio"] + fio_command(exe, "DIR", size, count)[1:])
    method = METHOD_BY_NAME["fdatasync"]
    ours: list[RawResult] = []
    theirs: list[tuple[float, LatencyStats, LatencyStats]] = []
    for _ in range(rounds):
        r = measure_raw(timer, work, method, "append", size, count, count, 0.0, buf, "", block)
        ours.append(r)
        theirs.append(fio_round(exe, work, size, count))
        assert r.sync_latency is not None
        out["rounds"].append(
            {
                "bench_ops_per_s": round(r.ops / r.seconds, 3),
                "fio_ops_per_s": round(theirs[-1][0], 3),
                "bench_sync_latency_us": r.sync_latency.to_json(),
                "fio_sync_latency_us": theirs[-1][2].to_json(),
            }
        )
    bench_ops = sum(r.ops for r in ours) / sum(r.seconds for r in ours)
    fio_ops = rounds * count / sum(count / t[0] for t in theirs)
    ratio_ops = bench_ops / fio_ops
    fio_sync = median_stats([t[2] for t in theirs])
    bench_sync = median_stats([r.sync_latency for r in ours if r.sync_latency])
    ratio_p50 = bench_sync.p50 / fio_sync.p50 if fio_sync.p50 > 0 else math.inf
    out.update(
        available=True,
        ops_per_s=round(fio_ops, 3),
        write_latency_us=median_stats([t[1] for t in theirs]).to_json(),
        sync_latency_us=fio_sync.to_json(),
        bench_ops_per_s=round(bench_ops, 3),
        bench_sync_latency_us=bench_sync.to_json(),
        ratio_sync_p50=round(ratio_p50, 4) if math.isfinite(ratio_p50) else None,
        ratio_ops_per_s=round(ratio_ops, 4),
        tolerance=FIO_TOLERANCE,
        within_tolerance=abs(ratio_p50 - 1.0) <= FIO_TOLERANCE,
        ops_within_tolerance=abs(ratio_ops - 1.0) <= FIO_TOLERANCE,
    )
    return out


def _fio_version(exe: str) -> str:
    try:
        return subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# ---- the whole run -----------------------------------------------------------------------------------


@dataclass
class Report:
    """Everything one run measured."""

    profile: Profile
    timer: RawTimer
    context: dict[str, Any]
    raw: list[RawResult] = field(default_factory=list)
    walstore_reason: Optional[str] = None
    record_size: int = REFERENCE_SIZE
    modes: list[CommitResult] = field(default_factory=list)
    group: list[CommitResult] = field(default_factory=list)
    snapshot: dict[str, LatencyStats] = field(default_factory=dict)
    snapshot_size: int = 0
    floor: Optional[RawResult] = None
    """The raw floor measured in rounds alternating with walstore's sync commits."""
    fio: Optional[dict[str, Any]] = None
    warnings: list[str] = field(default_factory=list)
    verdict: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def find(self, method: str, mode: str, size: int) -> Optional[RawResult]:
        for r in self.raw:
            if r.method == method and r.mode == mode and r.size == size and r.available:
                return r
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "quick": self.profile.quick,
            "seconds": round(self.seconds, 3),
            "timer": self.timer.name,
            "timer_note": self.timer.note,
            "context": self.context,
            "sizes": list(self.profile.sizes),
            "raw": [r.to_json() for r in self.raw],
            "walstore": {
                "available": self.walstore_reason is None,
                "reason": self.walstore_reason,
                "record_size": self.record_size,
                "durability": [c.to_json() for c in self.modes],
                "raw_floor": None if self.floor is None else self.floor.to_json(),
                "group_commit": [c.to_json() for c in self.group],
            },
            "snapshot": {
                "size": self.snapshot_size,
                "iterations": self.profile.snapshot_iters,
                "steps_us": {k: v.to_json() for k, v in self.snapshot.items()},
            },
            "fio": self.fio,
            "warnings": self.warnings,
            "verdict": self.verdict,
        }


def _plan(profile: Profile, walstore_ok: bool, fio: bool) -> float:
    """Estimated seconds of the whole run, for the progress bar."""
    est = 0.0
    for size in profile.sizes:
        est += profile.raw_ops(size) * size / 300e6  # pre-writing
        for _ in MODES:
            est += 0.05 + 5 * profile.raw_budget_s
    if walstore_ok:
        est += len(DURABILITIES) * (profile.commit_budget_s + 0.5) + profile.commit_budget_s
        est += len(profile.threads) * (profile.group_seconds + 0.5)
    est += profile.snapshot_iters * 0.01
    if fio:
        est += profile.fio_rounds * (2 * profile.raw_budget_s + 0.2)
    return est


def _size_label(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10} KiB"
    return f"{n} B"


def parse_size(text: str) -> int:
    """'4K' / '4k' / '4KiB' / '1M' / '512' -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    if t.endswith("K"):
        mult, t = 1 << 10, t[:-1]
    elif t.endswith("M"):
        mult, t = 1 << 20, t[:-1]
    try:
        n = int(t) * mult
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from exc
    if not 64 <= n <= 64 << 20:
        raise argparse.ArgumentTypeError(f"size {text!r} out of range (64 bytes .. 64 MiB)")
    return n


def _sizes_arg(text: str) -> tuple[int, ...]:
    sizes = tuple(sorted({parse_size(s) for s in text.split(",") if s.strip()}))
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes")
    return sizes


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _floor_meter(
    timer: RawTimer, work: str, size: int, profile: Profile, block: Optional[int], out: list[RawResult]
) -> Callable[[], None]:
    """A callable that measures the raw floor once more (pwrite+fdatasync into pre-written space)."""
    n = max(1, profile.commit_max_ops // profile.floor_rounds)
    path = os.path.join(work, "floor.dat")
    budget = profile.commit_budget_s / profile.floor_rounds
    min_ops = max(1, profile.commit_min_ops // profile.floor_rounds)

    def measure() -> None:
        if not os.path.exists(path):
            prewrite(path, n * size)
        buf = mmap.mmap(-1, size)
        try:
            buf.write(os.urandom(size))
            method = METHOD_BY_NAME["fdatasync"]
            out.append(measure_raw(timer, work, method, "overwrite", size, n, min_ops, budget, buf, path, block))
        finally:
            buf.close()

    return measure


def collect(args: argparse.Namespace, work: str, progress: Progress, profile: Profile, report: Report) -> None:
    """Run every measurement into `report` (files under `work`)."""
    timer = report.timer
    block = report.context.get("logical_block_size")
    buf = mmap.mmap(-1, max(profile.sizes + (profile.snapshot_size,)))
    try:
        buf.write(os.urandom(len(buf)))
        for size in profile.sizes:
            n = profile.raw_ops(size)
            progress.begin(f"pre-writing {_size_label(size)} x {n}")
            pre = os.path.join(work, f"prewritten-{size}.dat")
            prewrite(pre, n * size)
            progress.advance(n * size / 300e6)
            try:
                for mode in MODES:
                    for method in METHODS:
                        progress.begin(f"{method.label}, {mode}, {_size_label(size)}")
                        report.raw.append(
                            measure_raw(
                                timer,
                                work,
                                method,
                                mode,
                                size,
                                n,
                                profile.raw_min_ops,
                                profile.raw_budget_s,
                                buf,
                                pre,
                                block,
                            )
                        )
                        progress.advance(0.05 / len(METHODS) + (profile.raw_budget_s if method.op else 0))
            finally:
                os.unlink(pre)
    finally:
        buf.close()

    if args.compare_fio:
        size = REFERENCE_SIZE if REFERENCE_SIZE in profile.sizes else profile.sizes[0]
        ours = report.find("fdatasync", "append", size)
        count = min(profile.raw_ops(size), max(profile.fio_min_ops, ours.ops if ours else 0))
        progress.begin(f"fio and the bench alternated, {_size_label(size)} appends, {profile.fio_rounds} rounds")
        buf = mmap.mmap(-1, size)
        try:
            buf.write(os.urandom(size))
            report.fio = compare_fio(timer, work, size, count, profile.fio_rounds, buf, block)
        finally:
            buf.close()
        progress.advance(profile.fio_rounds * (2 * profile.raw_budget_s + 0.2))

    opener, why = load_opener()
    if opener is None:
        report.walstore_reason = why
    else:
        rs = report.record_size
        for durability in DURABILITIES:
            progress.begin(f"walstore commits, durability={durability}")
            path = os.path.join(work, f"store-{durability}")
            try:
                if durability == "sync":
                    floor_parts: list[RawResult] = []
                    between = _floor_meter(timer, work, rs, profile, block, floor_parts)
                    report.modes.append(
                        measure_commits(opener, path, durability, rs, profile, profile.floor_rounds, between)
                    )
                    report.floor = pool_raw(floor_parts)
                else:
                    report.modes.append(measure_commits(opener, path, durability, rs, profile))
            finally:
                shutil.rmtree(path, ignore_errors=True)
                _remove(os.path.join(work, "floor.dat"))
            progress.advance(profile.commit_budget_s * (2 if durability == "sync" else 1) + 0.5)
        for threads in profile.threads:
            progress.begin(f"walstore group commit, {threads} threads")
            path = os.path.join(work, f"store-group-{threads}")
            try:
                report.group.append(measure_group(opener, path, threads, rs, profile.group_seconds))
            finally:
                shutil.rmtree(path, ignore_errors=True)
            progress.advance(profile.group_seconds + 0.5)

    progress.begin("snapshot: create, write, fsync, rename, directory fsync")
    report.snapshot_size = profile.snapshot_size
    report.snapshot = measure_snapshot(work, profile.snapshot_iters, profile.snapshot_size)
    progress.advance(profile.snapshot_iters * 0.01)


def judge(report: Report) -> None:
    """Fill report.warnings and report.verdict from the figures."""
    ctx = report.context
    wc = (ctx.get("write_cache") or "").lower()
    fstype = ctx.get("fstype") or ""
    if fstype in ("tmpfs", "ramfs"):
        report.warnings.append(f"the directory is on {fstype}: memory, not a disk; nothing here survives a power loss")
    write_back = wc == "write back"
    limit = FAST_SYNC_WRITE_BACK_US if write_back else FAST_SYNC_US
    fast: list[str] = []
    for r in report.raw:
        if not r.available or r.method == "nosync":
            continue
        st = r.sync_latency if r.sync_latency is not None else r.latency
        if st is not None and st.p50 < limit:
            fast.append(f"{METHOD_BY_NAME[r.method].label} {st.p50:.1f} us ({r.mode}, {_size_label(r.size)})")
    if fast and fstype not in ("tmpfs", "ramfs"):
        more = f" and {len(fast) - 4} more" if len(fast) > 4 else ""
        cache = ' on a device reporting a "write back" cache' if write_back else ""
        report.warnings.append(
            f"syncs too fast to be flushes to stable storage{cache} (p50 under {limit:g} us): "
            + "; ".join(fast[:4])
            + more
            + ". A volatile cache (device, controller or hypervisor) is acknowledging them:"
            " a power loss can lose commits that walstore reported durable."
        )

    v: dict[str, Any] = {"reference_size": report.record_size, "etcd_guideline_ms": ETCD_FDATASYNC_P99_MS}
    text: list[str] = []
    ref = report.find("fdatasync", "append", report.record_size)
    if ref is None:
        avail = [r for r in report.raw if r.method == "fdatasync" and r.mode == "append" and r.available]
        ref = avail[0] if avail else None
    if ref is not None and ref.sync_latency is not None:
        p99_ms = ref.sync_latency.p99 / 1000.0
        ok = p99_ms < ETCD_FDATASYNC_P99_MS
        v["fdatasync_p99_ms"] = round(p99_ms, 4)
        v["meets_etcd_guideline"] = ok
        text.append(
            f"fdatasync p99 = {_fmt_us(ref.sync_latency.p99)} ({_size_label(ref.size)} appends): "
            + ("within" if ok else "OVER")
            + f" etcd's {ETCD_FDATASYNC_P99_MS:g} ms guideline for a log disk"
            + ("." if ok else "; expect slow sync commits and timeouts under load.")
        )
    else:
        v["fdatasync_p99_ms"] = None
        v["meets_etcd_guideline"] = None
    floor = report.floor or report.find("fdatasync", "overwrite", report.record_size)
    sync = next((c for c in report.modes if c.durability == "sync"), None)
    v["walstore_sync_p50_us"] = None if sync is None else round(sync.latency.p50, 3)
    v["walstore_sync_p99_us"] = None if sync is None else round(sync.latency.p99, 3)
    v["raw_floor_p50_us"] = None if floor is None or floor.latency is None else round(floor.latency.p50, 3)
    v["raw_floor_p99_us"] = None if floor is None or floor.latency is None else round(floor.latency.p99, 3)
    v["ratio_p50"] = None
    v["ratio_p99"] = None
    if sync is not None and floor is not None and floor.latency is not None:
        v["ratio_p50"] = round(sync.latency.p50 / floor.latency.p50, 4)
        v["ratio_p99"] = round(sync.latency.p99 / floor.latency.p99, 4)
        text.append(
            f"walstore sync commit p50 = {_fmt_us(sync.latency.p50)}, {v['ratio_p50']:.2f}x the raw floor"
            f" (pwrite+fdatasync of {_size_label(report.record_size)} into pre-written space,"
            f" p50 {_fmt_us(floor.latency.p50)}, measured alternately with the commits);"
            f" p99 {v['ratio_p99']:.2f}x."
            + (
                " Below 1x: the disk varied more between the two measurements than walstore adds."
                if v["ratio_p50"] < 0.95
                else ""
            )
        )
    elif report.walstore_reason:
        text.append(f"walstore not measured: {report.walstore_reason}")
    best = max(report.group, key=lambda c: c.commits_per_s, default=None)
    one = next((c for c in report.group if c.threads == 1), None)
    v["best_group_commits_per_s"] = None if best is None else round(best.commits_per_s, 3)
    v["best_group_threads"] = None if best is None else best.threads
    if best is not None and one is not None and one.commits_per_s > 0:
        batch = f", {best.batch:.1f} commits per fsync" if best.batch is not None else ""
        text.append(
            f"group commit: {best.commits_per_s:,.0f} commits/s with {best.threads} threads{batch}"
            f" ({best.commits_per_s / one.commits_per_s:.1f}x one thread)."
            if best.threads > 1
            else f"group commit: no gain from more threads; best is one thread at {best.commits_per_s:,.0f} commits/s."
        )
    if report.warnings:
        text.append("see the warnings: these sync figures may not reflect durable writes.")
    v["text"] = text
    report.verdict = v


# ---- output ------------------------------------------------------------------------------------------


def _fmt_us(us: Optional[float]) -> str:
    if us is None or math.isnan(us):
        return "-"
    if us >= 1e6:
        return f"{us / 1e6:.2f} s"
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    if us >= 100:
        return f"{us:.0f} us"
    return f"{us:.1f} us"


def _fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def _fmt_rate(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 2) -> list[str]:
    """Aligned columns; a row shorter than the headers ends in free text that spans the rest."""
    full = [r for r in rows if len(r) == len(headers)]
    widths = [max([len(h)] + [len(r[i]) for r in full]) for i, h in enumerate(headers)]
    out = []
    for row in [list(headers)] + [list(r) for r in rows]:
        cells = []
        for i, cell in enumerate(row):
            if len(row) < len(headers) and i == len(row) - 1:
                cells.append(cell)
            elif i < left:
                cells.append(cell.ljust(widths[i]))
            else:
                cells.append(cell.rjust(widths[i]))
        out.append("  " + "  ".join(cells).rstrip())
    return out


def render(report: Report) -> str:
    """The terminal report."""
    ctx = report.context
    lines: list[str] = []
    lines.append(f"walstore bench: {ctx['directory']}{'  (quick)' if report.profile.quick else ''}")
    lines.append(
        f"  filesystem: {ctx.get('fstype') or '?'} on {ctx.get('mount_source') or '?'}"
        f" (mounted at {ctx.get('mount_point') or '?'}; {ctx.get('mount_options') or '?'};"
        f" {ctx.get('super_options') or '-'})"
    )
    lines.append(
        f"  device: {ctx.get('device') or '?'}, write cache: {ctx.get('write_cache') or 'unknown'},"
        f" rotational: {ctx.get('rotational')}, logical block: {ctx.get('logical_block_size') or '?'}"
    )
    lines.append(f"  kernel: {ctx['kernel']} ({ctx['machine']}, {ctx['cpus']} CPUs)")
    lines.append(f"timer: {report.timer.note}")
    for mode in MODES:
        lines.append("")
        lines.append(f"Raw writes, {MODE_TITLES[mode]}:")
        rows: list[list[str]] = []
        for r in (r for r in report.raw if r.mode == mode):
            label = METHOD_BY_NAME[r.method].label
            if not r.available or r.latency is None:
                rows.append([_size_label(r.size), label, f"n/a: {r.reason}"])
                continue
            st = r.latency
            rows.append(
                [
                    _size_label(r.size),
                    label,
                    _fmt_rate(r.ops_per_s),
                    _fmt_us(st.p50),
                    _fmt_us(st.p99),
                    _fmt_us(st.p999),
                    _fmt_us(st.max),
                    _fmt_us(r.sync_latency.p99) if r.sync_latency else "",
                    str(r.ops),
                ]
            )
        lines += _table(["size", "method", "ops/s", "p50", "p99", "p99.9", "max", "sync p99", "ops"], rows)
    lines.append("")
    if report.walstore_reason:
        lines.append(f"walstore: not measured ({report.walstore_reason})")
    else:
        lines.append(f"walstore commits ({_size_label(report.record_size)} records, one thread):")
        rows = [
            [
                c.durability,
                _fmt_rate(c.commits_per_s),
                _fmt_us(c.latency.p50),
                _fmt_us(c.latency.p99),
                _fmt_us(c.latency.p999),
                _fmt_us(c.latency.max),
                "-" if c.batch is None else f"{c.batch:.1f}",
                str(c.commits),
                "-" if c.rolls is None else str(c.rolls),
            ]
            for c in report.modes
        ]
        fl = report.floor
        if fl is not None and fl.latency is not None:
            rows.append(
                [
                    "raw floor *",
                    _fmt_rate(fl.ops_per_s),
                    _fmt_us(fl.latency.p50),
                    _fmt_us(fl.latency.p99),
                    _fmt_us(fl.latency.p999),
                    _fmt_us(fl.latency.max),
                    "1.0",
                    str(fl.ops),
                    "",
                ]
            )
        heads = ["durability", "commits/s", "p50", "p99", "p99.9", "max", "per fsync", "commits", "rolls"]
        lines += _table(heads, rows, left=1)
        if fl is not None:
            lines.append(
                f"  * pwrite+fdatasync of {_size_label(fl.size)} into pre-written space (timer as above),"
                f" alternated with the sync commits ({report.profile.floor_rounds} rounds each)"
            )
        lines.append("")
        lines.append("walstore group commit (durability=sync):")
        rows = [
            [
                str(c.threads),
                _fmt_rate(c.commits_per_s),
                _fmt_us(c.latency.p50),
                _fmt_us(c.latency.p99),
                _fmt_us(c.latency.p999),
                _fmt_us(c.latency.max),
                "-" if c.batch is None else f"{c.batch:.2f}",
                str(c.commits),
                "-" if c.rolls is None else str(c.rolls),
            ]
            for c in report.group
        ]
        heads = ["threads", "commits/s", "p50", "p99", "p99.9", "max", "batch", "commits", "rolls"]
        lines += _table(heads, rows, left=1)
        lines.append("  (batch: commits per fsync, from db.stats(); rolls: segment rolls during the run)")
    lines.append("")
    lines.append(
        f"Snapshot steps ({_size_label(report.snapshot_size)} file, {report.profile.snapshot_iters} times,"
        " timed in Python):"
    )
    rows = [
        [name, _fmt_us(st.p50), _fmt_us(st.p99), _fmt_us(st.p999), _fmt_us(st.max)]
        for name, st in report.snapshot.items()
    ]
    lines += _table(["step", "p50", "p99", "p99.9", "max"], rows, left=1)
    if report.fio is not None:
        lines.append("")
        f = report.fio
        if not f.get("available"):
            lines.append(f"fio comparison: n/a ({f.get('reason')})")
        else:
            n_rounds = len(f["rounds"])
            lines.append(
                f"fio comparison ({_size_label(int(f['size']))} appends, write+fdatasync, {f['ops']} ops,"
                f" same directory; bench and fio alternated {n_rounds} times):"
            )
            fs, bs = f["sync_latency_us"], f["bench_sync_latency_us"]
            rows = [
                ["ops/s (all rounds)", _fmt_rate(f["bench_ops_per_s"]), _fmt_rate(f["ops_per_s"])],
                ["fdatasync p50", _fmt_us(bs["p50"]), _fmt_us(fs["p50"])],
                ["fdatasync p99", _fmt_us(bs["p99"]), _fmt_us(fs["p99"])],
                ["fdatasync p99.9", _fmt_us(bs["p999"]), _fmt_us(fs["p999"])],
                ["fdatasync max", _fmt_us(bs["max"]), _fmt_us(fs["max"])],
            ]
            for i, r in enumerate(f["rounds"], 1):
                rows.append([f"ops/s round {i}", _fmt_rate(r["bench_ops_per_s"]), _fmt_rate(r["fio_ops_per_s"])])
            lines += _table(["", "walstore bench", "fio"], rows, left=1)
            ok = "yes" if f["within_tolerance"] else "NO"
            ok_ops = "yes" if f["ops_within_tolerance"] else "no"
            lines.append(
                f"  bench/fio: fdatasync p50 {_fmt_ratio(f['ratio_sync_p50'])}"
                f" (within {FIO_TOLERANCE:.0%}: {ok}),"
                f" ops/s {f['ratio_ops_per_s']:.2f} (within {FIO_TOLERANCE:.0%}: {ok_ops});"
                " percentiles are medians over the rounds"
            )
            lines.append(f"  ({f.get('version', 'fio')}: {f['command']})")
    if report.warnings:
        lines.append("")
        lines.append("Warnings:")
        lines += [f"  ! {w}" for w in report.warnings]
    lines.append("")
    lines.append("Verdict:")
    lines += [f"  {t}" for t in report.verdict.get("text", [])]
    lines.append(f"({report.seconds:.1f} s)")
    return "\n".join(lines)


def _check_matplotlib() -> Optional[str]:
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return "--plot needs matplotlib: pip install 'walstore[plot]'"
    return None


def plot(report: Report, path: str) -> None:
    """Latency CDFs (raw methods and walstore commits) and the group-commit curve, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = report.record_size
    if not any(r.size == size for r in report.raw):
        size = report.profile.sizes[0]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))

    def cdf(ax: Any, samples: Sequence[int], label: str, style: str = "-") -> None:
        s = sorted(samples)
        n = len(s)
        ax.plot([x / 1000.0 for x in s], [(i + 1) / n for i in range(n)], style, label=label, linewidth=1.4)

    for ax, mode in zip(axes[:2], MODES, strict=True):
        for r in report.raw:
            if r.mode == mode and r.size == size and r.available and r.samples_ns:
                cdf(ax, r.samples_ns, METHOD_BY_NAME[r.method].label)
        if mode == "overwrite":
            for c in report.modes:
                cdf(ax, c.samples_ns, f"walstore commit, {c.durability}", "--")
        ax.set_xscale("log")
        ax.set_xlabel("latency per operation (us, log scale)")
        ax.set_ylabel("fraction of operations")
        ax.set_title(f"{_size_label(size)} writes, {MODE_TITLES[mode]}", fontsize=10)
        ax.axhline(0.99, color="grey", linewidth=0.6, linestyle=":")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    ax = axes[2]
    if report.group:
        xs = [c.threads for c in report.group]
        ax.plot(xs, [c.commits_per_s for c in report.group], "o-", color="tab:blue", label="commits/s")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel("committing threads (durability=sync)")
        ax.set_ylabel("commits/s", color="tab:blue")
        for c in report.group:
            if c.batch is not None:
                ax.annotate(
                    f"{c.batch:.1f}/fsync",
                    (c.threads, c.commits_per_s),
                    textcoords="offset points",
                    xytext=(0, 7),
                    ha="center",
                    fontsize=8,
                )
        ax.set_ylim(bottom=0, top=max(c.commits_per_s for c in report.group) * 1.15)
        ax.set_xlim(min(xs) / 1.4, max(xs) * 1.4)
        ax2 = ax.twinx()
        ax2.plot(xs, [c.latency.p99 / 1000.0 for c in report.group], "s--", color="tab:red", label="p99")
        ax2.set_ylabel("p99 commit latency (ms)", color="tab:red")
        ax2.set_ylim(bottom=0)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
        ax.set_title(
            f"group commit, {_size_label(report.record_size)} records (labels: commits per fsync)",
            fontsize=10,
        )
        ax.grid(True, alpha=0.3)
    else:
        ax.text(0.5, 0.5, f"walstore not measured\n{report.walstore_reason or ''}", ha="center", va="center")
        ax.set_axis_off()
    ctx = report.context
    fig.suptitle(
        f"walstore bench: {ctx.get('fstype')} on {ctx.get('device') or ctx.get('mount_source')}"
        f" (write cache: {ctx.get('write_cache') or 'unknown'}), {ctx['kernel']}; timer: {report.timer.name}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- entry points ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `walstore bench` options to `parser` (dest names: directory, quick, json, plot, ...)."""
    parser.add_argument(
        "directory",
        nargs="?",
        default=".",
        help="directory on the disk to measure (default: the current directory); the bench"
        " works in a private temporary subdirectory and removes it",
    )
    parser.add_argument("--quick", action="store_true", help="4 KiB only, short runs: under 15 seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="save latency CDFs and the group-commit curve (needs matplotlib: walstore[plot])",
    )
    parser.add_argument(
        "--compare-fio",
        action="store_true",
        help="also run fio --rw=write --ioengine=sync --fdatasync=1 with the same size and count, and print both",
    )
    parser.add_argument(
        "--sizes",
        type=_sizes_arg,
        metavar="LIST",
        help="record sizes, e.g. 4K,64K (default: 128,512,4K,16K,64K,256K,1M; --quick: 4K)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")


def run(args: argparse.Namespace) -> int:
    """Run the bench as `args` says; print the report; return the exit status (0, 1 error, 2 usage, 130)."""
    err = sys.stderr
    directory = str(args.directory)
    if not os.path.isdir(directory):
        print(f"walstore bench: not a directory: {directory}", file=err)
        return 2
    if args.plot and (why := _check_matplotlib()):
        print(f"walstore bench: {why}", file=err)
        return 2
    base = QUICK if args.quick else FULL
    profile = base if args.sizes is None else _replace_sizes(base, args.sizes)
    report = Report(profile=profile, timer=select_timer(), context=gather_context(directory))
    report.record_size = REFERENCE_SIZE if REFERENCE_SIZE in profile.sizes else profile.sizes[0]
    walstore_ok = load_opener()[0] is not None
    progress = Progress(
        _plan(profile, walstore_ok, bool(args.compare_fio)),
        enabled=err.isatty() and not args.no_progress,
        stream=err,
        show_amount=False,
    )
    restore = _term_to_interrupt()
    started = time.monotonic()
    try:
        try:
            work = tempfile.mkdtemp(prefix=".walstore-bench-", dir=directory)
        except OSError as exc:
            print(f"walstore bench: cannot write in {directory}: {exc.strerror}", file=err)
            return 2
        try:
            collect(args, work, progress, profile, report)
        finally:
            progress.close()
            shutil.rmtree(work, ignore_errors=True)
    except KeyboardInterrupt:
        print("walstore bench: interrupted; its temporary files were removed", file=err)
        return 130
    except (BenchError, OSError) as exc:
        print(f"walstore bench: error: {exc}", file=err)
        return 1
    finally:
        restore()
    report.seconds = time.monotonic() - started
    judge(report)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, allow_nan=False))
    else:
        print(render(report))
    if args.plot:
        plot(report, str(args.plot))
        if not args.json:
            print(f"plot: {args.plot}")
    return 0


def _replace_sizes(profile: Profile, sizes: tuple[int, ...]) -> Profile:
    d = {f: getattr(profile, f) for f in profile.__dataclass_fields__}
    d["sizes"] = sizes
    return Profile(**d)


def _term_to_interrupt() -> Callable[[], None]:
    """Turn SIGTERM into KeyboardInterrupt (so cleanup runs); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Optional[FrameType]) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)

    def undo() -> None:
        signal.signal(signal.SIGTERM, old)

    return undo


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m walstore.bench [DIR] [options]`."""
    parser = argparse.ArgumentParser(
        prog="walstore bench",
        description="Measure what durability costs on the disk under DIR: raw write/sync methods,"
        " walstore commits, group commit, and the snapshot rename path.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
