"""Crash simulation and fault injection at the file-API seam (`walstore.fileapi`).

Every durable file operation walstore makes goes through an `OSFileAPI`. This
module ships two subclasses, so that walstore's tests, and applications built
on walstore, can check what survives a crash and what a failing disk does:

`RecordingFileAPI`
    Performs each operation on a real directory *and* records it, in order,
    thread-safely (file descriptors are resolved to the file they name).
    `CrashModel` then replays the record under a pessimistic model of a
    filesystem after power loss and produces the on-disk state at any
    operation index, with any choice of which unsynced operations reached
    the disk: dropped, kept, torn at 512-byte sectors, appended as zeros,
    or directory entries lost. `materialize` writes such a state into a
    fresh directory, where the real `walstore.open()` can be run on it.
    `kill_after(n)` simulates a process crash: the n-th operation and every
    later one fail with `SimulatedCrash` and have no effect.

`FaultyFileAPI`
    Wraps another file API and makes chosen calls fail: EIO, ENOSPC, short
    writes, a write that stores a prefix before failing, a failing rename.

The model (docs/TESTING.md explains it at length):

* The state at the start of recording is durable.
* File data (pwrite, ftruncate, fallocate, O_TRUNC) becomes durable when an
  fsync or fdatasync of that file *that started after it* returns. Both
  cover size changes. Until then, each such operation may or may not have
  reached the disk, independently of the others.
* A directory entry (create, mkdir, rename, unlink) becomes durable only
  when an fsync of its directory that started after it returns (a rename
  needs both directories). fsync of a file does not make its name durable.
* An fsync that failed makes nothing durable, and the writes it should have
  covered may never reach the disk: no later fsync covers them.
* A write that did not reach the disk leaves what was durable there before
  (for pre-written zeros, zeros). Bytes a write did not touch are never
  damaged by it: sectors are torn only within the bytes written.
"""

from __future__ import annotations

import errno as _errno
import hashlib
import os
import random
import shutil
import threading
import weakref
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from . import fileapi as _fileapi
from .fileapi import OSFileAPI

SECTOR = 512
"""The unit a torn write is cut into (file offsets that are multiples of it)."""

# Operation kinds. Directory entries:
CREATE = "create"
MKDIR = "mkdir"
RENAME = "rename"
UNLINK = "unlink"
# File data:
WRITE = "write"
TRUNCATE = "truncate"
FALLOCATE = "fallocate"
# Barriers:
SYNC = "sync"
DIRSYNC = "dirsync"
SYNC_FAILED = "sync-failed"
# No effect on what is on disk (kept in the record for the reader):
OPEN = "open"
CLOSE = "close"
CRASH = "crash"
RESTART = "restart"

DIR_OPS = frozenset({CREATE, MKDIR, RENAME, UNLINK})
DATA_OPS = frozenset({WRITE, TRUNCATE, FALLOCATE})
CHANGE_OPS = DIR_OPS | DATA_OPS

NEVER = 1 << 62
"""`CrashModel.cover` of an operation no completed sync covers."""

PathLike = Union[str, "os.PathLike[str]"]
Image = dict[str, Optional[bytes]]
"""A materialisable directory tree: relative path -> file content, or None for a directory."""


class SimulatedCrash(OSError):
    """The simulated process died (`RecordingFileAPI.kill_after`): nothing more reaches the disk.

    An OSError, so the code under test handles it as it handles any failed
    call; since the recorder refuses every later call, what that handling
    tries to do has no effect.
    """

    def __init__(self, index: int) -> None:
        super().__init__(_errno.EIO, f"simulated process crash at operation {index}")
        self.index = index


@dataclass(frozen=True)
class Op:
    """One recorded operation. `index` is its position in the record."""

    index: int
    kind: str
    path: str
    """Relative to the recorder's root: the file's name at the time, or the directory synced."""
    ino: int = 0
    """The recorder's id of the file (names change, the id does not)."""
    offset: int = 0
    data: bytes = b""
    size: int = 0
    dst: str = ""
    start: int = -1
    """SYNC, DIRSYNC, SYNC_FAILED: the index the record had reached when the call began."""
    call: str = ""
    """The file-API method ("pwrite", "fdatasync", "open", ...)."""
    thread: str = ""

    def describe(self) -> str:
        """One line for a failure report."""
        where = self.path or "."
        if self.kind == WRITE:
            crc = zlib.crc32(self.data) & 0xFFFFFFFF
            nz = "zeros" if not self.data.strip(b"\0") else f"crc32={crc:08x}"
            what = f"{where} #{self.ino} [{self.offset}, {self.offset + len(self.data)}) {nz}"
        elif self.kind in (TRUNCATE,):
            what = f"{where} #{self.ino} size={self.size}"
        elif self.kind == FALLOCATE:
            what = f"{where} #{self.ino} [{self.offset}, {self.offset + self.size})"
        elif self.kind == RENAME:
            what = f"{where} -> {self.dst} #{self.ino}"
        elif self.kind in (SYNC, SYNC_FAILED):
            what = f"{where} #{self.ino} (began at {self.start})"
        elif self.kind == DIRSYNC:
            what = f"{where}/ (began at {self.start})"
        else:
            what = f"{where} #{self.ino}" if self.ino else where
        call = f" [{self.call}]" if self.call and self.call != self.kind else ""
        thread = f" {{{self.thread}}}" if self.thread and self.thread != "MainThread" else ""
        return f"{self.index:5d} {self.kind:<11} {what}{call}{thread}"


