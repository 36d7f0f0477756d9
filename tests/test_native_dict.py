"""The C dict builder (ws_kv_build_dict) behind native.KVReplayer.finish.

Same dict, order, decode calls and exceptions as PyKVReplayer through every
path (C in one go, with and without the prefault helper and the dict table's
read-ahead, C in chunks, C failing part way then Python, the exported blob);
exact reference counts; no leaks; callable from any thread; the new objects'
memory populated ahead on Linux, and given back to the system when they are
freed; the dict layout the read-ahead relies on checked, and a wrong one
refused.
"""

from __future__ import annotations

import gc
import os
import platform
import re
import sys
import sysconfig
import threading
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from native_support import frame, outcome, require_native

from walstore import format as fmt
from walstore.kvreplay import PyKVReplayer

PUT, DELETE = fmt.OP_PUT, fmt.OP_DELETE
BYTES, TEXT, CODEC = fmt.VALUE_BYTES, fmt.VALUE_STR, fmt.VALUE_CODEC


@pytest.fixture(scope="module")
def native() -> Any:
    return require_native()


class _FailAfter:
    """Stands in for the compiled lib: ws_kv_build_dict does `keys` keys, then reports FAILED."""

    def __init__(self, lib: Any, keys: int) -> None:
        self._lib = lib
        self._left = keys

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)

    def ws_kv_build_dict(self, kv: Any, d: int, codec_keys: int, cursor: Any, limit: int, flags: int) -> int:
        n = min(limit, self._left)
        rc = self._lib.ws_kv_build_dict(kv, d, codec_keys, cursor, n, flags) if n else self._lib.WS_KV_DICT_MORE
        self._left -= n
        if rc == self._lib.WS_KV_DICT_MORE and self._left == 0:
            return int(self._lib.WS_KV_DICT_FAILED)
        return int(rc)


