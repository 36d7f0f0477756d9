"""A store open in a process that forks: the child inherits the state, the log's file
descriptors and the writer lock's open file, all of which are the parent's.

In the child the store is closed: reads, writes, transactions and compactions raise
StoreForkedError (a StoreClosedError), and close() -- also from a `with` block the child
leaves -- writes nothing and does not unlock: a CLOSE record or a cut segment would break
the parent's log, and unlocking the shared lock file would unlock it for the parent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

import walstore
from walstore.errors import StoreClosedError, StoreForkedError

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")


def in_child(body: Callable[[], None], timeout: float = 30.0) -> None:
    """Run `body` in a fork() child; fail with the child's traceback if it raised, and
    if it did not finish within `timeout` (a deadlock) kill it and fail."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(r)
        code = 0
        try:
            body()
        except BaseException:
            os.write(w, traceback.format_exc().encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(r)
            pytest.fail("the child hung (a lock held at the fork?)")
        time.sleep(0.01)
    with os.fdopen(r, "rb") as f:
        report = f.read().decode()
    assert os.waitstatus_to_exitcode(status) == 0, report


def assert_locked_for_other_processes(path: Path) -> None:
    """Another process opening the store is refused: the writer lock is still held."""
    code = (
        "import sys, walstore\n"
        "try:\n    walstore.open(sys.argv[1])\nexcept walstore.StoreLockedError:\n    sys.exit(7)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7, proc.stderr


def test_store_is_closed_in_the_child(tmp_path: Path) -> None:
    path = tmp_path / "db"
    db = walstore.open(path)
    db["a"] = 1
    db["b"] = b"two"

    def child() -> None:
        assert db.closed
        for use in (
            lambda: db["a"],
            lambda: db.to_dict(),
            lambda: db.__setitem__("c", 3),  # the C slot when it is built
            lambda: db.__setitem__("c", b"bytes"),
            lambda: db.put("c", 3),
            lambda: db.__delitem__("a"),
            lambda: db.sync(),
            lambda: db.compact(),
        ):
            with pytest.raises(StoreForkedError, match=f"opened by process {os.getppid()}"):
                use()
        with pytest.raises(StoreForkedError):
            with db.transaction() as tx:
                tx["c"] = 3
        assert isinstance(StoreForkedError("x"), StoreClosedError)
        db.close()  # writes nothing, keeps the parent's lock

    in_child(child)
    assert_locked_for_other_processes(path)
    db["c"] = 3  # the parent goes on as if nothing happened
    db.close()
    with walstore.open(path) as again:
        assert again.to_dict() == {"a": 1, "b": b"two", "c": 3}
        assert again.recovery.torn_tail is None and again.recovery.closed_cleanly


def test_child_leaving_a_with_block_does_not_close_the_parents_log(tmp_path: Path) -> None:
    """The common way to get this wrong: fork inside `with walstore.open(...)`, and the
    child runs on out of the block. Its close must not write a CLOSE record or cut the
    segment under the parent, nor unlock the store."""
    path = tmp_path / "db"
    with walstore.open(path, segment_size=1 << 20) as db:
        for i in range(100):
            db[f"k{i}"] = i

        def child() -> None:
            with db:
                pass  # __exit__ closes

        in_child(child)
        seg = db._writer._seg
        with open(seg.path, "rb") as f:
            f.seek(seg.offset)
            assert f.read(4096) == bytes(4096)  # no CLOSE record (or anything) after the records
        assert os.path.getsize(seg.path) == seg.file_size  # not cut back
        assert_locked_for_other_processes(path)
        for i in range(100, 5000):  # past a roll
            db[f"k{i}"] = i
    with walstore.open(path) as again:
        assert again.to_dict() == {f"k{i}": i for i in range(5000)}
        assert again.recovery.torn_tail is None and again.recovery.closed_cleanly


@pytest.mark.parametrize("durability", ["sync", "none"])
def test_child_does_not_deadlock_on_a_lock_held_at_the_fork(tmp_path: Path, durability: str) -> None:
    """A parent thread may hold the writer's lock when another forks (here the forking
    thread holds it itself): the child's writes still raise at once instead of waiting
    for a lock nobody in the child will release."""
    path = tmp_path / "db"
    with walstore.open(path, durability=durability) as db:
        db["a"] = 1
        writer = db._writer
        writer._mutex.acquire()
        try:

            def child() -> None:
                with pytest.raises(StoreForkedError):
                    db["b"] = 2
                with pytest.raises(StoreForkedError):
                    db.put("b", 2)
                with pytest.raises(StoreForkedError):
                    del db["a"]
                db.close()

            in_child(child, timeout=20)
        finally:
            writer._mutex.release()
        db["b"] = 2
    with walstore.open(path) as again:
        assert again.to_dict() == {"a": 1, "b": 2}


def test_a_store_opened_in_the_child_works(tmp_path: Path) -> None:
    """Only stores open at the fork are the parent's: the child opens its own (another
    store, or this one once the parent has closed it) and uses it normally."""
    path = tmp_path / "db"
    other = tmp_path / "other"
    with walstore.open(path) as db:
        db["a"] = 1

        def child() -> None:
            with walstore.open(other) as mine:
                mine["x"] = 1
            with walstore.open(other) as mine:
                assert mine.to_dict() == {"x": 1}

        in_child(child)
    with walstore.open(other) as mine:
        assert mine.to_dict() == {"x": 1}