def format_ops(ops: Sequence[Op], upto: Optional[int] = None, marks: Optional[Mapping[int, str]] = None) -> str:
    """The operation list as text, one per line; `upto` draws the crash point."""
    lines = []
    for op in ops:
        if upto is not None and op.index == upto:
            lines.append("  ----- crash here -----")
        note = f"   <- {marks[op.index]}" if marks and op.index in marks else ""
        lines.append(op.describe() + note)
    if upto is not None and upto >= len(ops):
        lines.append("  ----- crash here (after the last operation) -----")
    return "\n".join(lines)


@dataclass
class Snapshot:
    """The durable state a record starts from: names, and each file's content."""

    names: dict[str, int] = field(default_factory=dict)
    """Relative path -> inode id, for files and directories below the root."""
    contents: dict[int, bytes] = field(default_factory=dict)
    """Inode id -> content, for files."""
    dirs: set[int] = field(default_factory=set)
    """Inode ids that are directories."""


def read_tree(root: str, skip: Callable[[str], bool] = lambda rel: False) -> Image:
    """The files and directories below `root` as an Image (what `materialize` would write)."""
    out: Image = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        for d in sorted(dirnames):
            rel = os.path.join(rel_dir, d)
            if not skip(rel):
                out[rel] = None
        for f in sorted(filenames):
            rel = os.path.join(rel_dir, f)
            if skip(rel):
                continue
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[rel] = fh.read()
    return out


def _parent(rel: str) -> str:
    return os.path.dirname(rel)


