"""`walstore bench`: the JSON has every field, the figures are consistent, the directory is left empty.

No timing assertions: the figures depend on the disk. Both timers are run:
the C loop (walstore._walstore_bench, built into a private copy of the
package when it is not built in place) and the Python fallback (forced by
WALSTORE_PURE=1, and chosen by itself when the C module is missing).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from walstore import bench  # noqa: E402

LAT_KEYS = {"count", "min", "mean", "p50", "p99", "p999", "max"}
TOP_KEYS = {
    "schema",
    "quick",
    "seconds",
    "timer",
    "timer_note",
    "context",
    "sizes",
    "raw",
    "walstore",
    "snapshot",
    "fio",
    "warnings",
    "verdict",
}
CONTEXT_KEYS = {
    "directory",
    "kernel",
    "machine",
    "cpus",
    "fstype",
    "mount_point",
    "mount_source",
    "mount_options",
    "super_options",
    "device",
    "write_cache",
    "rotational",
    "logical_block_size",
}
RAW_KEYS = {
    "method",
    "mode",
    "size",
    "available",
    "reason",
    "ops",
    "seconds",
    "ops_per_s",
    "latency_us",
    "sync_latency_us",
}
COMMIT_KEYS = {
    "durability",
    "threads",
    "commits",
    "seconds",
    "commits_per_s",
    "latency_us",
    "fsyncs",
    "commits_per_fsync",
    "segment_rolls",
}
VERDICT_KEYS = {
    "reference_size",
    "etcd_guideline_ms",
    "fdatasync_p99_ms",
    "meets_etcd_guideline",
    "walstore_sync_p50_us",
    "walstore_sync_p99_us",
    "raw_floor_p50_us",
    "raw_floor_p99_us",
    "ratio_p50",
    "ratio_p99",
    "best_group_commits_per_s",
    "best_group_threads",
    "text",
}


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_latency(d: Any, where: str) -> None:
    assert isinstance(d, dict), where
    assert set(d) == LAT_KEYS, where
    assert all(_number(d[k]) for k in LAT_KEYS), where
    assert d["count"] >= 1, where
    assert all(d[k] > 0 for k in LAT_KEYS), (where, d)
    assert d["min"] <= d["p50"] <= d["p99"] <= d["p999"] <= d["max"], (where, d)
    assert d["min"] <= d["mean"] <= d["max"], (where, d)


def check_report(doc: dict[str, Any], timer: str, walstore_expected: bool) -> None:
    assert set(doc) == TOP_KEYS
    assert doc["schema"] == 1
    assert doc["quick"] is True
    assert doc["timer"] == timer
    assert doc["seconds"] > 0
    assert set(doc["context"]) == CONTEXT_KEYS
    assert isinstance(doc["context"]["kernel"], str) and doc["context"]["kernel"]
    sizes = doc["sizes"]
    assert sizes and all(_number(s) and s > 0 for s in sizes)

    seen = set()
    for r in doc["raw"]:
        assert set(r) == RAW_KEYS
        seen.add((r["method"], r["mode"], r["size"]))
        where = f"{r['method']}/{r['mode']}/{r['size']}"
        if not r["available"]:
            assert isinstance(r["reason"], str) and r["reason"], where
            assert r["latency_us"] is None and r["ops_per_s"] is None, where
            assert r["method"] in ("o_direct_dsync", "rwf_dsync", "o_dsync"), where
            continue
        assert r["reason"] is None, where
        assert r["ops"] > 0 and r["seconds"] > 0 and r["ops_per_s"] > 0, where
        check_latency(r["latency_us"], where)
        assert r["latency_us"]["count"] == r["ops"], where
        if r["method"] in ("fsync", "fdatasync"):
            check_latency(r["sync_latency_us"], where + " sync")
            assert r["sync_latency_us"]["p50"] <= r["latency_us"]["max"], where
        else:
            assert r["sync_latency_us"] is None, where
    expected = {(m.name, mode, s) for m in bench.METHODS for mode in bench.MODES for s in sizes}
    assert seen == expected
    for must in ("nosync", "fsync", "fdatasync"):
        assert all(r["available"] for r in doc["raw"] if r["method"] == must), must

    w = doc["walstore"]
    assert set(w) == {"available", "reason", "record_size", "durability", "raw_floor", "group_commit"}
    if walstore_expected:
        assert w["available"] is True and w["reason"] is None
        assert [c["durability"] for c in w["durability"]] == ["sync", "interval", "none"]
        assert [c["threads"] for c in w["group_commit"]] == [1, 4, 16]
        for c in w["durability"] + w["group_commit"]:
            assert set(c) == COMMIT_KEYS
            where = f"walstore {c['durability']} x{c['threads']}"
            assert c["commits"] > 0 and c["seconds"] > 0 and c["commits_per_s"] > 0, where
            check_latency(c["latency_us"], where)
            assert c["latency_us"]["count"] == c["commits"], where
            assert c["fsyncs"] is None or (isinstance(c["fsyncs"], int) and c["fsyncs"] >= 0), where
            assert c["commits_per_fsync"] is None or c["commits_per_fsync"] > 0, where
            assert c["segment_rolls"] is None or c["segment_rolls"] >= 0, where
        fl = w["raw_floor"]
        assert set(fl) == RAW_KEYS and fl["method"] == "fdatasync" and fl["mode"] == "overwrite"
        assert fl["size"] == w["record_size"] and fl["ops"] > 0 and fl["ops_per_s"] > 0
        check_latency(fl["latency_us"], "raw floor")
        check_latency(fl["sync_latency_us"], "raw floor sync")
        sync_one = w["durability"][0]
        assert sync_one["fsyncs"] > 0 and sync_one["commits_per_fsync"] > 0
        for c in w["group_commit"]:
            assert c["fsyncs"] > 0 and c["commits_per_fsync"] > 0
    else:
        assert w["available"] is False and isinstance(w["reason"], str) and w["raw_floor"] is None

    s = doc["snapshot"]
    assert set(s) == {"size", "iterations", "steps_us"}
    assert s["size"] > 0 and s["iterations"] > 0
    assert set(s["steps_us"]) == set(bench.SNAPSHOT_STEPS)
    for name, st in s["steps_us"].items():
        check_latency(st, "snapshot " + name)
        assert st["count"] == s["iterations"]

    assert isinstance(doc["warnings"], list) and all(isinstance(x, str) for x in doc["warnings"])
    v = doc["verdict"]
    assert set(v) == VERDICT_KEYS
    assert v["fdatasync_p99_ms"] > 0 and isinstance(v["meets_etcd_guideline"], bool)
    assert v["raw_floor_p50_us"] > 0 and v["raw_floor_p99_us"] >= v["raw_floor_p50_us"]
    if walstore_expected:
        assert v["ratio_p50"] > 0 and v["ratio_p99"] > 0 and v["walstore_sync_p50_us"] > 0
        assert v["best_group_commits_per_s"] > 0 and v["best_group_threads"] in (1, 4, 16)
    assert isinstance(v["text"], list) and v["text"]


def run_bench(
    pyroot: Path,
    target: Path,
    *extra: str,
    pure: bool = False,
    first_on_path: str = "",
    hide_c_module: bool = False,
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (first_on_path, str(pyroot)) if p)
    env.pop("WALSTORE_PURE", None)
    if pure:
        env["WALSTORE_PURE"] = "1"
    argv = ["--quick", str(target), *extra]
    if hide_c_module:  # as if it were not built: importing it raises ImportError
        code = (
            "import sys; sys.modules['walstore._walstore_bench'] = None; "
            f"from walstore.bench import main; sys.exit(main({argv!r}))"
        )
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "-m", "walstore.bench", *argv]
    return subprocess.run(
        cmd,
        cwd=pyroot,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _importable(pyroot: Path, module: str) -> bool:
    env = dict(os.environ, PYTHONPATH=str(pyroot))
    code = f"import importlib; importlib.import_module({module!r})"
    return subprocess.run([sys.executable, "-c", code], cwd=pyroot, env=env, check=False).returncode == 0


def _copy_package(dest: Path) -> Path:
    """A copy of the walstore package without the C timer module, under `dest`."""
    ignore = shutil.ignore_patterns("__pycache__", "_walstore_bench*")
    shutil.copytree(ROOT / "walstore", dest / "walstore", ignore=ignore)
    return dest


def _walstore_has_open() -> bool:
    opener, _ = bench.load_opener()
    return opener is not None


@pytest.fixture(scope="module")
def c_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python path root where walstore._walstore_bench imports: the repo, or a copy with it built."""
    if _importable(ROOT, "walstore._walstore_bench"):
        return ROOT
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the C timer cannot be built")
    pytest.importorskip("cffi")
    work = tmp_path_factory.mktemp("cbuild")
    root = _copy_package(work / "root")
    spec = importlib.util.spec_from_file_location("_ffi_bench_build", ROOT / "_native" / "_ffi_bench_build.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    built = Path(mod.make_ffi(str(ROOT / "_native")).compile(tmpdir=str(work / "build")))
    for so in built.parent.glob("_walstore_bench*.so"):
        shutil.copy2(so, root / "walstore" / so.name)
    assert _importable(root, "walstore._walstore_bench")
    return root


def test_quick_json_c_timer(c_root: Path, tmp_path: Path) -> None:
    target = tmp_path / "disk"
    target.mkdir()
    (target / "keep.txt").write_text("not the bench's")
    extra = ["--json"]
    has_fio = shutil.which("fio") is not None
    if has_fio:
        extra.append("--compare-fio")
    plot = tmp_path / "plot.png"
    if importlib.util.find_spec("matplotlib") is not None:
        extra += ["--plot", str(plot)]
    proc = run_bench(c_root, target, *extra)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    check_report(doc, "c", _walstore_has_open())
    assert doc["timer_note"].startswith("C ")
    assert sorted(os.listdir(target)) == ["keep.txt"]
    if has_fio:
        f = doc["fio"]
        assert f["available"] is True, f
        assert f["size"] == 4096 and f["ops"] > 0 and f["ops_per_s"] > 0 and f["bench_ops_per_s"] > 0
        for k in ("sync_latency_us", "write_latency_us", "bench_sync_latency_us"):
            check_latency(f[k], "fio " + k)
        assert f["ratio_sync_p50"] > 0 and f["ratio_ops_per_s"] > 0 and f["tolerance"] == 0.25
        assert isinstance(f["within_tolerance"], bool) and isinstance(f["ops_within_tolerance"], bool)
        assert len(f["rounds"]) == bench.QUICK.fio_rounds
        for r in f["rounds"]:
            assert r["bench_ops_per_s"] > 0 and r["fio_ops_per_s"] > 0
            check_latency(r["bench_sync_latency_us"], "round bench")
            check_latency(r["fio_sync_latency_us"], "round fio")
    if "--plot" in extra:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_json_python_timer_forced(tmp_path: Path) -> None:
    proc = run_bench(ROOT, tmp_path, "--json", pure=True)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    check_report(doc, "python", _walstore_has_open())
    assert doc["timer_note"] == "python (WALSTORE_PURE=1)"
    assert os.listdir(tmp_path) == []


def test_quick_table_without_c_module(tmp_path: Path) -> None:
    """With no C module the bench falls back to Python and says so; the table has every section."""
    target = tmp_path / "disk"
    target.mkdir()
    proc = run_bench(ROOT, target, hide_c_module=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "timer: python (C module not built)" in out
    for heading in ("Raw writes, appending", "Raw writes, overwriting", "Snapshot steps", "Verdict:"):
        assert heading in out
    if _walstore_has_open():
        assert "walstore group commit" in out
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal
    assert os.listdir(target) == []


def test_bad_directory_and_missing_plot_dependency(tmp_path: Path) -> None:
    proc = run_bench(ROOT, tmp_path / "missing", "--json")
    assert proc.returncode == 2 and "not a directory" in proc.stderr
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    target = tmp_path / "disk"
    target.mkdir()
    proc = run_bench(ROOT, target, "--plot", str(tmp_path / "p.png"), first_on_path=str(fake))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["walstore bench: --plot needs matplotlib: pip install 'walstore[plot]'"]
    assert proc.stdout == "" and os.listdir(target) == []


def test_latency_stats_nearest_rank() -> None:
    st = bench.LatencyStats.from_ns(list(range(1000, 1001000, 1000)))  # 1..1000 us
    assert (st.p50, st.p99, st.p999, st.max, st.min) == (500.0, 990.0, 999.0, 1000.0, 1.0)
    one = bench.LatencyStats.from_ns([7000])
    assert one.p50 == one.p99 == one.p999 == one.max == 7.0


def test_parse_size() -> None:
    assert bench.parse_size("4K") == 4096
    assert bench.parse_size("1MiB") == 1 << 20
    assert bench.parse_size("512") == 512
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_size("3")


def test_value_makes_exact_frames() -> None:
    from walstore import format as fmt

    for size in (128, 512, 4096, 1 << 20):
        value = bench.value_for(size)
        payload = 12 + bench.KEY_LEN + len(value)
        assert fmt.frame_size(payload) == size


def test_mount_of_longest_prefix(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard\n"
        "40 27 0:40 / /data rw,noatime shared:1 - xfs /dev/sdb1 rw,attr2\n"
        "41 27 0:41 / /data\\040two rw - tmpfs tmpfs rw,size=1k\n"
        "42 27 0:42 / /dat rw - btrfs /dev/sdc rw\n"
    )
    m = bench.mount_of("/data/x/y", str(info))
    assert m is not None
    assert (m["mount_point"], m["fstype"], m["source"], m["mount_options"]) == (
        "/data",
        "xfs",
        "/dev/sdb1",
        "rw,noatime",
    )
    m2 = bench.mount_of("/data two/z", str(info))
    assert m2 is not None and m2["fstype"] == "tmpfs"
    m3 = bench.mount_of("/database", str(info))
    assert m3 is not None and m3["mount_point"] == "/"


def test_select_timer_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def fake(name: str, package: str | None = None) -> Any:
        if name == "walstore._walstore_bench":
            raise ImportError("not built")
        return real(name, package)

    monkeypatch.delenv("WALSTORE_PURE", raising=False)
    monkeypatch.setattr(importlib, "import_module", fake)
    t = bench.select_timer()
    assert t.name == "python" and t.note == "python (C module not built)"
    monkeypatch.setenv("WALSTORE_PURE", "1")
    assert bench.select_timer().note == "python (WALSTORE_PURE=1)"
