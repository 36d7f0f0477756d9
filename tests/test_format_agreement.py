"""docs/FORMAT.md has two encodings, walstore/format.py and _native/walstore_format.h: they must agree."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from walstore import format as fmt
from walstore import kvreplay, reader

NATIVE = Path(__file__).resolve().parent.parent / "_native"
DEFINE = re.compile(r"^#define\s+WS_(\w+)\s+(.*?)\s*(?:/\*.*\*/)?\s*$")
INT = re.compile(r"^(0x[0-9A-Fa-f]+|\d+)[uU]?$")
STRING = re.compile(r'^"([^"\\]*)"$')

# Header names whose Python counterpart is not format.py's constant of the same name.
ELSEWHERE: dict[str, Any] = {
    "SNAPSHOT_END_PAYLOAD_SIZE": fmt.SNAPSHOT_END_PAYLOAD.size,
    "SEGMENT_TYPES": reader.SEGMENT_TYPES,
    "SNAPSHOT_TYPES": reader.SNAPSHOT_TYPES,
    "IDENTITY_TYPES": reader.IDENTITY_TYPES,
}


def header_constants(name: str) -> dict[str, Any]:
    """NAME -> value for every `#define WS_NAME <int or string literal>` line of a header."""
    found: dict[str, Any] = {}
    for line in (NATIVE / name).read_text().splitlines():
        m = DEFINE.match(line)
        if not m or "(" in m.group(1):
            continue
        name_, value = m.groups()
        if INT.match(value):
            found[name_] = int(INT.match(value).group(1), 0)  # type: ignore[union-attr]
        elif STRING.match(value):
            found[name_] = STRING.match(value).group(1).encode()  # type: ignore[union-attr]
    return found


def python_format_constants() -> dict[str, Any]:
    """format.py's upper-case int and bytes constants: the format's numbers."""
    return {k: v for k, v in vars(fmt).items() if k.isupper() and not k.startswith("_") and isinstance(v, (int, bytes))}


def test_every_header_constant_equals_format_py() -> None:
    c = header_constants("walstore_format.h")
    assert c, "no constants parsed from walstore_format.h"
    for name, value in c.items():
        expected = ELSEWHERE[name] if name in ELSEWHERE else getattr(fmt, name)
        assert value == expected, f"WS_{name} is {value!r} in C, {expected!r} in Python"


def test_every_format_py_constant_is_in_the_header() -> None:
    c = header_constants("walstore_format.h")
    missing = sorted(set(python_format_constants()) - set(c))
    assert not missing, f"format.py constants with no WS_ twin in walstore_format.h: {missing}"


def test_struct_sizes_match_the_header_sizes() -> None:
    assert fmt.FILE_HEADER.size + 4 == fmt.FILE_HEADER_SIZE
    assert fmt.FRAME_HEADER.size + 4 == fmt.FRAME_HEADER_SIZE
    assert fmt.OP_HEADER.size == fmt.OP_HEADER_SIZE
    assert fmt.SNAPSHOT_END_PAYLOAD.size == 16


def test_replay_error_codes_agree() -> None:
    c = header_constants("kvreplay.h")
    for name in ("ERANGE", "EFRAME", "ETYPE", "EOPS", "ECALL", "ENOMEM"):
        assert c[f"KV_{name}"] == getattr(kvreplay, f"KV_{name}")


def test_compiled_module_exports_the_same_constants() -> None:
    from native_support import require_native

    native = require_native()
    lib = native._lib
    for header in ("walstore_format.h", "scan.h", "kvreplay.h"):
        for name, value in header_constants(header).items():
            if isinstance(value, int):
                assert getattr(lib, f"WS_{name}") == value, name


@pytest.mark.parametrize("name", ["scan.h", "kvreplay.h"])
def test_headers_parse(name: str) -> None:
    assert header_constants(name)
