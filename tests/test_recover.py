"""walstore.recover: analysis agrees with open(); each repair mode keeps what it promises."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

import walstore
from walstore import core, recover, replay
from walstore import format as fmt
from walstore.errors import CorruptionError

SEG = 4096  # ~42 records of this test's size per segment


def value(i: int) -> dict[str, Any]:
    return {"i": i, "pad": "x" * 30}


def build(path: Path, n: int = 100, *, close: bool = True) -> Path:
    """A store with keys k1..kn (commit i sets k{i}), in ~3 segments; closed, or a crash image."""
    db = walstore.open(path, segment_size=SEG)
    for i in range(1, n + 1):
        db[f"k{i}"] = value(i)
    if close:
        db.close()
        return path
    image = path.with_name(path.name + "-crash")
    shutil.copytree(path, image)  # what a crash right now would leave (sync mode: all on disk)
    db.close()
    shutil.rmtree(path)
    image.rename(path)
    return path


def segments(path: Path) -> list[Path]:
    return [Path(p) for _s, p in replay.list_segments(str(path))]


def record_offsets(seg: Path) -> list[tuple[int, int, int]]:
    """(offset, size, seq) of the valid records of a segment."""
    data = seg.read_bytes()
    first = fmt.decode_file_header(data[:64]).first_seq
    out: list[tuple[int, int, int]] = []
    recover.walk_segment(data, 64, first, lambda r: out.append((r.offset, r.size, r.seq)), None, resync=False)
    return out


def flip(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x10
    path.write_bytes(bytes(b))


def open_keys(path: Path) -> dict[Any, Any]:
    with walstore.open(path, create=False) as db:
        return db.to_dict()


def expected(upto: int) -> dict[str, Any]:
    return {f"k{i}": value(i) for i in range(1, upto + 1)}


def inspect_verdict(path: Path) -> str:
    ident = core.read_identity(str(path))
    try:
        state = replay.inspect_log(str(path), ident.store_id)
    except CorruptionError:
        return "corruption"
    return "torn-tail" if state.torn else "clean"


def analyze(path: Path) -> recover.Analysis:
    a = recover.analyze(path, writer_running=False)
    a.close()
    return a


# ---- damage makers -------------------------------------------------------------


def flip_mid_log(path: Path) -> int:
    """Flip a bit in a record in the middle segment; returns that record's seq."""
    seg = segments(path)[1]
    off, size, seq = record_offsets(seg)[9]
    flip(seg, off + 40)
    return seq


