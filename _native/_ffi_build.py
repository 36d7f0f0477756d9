"""cffi (API mode) build of `walstore._walstore_native`: the C scanner, CRC32C, KV replay and log writer.

Used by setup.py (`cffi_modules`); `optional=True` reaches the setuptools
Extension, so an install without a C compiler succeeds and walstore replays
in pure Python. Run directly (`python _native/_ffi_build.py`) to build in place.
The integer constants of walstore_format.h are exported as `lib.WS_*`.
"""

from __future__ import annotations

import os
import re
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [
    "crc32c.c",
    "scan.c",
    "kvreplay.c",
    "kvdict.c",
    "snapshot.c",
    "logwrite.c",
    "gilturn.c",
    "fastput.c",
    "yieldpoint.c",
]
HEADERS = [
    "walstore_format.h",
    "crc32c.h",
    "scan.h",
    "kvreplay.h",
    "kvdict.h",
    "snapshot.h",
    "logwrite.h",
    "gilturn.h",
    "fastput.h",
    "yieldpoint.h",
    "le.h",
]
EXTRA_COMPILE_ARGS = ["-O2", "-Wall", "-Wextra", "-std=gnu11"]
# Threads (the writer's syncs, the finish's prefault helper) and dlsym (kvdict.c); in libc
# itself from glibc 2.34 on, named for older ones.
LIBRARIES = ["pthread", "dl"] if sys.platform.startswith("linux") else []

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
    + _int_defines("fastput.h")
    + _int_defines("gilturn.h")
    + """
#define WS_LOG_NO_ROOM ...
#define WS_LOG_TOO_BIG ...
#define WS_LOG_CLOSED ...
#define WS_LOG_FAILED ...
#define WS_LOG_NOTIFY ...
#define WS_LOG_NOT_HERE ...

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
uint64_t ws_kv_ops_bytes_from(const ws_kv *kv, uint64_t cursor, uint64_t limit);
int64_t ws_kv_export(const ws_kv *kv, uint8_t *blob, size_t blob_size, uint64_t *runs, size_t runs_cap);
typedef struct {
    const uint8_t *key;
    uint64_t entry;
    uint32_t klen;
    uint32_t vlen;
    uint8_t flags;
} ws_kv_item;
size_t ws_kv_items(const ws_kv *kv, uint64_t *cursor, ws_kv_item *out, size_t cap);
int ws_kv_build_dict(const ws_kv *kv, uintptr_t dict, uintptr_t codec_keys, uint64_t *cursor, uint64_t limit,
                     int flags);
void ws_kv_dict_arena_stats(uint64_t *regions, uint64_t *arenas, uint64_t *populated);
int ws_kv_dict_layout(int layout, uint64_t *batches);
int64_t ws_kv_snapshot_chunk(const ws_kv *kv, uint64_t *cursor, uint64_t chunk_bytes, uint8_t *out,
                             size_t out_size, uint64_t *need);

typedef struct ws_log ws_log;
ws_log *ws_log_new(uint64_t last_seq);
void ws_log_free(ws_log *log);
int ws_log_set_segment(ws_log *log, int fd, uint64_t map_size);
void ws_log_set_limit(ws_log *log, uint64_t limit);
int64_t ws_log_put(ws_log *log, uint32_t type, const uint8_t *payload, size_t size, int lazy);
int64_t ws_log_put_op(ws_log *log, uint32_t op_flags, const uint8_t *key, size_t key_size, const uint8_t *value,
                      size_t value_size, int lazy);
int64_t ws_log_put_op_touched(ws_log *log, uint32_t op_flags, const uint8_t *key, size_t key_size,
                              const uint8_t *value, size_t value_size);
uint64_t ws_log_last_seq(ws_log *log);
void ws_log_set_last_seq(ws_log *log, uint64_t seq);
uint64_t ws_log_offset(ws_log *log);
void ws_log_set_offset(ws_log *log, uint64_t offset);
uint64_t ws_log_log_bytes(ws_log *log);
void ws_log_set_log_bytes(ws_log *log, uint64_t n);
void ws_log_set_notify(ws_log *log, uint64_t offset, uint64_t log_bytes);
int ws_log_wait(ws_log *log, uint64_t seq);
int ws_log_commit_wait(ws_log *log, uint64_t seq);
void ws_turn_release(void);
void ws_turn_claim(void);
void ws_turn_set_spin(uint32_t max_us);
void ws_turn_stats(uint64_t *claims, uint64_t *spun, uint64_t *timeouts, uint64_t *hold_ns);
void ws_log_set_gather(ws_log *log, uint32_t max_us);
int ws_log_gap(ws_log *log, uint32_t syncs, uint32_t idle_us, uint32_t max_us);
int64_t ws_log_burst(ws_log *log, uint32_t syncs, uint32_t idle_us, uint32_t max_us, uint64_t max_ns, int fd,
                     const uint8_t *buf, size_t len, uint64_t offset);
uint64_t ws_log_burst_rate(ws_log *log);
void ws_log_set_burst_rate(ws_log *log, uint64_t bytes_per_second);
int ws_log_hold(ws_log *log, uint32_t syncs, uint32_t idle_us, uint32_t max_us, uint64_t *token);
void ws_log_release(ws_log *log, uint64_t token);
void ws_log_hold_stats(ws_log *log, uint64_t *holds, uint64_t *syncs_during);
void ws_log_arrival_stats(ws_log *log, uint64_t *waited, uint64_t *arrived);
void ws_log_pause(ws_log *log);
void ws_log_resume(ws_log *log);
void ws_log_publish(ws_log *log, uint64_t seq);
void ws_log_mark_durable(ws_log *log, uint64_t seq);
void ws_log_fail(ws_log *log, int err);
void ws_log_inject(ws_log *log, int sync_errno, int write_errno);
uint64_t ws_log_durable(ws_log *log);
uint64_t ws_log_written(ws_log *log);
uint64_t ws_log_fsyncs(ws_log *log);
int ws_log_error(ws_log *log);
"""
    # _native/fastput.h: `db[key] = value` in C
    + """
int ws_fastput_type(uintptr_t out);
int ws_fastput_bind(uintptr_t store, ws_log *log, const int *gate, uintptr_t writer, uintptr_t data,
                    uintptr_t acquire, uintptr_t release, uintptr_t armed, int lazy);
"""
    # _native/snapshot.h: snapshot records framed in C
    + """
int64_t ws_snapshot_frames(const ws_kv *kv, uint64_t *cursor, uint64_t chunk_bytes, uint64_t seq,
                           uint8_t *out, size_t out_size, uint64_t *records, uint64_t *need);
void ws_snapshot_touch(uint8_t *buf, size_t len);
"""
    # _native/yieldpoint.h: background loops that give a waiting thread the core
    + """
int ws_set_yielding(int on);
uint64_t ws_yields(void);
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
        "".join(f'#include "{h}"\n' for h in HEADERS if h != "le.h"),
        sources=[_path(s) for s in SOURCES],
        include_dirs=[_path(".")],
        depends=[_path(h) for h in HEADERS],
        extra_compile_args=EXTRA_COMPILE_ARGS,
        libraries=LIBRARIES,
        optional=True,
    )
    return builder


ffi = make_ffi()

if __name__ == "__main__":
    # Build in place: walstore/_walstore_native.abi3.so next to the Python sources;
    # the generated C and object files stay in build/native (gitignored).
    from _inplace import install

    root = os.path.dirname(HERE)
    os.chdir(root)
    built = make_ffi(absolute=True).compile(tmpdir=os.path.join("build", "native"), verbose=True)
    print("built", os.path.relpath(install(built, "walstore", "_walstore_native")))
