"""`interval` mode's background flusher: when its flushes start, and that they cover
every acknowledged commit within the bound docs/GUARANTEES.md states."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st

import walstore
from walstore import nativelog, writer
from walstore.crashfs import FaultyFileAPI
from walstore.writer import FlushSchedule


def test_flushes_start_one_interval_apart() -> None:
    s = FlushSchedule(0.1, now=10.0)
    assert s.delay(10.0) == pytest.approx(0.1)
    assert s.delay(10.04) == pytest.approx(0.06)
    s.ran(started=10.1, ended=10.13)  # a flush shorter than the interval
    assert s.next_start == pytest.approx(10.2)  # one interval after it *started*, not ended
    assert s.delay(10.13) == pytest.approx(0.07)


def test_a_flush_longer_than_the_interval_is_followed_at_once() -> None:
    s = FlushSchedule(0.1, now=0.0)
    s.ran(started=0.1, ended=0.45)
    assert s.next_start == pytest.approx(0.45)
    assert s.delay(0.45) == 0.0 and s.delay(0.5) == 0.0


def test_a_look_that_found_nothing_waits_one_interval() -> None:
    s = FlushSchedule(0.05, now=0.0)
    s.ran(started=0.05, ended=0.05)
    assert s.next_start == pytest.approx(0.10)


@given(
    interval=st.floats(0.001, 1.0),
    durations=st.lists(st.floats(0.0, 3.0), min_size=1, max_size=20),
    gaps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=40),
)
def test_every_commit_is_flushed_within_the_bound(interval: float, durations: list[float], gaps: list[float]) -> None:
    """A flusher driven by FlushSchedule, on a simulated clock, with flushes of any
    duration: a commit acknowledged at t is durable by t + max(interval, the rest of
    the flush running at t) + the duration of the flush that covers it."""
    commits: list[float] = []
    t = 0.0
    for g in gaps:
        t += g
        commits.append(t)
    schedule = FlushSchedule(interval, now=0.0)
    now = 0.0
    flushes: list[tuple[float, float]] = []  # (start, end) of the flushes that synced something
    durable_at: dict[int, tuple[float, float]] = {}  # commit index -> its flush
    covered = 0
    while covered < len(commits):
        start = now + schedule.delay(now)
        newly = [i for i in range(covered, len(commits)) if commits[i] < start]  # written before the flush
        if newly:
            end = start + durations[len(flushes) % len(durations)]
            flushes.append((start, end))
            for i in newly:
                durable_at[i] = (start, end)
            covered = newly[-1] + 1
        else:
            end = start
        schedule.ran(start, end)
        now = end
    for i, t in enumerate(commits):
        running = [e for s, e in flushes if s <= t < e]
        rest = running[0] - t if running else 0.0
        start, end = durable_at[i]
        assert start > t, "a flush covers only commits written before it"
        assert end <= t + max(interval, rest) + (end - start) + 1e-9


class RecordingSchedule(FlushSchedule):
    """Records what the flusher asks and tells its schedule."""

    made: list[RecordingSchedule] = []

    def __init__(self, interval: float, now: float) -> None:
        super().__init__(interval, now)
        self.events: list[tuple[str, float, float]] = []
        self.lock = threading.Lock()
        RecordingSchedule.made.append(self)

    def delay(self, now: float) -> float:
        d = super().delay(now)
        with self.lock:
            self.events.append(("delay", now, d))
        return d

    def ran(self, started: float, ended: float) -> None:
        with self.lock:
            self.events.append(("ran", started, ended))
        super().ran(started, ended)


def _wait_durable_without_sync(db: Any, seq: int) -> None:
    """Poll until the background flusher alone has made `seq` durable (a hang guard, not a timing check)."""
    give_up = time.monotonic() + 60
    while db.stats()["durable_seq"] < seq:
        assert time.monotonic() < give_up, "the flusher never made the commits durable"
        time.sleep(0.002)


@pytest.mark.parametrize("writer_kind", ["python, slow disk", "plain OS file API"])
def test_the_flusher_follows_its_schedule(tmp_path: Path, monkeypatch: Any, writer_kind: str) -> None:
    RecordingSchedule.made.clear()
    monkeypatch.setattr(writer, "FlushSchedule", RecordingSchedule)
    monkeypatch.setattr(nativelog, "FlushSchedule", RecordingSchedule)
    slow = writer_kind.startswith("python")
    fs: Optional[FaultyFileAPI] = FaultyFileAPI(sync_delay=0.03) if slow else None
    interval = 0.005
    with walstore.open(tmp_path / "db", durability="interval", interval_ms=interval * 1000, fs=fs) as db:
        for i in range(30):
            db[f"k{i}"] = i
            time.sleep(0.002)
        _wait_durable_without_sync(db, db.last_seq)
        (schedule,) = RecordingSchedule.made
        with schedule.lock:
            events = list(schedule.events)
    assert events[0][0] == "delay"
    runs = [(s, e) for kind, s, e in events if kind == "ran"]
    assert runs, "the flusher never reported a flush to its schedule"
    for prev, nxt in zip(events, events[1:]):
        if prev[0] == "ran":
            assert nxt[0] == "delay", "each flush is followed by a look at the schedule"
            started, ended = prev[1], prev[2]
            assert started <= ended <= nxt[1]
            if ended - started >= interval:
                assert nxt[2] == 0.0, "a flush longer than the interval is followed at once"
            else:
                assert nxt[2] <= interval
    if slow:
        assert any(e - s >= 0.03 for s, e in runs), "no flush on the slow disk went through the schedule"
