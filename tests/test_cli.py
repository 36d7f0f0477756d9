"""The `walstore` command, run as an installed console script on stores damaged in each way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import pytest

import walstore
from walstore import core, recover, replay
from walstore import format as fmt

ROOT = Path(__file__).resolve().parent.parent
SEG = 4096


def command() -> tuple[list[str], dict[str, str]]:
    """The installed console script; `python -m walstore` from this checkout only if it is missing."""
    env = dict(os.environ)
    env.pop("WALSTORE_FAILPOINT", None)
    exe = shutil.which("walstore")
    if exe:
        return [exe], env
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return [sys.executable, "-m", "walstore"], env


def wal(*args: object, stdin: Optional[str] = None) -> subprocess.CompletedProcess[str]:
    cmd, env = command()
    return subprocess.run(
        cmd + [str(a) for a in args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---- stores and damage ---------------------------------------------------------------


def value(i: int) -> dict[str, Any]:
    return {"i": i, "pad": "x" * 30}


def expected(upto: int) -> dict[str, Any]:
    return {f"k{i}": value(i) for i in range(1, upto + 1)}


def build(path: Path, n: int = 100, *, close: bool = True) -> Path:
    """Keys k1..kn (commit i sets k{i}) in 3 segments; closed, or the image a crash would leave."""
    db = walstore.open(path, segment_size=SEG)
    for i in range(1, n + 1):
        db[f"k{i}"] = value(i)
    if close:
        db.close()
        return path
    image = path.with_name(path.name + "-crash")
    shutil.copytree(path, image)
    db.close()
    shutil.rmtree(path)
    image.rename(path)
    return path


def segments(path: Path) -> list[Path]:
    return [Path(p) for _s, p in replay.list_segments(str(path))]


def records(seg: Path) -> list[tuple[int, int, int, int]]:
    """(offset, size, seq, type) of each valid record."""
    data = seg.read_bytes()
    first = fmt.decode_file_header(data[:64]).first_seq
    out: list[tuple[int, int, int, int]] = []
    recover.walk_segment(data, 64, first, lambda r: out.append((r.offset, r.size, r.seq, r.rtype)), None, resync=False)
    return out


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip(path: Path, offset: int) -> None:
    b = path.read_bytes()[offset]
    patch(path, offset, bytes([b ^ 0x04]))


def snapshot_files(path: Path) -> dict[str, bytes]:
    return {
        str(f.relative_to(path)): f.read_bytes()
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != fmt.LOCK_NAME
    }


def open_state(path: Path) -> dict[Any, Any]:
    with walstore.open(path, create=False) as db:
        return db.to_dict()


def quarantine_reports(path: Path) -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in sorted((path / "quarantine").rglob("report.json"))]


# ---- each kind of damage --------------------------------------------------------------


def test_clean_store(tmp_path: Path) -> None:
    p = build(tmp_path / "s")
    v = wal("verify", p)
    assert v.returncode == 0, v.stderr
    assert "clean (closed cleanly at seq 100)" in v.stdout
    info = wal("info", p)
    assert info.returncode == 0
    for text in ("format       version 1", "snapshot     none", "100 keys", "seq 1..", "clean, closed"):
        assert text in info.stdout
    assert f"replayer     {walstore.backend()}" in info.stdout or "replayer     " in info.stdout
    doc = json.loads(wal("info", p, "--json").stdout)
    assert doc["verdict"] == "clean" and doc["state"]["keys"] == 100 and doc["format_version"] == 1
    assert doc["backend"] in ("c", "python")
    r = wal("recover", p, "--yes")
    assert r.returncode == 0 and "nothing to recover" in r.stdout
    assert not (p / "quarantine").exists()


def test_info_shows_the_prepared_next_segment(tmp_path: Path) -> None:
    """prealloc.ready is named in `info` (text and JSON) as not part of the state."""
    p = tmp_path / "s"
    with walstore.open(p, segment_size=1 << 20) as db:
        for i in range(600):  # past half the segment: the next one is prepared
            db[f"k{i}"] = b"v" * 1000
        thread = db._writer._prealloc_thread
        if thread is not None:
            thread.join()
    assert (p / fmt.PREALLOC_READY_NAME).exists()
    info = wal("info", p)
    assert info.returncode == 0, info.stderr
    assert "prepared     prealloc.ready  1,048,576 B" in info.stdout and "not part of the state" in info.stdout
    assert json.loads(wal("info", p, "--json").stdout)["prepared_segment_bytes"] == 1 << 20
    (p / fmt.PREALLOC_READY_NAME).unlink()
    assert "prepared     " not in wal("info", p).stdout
    assert json.loads(wal("info", p, "--json").stdout)["prepared_segment_bytes"] is None


def test_truncated_file(tmp_path: Path) -> None:
    p = build(tmp_path / "s", close=False)
    seg = segments(p)[-1]
    off, size, seq, _t = records(seg)[-1]
    with open(seg, "r+b") as f:
        f.truncate(off + size // 2)
    torn = seg.read_bytes()[off:]
    v = wal("verify", p)
    assert v.returncode == 1, v.stdout + v.stderr
    assert "TORN TAIL" in v.stdout
    doc = json.loads(wal("verify", p, "--json").stdout)
    assert doc["exit_code"] == 1 and doc["damage"]["kind"] == "torn-tail" and doc["damage"]["seq"] == seq
    r = wal("recover", p, "--yes", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    (cut,) = report["actions"]
    assert cut["action"] == "cut" and cut["segment"] == seg.name and cut["offset"] == off
    saved = (p / cut["saved_as"]).read_bytes()
    assert len(saved) == cut["bytes"] > 0 and saved == torn[: len(saved)]
    assert open_state(p) == expected(seq - 1)
    assert quarantine_reports(p)[0]["status"] == "done"
    assert wal("verify", p).returncode == 0


def test_flipped_bit_mid_log(tmp_path: Path) -> None:
    p = build(tmp_path / "s")
    seg = segments(p)[1]
    off, _size, seq, _t = records(seg)[5]
    flip(seg, off + 40)
    v = wal("verify", p)
    assert v.returncode == 2
    assert f"bad-crc in {seg.name} at offset {off} (sequence number {seq})" in v.stdout
    before = snapshot_files(p)
    r = wal("recover", p, "--yes")  # default mode: torn tail only
    assert r.returncode == 2
    assert "refusing" in one_line_error(r) and "last-consistent" in r.stderr
    assert snapshot_files(p) == before
    dry = wal("recover", p, "--mode", "last-consistent", "--dry-run")
    assert dry.returncode == 0 and "dry run: nothing changed" in dry.stdout and "DATA LOSS" in dry.stderr
    assert snapshot_files(p) == before
    r = wal("recover", p, "--mode", "last-consistent", "--yes")
    assert r.returncode == 0, r.stderr
    assert "DATA LOSS" in r.stderr
    assert open_state(p) == expected(seq - 1)
    (report,) = quarantine_reports(p)
    assert report["dropped"]["seq_ranges"] == [[seq, 100]]
    assert {a["action"] for a in report["actions"]} == {"cut", "move"}
    for a in report["actions"]:
        assert (p / a["saved_as"]).exists()
        assert {"segment", "offset", "bytes", "records", "seq_range", "reason"} <= set(a)


def test_flipped_bit_mid_log_skip_damaged(tmp_path: Path) -> None:
    p = build(tmp_path / "s")
    seg = segments(p)[1]
    off, _size, seq, _t = records(seg)[5]
    flip(seg, off + 40)
    r = wal("recover", p, "--mode", "skip-damaged", "--yes")
    assert r.returncode == 0, r.stderr
    assert "DATA LOSS: 1 COMMIT (sequence number " in r.stderr and "NEW SEQUENCE NUMBERS" in r.stderr
    state = open_state(p)
    assert state == {k: v for k, v in expected(100).items() if k != f"k{seq}"}
    assert wal("verify", p).returncode == 0


def test_flipped_bit_in_last_record_of_closed_log(tmp_path: Path) -> None:
    p = build(tmp_path / "s")
    seg = segments(p)[-1]
    recs = records(seg)
    assert recs[-1][3] == fmt.REC_CLOSE
    off, _size, seq, _t = recs[-2]  # the last COMMIT: the CLOSE record's watermark proves it was synced
    flip(seg, off + 36)
    v = wal("verify", p)
    assert v.returncode == 2 and "durable watermark (100)" in v.stdout
    assert wal("recover", p, "--yes").returncode == 2
    r = wal("recover", p, "--mode", "last-consistent", "--yes")
    assert r.returncode == 0, r.stderr
    assert open_state(p) == expected(99)


def test_flipped_bit_in_close_record_is_a_torn_tail(tmp_path: Path) -> None:
    p = build(tmp_path / "s")
    seg = segments(p)[-1]
    off, _size, _seq, rtype = records(seg)[-1]
    assert rtype == fmt.REC_CLOSE
    flip(seg, off + 20)
    assert wal("verify", p).returncode == 1  # nothing after it proves the CLOSE was synced
    assert wal("recover", p, "--yes").returncode == 0
    assert open_state(p) == expected(100)


def test_garbage_appended(tmp_path: Path) -> None:
    p = build(tmp_path / "s")
    seg = segments(p)[-1]
    garbage = bytes(range(7, 207))
    with open(seg, "ab") as f:
        f.write(garbage)
    v = wal("verify", p)
    assert v.returncode == 1, v.stdout
    r = wal("recover", p, "--yes", "--json")
    assert r.returncode == 0, r.stderr
    (cut,) = json.loads(r.stdout)["actions"]
    assert (p / cut["saved_as"]).read_bytes().rstrip(b"\0").endswith(garbage)
    assert open_state(p) == expected(100)


def test_zero_filled_tail(tmp_path: Path) -> None:
    p = build(tmp_path / "s", close=False)
    seg = segments(p)[-1]
    recs = records(seg)
    off, size, seq, _t = recs[-2]
    end = recs[-1][0] + recs[-1][1]
    patch(seg, off + size // 2, bytes(end - off - size // 2))
    v = wal("verify", p)
    assert v.returncode == 1, v.stdout
    assert wal("recover", p, "--yes").returncode == 0
    assert open_state(p) == expected(seq - 1)


def test_segment_from_another_store(tmp_path: Path) -> None:
    p = build(tmp_path / "s")
    other = build(tmp_path / "other", n=10)
    foreign = segments(other)[0]
    intruder = p / fmt.segment_name(101)
    shutil.copyfile(foreign, intruder)
    v = wal("verify", p)
    assert v.returncode == 2 and "foreign-store" in v.stdout
    assert wal("recover", p, "--yes").returncode == 2
    r = wal("recover", p, "--mode", "last-consistent", "--yes", "--json")
    assert r.returncode == 0, r.stderr
    (move,) = json.loads(r.stdout)["actions"]
    assert move["action"] == "move" and move["reason"] == "belongs to another store"
    assert (p / move["saved_as"]).read_bytes() == foreign.read_bytes()
    assert not intruder.exists()
    assert open_state(p) == expected(100)


def test_missing_middle_segment(tmp_path: Path) -> None:
    p = build(tmp_path / "s")
    segs = segments(p)
    first_lost = fmt.decode_file_header(segs[1].read_bytes()[:64]).first_seq
    resume = fmt.decode_file_header(segs[2].read_bytes()[:64]).first_seq
    segs[1].unlink()
    v = wal("verify", p)
    assert v.returncode == 2 and "missing-segment" in v.stdout
    q = tmp_path / "copy"
    shutil.copytree(p, q)
    r = wal("recover", p, "--mode", "last-consistent", "--yes")
    assert r.returncode == 0, r.stderr
    assert open_state(p) == expected(first_lost - 1)
    r = wal("recover", q, "--mode", "skip-damaged", "--yes")
    assert r.returncode == 0, r.stderr
    assert f"sequence numbers {first_lost}..{resume - 1}" in r.stderr
    assert open_state(q) == {k: v for k, v in expected(100).items() if not first_lost <= int(k[1:]) < resume}


def test_locked_store(tmp_path: Path) -> None:
    p = build(tmp_path / "s")
    with walstore.open(p, segment_size=SEG) as db:
        db["more"] = 1
        r = wal("recover", p, "--yes", "--mode", "last-consistent")
        assert r.returncode == 5
        assert f"locked by process {os.getpid()}" in one_line_error(r)
        assert wal("import", p, "-", stdin='{"key": "a", "value": "b"}\n').returncode == 5
        assert wal("verify", p).returncode == 0
        info = wal("info", p)
        assert info.returncode == 0 and f"running: pid {os.getpid()}" in info.stdout
        assert wal("dump", p, "--from", 100).returncode == 0
        exp = wal("export", p)
        assert exp.returncode == 0 and len(exp.stdout.splitlines()) == 101
    assert core.is_locked(str(p)) is False


def test_read_only_commands_while_a_writer_commits(tmp_path: Path) -> None:
    p = tmp_path / "s"
    db = walstore.open(p, segment_size=SEG)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            db[f"w{i}"] = value(i)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(3):
            v = wal("verify", p)
            assert v.returncode == 0, v.stdout + v.stderr
            d = wal("dump", p, "--json")
            assert d.returncode == 0, d.stderr
            for line in d.stdout.splitlines():
                json.loads(line)
    finally:
        stop.set()
        t.join()
        db.close()


# ---- errors and usage ----------------------------------------------------------------


def test_missing_directory_and_not_a_store(tmp_path: Path) -> None:
    r = wal("info", tmp_path / "nope")
    assert r.returncode == 4 and "no such directory" in one_line_error(r)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("hi")
    r = wal("verify", tmp_path / "plain")
    assert r.returncode == 4 and "not a walstore store" in one_line_error(r)
    r = wal("dump", tmp_path / "plain" / "x.txt")
    assert r.returncode == 4 and "not a directory" in one_line_error(r)


def test_newer_format_version(tmp_path: Path) -> None:
    p = build(tmp_path / "s", n=3)
    ident = p / fmt.IDENTITY_NAME
    data = bytearray(ident.read_bytes())
    data[8:10] = (2).to_bytes(2, "little")
    data[60:64] = fmt.crc(bytes(data[:60])).to_bytes(4, "little")
    ident.write_bytes(bytes(data))
    for cmd in ("info", "verify", "dump", "recover"):
        r = wal(cmd, p)
        assert r.returncode == 4, (cmd, r.stderr)
        assert "newer walstore" in one_line_error(r)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_permission_denied(tmp_path: Path) -> None:  # pragma: no cover - not run as root
    p = build(tmp_path / "s", n=3)
    p.chmod(0)
    try:
        r = wal("info", p)
        assert r.returncode == 4 and "permission denied" in one_line_error(r)
    finally:
        p.chmod(0o755)


def test_usage_errors(tmp_path: Path) -> None:
    assert wal().returncode == 3
    assert wal("recover", tmp_path, "--mode", "everything").returncode == 3
    assert wal("dump").returncode == 3
    p = build(tmp_path / "s", close=False)
    seg = segments(p)[-1]
    off, size, _seq, _t = records(seg)[-1]
    with open(seg, "r+b") as f:
        f.truncate(off + size // 2)
    before = snapshot_files(p)
    r = wal("recover", p)  # stdin is not a terminal and there is no --yes
    assert r.returncode == 3 and "--yes" in r.stderr
    assert snapshot_files(p) == before


def test_help_is_usable() -> None:
    r = wal("--help")
    assert r.returncode == 0
    for word in (
        "info",
        "verify",
        "dump",
        "recover",
        "export",
        "import",
        "compact",
        "bench",
        "demo",
        "exit codes",
        "examples",
    ):
        assert word in r.stdout
    r = wal("recover", "--help")
    assert r.returncode == 0
    for mode in recover.MODES:
        assert mode in r.stdout


# ---- dump ------------------------------------------------------------------------------


def test_dump_ranges_text_and_json(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with walstore.open(p, segment_size=SEG) as db:
        for i in range(1, 101):
            db[f"k{i}"] = value(i)
        db[b"\x00raw"] = b"\x01\x02"
        db["long"] = "y" * 500
        del db["k1"]
    r = wal("dump", p, "--from", 40, "--to", 45)
    assert r.returncode == 0
    seqs = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("seq ")]
    assert seqs == list(range(40, 46))
    lines = [json.loads(x) for x in wal("dump", p, "--json", "--from", 101).stdout.splitlines()]
    recs = [x for x in lines if x["type"] in ("commit", "close")]
    assert [x["seq"] for x in recs] == [101, 102, 103, 103]
    put = {"op": "put", "key": {"b64": "AHJhdw=="}, "value": {"b64": "AQI="}, "value_size": 2}
    assert recs[0]["ops"] == [put]
    assert recs[1]["ops"][0]["truncated"] is True
    assert recs[2]["ops"] == [{"op": "delete", "key": "k1"}]
    out = wal("dump", p, "--json", "--full", "--from", 102, "--to", 102).stdout
    full = [json.loads(x) for x in out.splitlines()]
    assert [x for x in full if x["type"] == "commit"][0]["ops"][0]["value"] == "y" * 500
    short = wal("dump", p, "--from", 102, "--to", 102).stdout
    assert "...(+" in short and "y" * 500 not in short


def test_dump_stops_at_damage_and_raw_goes_on(tmp_path: Path) -> None:
    p = build(tmp_path / "s")
    seg = segments(p)[1]
    off, _size, seq, _t = records(seg)[5]
    flip(seg, off + 40)
    r = wal("dump", p)
    assert r.returncode == 2
    assert f"!! DAMAGED @{off}" in r.stdout and "--raw" in r.stdout
    assert f"seq {seq + 1} " not in r.stdout
    raw = wal("dump", p, "--raw")
    assert raw.returncode == 2
    assert "[after damage]" in raw.stdout and f"header reads: commit seq {seq}" in raw.stdout
    seqs = {int(line.split()[1]) for line in raw.stdout.splitlines() if line.startswith("seq ")}
    assert seqs == set(range(1, 101)) - {seq}
    js = [json.loads(x) for x in wal("dump", p, "--raw", "--json").stdout.splitlines()]
    (bad,) = [x for x in js if x["type"] == "damaged"]
    assert bad["offset"] == off and bad["reason"] == "bad-crc" and bad["verdict"] == "corruption"


# ---- export and import ----------------------------------------------------------------


def test_export_import_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    content: dict[Any, Any] = {
        "text": "héllo ✓",
        b"\x00\xffbin": b"\x00\x01\xfe",
        "obj": {"a": [1, 2.5, None, True], "b": "c"},
        "n": 42,
        "str-key-bytes": b"",
        b"bytes-key-str": "",
        "list": ["x"],
    }
    with walstore.open(src, segment_size=SEG) as db:
        for k, v in content.items():
            db[k] = v
    exp = wal("export", src)
    assert exp.returncode == 0, exp.stderr
    lines = [json.loads(x) for x in exp.stdout.splitlines()]
    assert {"key": "n", "value": {"json": 42}} in lines
    assert {"key": {"b64": "AP9iaW4="}, "value": {"b64": "AAH+"}} in lines
    assert {"key": "text", "value": "héllo ✓"} in lines
    dump_file = tmp_path / "x.jsonl"
    dump_file.write_text(exp.stdout)
    dst = tmp_path / "dst"
    imp = wal("import", dst, dump_file, "--batch", 3)
    assert imp.returncode == 0, imp.stderr
    assert "imported 7 records in 3 transactions" in imp.stdout
    assert open_state(dst) == content
    dst2 = tmp_path / "dst2"
    assert wal("import", dst2, "-", stdin=exp.stdout).returncode == 0
    assert open_state(dst2) == content


def test_import_rejects_bad_lines_and_foreign_codecs(tmp_path: Path) -> None:
    bad = wal("import", tmp_path / "d", "-", stdin='{"key": "a", "value": "b"}\n{"key": 1, "value": "x"}\n')
    assert bad.returncode == 4 and "-:2:" in one_line_error(bad)
    src = tmp_path / "pickled"
    with walstore.open(src, codec="pickle") as db:
        db["t"] = (1, 2)
    exp = wal("export", src).stdout
    assert json.loads(exp)["value"]["codec"] == "pickle"
    r = wal("import", tmp_path / "json-store", "-", stdin=exp)
    assert r.returncode == 4 and "codec 'pickle'" in one_line_error(r)
    assert wal("import", tmp_path / "pickle-store", "-", "--codec", "pickle", stdin=exp).returncode == 0
    with walstore.open(tmp_path / "pickle-store", codec="pickle") as db:
        assert db["t"] == (1, 2)


def test_export_of_a_corrupt_store(tmp_path: Path) -> None:
    p = build(tmp_path / "s")
    seg = segments(p)[1]
    off, _size, seq, _t = records(seg)[5]
    flip(seg, off + 40)
    r = wal("export", p)
    assert r.returncode == 2 and "corruption" in one_line_error(r)
    r = wal("export", p, "--prefix")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == seq - 1


# ---- the other commands -------------------------------------------------------------


def test_compact(tmp_path: Path) -> None:
    p = build(tmp_path / "s", n=5)
    r = wal("compact", p)
    if hasattr(walstore.Store, "compact"):
        assert r.returncode == 0, r.stderr
        assert open_state(p) == expected(5)
    else:
        assert r.returncode == 3 and "not available in this version" in one_line_error(r)


def test_bench_is_wired() -> None:
    r = wal("bench", "--help")
    try:
        import walstore.bench  # noqa: F401
    except ImportError:
        assert r.returncode == 3 and "not available" in r.stderr
    else:
        assert r.returncode == 0 and "walstore bench" in r.stdout


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_demo(tmp_path: Path, seed: int) -> None:
    d = tmp_path / "demo"
    r = wal("demo", d, "--seed", seed)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "child: acknowledged seq 1 2 3" in r.stdout
    assert "every acknowledged commit" in r.stdout
    assert len(r.stdout.splitlines()) <= 12
    assert wal("verify", d).returncode == 0
    assert wal("demo", d).returncode == 4  # not an empty directory


def test_progress_bar_only_on_a_terminal() -> None:
    import io

    from walstore.progress import Progress

    quiet = io.StringIO()
    with Progress(100, "scanning", stream=quiet) as bar:
        bar.advance(50)
    assert quiet.getvalue() == ""  # not a terminal: nothing at all
    shown = Progress(1 << 20, "scanning", stream=io.StringIO(), enabled=True)
    shown.advance(1 << 19)
    line = shown.line()
    assert "scanning [" in line and "50.0%" in line and "ETA" in line
    # Stages (walstore bench): the label changes and is drawn at once; estimated work
    # units show no amount, and the count never passes the total.
    out = io.StringIO()
    staged = Progress(10.0, stream=out, enabled=True, show_amount=False)
    staged.begin("raw fdatasync")
    staged.advance(25.0)
    assert "raw fdatasync [" in out.getvalue()
    assert "100.0%" in staged.line() and "/s" not in staged.line()
    staged.close()
    assert out.getvalue().endswith("\r\x1b[K")


def test_snapshots_are_shown_checked_and_a_rejected_one_is_quarantined(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with walstore.open(p, segment_size=SEG, keep_snapshots=2, auto_compact=False) as db:
        for i in range(1, 101):
            db[f"k{i}"] = value(i)
            if i in (40, 80):
                db.compact()
    snaps = sorted(p.glob("snap-*.snap"))
    assert len(snaps) == 2
    info = wal("info", p)
    assert info.returncode == 0 and "the base open() replays" in info.stdout and snaps[-1].name in info.stdout
    assert json.loads(wal("info", p, "--json").stdout)["snapshot"]["name"] == snaps[-1].name
    flip(snaps[-1], snaps[-1].stat().st_size - 20)
    v = wal("verify", p)
    assert v.returncode == 1 and "SNAPSHOT REJECTED" in v.stdout
    r = wal("recover", p, "--yes", "--json")
    assert r.returncode == 0, r.stderr
    (move,) = json.loads(r.stdout)["actions"]
    assert move["segment"] == snaps[-1].name and (p / move["saved_as"]).exists()
    assert wal("verify", p).returncode == 0
    assert open_state(p) == expected(100)


def test_recover_asks_on_a_terminal(tmp_path: Path) -> None:
    import pty

    p = build(tmp_path / "s")
    seg = segments(p)[1]
    off, _size, _seq, _t = records(seg)[5]
    flip(seg, off + 40)
    before = snapshot_files(p)
    cmd, env = command()
    for answer, code in (("n\n", 6), ("y\n", 0)):
        master, slave = pty.openpty()
        try:
            os.write(master, answer.encode())
            proc = subprocess.run(
                cmd + ["recover", str(p), "--mode", "last-consistent"],
                stdin=slave,
                capture_output=True,
                text=True,
                env=env,
                timeout=300,
            )
        finally:
            os.close(slave)
            os.close(master)
        assert "Proceed? [y/N]" in proc.stderr
        assert proc.returncode == code, proc.stderr
        if code == 6:
            assert "nothing was changed" in proc.stderr and snapshot_files(p) == before
    assert wal("verify", p).returncode == 0


def test_recover_dry_run_json(tmp_path: Path) -> None:
    p = build(tmp_path / "s")
    segments(p)[1].unlink()
    before = snapshot_files(p)
    r = wal("recover", p, "--mode", "skip-damaged", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["status"] == "dry run: nothing changed" and plan["damage"]["reason"] == "missing-segment"
    assert plan["salvaged"]["commits"] > 0 and plan["dropped"]["commits"] > 0
    assert snapshot_files(p) == before
