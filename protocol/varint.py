"""Unsigned LEB128 varints for the compact binary headers (patches, packs).

Readers take a bound on the encoded length so a hostile header cannot make a
parser accumulate an unbounded integer: a longer varint is refused, not read.
"""

from __future__ import annotations

from p2pupd.protocol.errors import SchemaError


def encode_uvarint(n: int) -> bytes:
    """Return ``n`` (>= 0) as an unsigned LEB128 varint."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_uvarint(data: bytes | memoryview, pos: int, max_bytes: int, what: str) -> tuple[int, int]:
    """Return (value, position after it) of the varint at ``pos``.

    Raises ``SchemaError`` naming ``what`` if the input ends first or the varint
    is longer than ``max_bytes`` bytes.
    """
    value = shift = 0
    end = pos + max_bytes
    while True:
        if pos >= len(data) or pos >= end:
            raise SchemaError(f"{what} is truncated or malformed")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
