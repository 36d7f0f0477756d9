"""Application state machines behind the log: walstore.operation, open_machine, MachineStore."""

from __future__ import annotations

import errno
import gc
import heapq
import json
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any

import machines
import pytest
from storetools import crash

import walstore
from walstore import format as fmt
from walstore import reader, snapshot
from walstore.fileapi import OSFileAPI


class PQ(machines.PQ):
    """The shared priority queue, plus operations that exercise the store's rules."""

    @walstore.operation
    def pop_unchecked(self) -> str:
        """No validator: its body raises on an empty queue (a bug the store must contain)."""
        item: str = heapq.heappop(self.heap)[2]
        return item

    @walstore.operation
    def push_many(self, items: list[str]) -> int:
        for item in items:
            self.push(len(item), item)  # nested: part of this operation, not logged by itself
        return len(self.heap)

    @walstore.operation
    def sneaky(self) -> None:
        pass

    @sneaky.validator
    def check_sneaky(self) -> None:
        self.push(0, "from a validator")  # not allowed

    def items(self) -> list[str]:
        return [e[2] for e in sorted(self.heap)]


def logged_calls(path: Path) -> list[tuple[int, list[tuple[str, Any]]]]:
    """(seq, [(operation name, decoded value)]) of every COMMIT in the store's segments."""
    out: list[tuple[int, list[tuple[str, Any]]]] = []
    for seg in sorted(path.glob("seg-*.wal")):
        data = seg.read_bytes()
        first = fmt.decode_file_header(data[:64]).first_seq

        def note(rtype: int, seq: int, off: int, payload: memoryview) -> None:
            if rtype == fmt.REC_COMMIT:
                ops = [(op.key.decode(), json.loads(op.value)) for op in fmt.iter_ops(payload)]
                assert all(op.op == fmt.OP_CALL for op in fmt.iter_ops(payload))
                out.append((seq, ops))

        reader.scan_records(data, 64, first, reader.SEGMENT_TYPES, note)
    return out


# ---- basics ---------------------------------------------------------------------------