def truncate_last_record(path: Path) -> int:
    seg = segments(path)[-1]
    recs = [r for r in record_offsets(seg)]
    off, size, seq = recs[-1]
    with open(seg, "r+b") as f:
        f.truncate(off + size // 2)
    return seq


# ---- analysis ------------------------------------------------------------------


def test_clean_store_analysis_matches_open(tmp_path: Path) -> None:
    p = build(tmp_path / "s")
    a = analyze(p)
    assert a.verdict == "clean" and a.closed_cleanly
    assert a.last_seq == 100
    assert a.state is not None and a.state.keys == 100
    assert [s.verdict for s in a.segments] == ["clean"] * len(a.segments)
    assert len(a.segments) >= 3


@pytest.mark.parametrize(
    "damage, verdict",
    [
        (flip_mid_log, "corruption"),
        (truncate_last_record, "torn-tail"),
    ],
)
def test_verdict_agrees_with_inspect_log(tmp_path: Path, damage: Any, verdict: str) -> None:
    p = build(tmp_path / "s", close=False)
    damage(p)
    assert analyze(p).verdict == verdict == inspect_verdict(p)


def test_analysis_goes_on_past_corruption(tmp_path: Path) -> None:
    p = build(tmp_path / "s")
    seq = flip_mid_log(p)
    a = analyze(p)
    assert a.damage is not None and a.damage.seq == seq and a.damage.reason == "bad-crc"
    assert a.last_seq == seq - 1
    assert a.state is not None and a.state.keys == seq - 1
    assert a.segments[-1].verdict == "clean"  # later segments still get a verdict


def test_analysis_never_writes(tmp_path: Path) -> None:
    p = build(tmp_path / "s", close=False)
    truncate_last_record(p)
    before = {f.name: f.read_bytes() for f in p.iterdir() if f.is_file()}
    analyze(p)
    assert {f.name: f.read_bytes() for f in p.iterdir() if f.is_file()} == before
    assert not (p / "quarantine").exists()


# ---- walking past damage ---------------------------------------------------------


def test_walk_segment_resyncs_past_damage(tmp_path: Path) -> None:
    p = build(tmp_path / "s")
    seq = flip_mid_log(p)
    seg = segments(p)[1]
    seen: list[int] = []
    damaged: list[recover.DamagedRange] = []
    data = seg.read_bytes()
    first = fmt.decode_file_header(data[:64]).first_seq
    recover.walk_segment(data, 64, first, lambda r: seen.append(r.seq), damaged.append)
    assert seq not in seen
    assert seen == [s for s in range(first, first + len(seen) + 1) if s != seq]
    assert len(damaged) == 1 and damaged[0].reason == "bad-crc"
    assert damaged[0].header is not None and damaged[0].header["seq"] == seq


# ---- repairs ---------------------------------------------------------------------


def run(path: Path, mode: str) -> tuple[recover.Plan, dict[str, Any]]:
    lock = core.StoreLock(str(path))
    try:
        a = recover.analyze(path, writer_running=False)
        try:
            plan = recover.plan_recovery(a, mode)
            report = recover.execute(plan)
        finally:
            a.close()
    finally:
        lock.release()
    return plan, report


def quarantined_bytes(path: Path) -> int:
    q = path / "quarantine"
    return sum(f.stat().st_size for f in q.rglob("*") if f.is_file() and f.suffix in (".wal", ".bin"))


def test_torn_tail_mode_cuts_like_open(tmp_path: Path) -> None:
    p = build(tmp_path / "s", close=False)
    seq = truncate_last_record(p)
    plan, report = run(p, "torn-tail")
    assert report["status"] == "done"
    assert report["dropped"]["seq_ranges"] == [[seq, seq]]
    assert open_keys(p) == expected(seq - 1)
    (cut,) = [x for x in report["actions"] if x["action"] == "cut"]
    assert (p / cut["saved_as"]).stat().st_size == cut["bytes"] > 0


def test_torn_tail_mode_refuses_corruption(tmp_path: Path) -> None:
    p = build(tmp_path / "s")
    flip_mid_log(p)
    a = analyze(p)
    plan = recover.plan_recovery(a, "torn-tail")
    assert plan.refused and "last-consistent" in plan.refused
    assert not plan.actions


def test_last_consistent_keeps_prefix_and_quarantines_the_rest(tmp_path: Path) -> None:
    p = build(tmp_path / "s")
    seq = flip_mid_log(p)
    total = sum(s.stat().st_size for s in segments(p))
    plan, report = run(p, "last-consistent")
    assert open_keys(p) == expected(seq - 1)
    assert report["dropped"]["seq_ranges"] == [[seq, 100]]
    assert report["dropped"]["commits"] == 100 - seq + 1
    moved = [x for x in report["actions"] if x["action"] == "move"]
    assert moved and all((p / x["saved_as"]).exists() for x in moved)
    # Nothing is lost on disk: what remains plus what was quarantined covers every byte.
    assert quarantined_bytes(p) == sum(x["bytes"] for x in report["actions"])
    assert (
        sum(s.stat().st_size for s in segments(p)) + sum(x["bytes"] for x in report["actions"] if x["action"] == "move")
        == total
    )
    saved = json.loads((p / report["report"]).read_text())
    assert saved["mode"] == "last-consistent" and saved["status"] == "done"


def test_skip_damaged_keeps_valid_records_after_the_damage(tmp_path: Path) -> None:
    p = build(tmp_path / "s")
    seq = flip_mid_log(p)
    plan, report = run(p, "skip-damaged")
    state = open_keys(p)
    want = {k: v for k, v in expected(100).items() if k != f"k{seq}"}
    assert state == want
    assert report["dropped"]["commits"] == 1
    assert report["salvaged"]["renumbered"] == [[seq + 1, 100, seq]]
    with walstore.open(p, create=False) as db:
        assert db.last_seq == 99
        db["after"] = 1  # the repaired log takes new commits
    assert open_keys(p)["after"] == 1
    a = analyze(p)
    assert a.verdict == "clean"
    # The originals are in quarantine, whole.
    run_dir = p / os.path.dirname(report["report"])
    assert sorted(f.name for f in run_dir.glob("seg-*.wal")) == sorted(
        x["segment"] for x in report["actions"] if x["action"] == "move"
    )


def test_skip_damaged_over_a_missing_segment(tmp_path: Path) -> None:
    p = build(tmp_path / "s")
    segs = segments(p)
    middle = segs[1]
    first_missing = fmt.decode_file_header(middle.read_bytes()[:64]).first_seq
    after = fmt.decode_file_header(segs[2].read_bytes()[:64]).first_seq
    middle.unlink()
    assert analyze(p).damage is not None and analyze(p).damage.reason == "missing-segment"  # type: ignore[union-attr]
    plan, report = run(p, "skip-damaged")
    state = open_keys(p)
    assert state == {k: v for k, v in expected(100).items() if not first_missing <= int(k[1:]) < after}
    assert report["dropped"]["seq_ranges"] == [[first_missing, after - 1]]


def test_interrupted_skip_damaged_swap_is_finished(tmp_path: Path) -> None:
    p = build(tmp_path / "s")
    seq = flip_mid_log(p)
    a = recover.analyze(p, writer_running=False)
    plan = recover.plan_recovery(a, "skip-damaged")
    real_swap = recover._swap

    def crash(*args: Any) -> None:
        raise KeyboardInterrupt  # stands in for a crash between staging and the swap

    recover._swap = crash  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            recover.execute(plan)
    finally:
        recover._swap = real_swap  # type: ignore[assignment]
        a.close()
    assert recover.interrupted_runs(str(p))
    done = recover.resume_interrupted(str(p))
    assert len(done) == 1 and not recover.interrupted_runs(str(p))
    assert open_keys(p) == {k: v for k, v in expected(100).items() if k != f"k{seq}"}


def test_load_state_prefix_and_coded_values(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with walstore.open(p, segment_size=SEG) as db:
        db["t"] = "text"
        db[b"b"] = b"\x00\x01"
        db["j"] = [1, 2]
    a, state = recover.load_state(p)
    assert state["t"] == "text" and not isinstance(state["t"], recover.Coded)
    assert state[b"b"] == b"\x00\x01" and not isinstance(state[b"b"], recover.Coded)
    assert isinstance(state["j"], recover.Coded) and bytes(state["j"]) == b"[1,2]"
    q = build(tmp_path / "q")
    seq = flip_mid_log(q)
    with pytest.raises(CorruptionError):
        recover.load_state(q)
    _a, prefix = recover.load_state(q, allow_prefix=True)
    assert len(prefix) == seq - 1


# ---- random damage: the analysis agrees with open(), and every repair keeps the prefix ---------


def _damage_randomly(path: Path, rng: Any) -> str:
    segs = segments(path)
    seg = rng.choice(segs)
    size = seg.stat().st_size
    kind = rng.choice(["flip", "flip", "truncate", "zeros", "garbage"])
    if kind == "flip":
        off = rng.randrange(size)
        flip(seg, off)
    elif kind == "truncate":
        off = rng.randrange(64, size)
        with open(seg, "r+b") as f:
            f.truncate(off)
    elif kind == "zeros":
        off = rng.randrange(64, size)
        n = rng.randrange(1, 300)
        with open(seg, "r+b") as f:
            f.seek(off)
            f.write(bytes(min(n, size - off)))
    else:
        with open(seg, "ab") as f:
            f.write(bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 200))))
    return f"{kind} {seg.name}"


