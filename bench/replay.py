"""Replay benchmark: the C replayer against pure Python, the dict-building floor, and sqlite3.

One run writes a store's segment files (N keys of 16 bytes, 100-byte values,
from 2N puts and deletes, one op per COMMIT, 64 MiB segments chained by
first_seq / prev_seq / prev_size) and an sqlite3 table of the same final
rows, then times, on the same warm files:

  c        what open() runs: replay.inspect_log (headers, the segment chain, each
           segment scanned in C, the next one in a helper thread while this one
           is applied) into native.KVReplayer, then its finish
  python   reader.scan_records + kvreplay.PyKVReplayer over the same maps
  floor    dict(zip(keys, values)) from lists of the final key and value bytes
  floor+   dict(struct.iter_unpack(...)): making those bytes objects from one
           contiguous buffer, and the dict (the fastest way we found from
           Python; the C path makes them with the C API, from the maps)
  sqlite3  dict(SELECT k, v) from a table written beforehand

Usage: python bench/replay.py [--keys N] [--repeat R] [--new-processes P] [--dir DIR]
Each figure is the best of R runs (the Python path runs once), in wall and CPU time.
The C path and the floor run side by side, one after the other in each of R rounds,
and the ratio of each round is printed too, with their median: the machine's speed
drifts between rounds, much less within one. Then P new processes each time their first
replay, as an application's open() at start-up, and the floor for the dict it built.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import shutil
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from walstore import format as fmt  # noqa: E402
from walstore import native, reader  # noqa: E402
from walstore import replay as log_replay  # noqa: E402
from walstore.kvreplay import PyKVReplayer  # noqa: E402

KEY_SIZE = 16
VALUE_SIZE = 100
SEGMENT_BYTES = 64 << 20
STORE_ID = bytes(range(16))


def key(i: int) -> bytes:
    return b"k%015d" % i


def schedule(n: int) -> list[tuple[int, int, int]]:
    """2n operations (op, key number, value number) leaving exactly keys 0..n-1.

    Puts of 1.25n keys, then 0.75n more ops: two in three overwrite a random
    key below n, one in three deletes one of the 0.25n keys above it.
    """
    extra = n // 4
    ops = [(fmt.OP_PUT, i, i) for i in range(n + extra)]
    state = 12345
    deleted = 0
    while len(ops) < 2 * n:
        state = (state * 6364136223846793005 + 1442695040888963407) & ((1 << 64) - 1)
        if len(ops) % 3 == 2 and deleted < extra:
            ops.append((fmt.OP_DELETE, n + deleted, 0))
            deleted += 1
        else:
            ops.append((fmt.OP_PUT, (state >> 33) % n, len(ops)))
    while deleted < extra:  # n too small for the interleave: delete the rest at the end
        ops.append((fmt.OP_DELETE, n + deleted, 0))
        deleted += 1
    return ops


def value_pool() -> bytes:
    return os.urandom(1 << 20)


def value(pool: bytes, number: int) -> bytes:
    at = (number * 7919) % (len(pool) - VALUE_SIZE)
    return pool[at : at + VALUE_SIZE]


def write_segments(directory: str, ops: list[tuple[int, int, int]], pool: bytes) -> list[str]:
    """Segment files as the writer lays them out; returns their paths in order."""
    paths: list[str] = []
    chunks: list[bytes] = []
    size = 0
    prev_seq = prev_size = 0
    first_seq = 1

    def seal() -> None:
        nonlocal size
        path = os.path.join(directory, fmt.segment_name(first_seq))
        with open(path, "wb") as f:
            f.write(b"".join(chunks))
        paths.append(path)
        size = 0

    header = fmt.FileHeader(fmt.KIND_SEGMENT, STORE_ID, first_seq, prev_seq, prev_size).encode()
    chunks, size = [header], len(header)
    for seq, (op, k, v) in enumerate(ops, start=1):
        payload = fmt.encode_op(op, 0, key(k), value(pool, v) if op == fmt.OP_PUT else b"")
        rec = fmt.encode_frame(fmt.REC_COMMIT, seq, seq - 1, payload)
        if size + len(rec) > SEGMENT_BYTES:
            sealed_size = size
            seal()
            prev_seq, prev_size, first_seq = seq - 1, sealed_size, seq
            header = fmt.FileHeader(fmt.KIND_SEGMENT, STORE_ID, first_seq, prev_seq, prev_size).encode()
            chunks, size = [header], len(header)
        chunks.append(rec)
        size += len(rec)
    last = len(ops)
    chunks.append(fmt.encode_frame(fmt.REC_CLOSE, last, last, b""))
    seal()
    return paths


def final_rows(ops: list[tuple[int, int, int]], pool: bytes) -> tuple[list[bytes], list[bytes]]:
    """The final state's keys and values, in dict order."""
    state: dict[int, int] = {}
    for op, k, v in ops:
        if op == fmt.OP_PUT:
            state[k] = v
        else:
            del state[k]
    return [key(k) for k in state], [value(pool, v) for v in state.values()]


