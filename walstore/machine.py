"""Application state behind the log (system prevalence): operations are logged, then applied.

    class Counter:
        def __init__(self) -> None:
            self.total = 0

        @walstore.operation
        def add(self, n: int) -> int:
            self.total += n
            return self.total

        @add.validator
        def check_add(self, n: int) -> None:
            if n <= 0:
                raise ValueError("add a positive number")

    with walstore.open_machine("data/counter", Counter) as store:
        store.state.add(5)          # validated, logged as a CALL op, synced, applied

Guarantees (docs/STATE_MACHINES.md states them in full):

* Validate, log, apply. Under the store's lock, an operation's validator runs
  against the current state and may raise: then nothing is logged and the
  state is unchanged. The body runs only after the record was written, and
  must not raise: if it does, the store is poisoned (StorePoisonedError).
* The body is applied to the arguments as the codec decodes them, live as at
  replay, so replay yields the state the live run had, provided operations
  are deterministic functions of the state and their arguments.
* A transaction is one COMMIT: every operation replays, or none does. Its
  validators run in order, each seeing the earlier operations applied; if any
  rejects, nothing is logged and the state is unchanged.
* open() stops with ReplayError naming the commit for an unknown operation
  name, a record from a newer version of an operation, and an operation
  that raises during replay.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import struct
import threading
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Concatenate, Generic, Optional, ParamSpec, TypeVar, cast, overload

from . import format as fmt
from . import snapshot
from .codec import Codec, JSONCodec, PickleCodec, get_codec
from .core import Identity, LogCore
from .durable import DurableStore
from .errors import (
    ReplayError,
    SnapshotError,
    StoreClosedError,
    TransactionClosedError,
    WalstoreError,
)
from .fileapi import OSFileAPI
from .writer import NONE, SYNC, WriterOptions, check_durability

S = TypeVar("S")
P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

Upgrade = Callable[[int, list[Any]], Sequence[Any]]
"""upgrade(old_version, args) -> args: the arguments of an older record, in the current shape."""

_OPH_PACK = fmt.OP_HEADER.pack
_CALL_FLAGS = fmt.KEY_STR | (fmt.VALUE_CODEC << fmt.VALUE_KIND_SHIFT)
_LEN_TYPE = struct.Struct("<IB")
_U64 = struct.Struct("<Q")
_HS = fmt.FRAME_HEADER_SIZE
_SCALARS = frozenset({str, int, float, bool, type(None)})
"""Argument types the built-in codecs decode to an equal value of the same type."""

# What the current thread is doing with operations: a call during an apply (or a replay)
# is part of the operation being applied and runs its body directly; a call from a
# validator is a bug (validators only read).
_tls = threading.local()
_NORMAL, _APPLYING, _VALIDATING = 0, 1, 2

# id(state) -> (weak ref to the state, weak ref to the store managing it). The entry lives
# exactly as long as the state object, so an id is never mistaken for another object's.
_MANAGED: dict[int, tuple[weakref.ref[Any], weakref.ref[Any]]] = {}


def _mode() -> int:
    mode: int = getattr(_tls, "mode", _NORMAL)
    return mode


def _outside_operations(what: str) -> None:
    """Refuse store calls from a body or validator (the writer's lock is not re-entrant)."""
    if _mode() != _NORMAL:
        raise RuntimeError(
            f"{what} from inside an operation's body or validator; an operation changes only its own"
            " state (call other operations on self: they are part of it)"
        )


def _invoke(fn: Callable[..., Any], state: Any, args: Sequence[Any], n_pos: int, kw_names: Sequence[str]) -> Any:
    if kw_names:
        return fn(state, *args[:n_pos], **dict(zip(kw_names, args[n_pos:])))
    return fn(state, *args)


class Operation(Generic[S, P, R]):
    """A method of the application's state that walstore logs before it runs.

    Made by `@walstore.operation`. Called on a state a store manages
    (`store.state.op(...)`), it is validated, logged and applied as one
    commit. Called on a state no store manages, it is an ordinary method
    (validator, then body). Called from inside another operation's body, it
    runs its body directly: it is part of the operation being applied.
    """

    def __init__(
        self,
        fn: Callable[Concatenate[S, P], R],
        *,
        name: Optional[str] = None,
        version: int = 1,
        upgrade: Optional[Upgrade] = None,
    ) -> None:
        if type(version) is not int or version < 1:
            raise ValueError(f"an operation's version is an int >= 1, not {version!r}")
        if upgrade is not None and version == 1:
            raise ValueError("upgrade= converts records of older versions: declare version=2 or more")
        self.fn = fn
        self.name: str = name if name is not None else fn.__name__
        if not self.name:
            raise ValueError("an operation needs a non-empty name")
        self.version = version
        self.upgrade = upgrade
        self.validate: Optional[Callable[..., object]] = None
        self.key = self.name.encode("utf-8")
        self._sig = inspect.signature(fn)
        params = list(self._sig.parameters.values())
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            raise TypeError(f"operation {self.name!r} must be a method: its first parameter is the state")
        for p in params[1:]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(
                    f"operation {self.name!r}: *{p.name} is not allowed; an operation's arguments are"
                    " stored as a list in parameter order, so every parameter must be named"
                )
        self.params = [p.name for p in params[1:]]
        self._kw_names = [p.name for p in params[1:] if p.kind == p.KEYWORD_ONLY]
        self._n_pos = len(self.params) - len(self._kw_names)
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    @overload
    def __get__(self, obj: None, owner: Optional[type[Any]] = None) -> Operation[S, P, R]: ...

    @overload
    def __get__(self, obj: S, owner: Optional[type[Any]] = None) -> Callable[P, R]: ...

    def __get__(self, obj: Optional[S], owner: Optional[type[Any]] = None) -> Any:
        if obj is None:
            return self
        return types.MethodType(self._dispatch, obj)

    def validator(self, fn: Callable[Concatenate[S, P], object]) -> Callable[Concatenate[S, P], object]:
        """Declare the check that runs, under the store's lock, before the operation is logged.

        It takes the operation's parameters, only reads the state, and raises
        to reject the call (nothing is logged). Returns `fn` unchanged.
        """
        if self.validate is not None:
            raise TypeError(f"operation {self.name!r} already has a validator")
        self.validate = fn
        return fn

    # ---- calling ---------------------------------------------------------------

    def canonical(self, args: Sequence[Any], kwargs: dict[str, Any]) -> list[Any]:
        """The call's arguments as stored: one value per parameter, in order, defaults filled."""
        if not kwargs and len(args) == len(self.params) and not self._kw_names:
            return list(args)
        try:
            bound = self._sig.bind(None, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}(): {exc}") from None
        bound.apply_defaults()
        return list(bound.arguments.values())[1:]

    def invoke(self, state: S, args: Sequence[Any]) -> R:
        """Run the body on `state` with stored-form arguments (no logging)."""
        result: R = _invoke(self.fn, state, args, self._n_pos, self._kw_names)
        return result

    def check(self, state: S, args: Sequence[Any]) -> None:
        """Run the validator, if any, on `state` with stored-form arguments."""
        if self.validate is None:
            return
        prev = _mode()
        _tls.mode = _VALIDATING
        try:
            _invoke(self.validate, state, args, self._n_pos, self._kw_names)
        finally:
            _tls.mode = prev

    def apply(self, state: S, args: Sequence[Any]) -> R:
        """Run the body as part of an applied commit (nested operation calls run directly)."""
        prev = _mode()
        _tls.mode = _APPLYING
        try:
            return self.invoke(state, args)
        finally:
            _tls.mode = prev

    def _dispatch(self, obj: S, /, *args: Any, **kwargs: Any) -> R:
        mode = _mode()
        if mode == _APPLYING:
            return self.fn(obj, *args, **kwargs)
        if mode == _VALIDATING:
            raise RuntimeError(f"operation {self.name!r} was called from a validator; validators only read the state")
        entry = _MANAGED.get(id(obj))
        if entry is None or entry[0]() is not obj:
            stored = self.canonical(args, kwargs)
            self.check(obj, stored)
            return self.apply(obj, stored)
        store: Optional[MachineStore[S]] = entry[1]()
        if store is None:
            raise StoreClosedError(
                f"the store that managed this {type(obj).__name__} is gone (it was never closed);"
                " keep a reference to the store while you use its state"
            )
        store._check_op(self)
        return cast(R, store._commit_one(store._prepare(self, args, kwargs), None))

    def args_for_replay(self, version: Any, args: Any, seq: int) -> list[Any]:
        """A logged record's arguments in the current shape (upgrade applied); ReplayError if impossible."""
        if isinstance(args, tuple):
            args = list(args)
        if type(version) is not int or not isinstance(args, list):
            raise ReplayError(
                f"commit {seq}: operation {self.name!r} has a malformed argument record"
                f" (expected [version, [args...]], got version {version!r})"
            )
        if version > self.version:
            raise ReplayError(
                f"commit {seq}: operation {self.name!r} was logged as version {version}, newer than this"
                f" code's version {self.version}; open the store with the release that wrote it"
            )
        if version < self.version:
            if self.upgrade is None:
                raise ReplayError(
                    f"commit {seq}: operation {self.name!r} was logged as version {version}, this code is"
                    f" version {self.version} and declares no upgrade= to convert it"
                )
            try:
                args = list(self.upgrade(version, args))
            except Exception as exc:
                raise ReplayError(
                    f"commit {seq}: upgrading operation {self.name!r} from version {version} raised {exc!r}"
                ) from exc
        if len(args) != len(self.params):
            how = (
                f"version {version} upgraded to {self.version}"
                if version < self.version
                else (f"version {version}; did its parameters change without a new version?")
            )
            raise ReplayError(
                f"commit {seq}: operation {self.name!r} has {len(args)} arguments, its parameters"
                f" {self.params} take {len(self.params)} ({how})"
            )
        return cast(list[Any], args)

    def __repr__(self) -> str:
        return f"<walstore.Operation {self.name!r} version {self.version}>"


@overload
def operation(fn: Callable[Concatenate[S, P], R], /) -> Operation[S, P, R]: ...


@overload
def operation(
    *, name: Optional[str] = None, version: int = 1, upgrade: Optional[Upgrade] = None
) -> Callable[[Callable[Concatenate[S, P], R]], Operation[S, P, R]]: ...


def operation(
    fn: Optional[Callable[Concatenate[S, P], R]] = None,
    /,
    *,
    name: Optional[str] = None,
    version: int = 1,
    upgrade: Optional[Upgrade] = None,
) -> Any:
    """Declare a method of the state class as a logged operation.

    `@walstore.operation` or `@walstore.operation(name=..., version=..., upgrade=...)`.
    `name` is what the log stores (default: the method's name; keep it when
    you rename the method). `version` is stored with each record; at replay an
    older record's arguments go through `upgrade(old_version, args) -> args`.
    """
    if fn is not None:
        return Operation(fn, name=name, version=version, upgrade=upgrade)

    def wrap(f: Callable[Concatenate[S, P], R]) -> Operation[S, P, R]:
        return Operation(f, name=name, version=version, upgrade=upgrade)

    return wrap


# ---- the state class's declaration ------------------------------------------------


class _Spec:
    """A state class's operations by stored name, and how its state is snapshotted."""

    def __init__(self, cls: type[Any]) -> None:
        self.cls = cls
        # Base classes first; a subclass's operation replaces an inherited one with the same
        # attribute or the same stored name.
        by_attr: dict[str, Operation[Any, Any, Any]] = {}
        for klass in reversed(cls.__mro__):
            own: dict[str, Operation[Any, Any, Any]] = {}
            for attr, value in vars(klass).items():
                if isinstance(value, Operation):
                    if own.get(value.name, value) is not value:
                        raise TypeError(f"{klass.__qualname__}: two operations are named {value.name!r}")
                    own[value.name] = value
                    by_attr[attr] = value
                else:
                    by_attr.pop(attr, None)
            for attr, op in list(by_attr.items()):
                if own.get(op.name, op) is not op:
                    del by_attr[attr]
        self.ops: dict[str, Operation[Any, Any, Any]] = {op.name: op for op in by_attr.values()}
        if not self.ops:
            raise TypeError(f"{cls.__qualname__} declares no operations (decorate methods with @walstore.operation)")
        snap = getattr(cls, "__walstore_snapshot__", None)
        restore = getattr(cls, "__walstore_restore__", None)
        if (snap is None) != (restore is None):
            raise TypeError(
                f"{cls.__qualname__}: define both __walstore_snapshot__ and __walstore_restore__, or neither"
            )
        self.custom = snap is not None
        self.snapshot: Callable[[Any], Any] = snap if snap is not None else self._default_snapshot
        self.restore: Callable[[Any], Any] = restore if restore is not None else self._default_restore

    def _default_snapshot(self, state: Any) -> Any:
        try:
            return vars(state)
        except TypeError:
            raise SnapshotError(
                f"{type(state).__name__} has no __dict__ to snapshot; define __walstore_snapshot__"
                " and __walstore_restore__"
            ) from None

    def _default_restore(self, value: Any) -> Any:
        if not isinstance(value, dict):
            raise TypeError(
                f"the default snapshot of {self.cls.__qualname__} is a dict of its attributes,"
                f" not {type(value).__name__}"
            )
        cls: Any = self.cls
        obj = cls.__new__(cls)
        obj.__dict__.update(value)
        return obj

    def names(self) -> str:
        return ", ".join(sorted(self.ops))


_SPECS: weakref.WeakKeyDictionary[type[Any], _Spec] = weakref.WeakKeyDictionary()


def _spec_for(cls: type[Any]) -> _Spec:
    spec = _SPECS.get(cls)
    if spec is None:
        spec = _SPECS[cls] = _Spec(cls)
    return spec


# ---- replay -------------------------------------------------------------------------


class _Replayer:
    """Rebuilds the state from a snapshot's blob and the log's CALL operations, in order."""

    def __init__(self, spec: _Spec, codec: Codec, init: Callable[[], Any]) -> None:
        self.spec = spec
        self.codec = codec
        self.init = init
        self.state: Any = None
        self.ops = 0
        self._chunks: list[bytes] = []
        self._kind = -1

    def apply_range(self, buf: Any, start: int, end: int) -> None:
        mv = memoryview(buf)
        if not (mv.itemsize == 1 and mv.ndim == 1):
            mv = mv.cast("B")
        off = start
        while off < end:
            if end - off < _HS:
                raise ReplayError(f"record at offset {off}: a frame runs past the end of the range")
            length, rtype = _LEN_TYPE.unpack_from(mv, off + 4)
            (seq,) = _U64.unpack_from(mv, off + 16)
            body = off + _HS
            if length > end - body:
                raise ReplayError(f"record at offset {off}: a frame runs past the end of the range")
            if rtype == fmt.REC_COMMIT:
                self._commit(mv[body : body + length], seq)
            elif rtype == fmt.REC_SNAPSHOT_DATA:
                self._snapshot_data(mv[body : body + length], seq)
            elif rtype == fmt.REC_SNAPSHOT_END:
                self._snapshot_end(seq)
            elif rtype != fmt.REC_CLOSE:
                raise ReplayError(f"record at offset {off}: type {rtype} carries no operations")
            off = body + fmt.padded(length)

    def _commit(self, payload: memoryview, seq: int) -> None:
        try:
            ops = list(fmt.iter_ops(payload))
        except fmt.PayloadError as exc:
            raise ReplayError(f"commit {seq}: {exc}") from None
        if self.state is None:
            self.state = self.init()
        for op in ops:
            if op.op != fmt.OP_CALL:
                raise ReplayError(
                    f"commit {seq} holds a {fmt.OP_NAMES[op.op]} operation, not a call: this looks like"
                    " a key-value store's log; open it with walstore.open()"
                )
            name = op.key.decode("utf-8", "replace")
            oper = self.spec.ops.get(name)
            if oper is None:
                raise ReplayError(
                    f"commit {seq} calls operation {name!r}, which {self.spec.cls.__qualname__} does not"
                    f" define (it defines: {self.spec.names()}); restore the operation (under its old name,"
                    f" with @walstore.operation(name={name!r})) to open this store"
                )
            try:
                record = self.codec.decode(op.value)
                version, args = record
            except Exception as exc:
                raise ReplayError(f"commit {seq}: the arguments of {name!r} do not decode: {exc}") from exc
            args = oper.args_for_replay(version, args, seq)
            try:
                oper.apply(self.state, args)
            except Exception as exc:
                raise ReplayError(
                    f"commit {seq}: operation {name!r} raised {exc!r} during replay. An operation must be"
                    " deterministic and its body must not raise (a body that raised in the live run"
                    " poisoned the store at this commit); fix the operation, then reopen"
                ) from exc
            self.ops += 1

    def _snapshot_data(self, payload: memoryview, seq: int) -> None:
        try:
            ops = list(fmt.iter_ops(payload))
        except fmt.PayloadError as exc:
            raise ReplayError(f"snapshot {seq}: {exc}") from None
        for op in ops:
            kind = op.value_kind
            if (
                op.op != fmt.OP_PUT
                or op.key
                or kind not in (fmt.VALUE_BYTES, fmt.VALUE_CODEC)
                or (self._kind not in (-1, kind))
            ):
                raise ReplayError(
                    f"snapshot {seq} holds key-value entries, not a state blob: this looks like a"
                    " key-value store's snapshot; open it with walstore.open()"
                )
            self._kind = kind
            self._chunks.append(op.value)

    def _snapshot_end(self, seq: int) -> None:
        if self._kind < 0:
            raise ReplayError(f"snapshot {seq} holds no state blob")
        blob = b"".join(self._chunks)
        kind, self._chunks, self._kind = self._kind, [], -1
        try:
            value = self.codec.decode(blob) if kind == fmt.VALUE_CODEC else blob
            self.state = self.spec.restore(value)
        except Exception as exc:
            raise ReplayError(
                f"the snapshot at sequence number {seq} does not restore a {self.spec.cls.__qualname__}: {exc!r}"
            ) from exc

    def finish(self) -> Any:
        if self._kind >= 0:
            raise ReplayError("a snapshot ended without its end record")
        return self.state if self.state is not None else self.init()


def _blob_payloads(kind: int, blob: bytes) -> Iterator[bytes]:
    """SNAPSHOT_DATA payloads: the state blob cut into chunks, one empty-key PUT each."""
    flags = kind << fmt.VALUE_KIND_SHIFT
    mv = memoryview(blob)
    pos = 0
    while True:
        chunk = mv[pos : pos + snapshot.CHUNK_BYTES]
        yield _OPH_PACK(fmt.OP_PUT, flags, 0, 0, len(chunk)) + chunk
        pos += snapshot.CHUNK_BYTES
        if pos >= len(blob):
            return


# ---- the store ----------------------------------------------------------------------


class _Prepared:
    """One call, encoded for the log and decoded back for the apply."""

    __slots__ = ("op", "encoded", "args")

    def __init__(self, op: Operation[Any, Any, Any], encoded: bytes, args: list[Any]) -> None:
        self.op = op
        self.encoded = encoded
        self.args = args

    def payload(self) -> bytes:
        key, value = self.op.key, self.encoded
        return _OPH_PACK(fmt.OP_CALL, _CALL_FLAGS, 0, len(key), len(value)) + key + value


def _check_durability(durability: Optional[str]) -> None:
    if durability is not None:
        check_durability(durability)


class MachineStore(DurableStore, Generic[S]):
    """An application's state behind the log. Open with `walstore.open_machine(path, StateClass)`.

    `state` is the live object: call its operations to change it (each call
    is one commit), read it freely from the thread that writes, or through
    `read()` from other threads. Use as a context manager.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        state_type: type[S],
        *,
        init: Optional[Callable[[], S]] = None,
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
        self._spec = _spec_for(state_type)
        self._codec = get_codec(codec)
        self._exact_scalars = type(self._codec) in (JSONCodec, PickleCodec)
        self._durability = durability
        self._init_compaction(auto_compact, compact_min_bytes, compact_ratio, keep_snapshots)
        self._lock = threading.RLock()
        self._poisoned = False
        replayers: list[_Replayer] = []
        make: Callable[[], Any] = init if init is not None else state_type

        def factory(identity: Identity) -> _Replayer:
            r = _Replayer(self._spec, self._codec, make)
            replayers.append(r)
            return r

        options = WriterOptions(durability, interval_ms, segment_size, preallocate)
        core = LogCore(
            path,
            factory,
            codec_name=self._codec.name,
            kind=f"machine:{state_type.__qualname__}",
            options=options,
            create=create,
            fs=fs,
        )
        try:
            state = replayers[0].finish()
            if not isinstance(state, state_type):
                raise TypeError(f"the state is a {type(state).__name__}, not a {state_type.__qualname__}")
            core.release_buffers()
            self._state: S = state
            self.replayed_ops = replayers[0].ops
            self._opened(core)
            self._manage(state)
        except BaseException:
            core.abandon()
            raise

    def _manage(self, state: S) -> None:
        key = id(state)

        def gone(ref: weakref.ref[Any]) -> None:
            entry = _MANAGED.get(key)
            if entry is not None and entry[0] is ref:
                del _MANAGED[key]

        try:
            ref = weakref.ref(state, gone)
        except TypeError:
            raise TypeError(
                f"{type(state).__name__} objects must support weak references (add '__weakref__' to __slots__)"
            ) from None
        _MANAGED[key] = (ref, weakref.ref(self))

    # ---- identity and state ----------------------------------------------------

    @property
    def state(self) -> S:
        """The live state. Change it only through its operations."""
        self._core.check_open()
        return self._state

    def read(self, fn: Callable[[S], T]) -> T:
        """`fn(state)` under the store's lock: a consistent read while other threads commit."""
        with self._lock:
            self._core.check_open()
            return fn(self._state)

    def stats(self) -> dict[str, Any]:
        """Counters: commits and fsyncs since open (commits/fsyncs is the group-commit batch)."""
        return {**self._log_stats(), "durability": self._durability, "replayed_ops": self.replayed_ops}

    # ---- commits ---------------------------------------------------------------

    def _check_op(self, op: Operation[Any, Any, Any]) -> None:
        if self._spec.ops.get(op.name) is not op:
            raise TypeError(f"{op!r} is not an operation of {self._spec.cls.__qualname__}")

    def _prepare(self, op: Operation[Any, Any, Any], args: Sequence[Any], kwargs: dict[str, Any]) -> _Prepared:
        stored = op.canonical(args, kwargs)
        encoded = self._codec.encode([op.version, stored])
        if self._exact_scalars and all(type(a) in _SCALARS for a in stored):
            return _Prepared(op, encoded, stored)  # these decode to equal values: skip the decode
        decoded = self._codec.decode(encoded)[1]  # applied live as replay will see it
        return _Prepared(op, encoded, list(decoded))

    def call(self, op: Operation[S, P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run `op` as one commit: `store.call(Bank.deposit, "ada", 5)` is `store.state.deposit("ada", 5)`."""
        self._check_op(op)
        result: R = self._commit_one(self._prepare(op, args, kwargs), None)
        return result

    def _commit_one(self, prepared: _Prepared, durability: Optional[str]) -> Any:
        """Validate, log and apply one call (the lock is held from the validator to the apply)."""
        _outside_operations("a commit")
        op = prepared.op
        state = self._state
        out: list[Any] = []

        def apply(state: Any, args: list[Any]) -> None:
            try:
                out.append(op.apply(state, args))
            except BaseException:
                self._poisoned = True
                raise

        with self._lock:
            self._core.check_open()
            op.check(state, prepared.args)
            seq = self._writer.commit_op(
                fmt.OP_CALL, _CALL_FLAGS, op.key, prepared.encoded, apply, state, prepared.args, NONE
            )
        self._after_commit(seq, durability)
        return out[0]

    def _commit_many(self, calls: list[_Prepared], durability: Optional[str]) -> list[Any]:
        _outside_operations("a commit")
        payload = b"".join(c.payload() for c in calls)
        state = self._state
        results: list[Any] = []

        def apply() -> None:
            try:
                for c in calls:
                    results.append(c.op.apply(state, c.args))
            except BaseException:
                self._poisoned = True
                raise

        with self._lock:
            self._core.check_open()
            checked = [i for i, c in enumerate(calls) if c.op.validate is not None]
            if checked and checked[-1] > 0:
                self._rehearse(calls[: checked[-1] + 1])
            elif checked:
                calls[0].op.check(state, calls[0].args)
            seq = self._writer.commit(payload, apply, NONE)
        self._after_commit(seq, durability)
        return results

    def _rehearse(self, calls: list[_Prepared]) -> None:
        """Validate each call against a copy of the state with the calls before it applied."""
        try:
            scratch = copy.deepcopy(self._state)
        except Exception as exc:
            raise WalstoreError(
                "this transaction's later operations have validators, which run on a copy of the state,"
                f" and copy.deepcopy failed: {exc!r}; define __deepcopy__ on the state"
            ) from exc
        last = len(calls) - 1
        for i, c in enumerate(calls):
            args = list(self._codec.decode(c.encoded)[1])  # fresh: the body may keep or change them
            c.op.check(scratch, args)
            if i < last:
                c.op.apply(scratch, args)  # raising here rejects the transaction: nothing is logged

    def _after_commit(self, seq: int, durability: Optional[str]) -> None:
        if (durability or self._durability) == SYNC:
            self._core.wait_durable(seq)

    def transaction(self, *, durability: Optional[str] = None) -> MachineTransaction[S]:
        """Several operations as one commit: `with store.transaction() as tx: tx.call(Bank.deposit, ...)`."""
        self._core.check_open()
        _check_durability(durability)
        return MachineTransaction(self, durability)

    def sync(self) -> None:
        """Make every commit so far durable (what `interval` and `none` modes hold back)."""
        _outside_operations("sync()")
        super().sync()

    # ---- snapshots -------------------------------------------------------------

    def _encode_state(self, state: S) -> tuple[int, bytes]:
        try:
            value = self._spec.snapshot(state)
            if isinstance(value, (bytes, bytearray, memoryview)):
                return fmt.VALUE_BYTES, bytes(value)
            return fmt.VALUE_CODEC, self._codec.encode(value)
        except SnapshotError:
            raise
        except Exception as exc:
            hint = (
                ""
                if self._spec.custom
                else (
                    "; the default snapshot encodes the state's attributes with the codec: define"
                    " __walstore_snapshot__ and __walstore_restore__ for other state"
                )
            )
            raise SnapshotError(f"snapshotting the state failed: {exc!r}{hint}; nothing changed") from exc

    def _verify(self, kind: int, blob: bytes) -> None:
        """Restore a state from `blob` and check that it snapshots equal to the live one (lock held)."""
        try:
            restored = self._spec.restore(self._codec.decode(blob) if kind == fmt.VALUE_CODEC else blob)
            again = self._encode_state(restored)
            same = again == (kind, blob) and self._spec.snapshot(restored) == self._spec.snapshot(self._state)
        except SnapshotError:
            raise
        except Exception as exc:
            raise SnapshotError(f"the snapshot does not restore: {exc!r}; nothing changed") from exc
        if not same:
            raise SnapshotError(
                "the state does not survive its snapshot: after restore it differs from the live state"
                " (the json codec turns tuples into lists and int dict keys into str); nothing changed"
            )

    def compact(self, *, wait: bool = True, verify: bool = False) -> Optional[snapshot.SnapshotInfo]:
        """Write a base snapshot of the state and drop the log it covers.

        The state is snapshotted (`__walstore_snapshot__`, or its attributes
        through the codec) under the store's lock, at the sequence number S
        it is as of; off the lock, the log up to S is made durable, the file
        is written and fsynced, renamed into place, and only then are
        covered segments removed. A failure leaves the store as it was. verify=True also restores the snapshot
        and checks it equals the live state (under the lock: for tests).
        With wait=False it runs in a background thread and returns None.
        """
        _outside_operations("compact()")
        return self._start_compaction(wait, {"verify": verify})

    def _compact_locked(self, **options: Any) -> Optional[snapshot.SnapshotInfo]:
        core = self._core
        verify = bool(options.get("verify", False))
        # Roll the segment first, off our lock, so that the snapshot covers whole segments
        # unless commits slip in before we capture (their records are then skipped at replay).
        self._writer.seal_for_snapshot()
        with self._lock:
            core.check_open()
            if self._poisoned:
                raise SnapshotError("an operation's body raised and poisoned the store; no snapshot written")
            seq = self._writer.last_seq
            if seq == self._snapshot_seq:
                return None
            kind, blob = self._encode_state(self._state)
            if verify:
                self._verify(kind, blob)
        # Commits after the seal are in the active segment, perhaps not yet synced (interval and
        # none modes): the snapshot must never claim a state the durable log has not reached, or
        # after a power loss the writer would continue that segment at the wrong sequence number.
        core.wait_durable(seq)
        info = snapshot.write_snapshot(
            core.fs,
            self.path,
            core.identity.store_id,
            seq,
            _blob_payloads(kind, blob),
            burst=self._writer.burst_writer(),  # bursts paced between commits' syncs
        )
        del blob
        doomed = snapshot.covered_files(self.path, seq, self._keep_snapshots)
        # The sealed segment first, if it goes: it is closed before its unlink, so its blocks
        # are freed (and trimmed, with `discard`) in that unlink's held turn, not at a close after.
        self._writer.finish_seal([os.path.basename(path) for path in doomed])
        snapshot.remove_covered(core.fs, self.path, seq, self._keep_snapshots, self._writer.held_turn, doomed)
        return info

    # ---- close -----------------------------------------------------------------

    def close(self) -> None:
        """Wait for a running compaction, sync, mark the log cleanly closed, release the lock.

        Idempotent. Operations on the state afterwards raise StoreClosedError.
        """
        _outside_operations("close()")
        super().close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"seq {self.last_seq}"
        return f"<walstore.MachineStore {self._spec.cls.__qualname__} {self.path!r} {state}>"


class Pending(Generic[R]):
    """The result of an operation in a transaction, available once the transaction committed."""

    __slots__ = ("_value", "_done")

    def __init__(self) -> None:
        self._done = False
        self._value: Any = None

    @property
    def done(self) -> bool:
        return self._done

    @property
    def value(self) -> R:
        if not self._done:
            raise WalstoreError("the transaction has not committed; its results are not known")
        result: R = self._value
        return result

    def _set(self, value: Any) -> None:
        self._value = value
        self._done = True

    def __repr__(self) -> str:
        return f"<Pending {self._value!r}>" if self._done else "<Pending (not committed)>"


class MachineTransaction(Generic[S]):
    """Operations buffered until the `with` block ends; then validated, logged as one commit, applied.

    `tx.call(op, *args)` encodes the call at once (a bad argument raises
    there) and returns a Pending result. At commit, under the store's lock,
    the validators run in order, each seeing the operations before it
    applied (on a copy of the state when a later operation has a
    validator); any rejection raises from the commit with nothing logged.
    An exception in the block discards every call. Not isolated: other
    threads' commits before this one are visible to its validators.
    """

    def __init__(self, store: MachineStore[S], durability: Optional[str]) -> None:
        self._store = store
        self._durability = durability
        self._calls: list[_Prepared] = []
        self._pending: list[Pending[Any]] = []
        self._open = True

    def _check(self) -> None:
        if not self._open:
            raise TransactionClosedError("this transaction's block has ended; start a new one")

    def call(self, op: Operation[S, P, R], /, *args: P.args, **kwargs: P.kwargs) -> Pending[R]:
        """Add `op(*args, **kwargs)` to the transaction."""
        self._check()
        self._store._check_op(op)
        self._calls.append(self._store._prepare(op, args, kwargs))
        pending: Pending[R] = Pending()
        self._pending.append(pending)
        return pending

    def __len__(self) -> int:
        return len(self._calls)

    def commit(self) -> None:
        """Validate, log (one record; none if empty) and apply the calls."""
        self._check()
        self._open = False
        if not self._calls:
            return
        if len(self._calls) == 1:
            results = [self._store._commit_one(self._calls[0], self._durability)]
        else:
            results = self._store._commit_many(self._calls, self._durability)
        for pending, value in zip(self._pending, results):
            pending._set(value)

    def rollback(self) -> None:
        """Discard the calls."""
        self._open = False
        self._calls.clear()

    def __enter__(self) -> MachineTransaction[S]:
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


open_machine = MachineStore
"""`walstore.open_machine(path, StateClass, ...)` opens (or creates) a store holding a
`StateClass` state: the newest snapshot restored (`__walstore_restore__`, or the attributes
set on a new object) or `init()` (default `StateClass()`), then every logged operation
replayed in order. The options are `MachineStore`'s, as for `walstore.open`."""


__all__ = [
    "MachineStore",
    "MachineTransaction",
    "Operation",
    "Pending",
    "Upgrade",
    "open_machine",
    "operation",
]