class RecordingFileAPI(OSFileAPI):
    """Performs every operation on the real files and records it; see the module docstring.

    `root` is the directory the model covers (created if missing, and taken as
    durable with everything in it). Operations on paths outside it are
    performed and not recorded. Files that appear below it without going
    through this API (walstore's LOCK file) are not part of the model, unless
    they are later opened through it: then their content at that moment is
    taken as durable.
    """

    def __init__(self, root: PathLike) -> None:
        self.root = os.path.abspath(os.fspath(root))
        os.makedirs(self.root, exist_ok=True)
        self._lock = threading.Lock()
        self._ops: list[Op] = []
        self._next_ino = 1
        self._names: dict[str, int] = {}
        self._fds: dict[int, int] = {}
        self._dead = False
        self._kill_at: Optional[int] = None
        self._zombies: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        self.initial = Snapshot()
        for rel, content in read_tree(self.root).items():
            ino = self._new_ino()
            self._names[rel] = ino
            self.initial.names[rel] = ino
            if content is None:
                self.initial.dirs.add(ino)
            else:
                self.initial.contents[ino] = content

    # ---- the record ------------------------------------------------------------

    @property
    def ops(self) -> list[Op]:
        """A copy of the record so far."""
        with self._lock:
            return list(self._ops)

    def mark(self) -> int:
        """The current length of the record: ops before this index have completed."""
        with self._lock:
            return len(self._ops)

    def model(self) -> CrashModel:
        """A CrashModel of the record so far."""
        with self._lock:
            return CrashModel(self.initial, list(self._ops))

    @property
    def dead(self) -> bool:
        return self._dead

    def kill_after(self, n: int) -> None:
        """Simulate a process crash once the record holds `n` operations (see SimulatedCrash)."""
        with self._lock:
            self._kill_at = n
            if len(self._ops) >= n:
                self._die()

    def revive(self) -> None:
        """A new process starts on the same files: calls are performed and recorded again.

        The calling thread belongs to the new process; every other thread alive now
        belongs to the dead one, and its calls keep failing with SimulatedCrash.
        """
        with self._lock:
            me = threading.current_thread()
            self._zombies.update(t for t in threading.enumerate() if t is not me)
            self._zombies.discard(me)
            self._dead = False
            self._kill_at = None
            self._append(RESTART, "")

    def _die(self) -> None:
        """(lock held) Mark the process dead and close every file it had open."""
        if self._dead:
            return
        self._dead = True
        self._append(CRASH, "")
        for fd in list(self._fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def _check_alive(self) -> None:
        """(lock held) Raise SimulatedCrash if the process is dead or dies now."""
        if not self._dead and self._kill_at is not None and len(self._ops) >= self._kill_at:
            self._die()
        if self._dead or threading.current_thread() in self._zombies:
            raise SimulatedCrash(len(self._ops))

    def _gone(self) -> bool:
        """(lock held) The calling thread's process died (while a call of it was in flight)."""
        return self._dead or threading.current_thread() in self._zombies

    def _new_ino(self) -> int:
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def _append(self, kind: str, path: str, **kw: Any) -> None:
        self._ops.append(Op(len(self._ops), kind, path, thread=threading.current_thread().name, **kw))

    def _rel(self, path: PathLike) -> Optional[str]:
        a = os.path.abspath(os.fspath(path))
        if a == self.root:
            return ""
        if a.startswith(self.root + os.sep):
            return a[len(self.root) + 1 :]
        return None

    def _adopt(self, rel: str, real_path: str) -> int:
        """(lock held) Take a file that appeared outside this API into the model, as durable."""
        ino = self._new_ino()
        self._names[rel] = ino
        self.initial.names[rel] = ino
        if os.path.isdir(real_path):
            self.initial.dirs.add(ino)
        else:
            with open(real_path, "rb") as f:
                self.initial.contents[ino] = f.read()
        return ino

    def _name_of(self, ino: int) -> str:
        for name, i in self._names.items():
            if i == ino:
                return name
        return f"<unlinked #{ino}>"

    # ---- the operations ------------------------------------------------------------

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        with self._lock:
            self._check_alive()
            rel = self._rel(path)
            existed = os.path.lexists(path)
            fd = super().open(path, flags, mode)
            if rel is None:
                return fd
            ino = self._names.get(rel)
            if not existed:
                ino = self._new_ino()
                self._names[rel] = ino
                self._append(CREATE, rel, ino=ino, call="open")
            else:
                if ino is None:
                    ino = self._adopt(rel, path)
                if flags & os.O_TRUNC:
                    self._append(TRUNCATE, rel, ino=ino, size=0, call="open")
                else:
                    self._append(OPEN, rel, ino=ino)
            self._fds[fd] = ino
            return fd

    def close(self, fd: int) -> None:
        with self._lock:
            self._check_alive()
            ino = self._fds.pop(fd, None)
            super().close(fd)
            if ino is not None:
                self._append(CLOSE, self._name_of(ino), ino=ino)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        with self._lock:
            self._check_alive()
            n = super().pwrite(fd, data, offset)
            ino = self._fds.get(fd)
            if ino is not None:
                self._append(WRITE, self._name_of(ino), ino=ino, offset=offset, data=bytes(data), call="pwrite")
            return n

    def ftruncate(self, fd: int, size: int) -> None:
        with self._lock:
            self._check_alive()
            super().ftruncate(fd, size)
            ino = self._fds.get(fd)
            if ino is not None:
                self._append(TRUNCATE, self._name_of(ino), ino=ino, size=size, call="ftruncate")

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        with self._lock:
            self._check_alive()
            super().fallocate(fd, offset, length)
            ino = self._fds.get(fd)
            if ino is not None:
                self._append(FALLOCATE, self._name_of(ino), ino=ino, offset=offset, size=length, call="fallocate")

    def _sync(self, fd: int, call: str, fn: Callable[[int], None]) -> None:
        with self._lock:
            self._check_alive()
            start = len(self._ops)
            ino = self._fds.get(fd)
        try:
            fn(fd)
        except OSError:
            with self._lock:
                if self._gone():
                    raise SimulatedCrash(len(self._ops)) from None
                if ino is not None:
                    self._append(SYNC_FAILED, self._name_of(ino), ino=ino, start=start, call=call)
            raise
        with self._lock:
            if self._gone():  # the process died while this call was in flight: it did not complete
                raise SimulatedCrash(len(self._ops))
            if ino is not None:
                self._append(SYNC, self._name_of(ino), ino=ino, start=start, call=call)

    def fdatasync(self, fd: int) -> None:
        self._sync(fd, "fdatasync", super().fdatasync)

    def fsync(self, fd: int) -> None:
        self._sync(fd, "fsync", super().fsync)

    def record_failed_sync(self, fd: int, call: str = "fdatasync") -> None:
        """Note an fsync of `fd` that failed above this layer (FaultyFileAPI): it covers nothing,
        and the writes it should have covered may never reach the disk."""
        with self._lock:
            self._check_alive()
            ino = self._fds.get(fd)
            if ino is not None:
                self._append(SYNC_FAILED, self._name_of(ino), ino=ino, start=len(self._ops), call=call)

    def fsync_dir(self, path: str) -> None:
        with self._lock:
            self._check_alive()
            start = len(self._ops)
        super().fsync_dir(path)
        rel = self._rel(path)
        with self._lock:
            if self._gone():
                raise SimulatedCrash(len(self._ops))
            if rel is not None:
                self._append(DIRSYNC, rel, start=start, call="fsync_dir")

    def rename(self, src: str, dst: str) -> None:
        with self._lock:
            self._check_alive()
            rs, rd = self._rel(src), self._rel(dst)
            if rs is not None and rs not in self._names and os.path.lexists(src):
                self._adopt(rs, src)
            super().rename(src, dst)
            if rs is None or rd is None:
                if rs is not None:  # moved out of the model: gone from it
                    self._drop_names(rs)
                return
            ino = self._names.get(rs, 0)
            moved = {n: i for n, i in self._names.items() if n == rs or n.startswith(rs + os.sep)}
            self._drop_names(rd)
            for n, i in moved.items():
                del self._names[n]
                self._names[rd + n[len(rs) :]] = i
            self._append(RENAME, rs, ino=ino, dst=rd, call="rename")

    def _drop_names(self, rel: str) -> None:
        for n in [n for n in self._names if n == rel or n.startswith(rel + os.sep)]:
            del self._names[n]

    def unlink(self, path: str) -> None:
        with self._lock:
            self._check_alive()
            super().unlink(path)
            rel = self._rel(path)
            if rel is not None:
                ino = self._names.pop(rel, 0)
                self._append(UNLINK, rel, ino=ino, call="unlink")

    def mkdir(self, path: str) -> None:
        with self._lock:
            self._check_alive()
            super().mkdir(path)
            rel = self._rel(path)
            if rel is not None:
                ino = self._new_ino()
                self._names[rel] = ino
                self._append(MKDIR, rel, ino=ino, call="mkdir")

    def clone(self, src: str, dst: str) -> None:
        """A copy through this API (never a reflink), so that the record holds the data."""
        with open(src, "rb") as fin:
            fd = self.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                offset = 0
                while True:
                    chunk = fin.read(1 << 20)
                    if not chunk:
                        break
                    self.pwrite(fd, chunk, offset)
                    offset += len(chunk)
            finally:
                self.close(fd)


# ---- crash states ---------------------------------------------------------------

KEEP = "keep"
DROP = "drop"
ZERO = "zero"
GARBAGE = "garbage"
TORN = "torn"


@dataclass(frozen=True)
class Choice:
    """What became of one unsynced operation.

    KEEP: it reached the disk. (An operation with no Choice did not.)
    ZERO (writes): the file's new size reached the disk, its data did not:
    the bytes past the old end read as zeros, the others are unchanged.
    TORN (writes): cut at SECTOR boundaries; `sectors[k]` says what the k-th
    piece of the write holds: KEEP (new bytes), DROP (what was there),
    ZERO, or GARBAGE (random bytes from `seed`).
    """

    kind: str = KEEP
    sectors: tuple[str, ...] = ()
    seed: int = 0

    def describe(self) -> str:
        if self.kind == TORN:
            return "torn[" + "".join(s[0].upper() for s in self.sectors) + "]"
        return self.kind


@dataclass
class CrashState:
    """One crash state: the crash point, and what became of each unsynced operation."""

    index: int
    """Operations [0, index) had happened; the one at `index` had not (or had not returned)."""
    variant: str
    choices: dict[int, Choice]
    """Choice per pending operation index; pending operations not listed were lost."""
    seed: int = 0

    def describe(self, model: Optional[CrashModel] = None) -> str:
        parts = [f"crash at operation {self.index}, variant {self.variant!r}, seed {self.seed}"]
        if model is not None:
            pend = model.pending(self.index)
            kept = [f"{op.index}:{self.choices[op.index].describe()}" for op in pend if op.index in self.choices]
            lost = [str(op.index) for op in pend if op.index not in self.choices]
            parts.append(f"unsynced operations: {len(pend)}; reached the disk: {' '.join(kept) or 'none'}")
            parts.append(f"lost: {' '.join(lost) or 'none'}")
        return "\n".join(parts)


def sector_pieces(offset: int, length: int) -> list[tuple[int, int]]:
    """[start, end) pieces of the write [offset, offset+length) cut at SECTOR boundaries."""
    out = []
    pos = offset
    end = offset + length
    while pos < end:
        nxt = min(end, (pos // SECTOR + 1) * SECTOR)
        out.append((pos, nxt))
        pos = nxt
    return out


class CrashModel:
    """The durable state of a recorded run at any operation index, under the module's model."""

    def __init__(self, initial: Snapshot, ops: Sequence[Op]) -> None:
        self.initial = initial
        self.ops = list(ops)
        self.cover = self._coverage()

    def __len__(self) -> int:
        return len(self.ops)

    def _coverage(self) -> list[int]:
        """For each operation, the index of the completed sync that made it durable (or NEVER)."""
        n = len(self.ops)
        cover = [NEVER] * n
        pending_data: dict[int, list[int]] = {}
        pending_dir: dict[str, list[int]] = {}
        need: dict[int, set[str]] = {}
        for op in self.ops:
            if op.kind in DATA_OPS:
                pending_data.setdefault(op.ino, []).append(op.index)
            elif op.kind in DIR_OPS:
                dirs = {_parent(op.path)}
                if op.kind == RENAME:
                    dirs.add(_parent(op.dst))
                need[op.index] = set(dirs)
                for d in dirs:
                    pending_dir.setdefault(d, []).append(op.index)
            elif op.kind in (SYNC, SYNC_FAILED):
                waiting = pending_data.get(op.ino, [])
                done = [j for j in waiting if j < op.start]
                pending_data[op.ino] = [j for j in waiting if j >= op.start]
                if op.kind == SYNC:
                    for j in done:
                        cover[j] = op.index
                # SYNC_FAILED: the writes it should have covered stay NEVER; no later sync covers them.
            elif op.kind == DIRSYNC:
                waiting = pending_dir.get(op.path, [])
                pending_dir[op.path] = [j for j in waiting if j >= op.start]
                for j in waiting:
                    if j < op.start:
                        need[j].discard(op.path)
                        if not need[j]:
                            cover[j] = op.index
        return cover

    def pending(self, i: int) -> list[Op]:
        """The operations before `i` that change the disk and that no sync completed before `i` covers."""
        return [op for op in self.ops[:i] if op.kind in CHANGE_OPS and self.cover[op.index] >= i]

    def durable_ops(self, i: int) -> list[Op]:
        return [op for op in self.ops[:i] if op.kind in CHANGE_OPS and self.cover[op.index] < i]

    # ---- building a state ----------------------------------------------------------

    def image(self, state: CrashState) -> Image:
        """The directory tree of a crash state."""
        return self.image_at(state.index, state.choices)

    def image_at(self, i: int, choices: Mapping[int, Choice]) -> Image:
        names = dict(self.initial.names)
        dirs = set(self.initial.dirs)
        contents: dict[int, bytearray] = {ino: bytearray(c) for ino, c in self.initial.contents.items()}
        for op in self.ops[:i]:
            if op.kind not in CHANGE_OPS:
                continue
            if self.cover[op.index] < i:
                choice: Optional[Choice] = Choice(KEEP)
            else:
                choice = choices.get(op.index)
            if choice is None:
                continue
            if op.kind in DATA_OPS:
                _apply_data(contents.setdefault(op.ino, bytearray()), op, choice)
            elif op.kind == CREATE:
                names[op.path] = op.ino
                contents.setdefault(op.ino, bytearray())
            elif op.kind == MKDIR:
                names[op.path] = op.ino
                dirs.add(op.ino)
            elif op.kind == UNLINK:
                if names.get(op.path) == op.ino:
                    del names[op.path]
            elif op.kind == RENAME:
                moved = {n: v for n, v in names.items() if n == op.path or n.startswith(op.path + os.sep)}
                if names.get(op.path) != op.ino:
                    # The create (or earlier rename) of the source did not reach the disk, the
                    # rename did: the new name holds the file.
                    moved = {op.path: op.ino}
                for n in [n for n in names if n == op.dst or n.startswith(op.dst + os.sep)]:
                    del names[n]
                for n, v in moved.items():
                    names.pop(n, None)
                    names[op.dst + n[len(op.path) :]] = v
        out: Image = {}
        for name in sorted(names):
            parent = _parent(name)
            if parent and (parent not in out or out[parent] is not None):
                continue  # its directory's entry did not reach the disk: unreachable
            ino = names[name]
            out[name] = None if ino in dirs else bytes(contents.get(ino, b""))
        return out

    def final_image(self) -> Image:
        """Everything that happened, on disk (what the real directory holds)."""
        return self.image_at(len(self.ops), {op.index: Choice(KEEP) for op in self.ops})

    # ---- choosing states -------------------------------------------------------------

    def variants(self, i: int, rng: random.Random, extra: int = 2) -> list[CrashState]:
        """Crash states at point `i`: all lost, all kept, a prefix, random subsets (reordering),
        torn writes, appends as zeros, directory entries lost. Duplicate choices are left out."""
        pend = self.pending(i)
        seed = rng.randrange(1 << 30)
        out = [CrashState(i, "durable only", {}, seed)]
        if not pend:
            return out
        keep_all = {op.index: Choice(KEEP) for op in pend}
        out.append(CrashState(i, "all reached the disk", keep_all, seed))
        if len(pend) > 1:
            k = rng.randrange(1, len(pend))
            out.append(CrashState(i, f"prefix of {k}", {op.index: Choice(KEEP) for op in pend[:k]}, seed))
        for _ in range(extra):
            sub = {op.index: Choice(KEEP) for op in pend if rng.random() < 0.5}
            out.append(CrashState(i, "random subset", sub, seed))
        writes = [op for op in pend if op.kind == WRITE]
        if writes:
            for _ in range(extra):
                torn: dict[int, Choice] = {}
                for op in pend:
                    if op.kind == WRITE:
                        pieces = sector_pieces(op.offset, len(op.data))
                        kinds = tuple(rng.choice((KEEP, KEEP, DROP, ZERO, GARBAGE)) for _ in pieces)
                        torn[op.index] = Choice(TORN, kinds, rng.randrange(1 << 30))
                    elif rng.random() < 0.5:
                        torn[op.index] = Choice(KEEP)
                out.append(CrashState(i, "torn writes", torn, seed))
            zeroed = {op.index: Choice(ZERO if op.kind == WRITE else KEEP) for op in pend}
            out.append(CrashState(i, "sizes grew, data lost", zeroed, seed))
            last = writes[-1]
            pieces = sector_pieces(last.offset, len(last.data))
            if len(pieces) > 1:
                # The classic torn append: the first sectors of the last write made it.
                cut = rng.randrange(1, len(pieces))
                kinds = tuple(KEEP if k < cut else DROP for k in range(len(pieces)))
                tail = dict(keep_all)
                tail[last.index] = Choice(TORN, kinds)
                out.append(CrashState(i, f"last write cut after {cut} sectors", tail, seed))
        if any(op.kind in DIR_OPS for op in pend) and any(op.kind in DATA_OPS for op in pend):
            lost_dir = {op.index: Choice(KEEP) for op in pend if op.kind in DATA_OPS}
            out.append(CrashState(i, "directory entries lost", lost_dir, seed))
        unique: list[CrashState] = []
        seen: set[tuple[tuple[int, Choice], ...]] = set()
        for st in out:
            key = tuple(sorted(st.choices.items(), key=lambda kv: kv[0]))
            if key not in seen:
                seen.add(key)
                unique.append(st)
        return unique

    def crash_points(self) -> list[int]:
        """Every index where the disk state can differ from the one before: 0, and after each
        operation that changes the disk or completes a sync (and the end)."""
        pts = [0]
        for op in self.ops:
            if op.kind in CHANGE_OPS or op.kind in (SYNC, DIRSYNC, SYNC_FAILED):
                pts.append(op.index + 1)
        if pts[-1] != len(self.ops):
            pts.append(len(self.ops))
        return sorted(set(pts))


def _garbage(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _put(buf: bytearray, offset: int, data: bytes | bytearray) -> None:
    end = offset + len(data)
    if len(buf) < offset:
        buf.extend(bytes(offset - len(buf)))
    buf[offset:end] = data


def _apply_data(buf: bytearray, op: Op, choice: Choice) -> None:
    if op.kind == TRUNCATE:
        if len(buf) > op.size:
            del buf[op.size :]
        else:
            buf.extend(bytes(op.size - len(buf)))
        return
    if op.kind == FALLOCATE:
        end = op.offset + op.size
        if len(buf) < end:
            buf.extend(bytes(end - len(buf)))
        return
    # WRITE
    if choice.kind == KEEP:
        _put(buf, op.offset, op.data)
        return
    old_size = len(buf)
    end = op.offset + len(op.data)
    if choice.kind == ZERO:
        if end > old_size:
            buf.extend(bytes(end - old_size))
        return
    if choice.kind == TORN:
        rng_seed = choice.seed
        new_end = old_size
        pieces = sector_pieces(op.offset, len(op.data))
        for k, (a, b) in enumerate(pieces):
            how = choice.sectors[k] if k < len(choice.sectors) else DROP
            if how == DROP:
                continue
            if how == KEEP:
                chunk: bytes = op.data[a - op.offset : b - op.offset]
            elif how == ZERO:
                chunk = bytes(b - a)
            else:
                chunk = _garbage(rng_seed * 1_000_003 + k, b - a)
            _put(buf, a, chunk)
            new_end = max(new_end, b)
        if len(buf) < new_end:  # pragma: no cover - _put extended it already
            buf.extend(bytes(new_end - len(buf)))
        return
    raise ValueError(f"unknown choice {choice.kind!r} for a write")


def materialize(image: Image, dest: PathLike) -> str:
    """Write `image` into `dest` (created; must not hold anything). Returns dest as a str."""
    d = os.fspath(dest)
    os.makedirs(d, exist_ok=True)
    if os.listdir(d):
        raise FileExistsError(f"{d} is not empty")
    for rel in sorted(image, key=lambda r: (r.count(os.sep), r)):
        content = image[rel]
        path = os.path.join(d, rel)
        if content is None:
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(content)
    return d


def image_digest(image: Image) -> str:
    """A short hash of an image (for skipping duplicate states)."""
    h = hashlib.blake2b(digest_size=16)
    for rel in sorted(image):
        content = image[rel]
        h.update(rel.encode() + b"\0")
        if content is None:
            h.update(b"D")
        else:
            h.update(b"F%d\0" % len(content))
            h.update(content)
    return h.hexdigest()


def iter_states(
    model: CrashModel,
    seed: int,
    limit: Optional[int] = None,
    extra: int = 2,
    points: Optional[Sequence[int]] = None,
) -> Iterator[CrashState]:
    """Crash states of `model`, seeded: the variants at each crash point.

    `extra` is how many random-subset and random-torn variants each point gets.
    With `limit`, about that many states come out: the points are thinned
    evenly (keeping the first and the last) when there are too many, and
    `extra` is raised when there are too few.
    """
    rng = random.Random(seed)
    pts = list(points) if points is not None else model.crash_points()
    if limit is not None and pts:
        busy = sum(1 for p in pts if model.pending(p))
        idle = len(pts) - busy
        per = 6 + 2 * extra
        estimate = idle + busy * per
        if estimate > limit:
            want = max(2, int(limit / max(1.0, estimate / len(pts))))
            if want < len(pts):
                step = len(pts) / want
                pts = sorted({pts[min(len(pts) - 1, int(k * step))] for k in range(want)} | {pts[0], pts[-1]})
        elif busy:
            extra = max(extra, int(((limit - idle) / busy - 6) / 2))
    count = 0
    for p in pts:
        for st in model.variants(p, random.Random(rng.randrange(1 << 62)), extra):
            yield st
            count += 1
            if limit is not None and count >= limit:
                return


# ---- fault injection ----------------------------------------------------------------


@dataclass
class Fault:
    """Make calls to `op` fail, from the `nth` matching call on, `times` times (0: until cleared).

    `op` is a file-API method name ("pwrite", "fdatasync", "fsync", "fsync_dir",
    "open", "rename", "unlink", "mkdir", "ftruncate", "fallocate", "close",
    "clone"), or "space" for every call that can need a new block (pwrite,
    fallocate, open creating a file, mkdir, rename, clone). `path` limits it
    to calls on paths containing that text. `partial`: a failing pwrite first
    writes this fraction of its data (a write cut short by the error).
    """

    op: str
    nth: int = 1
    errno: int = _errno.EIO
    times: int = 1
    path: str = ""
    partial: float = 0.0
    seen: int = 0
    fired: int = 0

    def matches(self, names: tuple[str, ...], path: str) -> bool:
        if self.op == "space":
            if not any(n in SPACE_OPS for n in names):
                return False
        elif self.op not in names:
            return False
        return not self.path or self.path in path

    @property
    def exhausted(self) -> bool:
        return self.times > 0 and self.fired >= self.times


_DIRECT_ALIGN = 4096
"""What an O_DIRECT write's length must be a multiple of (walstore.snapshot.ALIGN)."""

SPACE_OPS = frozenset({"pwrite", "fallocate", "open-create", "mkdir", "rename", "clone"})


class _ShortWriteOS:
    """Stands in for the `os` module inside walstore.fileapi: while a FaultyFileAPI with
    `short_writes` is writing on this thread, `os.pwrite` writes at most that many bytes, so
    OSFileAPI.pwrite's retry loop is what completes the write."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.local = threading.local()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        owner: Optional[FaultyFileAPI] = getattr(self.local, "owner", None)
        if owner is not None and len(data) > owner.short_writes:
            limit = owner.short_writes
            if fd in owner._direct_fds:  # O_DIRECT: a short write still ends on a block boundary
                limit = max(_DIRECT_ALIGN, limit // _DIRECT_ALIGN * _DIRECT_ALIGN)
            if len(data) > limit:
                data = memoryview(data)[:limit]
                owner.short_write_count += 1
        result: int = self._real.pwrite(fd, data, offset)
        return result


_short_os: Optional[_ShortWriteOS] = None
_short_lock = threading.Lock()


def _install_short_write_os() -> _ShortWriteOS:
    global _short_os
    with _short_lock:
        if _short_os is None:
            _short_os = _ShortWriteOS(os)
            _fileapi.__dict__["os"] = _short_os
        return _short_os


class FaultyFileAPI(OSFileAPI):
    """Injects failures into the calls it passes on to `inner` (the plain OS calls by default).

    Stack it on a RecordingFileAPI to see what a failure leaves on disk after
    a crash: a failed fdatasync is reported to the recorder, which then never
    counts the writes it should have covered as durable (Linux marks such
    pages clean: a retried fsync succeeds while the data is gone).
    """

    def __init__(
        self,
        inner: Optional[OSFileAPI] = None,
        faults: Sequence[Fault] = (),
        short_writes: int = 0,
        sync_delay: float = 0.0,
    ) -> None:
        self.inner = inner if inner is not None else OSFileAPI()
        self.sync_delay = sync_delay
        """Seconds every fsync/fdatasync takes longer (a slow disk: widens race windows)."""
        self.faults: list[Fault] = list(faults)
        self.short_writes = short_writes
        """When > 0: the OS writes at most this many bytes per pwrite call (a short write)."""
        self.short_write_count = 0
        """How many os.pwrite calls were cut short."""
        self.calls: dict[str, int] = {}
        self.fired: list[tuple[str, str, int, str]] = []
        """(op, path, errno, thread name) of each injected failure."""
        self._lock = threading.Lock()
        self._fd_paths: dict[int, str] = {}
        self._direct_fds: set[int] = set()
        if short_writes:
            _install_short_write_os()

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def fail(self, op: str, nth: int = 1, err: int = _errno.EIO, times: int = 1, **kw: Any) -> Fault:
        """Shorthand for add(Fault(op, nth, err, times, ...))."""
        return self.add(Fault(op, nth, err, times, **kw))

    def clear(self) -> None:
        """Remove every fault (the disk has space again, the device recovered)."""
        with self._lock:
            self.faults.clear()

    def _check(self, op: str, path: str, also: str = "") -> Optional[Fault]:
        """Count a call to `op` (also known as `also`); return the fault that fires on it, if any."""
        names = (op, also) if also else (op,)
        with self._lock:
            for n in names:
                self.calls[n] = self.calls.get(n, 0) + 1
            for f in self.faults:
                if f.exhausted or not f.matches(names, path):
                    continue
                f.seen += 1
                if f.seen >= f.nth:
                    f.fired += 1
                    self.fired.append((op, path, f.errno, threading.current_thread().name))
                    return f
        return None

    @staticmethod
    def _raise(f: Fault, op: str, path: str) -> None:
        raise OSError(f.errno, f"injected {_errno.errorcode.get(f.errno, f.errno)} in {op}", path)

    def _path(self, fd: int) -> str:
        return self._fd_paths.get(fd, f"<fd {fd}>")

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        creates = bool(flags & os.O_CREAT) and not os.path.exists(path)
        f = self._check("open", path, "open-create" if creates else "")
        if f is not None:
            self._raise(f, "open", path)
        fd = self.inner.open(path, flags, mode)
        with self._lock:
            self._fd_paths[fd] = path
            if flags & getattr(os, "O_DIRECT", 0):
                self._direct_fds.add(fd)
            else:
                self._direct_fds.discard(fd)
        return fd

    def close(self, fd: int) -> None:
        f = self._check("close", self._path(fd))
        with self._lock:
            path = self._fd_paths.pop(fd, "")
            self._direct_fds.discard(fd)
        self.inner.close(fd)
        if f is not None:  # close fails after releasing the descriptor, as on Linux
            self._raise(f, "close", path)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        path = self._path(fd)
        f = self._check("pwrite", path)
        if f is not None:
            if f.partial > 0:
                n = int(len(data) * f.partial)
                if fd in self._direct_fds:  # O_DIRECT stores whole blocks only
                    n = n // _DIRECT_ALIGN * _DIRECT_ALIGN
                if n:
                    self.inner.pwrite(fd, memoryview(data)[:n], offset)
            self._raise(f, "pwrite", path)
        if self.short_writes > 0:
            shim = _install_short_write_os()
            shim.local.owner = self
            try:
                return self.inner.pwrite(fd, data, offset)
            finally:
                shim.local.owner = None
        return self.inner.pwrite(fd, data, offset)

    def _sync_call(self, fd: int, call: str, fn: Callable[[int], None]) -> None:
        if self.sync_delay > 0:
            threading.Event().wait(self.sync_delay)
        f = self._check(call, self._path(fd))
        if f is not None:
            note = getattr(self.inner, "record_failed_sync", None)
            if note is not None:
                note(fd, call)
            self._raise(f, call, self._path(fd))
        fn(fd)

    def fdatasync(self, fd: int) -> None:
        self._sync_call(fd, "fdatasync", self.inner.fdatasync)

    def fsync(self, fd: int) -> None:
        self._sync_call(fd, "fsync", self.inner.fsync)

    def fsync_dir(self, path: str) -> None:
        f = self._check("fsync_dir", path)
        if f is not None:
            self._raise(f, "fsync_dir", path)
        self.inner.fsync_dir(path)

    def ftruncate(self, fd: int, size: int) -> None:
        f = self._check("ftruncate", self._path(fd))
        if f is not None:
            self._raise(f, "ftruncate", self._path(fd))
        self.inner.ftruncate(fd, size)

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        f = self._check("fallocate", self._path(fd))
        if f is not None:
            self._raise(f, "fallocate", self._path(fd))
        self.inner.fallocate(fd, offset, length)

    def rename(self, src: str, dst: str) -> None:
        f = self._check("rename", dst)
        if f is not None:
            self._raise(f, "rename", dst)
        self.inner.rename(src, dst)

    def unlink(self, path: str) -> None:
        f = self._check("unlink", path)
        if f is not None:
            self._raise(f, "unlink", path)
        self.inner.unlink(path)

    def mkdir(self, path: str) -> None:
        f = self._check("mkdir", path)
        if f is not None:
            self._raise(f, "mkdir", path)
        self.inner.mkdir(path)

    def clone(self, src: str, dst: str) -> None:
        f = self._check("clone", dst)
        if f is not None:
            self._raise(f, "clone", dst)
        self.inner.clone(src, dst)


def copy_tree(src: PathLike, dst: PathLike) -> None:
    """Copy a directory tree (for keeping a failing state next to its report)."""
    shutil.copytree(os.fspath(src), os.fspath(dst), dirs_exist_ok=True)
