"""The durable key-value store: a dict whose every change is logged first.

Guarantees (docs/GUARANTEES.md states them per durability mode):

* Each `db[key] = value`, `del db[key]` and each transaction is one COMMIT
  record: after any crash, recovery yields a prefix of the commits, never
  half a transaction.
* In `sync` mode a change returns only after its record is on disk.
* The in-memory dict changes only after the record was written; a commit
  that fails (full disk, closed store, wrong type, unencodable value) leaves
  the dict as it was.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, MutableMapping
from types import TracebackType
from typing import Any, Optional, Union

from . import format as fmt
from . import native, nativelog, replay, snapshot
from .codec import Codec, get_codec
from .core import Identity, LogCore
from .durable import DurableStore
from .errors import CorruptionError, KeyTypeError, SnapshotError, TransactionClosedError
from .fileapi import DEFAULT, OSFileAPI
from .kvreplay import make_kv_replayer
from .writer import BurstWriter, WriterOptions

Key = Union[str, bytes]

_OPH = fmt.OP_HEADER
_PUT = fmt.OP_PUT
_DEL = fmt.OP_DELETE
_OPH_PACK = fmt.OP_HEADER.pack
_VSTR = fmt.VALUE_STR << fmt.VALUE_KIND_SHIFT
_DELETED: Any = object()


def encode_key(key: object) -> tuple[bytes, int]:
    """Key bytes and the key-is-str flag; raises KeyTypeError for other types."""
    if type(key) is str:
        return key.encode("utf-8"), fmt.KEY_STR
    if type(key) is bytes:
        return key, 0
    if isinstance(key, str):
        return str(key).encode("utf-8"), fmt.KEY_STR
    if isinstance(key, bytes):
        return bytes(key), 0
    raise KeyTypeError(f"keys must be str or bytes, not {type(key).__name__}")


class Store(DurableStore, MutableMapping[Key, Any]):
    """A durable dict. Open with `walstore.open(path)`; use as a context manager.

    Keys are str or bytes (``"a"`` and ``b"a"`` are different keys). bytes and
    str values are stored as they are; other values go through the codec
    (JSON by default), and the store keeps the decoded value, so what you
    read now is what a reopen returns.

    durability: "sync" (default: every commit is on disk when it returns),
    "interval" (a background fdatasync every `interval_ms`), or "none" (the OS
    decides; `sync()` forces). preallocate=False for copy-on-write
    filesystems (btrfs, ZFS), where pre-written zeros buy nothing.

    segment_size: each log segment is written as zeros before commits use it
    (64 MiB by default), so a new store takes that much disk, and every
    compaction writes a fresh segment's zeros. A small store compacted often
    does better with a smaller one (4 MiB, say).

    Compaction: with auto_compact, a background compaction starts when the
    log written since the last snapshot exceeds both `compact_min_bytes` and
    `compact_ratio` times the snapshot's size (as Redis auto-aof-rewrite).
    `keep_snapshots` older snapshots (with the log after them) are kept, so a
    damaged newest snapshot can be rebuilt around.

    Every option is checked before anything is created or opened: a wrong type
    or value (`interval_ms` not above 0, `segment_size` under 1,024 bytes,
    `keep_snapshots` under 1, a bool that is not a bool) raises
    InvalidOptionError, naming the option.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Store:
        """A `Store` on the C writer is a `NativeStore`, whose `db[key] = value` runs in C."""
        if cls is Store and nativelog.usable(kwargs.get("fs") or DEFAULT):
            cls = _native_store_class() or cls
        return super().__new__(cls)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: str = "sync",
        interval_ms: float = 100.0,
        codec: str | Codec = "json",
        segment_size: int = 64 << 20,
        preallocate: bool = True,
        create: bool = True,
        fs: Optional[OSFileAPI] = None,
        auto_compact: bool = True,
        compact_min_bytes: int = 64 << 20,
        compact_ratio: float = 1.0,
        keep_snapshots: int = 1,
    ) -> None:
        self._codec = get_codec(codec)
        self._init_compaction(auto_compact, compact_min_bytes, compact_ratio, keep_snapshots)
        made: list[Any] = []

        def factory(identity: Identity) -> Any:
            made.append(make_kv_replayer())
            return made[-1]

        options = WriterOptions(durability, interval_ms, segment_size, preallocate)
        core = LogCore(path, factory, codec_name=self._codec.name, options=options, create=create, fs=fs)
        try:
            self._data: dict[Key, Any] = made[-1].finish(self._codec.decode)
        except BaseException:
            core.abandon()
            raise
        made.clear()
        core.release_buffers()
        self._set = self._data.__setitem__
        self._pop = self._data.pop
        self._opened(core)
        if type(self) is not Store and isinstance(self._writer, nativelog.NativeLogWriter):
            self._writer.bind_fast_put(self, self._data)  # refused (False) unless a NativeStore

    # ---- identity and state ----------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters: keys, commits and fsyncs since open (commits/fsyncs is the group-commit batch)."""
        return {"keys": len(self._data), **self._log_stats()}

    # ---- encoding --------------------------------------------------------------

    def _value(self, value: Any) -> tuple[bytes, int, Any]:
        """(stored bytes, value-kind flags, the value the dict keeps)."""
        t = type(value)
        if t is bytes:
            return value, 0, value
        if t is str:
            return value.encode("utf-8"), fmt.VALUE_STR << fmt.VALUE_KIND_SHIFT, value
        if isinstance(value, (bytearray, memoryview)):
            b = bytes(value)
            return b, 0, b
        encoded = self._codec.encode(value)
        return encoded, fmt.VALUE_CODEC << fmt.VALUE_KIND_SHIFT, self._codec.decode(encoded)

    # ---- reads -----------------------------------------------------------------

    def __getitem__(self, key: Key) -> Any:
        self._core.check_open()
        return self._data[key]

    def get(self, key: Key, default: Any = None) -> Any:
        self._core.check_open()
        return self._data.get(key, default)

    def __contains__(self, key: object) -> bool:
        self._core.check_open()
        return key in self._data

    def __len__(self) -> int:
        self._core.check_open()
        return len(self._data)

    def __iter__(self) -> Iterator[Key]:
        """Iterates over a copy of the keys: safe while other threads commit."""
        self._core.check_open()
        with self._writer.lock:
            keys = list(self._data)
        return iter(keys)

    def to_dict(self) -> dict[Key, Any]:
        """A consistent shallow copy of the whole state."""
        self._core.check_open()
        with self._writer.lock:
            return dict(self._data)

    # ---- writes ----------------------------------------------------------------

    def __delitem__(self, key: Key) -> None:
        if not self.delete(key):
            raise KeyError(key)

    def put(self, key: Key, value: Any, *, durability: Optional[str] = None) -> None:
        """Set `key` to `value` as one commit (durability overrides the store's mode)."""
        tk = type(key)
        if tk is str:
            kb, kf = key.encode("utf-8"), fmt.KEY_STR  # type: ignore[union-attr]
        elif tk is bytes:
            kb, kf = key, 0
        else:
            kb, kf = encode_key(key)
        tv = type(value)
        if tv is bytes:
            vb, vf, kept = value, 0, value
        elif tv is str:
            vb, vf, kept = value.encode("utf-8"), _VSTR, value
        else:
            vb, vf, kept = self._value(value)
        self._writer.commit_op(_PUT, kf | vf, kb, vb, self._set, key, kept, durability)

    __setitem__ = put  # db[key] = value: the hot path, without a second call

    def delete(self, key: Key, *, durability: Optional[str] = None) -> bool:
        """Remove `key` as one commit; False (and nothing logged) if it was absent."""
        self._core.check_open()
        kb, kf = encode_key(key)
        if key not in self._data:
            return False
        self._writer.commit_op(_DEL, kf, kb, b"", self._pop, key, None, durability)
        return True

    # ---- compaction ------------------------------------------------------------

    def compact(self, *, wait: bool = True) -> Optional[snapshot.SnapshotInfo]:
        """Write a base snapshot of the state and drop the log it covers.

        Commits continue meanwhile: the active segment is sealed at sequence
        number S (a new one takes later commits), and the snapshot is rebuilt
        from the previous snapshot plus the sealed segments, off the writer's
        lock. A failed snapshot write leaves the store as it was and does not
        poison it. With wait=False it runs in a background thread and returns None.
        """
        return self._start_compaction(wait, {})

    def _compact_locked(self, **options: Any) -> Optional[snapshot.SnapshotInfo]:
        seq = self._writer.seal_for_snapshot()
        if seq == self._snapshot_seq:
            return None
        burst = self._writer.burst_writer()  # bursts paced between commits' syncs
        prepared = None
        if burst is not None and self._snapshot_bound() >= 2 * snapshot.BURST_BYTES:
            prepared = snapshot.PreparedBuffers()  # made during the capture; a small snapshot needs none
        try:
            return self._snapshot_at(seq, burst, prepared)
        finally:
            if prepared is not None:
                prepared.close()

    def _snapshot_bound(self) -> int:
        """At most the new snapshot's size: the last snapshot plus the segment files after it."""
        total = self._snapshot_size
        for first, path in replay.list_segments(self.path):
            if first > self._snapshot_seq:
                try:
                    total += os.path.getsize(path)
                except FileNotFoundError:
                    pass
        return total

    def _snapshot_at(
        self, seq: int, burst: Optional[BurstWriter], prepared: Optional[snapshot.PreparedBuffers]
    ) -> snapshot.SnapshotInfo:
        with native.yielding():  # the replay and framing below leave committers a core
            return self._write_snapshot_at(seq, burst, prepared)

    def _write_snapshot_at(
        self, seq: int, burst: Optional[BurstWriter], prepared: Optional[snapshot.PreparedBuffers]
    ) -> snapshot.SnapshotInfo:
        core = self._core
        replayer = make_kv_replayer()
        buffers: list[Any] = []

        rejected: list[tuple[str, CorruptionError]] = []

        def capture() -> None:
            """The state at `seq` into `replayer`: the newest valid snapshot, then the sealed log."""
            base = 0
            found, bad = snapshot.newest_valid_snapshot(self.path, core.identity.store_id)
            rejected.extend(bad)
            if found is not None:
                base, _p, data, scan = found
                buffers.append(data)
                replayer.apply_range(data, fmt.FILE_HEADER_SIZE, scan.end)
            try:
                state = replay.inspect_log(self.path, core.identity.store_id, base, replayer, buffers, until_seq=seq)
            except CorruptionError as exc:
                if not rejected:
                    raise
                path, why = rejected[0]
                raise SnapshotError(
                    f"{path} failed its checks ({why}), and the log it covered is gone: no snapshot"
                    f" written, nothing removed (then: {exc})"
                ) from exc
            if state.last_seq != seq or state.torn is not None:
                raise SnapshotError(f"sealed log ends at {state.last_seq}, expected {seq}; no snapshot written")

        if isinstance(replayer, native.KVReplayer):
            # In C without the GIL: at idle CPU priority, committers first. Traced, four
            # compactions of 1,000,000 keys slowed 17, 10, 43, 12 commits at normal priority
            # (29 of the 43 during the capture) and 13, 11, 14, 12 at idle priority.
            # (The Python replay holds the GIL: at idle priority it would hold up committers.)
            snapshot.at_idle_priority(capture)
        else:
            capture()
        # The surviving keys as PUT payloads copied straight from the maps (in C, without
        # the GIL): no dict of the state. The C table points into the maps, so they are
        # closed only once the payloads are consumed or the generator closed.
        live = len(replayer)  # one PUT per surviving key: no need to count them again
        payloads = snapshot.kv_source(replayer, seq)  # records framed in C when the replayer can
        try:
            info = snapshot.write_snapshot(
                core.fs, self.path, core.identity.store_id, seq, payloads, live, burst, prepared
            )
        finally:
            payloads.close()
            for buf in buffers:
                close = getattr(buf, "close", None)
                if close is not None:
                    close()
        for path, why in rejected:
            # Damaged since open() checked it; the state was rebuilt without it. Kept aside,
            # not left to be removed as covered by a later compaction.
            if os.path.exists(path):
                reason = f"snapshot failed its checks at compaction ({why}); replaced by {info.path}"
                info.quarantined.append(replay.quarantine_file(core.fs, self.path, path, reason, "compaction"))
        doomed = snapshot.covered_files(self.path, seq, self._keep_snapshots)
        # The sealed segment first, if it goes: it is closed before its unlink, so its blocks
        # are freed (and trimmed, with `discard`) in that unlink's held turn, not at a close after.
        self._writer.finish_seal([os.path.basename(path) for path in doomed])
        snapshot.remove_covered(core.fs, self.path, seq, self._keep_snapshots, self._writer.held_turn, doomed)
        return info

    def transaction(self, *, durability: Optional[str] = None) -> Transaction:
        """An all-or-nothing group of changes: one COMMIT record when the block ends cleanly."""
        self._core.check_open()
        return Transaction(self, durability)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._data)} keys, seq {self.last_seq}"
        return f"<walstore.Store {self.path!r} {state}>"


