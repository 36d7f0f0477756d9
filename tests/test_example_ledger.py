"""examples/ledger.py: a worker killed with os._exit mid-run keeps every acknowledged transfer."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import walstore

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "ledger.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("walstore_example_ledger", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args: object) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *map(str, args)], env=env, capture_output=True, text=True, timeout=600
    )


def test_killed_worker_keeps_every_acknowledged_transfer(tmp_path: Path) -> None:
    ledger = load_example()
    path, acks = tmp_path / "ledger", tmp_path / "acks.txt"
    for round_ in range(3):
        r = run(
            "work", path, "--acks", acks, "--threads", 4, "--kill-after", 150, "--compact-every", 50, "--seed", round_
        )
        assert r.returncode == ledger.KILL_CODE, r.stderr  # it died by os._exit mid-run, not by finishing
        acked = acks.read_text().split()
        assert len(acked) >= 150 * (round_ + 1)
        assert ledger.check(str(path), str(acks)) == []
        with walstore.open_machine(path, ledger.Ledger) as store:
            state = store.state
            assert set(acked) <= set(state.transfers)
            assert state.total() == ledger.OPENING_DEPOSIT * len(ledger.ACCOUNTS)
            assert sorted(state.balances) == ledger.ACCOUNTS
    r = run("check", path, "--acks", acks)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_rejected_transfer_logs_nothing(tmp_path: Path) -> None:
    ledger = load_example()
    with ledger.open_ledger(str(tmp_path / "l")) as store:
        seq = store.last_seq
        src, dst = ledger.ACCOUNTS[:2]
        try:
            store.state.transfer("too-much", src, dst, ledger.OPENING_DEPOSIT + 1, 0.0)
        except ledger.InsufficientFunds:
            pass
        else:  # pragma: no cover
            raise AssertionError("an overdraft was accepted")
        assert store.last_seq == seq and "too-much" not in store.state.transfers
        store.state.transfer("ok", src, dst, 10, 1.5, memo="rent")
        assert store.state.transfers["ok"] == [src, dst, 10, 1.5, "rent"]


class LedgerRelease1:
    """The ledger as release 1 shipped it: transfer had no memo (version 1)."""

    def __init__(self) -> None:
        self.balances: dict[str, int] = {}
        self.transfers: dict[str, list[object]] = {}

    @walstore.operation
    def open_account(self, name: str, deposit: int) -> None:
        self.balances[name] = deposit

    @walstore.operation
    def transfer(self, transfer_id: str, src: str, dst: str, amount: int, at: float) -> None:
        self.balances[src] -= amount
        self.balances[dst] += amount
        self.transfers[transfer_id] = [src, dst, amount, at]


def test_release_1_log_opens_with_the_example(tmp_path: Path) -> None:
    ledger = load_example()
    path = tmp_path / "l"
    with walstore.open_machine(path, LedgerRelease1) as old:
        old.state.open_account("a", 10)
        old.state.open_account("b", 0)
        old.state.transfer("t1", "a", "b", 4, 100.0)
    with walstore.open_machine(path, ledger.Ledger) as store:
        assert store.state.transfers == {"t1": ["a", "b", 4, 100.0, ""]}
        assert store.state.balances == {"a": 6, "b": 4}


def test_demo_runs() -> None:
    r = run("demo")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the books balance" in r.stdout
