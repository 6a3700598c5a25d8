"""Canonical msgpack: one byte string per value, so signatures are stable.

Rules (checked on decode, so a non-canonical document is refused rather than
silently re-encoded):

* Only nil, bool, int (64-bit), str (UTF-8), bin, array and map. No floats (their
  encodings vary), no ext types, no timestamps.
* Map keys are str and appear sorted by their UTF-8 bytes, without duplicates.
* Integers, lengths and headers use the shortest msgpack encoding (the one
  msgpack-python writes).

Theory of operation: a budget, checked while decoding
-----------------------------------------------------
``decode`` sees bytes nobody has vouched for yet (a peer's frame, a stick's
envelope, a request file), so what it may spend is fixed before it starts: a
``limits.DecodeBudget`` (input bytes, objects built, nesting depth, entries
per container, bytes per str and bin). The decoder is a small hand-written
parser rather than msgpack-python's, because the C unpacker can only be
bounded per container: a few kilobytes of small containers still build tens
of millions of Python objects (~72 bytes each) before any limit is consulted,
and the old check-after-decode re-encoding doubled that. Here:

* every value built (map keys included) is counted against ``max_objects``
  *before* it is built, and containers are filled by appending, never
  preallocated from a declared length; a declared length must also fit in
  the bytes that remain (each entry takes at least one), so a lying header is
  refused at once;
* canonical form is checked byte by byte as the value is read (shortest
  forms, sorted keys), so no second encoding is made to compare;
* recursion is bounded by ``max_depth`` (at most a few dozen frames).

So a decode holds at most ``budget.memory_bytes`` and runs in time linear in
its input, whatever the input; ``tests/unit/test_decode_budget.py`` measures
both. Callers that can check a signature over raw bytes first do so
(``trust.Envelope.decode`` builds nothing but the envelope's few fields) and
decode the payload only once it verified.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from p2pupd.protocol import limits
from p2pupd.protocol.errors import CodecError, FrameTooLargeError
from p2pupd.protocol.limits import DecodeBudget

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


def decode(
    data: bytes | bytearray | memoryview,
    max_bytes: int | None = None,
    *,
    budget: DecodeBudget = limits.LOCAL_DOCUMENT_BUDGET,
) -> Value:
    """Decode canonical msgpack within ``budget``, refusing anything non-canonical.

    ``max_bytes``, if given, lowers the budget's input limit. Raises
    ``FrameTooLargeError`` when the input or anything it would build exceeds
    the budget (checked before that thing is built) and ``CodecError`` for
    every other malformation; nothing else escapes.
    """
    if max_bytes is not None:
        budget = budget.capped(max_bytes)
    if len(data) > budget.max_bytes:
        raise FrameTooLargeError(
            f"{budget.name} of {len(data)} bytes exceeds limit {budget.max_bytes}"
        )
    buf = data if isinstance(data, bytes) else bytes(data)
    dec = _Decoder(buf, budget)
    try:
        value = dec.value(0)
        if dec.pos != len(buf):
            raise CodecError(f"{len(buf) - dec.pos} bytes after its value")
    except (IndexError, struct.error):
        raise CodecError(f"malformed msgpack in {budget.name}: truncated") from None
    except UnicodeDecodeError:
        raise CodecError(f"malformed msgpack in {budget.name}: a str is not UTF-8") from None
    except CodecError as exc:
        raise CodecError(f"malformed msgpack in {budget.name}: {exc}") from None
    return value


_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from
_I8 = struct.Struct(">b").unpack_from
_I16 = struct.Struct(">h").unpack_from
_I32 = struct.Struct(">i").unpack_from
_I64 = struct.Struct(">q").unpack_from

# (reader, width, smallest value that needs this form) per fixed-width int code;
# a smaller value has a shorter canonical form, so it is refused here.
_UINTS = {0xCC: (None, 1, 0x80), 0xCD: (_U16, 2, 1 << 8), 0xCE: (_U32, 4, 1 << 16),
          0xCF: (_U64, 8, 1 << 32)}  # fmt: skip
# Negative ints: (reader, width, largest value that needs this form).
_INTS = {0xD0: (_I8, 1, -33), 0xD1: (_I16, 2, -129), 0xD2: (_I32, 4, -(1 << 15) - 1),
         0xD3: (_I64, 8, -(1 << 31) - 1)}  # fmt: skip


class _Decoder:
    """One decode: the input, a read position and what is left of the budget."""

    __slots__ = ("budget", "data", "left", "max_bin", "max_depth", "max_len", "max_str", "pos")

    def __init__(self, data: bytes, budget: DecodeBudget) -> None:
        self.data = data
        self.pos = 0
        self.budget = budget
        self.left = budget.max_objects
        self.max_depth = budget.max_depth
        self.max_len = budget.max_len
        self.max_str = budget.max_str
        self.max_bin = budget.max_bin

    def _over(self, what: str) -> FrameTooLargeError:
        return FrameTooLargeError(f"{self.budget.name} exceeds its decode budget: {what}")

    def value(self, depth: int) -> Value:
        """Read one value at ``pos`` (``depth`` containers deep) and return it."""
        self.left -= 1
        if self.left < 0:
            raise self._over(f"more than {self.budget.max_objects} values")
        data = self.data
        pos = self.pos
        b = data[pos]
        pos += 1
        if b < 0x80:
            self.pos = pos
            return b
        if b >= 0xE0:
            self.pos = pos
            return b - 0x100
        if b >= 0xA0 and b < 0xC0:
            return self._str(pos, b & 0x1F, 0)
        if b >= 0x90 and b < 0xA0:
            self.pos = pos
            return self._array(b & 0x0F, depth)
        if b < 0x90:
            self.pos = pos
            return self._map(b & 0x0F, depth)
        if b == 0xC4:
            return self._bin(pos + 1, data[pos], 0)
        if b in _UINTS:
            reader, width, least = _UINTS[b]
            v = data[pos] if reader is None else reader(data, pos)[0]
            if v < least:
                raise CodecError(f"integer {v} is not in its shortest form")
            self.pos = pos + width
            return v
        if b in _INTS:
            reader, width, most = _INTS[b]
            v = reader(data, pos)[0]
            if v > most:
                raise CodecError(f"integer {v} is not in its shortest form")
            self.pos = pos + width
            return v
        if b == 0xC0:
            self.pos = pos
            return None
        if b in (0xC2, 0xC3):
            self.pos = pos
            return b == 0xC3
        if b == 0xD9:
            return self._str(pos + 1, data[pos], 32)
        if b == 0xDA:
            return self._str(pos + 2, _U16(data, pos)[0], 1 << 8)
        if b == 0xDB:
            return self._str(pos + 4, _U32(data, pos)[0], 1 << 16)
        if b == 0xC5:
            return self._bin(pos + 2, _U16(data, pos)[0], 1 << 8)
        if b == 0xC6:
            return self._bin(pos + 4, _U32(data, pos)[0], 1 << 16)
        if b in (0xDC, 0xDE):
            n = _U16(data, pos)[0]
            self.pos = pos + 2
            least = 16
        elif b in (0xDD, 0xDF):
            n = _U32(data, pos)[0]
            self.pos = pos + 4
            least = 1 << 16
        elif b in (0xCA, 0xCB):
            raise CodecError("floats are not allowed")
        else:
            raise CodecError(f"msgpack type 0x{b:02x} is not allowed")
        if n < least:
            raise CodecError(f"container of {n} entries is not in its shortest form")
        return self._array(n, depth) if b in (0xDC, 0xDD) else self._map(n, depth)

    def _str(self, pos: int, n: int, least: int) -> str:
        if n < least:
            raise CodecError(f"str of {n} bytes is not in its shortest form")
        if n > self.max_str:
            raise self._over(f"a str of {n} bytes (limit {self.max_str})")
        end = pos + n
        if end > len(self.data):
            raise IndexError
        self.pos = end
        return self.data[pos:end].decode("utf-8")

    def _bin(self, pos: int, n: int, least: int) -> bytes:
        if n < least:
            raise CodecError(f"bin of {n} bytes is not in its shortest form")
        if n > self.max_bin:
            raise self._over(f"a bin of {n} bytes (limit {self.max_bin})")
        end = pos + n
        if end > len(self.data):
            raise IndexError
        self.pos = end
        return self.data[pos:end]

    def _open(self, n: int, depth: int, per_entry: int) -> None:
        """Check a container header of ``n`` entries before reading any of them."""
        if depth >= self.max_depth:
            raise CodecError(f"it nests deeper than {self.max_depth}")
        if n > self.max_len:
            raise self._over(f"a container of {n} entries (limit {self.max_len})")
        if n * per_entry > len(self.data) - self.pos:
            raise CodecError(f"container declares {n} entries, the input ends first")

    def _array(self, n: int, depth: int) -> list[Value]:
        self._open(n, depth, 1)
        read = self.value
        depth += 1
        return [read(depth) for _ in range(n)]

    def _map(self, n: int, depth: int) -> dict[str, Value]:
        self._open(n, depth, 2)
        out: dict[str, Value] = {}
        data = self.data
        read = self.value
        depth += 1
        prev = b""
        for i in range(n):
            head = self.pos
            key = read(depth)
            if type(key) is not str:
                raise CodecError("map key is not a string")
            # The key's UTF-8 bytes, without the str header: canonical order.
            raw = data[head + _STR_HEAD[data[head]] : self.pos]
            if i and raw <= prev:
                raise CodecError("map keys are not in canonical order (sorted, unique)")
            prev = raw
            out[key] = read(depth)
        return out


# Header length of a str by its first byte (only str forms reach the lookup).
_STR_HEAD = {**dict.fromkeys(range(0xA0, 0xC0), 1), 0xD9: 2, 0xDA: 3, 0xDB: 5}
