"""cffi (API mode) build of `walstore._walstore_native`: the C scanner, CRC32C and KV replay.

Used by setup.py (`cffi_modules`); `optional=True` reaches the setuptools
Extension, so an install without a C compiler succeeds and walstore replays
in pure Python. Run directly (`python _native/_ffi_build.py`) to build in place.
The integer constants of walstore_format.h are exported as `lib.WS_*`.
"""

from __future__ import annotations

import os
import re
import shutil

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["crc32c.c", "scan.c", "kvreplay.c", "kvdict.c"]
HEADERS = ["walstore_format.h", "crc32c.h", "scan.h", "kvreplay.h", "kvdict.h", "le.h"]
EXTRA_COMPILE_ARGS = ["-O2", "-Wall", "-Wextra", "-std=gnu11"]

_DEFINE = re.compile(r"^#define\s+(WS_\w+)\s+(0x[0-9A-Fa-f]+|\d+)u?\s*(?:/\*.*)?$")


def _int_defines(header: str) -> str:
    """`#define NAME ...` for each integer constant of a header, for cdef."""
    with open(os.path.join(HERE, header), encoding="utf-8") as f:
        names = [m.group(1) for m in map(_DEFINE.match, f.read().splitlines()) if m]
    return "".join(f"#define {name} ...\n" for name in names)


CDEF = (
    _int_defines("walstore_format.h")
    + _int_defines("scan.h")
    + _int_defines("kvreplay.h")
    + _int_defines("kvdict.h")
    + """
uint32_t ws_crc32c(uint32_t crc, const char *buf, size_t len);
uint32_t ws_crc32c_table(uint32_t crc, const char *buf, size_t len);
const char *ws_crc32c_impl(void);

typedef struct {
    uint64_t end;
    uint64_t last_commit;
    uint64_t max_durable;
    uint64_t records;
    uint64_t resync_max_durable;
    uint64_t resync_records;
    uint64_t data_end;
    uint64_t detail_a;
    uint64_t detail_b;
    int have_commit;
    int closed;
    int damage;
    int detail;
} ws_scan_result;
int ws_scan_records(const uint8_t *buf, size_t size, size_t start, uint64_t first_seq,
                    uint32_t type_mask, ws_scan_result *out);
const char *ws_damage_name(int damage);

typedef struct ws_kv ws_kv;
ws_kv *ws_kv_new(uint64_t seed);
void ws_kv_free(ws_kv *kv);
int ws_kv_apply_range(ws_kv *kv, const uint8_t *buf, size_t size, size_t start, size_t end,
                      uint64_t *err_offset);
uint64_t ws_kv_len(const ws_kv *kv);
void ws_kv_export_sizes(const ws_kv *kv, uint64_t *blob_bytes, uint64_t *runs);
int64_t ws_kv_export(const ws_kv *kv, uint8_t *blob, size_t blob_size, uint64_t *runs, size_t runs_cap);
typedef struct {
    const uint8_t *key;
    uint64_t entry;
    uint32_t klen;
    uint32_t vlen;
    uint8_t flags;
} ws_kv_item;
size_t ws_kv_items(const ws_kv *kv, uint64_t *cursor, ws_kv_item *out, size_t cap);
int ws_kv_build_dict(const ws_kv *kv, uintptr_t dict, uintptr_t codec_keys, uint64_t *cursor, uint64_t limit);
int64_t ws_kv_snapshot_chunk(const ws_kv *kv, uint64_t *cursor, uint64_t chunk_bytes, uint8_t *out,
                             size_t out_size, uint64_t *need);
"""
)


def make_ffi(absolute: bool = False) -> FFI:
    """The FFI builder; source paths are relative to the working directory when under it."""

    def _path(name: str) -> str:
        full = os.path.join(HERE, name)
        rel = os.path.relpath(full)
        return full if absolute or rel.startswith("..") else rel

    builder = FFI()
    builder.cdef(CDEF)
    builder.set_source(
        "walstore._walstore_native",
        "".join(f'#include "{h}"\n' for h in ("walstore_format.h", "crc32c.h", "scan.h", "kvreplay.h", "kvdict.h")),
        sources=[_path(s) for s in SOURCES],
        include_dirs=[_path(".")],
        depends=[_path(h) for h in HEADERS],
        extra_compile_args=EXTRA_COMPILE_ARGS,
        optional=True,
    )
    return builder


ffi = make_ffi()

if __name__ == "__main__":
    # Build in place: walstore/_walstore_native.*.so next to the Python sources;
    # the generated C and object files stay in build/native (gitignored).
    root = os.path.dirname(HERE)
    os.chdir(root)
    built = make_ffi(absolute=True).compile(tmpdir=os.path.join("build", "native"), verbose=True)
    # Copy beside the target, then rename over it: overwriting a loaded .so in place crashes
    # every running process that has it mapped (a concurrent test run, a running store).
    target = os.path.join("walstore", os.path.basename(built))
    shutil.copy(built, target + ".tmp")
    os.replace(target + ".tmp", target)
    print("built", os.path.join("walstore", os.path.basename(built)))
