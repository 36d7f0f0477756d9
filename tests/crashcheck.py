"""Shared helpers of the crash and fault tests: workloads, their history, and the checker.

No tests here. A workload is a list of `Commit`s run by a `Runner`, which
notes, for each commit, the record index (`RecordingFileAPI.mark()`) when it
was attempted and when it returned. `History` turns that into what a crash
at any record index allows: the state after some prefix of the commits, in
commit order, that includes every commit acknowledged durably before the
crash and none attempted after it. `check_crash_state` materialises one
crash state, runs the real `walstore.open()` on it and checks exactly that;
any exception from `open()` is a violation.

Run as a script (`python tests/crashcheck.py writer ...`) it is the writer
process of the failpoint and power-loss tests: it prints "T <cid>" before
each commit and "A <cid>" once the commit returned, each line written
straight to its stdout pipe, so a parent sees every acknowledgement even
when the writer is killed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

if __name__ == "__main__":  # the writer subprocess: make the checkout importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import walstore
from walstore import crashfs, reader
from walstore import format as fmt
from walstore.crashfs import CrashModel, CrashState, RecordingFileAPI

Key = Any
STORE = "db"
"""The store's directory inside a recorder's root."""

ENV_STATES = "WALSTORE_CRASH_STATES"
ENV_SEED = "WALSTORE_CRASH_SEED"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRASHCHECK = os.path.abspath(__file__)


def budget(default: int) -> int:
    """How many crash states a test checks: `default`, or WALSTORE_CRASH_STATES scaled.

    WALSTORE_CRASH_STATES=N is the total wished for a default of 1000; every
    test scales its own default by N/1000.
    """
    raw = os.environ.get(ENV_STATES)
    if not raw:
        return default
    return max(1, int(default * int(raw) / 1000))


def base_seed(default: int) -> int:
    raw = os.environ.get(ENV_SEED)
    return int(raw) if raw else default


# ---- the two replay paths ----------------------------------------------------------

BACKENDS = ("python", "c")


def native_module() -> Any:
    try:
        from walstore import native
    except ImportError:
        return None
    return native


def select_backend(name: str, monkeypatch: Any) -> None:
    """Make this process recover with `name` ("python" or "c"); skip or fail "c" when not built."""
    import pytest

    native = native_module()
    if name == "c":
        if native is None or not getattr(native, "BUILT", getattr(native, "AVAILABLE", False)):
            if os.environ.get("WALSTORE_REQUIRE_NATIVE") == "1":
                pytest.fail("the C replayer (walstore.native) is not built, and WALSTORE_REQUIRE_NATIVE=1")
            pytest.skip(
                "SKIPPED: the C replayer (walstore.native) is not built here, so the crash states are"
                " recovered by the Python path only; set WALSTORE_REQUIRE_NATIVE=1 to make this fail"
            )
        monkeypatch.setattr(native, "AVAILABLE", True)
    elif native is not None:
        monkeypatch.setattr(native, "AVAILABLE", False)
    assert walstore.backend() == name, f"asked for the {name} replayer, walstore uses {walstore.backend()}"


def backend_env(name: str) -> dict[str, str]:
    """Environment for a subprocess that must recover with `name`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("WALSTORE_FAILPOINT", None)
    if name == "python":
        env["WALSTORE_PURE"] = "1"
    else:
        env.pop("WALSTORE_PURE", None)
    return env


# ---- commits -----------------------------------------------------------------------


@dataclass(frozen=True)
class Commit:
    """One commit of a workload: a put, a delete, or a transaction of several."""

    cid: int
    ops: tuple[tuple[str, Key, Any], ...]
    txn: bool
    durability: Optional[str] = None

    def log_ops(self) -> list[tuple[str, Key, Any]]:
        """The operations as they appear in its log record (a transaction keeps one per key)."""
        if not self.txn:
            return [(op, k, canon(v) if op == "put" else None) for op, k, v in self.ops]
        merged: dict[Key, tuple[str, Any]] = {}
        for op, k, v in self.ops:
            merged[k] = (op, canon(v) if op == "put" else None)
        return [(op, k, v) for k, (op, v) in merged.items()]

    def apply(self, state: dict[Key, Any]) -> None:
        for op, k, v in self.ops:
            if op == "put":
                state[k] = canon(v)
            else:
                state.pop(k, None)


