"""Checks of the options `open()` and `open_machine()` take: a wrong type or value is an
InvalidOptionError naming the option, raised before anything is opened or created."""

from __future__ import annotations

import math
import threading
from typing import Any

from .errors import InvalidOptionError

MIN_SEGMENT_SIZE = 1024
"""The smallest `segment_size`: a segment's 64-byte header and a few small records.
A record larger than the segment still goes into a segment of its own."""


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidOptionError(f"{name} must be True or False, not {_describe(value)}")
    return value


def check_int(name: str, value: Any, minimum: int) -> int:
    """An int (not a bool) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOptionError(f"{name} must be an int, not {_describe(value)}")
    if value < minimum:
        raise InvalidOptionError(f"{name} must be at least {minimum}, not {value}")
    return value


def check_number(name: str, value: Any, minimum: float, *, above: bool = False) -> float:
    """A finite int or float (not a bool) of at least `minimum` (or above it, with `above`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidOptionError(f"{name} must be a number, not {_describe(value)}")
    if not math.isfinite(value):
        raise InvalidOptionError(f"{name} must be finite, not {value!r}")
    if value < minimum or (above and value == minimum):
        raise InvalidOptionError(f"{name} must be {'above' if above else 'at least'} {minimum}, not {value!r}")
    return float(value)


def check_interval_ms(value: Any) -> float:
    ms = check_number("interval_ms", value, 0, above=True)
    if ms / 1000.0 > threading.TIMEOUT_MAX:
        raise InvalidOptionError(f"interval_ms must be at most {threading.TIMEOUT_MAX * 1000:.0f}, not {value!r}")
    return ms


def check_compaction(auto_compact: Any, compact_min_bytes: Any, compact_ratio: Any, keep_snapshots: Any) -> None:
    check_bool("auto_compact", auto_compact)
    check_int("compact_min_bytes", compact_min_bytes, 0)
    check_number("compact_ratio", compact_ratio, 0)
    check_int("keep_snapshots", keep_snapshots, 1)