MODES = ["c", "c-no-prefault", "c-no-prefetch", "c-chunks", "c-fails-after-2", "blob"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest, native: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which way finish builds the dict: each must give the reference's outcome."""
    if request.param == "c-no-prefault":
        monkeypatch.setattr(native, "PREFAULT_OBJECTS", False)
    elif request.param == "c-no-prefetch":
        monkeypatch.setattr(native, "PREFETCH_TABLE", False)
    elif request.param == "c-chunks":
        monkeypatch.setattr(native, "_DICT_CHUNK", 2)
    elif request.param == "c-fails-after-2":
        monkeypatch.setattr(native, "_lib", _FailAfter(native._lib, 2))
    elif request.param == "blob":
        monkeypatch.setattr(native, "_DICT_IN_C", False)
    return str(request.param)


def log_of(*ops: bytes) -> bytes:
    return b"".join(frame(fmt.REC_COMMIT, i + 1, i, op) for i, op in enumerate(ops))


def put(key: bytes, value: bytes, key_str: bool = False, kind: int = BYTES) -> bytes:
    return fmt.encode_op(PUT, fmt.op_flags(key_str, kind), key, value)


def both(native: Any, log: bytes) -> tuple[tuple[Any, ...], list[bytes], tuple[Any, ...], list[bytes]]:
    """(outcome, decode calls) of PyKVReplayer then of the C replayer, on one log."""
    results = []
    for r in (PyKVReplayer(), native.KVReplayer()):
        calls: list[bytes] = []

        def decode(data: bytes, calls: list[bytes] = calls) -> Any:
            calls.append(data)
            if data.startswith(b"!"):
                raise ValueError(f"cannot decode {data!r}")
            return ("decoded", data)

        r.apply_range(log, 0, len(log))
        results.append((outcome(lambda r=r, d=decode: r.finish(d)), calls))
    (want, want_calls), (got, got_calls) = results
    return want, want_calls, got, got_calls


def assert_same(native: Any, log: bytes) -> tuple[Any, ...]:
    want, want_calls, got, got_calls = both(native, log)
    assert got == want
    assert got_calls == want_calls
    return want


def test_kinds_and_key_types(native: Any, mode: str) -> None:
    log = log_of(
        put(b"k1", b"bytes"),
        put(b"k1", "t\u00e9xt".encode(), key_str=True, kind=TEXT),  # a str key: another key
        put("cl\u00e9".encode(), b"[1]", key_str=True, kind=CODEC),
        put(b"", b""),
        put(b"e", b"", key_str=True, kind=TEXT),
        put(b"c2", b"{}", kind=CODEC),
        fmt.encode_op(DELETE, 0, b"k1"),
        put(b"k1", b"last"),
    )
    result = assert_same(native, log)
    assert result == (
        "ok",
        [
            ("k1", "t\u00e9xt"),
            ("cl\u00e9", ("decoded", b"[1]")),
            (b"", b""),
            ("e", ""),
            (b"c2", ("decoded", b"{}")),
            (b"k1", b"last"),
        ],
    )


@pytest.mark.parametrize(
    "bad",
    [
        put(b"\xff\xfe", b"v", key_str=True),  # key not UTF-8
        put(b"k", b"\xc3", kind=TEXT),  # value cut inside a character
        put(b"k", b"!boom", kind=CODEC),  # decode raises
        put(b"\xed\xa0\x80", b"v", key_str=True),  # a surrogate: strict UTF-8 refuses it
    ],
)
def test_errors_and_decode_calls_match(native: Any, mode: str, bad: bytes) -> None:
    """A failure after codec values: the same decode calls, in order, then the same exception."""
    log = log_of(
        put(b"a", b"[1]", kind=CODEC),
        put(b"b", b"x"),
        put(b"c", b"[2]", kind=CODEC),
        bad,
        put(b"d", b"[3]", kind=CODEC),
        put(b"e", b"\xff", key_str=True),
    )
    result = assert_same(native, log)
    assert result[0] == "raised"


def test_codec_failure_before_utf8_failure(native: Any, mode: str) -> None:
    """The first failing key in dict order decides the exception, as in the reference."""
    log = log_of(put(b"a", b"!first", kind=CODEC), put(b"\xff", b"v", key_str=True))
    assert assert_same(native, log)[:2] == ("raised", ValueError)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from([PUT, PUT, PUT, DELETE]),
            st.binary(max_size=3),
            st.booleans(),
            st.sampled_from([BYTES, TEXT, CODEC]),
            st.sampled_from([b"", b"v", b"\xc3\xa9", b"\xff", b"!x", b"[1]", b"x" * 300]),
        ),
        max_size=40,
    ),
    mode_name=st.sampled_from(MODES),
)
def test_random_ops(native: Any, ops: list[tuple[int, bytes, bool, int, bytes]], mode_name: str) -> None:
    encoded = [
        fmt.encode_op(op, fmt.op_flags(key_str, kind if op == PUT else BYTES), k, v if op == PUT else b"")
        for op, k, key_str, kind, v in ops
    ]
    with pytest.MonkeyPatch.context() as mp:
        if mode_name == "c-no-prefault":
            mp.setattr(native, "PREFAULT_OBJECTS", False)
        elif mode_name == "c-no-prefetch":
            mp.setattr(native, "PREFETCH_TABLE", False)
        elif mode_name == "c-chunks":
            mp.setattr(native, "_DICT_CHUNK", 3)
        elif mode_name == "c-fails-after-2":
            mp.setattr(native, "_lib", _FailAfter(native._lib, 2))
        elif mode_name == "blob":
            mp.setattr(native, "_DICT_IN_C", False)
        assert_same(native, log_of(*encoded))


def _mixed_log(n: int) -> bytes:
    ops = []
    for i in range(n):
        kind = (BYTES, TEXT, CODEC)[i % 3]
        ops.append(put(b"key-%06d" % i, b"value-%06d-" % i + b"x" * 40, key_str=i % 2 == 1, kind=kind))
    return log_of(*ops)


def test_reference_counts(native: Any) -> None:
    """Every key and value is held by the dict alone: counts equal the reference's, and are exact."""
    log = _mixed_log(300)
    dicts = []
    for r in (PyKVReplayer(), native.KVReplayer()):
        r.apply_range(log, 0, len(log))
        dicts.append(r.finish(lambda data: ["decoded", data]))
    want, got = dicts
    assert list(got.items()) == list(want.items())
    for d in (want, got):
        keys, values = list(d), list(d.values())
        # 4: the dict, the list, the loop variable, the argument
        assert {sys.getrefcount(k) for k in keys} == {4}
        assert {sys.getrefcount(v) for v in values} == {4}
    del d, keys, values
    assert sys.getrefcount(got) == sys.getrefcount(want) == 3  # dicts, the name, the argument