def fresh_copies(keys: list[bytes]) -> list[bytes]:
    """New bytes objects equal to `keys`, so that none has its hash cached yet, as replay's
    keys have not. (`bytes(k)` of a bytes object is that object itself.)"""
    return [bytes(memoryview(k)) for k in keys]


def write_sqlite(path: str, keys: list[bytes], values: list[bytes]) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")
    conn.executemany("INSERT INTO kv VALUES (?, ?)", zip(keys, values, strict=True))
    conn.commit()
    conn.close()


def replay(
    paths: list[str], scan: Callable[..., reader.ScanResult], replayer: Any, phases: dict[str, float]
) -> dict[Any, Any]:
    """Open, map, scan and replay every segment, build the dict, close the maps; phase times go to `phases`."""
    maps = []
    t_scan = t_apply = 0.0
    for path in paths:
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        maps.append(mm)
        head = fmt.decode_file_header(mm[: fmt.FILE_HEADER_SIZE])
        result = scan(mm, fmt.FILE_HEADER_SIZE, head.first_seq, reader.SEGMENT_TYPES)
        if result.damage is not None:
            raise SystemExit(f"{path}: unexpected damage {result.damage} at {result.end}")
        t1 = time.perf_counter()
        replayer.apply_range(mm, fmt.FILE_HEADER_SIZE, result.end)
        t_scan += t1 - t0
        t_apply += time.perf_counter() - t1
    t0 = time.perf_counter()
    state: dict[Any, Any] = replayer.finish(bytes)
    t1 = time.perf_counter()
    for mm in maps:
        mm.close()
    phases.update(scan=t_scan, apply=t_apply, finish=t1 - t0, close=time.perf_counter() - t1)
    return state


def replay_as_open(directory: str, phases: dict[str, float]) -> dict[Any, Any]:
    """The C path as `open()` runs it (replay.inspect_log with scan_ahead, then finish)."""
    replayer = native.KVReplayer()
    maps: list[Any] = []
    t0 = time.perf_counter()
    state = log_replay.inspect_log(directory, STORE_ID, 0, replayer, maps, scan_ahead=True)
    if state.torn is not None:
        raise SystemExit(f"unexpected torn tail {state.torn}")
    t1 = time.perf_counter()
    out: dict[Any, Any] = replayer.finish(bytes)
    t2 = time.perf_counter()
    for mm in maps:
        mm.close()
    phases.update(log=t1 - t0, finish=t2 - t1, close=time.perf_counter() - t2)
    return out


def read_sqlite(path: str) -> dict[Any, Any]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT k, v FROM kv"))
    finally:
        conn.close()


CPU: dict[str, float] = {}
"""Best CPU time (time.process_time) of each figure, by name: steadier than wall time
on a machine shared with other work."""


