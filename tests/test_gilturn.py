"""The GIL turn (_native/gilturn.h): a sync committer back from its wait yields, rather
than sleeps, while another committer holds the turn; never past the limit; not at all
when committers keep the turn long; and committing through it changes nothing stored.

The turn's state is per process, so each test sets the limit it needs and puts the
default back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import walstore
from walstore import nativelog

pytestmark = pytest.mark.skipif(not nativelog.BUILT, reason="SKIPPED: the C module is not built")

HOLD_MAX_NS = nativelog._lib.WS_TURN_HOLD_MAX_NS if nativelog.BUILT else 0


@pytest.fixture
def lib() -> Iterator[Any]:
    default = nativelog.GIL_TURN_SPIN_US
    _settle()
    yield nativelog._lib
    nativelog.set_gil_turn_spin(default)
    _settle()


def _settle() -> None:
    """Leave the turn free and its average hold short (quick claims and releases)."""
    lib = nativelog._lib
    for _ in range(200):
        lib.ws_turn_claim()
        lib.ws_turn_release()


def _held_by_another_thread(lib: Any, hold_s: float) -> tuple[threading.Thread, threading.Event]:
    """A thread that claims the turn, says so, keeps it `hold_s` seconds, then lets go."""
    taken = threading.Event()

    def holder() -> None:
        lib.ws_turn_claim()
        taken.set()
        time.sleep(hold_s)
        lib.ws_turn_release()

    t = threading.Thread(target=holder)
    t.start()
    assert taken.wait(10)
    return t, taken


def test_a_free_turn_is_taken_without_yielding(lib: Any) -> None:
    nativelog.set_gil_turn_spin(500)
    before = nativelog.gil_turn_stats()
    lib.ws_turn_claim()
    lib.ws_turn_release()
    after = nativelog.gil_turn_stats()
    assert after["claims"] == before["claims"] + 1
    assert after["spun"] == before["spun"] and after["timeouts"] == before["timeouts"]


def test_a_claim_yields_until_the_holder_lets_go(lib: Any) -> None:
    nativelog.set_gil_turn_spin(1_000_000)  # a limit the 20 ms hold stays far under
    holder, _ = _held_by_another_thread(lib, 0.02)
    before = nativelog.gil_turn_stats()
    lib.ws_turn_claim()  # returns only once the holder let go (or after 1 s)
    after = nativelog.gil_turn_stats()
    holder.join()
    lib.ws_turn_release()
    assert after["spun"] == before["spun"] + 1
    assert after["timeouts"] == before["timeouts"], "the claim gave up instead of waiting for the release"


def test_a_claim_gives_up_at_the_limit(lib: Any) -> None:
    nativelog.set_gil_turn_spin(200)
    holder, _ = _held_by_another_thread(lib, 0.5)
    before = nativelog.gil_turn_stats()
    lib.ws_turn_claim()  # the holder keeps the turn for 500 ms: the 200 us limit ends the wait
    after = nativelog.gil_turn_stats()
    lib.ws_turn_release()
    holder.join()
    assert after["spun"] == before["spun"] + 1 and after["timeouts"] == before["timeouts"] + 1


def test_no_yielding_once_committers_keep_the_turn_long(lib: Any) -> None:
    nativelog.set_gil_turn_spin(1_000_000)
    for _ in range(40):  # holds of 2 ms push the average far past the threshold
        lib.ws_turn_claim()
        time.sleep(0.002)
        lib.ws_turn_release()
    assert nativelog.gil_turn_stats()["hold_ns"] > HOLD_MAX_NS
    holder, _ = _held_by_another_thread(lib, 0.2)
    before = nativelog.gil_turn_stats()
    lib.ws_turn_claim()
    after = nativelog.gil_turn_stats()
    lib.ws_turn_release()
    holder.join()
    assert after["spun"] == before["spun"], "a claim yielded though holds are long: sleeping is cheaper"


def test_a_zero_limit_turns_it_off(lib: Any) -> None:
    nativelog.set_gil_turn_spin(0)
    holder, _ = _held_by_another_thread(lib, 0.05)
    before = nativelog.gil_turn_stats()
    lib.ws_turn_claim()
    after = nativelog.gil_turn_stats()
    holder.join()
    assert after == before


@pytest.mark.parametrize("bad", [-1, 1_000_001, 1.5, True, "500"])
def test_the_limit_is_checked(bad: Any) -> None:
    with pytest.raises(ValueError):
        nativelog.set_gil_turn_spin(bad)


@pytest.mark.parametrize("spin_us", [0, 500])
def test_threads_committing_through_the_turn_lose_nothing(tmp_path: Path, lib: Any, spin_us: int) -> None:
    """8 threads of sync puts (the C slot) and transactions (the Python path), with the turn
    on and off: every commit is in the store, and each came back through a claim."""
    nativelog.set_gil_turn_spin(spin_us)
    before = nativelog.gil_turn_stats()
    with walstore.open(tmp_path / "db") as db:
        c_writer = isinstance(db._writer, nativelog.NativeLogWriter)

        def commit(t: int) -> None:
            for i in range(60):
                if i % 10 == 0:
                    with db.transaction() as tx:
                        tx[f"t{t}-{i}"] = {"i": i}
                else:
                    db[f"t{t}-{i}"] = b"v%d" % i

        threads = [threading.Thread(target=commit, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        model = db.to_dict()
    after = nativelog.gil_turn_stats()
    assert len(model) == 8 * 60
    with walstore.open(tmp_path / "db") as db:
        assert db.to_dict() == model
    if c_writer and spin_us:
        assert after["claims"] - before["claims"] >= 8 * 60
    if not spin_us:
        assert after["claims"] == before["claims"]
