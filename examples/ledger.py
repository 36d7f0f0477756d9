"""A bank ledger behind walstore: accounts, transfers, a crash, and the books still balance.

    python examples/ledger.py demo
        the whole story in a temporary directory: a worker process makes
        transfers from several threads and is killed with os._exit mid-run;
        the ledger is reopened and checked.
    python examples/ledger.py work DIR --acks FILE [--threads 4] [--kill-after N] [--compact-every N]
        make transfers until killed (or --transfers each); every acknowledged
        transfer id is appended to FILE once its commit has returned.
    python examples/ledger.py check DIR --acks FILE
        reopen and check: every acknowledged transfer present, total unchanged,
        balances equal to the opening deposits plus the transfers.

The state is an ordinary class. Its operations are the only way it changes;
walstore validates each call, logs it, syncs it (group commit across the
threads) and then applies it. Randomness and the clock stay outside the
operations: the caller draws the amounts and reads time.time(), and passes
them in as arguments, so replay produces exactly the live state.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import walstore

ACCOUNTS = [f"acct-{i:02d}" for i in range(8)]
OPENING_DEPOSIT = 1_000
KILL_CODE = 99
"""The exit status of a worker that killed itself mid-run."""


class InsufficientFunds(ValueError):
    """A transfer the ledger rejects: nothing is logged."""


def upgrade_transfer(old_version: int, args: list[Any]) -> list[Any]:
    """Version 1 of `transfer` had no memo: give old records an empty one."""
    if old_version == 1:
        return [*args, ""]
    raise ValueError(f"no upgrade from version {old_version}")


class Ledger:
    """Balances and the history of transfers. JSON types only, so the default snapshot round-trips."""

    def __init__(self) -> None:
        self.balances: dict[str, int] = {}
        self.transfers: dict[str, list[Any]] = {}  # id -> [src, dst, amount, at, memo]

    @walstore.operation
    def open_account(self, name: str, deposit: int) -> None:
        self.balances[name] = deposit

    @open_account.validator
    def check_open_account(self, name: str, deposit: int) -> None:
        if name in self.balances:
            raise ValueError(f"account {name!r} exists")
        if deposit < 0:
            raise ValueError("a deposit is not negative")

    @walstore.operation(version=2, upgrade=upgrade_transfer)
    def transfer(self, transfer_id: str, src: str, dst: str, amount: int, at: float, memo: str = "") -> None:
        """Move `amount` from `src` to `dst`. `at` is the caller's clock: operations never read it."""
        self.balances[src] -= amount
        self.balances[dst] += amount
        self.transfers[transfer_id] = [src, dst, amount, at, memo]

    @transfer.validator
    def check_transfer(self, transfer_id: str, src: str, dst: str, amount: int, at: float, memo: str = "") -> None:
        if transfer_id in self.transfers:
            raise ValueError(f"transfer {transfer_id!r} was already made")
        if src not in self.balances or dst not in self.balances or src == dst:
            raise ValueError(f"bad accounts {src!r} -> {dst!r}")
        if amount <= 0:
            raise ValueError("amount must be positive")
        if self.balances[src] < amount:
            raise InsufficientFunds(f"{src} has {self.balances[src]}, cannot send {amount}")

    def total(self) -> int:
        return sum(self.balances.values())


def open_ledger(path: str, **options: Any) -> walstore.MachineStore[Ledger]:
    """Open the ledger; a new one gets its accounts in one transaction."""
    store = walstore.open_machine(path, Ledger, **options)
    if not store.state.balances:
        with store.transaction() as tx:
            for name in ACCOUNTS:
                tx.call(Ledger.open_account, name, OPENING_DEPOSIT)
    return store


