"""walstore: a durable write-ahead-log store for in-memory Python state.

    import walstore
    with walstore.open("data/app") as db:
        db["user:1"] = {"name": "Ada"}      # one durable commit
        with db.transaction() as tx:        # all or nothing: one log record
            tx["a"] = 1

Or any in-memory state, changed only through logged operations
(docs/STATE_MACHINES.md): `walstore.open_machine(path, MyState)` with
`@walstore.operation` methods.
"""

from __future__ import annotations

from .codec import Codec, JSONCodec, PickleCodec
from .errors import (
    CodecError,
    CorruptionError,
    DiskFullError,
    FormatVersionError,
    InvalidOptionError,
    KeyTypeError,
    NotAStoreError,
    RecordTooLargeError,
    ReplayError,
    SnapshotError,
    StoreClosedError,
    StoreForkedError,
    StoreLockedError,
    StorePoisonedError,
    TransactionClosedError,
    WalstoreError,
)
from .machine import MachineStore, MachineTransaction, Operation, Pending, open_machine, operation
from .replay import backend
from .store import Store, Transaction, open

__version__ = "0.1.0"

__all__ = [
    "Codec",
    "CodecError",
    "CorruptionError",
    "DiskFullError",
    "FormatVersionError",
    "InvalidOptionError",
    "JSONCodec",
    "KeyTypeError",
    "MachineStore",
    "MachineTransaction",
    "NotAStoreError",
    "RecordTooLargeError",
    "Operation",
    "Pending",
    "PickleCodec",
    "ReplayError",
    "SnapshotError",
    "Store",
    "StoreClosedError",
    "StoreForkedError",
    "StoreLockedError",
    "StorePoisonedError",
    "Transaction",
    "TransactionClosedError",
    "WalstoreError",
    "backend",
    "open",
    "open_machine",
    "operation",
    "__version__",
]