def canon(v: Any) -> Any:
    """The value the store keeps for `v` (the JSON codec's round trip)."""
    if isinstance(v, (str, bytes)):
        return v
    return json.loads(json.dumps(v))


def _value(rng: random.Random, cid: int) -> Any:
    kind = rng.randrange(6)
    size = rng.choice((0, 3, 20, 60, 200, 600, 1500)) if rng.random() < 0.9 else rng.randrange(2500, 5000)
    tag = f"c{cid}:"
    if kind == 0:
        return (tag + "x" * size)[: max(len(tag), size)]
    if kind == 1:
        return tag.encode() + rng.randbytes(size)
    if kind == 2:
        return {"cid": cid, "pad": "y" * (size // 2), "n": rng.randrange(1000)}
    if kind == 3:
        return [cid, rng.randrange(100), "z" * (size // 3)]
    if kind == 4:
        return cid * 1000 + rng.randrange(1000)
    return tag + "é∂" * (size // 4)


def _key(rng: random.Random, nkeys: int) -> Key:
    k = rng.randrange(nkeys)
    return f"k{k}" if k % 3 else f"b{k}".encode()


def make_commits(
    seed: int, n: int, first_cid: int = 1, nkeys: int = 10, durability: Optional[str] = None
) -> list[Commit]:
    """`n` commits from `seed`: puts of assorted values (some bigger than a sector, a few bigger
    than a small segment), deletes, and transactions of 2-5 operations. Every put's value
    carries its commit id, so every commit that writes changes the state."""
    return list(itertools.islice(iter_commits(seed, first_cid, nkeys, durability), n))


def iter_commits(seed: int, first_cid: int = 1, nkeys: int = 10, durability: Optional[str] = None) -> Iterator[Commit]:
    """The endless sequence `make_commits` takes its first n from."""
    rng = random.Random(seed)
    present: set[Key] = set()
    cid = first_cid
    while True:
        r = rng.random()
        if r < 0.25:
            ops: list[tuple[str, Key, Any]] = [("put", _key(rng, nkeys), _value(rng, cid))]
            for _ in range(rng.randrange(1, 5)):
                if rng.random() < 0.3:
                    ops.append(("del", _key(rng, nkeys), None))
                else:
                    ops.append(("put", _key(rng, nkeys), _value(rng, cid)))
            c = Commit(cid, tuple(ops), True, durability)
        elif r < 0.35 and present:
            c = Commit(cid, (("del", rng.choice(sorted(present, key=repr)), None),), False, durability)
        else:
            c = Commit(cid, (("put", _key(rng, nkeys), _value(rng, cid)),), False, durability)
        for op, k, _ in c.log_ops():
            if op == "put":
                present.add(k)
            else:
                present.discard(k)
        yield c
        cid += 1


def run_commit(db: walstore.Store, c: Commit) -> bool:
    """Perform `c` on `db`. False when it logged nothing (a delete of an absent key)."""
    if c.txn:
        with db.transaction(durability=c.durability) as tx:
            for op, k, v in c.ops:
                if op == "put":
                    tx[k] = v
                else:
                    tx.discard(k)
        return True
    op, k, v = c.ops[0]
    if op == "put":
        db.put(k, v, durability=c.durability)
        return True
    return db.delete(k, durability=c.durability)


# ---- history -----------------------------------------------------------------------


@dataclass
class Event:
    kind: str
    """"commit", "sync" (db.sync() or close: everything acknowledged before it is durable),
    "compact" (no promise of its own)."""
    attempt: int
    ack: Optional[int] = None
    cid: int = -1
    durable_on_ack: bool = False
    error: str = ""


@dataclass
class Epoch:
    """The commits of one run of the store, after the recovered prefix of the ones before."""

    start: int
    order: list[int]


class History:
    """What the workload did, against record indexes."""

    def __init__(self) -> None:
        self.commits: dict[int, Commit] = {}
        self.events: list[Event] = []
        self.epochs: list[Epoch] = [Epoch(0, [])]
        self.base: dict[Key, Any] = {}
        self._states: dict[int, list[dict[Key, Any]]] = {}
        self._lock = threading.Lock()

    @property
    def order(self) -> list[int]:
        return self.epochs[-1].order

    def epoch_at(self, i: int) -> Epoch:
        cur = self.epochs[0]
        for e in self.epochs:
            if e.start <= i:
                cur = e
        return cur

    def add(self, ev: Event) -> None:
        with self._lock:
            self.events.append(ev)

    def written(self, cid: int) -> None:
        """Commit `cid` reached the log (and so comes next in commit order)."""
        with self._lock:
            self.order.append(cid)

    def restart(self, index: int, k: int) -> None:
        """A new process recovered the first `k` commits of the order; it starts at `index`."""
        self.epochs.append(Epoch(index, self.order[:k]))

    def states(self, epoch: Epoch) -> list[dict[Key, Any]]:
        """states[k]: the state after the first k commits of the epoch's order."""
        key = id(epoch)
        got = self._states.get(key)
        if got is None or len(got) != len(epoch.order) + 1:
            cur = dict(self.base)
            got = [dict(cur)]
            for cid in epoch.order:
                self.commits[cid].apply(cur)
                got.append(dict(cur))
            self._states[key] = got
        return got

    def bounds(self, i: int) -> tuple[Epoch, int, int, list[int]]:
        """For a crash at record index i: (epoch, lo, hi, required cids).

        The state must be states[k] for some lo <= k <= hi: every commit
        acknowledged as durable before i is in the prefix (lo), and no commit
        attempted at or after i is (hi).
        """
        ep = self.epoch_at(i)
        pos = {cid: n for n, cid in enumerate(ep.order)}
        required: set[int] = set()
        acked_at = sorted(
            (e.ack, e.cid) for e in self.events if e.kind == "commit" and e.ack is not None and e.cid in pos
        )
        for e in self.events:
            if e.ack is None or e.ack > i:
                continue
            if e.kind == "commit" and e.durable_on_ack and e.cid in pos:
                required.add(e.cid)
            elif e.kind == "commit" and e.durable_on_ack:
                required.add(e.cid)  # acknowledged, yet not in the order: reported as lost
            elif e.kind == "sync":
                required.update(cid for ack, cid in acked_at if ack <= e.attempt)
        attempts = {e.cid: e.attempt for e in self.events if e.kind == "commit"}
        lo = max((pos.get(c, len(ep.order)) + 1 for c in required), default=0)
        hi = sum(1 for c in ep.order if attempts.get(c, 0) < i)
        return ep, lo, hi, sorted(required)


# ---- running a workload ---------------------------------------------------------------


class ProcessDied(Exception):
    """The recorder's simulated process crash happened (kill_after)."""


class Runner:
    """Runs commits on a store opened through a RecordingFileAPI, noting the history."""

    def __init__(self, rec: RecordingFileAPI, history: History, fs: Optional[Any] = None, **open_kwargs: Any) -> None:
        self.rec = rec
        self.fs = fs if fs is not None else rec
        self.history = history
        self.open_kwargs = open_kwargs
        self.path = os.path.join(rec.root, STORE)
        self.db: Optional[walstore.Store] = None
        self.mode = open_kwargs.get("durability", "sync")

    def open(self) -> walstore.Store:
        try:
            self.db = walstore.open(self.path, fs=self.fs, **self.open_kwargs)
        except OSError:
            if self.rec.dead:
                raise ProcessDied() from None
            raise
        return self.db

    def commit(self, c: Commit) -> bool:
        """Run one commit. True if it returned; False if it raised (not the process dying)."""
        db = self.db
        assert db is not None
        self.history.commits[c.cid] = c
        before = db.last_seq
        ev = Event("commit", self.rec.mark(), cid=c.cid)
        try:
            run_commit(db, c)
        except Exception as exc:
            ev.error = f"{type(exc).__name__}: {exc}"
            self.history.add(ev)
            if db.last_seq != before:
                self.history.written(c.cid)
            if self.rec.dead:
                raise ProcessDied() from exc
            return False
        ev.ack = self.rec.mark()
        mode = c.durability or self.mode
        wrote = db.last_seq != before  # False for a delete of an absent key: nothing to make durable
        ev.durable_on_ack = mode == "sync" and wrote
        self.history.add(ev)
        if wrote:
            self.history.written(c.cid)
        return True

    def sync(self, close: bool = False) -> None:
        db = self.db
        assert db is not None
        ev = Event("sync", self.rec.mark())
        try:
            if close:
                db.close()
            else:
                db.sync()
        except Exception as exc:
            ev.error = f"{type(exc).__name__}: {exc}"
            self.history.add(ev)
            if self.rec.dead:
                raise ProcessDied() from exc
            raise
        ev.ack = self.rec.mark()
        self.history.add(ev)

    def close(self) -> None:
        self.sync(close=True)
        self.db = None

    def compact(self) -> None:
        """db.compact(): a snapshot and the removal of the log it covers (the state is unchanged)."""
        db = self.db
        assert db is not None
        ev = Event("compact", self.rec.mark())
        try:
            db.compact()
        except Exception as exc:
            ev.error = f"{type(exc).__name__}: {exc}"
            self.history.add(ev)
            if self.rec.dead:
                raise ProcessDied() from exc
            raise
        ev.ack = self.rec.mark()
        self.history.add(ev)

    def bury(self) -> None:
        """After the process died: release what the dead store held (lock, threads, mappings)."""
        db = self.db
        self.db = None
        if db is None:
            return
        core = db._core
        writer = core.writer
        writer._stop_flusher.set()
        compaction = getattr(db, "_compact_thread", None)
        if compaction is not None:
            compaction.join(60)  # its calls fail now; let it end
        try:
            writer.abandon()
        except Exception:  # noqa: BLE001 - the dead process's calls fail; only the cleanup matters
            pass
        core.release_buffers()
        core.lock.release()
        core._closed = True

    def restart(self) -> dict[Key, Any]:
        """A new process opens the store after the simulated process crash. A process crash
        loses nothing: the state must be that after every commit that reached the log."""
        self.bury()
        self.rec.revive()
        start = self.rec.mark()
        db = self.open()
        got = db.to_dict()
        ep = self.history.epochs[-1]
        want = self.history.states(ep)[len(ep.order)]
        if got != want:
            raise AssertionError(
                "after a simulated process crash, open() did not recover every commit that reached"
                f" the log\n{diff_states(want, got)}\noperations:\n{crashfs.format_ops(self.rec.ops)}"
            )
        self.history.restart(start, len(ep.order))
        return got


class _Collect:
    def __init__(self, into: list[tuple[int, int, int, bytes]]) -> None:
        self.into = into

    def __call__(self, rtype: int, seq: int, off: int, payload: memoryview) -> None:
        self.into.append((rtype, seq, off, bytes(payload)))


def iter_log(directory: str) -> Iterator[tuple[str, bytes, int, int, int, bytes]]:
    """(segment path, segment bytes, type, seq, offset, payload) of every valid record, in order."""
    for _first, path in sorted(_segments(directory)):
        with open(path, "rb") as f:
            data = f.read()
        header = fmt.decode_file_header(data[: fmt.FILE_HEADER_SIZE])
        found: list[tuple[int, int, int, bytes]] = []
        reader.scan_records(data, fmt.FILE_HEADER_SIZE, header.first_seq, reader.SEGMENT_TYPES, _Collect(found))
        for rtype, seq, off, payload in found:
            yield path, data, rtype, seq, off, payload


def order_from_log(directory: str, commits: Iterable[Commit]) -> list[int]:
    """The commit ids in log order, matched by their operations (for multi-threaded workloads:
    every commit's operations must be unique)."""
    by_ops: dict[str, int] = {}
    for c in commits:
        key = repr(c.log_ops())
        assert key not in by_ops, f"commits c{by_ops[key]} and c{c.cid} cannot be told apart in the log"
        by_ops[key] = c.cid
    out: list[int] = []
    for path, _data, rtype, _seq, off, payload in iter_log(directory):
        if rtype == fmt.REC_COMMIT:
            key = repr(decode_ops(payload))
            if key not in by_ops:
                raise AssertionError(f"a record in {path} at {off} matches no commit: {key[:200]}")
            out.append(by_ops[key])
    return out


def _segments(directory: str) -> list[tuple[int, str]]:
    out = []
    for name in os.listdir(directory):
        m = fmt.SEGMENT_NAME.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(directory, name)))
    return out


def decode_ops(payload: bytes) -> list[tuple[str, Key, Any]]:
    out: list[tuple[str, Key, Any]] = []
    for op in fmt.iter_ops(payload):
        key: Key = op.key.decode() if op.key_is_str else op.key
        if op.op == fmt.OP_DELETE:
            out.append(("del", key, None))
            continue
        value: Any = op.value
        if op.value_kind == fmt.VALUE_STR:
            value = op.value.decode()
        elif op.value_kind == fmt.VALUE_CODEC:
            value = json.loads(op.value)
        out.append(("put", key, value))
    return out


# ---- checking crash states ---------------------------------------------------------------


class Violation(AssertionError):
    """A crash state on which walstore broke a promise (the message says which, and how to replay)."""


def diff_states(want: dict[Key, Any], got: dict[Key, Any], limit: int = 8) -> str:
    lines = []
    for k in sorted(set(want) | set(got), key=repr):
        if want.get(k, "<absent>") != got.get(k, "<absent>"):
            lines.append(f"  {k!r}: expected {_short(want.get(k, '<absent>'))}, got {_short(got.get(k, '<absent>'))}")
    more = f"\n  ... {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more if lines else "  (no difference)"


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) < 60 else r[:57] + "..."


@dataclass
class Checker:
    """Checks crash states of one recorded workload. Count and failures are kept."""

    model: CrashModel
    history: History
    workdir: str
    label: str
    seed: int
    open_kwargs: dict[str, Any] = field(default_factory=dict)
    checked: int = 0
    skipped_duplicates: int = 0
    torn_tails: int = 0
    seen: set[str] = field(default_factory=set)
    results: list[tuple[CrashState, dict[Key, Any], bool]] = field(default_factory=list)

    def marks(self) -> dict[int, str]:
        m: dict[int, str] = {}
        for e in self.history.events:
            if e.kind == "commit":
                m.setdefault(e.attempt, f"commit c{e.cid} attempted")
                if e.ack is not None and e.ack > 0:
                    m[e.ack - 1] = (m.get(e.ack - 1, "") + f" commit c{e.cid} returned").strip()
            elif e.ack is not None and e.ack > 0:
                m[e.ack - 1] = (m.get(e.ack - 1, "") + " sync/close returned").strip()
        return m

    def fail(self, state: CrashState, what: str, detail: str = "") -> None:
        d = os.path.join(self.workdir, f"failing-state-{state.index}")
        if not os.path.exists(d):
            crashfs.materialize(self.model.image(state), d)
        record = os.path.join(self.workdir, "failing-record.json")
        save_record(self.model, record)
        msg = (
            f"walstore crash-state violation: {what}\n{detail}\n"
            f"workload {self.label}, base seed {self.seed} (WALSTORE_CRASH_SEED={self.seed} reproduces the"
            f" workload and the choices; background threads may reorder the record), backend"
            f" {walstore.backend()}\n{state.describe(self.model)}\n"
            f"the state is kept in {d}; the whole record (with data) in {record}\n"
            f"operations (the crash point is marked):\n"
            f"{crashfs.format_ops(self.model.ops, upto=state.index, marks=self.marks())}"
        )
        raise Violation(msg)

    def check(self, state: CrashState, writable: bool = False) -> Optional[dict[Key, Any]]:
        """Open the crash state with the real walstore.open(); check the promises. Returns the state
        (None for a duplicate of a state already checked)."""
        image = self.model.image(state)
        digest = crashfs.image_digest(image)
        if digest in self.seen:
            self.skipped_duplicates += 1
            return None
        self.seen.add(digest)
        self.checked += 1
        d = crashfs.materialize(image, os.path.join(self.workdir, f"s{self.checked}"))
        try:
            got = self._open_check(state, d, writable)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        return got

    def _open_check(self, state: CrashState, d: str, writable: bool) -> dict[Key, Any]:
        path = os.path.join(d, STORE)
        try:
            db = walstore.open(path, **self.open_kwargs)
        except Exception as exc:  # noqa: BLE001 - any exception on a crash state is the failure
            self.fail(state, f"open() raised {type(exc).__name__} on a state a crash can produce", f"  {exc}")
            raise  # pragma: no cover - fail raised
        try:
            got = db.to_dict()
            torn = db.recovery.torn_tail is not None
            if torn:
                self.torn_tails += 1
            ep, lo, hi, required = self.history.bounds(state.index)
            states = self.history.states(ep)
            match = [k for k in range(lo, min(hi, len(states) - 1) + 1) if states[k] == got]
            if not match:
                any_k = [k for k, s in enumerate(states) if s == got]
                if any_k and any_k[-1] < lo:
                    lost = [c for c in required if c not in ep.order[: any_k[-1]]]
                    what = f"acknowledged commits lost: {[f'c{c}' for c in lost]}"
                elif any_k:
                    what = f"commits that were not attempted before the crash appear (prefix {any_k[0]} > {hi})"
                else:
                    what = "the recovered state is not the state after any prefix of the commits"
                near = states[min(max(lo, 0), len(states) - 1)]
                self.fail(
                    state,
                    what,
                    f"  allowed: prefixes {lo}..{hi} of {[f'c{c}' for c in ep.order]}\n"
                    f"  recovery: {db.recovery}\n  difference from prefix {lo}:\n{diff_states(near, got)}",
                )
            if writable:
                db.put("__after_crash__", "x")
                got_after = db.to_dict()
                db.close()
                db2 = walstore.open(path, **self.open_kwargs)
                try:
                    if db2.to_dict() != got_after:
                        self.fail(state, "a commit made after recovery was not there after reopening")
                finally:
                    db2.close()
            self.results.append((state, got, torn))
            return got
        finally:
            if not db.closed:
                db.close()

    def run(self, states: Iterable[CrashState], writable_every: int = 5) -> None:
        for n, st in enumerate(states):
            self.check(st, writable=writable_every > 0 and n % writable_every == 0)


def save_record(model: CrashModel, path: str) -> None:
    """The record as JSON (data as hex), for replaying a failure by hand."""
    out = {
        "initial": {
            "names": model.initial.names,
            "contents": {str(k): v.hex() for k, v in model.initial.contents.items()},
            "dirs": sorted(model.initial.dirs),
        },
        "ops": [
            {
                "index": op.index,
                "kind": op.kind,
                "path": op.path,
                "ino": op.ino,
                "offset": op.offset,
                "data": op.data.hex(),
                "size": op.size,
                "dst": op.dst,
                "start": op.start,
                "call": op.call,
                "thread": op.thread,
            }
            for op in model.ops
        ],
    }
    with open(path, "w") as f:
        json.dump(out, f)


def load_record(path: str) -> CrashModel:
    with open(path) as f:
        raw = json.load(f)
    init = crashfs.Snapshot(
        dict(raw["initial"]["names"]),
        {int(k): bytes.fromhex(v) for k, v in raw["initial"]["contents"].items()},
        set(raw["initial"]["dirs"]),
    )
    ops = [crashfs.Op(**{**o, "data": bytes.fromhex(o["data"])}) for o in raw["ops"]]
    return CrashModel(init, ops)


def check_recovery_idempotent(
    image: crashfs.Image,
    expected: dict[Key, Any],
    workdir: str,
    seed: int,
    limit: int,
    open_kwargs: dict[str, Any],
) -> int:
    """Record a recovery (open and close) of `image`, crash it at each point, recover again:
    every one must give `expected`, and none may raise. Returns the number of states checked."""
    base = crashfs.materialize(image, os.path.join(workdir, "idem-base"))
    rec = RecordingFileAPI(base)
    db = walstore.open(os.path.join(base, STORE), fs=rec, **open_kwargs)
    first = db.to_dict()
    db.close()
    assert first == expected, f"recording the recovery gave another state:\n{diff_states(expected, first)}"
    model = rec.model()
    history = History()
    history.base = dict(expected)
    checker = Checker(model, history, workdir, "recovery of a crash state", seed, open_kwargs)
    for st in crashfs.iter_states(model, seed, limit):
        got = checker.check(st)
        if got is not None and got != expected:
            checker.fail(st, "a crash during recovery changed the recovered state", diff_states(expected, got))
    shutil.rmtree(base, ignore_errors=True)
    return checker.checked


# ---- media corruption ----------------------------------------------------------------------


@dataclass
class RecordPos:
    path: str
    offset: int
    size: int
    seq: int
    durable: int
    rtype: int


def log_records(directory: str) -> list[RecordPos]:
    """Every valid record of every segment, in order."""
    out: list[RecordPos] = []
    for path, data, rtype, seq, off, payload in iter_log(directory):
        durable = fmt.FRAME_HEADER.unpack_from(data, off + 4)[6]
        out.append(RecordPos(path, off, fmt.frame_size(len(payload)), seq, durable, rtype))
    return out


def synced_records(directory: str) -> list[RecordPos]:
    """Records whose damage the watermark rule must call corruption: a record in a segment that
    is not the last, or one whose number some later record's watermark covers."""
    recs = log_records(directory)
    segs = sorted({r.path for r in recs})
    last_seg = max(segs) if segs else ""
    out = []
    for n, r in enumerate(recs):
        later_w = max((x.durable for x in recs[n + 1 :]), default=-1)
        expected = r.seq if r.rtype == fmt.REC_COMMIT else r.seq + 1
        if r.path != last_seg or later_w >= expected:
            out.append(r)
    return out


# ---- the writer subprocess -----------------------------------------------------------------


def writer_commits(seed: int, cycle: int, count: int) -> list[Commit]:
    """The first `count` commits a writer process makes in one cycle (the parent regenerates them)."""
    return list(itertools.islice(iter_writer_commits(seed, cycle), count))


def iter_writer_commits(seed: int, cycle: int) -> Iterator[Commit]:
    return iter_commits(seed * 7919 + cycle, first_cid=cycle * 100000 + 1, nkeys=16)


def writer_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="crashcheck.py writer")
    p.add_argument("--dir", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cycle", type=int, default=0)
    p.add_argument("--count", type=int, default=100000)
    p.add_argument("--durability", default="sync")
    p.add_argument("--segment-size", type=int, default=64 << 10)
    p.add_argument("--close", action="store_true")
    p.add_argument("--sync-every", type=int, default=0)
    args = p.parse_args(argv)
    out = sys.stdout.fileno()

    def say(line: str) -> None:
        os.write(out, (line + "\n").encode())

    db = walstore.open(args.dir, durability=args.durability, segment_size=args.segment_size)
    say(f"O {db.last_seq} {walstore.backend()}")
    for n, c in enumerate(itertools.islice(iter_writer_commits(args.seed, args.cycle), args.count), 1):
        say(f"T {c.cid}")
        run_commit(db, c)
        say(f"A {c.cid}")
        if args.sync_every and n % args.sync_every == 0:
            db.sync()
            say(f"S {c.cid}")
    if args.close:
        db.close()
        say("C")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "writer":
        sys.exit(writer_main(sys.argv[2:]))
    sys.exit("usage: crashcheck.py writer --dir DIR [--seed N --cycle N --count N --durability MODE ...]")
