"""Build hook: compiles the cffi extensions in _native/ (see argon2-cffi-bindings).

Each extension is built with `optional=True`: where no C compiler exists the
install still succeeds and walstore uses its pure-Python replayer.
"""

import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_SCRIPTS = ["_native/_ffi_build.py:ffi", "_native/_ffi_bench_build.py:ffi"]

setup(
    cffi_modules=[s for s in BUILD_SCRIPTS if os.path.exists(os.path.join(HERE, s.split(":")[0]))],
)
