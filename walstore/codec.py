"""Value codecs: how values other than bytes and str are stored.

`bytes` and `str` values are stored as they are, whatever the codec. Other
values go through the store's codec. The default, JSON, is safe to load from
an untrusted file. Pickle runs arbitrary code when loading: use it only by
name (`codec="pickle"`) and only for stores whose files you trust.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Protocol

from .errors import CodecError, InvalidOptionError


class Codec(Protocol):
    """Encodes values to bytes and back. `name` is recorded in the store's IDENTITY."""

    name: str

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


class JSONCodec:
    """JSON (UTF-8, compact). Safe on untrusted input; tuples come back as lists."""

    name = "json"

    def __init__(self) -> None:
        self._encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        self._decode = json.JSONDecoder().decode

    def encode(self, value: Any) -> bytes:
        try:
            return self._encoder.encode(value).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise CodecError(f"the json codec cannot encode {type(value).__name__}: {exc}") from None

    def decode(self, data: bytes) -> Any:
        try:
            return self._decode(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CodecError(f"stored value is not valid JSON: {exc}") from None


class PickleCodec:
    """pickle, protocol 5. UNSAFE on files you do not trust: loading runs code."""

    name = "pickle"

    def encode(self, value: Any) -> bytes:
        try:
            return pickle.dumps(value, protocol=5)
        except Exception as exc:
            raise CodecError(f"the pickle codec cannot encode {type(value).__name__}: {exc}") from None

    def decode(self, data: bytes) -> Any:
        return pickle.loads(data)  # noqa: S301 - opted into by name, documented as unsafe


_CODECS: dict[str, type[JSONCodec] | type[PickleCodec]] = {"json": JSONCodec, "pickle": PickleCodec}


def get_codec(codec: str | Codec) -> Codec:
    """A codec by name ("json", "pickle") or an object with name/encode/decode."""
    if isinstance(codec, str):
        try:
            return _CODECS[codec]()
        except KeyError:
            raise InvalidOptionError(f"unknown codec {codec!r}; choose one of {sorted(_CODECS)}") from None
    for attr in ("name", "encode", "decode"):
        if not hasattr(codec, attr):
            raise InvalidOptionError(f"codec object lacks {attr!r}")
    return codec
