"""Sets of blob indices as Python ints, and their ``HaveBits`` wire form.

A release's blobs are numbered by their position in the sorted digest list
(``BlobIndex``); a set of them is an ``int`` whose bit ``i`` stands for blob
``i``. Union, intersection and difference are then single C-level operations
however many blobs a release has, and a set of 16 MiB of 64 KiB blobs is a
32-byte integer. On the wire (``HaveBits``) the same bits travel
little-endian: byte ``k`` holds blobs ``8k .. 8k+7``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping

from p2pupd.protocol.wire import MAX_HAVE_BITS_BYTES


class BlobIndex:
    """A release's blobs in digest order: index <-> digest, and their sizes."""

    def __init__(self, sizes: Mapping[bytes, int]) -> None:
        self.digests = sorted(sizes)
        self.sizes = [sizes[d] for d in self.digests]
        self.position = {d: i for i, d in enumerate(self.digests)}
        self.count = len(self.digests)
        self.all = (1 << self.count) - 1

    def bits_of(self, digests: object) -> int:
        """The set of those of ``digests`` (an iterable of bytes) that are blobs of the release."""
        out = 0
        pos = self.position
        for d in digests:  # type: ignore[attr-defined]
            i = pos.get(d)
            if i is not None:
                out |= 1 << i
        return out

    def digests_of(self, bits: int) -> list[bytes]:
        return [self.digests[i] for i in iter_bits(bits)]

    def size_of(self, bits: int) -> int:
        return sum(self.sizes[i] for i in iter_bits(bits))


def iter_bits(bits: int) -> Iterator[int]:
    """The indices of the set bits, ascending."""
    while bits:
        low = bits & -bits
        yield low.bit_length() - 1
        bits ^= low


def pick_bit(bits: int, rng: random.Random, width: int) -> int:
    """One set bit of ``bits`` (non-zero), chosen from a random starting point.

    Not uniform (a bit after a long gap is likelier), but different on every
    call and every node, which is what spreading requests needs; O(1) big-int
    operations instead of a walk over every set bit.
    """
    start = rng.randrange(width) if width > 1 else 0
    upper = bits >> start
    if upper:
        return start + (upper & -upper).bit_length() - 1
    return (bits & -bits).bit_length() - 1


def to_wire(bits: int, count: int) -> list[tuple[int, bytes]]:
    """``bits`` (of a release of ``count`` blobs) as (byte offset, bytes) slices for ``HaveBits``.

    Leading and trailing zero bytes are left out (a slice says only what is
    set); an empty set is one empty slice, which still means "I am in".
    """
    if not bits:
        return [(0, b"")]
    width = (count + 7) // 8
    raw = bits.to_bytes(width, "little")
    first = ((bits & -bits).bit_length() - 1) // 8
    last = (bits.bit_length() + 7) // 8
    out = []
    for start in range(first, last, MAX_HAVE_BITS_BYTES):
        out.append((start, raw[start : min(last, start + MAX_HAVE_BITS_BYTES)]))
    return out


def from_wire(offset: int, data: bytes, count: int) -> int:
    """The set a ``HaveBits`` slice stands for, cut to the release's ``count`` blobs."""
    return (int.from_bytes(data, "little") << (8 * offset)) & ((1 << count) - 1)