@pytest.mark.parametrize("closed", [True, False])
def test_random_damage(tmp_path: Path, closed: bool) -> None:
    import random

    base = build(tmp_path / "base", close=closed)
    full = expected(100)
    for seed in range(int(os.environ.get("WALSTORE_DAMAGE_SEEDS", "25"))):
        rng = random.Random(seed * 2 + closed)
        p = tmp_path / f"s{seed}"
        shutil.copytree(base, p)
        what = _damage_randomly(p, rng)
        a = analyze(p)
        verdict = {"in-progress": "torn-tail"}.get(a.verdict, a.verdict)
        assert verdict == inspect_verdict(p), (seed, what, a.problems)
        for mode in ("torn-tail", "last-consistent", "skip-damaged"):
            q = tmp_path / f"s{seed}-{mode}"
            shutil.copytree(p, q)
            qa = analyze(q)
            plan = recover.plan_recovery(qa, mode)
            if plan.refused:
                assert mode == "torn-tail" and qa.verdict == "corruption", (seed, what)
                continue
            if not plan.nothing_to_do:
                run(q, mode)
            state = open_keys(q)
            prefix = expected(a.last_seq)
            assert {k: state[k] for k in prefix if k in state} == prefix, (seed, what, mode)
            if mode == "skip-damaged":
                assert all(full[k] == v for k, v in state.items()), (seed, what)
            else:
                assert state == prefix, (seed, what, mode)
            assert analyze(q).verdict == "clean", (seed, what, mode)


