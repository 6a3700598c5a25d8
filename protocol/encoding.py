"""Canonical msgpack: one byte string per value, so signatures are stable.

Rules (checked on decode, so a non-canonical document is refused rather than
silently re-encoded):

* Only nil, bool, int (64-bit), str (UTF-8), bin, array and map. No floats (their
  encodings vary), no ext types, no timestamps.
* Map keys are str and appear sorted by their UTF-8 bytes, without duplicates.
* Integers and lengths use the shortest msgpack encoding (msgpack-python already
  does this on pack; on decode we re-encode and compare, which catches every
  other variation at O(n) cost).
* Nesting depth and container/string sizes are bounded (``limits``), so hostile
  input cannot make the decoder allocate or recurse without bound.
"""

from __future__ import annotations

from typing import Any

import msgpack

from p2pupd.protocol import limits
from p2pupd.protocol.errors import CodecError, FrameTooLargeError

Value = Any  # None | bool | int | str | bytes | list[Value] | dict[str, Value]

_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 64) - 1


def _canonical(value: Value, depth: int) -> Value:
    if depth > limits.MAX_NESTING_DEPTH:
        raise CodecError("value nests too deeply")
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise CodecError(f"integer out of range: {value}")
        return value
    if isinstance(value, (list, tuple)):
        return [_canonical(v, depth + 1) for v in value]
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise CodecError(f"map key is not a string: {k!r}")
        return {k: _canonical(value[k], depth + 1) for k in sorted(value, key=_key_bytes)}
    raise CodecError(f"type not allowed in canonical msgpack: {type(value).__name__}")


def _key_bytes(k: str) -> bytes:
    return k.encode("utf-8")


def encode(value: Value) -> bytes:
    """Return the canonical encoding of ``value``.

    Raises ``CodecError`` for a type outside the allowed set (a caller bug for
    values we build, a peer's fault for values we pass through).
    """
    return msgpack.packb(_canonical(value, 0), use_bin_type=True)  # type: ignore[no-any-return]


def decode(data: bytes, max_bytes: int = limits.MAX_MANIFEST_BYTES) -> Value:
    """Decode canonical msgpack, refusing anything non-canonical.

    Raises ``FrameTooLargeError`` when ``data`` exceeds ``max_bytes`` and
    ``CodecError`` for every other malformation; nothing else escapes.
    """
    if len(data) > max_bytes:
        raise FrameTooLargeError(f"document of {len(data)} bytes exceeds limit {max_bytes}")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=limits.MAX_STR_BYTES,
            max_bin_len=limits.MAX_BIN_BYTES,
            max_array_len=limits.MAX_CONTAINER_LEN,
            max_map_len=limits.MAX_CONTAINER_LEN,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise CodecError(f"malformed msgpack: {exc}") from None
    except Exception as exc:  # msgpack raises a few stragglers (e.g. OverflowError)
        raise CodecError(f"malformed msgpack: {type(exc).__name__}") from None
    _check_types(value, 0)
    if encode(value) != data:
        raise CodecError("msgpack is not in canonical form")
    return value


def _check_types(value: Value, depth: int) -> None:
    if depth > limits.MAX_NESTING_DEPTH:
        raise CodecError("value nests too deeply")
    if isinstance(value, float):
        raise CodecError("floats are not allowed")
    if isinstance(value, list):
        for v in value:
            _check_types(v, depth + 1)
    elif isinstance(value, dict):
        for v in value.values():
            _check_types(v, depth + 1)
    elif not (value is None or isinstance(value, (bool, int, str, bytes))):
        raise CodecError(f"type not allowed: {type(value).__name__}")