@pytest.mark.parametrize("fail", [False, True])
def test_no_leaks(native: Any, fail: bool) -> None:
    """Repeated finishes (and failures part way through) leave no objects behind."""
    log = _mixed_log(2000)
    if fail:
        log += log_of(put(b"\xff", b"v", key_str=True))

    def once() -> None:
        r = native.KVReplayer()
        r.apply_range(log, 0, len(log))
        try:
            d = r.finish(lambda data: ["decoded", data])
        except UnicodeDecodeError:
            assert fail
        else:
            assert not fail and len(d) == 2000
            del d

    once()
    gc.collect()
    tracemalloc.start()
    try:
        once()
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(10):
            once()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 20_000, f"{grown} bytes still allocated after 10 finishes"


def test_finish_in_another_thread(native: Any) -> None:
    """The builder takes the GIL itself (cffi releases it): any Python thread may call finish."""
    log = _mixed_log(500)
    want = PyKVReplayer()
    want.apply_range(log, 0, len(log))
    expected = list(want.finish(bytes).items())
    got: list[Any] = []

    def run() -> None:
        r = native.KVReplayer()
        r.apply_range(log, 0, len(log))
        got.append(list(r.finish(bytes).items()))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [expected] * 4


# The region serves pymalloc's arenas: with PYTHONMALLOC=malloc (or malloc_debug) no arena is
# asked for, and freed objects' memory stays in malloc's heap.
ARENAS = not os.environ.get("PYTHONMALLOC", "").startswith("malloc")


def _arena_stats(native: Any) -> tuple[int, int, int]:
    out = native._ffi.new("uint64_t[3]")
    native._lib.ws_kv_dict_arena_stats(out, out + 1, out + 2)
    return int(out[0]), int(out[1]), int(out[2])


def _populate_write_supported() -> bool:
    """MADV_POPULATE_WRITE came with Linux 5.14."""
    if not sys.platform.startswith("linux"):
        return False
    m = re.match(r"(\d+)\.(\d+)", platform.release())  # "6.18.44-fc", "5.15rc1", ...
    return m is not None and (int(m.group(1)), int(m.group(2))) >= (5, 14)


