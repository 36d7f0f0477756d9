"""walstore's exceptions: one small hierarchy under WalstoreError."""

from __future__ import annotations


class WalstoreError(Exception):
    """Base class of every error walstore raises on purpose."""


class StoreClosedError(WalstoreError):
    """The store was closed; open it again to use it."""


class StoreForkedError(StoreClosedError):
    """This process is a fork() child of the one that opened the store: the log, its
    locks and the writer lock belong to the parent, so in the child the store is closed
    (close() writes nothing); open the store in the child once the parent has closed it."""


class InvalidOptionError(WalstoreError, ValueError, TypeError):
    """An option of `open()` or `open_machine()` (or a commit's durability) has the wrong
    type or value. Nothing was opened, created or written. It is both a ValueError and a
    TypeError, so code that catches either keeps working."""


class TransactionClosedError(WalstoreError):
    """The transaction's block has ended; start a new transaction."""


class StoreLockedError(WalstoreError):
    """Another process (or another open handle) holds the store's writer lock."""

    def __init__(self, path: str, holder_pid: int | None) -> None:
        who = f"process {holder_pid}" if holder_pid else "another process"
        super().__init__(f"store {path!r} is locked by {who}; one writer process per store")
        self.path = path
        self.holder_pid = holder_pid


class NotAStoreError(WalstoreError):
    """The directory exists but does not hold a walstore store."""


class FormatVersionError(WalstoreError):
    """A file was written by a newer walstore than this one."""


class CorruptionError(WalstoreError):
    """Data that was already synced is damaged. Nothing on disk was changed.

    `path`, `offset` and `seq` name the damage: the file, the byte offset of the
    first bad record, and the sequence number the record there should carry.
    """

    def __init__(self, path: str, offset: int, seq: int | None, reason: str, detail: str = "") -> None:
        where = f"{path} at offset {offset}"
        if seq is not None:
            where += f" (sequence number {seq})"
        msg = f"corruption in {where}: {reason}"
        if detail:
            msg += f"; {detail}"
        super().__init__(msg)
        self.path = path
        self.offset = offset
        self.seq = seq
        self.reason = reason


class StorePoisonedError(WalstoreError):
    """A write or fsync failed earlier; the store refuses writes until it is reopened.

    After a failed fsync the kernel may have dropped the dirty pages, and a
    retried fsync can report success for data that is gone, so walstore does
    not retry: reopen the store to recover what is durable.
    """


class DiskFullError(WalstoreError, OSError):
    """The disk is full. The commit was not written and the state is unchanged."""


class RecordTooLargeError(WalstoreError, ValueError):
    """A commit whose record payload would exceed the format's limit (MAX_PAYLOAD, 1 GiB).
    Nothing was written and the state is unchanged."""


class CodecError(WalstoreError, TypeError):
    """A value the codec cannot encode (nothing was written) or decode."""


class KeyTypeError(WalstoreError, TypeError):
    """Keys must be str or bytes."""


class ReplayError(WalstoreError):
    """Replay of a valid log failed (for example an unknown operation name)."""


class SnapshotError(WalstoreError):
    """A snapshot could not be written or read."""
