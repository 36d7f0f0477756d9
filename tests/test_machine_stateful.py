"""hypothesis stateful test: a priority-queue state machine against an in-memory model,
through transactions, rejected operations, compactions, closes, crashes and reopens."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from machines import PQ
from storetools import crash

import walstore

Queue = PQ


class Model:
    """The reference: a plain list, popped by (priority, arrival)."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, int, str]] = []
        self.arrivals = 0

    def copy(self) -> Model:
        m = Model()
        m.entries = list(self.entries)
        m.arrivals = self.arrivals
        return m

    def push(self, priority: int, item: str) -> None:
        self.entries.append((priority, self.arrivals, item))
        self.arrivals += 1

    def pop(self) -> str:
        if not self.entries:
            raise IndexError
        first = min(self.entries)
        self.entries.remove(first)
        return first[2]

    def contents(self) -> list[tuple[int, str]]:
        return [(p, item) for p, _n, item in sorted(self.entries)]


priorities = st.integers(min_value=-3, max_value=3)
items = st.text(max_size=4)
modes = st.sampled_from(["sync", "interval", "none"])
calls = st.lists(st.one_of(st.tuples(st.just("push"), priorities, items), st.just(("pop", 0, ""))), max_size=6)


class Abort(Exception):
    pass


class QueueVsModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="walstore-machine-stateful-"))
        self.path = self.dir / "queue"
        self.model = Model()
        self.store: Optional[walstore.MachineStore[Queue]] = None

    def _open(self, mode: str) -> None:
        self.store = walstore.open_machine(
            self.path, Queue, durability=mode, interval_ms=5, segment_size=1024, auto_compact=False
        )

    @property
    def s(self) -> walstore.MachineStore[Queue]:
        assert self.store is not None
        return self.store

    @initialize(mode=modes)
    def start(self, mode: str) -> None:
        self._open(mode)

    @rule(priority=priorities, item=items)
    def push(self, priority: int, item: str) -> None:
        self.s.state.push(priority, item)
        self.model.push(priority, item)

    @rule()
    def pop(self) -> None:
        before = self.s.last_seq
        if not self.model.entries:
            with pytest.raises(IndexError):
                self.s.state.pop()
            assert self.s.last_seq == before  # rejected: nothing logged
            return
        assert self.s.state.pop() == self.model.pop()

    @rule(ops=calls, fail=st.booleans(), durability=st.one_of(st.none(), modes))
    def transaction(self, ops: list[tuple[str, int, str]], fail: bool, durability: Optional[str]) -> None:
        expected = self.model.copy()
        popped: list[str] = []
        rejected = False
        for name, priority, item in ops:
            if name == "push":
                expected.push(priority, item)
            elif expected.entries:
                popped.append(expected.pop())
            else:
                rejected = True
        before = self.s.last_seq
        results = []
        try:
            with self.s.transaction(durability=durability) as tx:
                for name, priority, item in ops:
                    if name == "push":
                        tx.call(Queue.push, priority, item)
                    else:
                        results.append(tx.call(Queue.pop))
                if fail:
                    raise Abort
        except Abort:
            assert self.s.last_seq == before
            return
        except IndexError:
            assert rejected
            assert self.s.last_seq == before
            return
        assert not rejected
        assert [r.value for r in results] == popped
        assert self.s.last_seq == before + (1 if ops else 0)
        self.model = expected

    @rule()
    def sync(self) -> None:
        self.s.sync()

    @rule(verify=st.booleans())
    def compact(self, verify: bool) -> None:
        info = self.s.compact(verify=verify)
        if info is not None:
            assert info.seq == self.s.last_seq

    @rule(mode=modes)
    def close_and_reopen(self, mode: str) -> None:
        self.s.close()
        self._open(mode)
        assert self.s.recovery.closed_cleanly

    @rule(mode=modes)
    def crash_and_reopen(self, mode: str) -> None:
        """A process crash loses no acknowledged commit, in any mode (the page cache survives)."""
        crash(self.s)  # type: ignore[arg-type]
        self._open(mode)
        assert self.s.recovery.torn_tail is None

    @invariant()
    def equals_model(self) -> None:
        if self.store is not None:
            assert self.store.read(lambda q: (q.contents(), q.pushed)) == (
                self.model.contents(),
                self.model.arrivals,
            )

    def teardown(self) -> None:
        if self.store is not None:
            self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.usefixtures("backend")
def test_queue_machine_matches_model(backend: str) -> None:
    run_state_machine_as_test(QueueVsModel, settings=settings(max_examples=40, stateful_step_count=30, deadline=None))