def _big_log(n: int) -> bytes:
    return log_of(*(put(b"k%015d" % i, b"v%099d" % i) for i in range(n)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the populated region is Linux only")
@pytest.mark.skipif(not ARENAS, reason="PYTHONMALLOC=malloc: objects do not come from arenas")
def test_prefault_populates_the_new_objects_memory(native: Any) -> None:
    """On Linux the finish's new objects come from a region populated ahead: the counters
    move by about the objects' size, and the dict is the one built without it."""
    n = 40_000  # about 8 MB of new objects (16-byte keys, 100-byte values)
    log = _big_log(n)
    dicts = []
    for prefault in (False, True):
        native.PREFAULT_OBJECTS = prefault
        try:
            before = _arena_stats(native)
            r = native.KVReplayer()
            r.apply_range(log, 0, len(log))
            dicts.append(list(r.finish(bytes).items()))
            after = _arena_stats(native)
        finally:
            native.PREFAULT_OBJECTS = True
        regions, arenas, populated = (a - b for a, b in zip(after, before))
        if not prefault:
            assert (regions, arenas, populated) == (0, 0, 0)
            continue
        assert regions == 1  # one ws_kv_build_dict call: n is below _DICT_CHUNK
        objects = n * (64 + 144)  # pymalloc size classes of a 16-byte and a 100-byte bytes object
        # new arenas for all but what free pools of earlier objects take (under 2 MiB here)
        assert objects // (1 << 20) - 2 <= arenas <= objects // (1 << 20) + 2
        if _populate_write_supported():
            # The helper runs alongside, and is stopped when the call ends: how far it got is
            # timing (the arena count above is not); at most the estimate, rounded up to 1 MiB.
            assert 0 < populated <= objects * 1.1 + (3 << 20)
    assert dicts[0] == dicts[1] and len(dicts[1]) == n


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.skipif(not ARENAS, reason="PYTHONMALLOC=malloc: objects do not come from arenas")
def test_prefaulted_objects_memory_goes_back_to_the_system(native: Any) -> None:
    """Arenas from the populated region are ordinary mappings: freed with the dict (pymalloc
    unmaps empty arenas), and the region's unused end is unmapped when the finish ends.

    A first finish sets the process's high-water marks (the dict's tables stay in malloc's
    heap: about 19 MiB here, with or without the region); five more must not add to them."""
    log = _big_log(200_000)  # about 40 MB of new objects per finish

    def once() -> int:
        r = native.KVReplayer()
        r.apply_range(log, 0, len(log))
        d = r.finish(bytes)
        assert len(d) == 200_000
        held = _rss()
        del d, r
        gc.collect()
        return held

    once()
    base = _rss()
    after = []
    for _ in range(5):
        held = once()
        after.append(_rss() - base)
    # the objects were there: 41.6 MB of them, some in free pools that earlier tests in this
    # process left in pymalloc's arenas (30 MiB failed after test_native_kv.py's tests)
    assert held - base > 20 << 20
    assert max(after) < 8 << 20, f"RSS above the first finish's, MiB: {[a >> 20 for a in after]}"


# The read-ahead of the dict's table needs CPython's dict layout: known for 3.10 to 3.13 on
# 64-bit builds with the GIL and without debug options (kvdict.c). Elsewhere nothing is read.
KNOWN_LAYOUT = (
    sys.implementation.name == "cpython"
    and sys.maxsize > 2**32
    and (3, 10) <= sys.version_info[:2] <= (3, 13)
    and not hasattr(sys, "gettotalrefcount")
    and not sysconfig.get_config_var("Py_GIL_DISABLED")
)


def _layout(native: Any, layout: int) -> tuple[int, int]:
    batches = native._ffi.new("uint64_t *")
    rc = native._lib.ws_kv_dict_layout(layout, batches)
    return int(rc), int(batches[0])


def test_dict_layout_is_checked_before_use(native: Any) -> None:
    """The layout in use is this Python's, its checks pass, and the other layout's fail: a
    layout that does not hold is refused before anything is read through it."""
    in_use, _ = _layout(native, 0)
    if not KNOWN_LAYOUT:
        assert in_use == -1
        assert _layout(native, 10)[0] == _layout(native, 11)[0] == -1  # no checks compiled in
        return
    want = 10 if sys.version_info[:2] == (3, 10) else 11
    assert in_use == want
    assert _layout(native, want)[0] == 1
    assert _layout(native, 21 - want)[0] == 0


@pytest.mark.parametrize("key_str", [False, True], ids=["bytes-keys", "str-keys"])
def test_table_read_ahead_changes_nothing(native: Any, key_str: bool) -> None:
    """With and without the read-ahead, the same dict in the same order as the reference's,
    through every resize up to 4-byte indices (over 65,536 slots), with deleted and re-put
    keys; and where the layout is known the read-ahead really ran."""
    n = 50_000
    ops = [put(b"key-%07d" % i, b"value-%d" % i, key_str=key_str) for i in range(n)]
    ops += [fmt.encode_op(DELETE, fmt.op_flags(key_str, BYTES), b"key-%07d" % i, b"") for i in range(0, n, 7)]
    ops += [put(b"key-%07d" % i, b"again-%d" % i, key_str=key_str) for i in range(0, n, 14)]
    log = log_of(*ops)
    want = PyKVReplayer()
    want.apply_range(log, 0, len(log))
    expected = list(want.finish(bytes).items())
    assert len(expected) == n - len(range(0, n, 7)) + len(range(0, n, 14))
    for prefetch in (False, True):
        native.PREFETCH_TABLE = prefetch
        try:
            before = _layout(native, 0)[1]
            r = native.KVReplayer()
            r.apply_range(log, 0, len(log))
            got = list(r.finish(bytes).items())
            batches = _layout(native, 0)[1] - before
        finally:
            native.PREFETCH_TABLE = True
        assert got == expected
        # 256 keys a batch; the first goes into the empty dict's shared table (too small for a view)
        assert batches == (-(-len(expected) // 256) - 1 if prefetch and KNOWN_LAYOUT else 0)
