"""A small progress bar with an ETA, for the command-line tool's long scans.

Guarantees: it writes only to its stream (stderr by default), and only when
that stream is a terminal; piped or redirected output never sees it. It
redraws at most a few times a second, so it costs nothing measurable on a
scan. No dependency: a dozen lines do what the tool needs from tqdm.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Optional, TextIO

_REDRAW_SECONDS = 0.2
_START_DELAY = 0.5
"""A scan that ends within this time draws nothing: short commands stay quiet."""


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop always returns


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Progress:
    """Progress over `total` units (bytes by default) with rate and ETA.

    Use as a context manager; call `advance(n)` as work is done, `begin(label)`
    when a new stage starts. `enabled` defaults to "the stream is a terminal".
    `show_amount=False` leaves out the done/total and rate part (for units that
    only estimate the work, such as the benchmark's seconds).
    """

    def __init__(
        self,
        total: float,
        label: str = "",
        *,
        stream: Optional[TextIO] = None,
        enabled: Optional[bool] = None,
        unit_bytes: bool = True,
        show_amount: bool = True,
        width: int = 28,
    ) -> None:
        self.total = max(0, total)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.unit_bytes = unit_bytes
        self.show_amount = show_amount
        self.width = width
        self.done: float = 0
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def advance(self, n: float) -> None:
        """Count `n` more units done (never past the total); redraw if it is time."""
        self.done = min(self.total, self.done + n) if self.total else self.done + n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._start < _START_DELAY or now - self._last_draw < _REDRAW_SECONDS:
            return
        self._last_draw = now
        self._draw(now)

    def set_label(self, label: str) -> None:
        self.label = label

    def begin(self, label: str) -> None:
        """A new stage: show `label` now."""
        self.label = label
        if self.enabled:
            now = time.monotonic()
            self._last_draw = now
            self._draw(now)

    def line(self, now: Optional[float] = None) -> str:
        """The text of the bar as it would be drawn now."""
        now = time.monotonic() if now is None else now
        elapsed = max(1e-9, now - self._start)
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        rate = self.done / elapsed
        if not self.show_amount:
            amount = ""
        elif self.unit_bytes:
            amount = f" {_human_bytes(self.done)}/{_human_bytes(self.total)} {_human_bytes(rate)}/s"
        else:
            amount = f" {self.done:.0f}/{self.total:.0f} {rate:.0f}/s"
        eta = (self.total - self.done) / rate if rate > 0 and self.done < self.total else 0.0
        label = f"{self.label} " if self.label else ""
        return f"{label}[{bar}] {frac * 100:5.1f}%{amount} ETA {_clock(eta)}"

    def _draw(self, now: float) -> None:
        text = self.line(now)
        cols = 100
        self.stream.write("\r" + text[: cols - 1].ljust(min(cols - 1, len(text))) + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Erase the bar (if one was drawn)."""
        if self.enabled and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()
