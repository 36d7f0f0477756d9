"""Options of `open()` and `open_machine()`: a wrong type or value is an InvalidOptionError
that names the option, raised before the store's directory is created or touched."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

import walstore
from walstore.crashfs import FaultyFileAPI
from walstore.options import MIN_SEGMENT_SIZE


class Counter:
    def __init__(self) -> None:
        self.n = 0

    @walstore.operation
    def add(self, k: int) -> None:
        self.n += k


BAD_OPTIONS: list[tuple[str, Any]] = [
    ("durability", "fast"),
    ("durability", "SYNC"),
    ("durability", None),
    ("durability", 1),
    ("interval_ms", 0),
    ("interval_ms", -5),
    ("interval_ms", "100"),
    ("interval_ms", True),
    ("interval_ms", math.nan),
    ("interval_ms", math.inf),
    ("interval_ms", 1e300),
    ("segment_size", MIN_SEGMENT_SIZE - 1),
    ("segment_size", 0),
    ("segment_size", -1),
    ("segment_size", 4096.0),
    ("segment_size", "64MiB"),
    ("segment_size", False),
    ("preallocate", "no"),
    ("preallocate", 0),
    ("preallocate", None),
    ("create", "yes"),
    ("auto_compact", 1),
    ("compact_min_bytes", -1),
    ("compact_min_bytes", 1.5),
    ("compact_min_bytes", "64M"),
    ("compact_ratio", -0.5),
    ("compact_ratio", math.nan),
    ("compact_ratio", "1"),
    ("keep_snapshots", 0),
    ("keep_snapshots", -1),
    ("keep_snapshots", 2.0),
    ("codec", "yaml"),
    ("codec", object()),
    ("fs", "os"),
]


def _open(kind: str, path: Path, **kw: Any) -> Any:
    if kind == "kv":
        return walstore.open(path, **kw)
    return walstore.open_machine(path, Counter, **kw)


@pytest.mark.parametrize("kind", ["kv", "machine"])
@pytest.mark.parametrize("name,value", BAD_OPTIONS, ids=[f"{n}={v!r}" for n, v in BAD_OPTIONS])
def test_a_bad_option_is_refused_before_anything_is_created(tmp_path: Path, kind: str, name: str, value: Any) -> None:
    path = tmp_path / "db"
    with pytest.raises(walstore.InvalidOptionError, match=name if name != "codec" else "codec") as info:
        _open(kind, path, **{name: value})
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)
    assert isinstance(info.value, walstore.WalstoreError)
    assert not path.exists(), "a refused open must not create the store"


@pytest.mark.parametrize("kind", ["kv", "machine"])
def test_a_bad_option_leaves_an_existing_store_as_it_was(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "db"
    with _open(kind, path, segment_size=4096) as store:
        if kind == "kv":
            store["a"] = 1
        else:
            store.state.add(1)
    before = {name: (path / name).read_bytes() for name in sorted(os.listdir(path)) if (path / name).is_file()}
    with pytest.raises(walstore.InvalidOptionError, match="interval_ms"):
        _open(kind, path, durability="interval", interval_ms=0)
    after = {name: (path / name).read_bytes() for name in sorted(os.listdir(path)) if (path / name).is_file()}
    assert after == before
    with _open(kind, path, segment_size=4096) as store:  # and the lock was not left held
        assert (store["a"] if kind == "kv" else store.state.n) == 1


GOOD_OPTIONS: list[dict[str, Any]] = [
    {"durability": "interval", "interval_ms": 1},
    {"durability": "interval", "interval_ms": 0.5},
    {"durability": "none"},
    {"segment_size": MIN_SEGMENT_SIZE},
    {"preallocate": False},
    {"auto_compact": False, "compact_min_bytes": 0, "compact_ratio": 0},
    {"compact_ratio": 2, "keep_snapshots": 3},
    {"codec": "pickle"},
    {"fs": FaultyFileAPI()},
]


@pytest.mark.parametrize("kind", ["kv", "machine"])
@pytest.mark.parametrize("kw", GOOD_OPTIONS, ids=[",".join(f"{k}={v!r}" for k, v in kw.items()) for kw in GOOD_OPTIONS])
def test_good_options_open_and_keep_data(tmp_path: Path, kind: str, kw: dict[str, Any]) -> None:
    path = tmp_path / "db"
    with _open(kind, path, **kw) as store:
        for i in range(50):
            if kind == "kv":
                store[f"k{i}"] = i
            else:
                store.state.add(i)
    with _open(kind, path, **{k: v for k, v in kw.items() if k == "codec"}) as store:
        assert (sum(store.values()) if kind == "kv" else store.state.n) == sum(range(50))


def test_a_commits_bad_durability_is_an_invalid_option_and_writes_nothing(tmp_path: Path) -> None:
    with walstore.open(tmp_path / "db") as db:
        for bad in ("Sync", "", 3):
            with pytest.raises(walstore.InvalidOptionError, match="durability"):
                db.put("a", 1, durability=bad)  # type: ignore[arg-type]
        assert len(db) == 0 and db.last_seq == 0
