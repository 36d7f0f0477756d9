"""Loop-mounted filesystem images for tests that need a real kernel (root only)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REQUIRE_MOUNT = os.environ.get("WALSTORE_REQUIRE_MOUNT") == "1"


def mount_unavailable(fstype: str) -> str | None:
    """Why a loop mount of `fstype` cannot be made here, or None if it can."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which(f"mkfs.{fstype}") is None:
        return f"mkfs.{fstype} is not installed"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices"
    return None


def require_mount(fstype: str) -> None:
    """Skip loudly, or fail when WALSTORE_REQUIRE_MOUNT=1 (CI), if `fstype` cannot be mounted."""
    why = mount_unavailable(fstype)
    if why is None:
        return
    msg = f"cannot loop-mount {fstype}: {why}"
    if REQUIRE_MOUNT:
        pytest.fail(msg + " (WALSTORE_REQUIRE_MOUNT=1)")
    pytest.skip(msg + "; THIS REAL-KERNEL TEST DID NOT RUN (set WALSTORE_REQUIRE_MOUNT=1 to fail instead)")


@contextlib.contextmanager
def loop_mount(tmp: Path, fstype: str, size_mb: int) -> Iterator[Path]:
    """A fresh `fstype` filesystem of `size_mb` MiB mounted at a directory under `tmp`."""
    require_mount(fstype)
    image = tmp / f"{fstype}-{uuid.uuid4().hex[:8]}.img"
    mnt = tmp / f"mnt-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    mkfs = [f"mkfs.{fstype}", "-q"] + (["-F"] if fstype == "ext4" else ["-f"]) + [str(image)]
    subprocess.run(mkfs, check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        image.unlink(missing_ok=True)