def best(name: str, fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """The fastest wall time of `repeat` runs and the last result; the fastest CPU time goes to CPU."""
    times = []
    cpu = []
    result = None
    for _ in range(repeat):
        result = None
        gc.collect()
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    CPU[name] = min(cpu)
    return min(times), result


def first_replay_here(directory: str) -> dict[str, float]:
    """(In a new process) the C path's replay, the first in this process as at start-up, then
    the floor for the dict it built, side by side: wall seconds."""
    phases: dict[str, float] = {}
    gc.collect()
    t0 = time.perf_counter()
    state = replay_as_open(directory, phases)
    wall = time.perf_counter() - t0
    keys, values = list(state), list(state.values())
    del state
    fresh = fresh_copies(keys)
    gc.collect()
    t0 = time.perf_counter()
    d = dict(zip(fresh, values, strict=True))
    floor = time.perf_counter() - t0
    assert len(d) == len(keys)
    return {"c": wall, "log": phases["log"], "finish": phases["finish"], "floor": floor}


def first_replay_in_new_process(directory: str) -> dict[str, float]:
    """first_replay_here, run in a new Python process (as an application's open() at start-up)."""
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--first-replay-here", directory],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(out.splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys in the final state (1000000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure, best taken (default 3)")
    parser.add_argument("--dir", help="where to write the files (default: a new temporary directory)")
    parser.add_argument(
        "--new-processes", type=int, default=3, help="first replays timed each in a new process (default 3)"
    )
    parser.add_argument("--first-replay-here", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.first_replay_here:
        print(json.dumps(first_replay_here(args.first_replay_here)))
        return
    if not native.BUILT:
        raise SystemExit("the C replayer is not built: pip install -e . (needs a C compiler)")
    n = args.keys
    directory = args.dir or tempfile.mkdtemp(prefix="walstore-bench-")
    os.makedirs(directory, exist_ok=True)
    try:
        t0 = time.perf_counter()
        ops = schedule(n)
        pool = value_pool()
        paths = write_segments(directory, ops, pool)
        keys, values = final_rows(ops, pool)
        db = os.path.join(directory, "kv.sqlite3")
        write_sqlite(db, keys, values)
        total = sum(os.path.getsize(p) for p in paths)
        os.sync()  # the files' writeback done before anything is timed: the first round's C run
        # (the first in the process, as open() is) would otherwise share the machine with it
        print(
            f"wrote {len(ops):,} ops ({n:,} final keys) in {len(paths)} segments, {total / 2**20:.0f} MiB,"
            f" and sqlite3 in {time.perf_counter() - t0:.1f} s; crc32c: {native.crc32c_impl()}"
        )

        # The C path and the floor run side by side, round by round (C, then the floor), so
        # that each round's ratio compares two runs seconds apart: this machine's speed drifts
        # by more than the target's margin over the minutes the other paths take. New key
        # objects for every floor run (made outside the timing): their hashes are not cached
        # yet, as replay's keys' are not. (Reusing one list, as before 2026-11-26, gave runs 2
        # and 3 cached hashes, and the floor was their time; so did the `[bytes(k) for k in
        # keys]` that replaced it, until fresh_copies, since bytes(k) of a bytes object is that
        # same object.)
        c_runs: list[dict[str, float]] = []
        timed: dict[str, list[tuple[float, float]]] = {"c": [], "floor": []}  # (wall, cpu) per round
        d_c: dict[Any, Any] = {}
        d_floor: dict[Any, Any] = {}
        for _ in range(args.repeat):
            d_c = d_floor = {}
            gc.collect()
            c_runs.append({})
            c0, t0 = time.process_time(), time.perf_counter()
            d_c = replay_as_open(directory, c_runs[-1])
            timed["c"].append((time.perf_counter() - t0, time.process_time() - c0))
            fresh = fresh_copies(keys)
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            d_floor = dict(zip(fresh, values, strict=True))
            timed["floor"].append((time.perf_counter() - t0, time.process_time() - c0))
            del fresh
        for name, runs in timed.items():
            CPU[name] = min(cpu for _, cpu in runs)
        t_c, t_floor = min(w for w, _ in timed["c"]), min(w for w, _ in timed["floor"])
        round_ratios = [c / f for (c, _), (f, _) in zip(timed["c"], timed["floor"])]
        py_phases: dict[str, float] = {}
        t_py, d_py = best("python", lambda: replay(paths, reader.scan_records, PyKVReplayer(), py_phases), 1)
        assert list(d_c.items()) == list(d_py.items()), "C and Python replay disagree"
        del d_py
        flat = b"".join(k + v for k, v in zip(keys, values, strict=True))
        layout = f"{KEY_SIZE}s{VALUE_SIZE}s"

        def floor_plus() -> dict[bytes, bytes]:
            """The fastest way we know to make the key and value objects from bytes, then the dict."""
            return dict(struct.iter_unpack(layout, flat))

        t_floor_plus, _ = best("floor+", floor_plus, args.repeat)
        t_sql, d_sql = best("sqlite3", lambda: read_sqlite(db), args.repeat)
        assert d_c == d_floor == d_sql, "the dicts differ"
        assert len(d_c) == n

        walls = {"c": t_c, "python": t_py, "floor": t_floor, "floor+": t_floor_plus, "sqlite3": t_sql}
        print(f"{'path':<10}{'wall s':>10}{'cpu s':>10}")
        for name, t in walls.items():
            print(f"{name:<10}{t:>10.3f}{CPU[name]:>10.3f}")
        c_best = min(c_runs, key=lambda p: sum(p.values()))
        for name, p in (("c", c_best), ("c, first round", c_runs[0]), ("python", py_phases)):
            print(f"{name} phases (wall): " + ", ".join(f"{k} {v:.3f} s" for k, v in p.items()))

        def ratio(a: str, b: str) -> str:
            return f"{walls[a] / walls[b]:.2f}x (cpu {CPU[a] / CPU[b]:.2f}x)"

        print(f"C vs Python: {ratio('python', 'c')} faster (target >= 10x)")
        print(f"C vs floor: {ratio('c', 'floor')} the floor's time (target <= 2x), best of each")
        firsts = [first_replay_in_new_process(directory) for _ in range(args.new_processes)]
        rounds = ", ".join(f"{r:.2f}x" for r in round_ratios)
        print(
            f"C vs floor, round by round: median {statistics.median(round_ratios):.2f}x ({rounds});"
            " the first round's C run is the first in this process"
        )
        if firsts:
            each = ", ".join(f"{f['c'] / f['floor']:.2f}x ({f['log']:.3f} + {f['finish']:.3f} s)" for f in firsts)
            median = statistics.median(f["c"] / f["floor"] for f in firsts)
            print(f"C vs floor, first replay in a new process (as open() at start-up): median {median:.2f}x; {each}")
        print(f"C vs floor+: {ratio('c', 'floor+')} its time")
        print(f"C vs sqlite3: {ratio('sqlite3', 'c')} faster")
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
