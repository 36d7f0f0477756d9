"""Real power loss: a loop-mounted XFS (and ext4) filesystem shut down under a writer.

Each cycle: a writer subprocess (tests/crashcheck.py writer) commits in sync
mode on the mounted filesystem, printing each acknowledged commit on a pipe;
at a random moment `xfs_io -x -c shutdown <mountpoint>` shuts the filesystem
down without flushing its log (what the kernel had not made durable is
really gone); the writer is killed; the filesystem is unmounted and mounted
again (log recovery); the store is reopened by this process, alternately
with each replay path, and checked: every acknowledged commit is there,
nothing never attempted is, and the state is that after a prefix of the
commits. The store carries over to the next cycle.

Needs root, loop devices, xfsprogs (mkfs.xfs, xfs_io) and e2fsprogs. Without
them the tests skip, loudly; with WALSTORE_REQUIRE_MOUNT=1 (CI) they fail.
WALSTORE_POWER_CYCLES=N sets the XFS cycle count (default 50; ext4 gets
N/2, at least 10).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Optional

import crashcheck as cc
import pytest

import walstore

SEG = 64 << 10
REQUIRE = os.environ.get("WALSTORE_REQUIRE_MOUNT") == "1"


def _cycles(kind: str) -> int:
    n = int(os.environ.get("WALSTORE_POWER_CYCLES", "50"))
    return n if kind == "xfs" else max(10, n // 2)


def _unavailable(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"power-loss test cannot run, and WALSTORE_REQUIRE_MOUNT=1: {reason}")
    pytest.skip(
        f"SKIPPED (real power-loss test did not run): {reason}."
        " Needs root, loop devices, xfsprogs and e2fsprogs; set WALSTORE_REQUIRE_MOUNT=1 to make this fail"
    )


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class Mount:
    """A filesystem image, loop-mounted at `point`."""

    def __init__(self, kind: str, image: str, point: str) -> None:
        self.kind = kind
        self.image = image
        self.point = point
        self.mounted = False

    def mount(self) -> None:
        _run(["mount", "-o", "loop", self.image, self.point])
        self.mounted = True

    def umount(self) -> None:
        last: Optional[Exception] = None
        for _ in range(50):
            try:
                _run(["umount", self.point])
                self.mounted = False
                return
            except RuntimeError as exc:  # busy for a moment after the writer died
                last = exc
                threading.Event().wait(0.1)
        raise RuntimeError(f"cannot unmount {self.point}: {last}")

    def shutdown(self) -> None:
        """Power loss: stop the filesystem now, without flushing its log."""
        _run(["xfs_io", "-x", "-c", "shutdown", self.point])


def _setup(tmp_path: Any, kind: str) -> Mount:
    if sys.platform != "linux":
        _unavailable("not Linux")
    if os.geteuid() != 0:
        _unavailable("not running as root (mount needs it)")
    mkfs = {"xfs": "mkfs.xfs", "ext4": "mkfs.ext4"}[kind]
    for tool in (mkfs, "xfs_io", "mount", "umount"):
        if shutil.which(tool) is None:
            _unavailable(f"{tool} not found (apt-get install -y xfsprogs e2fsprogs)")
    if not os.path.exists("/dev/loop-control"):
        _unavailable("no loop devices (/dev/loop-control missing)")
    image = str(tmp_path / f"{kind}.img")
    point = str(tmp_path / f"mnt-{kind}")
    os.mkdir(point)
    with open(image, "wb") as f:
        f.truncate(300 << 20)
    try:
        _run([mkfs, "-q", "-f", image] if kind == "xfs" else [mkfs, "-q", "-F", image])
    except RuntimeError as exc:
        _unavailable(f"{mkfs} failed: {exc}")
    m = Mount(kind, image, point)
    try:
        m.mount()
    except RuntimeError as exc:
        _unavailable(f"cannot loop-mount a {kind} image: {exc}")
    return m


@pytest.fixture(params=["xfs", "ext4"])
def mounted(request: Any, tmp_path: Any) -> Iterator[Mount]:
    m = _setup(tmp_path, request.param)
    try:
        yield m
    finally:
        if m.mounted:
            try:
                m.umount()
            except RuntimeError:
                _run(["umount", "-l", m.point], check=False)


class Writer:
    """The writer subprocess and a thread reading its acknowledgements."""

    def __init__(
        self, path: str, seed: int, cycle: int, log: str, durability: str = "sync", sync_every: int = 0
    ) -> None:
        argv = [sys.executable, cc.CRASHCHECK, "writer", "--dir", path, "--seed", str(seed)]
        argv += ["--cycle", str(cycle), "--segment-size", str(SEG), "--durability", durability]
        argv += ["--sync-every", str(sync_every)]
        self.stderr = open(log, "wb")  # noqa: SIM115 - closed in finish()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.stderr, env=cc.backend_env("c"))
        self.lines: list[str] = []
        self.opened = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode().strip()
            self.lines.append(line)
            if line.startswith("O "):
                self.opened.set()
        self.opened.set()

    def finish(self) -> None:
        try:
            self.proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)
        self.reader.join(timeout=60)
        self.stderr.close()


def test_power_loss_cycles(mounted: Mount, tmp_path: Any, monkeypatch: Any) -> None:
    """Sync mode: every acknowledged commit survives."""
    _power_cycles(mounted, tmp_path, monkeypatch, "sync", _cycles(mounted.kind), cc.base_seed(14014))


def test_power_loss_cycles_lazy(mounted: Mount, tmp_path: Any, monkeypatch: Any) -> None:
    """`none` mode (records copied into a map of the segment, sync() every 7 commits):
    every commit before a returned sync() survives, and the state is a prefix."""
    cycles = max(8, _cycles(mounted.kind) // 4)
    _power_cycles(mounted, tmp_path, monkeypatch, "none", cycles, cc.base_seed(15015), sync_every=7)


def _power_cycles(
    mounted: Mount, tmp_path: Any, monkeypatch: Any, durability: str, cycles: int, seed0: int, sync_every: int = 0
) -> None:
    seed = seed0 + (0 if mounted.kind == "xfs" else 1)
    rng = random.Random(seed)
    native = cc.native_module()
    built = native is not None and getattr(native, "BUILT", False)
    if not built and os.environ.get("WALSTORE_REQUIRE_NATIVE") == "1":
        pytest.fail("the C replayer is not built, and WALSTORE_REQUIRE_NATIVE=1")
    backends = ["python", "c"] if built else ["python"]
    path = os.path.join(mounted.point, "db")
    state: dict[cc.Key, Any] = {}
    lost_in_flight = torn = total_acked = total_must = 0
    for cycle in range(1, cycles + 1):
        log = str(tmp_path / f"writer-{cycle}.log")
        w = Writer(path, seed, cycle, log, durability, sync_every)
        try:
            assert w.opened.wait(60), "the writer did not open the store"
            if w.proc.poll() is not None:
                raise AssertionError(f"the writer exited early ({w.proc.returncode}): {open(log).read()[-3000:]}")
            time.sleep(rng.uniform(0.02, 0.5))  # a random moment for the power to fail (not a timing check)
            mounted.shutdown()
        finally:
            w.finish()
        mounted.umount()
        mounted.mount()
        attempted = [int(x.split()[1]) for x in w.lines if x.startswith("T ")]
        acked = [int(x.split()[1]) for x in w.lines if x.startswith("A ")]
        assert acked == attempted[: len(acked)] and len(attempted) - len(acked) <= 1
        synced = [int(x.split()[1]) for x in w.lines if x.startswith("S ")]
        # What must survive: every acknowledged commit in sync mode; in a lazy mode,
        # every commit up to the last sync() that returned.
        must = len(acked) if durability == "sync" else (attempted.index(synced[-1]) + 1 if synced else 0)
        commits = cc.writer_commits(seed, cycle, len(attempted))
        states = [dict(state)]
        for c in commits:
            cur = dict(states[-1])
            c.apply(cur)
            states.append(cur)
        backend = backends[cycle % len(backends)]
        with monkeypatch.context() as m:
            if native is not None:
                m.setattr(native, "AVAILABLE", backend == "c")
            try:
                db = walstore.open(path, segment_size=SEG)
            except Exception as exc:  # noqa: BLE001 - any error after a power loss is the failure
                raise AssertionError(
                    f"{mounted.kind} cycle {cycle} (seed {seed}): open() after the power loss raised"
                    f" {type(exc).__name__}: {exc}\nwriter log: {log}"
                ) from exc
            try:
                got = db.to_dict()
                info = db.recovery
            finally:
                db.close()
        match = [k for k in range(must, len(attempted) + 1) if states[k] == got]
        assert match, (
            f"{mounted.kind} {durability} cycle {cycle} (seed {seed}), recovered by {backend}: {len(acked)}"
            f" commits acknowledged, {must} must survive, {len(attempted)} attempted; the state is none of"
            f" those prefixes\n{cc.diff_states(states[must], got)}\nrecovery: {info}\nwriter log: {log}"
        )
        if match[-1] < len(attempted):
            lost_in_flight += 1
        if info.torn_tail is not None:
            torn += 1
        total_acked += len(acked)
        total_must += must
        state = got
    print(
        f"power loss on {mounted.kind} ({durability}): {cycles} cycles, {total_acked} acknowledged commits,"
        f" {total_must} of them promised durable, all present; a commit beyond the promise lost in"
        f" {lost_in_flight} cycles, torn tail cut in {torn}"
    )
    assert total_acked > cycles, "the writer acknowledged almost nothing: the cycles tested little"
    if cycles >= 20:
        # The test's own power: a shutdown that lost nothing unsynced would prove nothing.
        assert lost_in_flight > 0, "no cycle lost an unacknowledged commit: is the shutdown really losing data?"
