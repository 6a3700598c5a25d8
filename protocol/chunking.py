"""Content-defined chunking: FastCDC 2020 with fixed parameters.

Boundaries depend only on the bytes near them (a 64-byte gear-hash window), so an
insertion or deletion moves only the chunks that touch it; every chunk after it
realigns and keeps its name. Sizes are bounded by ``CHUNK_MIN_BYTES`` and
``CHUNK_MAX_BYTES`` (the last chunk of a file may be shorter than the minimum).

The parameters (sizes and gear seed 0) are part of the format: changing them
renames every chunk. ``tests/property`` pins a test vector.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from pyfastcdc import FastCDC

from p2pupd.protocol import limits

_CDC = FastCDC(
    avg_size=limits.CHUNK_AVG_BYTES,
    min_size=limits.CHUNK_MIN_BYTES,
    max_size=limits.CHUNK_MAX_BYTES,
    seed=0,
)


def cut(data: bytes | bytearray | memoryview) -> Iterator[tuple[int, int]]:
    """Yield ``(offset, length)`` of each chunk of ``data``, in order.

    Empty input yields nothing; the lengths always sum to ``len(data)``.
    """
    if len(data) == 0:
        return
    for chunk in _CDC.cut_buf(data):
        yield chunk.offset, chunk.length


def cut_stream(stream: BinaryIO) -> Iterator[tuple[int, memoryview]]:
    """Yield ``(offset, bytes)`` of each chunk read from ``stream``.

    Memory stays bounded by a few ``CHUNK_MAX_BYTES`` buffers whatever the
    stream's length; the caller owns the stream (this does no opening).
    """
    for chunk in _CDC.cut_stream(stream):
        yield chunk.offset, chunk.data
