"""The one thin layer every durable file operation goes through.

Production code uses `OSFileAPI`, which is the plain OS calls. Tests plug in a
subclass (see `walstore.crashfs`) that records operations for crash
simulation or injects faults. Reads are not routed here: they cannot change
what is durable.
"""

from __future__ import annotations

import errno
import os
import sys

_FULLFSYNC = getattr(__import__("fcntl"), "F_FULLFSYNC", None) if sys.platform == "darwin" else None


class OSFileAPI:
    """Durable file operations, each a direct OS call. Subclass to record or fail."""

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags | getattr(os, "O_CLOEXEC", 0), mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Write all of `data` at `offset`; a short write is retried, an error raises."""
        total = os.pwrite(fd, data, offset)
        if total == len(data):
            return total
        view = memoryview(data)
        while total < len(view):
            n = os.pwrite(fd, view[total:], offset + total)
            if n <= 0:
                raise OSError(errno.EIO, "pwrite wrote nothing")
            total += n
        return total

    def fdatasync(self, fd: int) -> None:
        """Data (and the metadata needed to read it) on stable storage; F_FULLFSYNC on macOS."""
        if _FULLFSYNC is not None:
            import fcntl

            fcntl.fcntl(fd, _FULLFSYNC)
        elif hasattr(os, "fdatasync"):
            os.fdatasync(fd)
        else:  # pragma: no cover - platforms without fdatasync
            os.fsync(fd)

    def fsync(self, fd: int) -> None:
        if _FULLFSYNC is not None:
            import fcntl

            fcntl.fcntl(fd, _FULLFSYNC)
        else:
            os.fsync(fd)

    def fsync_dir(self, path: str) -> None:
        """Make creations, renames and unlinks in directory `path` durable."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        """Reserve blocks; raises OSError(ENOSPC) when the disk is full."""
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, offset, length)

    def rename(self, src: str, dst: str) -> None:
        """Atomic replace of `dst` by `src` (same directory)."""
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def clone(self, src: str, dst: str) -> None:
        """Copy `src` to a new file `dst`: a reflink where the filesystem can, else a copy.

        `dst` is not fsynced: the caller fsyncs it and its directory.
        """
        with open(src, "rb") as fin:
            fd = self.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                try:
                    import fcntl

                    ficlone = 0x40049409  # FICLONE, Linux
                    fcntl.ioctl(fd, ficlone, fin.fileno())
                    return
                except (OSError, ImportError):
                    pass
                offset = 0
                while True:
                    chunk = fin.read(1 << 20)
                    if not chunk:
                        break
                    self.pwrite(fd, chunk, offset)
                    offset += len(chunk)
            finally:
                self.close(fd)


DEFAULT = OSFileAPI()
