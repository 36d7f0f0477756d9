"""The on-disk format, version 1: the one Python encoding of docs/FORMAT.md.

`_native/walstore_format.h` is the one C encoding; a test checks they agree.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import crc32c as _crc32c

FORMAT_VERSION = 1
MAGIC = b"WALSTORE"

KIND_SEGMENT = 1
KIND_SNAPSHOT = 2
KIND_IDENTITY = 3

FILE_HEADER_SIZE = 64
FRAME_HEADER_SIZE = 32
ALIGN = 8
MAX_PAYLOAD = 1 << 30

REC_COMMIT = 1
REC_CLOSE = 2
REC_SNAPSHOT_DATA = 3
REC_SNAPSHOT_END = 4
REC_META = 5
RECORD_TYPES = (REC_COMMIT, REC_CLOSE, REC_SNAPSHOT_DATA, REC_SNAPSHOT_END, REC_META)
RECORD_TYPE_NAMES = {
    REC_COMMIT: "commit",
    REC_CLOSE: "close",
    REC_SNAPSHOT_DATA: "snapshot-data",
    REC_SNAPSHOT_END: "snapshot-end",
    REC_META: "meta",
}

OP_PUT = 1
OP_DELETE = 2
OP_CALL = 3
OP_NAMES = {OP_PUT: "put", OP_DELETE: "delete", OP_CALL: "call"}

KEY_STR = 0x01
VALUE_BYTES = 0
VALUE_STR = 1
VALUE_CODEC = 2
VALUE_KIND_SHIFT = 1
VALUE_KIND_MASK = 0x06

OP_HEADER_SIZE = 12

# header: magic, version, kind, flags, store_id, first_seq, prev_seq, prev_size, reserved
FILE_HEADER = struct.Struct("<8sHHI16sQQQI")
# frame after the crc field: length, type, flags, reserved16, reserved32, seq, durable
FRAME_HEADER = struct.Struct("<IBBHIQQ")
OP_HEADER = struct.Struct("<BBHII")
U32 = struct.Struct("<I")
SNAPSHOT_END_PAYLOAD = struct.Struct("<QQ")

SEGMENT_NAME = re.compile(r"^seg-(\d{20})\.wal$")
SNAPSHOT_NAME = re.compile(r"^snap-(\d{20})\.snap$")
IDENTITY_NAME = "IDENTITY"
LOCK_NAME = "LOCK"
QUARANTINE_DIR = "quarantine"
PREALLOC_NAME = "prealloc.tmp"
PREALLOC_READY_NAME = "prealloc.ready"
TMP_SUFFIX = ".tmp"

_ZERO_PAD = bytes(ALIGN)


crc: Callable[..., int] = _crc32c.crc32c
"""crc(data, value=0): CRC32C (Castagnoli) of `data`, continuing from `value`."""


def padded(n: int) -> int:
    """`n` rounded up to the record alignment."""
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def segment_name(first_seq: int) -> str:
    return f"seg-{first_seq:020d}.wal"


def snapshot_name(seq: int) -> str:
    return f"snap-{seq:020d}.snap"


@dataclass(frozen=True)
class FileHeader:
    """The 64-byte header that starts every segment, snapshot and IDENTITY file."""

    kind: int
    store_id: bytes
    first_seq: int = 0
    prev_seq: int = 0
    prev_size: int = 0
    version: int = FORMAT_VERSION
    flags: int = 0

    def encode(self) -> bytes:
        body = FILE_HEADER.pack(
            MAGIC,
            self.version,
            self.kind,
            self.flags,
            self.store_id,
            self.first_seq,
            self.prev_seq,
            self.prev_size,
            0,
        )
        return body + U32.pack(crc(body))


class HeaderError(ValueError):
    """A file header that fails a check; `reason` is one line for an operator."""

    def __init__(self, reason: str, newer_version: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.newer_version = newer_version


def decode_file_header(data: bytes | memoryview) -> FileHeader:
    """Parse and check a file header. Raises HeaderError naming what is wrong."""
    if len(data) < FILE_HEADER_SIZE:
        raise HeaderError(f"file is {len(data)} bytes, shorter than a {FILE_HEADER_SIZE}-byte header")
    head = bytes(data[:FILE_HEADER_SIZE])
    if head[:8] != MAGIC:
        raise HeaderError(f"not a walstore file (magic {head[:8]!r})")
    magic, version, kind, flags, store_id, first_seq, prev_seq, prev_size, reserved = FILE_HEADER.unpack_from(head)
    (stored_crc,) = U32.unpack_from(head, 60)
    if crc(head[:60]) != stored_crc:
        raise HeaderError("file header CRC mismatch")
    if version > FORMAT_VERSION:
        raise HeaderError(
            f"format version {version} was written by a newer walstore (this one reads version {FORMAT_VERSION})",
            newer_version=version,
        )
    if version < 1:
        raise HeaderError(f"bad format version {version}")
    if kind not in (KIND_SEGMENT, KIND_SNAPSHOT, KIND_IDENTITY):
        raise HeaderError(f"unknown file kind {kind}")
    if flags != 0 or reserved != 0:
        raise HeaderError("non-zero reserved header fields")
    return FileHeader(kind, store_id, first_seq, prev_seq, prev_size, version, flags)


def encode_frame(rtype: int, seq: int, durable: int, payload: bytes | bytearray | memoryview) -> bytes:
    """One framed record, padded to the alignment."""
    length = len(payload)
    if length > MAX_PAYLOAD:
        raise ValueError(f"record payload of {length} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    pad = padded(length) - length
    body = b"".join((FRAME_HEADER.pack(length, rtype, 0, 0, 0, seq, durable), payload, _ZERO_PAD[:pad]))
    return U32.pack(crc(body)) + body


def frame_size(payload_length: int) -> int:
    return FRAME_HEADER_SIZE + padded(payload_length)


@dataclass(frozen=True)
class Op:
    """One decoded operation of a COMMIT or SNAPSHOT_DATA payload."""

    op: int
    flags: int
    key: bytes
    value: bytes

    @property
    def key_is_str(self) -> bool:
        return bool(self.flags & KEY_STR)

    @property
    def value_kind(self) -> int:
        return (self.flags & VALUE_KIND_MASK) >> VALUE_KIND_SHIFT


def op_flags(key_is_str: bool, value_kind: int) -> int:
    return (KEY_STR if key_is_str else 0) | (value_kind << VALUE_KIND_SHIFT)


def encode_op(op: int, flags: int, key: bytes, value: bytes = b"") -> bytes:
    return OP_HEADER.pack(op, flags, 0, len(key), len(value)) + key + value


class PayloadError(ValueError):
    """A payload whose operations do not decode."""


def iter_ops(payload: bytes | memoryview) -> Iterator[Op]:
    """Decode the operations of a payload, checking every length against the buffer."""
    mv = memoryview(payload)
    end = len(mv)
    pos = 0
    unpack = OP_HEADER.unpack_from
    while pos < end:
        if end - pos < OP_HEADER_SIZE:
            raise PayloadError(f"operation header cut short at payload offset {pos}")
        op, flags, reserved, klen, vlen = unpack(mv, pos)
        if op not in (OP_PUT, OP_DELETE, OP_CALL) or reserved or flags & ~(KEY_STR | VALUE_KIND_MASK):
            raise PayloadError(f"bad operation header at payload offset {pos}")
        if (flags & VALUE_KIND_MASK) >> VALUE_KIND_SHIFT > VALUE_CODEC:
            raise PayloadError(f"bad value kind at payload offset {pos}")
        pos += OP_HEADER_SIZE
        if klen > end - pos or vlen > end - pos - klen:
            raise PayloadError(f"operation lengths run past the payload at offset {pos}")
        key = bytes(mv[pos : pos + klen])
        pos += klen
        value = bytes(mv[pos : pos + vlen])
        pos += vlen
        yield Op(op, flags, key, value)