_native_store: Optional[type[Store]] = None
_native_store_lock = threading.Lock()


def _native_store_class() -> Optional[type[Store]]:
    """`NativeStore`: Store behind the C type whose `__setitem__` slot is the fast put
    (`_native/fastput.c`), made once; None where that type cannot be made.

    The C type comes first in the bases, so `type(db).__setitem__` is its slot wrapper and
    CPython calls the C slot directly. The slot calls `put` for whatever it does not do
    itself, and `_fast_delitem` for `del db[key]` (the same slot serves both)."""
    global _native_store
    with _native_store_lock:
        if _native_store is None:
            base = nativelog.fast_put_base()
            if base is None:
                return None
            namespace = {
                "__module__": __name__,
                "__qualname__": "NativeStore",
                "__doc__": Store.__doc__,
                "_fast_delitem": Store.__delitem__,
            }
            meta: Any = type(Store)  # ABCMeta, from MutableMapping
            _native_store = meta("NativeStore", (base, Store), namespace)
        return _native_store


class Transaction(MutableMapping[Key, Any]):
    """Changes buffered until the `with` block ends; then one atomic commit.

    Reads see the transaction's own changes over the store's current state.
    An exception in the block discards every change. The transaction gives
    atomicity and durability, not isolation: other threads' commits in the
    meantime are visible, and the last commit of a key wins.
    """

    def __init__(self, store: Store, durability: Optional[str]) -> None:
        self._store = store
        self._durability = durability
        self._changes: dict[Key, Any] = {}
        self._encoded: dict[Key, bytes] = {}
        self._open = True

    def _check(self) -> None:
        if not self._open:
            raise TransactionClosedError("this transaction's block has ended; start a new one")

    def __getitem__(self, key: Key) -> Any:
        self._check()
        if key in self._changes:
            v = self._changes[key]
            if v is _DELETED:
                raise KeyError(key)
            return v
        return self._store[key]

    def __contains__(self, key: object) -> bool:
        self._check()
        if key in self._changes:
            return self._changes[key] is not _DELETED
        return key in self._store

    def __setitem__(self, key: Key, value: Any) -> None:
        self._check()
        kb, kf = encode_key(key)
        vb, vf, kept = self._store._value(value)
        self._encoded[key] = b"".join((_OPH.pack(_PUT, kf | vf, 0, len(kb), len(vb)), kb, vb))
        self._changes[key] = kept

    def __delitem__(self, key: Key) -> None:
        self._check()
        if key not in self:
            raise KeyError(key)
        self.discard(key)

    def discard(self, key: Key) -> None:
        """Delete `key` if present (no KeyError)."""
        self._check()
        kb, kf = encode_key(key)
        self._encoded[key] = _OPH.pack(_DEL, kf, 0, len(kb), 0) + kb
        self._changes[key] = _DELETED

    def __len__(self) -> int:
        self._check()
        return sum(1 for _ in self)

    def __iter__(self) -> Iterator[Key]:
        self._check()
        keys = [k for k in self._store if k not in self._changes]
        keys.extend(k for k, v in self._changes.items() if v is not _DELETED)
        return iter(keys)

    def commit(self) -> None:
        """Write the changes as one record (no record if there are none) and apply them."""
        self._check()
        self._open = False
        if not self._encoded:
            return
        payload = b"".join(self._encoded.values())
        data = self._store._data
        changes = self._changes

        def apply() -> None:
            for k, v in changes.items():
                if v is _DELETED:
                    data.pop(k, None)
                else:
                    data[k] = v

        store = self._store
        store._core.check_open()
        store._writer.commit(payload, apply, self._durability)

    def rollback(self) -> None:
        """Discard the changes."""
        self._open = False
        self._changes.clear()
        self._encoded.clear()

    def __enter__(self) -> Transaction:
        self._check()
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()


open = Store  # noqa: A001 - the natural name, as in shelve.open / dbm.open
"""`walstore.open(path, ...)` opens (or creates) the key-value store in directory `path`;
the options are `Store`'s."""
