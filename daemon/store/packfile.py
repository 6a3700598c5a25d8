"""The on-disk format of a pack: a data file of blobs and its index file.

Theory of operation
-------------------
A pack is two files in ``STATE/blobs/packs/``, named by one random token::

    <token>.pack   b"P2PUPACK" u32 version, then records:
                       u32 size | 32-byte sha256 | size bytes of the blob
    <token>.idx    b"P2PUIDX1", then entries of 56 bytes:
                       32-byte sha256 | u64 offset of the bytes | u32 size
                       | u64 xxh3-64 of the bytes | u32 crc32 of the 52 before

(all integers big-endian). Like git's packs, the data file holds the bytes and
the index says where each blob is; unlike git's, both files only ever grow
while their writer holds the pack, so a pack is filled over many sessions and
its index is appended to, not written once.

*The index is the truth.* A blob belongs to the store when, and only when, an
index entry names it. The writer appends records, makes them durable
(``fdatasync`` of the data file), and only then appends their entries and
syncs the index (``packs.PackWriter.commit``). So an entry can never survive
a crash that its bytes did not, and a crash leaves at most a torn last entry
(its crc32 does not match: it and anything after it are ignored) and a tail
of records that no entry names yet.

*Records describe themselves.* Each record repeats the size and digest its
entry holds, so a tail of unnamed records can be read back without any
journal (``scan``): an import killed half-way resumes from the records it
left (each re-hashed before it counts), and ``fsck`` can cross-check every
entry against the record it points to.

*The checksum.* Every entry carries the xxh3-64 of the bytes, computed from
the very buffer whose sha256 was checked on the way in. Reading a packed blob
back checks that checksum (about a microsecond per 64 KiB, where sha256 takes
tens): the blob is then byte for byte what was verified, unless someone who
can write the state directory forged both, which the sha256 check of
``get_bytes(verify=True)`` and ``fsck --full`` still catch. It guards against
bit rot, not against an attacker with write access to the state directory.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import xxhash

from p2pupd.protocol import limits

PACK_MAGIC: Final = b"P2PUPACK"
PACK_VERSION: Final = 1
PACK_HEADER: Final = struct.Struct(">8sI")
IDX_MAGIC: Final = b"P2PUIDX1"
RECORD: Final = struct.Struct(">I32s")
ENTRY: Final = struct.Struct(">32sQIQI")
_ENTRY_BODY: Final = struct.Struct(">32sQIQ")

PACK_SUFFIX: Final = ".pack"
IDX_SUFFIX: Final = ".idx"

PACKED_MAX_BYTES: Final = limits.MAX_FRAME_BYTES
"""Blobs up to this size go into packs; larger ones stay files of their own
(see ``packstore``): one frame, so every blob a peer sends whole is packed."""

PACK_TARGET_BYTES: Final = 256 * limits.MiB
"""A writer starts a new pack once its pack holds this much."""


def checksum(data: bytes | memoryview) -> int:
    """The xxh3-64 of ``data``: what an index entry records of the bytes."""
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class Entry:
    """One blob of a pack: where its bytes are and their checksum."""

    digest: bytes
    offset: int
    size: int
    xxh: int

    @property
    def record_start(self) -> int:
        """Offset of the record (its header) that holds the bytes."""
        return self.offset - RECORD.size

    @property
    def record_end(self) -> int:
        return self.offset + self.size


def pack_header() -> bytes:
    return PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION)


def check_pack_header(data: bytes) -> bool:
    """Whether ``data`` starts like a pack this code can read."""
    return len(data) >= PACK_HEADER.size and PACK_HEADER.unpack_from(data) == (
        PACK_MAGIC,
        PACK_VERSION,
    )


def record_header(digest: bytes, size: int) -> bytes:
    return RECORD.pack(size, digest)


def encode_entry(e: Entry) -> bytes:
    body = _ENTRY_BODY.pack(e.digest, e.offset, e.size, e.xxh)
    return body + struct.pack(">I", zlib.crc32(body))


def decode_entries(data: bytes | memoryview, start: int = 0) -> tuple[list[Entry], int]:
    """Decode whole, intact entries from ``data[start:]``; stop at the first bad one.

    Returns the entries and the offset just past the last good one (where a
    writer appends next; anything beyond it is a torn entry from a crash).
    """
    out: list[Entry] = []
    pos, end = start, len(data)
    size = ENTRY.size
    while pos + size <= end:
        digest, offset, n, xxh, crc = ENTRY.unpack_from(data, pos)
        if zlib.crc32(data[pos : pos + size - 4]) != crc:
            break
        out.append(Entry(digest, offset, n, xxh))
        pos += size
    return out, pos


def read_records(fd: int, start: int, end: int) -> Iterator[tuple[bytes, int, bytes]]:
    """Yield ``(digest, offset, bytes)`` of each whole record of the pack open as
    ``fd`` between ``start`` and ``end``, reading each with ``pread``.

    Stops at the first record that is cut off or declares an impossible size
    (the file ends inside it); the caller re-hashes what it yields before
    trusting it, and may step over one that does not match. Raises ``OSError``.
    """
    pos = start
    while pos + RECORD.size <= end:
        head = os.pread(fd, RECORD.size, pos)
        if len(head) < RECORD.size:
            return
        size, digest = RECORD.unpack(head)
        data_at = pos + RECORD.size
        if size > PACKED_MAX_BYTES or data_at + size > end:
            return
        data = os.pread(fd, size, data_at)
        if len(data) != size:
            return
        yield digest, data_at, data
        pos = data_at + size
