"""hypothesis stateful test: the store against a plain dict, through closes, crashes and reopens."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from storetools import crash

import walstore

keys = st.one_of(st.text(max_size=6), st.binary(max_size=6))
values = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=40),
    st.integers(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.booleans(), max_size=3),
    st.none(),
)
modes = st.sampled_from(["sync", "interval", "none"])


class Abort(Exception):
    pass


class StoreVsDict(RuleBasedStateMachine):
    """Every reopen (clean or after a crash in sync mode) must equal the model."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="walstore-stateful-"))
        self.path = self.dir / "db"
        self.model: dict[Any, Any] = {}
        self.mode = "sync"
        self.db: walstore.Store | None = None

    def _open(self) -> None:
        self.db = walstore.open(self.path, durability=self.mode, segment_size=1024, interval_ms=5)

    @initialize(mode=modes)
    def start(self, mode: str) -> None:
        self.mode = mode
        self._open()

    @rule(k=keys, v=values)
    def put(self, k: Any, v: Any) -> None:
        assert self.db is not None
        self.db[k] = v
        self.model[k] = v

    @rule(k=keys)
    def delete(self, k: Any) -> None:
        assert self.db is not None
        existed = self.db.delete(k)
        assert existed == (k in self.model)
        self.model.pop(k, None)

    @rule(
        ops=st.lists(st.tuples(st.booleans(), keys, values), max_size=6),
        fail=st.booleans(),
    )
    def transaction(self, ops: list[tuple[bool, Any, Any]], fail: bool) -> None:
        assert self.db is not None
        pending = dict(self.model)
        try:
            with self.db.transaction() as tx:
                for is_put, k, v in ops:
                    if is_put:
                        tx[k] = v
                        pending[k] = v
                    else:
                        tx.discard(k)
                        pending.pop(k, None)
                if fail:
                    raise Abort
        except Abort:
            return
        self.model = pending

    @rule()
    def sync(self) -> None:
        assert self.db is not None
        self.db.sync()

    @rule()
    def close_and_reopen(self) -> None:
        assert self.db is not None
        self.db.close()
        self._open()

    @precondition(lambda self: self.mode == "sync")
    @rule()
    def crash_and_reopen(self) -> None:
        """Sync mode: a process crash loses nothing that was acknowledged."""
        assert self.db is not None
        crash(self.db)
        self._open()

    @rule()
    def sync_crash_and_reopen(self) -> None:
        """Any mode: after sync(), a process crash loses nothing."""
        assert self.db is not None
        self.db.sync()
        crash(self.db)
        self._open()

    @invariant()
    def equals_model(self) -> None:
        if self.db is not None:
            assert self.db.to_dict() == _json_roundtrip(self.model)

    def teardown(self) -> None:
        if self.db is not None:
            self.db.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _json_roundtrip(model: dict[Any, Any]) -> dict[Any, Any]:
    import json

    out = {}
    for k, v in model.items():
        out[k] = v if isinstance(v, (bytes, str)) else json.loads(json.dumps(v))
    return out


@pytest.mark.usefixtures("backend")
def test_store_matches_dict_model(backend: str) -> None:
    run_state_machine_as_test(StoreVsDict, settings=settings(max_examples=40, stateful_step_count=30, deadline=None))