def _opens(path: Path) -> bool:
    """Whether open() accepts a copy of the store (the oracle for the analysis's verdict)."""
    q = path.with_name(path.name + "-oracle")
    shutil.copytree(path, q)
    try:
        with walstore.open(q, create=False):
            return True
    except CorruptionError:
        return False
    finally:
        shutil.rmtree(q)


def test_random_damage_with_snapshots(tmp_path: Path) -> None:
    import random

    base = tmp_path / "base"
    with walstore.open(base, segment_size=SEG, keep_snapshots=2, auto_compact=False) as db:
        for i in range(1, 101):
            db[f"k{i}"] = value(i)
            if i in (30, 60):
                db.compact()
    files = sorted(f.name for f in base.iterdir() if f.suffix in (".wal", ".snap"))
    assert any(f.endswith(".snap") for f in files)
    full = expected(100)
    for seed in range(int(os.environ.get("WALSTORE_DAMAGE_SEEDS", "25"))):
        rng = random.Random(1000 + seed)
        p = tmp_path / f"s{seed}"
        shutil.copytree(base, p)
        target = p / rng.choice(files)
        flip(target, rng.randrange(target.stat().st_size))
        a = analyze(p)
        assert (a.verdict != "corruption") == _opens(p), (seed, target.name, a.problems)
        for mode in ("torn-tail", "last-consistent", "skip-damaged"):
            q = tmp_path / f"s{seed}-{mode}"
            shutil.copytree(p, q)
            plan = recover.plan_recovery(analyze(q), mode)
            if plan.refused:
                assert mode == "torn-tail" and a.verdict == "corruption"
                continue
            if not plan.nothing_to_do:
                run(q, mode)
            state = open_keys(q)
            prefix = expected(a.last_seq)
            assert {k: state[k] for k in prefix if k in state} == prefix, (seed, target.name, mode)
            assert all(full[k] == v for k, v in state.items()), (seed, target.name, mode)
            assert analyze(q).verdict == "clean", (seed, target.name, mode)
