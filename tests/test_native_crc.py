"""The C CRC32C (hardware and table paths) equals the `crc32c` package on every input."""

from __future__ import annotations

import platform
from typing import Any

import crc32c as crc32c_pkg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from native_support import blob, require_native


@pytest.fixture(scope="module")
def native() -> Any:
    return require_native()


def views(data: bytes) -> list[memoryview]:
    """`data` at every alignment: copies into a buffer shifted by 0..7 bytes."""
    out = []
    for shift in range(8):
        raw = bytes(shift) + data
        out.append(memoryview(raw)[shift:])
    return out


def test_check_value(native: Any) -> None:
    assert native.crc32c(b"123456789") == 0xE3069283
    assert native.crc32c_table(b"123456789") == 0xE3069283
    assert native.crc32c(b"") == 0


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=3000), value=st.integers(0, 0xFFFFFFFF))
def test_equals_package(native: Any, data: bytes, value: int) -> None:
    want = crc32c_pkg.crc32c(data, value)
    for view in views(data):
        assert native.crc32c(view, value) == want
        assert native.crc32c_table(view, value) == want


@settings(max_examples=60, deadline=None)
@given(
    size=st.sampled_from([767, 768, 769, 775, 776, 3 * 8192 - 1, 3 * 8192, 3 * 8192 + 13, 6 * 8192 + 768 + 7])
    | st.integers(0, 70000),
    seed=st.integers(0, 1 << 30),
)
def test_long_buffers_and_block_edges(native: Any, size: int, seed: int) -> None:
    """Lengths around the three-stream block sizes (3 x 256 and 3 x 8192 bytes)."""
    data = blob(seed, size)
    want = crc32c_pkg.crc32c(data)
    for view in views(data)[:3]:
        assert native.crc32c(view) == want
        assert native.crc32c_table(view) == want


@settings(max_examples=100, deadline=None)
@given(a=st.binary(max_size=1000), b=st.binary(max_size=1000))
def test_continuation(native: Any, a: bytes, b: bytes) -> None:
    assert native.crc32c(b, native.crc32c(a)) == crc32c_pkg.crc32c(a + b)


def test_buffer_kinds(native: Any) -> None:
    data = bytes(range(256)) * 5
    want = crc32c_pkg.crc32c(data)
    for buf in (data, bytearray(data), memoryview(data)):
        assert native.crc32c(buf) == want


def test_hardware_path_chosen_where_the_cpu_has_it(native: Any) -> None:
    impl = native.crc32c_impl()
    assert impl in ("sse4.2", "armv8-crc", "table")
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        pass
    if platform.machine() == "x86_64" and " sse4_2" in flags:
        assert impl == "sse4.2"
    if platform.machine() == "aarch64" and " crc32" in flags:
        assert impl == "armv8-crc"
