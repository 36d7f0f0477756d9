"""The project's benchmarks in bench/ run end to end at a tiny size and print every ratio.

No timing assertions: only that each script finishes, checks its own results
(replay.py asserts that every path built the same dict) and reports each
target's figure. The figures at this size mean nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from native_support import require_native

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def run_bench(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_fresh_copies_are_equal_new_objects() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import replay
    finally:
        sys.path.remove(str(BENCH))
    keys = [replay.key(i) for i in range(100)]
    copies = replay.fresh_copies(keys)
    assert copies == keys
    assert not any(a is b for a, b in zip(keys, copies))
    assert [bytes(k) for k in keys][0] is keys[0]  # why fresh_copies exists


def test_replay_bench_runs_and_reports_every_ratio(tmp_path: Path) -> None:
    require_native()
    out = run_bench(
        "replay.py", "--keys", "3000", "--repeat", "1", "--new-processes", "1", "--dir", str(tmp_path / "r")
    )
    labels = ("C vs Python:", "C vs floor:", "C vs floor+:", "C vs sqlite3:", "C vs floor, round by round")
    for label in (*labels, "C vs floor, first replay in a new process"):
        assert label in out, out


def test_commit_bench_runs_and_reports_every_ratio(tmp_path: Path) -> None:
    out = run_bench("commit.py", str(tmp_path), "--seconds", "0.05", "--rounds", "1", "--none-ops", "2000", "--json")
    report = json.loads(out)
    rates = report["medians_ops_per_s"]
    for name in ("floor", "walstore_1", "walstore_8", "sqlite_1", "sqlite_8", "walstore_none", "dict"):
        assert rates[name] > 0, name
    assert report["medians_ops_per_s"]["walstore_8_batch"] >= 1
    targets = [r for r in report["ratios"] if "target" in r]
    assert len(targets) == 3  # 1 thread / floor, 8 / 1, none / dict
    assert all(report["ratios"][r] > 0 for r in targets)


def test_commit_bench_table_shows_each_round(tmp_path: Path) -> None:
    out = run_bench("commit.py", str(tmp_path), "--seconds", "0.05", "--rounds", "2", "--none-ops", "2000")
    lines = out.splitlines()
    table = lines[: lines.index("")]  # the contenders, before the ratios
    rows = {line.split()[0]: line.split() for line in table}
    for name in ("floor", "walstore_1", "walstore_8", "walstore_8_batch", "dict"):
        assert len(rows[name]) == 1 + 1 + 2, rows[name]  # name, median, one figure per round
    ratio = next(line for line in lines if line.startswith("walstore_8 / walstore_1"))
    assert len(ratio.split(")")[1].split()) == 2 + 2  # of medians, per round, then each round's


@pytest.mark.parametrize("latency_only", [False, True])
def test_compaction_bench_runs_and_reports_every_target(tmp_path: Path, latency_only: bool) -> None:
    args = ["--keys", "2000", "--overwrites", "20000", "--baseline-seconds", "0.2", "--json"]
    out = run_bench("compaction.py", str(tmp_path), *args, *(["--latency-only"] if latency_only else []))
    report = json.loads(out)
    during = report["latency"]["during"]
    assert during["commits"] > 0 and during["max_ms"] >= during["p99_ms"] >= during["p50_ms"] > 0
    assert during["snapshot_bytes"] > 0
    assert report["ratios"]["p99 during / without (target <= 2)"] > 0
    if not latency_only:
        assert report["disk"]["peak_over_live"] >= 1
