"""The C sources compile without warnings, and WALSTORE_PURE=1 selects the Python replayer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from native_support import require_native

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "_native"
SOURCES = [
    "crc32c.c",
    "scan.c",
    "kvreplay.c",
    "snapshot.c",
    "logwrite.c",
    "gilturn.c",
    "yieldpoint.c",
    "fuzz/fuzz_replay.c",
]
WARNINGS = [
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wshadow",
    "-Wstrict-prototypes",
    "-Wmissing-prototypes",
    "-Wpointer-arith",
    "-Wvla",
    "-Wcast-qual",
    "-Wundef",
]
COMPILERS = [cc for cc in ("gcc", "clang") if shutil.which(cc)]
# aarch64 (the ARMv8 CRC path) where a cross toolchain is installed (gcc-aarch64-linux-gnu)
if shutil.which("aarch64-linux-gnu-gcc"):
    COMPILERS.append("aarch64-linux-gnu-gcc")
    if shutil.which("clang"):
        COMPILERS.append("clang --target=aarch64-linux-gnu")


@pytest.mark.skipif(not COMPILERS, reason="SKIPPED: no C compiler (gcc or clang) on this machine")
@pytest.mark.parametrize("cc", COMPILERS or ["none"])
@pytest.mark.parametrize("source", SOURCES)
def test_compiles_without_warnings(cc: str, source: str, tmp_path: Path) -> None:
    cmd = [
        *cc.split(),
        "-std=c11",
        "-O2",
        *WARNINGS,
        f"-I{NATIVE}",
        "-c",
        str(NATIVE / source),
        "-o",
        str(tmp_path / "x.o"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not COMPILERS, reason="SKIPPED: no C compiler (gcc or clang) on this machine")
@pytest.mark.parametrize("cc", [cc for cc in ("gcc", "clang") if shutil.which(cc)] or ["none"])
@pytest.mark.parametrize("source", ["kvdict.c", "fastput.c"])
def test_kvdict_compiles_without_warnings(cc: str, source: str, tmp_path: Path) -> None:
    """kvdict.c and fastput.c use the CPython C API: compiled against this Python's headers, for this machine only."""
    cmd = [cc, "-std=c11", "-O2", *WARNINGS, f"-I{NATIVE}", f"-I{sysconfig.get_paths()['include']}"]
    cmd += ["-c", str(NATIVE / source), "-o", str(tmp_path / "x.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def run_python(code: str, **env: str) -> str:
    full_env = {k: v for k, v in os.environ.items() if k != "WALSTORE_PURE"}
    full_env.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=str(ROOT), check=True
    )
    return proc.stdout.strip()


PROBE = (
    "import walstore.native as n, walstore.kvreplay as k;"
    "print(n.backend(), n.AVAILABLE, type(k.make_kv_replayer()).__name__)"
)


def test_pure_env_selects_python() -> None:
    assert run_python(PROBE, WALSTORE_PURE="1") == "python False PyKVReplayer"


def test_c_selected_when_built() -> None:
    require_native()
    assert run_python(PROBE) == "c True KVReplayer"
