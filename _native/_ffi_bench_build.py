"""cffi (API mode) build of `walstore._walstore_bench`: the C timer of `walstore bench`.

Used by setup.py (`cffi_modules`); `optional=True` lets an install without a C
compiler succeed, and the bench then times with a Python loop and says so.
Run directly (`python _native/_ffi_bench_build.py`) to build in place: only
the compiled module is put next to the Python sources, the rest of the build
stays in a temporary directory.
"""

import os
import shutil
import tempfile

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CDEF = """
#define RAWIO_NOSYNC 0
#define RAWIO_FSYNC 1
#define RAWIO_FDATASYNC 2
#define RAWIO_PLAIN 3
#define RAWIO_RWF_DSYNC 4
int rawio_has_rwf_dsync(void);
int64_t rawio_run(int fd, int method, const void *buf, size_t size, int64_t offset0, int64_t n,
                  int64_t min_ops, int64_t budget_ns, int64_t *lat_ns, int64_t *sync_ns);
int64_t rawio_now_ns(void);
"""


def make_ffi(native_dir: str = "_native") -> FFI:
    """The FFI builder; `native_dir` is where rawio.c lives (relative for setup.py)."""
    builder = FFI()
    builder.cdef(CDEF)
    builder.set_source(
        "walstore._walstore_bench",
        '#include "rawio.h"\n',
        sources=[os.path.join(native_dir, "rawio.c")],
        include_dirs=[native_dir],
        extra_compile_args=["-O2", "-Wall", "-Wextra"],
        optional=True,
    )
    return builder


ffi = make_ffi()

if __name__ == "__main__":
    from _inplace import install

    tmp = tempfile.mkdtemp(prefix="walstore-bench-build-")
    try:
        built = make_ffi(HERE).compile(tmpdir=tmp, verbose=True)
        print("built", os.path.relpath(install(built, os.path.join(ROOT, "walstore"), "_walstore_bench")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
