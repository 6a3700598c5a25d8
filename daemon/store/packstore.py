"""A node's blob store: small blobs in packs, large ones as files of their own.

Theory of operation
-------------------
Layout (under STATE)::

    blobs/packs/<token>.pack   append-only data files of small blobs  (packfile.py)
    blobs/packs/<token>.idx    their indexes: what each pack holds
    blobs/sha256/<hex>         large blobs, and blobs stored before packs existed
    tmp/                       in-progress writes of large blobs

Everything above the store still names blobs by sha256 alone and calls the
``BlobStore`` interface; ``PackStore`` decides where the bytes live.

*Why a hybrid.* A node receives thousands of chunks of ~64 KiB per release.
As files, each costs a create, a rename and its share of flushes, and ``gc``
and ``fsck`` walk one inode per chunk; appended to a pack they cost one
``pwritev`` and a 56-byte index entry, and both maintenance walks become
sequential reads of a few large files. A large blob (over
``PACKED_MAX_BYTES``, one frame: a whole-file patch, a big hook) is rare, so
its file costs nothing that matters, and as a file it is streamed in bounded
memory (``put_stream``), reflinked (``put_file``), and freed by gc with one
unlink instead of being copied by every repack of its pack.

*Crash rule, unchanged.* A blob is absent or complete and verified: a packed
blob is visible once its index entry is, and the entry is written only after
its bytes are durable (``packs.PackWriter.commit``); a loose blob is renamed
into place after its bytes are synced (``BlobStore``).

*Reading without re-hashing.* Packed bytes are checked against the xxh3-64
their index entry recorded when they were verified (``packfile``), at every
read: bit rot is caught before a blob is used or served, for about a
microsecond per chunk instead of sha256's tens. ``get_bytes(verify=True)``
still re-hashes with sha256 (hooks, patches: bytes that run or build files),
and so does ``fsck(full=True)``; plain ``fsck`` checks every checksum.

*Migration.* A state directory made before packs has only loose files; they
stay readable, new small blobs go into packs, and ``gc`` moves the small
loose blobs it keeps into a pack (``repack``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import BinaryIO

from p2pupd.daemon import fsutil
from p2pupd.daemon.errors import CorruptStoreError, StorageError
from p2pupd.daemon.store import members, packfile, repack
from p2pupd.daemon.store.blobs import BlobStore, FsckReport, GcReport, Reader
from p2pupd.daemon.store.packs import Pack, PackIndex, PackWriter, index_for
from p2pupd.protocol.errors import HashMismatchError
from p2pupd.protocol.ids import check_digest, hexd, sha256


class PackStore(BlobStore):
    """The node's store (see the module docstring); same interface as ``BlobStore``."""

    def __init__(self, root: Path) -> None:
        """Open the store at ``root``, creating its directories if needed.

        Raises ``StorageError`` (``StateLayoutError`` for a member that is a link).
        """
        super().__init__(root)
        self.pack_dir = self.root / "blobs" / "packs"
        try:
            self.pack_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise fsutil.storage_error(exc, "create directory", self.pack_dir) from None
        members.check(self.root, "blobs/packs", members.DIR)
        self.index: PackIndex = index_for(self.pack_dir)

    def check_layout(self) -> None:
        super().check_layout()
        if hasattr(self, "pack_dir"):
            members.check(self.root, "blobs/packs", members.DIR)

    # --- lookup -------------------------------------------------------------

    def has(self, digest: bytes) -> bool:
        """Return whether the blob is present (presence implies complete)."""
        return digest in self.index or super().has(digest)

    def size(self, digest: bytes) -> int:
        found = self._lookup(digest)
        if found is not None:
            return found[1].size
        return super().size(digest)

    def _lookup(self, digest: bytes) -> tuple[Pack, packfile.Entry] | None:
        found = self.index.lookup(digest)
        if found is None and not super().has(digest):
            self.index.refresh()  # another process may have added it since
            found = self.index.lookup(digest)
        return found

    def _packed(self, digest: bytes) -> bytes | None:
        """The packed blob's bytes, checksum-checked; None if it is not packed.

        Raises ``CorruptStoreError`` if they no longer match their checksum.
        """
        got = self.index.read(digest)
        if got is None:
            if super().has(digest):
                return None
            self.index.refresh()
            got = self.index.read(digest)
            if got is None:
                return None
        data, xxh = got
        if packfile.checksum(data) != xxh:
            raise CorruptStoreError(f"packed blob {hexd(digest)} is damaged; run fsck")
        return data

    def open(self, digest: bytes) -> BinaryIO:
        """Open the blob for reading (a packed one is read into memory: at most a frame)."""
        data = self._packed(check_digest(digest))
        if data is not None:
            return io.BytesIO(data)
        return super().open(digest)

    def get_bytes(self, digest: bytes, verify: bool = True) -> bytes:
        """Return the blob's bytes; sha256-checked when ``verify``, a packed one always
        checksum-checked. Raises ``NotFoundError``, ``CorruptStoreError``, ``StorageError``.
        """
        data = self._packed(check_digest(digest))
        if data is None:
            return super().get_bytes(digest, verify)
        if verify and sha256(data) != digest:
            raise CorruptStoreError(f"blob {hexd(digest)} does not match its name; run fsck")
        return data

    def read_blob(self, digest: bytes, max_bytes: int) -> bytes | None:
        """The whole blob for a peer, or None (absent, over ``max_bytes``, damaged).

        Packed: one ``pread`` and the checksum, no sha256 (see the module doc).
        Loose: read and re-hashed, as before packs.
        """
        try:
            got = self.index.read(digest)
        except (OSError, StorageError):
            return None
        if got is not None:
            data, xxh = got
            if len(data) > max_bytes or packfile.checksum(data) != xxh:
                return None
            return data
        fd = self._open_loose(digest)
        if fd is None:
            return None
        try:
            size = os.fstat(fd).st_size
            data = os.read(fd, size) if size <= max_bytes else b""
        except OSError:
            data = b""
        finally:
            os.close(fd)
        return data if data and sha256(data) == digest else None

    def read_range(self, digest: bytes, offset: int, length: int) -> bytes | None:
        """Up to ``length`` bytes of the blob from ``offset``; None if absent or past its end."""
        found = self.index.lookup(digest)
        if found is not None:
            e = found[1]
            if offset >= e.size:
                return None
            n = min(length, e.size - offset)
            try:
                return os.pread(found[0].fd, n, e.offset + offset)
            except OSError:
                return None
        fd = self._open_loose(digest)
        if fd is None:
            return None
        try:
            size = os.fstat(fd).st_size
            return None if offset >= size else os.pread(fd, min(length, size - offset), offset)
        except OSError:
            return None
        finally:
            os.close(fd)

    def _open_loose(self, digest: bytes) -> int | None:
        """A read-only fd of the blob's own file, or None if it has none."""
        try:
            return os.open(os.path.join(self._blob_dir, digest.hex()), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    def iter_digests(self) -> Iterator[bytes]:
        """Yield every blob present once (packed first, then loose files)."""
        self.index.refresh()
        packed = self.index.digests()
        yield from packed
        for digest in super().iter_digests():
            if digest not in self.index:
                yield digest

    def total_bytes(self) -> int:
        total = 0
        for p in self.index.packs():
            total += sum(e.size for e in p.entries())
        for digest in super().iter_digests():
            if digest not in self.index:
                try:
                    total += os.stat(self.path(digest)).st_size
                except OSError:
                    continue
        return total

    # --- writing ------------------------------------------------------------

    def writer(self) -> PackWriter:
        """A writer of a pack with room (salvaging what a dead writer left in it)."""
        return PackWriter.open(self.index)

    def put_bytes(self, data: bytes, digest: bytes | None = None) -> bytes:
        """Store ``data`` (a small blob in a pack, committed at once); return its digest.

        Raises ``HashMismatchError`` if ``digest`` is given and wrong (nothing
        stored), ``NoSpaceError``/``StorageError`` with the store unchanged.
        """
        if len(data) > packfile.PACKED_MAX_BYTES:
            return super().put_bytes(data, digest)
        actual = sha256(data)
        if digest is not None and actual != check_digest(digest):
            raise HashMismatchError(f"blob does not match its sha256 {hexd(digest)[:16]}…")
        if self.has(actual):
            return actual
        w = self.writer()
        try:
            w.append(actual, data, packfile.checksum(data))
            w.commit()
        except BaseException:
            w.abort()
            raise
        finally:
            w.close()
        return actual

    def put_stream(
        self,
        reader: Reader,
        digest: bytes,
        max_bytes: int,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """As ``BlobStore.put_stream``: a streamed blob is a large one, so a file."""
        if self.has(check_digest(digest)):
            return 0
        return super().put_stream(reader, digest, max_bytes, progress)

    # --- maintenance --------------------------------------------------------

    def fsck(self, repair: bool = False, full: bool = False) -> FsckReport:
        """Check the loose blobs (re-hashed) and every pack (``repack.fsck_packs``)."""
        report = super().fsck(repair=repair)
        repack.fsck_packs(self.index, report, repair=repair, full=full)
        return report

    def gc(self, keep: Collection[bytes]) -> GcReport:
        """Keep exactly ``keep``: drop, punch out or repack the rest (``repack.collect``)."""
        return repack.collect(self, self.index, keep)

    def loose_path(self, digest: bytes) -> Path:
        """Where the blob would live as a file of its own (large or pre-pack blobs)."""
        return super().path(digest)
