"""Reading a bundle directory that may be hostile: a USB stick, a network share.

Theory of operation. The medium is untrusted and read-only to us:

* Names are never taken from the bundle. We open exactly ``oci-layout``,
  ``index.json``, ``blobs``, ``blobs/sha256`` and ``blobs/sha256/<hex>`` where
  ``<hex>`` is printed from a parsed 32-byte digest, so ``..``, ``/`` or an
  absolute name cannot even be expressed.
* Nothing is followed: every member is looked up relative to an open directory
  fd with ``fstatat(AT_SYMLINK_NOFOLLOW)`` and opened ``O_NOFOLLOW``; it must be
  a regular file (a symlink, directory, device or FIFO is refused, and
  ``O_NONBLOCK`` means a FIFO cannot hang the import), and it is checked again
  with ``fstat`` after opening, since the medium may change in between.
* Every size is bounded before memory is allocated: a member larger than its
  limit is refused from its ``fstat`` size, and reads stop one byte past the
  limit in case the file grows while being read.
* Errors say whose fault it is: a member that is missing, not a regular file,
  or of the wrong size is malformed input (``SchemaError``, exit code 3); a
  read that fails (EIO from a pulled stick, EACCES) is ``BundleError`` (exit 1).

The root directory itself is the operator's argument and is opened normally.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from types import TracebackType
from typing import Protocol

from p2pupd.daemon.errors import BundleError
from p2pupd.protocol import ids
from p2pupd.protocol.errors import HashMismatchError, SchemaError

BLOB_DIR = "blobs/sha256"
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Medium(Protocol):
    """What verify.py and the importer read a bundle through: a ``BundleReader``, or a
    ``SealedReader`` (sealedreader.py) that decrypts a sealed bundle on the way."""

    root: str

    def read(self, name: str, max_bytes: int) -> bytes: ...

    def read_blob(self, digest: bytes, size: int) -> bytes: ...

    def open_blob(self, digest: bytes, size: int) -> int: ...

    def scan_blob(
        self, digest: bytes, size: int, block_bytes: int = 1 << 20
    ) -> Iterator[bytes]: ...

    def check_blobs(self, referenced: dict[bytes, int], max_entries: int) -> dict[bytes, int]: ...

    def close(self) -> None: ...


def blob_rel(digest: bytes) -> str:
    return f"{BLOB_DIR}/{digest.hex()}"


class BundleReader:
    """Reads members of one bundle directory; see the module docstring.

    Use as a context manager (it holds directory fds).
    """

    def __init__(self, root: os.PathLike[str] | str) -> None:
        """Open the bundle root; ``BundleError`` if it is not a readable directory."""
        self.root = os.fspath(root)
        try:
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BundleError(f"cannot read bundle {self.root}: no such directory") from None
        except NotADirectoryError:
            raise BundleError(f"cannot read bundle {self.root}: not a directory") from None
        except OSError as exc:
            raise BundleError(f"cannot read bundle {self.root}: {exc.strerror}") from None
        self._blob_fd: int | None = None

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        for fd in (self._blob_fd, self._root_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._blob_fd = None
        self._root_fd = -1

    # -- lookups ---------------------------------------------------------------

    def _io_error(self, exc: OSError, rel: str) -> BundleError:
        return BundleError(f"cannot read bundle member {rel}: {exc.strerror or exc}")

    def _lstat(self, dir_fd: int, name: str, rel: str) -> os.stat_result:
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            hint = "" if "/" in rel else " (not a bundle, or its export did not finish)"
            raise SchemaError(f"bundle is missing {rel}{hint}") from None
        except OSError as exc:
            raise self._io_error(exc, rel) from None

    def blob_dir(self) -> int:
        """Return an fd of ``blobs/sha256`` (opened once, never through a symlink)."""
        if self._blob_fd is not None:
            return self._blob_fd
        fd = self._root_fd
        rel = ""
        for part in BLOB_DIR.split("/"):
            rel = f"{rel}/{part}" if rel else part
            st = self._lstat(fd, part, rel)
            if not stat.S_ISDIR(st.st_mode):
                kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                raise SchemaError(f"bundle member {rel} is {kind}")
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise SchemaError(f"bundle member {rel} is not a directory") from None
                raise self._io_error(exc, rel) from None
            finally:
                if fd != self._root_fd:
                    os.close(fd)
            fd = nfd
        self._blob_fd = fd
        return fd

    def _open_member(self, dir_fd: int, name: str, rel: str) -> tuple[int, int]:
        """Open a regular file member without following links; return (fd, size)."""
        st = self._lstat(dir_fd, name, rel)
        _check_regular(st, rel)
        try:
            fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            raise BundleError(f"bundle member {rel} vanished while being read") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SchemaError(f"bundle member {rel} is a symlink") from None
            raise self._io_error(exc, rel) from None
        try:
            st = os.fstat(fd)
            _check_regular(st, rel)
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_size

    def _read_fd(self, fd: int, size: int, rel: str) -> bytes:
        parts: list[bytes] = []
        got = 0
        try:
            while got <= size and (block := os.read(fd, min(1 << 20, size + 1 - got))):
                parts.append(block)
                got += len(block)
        except OSError as exc:
            raise self._io_error(exc, rel) from None
        finally:
            os.close(fd)
        if got != size:
            raise BundleError(f"bundle member {rel} changed size while being read")
        return b"".join(parts)

    # -- members ---------------------------------------------------------------

    def read(self, name: str, max_bytes: int) -> bytes:
        """Return the bytes of the top-level member ``name`` (at most ``max_bytes``).

        Raises ``SchemaError`` if it is missing, not a regular file or too large,
        ``BundleError`` if it cannot be read.
        """
        fd, size = self._open_member(self._root_fd, name, name)
        if size > max_bytes:
            os.close(fd)
            raise SchemaError(f"bundle member {name} is {size} bytes, limit {max_bytes}")
        return self._read_fd(fd, size, name)

    def read_blob(self, digest: bytes, size: int) -> bytes:
        """Return a blob's bytes after checking its size and hash.

        Raises ``SchemaError`` (missing, not a file), ``HashMismatchError``
        (wrong size or bytes), ``BundleError`` (I/O).
        """
        rel = blob_rel(digest)
        fd, actual = self._open_member(self.blob_dir(), digest.hex(), rel)
        if actual != size:
            os.close(fd)
            raise HashMismatchError(
                f"bundle blob {digest.hex()[:16]} is {actual} bytes, expected {size}"
            )
        data = self._read_fd(fd, size, rel)
        if ids.sha256(data) != digest:
            raise HashMismatchError(
                f"bundle blob {digest.hex()[:16]} does not match its sha256 (damaged or tampered)"
            )
        return data

    def scan_blob(self, digest: bytes, size: int, block_bytes: int = 1 << 20) -> Iterator[bytes]:
        """Yield a blob's bytes in blocks, none kept: a first look (``read_blob``
        then reads it again and checks its hash) that costs one block of memory.

        Raises as ``open_blob``, and ``BundleError`` if a read fails.
        """
        rel = blob_rel(digest)
        fd = self.open_blob(digest, size)
        try:
            while block := os.read(fd, block_bytes):
                yield block
        except OSError as exc:
            raise self._io_error(exc, rel) from None
        finally:
            os.close(fd)

    def open_blob(self, digest: bytes, size: int) -> int:
        """Open a blob for streaming; return its fd (the caller closes it).

        Raises as ``read_blob`` for a missing or odd member; ``HashMismatchError``
        if its size is not ``size``.
        """
        fd, actual = self._open_member(self.blob_dir(), digest.hex(), blob_rel(digest))
        if actual != size:
            os.close(fd)
            raise HashMismatchError(
                f"bundle blob {digest.hex()[:16]} is {actual} bytes, expected {size}"
            )
        return fd

    def check_blobs(self, referenced: dict[bytes, int], max_entries: int) -> dict[bytes, int]:
        """Check ``blobs/sha256`` against the blobs the bundle's metadata references.

        Every referenced blob must be a regular file of its declared size; the
        directory may hold nothing else but hidden OS debris (``.DS_Store``,
        ``._*``), which is never opened. Returns {digest: inode} so callers can
        read in on-disk order. Raises ``SchemaError`` for a missing, odd-typed,
        truncated or unreferenced ("extra") blob or a stray name, and when the
        directory lists more than ``max_entries`` names.
        """
        fd = self.blob_dir()
        try:
            with os.scandir(fd) as it:
                names = []
                for entry in it:
                    names.append(entry.name)
                    if len(names) > max_entries:
                        raise SchemaError(
                            f"{BLOB_DIR} holds more than {max_entries} entries, "
                            "far more than the bundle references"
                        )
        except OSError as exc:
            raise self._io_error(exc, BLOB_DIR) from None
        for name in names:
            if name.startswith("."):
                continue
            if not ids.HEX_RE.fullmatch(name):
                raise SchemaError(f"bundle holds a stray entry {BLOB_DIR}/{name!r:.80}")
            if bytes.fromhex(name) not in referenced:
                raise SchemaError(
                    f"bundle holds an extra blob {name[:16]} that nothing references "
                    "(tampered or mixed-up medium: export it again)"
                )
        inodes: dict[bytes, int] = {}
        for digest, size in referenced.items():
            rel = blob_rel(digest)
            st = self._lstat(fd, digest.hex(), rel)
            _check_regular(st, rel)
            if st.st_size != size:
                raise SchemaError(
                    f"bundle blob {digest.hex()[:16]} is {st.st_size} bytes, its descriptor says "
                    f"{size} (truncated or damaged)"
                )
            inodes[digest] = st.st_ino
        return inodes


def _check_regular(st: os.stat_result, rel: str) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    kind = (
        "a symlink"
        if stat.S_ISLNK(st.st_mode)
        else "a directory"
        if stat.S_ISDIR(st.st_mode)
        else "a FIFO"
        if stat.S_ISFIFO(st.st_mode)
        else "not a regular file"
    )
    raise SchemaError(f"bundle member {rel} is {kind}")
