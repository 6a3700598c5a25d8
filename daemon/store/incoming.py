"""The incoming area: blobs of an import that has not finished yet.

Theory of operation. An import copies blobs from the medium into
``STATE/incoming/`` first and moves them into the store only once every blob of
the bundle has arrived and matched its digest. So:

* a refused bundle (a chunk whose bytes do not match, a blob that turns into a
  FIFO half-way) changes nothing: the blobs it brought are discarded and the
  store is exactly as before;
* an interrupted import (SIGKILL, power cut, a stick pulled out: EIO) leaves
  complete blobs here, and a rerun of the same or another bundle re-checks
  and reuses them instead of copying them again -- resume without a journal.

Each blob is written straight to ``incoming/<hex>``, hashed while copied, and
removed again if the hash does not match. The files are not fsynced one by one
(that would cost two disk flushes per 64 KiB chunk), so a crash or power cut
can leave a torn one: every blob left by an earlier run is therefore re-hashed
before it is used (``reverify``), and a torn one is simply copied again.
``commit`` flushes the whole filesystem once (``syncfs``) and then renames the
blobs into the store, keeping the store's rule that a blob's bytes are durable
before its name. ``copy`` may run in several threads at once (one per blob).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from p2pupd.daemon import fsutil
from p2pupd.daemon.errors import BundleError, StorageError
from p2pupd.daemon.store import members
from p2pupd.daemon.store.blobs import BLOB_MODE, BlobStore
from p2pupd.protocol import ids
from p2pupd.protocol.errors import HashMismatchError

READ_BYTES = 1 << 20
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Incoming:
    """Complete, verified blobs of an unfinished import (see the module docstring)."""

    def __init__(self, state_root: Path, store: BlobStore) -> None:
        self.dir = state_root / "incoming"
        self.store = store
        self._fd: int | None = None

    def open(self) -> None:
        """Create the directory if needed; ``StorageError`` if it is unusable."""
        if self._fd is not None:
            return
        try:
            self.dir.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise fsutil.storage_error(exc, "open", self.dir) from None
        if os.fstat(fd).st_dev != os.stat(self.store.blob_dir).st_dev:
            os.close(fd)
            raise StorageError(f"{self.dir} and {self.store.blob_dir} are on different filesystems")
        self._fd = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _dirfd(self) -> int:
        self.open()
        assert self._fd is not None
        return self._fd

    def held(self) -> set[bytes]:
        """Return the digests of blobs left by an earlier run (removing other debris).

        They may be torn: check each with ``reverify`` before use.
        """
        if not members.check(self.dir.parent, self.dir.name, members.DIR):
            return set()
        dirfd = self._dirfd()
        out: set[bytes] = set()
        try:
            names = os.listdir(dirfd)
        except OSError as exc:
            raise fsutil.storage_error(exc, "list", self.dir) from None
        for name in names:
            if ids.HEX_RE.fullmatch(name):
                out.add(bytes.fromhex(name))
            else:
                self._unlink(name)
        return out

    def reverify(self, digest: bytes, size: int) -> bool:
        """Re-hash a blob left by an earlier run; drop it and return False if it is not intact."""
        p = self.dir / digest.hex()
        try:
            actual, n = fsutil.hash_file(p)
        except StorageError:
            actual, n = b"", -1
        if actual == digest and n == size:
            return True
        fsutil.unlink_quietly(p)
        return False

    def copy(
        self,
        src_fd: int,
        digest: bytes,
        size: int,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Copy exactly ``size`` bytes from ``src_fd`` into the blob ``digest``; return ``size``.

        Raises ``HashMismatchError`` if the bytes do not match (or the source
        grows or shrinks), ``BundleError`` if the source cannot be read and
        ``StorageError``/``NoSpaceError`` for our own writes; the blob's file
        is removed again in every case.
        """
        dirfd = self._dirfd()
        name = digest.hex()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dirfd)  # a torn leftover that failed reverify
        try:
            out = os.open(name, _CREATE_FLAGS, BLOB_MODE, dir_fd=dirfd)
        except OSError as exc:
            raise fsutil.storage_error(exc, "create", self.dir / name) from None
        h = hashlib.sha256()
        got = 0
        try:
            try:
                while True:
                    try:
                        block = os.read(src_fd, min(READ_BYTES, size + 1 - got))
                    except OSError as exc:
                        raise BundleError(
                            f"cannot read bundle blob {name[:16]}: {exc.strerror or exc}"
                        ) from None
                    if not block:
                        break
                    got += len(block)
                    if got > size:
                        break
                    h.update(block)
                    try:
                        fsutil.write_all(out, block)
                    except OSError as exc:
                        raise fsutil.storage_error(exc, "write", self.dir / name) from None
                    if progress is not None:
                        progress(len(block))
                if got == size:
                    fsutil.start_writeback(out)
            finally:
                os.close(out)
            if got != size or h.digest() != digest:
                raise HashMismatchError(
                    f"bundle blob {name[:16]} does not match its sha256"
                    + ("" if got == size else f" (read {got} bytes, expected {size})")
                )
        except OSError as exc:
            self._unlink(name)
            raise fsutil.storage_error(exc, "store", self.dir / name) from None
        except BaseException:
            self._unlink(name)
            raise
        return size

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=self._dirfd())

    def discard(self, digests: Iterable[bytes]) -> None:
        """Remove the given blobs (a refused bundle's); never raises."""
        if self._fd is None:
            return  # nothing was copied in this run
        for d in digests:
            self._unlink(d.hex())

    def commit(self, digests: Iterable[bytes]) -> None:
        """Make the blobs durable, then move them into the store.

        Raises ``StorageError``; blobs not yet moved stay here for a rerun.
        """
        todo = [d for d in digests]
        if not todo:
            return
        fsutil.syncfs_fd(self._dirfd(), self.dir)
        for d in todo:
            try:
                os.rename(d.hex(), self.store.path(d), src_dir_fd=self._dirfd())
            except FileNotFoundError:
                if not self.store.has(d):
                    raise StorageError(
                        f"incoming blob {d.hex()[:16]} vanished before commit"
                    ) from None
            except OSError as exc:
                raise fsutil.storage_error(exc, "store blob", self.store.path(d)) from None
        fsutil.fsync_dir(self.store.blob_dir)

    def remove(self) -> None:
        """Delete the area and whatever it still holds (after a finished import)."""
        self.close()
        if members.check(self.dir.parent, self.dir.name, members.DIR):
            members.clear(self.dir.parent, self.dir.name)
            with contextlib.suppress(FileNotFoundError):
                self.dir.rmdir()

    def remove_if_empty(self) -> None:
        self.close()
        with contextlib.suppress(OSError):
            self.dir.rmdir()
