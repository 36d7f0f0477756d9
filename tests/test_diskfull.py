"""A full disk fails only the commit that hit it; the store works again once space is freed."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from mounts import loop_mount
from storetools import ENOSPC, FailingFileAPI

import walstore


def fill(directory: Path) -> Path:
    """Write a filler file until the filesystem is full."""
    filler = directory / "filler"
    chunk = b"\xa5" * (64 << 10)
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        small = b"\xa5" * 512
        while True:
            try:
                f.write(small)
            except OSError:
                break
    return filler


@pytest.mark.parametrize("preallocate", [True, False])
def test_full_ext4_fails_the_commit_and_recovers_after_space_is_freed(tmp_path: Path, preallocate: bool) -> None:
    with loop_mount(tmp_path, "ext4", 24) as mnt:
        path = mnt / "db"
        db = walstore.open(path, segment_size=256 << 10, preallocate=preallocate)
        filler = fill(mnt)
        acked: dict[str, int] = {}
        failed = None
        for i in range(100_000):
            try:
                db[f"k{i}"] = i
            except walstore.DiskFullError as exc:
                failed = i
                assert "disk full" in str(exc)
                break
            acked[f"k{i}"] = i
        assert failed is not None, "the disk never filled"
        assert f"k{failed}" not in db, "a failed commit must not change the state"
        assert db.to_dict() == acked
        with pytest.raises(walstore.DiskFullError):
            db["again"] = 1  # still full: still a clean failure, not a poisoned store
        filler.unlink()
        os.sync()
        db["after"] = 1  # works again once space is freed
        acked["after"] = 1
        db.close()
        with walstore.open(path, segment_size=256 << 10) as db2:
            assert db2.to_dict() == acked


def test_injected_enospc_on_write_fails_cleanly(tmp_path: Path) -> None:
    """Where no filesystem can be mounted, the same promise through the file-API seam."""
    fs = FailingFileAPI()
    path = tmp_path / "db"
    db = walstore.open(path, segment_size=1 << 16, fs=fs)
    db["a"] = 1
    fs.fail["pwrite"] = (fs.calls["pwrite"], ENOSPC)
    with pytest.raises(walstore.DiskFullError):
        db["b"] = 2
    with pytest.raises(walstore.DiskFullError):
        with db.transaction() as tx:
            tx["c"] = 3
            tx["a"] = 0
    assert db.to_dict() == {"a": 1}
    del fs.fail["pwrite"]
    db["d"] = 4
    db.close()
    with walstore.open(path, segment_size=1 << 16) as db2:
        assert db2.to_dict() == {"a": 1, "d": 4}