def test_operations_are_logged_then_replayed(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "q"
    with walstore.open_machine(path, PQ) as store:
        q = store.state
        q.push(3, "c")
        q.push(1, "a")
        store.call(PQ.push, 2, "b")
        assert q.pop() == "a"
        assert store.last_seq == 4
        assert q.items() == ["b", "c"]
    assert logged_calls(path) == [
        (1, [("push", [1, [3, "c"]])]),
        (2, [("push", [1, [1, "a"]])]),
        (3, [("push", [1, [2, "b"]])]),
        (4, [("pop", [1, []])]),
    ]
    with walstore.open_machine(path, PQ) as store:
        assert store.state.items() == ["b", "c"]
        assert store.state.pushed == 3
        assert store.replayed_ops == 4
        assert store.recovery.closed_cleanly


def test_unmanaged_state_is_an_ordinary_object() -> None:
    q = PQ()
    q.push(2, "b")
    q.push(1, "a")
    assert q.pop() == "a"
    with pytest.raises(IndexError):
        PQ().pop()  # the validator runs here too


def test_keyword_arguments_and_defaults_are_stored_in_parameter_order(tmp_path: Path) -> None:
    class Rec:
        def __init__(self) -> None:
            self.calls: list[list[Any]] = []

        @walstore.operation
        def f(self, a: int, b: int = 2, *, c: int = 3) -> None:
            self.calls.append([a, b, c])

    path = tmp_path / "r"
    with walstore.open_machine(path, Rec) as store:
        store.state.f(1)
        store.state.f(1, c=5)
        store.state.f(b=7, a=0)
        with pytest.raises(TypeError, match="f()"):
            store.state.f(1, 2, 3)  # type: ignore[misc]
        assert store.last_seq == 3
        live = store.state.calls
    assert [ops[0][1] for _s, ops in logged_calls(path)] == [[1, [1, 2, 3]], [1, [1, 2, 5]], [1, [0, 7, 3]]]
    with walstore.open_machine(path, Rec) as store:
        assert store.state.calls == live == [[1, 2, 3], [1, 2, 5], [0, 7, 3]]


def test_arguments_are_applied_as_the_codec_decodes_them(tmp_path: Path) -> None:
    """Live and replay see the same values: a tuple arrives as a list, and the caller's object is not kept."""

    class Box:
        def __init__(self) -> None:
            self.items: list[Any] = []

        @walstore.operation
        def add(self, value: Any) -> None:
            self.items.append(value)

    path = tmp_path / "b"
    arg = {"pair": (1, 2)}
    with walstore.open_machine(path, Box) as store:
        store.state.add(arg)
        arg["pair"] = (9, 9)  # the caller changes its object afterwards
        live = store.state.items
        assert live == [{"pair": [1, 2]}]
        with pytest.raises(walstore.CodecError):
            store.state.add(object())
        assert store.last_seq == 1
    with walstore.open_machine(path, Box) as store:
        assert store.state.items == live


def test_nested_operation_calls_are_part_of_the_outer_operation(tmp_path: Path) -> None:
    path = tmp_path / "n"
    with walstore.open_machine(path, PQ) as store:
        assert store.state.push_many(["bb", "a", "ccc"]) == 3
        assert store.last_seq == 1
        live = store.state.items()
    assert [ops for _s, ops in logged_calls(path)] == [[("push_many", [1, [["bb", "a", "ccc"]]])]]
    with walstore.open_machine(path, PQ) as store:
        assert store.state.items() == live == ["a", "bb", "ccc"]


def test_declaration_errors() -> None:
    with pytest.raises(TypeError, match=r"\*args"):

        class A:
            @walstore.operation
            def f(self, *args: int) -> None:
                pass

    with pytest.raises(ValueError, match="version"):
        walstore.operation(version=0)(lambda self: None)
    with pytest.raises(ValueError, match="upgrade"):
        walstore.operation(upgrade=lambda v, a: a)(lambda self: None)

    class NoOps:
        pass

    with pytest.raises(TypeError, match="no operations"):
        walstore.open_machine("/nonexistent/never-created", NoOps)

    class Twice:
        @walstore.operation
        def a(self) -> None:
            pass

        @walstore.operation(name="a")
        def b(self) -> None:
            pass

    with pytest.raises(TypeError, match="two operations"):
        walstore.open_machine("/nonexistent/never-created", Twice)


def test_state_without_weak_references_is_refused(tmp_path: Path) -> None:
    class Slotted:
        __slots__ = ("n",)

        def __init__(self) -> None:
            self.n = 0

        @walstore.operation
        def inc(self) -> None:
            self.n += 1

    with pytest.raises(TypeError, match="__weakref__"):
        walstore.open_machine(tmp_path / "s", Slotted)
    with walstore.open_machine(tmp_path / "s", PQ):  # the failed open released the lock
        pass


# ---- the raise rule ---------------------------------------------------------------------


def test_rejected_operation_changes_neither_state_nor_log(tmp_path: Path) -> None:
    path = tmp_path / "q"
    with walstore.open_machine(path, PQ) as store:
        store.state.push(1, "a")
        assert store.state.pop() == "a"
        before = sorted(p.read_bytes() for p in path.glob("seg-*.wal"))
        with pytest.raises(IndexError, match="empty"):
            store.state.pop()
        assert store.last_seq == 2
        assert sorted(p.read_bytes() for p in path.glob("seg-*.wal")) == before
        store.state.push(5, "e")  # the store still works
    with walstore.open_machine(path, PQ) as store:
        assert store.state.items() == ["e"]


class UsesStore:
    store: Any = None

    def __init__(self) -> None:
        self.n = 0

    @walstore.operation
    def inc(self) -> None:
        self.n += 1

    @walstore.operation
    def reentrant(self) -> None:
        UsesStore.store.call(UsesStore.inc)  # deadlock-prone: refused before anything is logged

    @reentrant.validator
    def check_reentrant(self) -> None:
        assert UsesStore.store.read(lambda s: s.n) == self.n  # reading is fine


def test_body_may_not_use_the_store(tmp_path: Path) -> None:
    store = walstore.open_machine(tmp_path / "u", UsesStore)
    UsesStore.store = store
    store.state.inc()
    with pytest.raises(walstore.StorePoisonedError) as info:
        store.state.reentrant()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "inside an operation" in str(info.value.__cause__)
    store.close()
    UsesStore.store = None


def test_validator_may_not_call_operations(tmp_path: Path) -> None:
    with walstore.open_machine(tmp_path / "q", PQ) as store:
        with pytest.raises(RuntimeError, match="validator"):
            store.state.sneaky()
        assert store.last_seq == 0 and store.state.heap == []


def test_body_that_raises_poisons_the_store_and_replay_names_it(tmp_path: Path) -> None:
    path = tmp_path / "q"
    store = walstore.open_machine(path, PQ)
    store.state.push(1, "a")
    with pytest.raises(walstore.StorePoisonedError, match="applying commit 5") as info:
        store.state.push(2, "b")
        store.state.pop_unchecked()
        store.state.pop_unchecked()
        store.state.pop_unchecked()  # empty: the body raises after the record was logged
    assert isinstance(info.value.__cause__, IndexError)
    with pytest.raises(walstore.StorePoisonedError):
        store.state.push(3, "c")
    with pytest.raises(walstore.StorePoisonedError):
        store.compact()
    store.close()
    with pytest.raises(walstore.ReplayError, match=r"commit 5: operation 'pop_unchecked' raised IndexError"):
        walstore.open_machine(path, PQ)

    class FixedPQ(PQ):
        @walstore.operation(name="pop_unchecked")
        def pop_unchecked_fixed(self) -> str:
            return heapq.heappop(self.heap)[2] if self.heap else ""

    with walstore.open_machine(path, FixedPQ) as store:  # fixed code replays it
        assert store.state.heap == []
        assert store.state.pop_unchecked_fixed() == ""
        with pytest.raises(TypeError, match="not an operation of"):
            store.state.pop_unchecked()  # the inherited operation it replaced


# ---- transactions -----------------------------------------------------------------------


def test_transaction_is_one_commit(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "q"
    with walstore.open_machine(path, PQ) as store:
        with store.transaction() as tx:
            tx.call(PQ.push, 2, "b")
            tx.call(PQ.push, 1, "a")
            first = tx.call(PQ.pop)
            assert len(tx) == 3
            with pytest.raises(walstore.WalstoreError, match="not committed"):
                _ = first.value
        assert first.done and first.value == "a"
        assert store.last_seq == 1
        crash(store)
    assert [len(ops) for _s, ops in logged_calls(path)] == [3]
    with walstore.open_machine(path, PQ) as store:
        assert store.state.items() == ["b"]


def test_transaction_rejected_by_a_later_validator_logs_nothing(tmp_path: Path) -> None:
    path = tmp_path / "q"
    with walstore.open_machine(path, PQ) as store:
        store.state.push(1, "only")
        with pytest.raises(IndexError):
            with store.transaction() as tx:
                tx.call(PQ.push, 5, "x")
                tx.call(PQ.pop)
                tx.call(PQ.pop)
                tx.call(PQ.pop)  # the third pop sees the first two applied: rejected
        assert store.last_seq == 1
        assert store.state.items() == ["only"]
        with store.transaction() as tx:  # two pops of a two-item queue pass
            tx.call(PQ.push, 5, "x")
            a = tx.call(PQ.pop)
            b = tx.call(PQ.pop)
        assert (a.value, b.value) == ("only", "x")
        assert store.state.heap == []


def test_transaction_body_raising_on_the_copy_rejects_it(tmp_path: Path) -> None:
    with walstore.open_machine(tmp_path / "q", PQ) as store:
        with pytest.raises(IndexError):
            with store.transaction() as tx:
                tx.call(PQ.pop_unchecked)  # no validator, but rehearsed before the validated push
                tx.call(PQ.pop)
        assert store.last_seq == 0
        store.state.push(1, "a")


def test_transaction_discarded_on_exception_and_closed_after(tmp_path: Path) -> None:
    with walstore.open_machine(tmp_path / "q", PQ) as store:
        with pytest.raises(KeyError):
            with store.transaction() as tx:
                tx.call(PQ.push, 1, "a")
                raise KeyError("changed my mind")
        assert store.last_seq == 0
        with pytest.raises(walstore.TransactionClosedError):
            tx.call(PQ.push, 1, "a")
        with store.transaction() as tx:
            pass  # empty: nothing logged
        assert store.last_seq == 0
        with store.transaction() as tx:
            with pytest.raises(TypeError, match="push"):
                tx.call(PQ.push, 1)  # type: ignore[call-arg]
            with pytest.raises(walstore.CodecError):
                tx.call(PQ.push, 1, object())  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="not an operation"):
                tx.call(Other.bump)  # type: ignore[arg-type]
        assert store.last_seq == 0


class Other:
    @walstore.operation
    def bump(self) -> None:
        pass


# ---- replay: unknown operations and versions --------------------------------------------


class AccountsV1:
    def __init__(self) -> None:
        self.balances: dict[str, int] = {}
        self.log: list[list[Any]] = []

    @walstore.operation
    def deposit(self, name: str, amount: int) -> None:
        self.balances[name] = self.balances.get(name, 0) + amount

    @walstore.operation
    def close_account(self, name: str) -> None:
        self.balances.pop(name, None)


upgrades: list[tuple[int, list[Any]]] = []


def upgrade_deposit(old_version: int, args: list[Any]) -> list[Any]:
    upgrades.append((old_version, list(args)))
    if old_version == 1:  # version 1 had no currency: everything was in EUR
        return [*args, "EUR"]
    raise ValueError(old_version)


class AccountsV2:
    """Release 2: deposits carry a currency; the method was renamed but keeps its stored name."""

    def __init__(self) -> None:
        self.balances: dict[str, int] = {}
        self.log: list[list[Any]] = []

    @walstore.operation(name="deposit", version=2, upgrade=upgrade_deposit)
    def deposit_money(self, name: str, amount: int, currency: str) -> None:
        self.balances[name] = self.balances.get(name, 0) + amount
        self.log.append([name, amount, currency])

    @walstore.operation
    def close_account(self, name: str) -> None:
        self.balances.pop(name, None)


class AccountsV2NoUpgrade:
    def __init__(self) -> None:
        self.balances: dict[str, int] = {}

    @walstore.operation(name="deposit", version=2)
    def deposit(self, name: str, amount: int, currency: str) -> None:
        self.balances[name] = amount

    @walstore.operation
    def close_account(self, name: str) -> None:
        pass


class AccountsChangedSignature:
    def __init__(self) -> None:
        self.balances: dict[str, int] = {}

    @walstore.operation
    def deposit(self, name: str, amount: int, currency: str) -> None:  # version 1 still: a mistake
        self.balances[name] = amount

    @walstore.operation
    def close_account(self, name: str) -> None:
        pass


class AccountsWithoutClose:
    def __init__(self) -> None:
        self.balances: dict[str, int] = {}

    @walstore.operation
    def deposit(self, name: str, amount: int) -> None:
        self.balances[name] = amount


def test_unknown_operation_at_replay_is_named(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "a"
    with walstore.open_machine(path, AccountsV1) as store:
        store.state.deposit("ada", 5)
        store.state.close_account("ada")
    with pytest.raises(walstore.ReplayError, match=r"commit 2 calls operation 'close_account'.*deposit"):
        walstore.open_machine(path, AccountsWithoutClose)
    with walstore.open_machine(path, AccountsV1) as store:  # nothing changed on disk
        assert store.state.balances == {}


def test_upgrade_at_replay(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "a"
    with walstore.open_machine(path, AccountsV1) as store:
        store.state.deposit("ada", 5)
        store.state.deposit("bob", 7)
    upgrades.clear()
    with walstore.open_machine(path, AccountsV2) as store:
        assert upgrades == [(1, ["ada", 5]), (1, ["bob", 7])]
        assert store.state.log == [["ada", 5, "EUR"], ["bob", 7, "EUR"]]
        store.state.deposit_money("ada", 1, "USD")
    assert logged_calls(path)[-1][1] == [("deposit", [2, ["ada", 1, "USD"]])]
    upgrades.clear()
    with walstore.open_machine(path, AccountsV2) as store:
        assert len(upgrades) == 2  # the version-2 record needs none
        assert store.state.balances == {"ada": 6, "bob": 7}
        assert store.state.log[-1] == ["ada", 1, "USD"]
    with pytest.raises(walstore.ReplayError, match=r"commit 3: .*'deposit' was logged as version 2, newer"):
        walstore.open_machine(path, AccountsV1)
    with pytest.raises(walstore.ReplayError, match="declares no upgrade"):
        walstore.open_machine(path, AccountsV2NoUpgrade)


def test_changed_signature_without_new_version_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "a"
    with walstore.open_machine(path, AccountsV1) as store:
        store.state.deposit("ada", 5)
    with pytest.raises(walstore.ReplayError, match="did its parameters change without a new version"):
        walstore.open_machine(path, AccountsChangedSignature)


def test_kv_store_and_machine_store_refuse_each_other(tmp_path: Path, backend: str) -> None:
    with walstore.open(tmp_path / "kv") as db:
        db["a"] = 1
    with pytest.raises(walstore.WalstoreError, match="holds 'kv' state.*walstore.open$"):
        walstore.open_machine(tmp_path / "kv", PQ)
    with walstore.open_machine(tmp_path / "m", PQ) as store:
        store.state.push(1, "a")
    with pytest.raises(walstore.WalstoreError, match="holds 'machine:PQ' state.*walstore.open_machine"):
        walstore.open(tmp_path / "m")


# ---- snapshots and compaction -------------------------------------------------------------


def test_compact_then_reopen(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "q"
    with walstore.open_machine(path, PQ, segment_size=4096, auto_compact=False) as store:
        q = store.state
        for i in range(300):
            q.push(i % 17, f"item{i}")
            if i % 3 == 0:
                q.pop()
        assert len(list(path.glob("seg-*.wal"))) > 3
        info = store.compact(verify=True)
        assert info is not None and info.seq == store.last_seq
        assert [p.name for p in path.glob("snap-*.snap")] == [fmt.snapshot_name(info.seq)]
        assert [p.name for p in path.glob("seg-*.wal")] == [fmt.segment_name(info.seq + 1)]
        assert store.compact() is None  # nothing new
        q.push(-1, "after")
        model = q.items()
        pushed = q.pushed
    with walstore.open_machine(path, PQ) as store:
        assert store.recovery.snapshot_seq == info.seq
        assert store.replayed_ops == 1
        assert store.state.items() == model and store.state.pushed == pushed
        store.state.pop()
        crash(store)
    with walstore.open_machine(path, PQ) as store:
        assert store.state.items() == model[1:]


class Packed:
    """State with its own binary snapshot format (bytes are stored as they are)."""

    def __init__(self) -> None:
        self.values: list[int] = []

    @walstore.operation
    def add(self, v: int) -> None:
        self.values.append(v)

    def __walstore_snapshot__(self) -> bytes:
        return struct.pack(f"<{len(self.values)}q", *self.values)

    @classmethod
    def __walstore_restore__(cls, blob: bytes) -> Packed:
        obj = cls()
        obj.values = list(struct.unpack(f"<{len(blob) // 8}q", blob))
        return obj


def test_custom_snapshot_functions_and_large_states_in_chunks(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshot, "CHUNK_BYTES", 4096)
    path = tmp_path / "p"
    with walstore.open_machine(path, Packed, auto_compact=False) as store:
        with store.transaction() as tx:
            for i in range(2000):  # 16,000 bytes of state: four SNAPSHOT_DATA records
                tx.call(Packed.add, i * 3)
        info = store.compact(verify=True)
        assert info is not None and info.records == 4 and info.ops == 4
        store.state.add(-1)
    with walstore.open_machine(path, Packed) as store:
        assert store.state.values[:3] == [0, 3, 6] and store.state.values[-2:] == [5997, -1]
        assert len(store.state.values) == 2001


def test_verify_catches_a_state_the_codec_does_not_round_trip(tmp_path: Path) -> None:
    class Tuples:
        def __init__(self) -> None:
            self.pairs: dict[int, tuple[int, int]] = {}

        @walstore.operation
        def put(self, k: int, a: int, b: int) -> None:
            self.pairs[k] = (a, b)  # json would bring back {"1": [a, b]}

    path = tmp_path / "t"
    with walstore.open_machine(path, Tuples) as store:
        store.state.put(1, 2, 3)
        with pytest.raises(walstore.SnapshotError, match="does not survive its snapshot"):
            store.compact(verify=True)
        assert list(path.glob("snap-*")) == []
        store.state.put(2, 3, 4)  # the store still works
    with walstore.open_machine(path, Tuples) as s:
        assert s.state.pairs == {1: (2, 3), 2: (3, 4)}  # the log replays exactly


def test_pickle_codec_round_trips_any_picklable_state(tmp_path: Path) -> None:
    class Rich:
        def __init__(self) -> None:
            self.tags: set[str] = set()
            self.points: dict[tuple[int, int], str] = {}

        @walstore.operation
        def tag(self, t: str, at: tuple[int, int]) -> None:
            self.tags.add(t)
            self.points[at] = t

    globals()["Rich"] = Rich  # pickle finds the class by name
    Rich.__qualname__ = "Rich"
    path = tmp_path / "r"
    with walstore.open_machine(path, Rich, codec="pickle") as store:
        store.state.tag("x", (1, 2))
        store.compact(verify=True)
        store.state.tag("y", (3, 4))
    with walstore.open_machine(path, Rich, codec="pickle") as store:
        assert store.state.tags == {"x", "y"} and store.state.points == {(1, 2): "x", (3, 4): "y"}
    with pytest.raises(walstore.WalstoreError, match="codec"):
        walstore.open_machine(path, Rich)


def test_automatic_compaction_bounds_the_log(tmp_path: Path) -> None:
    path = tmp_path / "q"
    with walstore.open_machine(path, PQ, segment_size=4096, compact_min_bytes=8192, durability="none") as store:
        for i in range(2000):
            store.state.push(i % 5, "x" * 20)
            if i % 2:
                store.state.pop()
        model = store.state.items()
    assert store.compactions >= 1 and store.last_compaction_error is None
    assert sum(p.stat().st_size for p in path.glob("seg-*.wal")) < 64 * 1024
    with walstore.open_machine(path, PQ) as store:
        assert store.recovery.snapshot_seq > 0
        assert store.state.items() == model


def test_commits_continue_during_compaction(tmp_path: Path) -> None:
    path = tmp_path / "q"
    with walstore.open_machine(path, PQ, segment_size=8192, auto_compact=False, durability="none") as store:
        stop = threading.Event()

        def writer() -> None:
            j = 0
            while not stop.is_set() or j < 300:
                store.state.push(j % 11, f"w{j}")
                j += 1

        t = threading.Thread(target=writer)
        t.start()
        for _ in range(5):
            store.compact(verify=True)
        stop.set()
        t.join()
        model = store.read(lambda s: (s.items(), s.pushed))
    with walstore.open_machine(path, PQ) as store:
        assert (store.state.items(), store.state.pushed) == model


class SnapshotFailingFS(OSFileAPI):
    """A full disk for snapshot files only."""

    def __init__(self) -> None:
        self.snap_fds: set[int] = set()
        self.armed = True

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        fd = super().open(path, flags, mode)
        if path.endswith(".snap.tmp"):
            self.snap_fds.add(fd)
        return fd

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        if self.armed and fd in self.snap_fds:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return super().pwrite(fd, data, offset)

    def close(self, fd: int) -> None:
        self.snap_fds.discard(fd)
        super().close(fd)


def test_failed_snapshot_write_leaves_the_store_working(tmp_path: Path) -> None:
    path = tmp_path / "q"
    fs = SnapshotFailingFS()
    with walstore.open_machine(path, PQ, fs=fs, auto_compact=False) as store:
        store.state.push(1, "a")
        with pytest.raises(walstore.DiskFullError):
            store.compact()
        assert list(path.glob("snap-*")) == [] and list(path.glob("*.tmp")) == []
        store.state.push(2, "b")
        fs.armed = False
        assert store.compact() is not None
        store.state.pop()
    with walstore.open_machine(path, PQ) as store:
        assert store.state.items() == ["b"]


# ---- durability, group commit, threads ------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "interval", "none"])
def test_process_crash_loses_nothing_in_any_mode(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "q"
    store = walstore.open_machine(path, PQ, durability=mode, interval_ms=5)
    for i in range(50):
        store.state.push(i, str(i))
    with store.transaction() as tx:
        tx.call(PQ.pop)
        tx.call(PQ.pop)
    model = store.state.items()
    crash(store)
    with walstore.open_machine(path, PQ, durability=mode) as store:
        assert store.state.items() == model
        assert store.recovery.torn_tail is None


def test_durability_modes_and_overrides(tmp_path: Path) -> None:
    with walstore.open_machine(tmp_path / "s", PQ) as store:  # sync: durable on return
        store.state.push(1, "a")
        assert store.stats()["durable_seq"] == store.last_seq == 1
    with walstore.open_machine(tmp_path / "n", PQ, durability="none") as store:
        store.state.push(1, "a")
        store.state.push(2, "b")
        assert store.stats()["durable_seq"] < store.last_seq
        with store.transaction(durability="sync") as tx:
            tx.call(PQ.push, 3, "c")
        assert store.stats()["durable_seq"] == store.last_seq == 3
        store.state.push(4, "d")
        store.sync()
        assert store.stats()["durable_seq"] == 4
        with pytest.raises(ValueError, match="durability"):
            store.transaction(durability="Sync")
    with pytest.raises(ValueError, match="durability"):
        walstore.open_machine(tmp_path / "x", PQ, durability="always")


class GatedFS(OSFileAPI):
    """The first fdatasync after arming blocks until the test opens the gate."""

    def __init__(self) -> None:
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def fdatasync(self, fd: int) -> None:
        gate, self.gate = self.gate, None
        if gate is not None:
            self.entered.set()
            gate.wait(30)
        super().fdatasync(fd)


def _wait_for(cond: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.001)


def test_group_commit_shares_one_fdatasync(tmp_path: Path) -> None:
    """While a leader's fdatasync is in flight, 7 more committers write and then share the next one."""
    fs = GatedFS()
    n = 8
    with walstore.open_machine(tmp_path / "q", PQ, fs=fs, preallocate=False) as store:
        before = store.stats()
        gate = threading.Event()
        fs.gate = gate
        threads = [threading.Thread(target=store.state.push, args=(0, "leader"))]
        threads[0].start()
        fs.entered.wait(30)
        for i in range(1, n):
            threads.append(threading.Thread(target=store.state.push, args=(i, f"t{i}")))
            threads[-1].start()
        _wait_for(lambda: store.last_seq == n, "every record to be written")
        gate.set()
        for t in threads:
            t.join()
        after = store.stats()
        assert after["commits"] - before["commits"] == n
        assert after["fsyncs"] - before["fsyncs"] == 2  # the leader's, then one for the other seven
        assert after["durable_seq"] == n
        assert len(store.state.heap) == n


def test_concurrent_operations_validate_against_the_current_state(tmp_path: Path) -> None:
    """Validators run under the lock: racing pops never reach an empty heap in a body."""
    path = tmp_path / "q"
    popped: list[str] = []
    rejected = 0
    lock = threading.Lock()
    with walstore.open_machine(path, PQ, durability="none") as store:
        q = store.state

        def worker(k: int) -> None:
            nonlocal rejected
            for i in range(200):
                if (i + k) % 2:
                    q.push(i, f"{k}-{i}")
                    continue
                try:
                    item = q.pop()
                except IndexError:
                    with lock:
                        rejected += 1
                    continue
                with lock:
                    popped.append(item)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert q.pushed == 400
        assert len(popped) + len(q.heap) == 400
        assert store.last_seq == 400 + len(popped)
        model = store.read(lambda s: s.items())
        crash(store)
    with walstore.open_machine(path, PQ) as store:
        assert store.state.items() == model


# ---- closing ----------------------------------------------------------------------------------


def test_operations_after_close_raise(tmp_path: Path) -> None:
    store = walstore.open_machine(tmp_path / "q", PQ)
    q = store.state
    store.close()
    store.close()  # idempotent
    with pytest.raises(walstore.StoreClosedError):
        q.push(1, "a")
    with pytest.raises(walstore.StoreClosedError):
        _ = store.state
    with pytest.raises(walstore.StoreClosedError):
        store.read(lambda s: s.heap)
    assert q.heap == []


def test_state_of_a_dropped_store_refuses_operations(tmp_path: Path) -> None:
    q = walstore.open_machine(tmp_path / "q", PQ).state  # the store object is dropped at once
    gc.collect()
    with pytest.raises(walstore.StoreClosedError, match="keep a reference to the store"):
        q.push(1, "a")
    assert q.heap == []


def test_open_refuses_a_second_writer(tmp_path: Path) -> None:
    with walstore.open_machine(tmp_path / "q", PQ):
        with pytest.raises(walstore.StoreLockedError):
            walstore.open_machine(tmp_path / "q", PQ)
    assert os.path.exists(tmp_path / "q" / "LOCK")


def test_snapshot_never_runs_ahead_of_the_durable_log(tmp_path: Path) -> None:
    """Power loss after a compaction that a commit slipped into (between the segment seal and the
    state capture, in `none` mode): the snapshot's records must already be durable, or the
    reopened writer would continue a segment at the wrong sequence number."""
    from walstore.crashfs import RecordingFileAPI, materialize

    rec = RecordingFileAPI(tmp_path / "rec")
    store = walstore.open_machine(tmp_path / "rec" / "q", PQ, fs=rec, durability="none", auto_compact=False)
    for i in range(5):
        store.state.push(i, f"p{i}")
    seal = store._writer.seal_for_snapshot

    def seal_then_commit() -> int:
        seq = seal()
        store.state.push(9, "slipped in")  # after the seal, before the capture; not synced
        return seq

    store._writer.seal_for_snapshot = seal_then_commit  # type: ignore[method-assign]
    info = store.compact()
    assert info is not None and info.seq == 6
    store._writer.seal_for_snapshot = seal  # type: ignore[method-assign]
    store.state.push(10, "after")  # not synced: may be lost
    model = rec.model()
    crash(store)  # type: ignore[arg-type]
    after = tmp_path / "after"
    materialize(model.image_at(len(model), {}), after)  # only what was durable
    with walstore.open_machine(after / "q", PQ) as reopened:
        assert reopened.recovery.snapshot_seq == 6
        assert "slipped in" in reopened.state.items()
        reopened.state.push(11, "new")
    with walstore.open_machine(after / "q", PQ) as again:  # the log continues correctly
        assert again.state.items()[-1] == "new"


def test_every_power_loss_state_of_a_machine_workload(tmp_path: Path) -> None:
    """Record a workload (operations, transactions, rejected calls, `none`-mode commits, a commit
    slipping into a compaction, two compactions, segment rolls, close) through the crash
    simulator; at every crash point, open the states a power loss can leave: open() never fails,
    the state is the one after some prefix of the commits, every commit acknowledged as durable
    is in it, and the store takes writes after."""
    import random

    from walstore import crashfs
    from walstore.crashfs import RecordingFileAPI, materialize

    rng = random.Random(7)
    rec = RecordingFileAPI(tmp_path / "rec")
    store = walstore.open_machine(tmp_path / "rec" / "q", PQ, fs=rec, segment_size=4096, auto_compact=False)
    model = PQ()  # unmanaged: an ordinary object, the reference
    states = [(model.items(), model.pushed)]  # states[k]: after commit k
    durable_at: list[tuple[int, int]] = []  # (record mark once durable, commit index)
    started: list[int] = [0]  # started[k]: record mark when commit k began

    def commit(fn: Any, sync: bool) -> None:
        started.append(rec.mark())
        fn()
        states.append((model.items(), model.pushed))
        if sync:
            durable_at.append((rec.mark(), len(states) - 1))

    for i in range(70):
        sync = i % 5 != 3
        mode = None if sync else "none"
        r = rng.random()
        if r < 0.5:
            p, item = rng.randrange(5), f"i{i}" * rng.randrange(1, 20)

            def one(p: int = p, item: str = item, mode: Any = mode) -> None:
                with store.transaction(durability=mode) as tx:
                    tx.call(PQ.push, p, item)
                model.push(p, item)

            commit(one, sync)
        elif r < 0.7 and model.heap:

            def pop(mode: Any = mode) -> None:
                with store.transaction(durability=mode) as tx:
                    got = tx.call(PQ.pop)
                assert got.value == model.pop()

            commit(pop, sync)
        elif r < 0.8 and not model.heap:
            with pytest.raises(IndexError):
                store.state.pop()  # rejected: no commit
        else:

            def several(mode: Any = mode, i: int = i) -> None:
                with store.transaction(durability=mode) as tx:
                    tx.call(PQ.push, 1, f"t{i}a")
                    tx.call(PQ.push, 2, f"t{i}b")
                    tx.call(PQ.pop)
                model.push(1, f"t{i}a")
                model.push(2, f"t{i}b")
                model.pop()

            commit(several, sync)
        if i in (25, 50):
            seal = store._writer.seal_for_snapshot

            def seal_then_commit(seal: Any = seal, i: int = i) -> int:
                seq = seal()

                def slip() -> None:
                    with store.transaction(durability="none") as tx:
                        tx.call(PQ.push, 0, f"slip{i}")
                    model.push(0, f"slip{i}")

                commit(slip, False)
                return int(seq)

            store._writer.seal_for_snapshot = seal_then_commit  # type: ignore[method-assign]
            assert store.compact() is not None
            store._writer.seal_for_snapshot = seal  # type: ignore[method-assign]
    store.close()
    durable_at.append((rec.mark(), len(states) - 1))  # close syncs everything

    recorded = rec.model()
    checked = lost = 0
    for state in crashfs.iter_states(recorded, seed=11, limit=400):
        must = max((k for mark, k in durable_at if mark <= state.index), default=0)
        may = max(k for k in range(len(started)) if started[k] < state.index) if state.index else 0
        dest = tmp_path / "states" / str(checked)
        materialize(recorded.image(state), dest)
        where = f"crash state {state.describe(recorded)}"
        with walstore.open_machine(dest / "q", PQ) as reopened:
            got = (reopened.state.items(), reopened.state.pushed)
            candidates = [k for k in range(must, max(must, may) + 1) if states[k] == got]
            assert candidates, f"{where}: state {got} is not after commit {must}..{may}"
            reopened.state.push(0, "after")
            expected = reopened.state.items()
        with walstore.open_machine(dest / "q", PQ) as again:
            assert again.state.items() == expected, where
        checked += 1
        lost += got != states[may]
    assert checked > 100
    assert lost > 10, "no crash state lost an unsynced commit: the model is not dropping anything"
