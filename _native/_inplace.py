"""Install an in-place (developer) build of a cffi module next to walstore's sources.

The build is copied as `<module>.abi3.so`, the name `pip install` gives it
(cffi modules use the limited API), then renamed over the target: overwriting
a loaded .so in place crashes every process that has it mapped. Copies of the
module under any other suffix are removed, so the newest build is the one
imported whichever way it was made.
"""

from __future__ import annotations

import glob
import os
import shutil


def install(built: str, package_dir: str, module: str) -> str:
    """Put `built` at package_dir/module.abi3.so; remove other builds of `module`; return the path."""
    target = os.path.join(package_dir, module + ".abi3.so")
    shutil.copy2(built, target + ".tmp")
    os.replace(target + ".tmp", target)
    for other in glob.glob(os.path.join(package_dir, module + ".*.so")):
        if other != target:
            os.unlink(other)
    return target
