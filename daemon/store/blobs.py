"""The content-addressed blob store: chunks, patches, hooks and metadata by sha256.

Theory of operation
-------------------
Layout (the blob directory of an OCI image layout, so a store, a repository and
a USB bundle share one format)::

    ROOT/blobs/sha256/<64 lowercase hex>   complete, verified, mode 0444
    ROOT/tmp/                              in-progress writes (same filesystem)

*A blob is either absent or complete.* Bytes are written to a fresh temp file in
ROOT/tmp, hashed while they are copied, compared with the digest that will name
them, fsynced, and only then renamed into blobs/sha256/. rename(2) within one
filesystem is atomic, so a reader (or a crash) sees no entry or the whole blob,
never a prefix; fsync before the rename means the name can never survive a power
cut that its content did not. The blobs directory is fsynced after the rename so
that a put that returned is durable.

*The name is the hash.* A blob's name is the sha256 of its bytes, checked on the
way in, so the store needs no index, two writers of the same blob write the same
bytes (puts are idempotent and the second rename is harmless), and any blob can
be re-verified at any time against its own name.

*Failures leave the store as it was.* Any error, ENOSPC included, removes the
temp file before it propagates (``NoSpaceError`` for a full disk, otherwise
``StorageError``; ``HashMismatchError`` for wrong bytes). The one remaining way
to leave debris is a crash mid-write: a file in ROOT/tmp, never a wrong blob.

*fsck and gc.* ``fsck`` rehashes every blob and lists those whose bytes no longer
match their name (bit rot, tampering), names in the blob directory that are not
digests, and temp files left by a crash; with ``repair`` it deletes the corrupt
blobs (they will be fetched again) and the temp files, and leaves unknown names
alone for an operator. ``gc`` deletes every blob not in the caller's keep set.
``fsck(repair=True)``, ``gc`` and ``clean_tmp`` must run while no put is in
progress (at start-up, under the state lock), since they cannot tell a crashed
write from a running one. They delete only inside ``blobs/sha256`` and ``tmp``
and refuse to run (``StateLayoutError``) when either is a link or not a
directory, so a link planted there can never make them delete its target
(``members``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final, Protocol

from p2pupd.daemon import fsutil
from p2pupd.daemon.errors import CorruptStoreError, NotFoundError, StorageError
from p2pupd.daemon.store import members
from p2pupd.protocol.errors import FrameTooLargeError, HashMismatchError
from p2pupd.protocol.ids import HEX_RE, check_digest, hexd, sha256

BLOB_MODE: Final = 0o444
"""Blobs are immutable: read-only for everyone, so a stray write fails loudly."""

ALGORITHM: Final = "sha256"


class Reader(Protocol):
    """A binary source: ``read(n)`` returns at most ``n`` bytes, ``b""`` at the end."""

    def read(self, n: int, /) -> bytes: ...


@dataclass
class FsckReport:
    """What ``BlobStore.fsck`` found (and, with ``repair``, removed)."""

    checked: int = 0
    corrupt: list[bytes] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)
    repaired: bool = False

    @property
    def clean(self) -> bool:
        """True when every blob matched its name and nothing else was found."""
        return not (self.corrupt or self.stray or self.temp_files)


@dataclass
class GcReport:
    """What ``BlobStore.gc`` removed."""

    removed: int = 0
    bytes_freed: int = 0
    packed: int = 0  # files moved into packs (a pack store's migration)
    repacked: int = 0  # packs rewritten


class BlobStore:
    """Blobs named by their sha256 under ``root`` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        """Open the store at ``root``, creating its directories if needed.

        Raises ``StorageError`` if they cannot be created or if ``tmp`` and the
        blob directory are on different filesystems (rename would not be atomic).
        """
        self.root = Path(root)
        self.blob_dir = self.root / "blobs" / ALGORITHM
        self._blob_dir = str(self.blob_dir)
        self.tmp_dir = self.root / "tmp"
        for d in (self.root, self.root / "blobs", self.blob_dir, self.tmp_dir):
            try:
                d.mkdir(exist_ok=True)
            except OSError as exc:
                raise fsutil.storage_error(exc, "create directory", d) from None
        if not self.root.is_dir():
            raise StorageError(f"not a directory: {self.root}")
        self.check_layout()
        try:
            same_fs = os.stat(self.blob_dir).st_dev == os.stat(self.tmp_dir).st_dev
        except OSError as exc:
            raise fsutil.storage_error(exc, "stat", self.root) from None
        if not same_fs:
            raise StorageError(f"{self.tmp_dir} and {self.blob_dir} are on different filesystems")

    def check_layout(self) -> None:
        """Raise ``StateLayoutError`` unless ``blobs``, ``blobs/sha256`` and ``tmp``
        are directories (not links to one): the store deletes inside them."""
        for rel in ("blobs", "blobs/sha256", "tmp"):
            members.check(self.root, rel, members.DIR)

    # --- lookup -------------------------------------------------------------

    def path(self, digest: bytes) -> Path:
        """Return where the blob named ``digest`` lives (whether or not it exists).

        Raises ``CodecError`` if ``digest`` is not 32 raw bytes.
        """
        return self.blob_dir / hexd(check_digest(digest))

    def has(self, digest: bytes) -> bool:
        """Return whether the blob is present (presence implies complete).

        Plain string paths, not pathlib: a fetch or a request asks this once
        per blob of a release, thousands of times in a row.
        """
        return os.path.isfile(os.path.join(self._blob_dir, hexd(check_digest(digest))))

    def size(self, digest: bytes) -> int:
        """Return the blob's size in bytes; ``NotFoundError`` if absent."""
        p = self.path(digest)
        try:
            return p.stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"blob {hexd(digest)} is not in the store") from None
        except OSError as exc:
            raise fsutil.storage_error(exc, "stat", p) from None

    def open(self, digest: bytes) -> BinaryIO:
        """Open the blob for reading; the caller closes it.

        The bytes are not re-verified here (``get_bytes`` or ``fsck`` do that).
        Raises ``NotFoundError`` if absent, ``StorageError`` otherwise.
        """
        p = self.path(digest)
        try:
            return open(p, "rb")
        except FileNotFoundError:
            raise NotFoundError(f"blob {hexd(digest)} is not in the store") from None
        except OSError as exc:
            raise fsutil.storage_error(exc, "open", p) from None

    def get_bytes(self, digest: bytes, verify: bool = True) -> bytes:
        """Return the blob's bytes, checked against its name when ``verify``.

        Raises ``NotFoundError`` if absent, ``CorruptStoreError`` if the bytes do
        not hash to ``digest``, ``StorageError`` on a read error.
        """
        with self.open(digest) as f:
            try:
                data = f.read()
            except OSError as exc:
                raise fsutil.storage_error(exc, "read", self.path(digest)) from None
        if verify and sha256(data) != digest:
            raise CorruptStoreError(f"blob {hexd(digest)} does not match its name; run fsck")
        return data

    def iter_digests(self) -> Iterator[bytes]:
        """Yield the digest of every blob present (names that are not digests are skipped).

        Raises ``StorageError`` if the blob directory cannot be listed.
        """
        yield from self.iter_files()

    def iter_files(self) -> Iterator[bytes]:
        """Yield the digest of every blob kept as a file of its own (``blobs/sha256``)."""
        for name in self._list(self.blob_dir):
            if HEX_RE.fullmatch(name):
                yield bytes.fromhex(name)

    def total_bytes(self) -> int:
        """Return the summed size of all blobs; blobs removed meanwhile are skipped."""
        total = 0
        for digest in self.iter_digests():
            try:
                total += os.stat(self.path(digest)).st_size
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise fsutil.storage_error(exc, "stat", self.path(digest)) from None
        return total

    # --- writing ------------------------------------------------------------

    def put_bytes(self, data: bytes, digest: bytes | None = None) -> bytes:
        """Store ``data``; return its digest.

        When ``digest`` is given the bytes must hash to it, else
        ``HashMismatchError`` and nothing is stored. A blob already present is
        not rewritten. Raises ``NoSpaceError``/``StorageError`` with the store
        unchanged.
        """
        actual = sha256(data)
        if digest is not None and actual != check_digest(digest):
            raise HashMismatchError(f"blob does not match its sha256 {hexd(digest)[:16]}…")
        if self.has(actual):
            return actual
        fd, tmp = fsutil.create_temp(self.tmp_dir, hexd(actual)[:16], BLOB_MODE)
        try:
            try:
                fsutil.write_all(fd, data)
            except OSError as exc:
                raise fsutil.storage_error(exc, "write", tmp) from None
            self._sync(fd, tmp)
        except BaseException:
            fsutil.unlink_quietly(tmp)
            raise
        finally:
            os.close(fd)
        self._commit(tmp, actual)
        return actual

    def put_stream(
        self,
        reader: Reader,
        digest: bytes,
        max_bytes: int,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Copy ``reader`` to EOF into the blob ``digest``; return the bytes written.

        Hashes while copying in 1 MiB blocks and renames into place only if the
        hash matches. ``progress`` is called after each block with that block's
        size. If the blob is already present the reader is not read and 0 is
        returned. Raises ``FrameTooLargeError`` as soon as more than ``max_bytes``
        arrive, ``HashMismatchError`` if the bytes do not match ``digest``,
        ``NoSpaceError``/``StorageError`` for the store's own I/O; exceptions from
        ``reader`` and ``progress`` propagate unchanged. On any failure no temp
        file remains and the store is unchanged.
        """
        check_digest(digest)
        if self.has(digest):
            return 0
        h = hashlib.sha256()
        written = 0
        fd, tmp = fsutil.create_temp(self.tmp_dir, hexd(digest)[:16], BLOB_MODE)
        try:
            try:
                # Ask for one byte past the limit so an oversized stream is caught
                # after reading at most max_bytes + 1, not a whole extra block.
                while block := reader.read(min(fsutil.BLOCK_BYTES, max_bytes - written + 1)):
                    written += len(block)
                    if written > max_bytes:
                        raise FrameTooLargeError(
                            f"blob {hexd(digest)[:16]}… exceeds its limit of {max_bytes} bytes"
                        )
                    h.update(block)
                    try:
                        fsutil.write_all(fd, block)
                    except OSError as exc:
                        raise fsutil.storage_error(exc, "write", tmp) from None
                    if progress is not None:
                        progress(len(block))
                if h.digest() != digest:
                    raise HashMismatchError(
                        f"streamed blob does not match its sha256 {hexd(digest)[:16]}…"
                    )
                self._sync(fd, tmp)
            finally:
                os.close(fd)
        except BaseException:
            fsutil.unlink_quietly(tmp)
            raise
        self._commit(tmp, digest)
        return written

    def put_file(self, src: Path, digest: bytes | None = None) -> bytes:
        """Store the content of the regular file ``src``; return its digest.

        Reflinks from ``src`` when the filesystem allows (no data copied), else
        copies; never hard-links, since the blob must not change when ``src``
        does. The stored copy itself is hashed, so a ``src`` that changes during
        the call cannot produce a wrong blob. Raises ``HashMismatchError`` if
        ``digest`` is given and does not match (nothing stored),
        ``NoSpaceError``/``StorageError`` otherwise, with the store unchanged.
        """
        if digest is not None and self.has(digest):
            return digest
        prefix = hexd(digest)[:16] if digest is not None else "file"
        fd, tmp = fsutil.create_temp(self.tmp_dir, prefix, BLOB_MODE)
        try:
            try:
                actual = self._fill_from_file(src, fd, tmp)
                self._sync(fd, tmp)
            finally:
                os.close(fd)
            if digest is not None and actual != digest:
                raise HashMismatchError(
                    f"{src} does not match its sha256 {hexd(digest)[:16]}… (got {hexd(actual)})"
                )
            if self.has(actual):
                # Same bytes are already stored: keep the old inode, drop the copy.
                fsutil.unlink_quietly(tmp)
                return actual
        except BaseException:
            fsutil.unlink_quietly(tmp)
            raise
        self._commit(tmp, actual)
        return actual

    def _fill_from_file(self, src: Path, fd: int, tmp: Path) -> bytes:
        """Reflink or copy ``src`` into ``fd``, then hash what landed in ``fd``'s file."""
        try:
            src_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise fsutil.storage_error(exc, "open", src) from None
        try:
            if not stat.S_ISREG(os.fstat(src_fd).st_mode):
                raise StorageError(f"not a regular file: {src}")
            if not fsutil.reflink_fd(src_fd, fd):
                fsutil.copy_fd(src_fd, fd)
        except OSError as exc:
            raise fsutil.storage_error(exc, "copy into", tmp) from None
        finally:
            os.close(src_fd)
        digest, _ = fsutil.hash_file(tmp)
        return digest

    @staticmethod
    def _sync(fd: int, tmp: Path) -> None:
        """fsync ``fd``: the content must be durable before its name is."""
        try:
            os.fsync(fd)
        except OSError as exc:
            raise fsutil.storage_error(exc, "sync", tmp) from None

    def _commit(self, tmp: Path, digest: bytes) -> None:
        """Rename the complete, verified, synced ``tmp`` into place and sync the directory.

        If the directory sync fails the new name is removed again, so a caller who
        gets an error never relies on a blob that might not survive a crash.
        """
        final = self.path(digest)
        try:
            os.replace(tmp, final)
        except OSError as exc:
            fsutil.unlink_quietly(tmp)
            raise fsutil.storage_error(exc, "store blob", final) from None
        try:
            fsutil.fsync_dir(self.blob_dir)
        except StorageError:
            fsutil.unlink_quietly(final)
            raise

    # --- maintenance --------------------------------------------------------

    def fsck(self, repair: bool = False, full: bool = False) -> FsckReport:
        """Re-hash every blob and look for debris; see the module docstring.

        With ``repair``, deletes corrupt blobs and temp files (stray names are
        only reported). Every file is re-hashed, ``full`` or not. Raises ``StorageError`` if a directory cannot be listed
        or a repair fails.
        """
        self.check_layout()
        report = FsckReport(repaired=repair)
        for name in sorted(self._list(self.blob_dir)):
            if not HEX_RE.fullmatch(name):
                report.stray.append(name)
                continue
            report.checked += 1
            p = self.blob_dir / name
            if not self._blob_ok(p, bytes.fromhex(name)):
                report.corrupt.append(bytes.fromhex(name))
                if repair:
                    self._remove(p)
        report.temp_files.extend(sorted(self._list(self.tmp_dir)))
        if repair and report.temp_files:
            members.clear(self.root, "tmp")
        if repair and report.corrupt:
            fsutil.fsync_dir(self.blob_dir)
        return report

    def gc(self, keep: Collection[bytes]) -> GcReport:
        """Delete every blob whose digest is not in ``keep``; report count and bytes freed.

        Raises ``StorageError`` if a blob cannot be removed.
        """
        self.check_layout()
        keep_set = set(keep)
        return self.remove_files([d for d in self.iter_files() if d not in keep_set])

    def remove_files(self, digests: Collection[bytes]) -> GcReport:
        """Delete the files of these blobs (those absent are skipped); one directory sync.

        Raises ``StorageError`` if a blob cannot be removed.
        """
        report = GcReport()
        for digest in digests:
            p = self.path(digest)
            try:
                size = p.lstat().st_size
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise fsutil.storage_error(exc, "stat", p) from None
            self._remove(p)
            report.removed += 1
            report.bytes_freed += size
        if report.removed:
            fsutil.fsync_dir(self.blob_dir)
        return report

    def clean_tmp(self) -> int:
        """Delete everything in ROOT/tmp (left by a crash); return how many entries.

        Nothing is followed: ``tmp`` itself must be a directory, not a link
        (``StateLayoutError``), and a link inside is removed, not its target.
        Raises ``StorageError`` if an entry cannot be removed.
        """
        self.check_layout()
        return members.clear(self.root, "tmp")

    # --- helpers ------------------------------------------------------------

    @staticmethod
    def _list(d: Path) -> list[str]:
        try:
            return os.listdir(d)
        except OSError as exc:
            raise fsutil.storage_error(exc, "list", d) from None

    @staticmethod
    def _blob_ok(p: Path, digest: bytes) -> bool:
        """Whether ``p`` is a regular file (not a link) whose bytes hash to ``digest``."""
        try:
            if not stat.S_ISREG(p.lstat().st_mode):
                return False
        except OSError:
            return False
        try:
            actual, _ = fsutil.hash_file(p)
        except StorageError:
            return False
        return actual == digest

    @staticmethod
    def _remove(p: Path) -> None:
        """Unlink a file, or remove a directory tree left where a file should be
        (never following a link: ``rmtree`` refuses one, ``unlink`` removes the link)."""
        try:
            if stat.S_ISDIR(p.lstat().st_mode):
                shutil.rmtree(p)
            else:
                p.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise fsutil.storage_error(exc, "remove", p) from None
