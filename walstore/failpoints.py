"""Named failpoints: kill the process at a chosen step, for crash tests.

Set ``WALSTORE_FAILPOINT=name:count`` (several separated by commas) and the
process SIGKILLs itself the `count`-th time it reaches the point `name`
(count 1 = the first time). With the variable unset, `hit` is one dict lookup.
Points are listed in `POINTS`; docs/TESTING.md describes them.
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "commit.before_write",  # record framed, nothing written
    "commit.after_write",  # record written to the page cache, not synced, not applied
    "commit.after_apply",  # applied in memory, not yet synced
    "commit.after_sync",  # synced, not yet acknowledged to the caller
    "roll.after_sync_old",  # old segment synced, new one not created
    "roll.after_create",  # new segment in place, old one not yet truncated
    "close.after_sync",  # everything synced, CLOSE record not written
    "close.after_close_record",  # CLOSE written, not synced
    "recovery.after_quarantine",  # torn bytes saved in quarantine/, not yet zeroed
    "recovery.after_cut",  # torn bytes zeroed and synced
)

_armed: dict[str, int] = {}
"""Changed in place, never rebound: the C fast put (`_native/fastput.c`) holds this dict and
leaves every put to the Python path while it is not empty."""


def _parse(spec: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, count = item.partition(":")
        if name not in POINTS:
            raise ValueError(f"unknown failpoint {name!r}; known: {', '.join(POINTS)}")
        out[name] = int(count or "1")
    return out


def arm(spec: str) -> None:
    """Arm failpoints from a spec like ``"commit.after_write:3"`` (replaces any armed)."""
    _armed.clear()
    _armed.update(_parse(spec))


def hit(name: str) -> None:
    """Count a pass through point `name`; SIGKILL this process when its count runs out."""
    if not _armed:
        return
    left = _armed.get(name)
    if left is None:
        return
    if left <= 1:
        os.kill(os.getpid(), signal.SIGKILL)
    _armed[name] = left - 1


if os.environ.get("WALSTORE_FAILPOINT"):
    arm(os.environ["WALSTORE_FAILPOINT"])
