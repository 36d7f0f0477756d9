"""An exception raised asynchronously (KeyboardInterrupt, SystemExit) in the middle of a commit.

Such an exception can arrive between any two bytecodes, so also between the write of a
record and the update of the in-memory state. If the record is in the log, the state
lags the log: the store must refuse writes until it is reopened (which rebuilds the
state from the log), and the exception itself goes on as it is. If the record is not in
the log, nothing happened and the store goes on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import walstore
from walstore import failpoints, nativelog
from walstore.errors import StorePoisonedError


def require_c_writer(db: walstore.Store) -> None:
    """Skip (fail under WALSTORE_REQUIRE_NATIVE=1 unless WALSTORE_PURE=1) where `db`
    does not run on the C writer, closing it."""
    if isinstance(db._writer, nativelog.NativeLogWriter):
        return
    db.close()
    if os.environ.get("WALSTORE_REQUIRE_NATIVE") == "1" and os.environ.get("WALSTORE_PURE") != "1":
        pytest.fail("the C writer is not in use, and WALSTORE_REQUIRE_NATIVE=1")
    pytest.skip("the C writer is not in use here (WALSTORE_PURE=1 or no build)")


def interrupt_after(real: Callable[..., Any]) -> Callable[..., Any]:
    """`real`, then a KeyboardInterrupt before its result reaches the caller."""

    def call(*args: Any) -> Any:
        real(*args)
        raise KeyboardInterrupt

    return call


def interrupt_instead(*_args: Any) -> Any:
    raise KeyboardInterrupt


def reopened(path: Path) -> dict[Any, Any]:
    with walstore.open(path) as db:
        return db.to_dict()


@pytest.mark.parametrize("durability", ["sync", "none"])
@pytest.mark.parametrize("how", ["put", "delete", "transaction"])
def test_interrupt_after_the_c_append_poisons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str, how: str
) -> None:
    """The C writer: an interrupt right after the append (before its seq is even known in
    Python) leaves the commit in the log and not in the state: the store refuses writes,
    the KeyboardInterrupt is raised as it is, and a reopen has the commit."""
    path = tmp_path / "db"
    db = walstore.open(path, durability=durability)
    require_c_writer(db)
    db["a"] = 1
    db["b"] = 2
    name = "_put" if how == "transaction" else "_put_op"
    monkeypatch.setattr(nativelog, name, interrupt_after(getattr(nativelog, name)))
    with pytest.raises(KeyboardInterrupt):
        if how == "put":
            db.put("a", 10)
        elif how == "delete":
            del db["b"]
        else:
            with db.transaction() as tx:
                tx["a"] = 10
                del tx["b"]
    monkeypatch.undo()
    assert db.to_dict() == {"a": 1, "b": 2}  # the state lags the log...
    with pytest.raises(StorePoisonedError):
        db["c"] = 3  # ...so no write is taken (the C slot too)
    with pytest.raises(StorePoisonedError):
        db.put("c", 3)
    db.close()
    expected = {"put": {"a": 10, "b": 2}, "delete": {"a": 1}, "transaction": {"a": 10}}[how]
    assert reopened(path) == expected


@pytest.mark.parametrize("how", ["put", "transaction"])
def test_interrupt_before_the_c_append_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """An interrupt that comes before the record is appended leaves no trace: the store
    is not poisoned and takes the next write."""
    path = tmp_path / "db"
    with walstore.open(path) as db:
        require_c_writer(db)
        db["a"] = 1
        name = "_put" if how == "transaction" else "_put_op"
        monkeypatch.setattr(nativelog, name, interrupt_instead)
        with pytest.raises(KeyboardInterrupt):
            if how == "put":
                db.put("a", 10)
            else:
                with db.transaction() as tx:
                    tx["a"] = 10
        monkeypatch.undo()
        db["b"] = 2
        assert db.to_dict() == {"a": 1, "b": 2}
    assert reopened(path) == {"a": 1, "b": 2}


def arm_interrupt(monkeypatch: pytest.MonkeyPatch, at: str, exc: BaseException) -> None:
    """Raise `exc` at the pure-Python writer's step `at` ("commit.before_write" or
    "commit.after_write"). An armed failpoint also sends the C writer's commits down
    the pure-Python path, so this tests that path with either writer."""
    monkeypatch.setitem(failpoints._armed, "test.unused", 1)

    def hit(name: str) -> None:
        if name == at:
            raise exc

    monkeypatch.setattr(failpoints, "hit", hit)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(3)], ids=["KeyboardInterrupt", "SystemExit"])
@pytest.mark.parametrize("durability", ["sync", "interval", "none"])
def test_interrupt_after_the_python_write_poisons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str, exc: BaseException
) -> None:
    """The pure-Python writer: written but not applied means poisoned, with the
    interrupt raised as it is; the reopened store has the commit."""
    path = tmp_path / "db"
    db = walstore.open(path, durability=durability)
    db["a"] = 1
    arm_interrupt(monkeypatch, "commit.after_write", exc)
    with pytest.raises(type(exc)):
        db.put("a", 10)
    monkeypatch.undo()
    assert db["a"] == 1
    with pytest.raises(StorePoisonedError, match="reopen"):
        db["b"] = 2
    db.close()
    assert reopened(path) == {"a": 10}


def test_interrupt_before_the_python_write_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "db"
    with walstore.open(path) as db:
        db["a"] = 1
        arm_interrupt(monkeypatch, "commit.before_write", KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            db.put("a", 10)
        monkeypatch.undo()
        db["b"] = 2
        assert db.to_dict() == {"a": 1, "b": 2}
    assert reopened(path) == {"a": 1, "b": 2}


def test_a_failing_apply_is_still_a_poisoning_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ordinary exception between the write and the apply is turned into
    StorePoisonedError naming the commit, as before."""
    path = tmp_path / "db"
    db = walstore.open(path)
    db["a"] = 1
    arm_interrupt(monkeypatch, "commit.after_write", RuntimeError("boom"))
    with pytest.raises(StorePoisonedError, match="applying commit 2 failed after it was logged"):
        db.put("a", 10)
    monkeypatch.undo()
    db.close()
    assert reopened(path) == {"a": 10}