def work(path: str, acks: str, threads: int, transfers: int, kill_after: int, compact_every: int, seed: int) -> int:
    """Transfer from `threads` threads; os._exit(KILL_CODE) after `kill_after` acknowledged transfers."""
    store = open_ledger(path, segment_size=1 << 16)
    ledger = store.state
    ack_fd = os.open(acks, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    done = 0
    done_lock = threading.Lock()
    run = f"{seed}-{os.getpid()}"

    def worker(n: int) -> None:
        nonlocal done
        rng = random.Random(f"{seed}/{n}")  # the caller's randomness, passed in as arguments
        for i in range(transfers):
            src, dst = rng.sample(ACCOUNTS, 2)
            tid = f"{run}-{n}-{i}"
            try:
                ledger.transfer(tid, src, dst, rng.randint(1, 300), time.time(), memo=f"thread {n}")
            except InsufficientFunds:
                continue
            os.write(ack_fd, f"{tid}\n".encode())  # acknowledged: the commit returned
            with done_lock:
                done += 1
                count = done
            if kill_after and count >= kill_after:
                os._exit(KILL_CODE)  # a crash: no close, other threads mid-commit
            if compact_every and count % compact_every == 0:
                store.compact(wait=False)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    store.close()
    os.close(ack_fd)
    return 0


def check(path: str, acks: str) -> list[str]:
    """Reopen the ledger and return what is wrong with it (empty: all good)."""
    problems: list[str] = []
    with walstore.open_machine(path, Ledger) as store:
        ledger = store.state
        acked = _read_acks(acks)
        missing = [t for t in acked if t not in ledger.transfers]
        if missing:
            problems.append(f"{len(missing)} acknowledged transfers are missing, e.g. {missing[:3]}")
        expected_total = OPENING_DEPOSIT * len(ACCOUNTS)
        if ledger.total() != expected_total:
            problems.append(f"total balance {ledger.total()}, expected {expected_total}")
        rebuilt = dict.fromkeys(ACCOUNTS, OPENING_DEPOSIT)
        for src, dst, amount, _at, _memo in ledger.transfers.values():
            rebuilt[src] -= amount
            rebuilt[dst] += amount
        if rebuilt != ledger.balances:
            problems.append("balances differ from the opening deposits plus the transfers")
        if any(b < 0 for b in ledger.balances.values()):
            problems.append("a balance is negative")
    return problems


def _read_acks(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def demo() -> int:
    with tempfile.TemporaryDirectory(prefix="walstore-ledger-") as tmp:
        path, acks = os.path.join(tmp, "ledger"), os.path.join(tmp, "acks.txt")
        for round_ in (1, 2):
            print(f"round {round_}: a worker transfers from 4 threads and is killed after 300 transfers")
            rc = subprocess.call(
                [
                    sys.executable,
                    __file__,
                    "work",
                    path,
                    "--acks",
                    acks,
                    "--kill-after",
                    "300",
                    "--compact-every",
                    "120",
                    "--seed",
                    str(round_),
                ]
            )
            print(f"  worker exit status {rc} (os._exit({KILL_CODE}) mid-run)")
            with walstore.open_machine(path, Ledger) as store:
                ledger = store.state
                print(
                    f"  reopened: {len(ledger.transfers)} transfers, {len(_read_acks(acks))} acknowledged,"
                    f" total {ledger.total()}, snapshot at seq {store.recovery.snapshot_seq},"
                    f" {store.replayed_ops} operations replayed after it"
                )
        problems = check(path, acks)
        for p in problems:
            print("PROBLEM:", p)
        if not problems:
            print("every acknowledged transfer is there and the books balance")
        return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo")
    w = sub.add_parser("work")
    w.add_argument("dir")
    w.add_argument("--acks", required=True)
    w.add_argument("--threads", type=int, default=4)
    w.add_argument("--transfers", type=int, default=10_000, help="per thread")
    w.add_argument("--kill-after", type=int, default=0)
    w.add_argument("--compact-every", type=int, default=0)
    w.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("check")
    c.add_argument("dir")
    c.add_argument("--acks", required=True)
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        return demo()
    if args.cmd == "work":
        return work(args.dir, args.acks, args.threads, args.transfers, args.kill_after, args.compact_every, args.seed)
    problems = check(args.dir, args.acks)
    for p in problems:
        print("PROBLEM:", p)
    print("ok" if not problems else "FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
