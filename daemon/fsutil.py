"""Filesystem primitives with real system calls and wrapped errors.

Everything the store, the journal and the apply step need from the kernel lives
here, so the rules for durability and for hostile trees are written down once:

* A name becomes visible only when its content is complete and on disk: write a
  temp file in the same directory, fsync it, ``rename`` it over the name, then
  fsync the directory so the rename itself survives a power cut.
* A directory swap is one ``renameat2(RENAME_EXCHANGE)`` call: there is no
  moment at which neither version is in place.
* Staging never follows a symlink: paths are walked one component at a time
  with ``O_NOFOLLOW`` relative to a directory fd, so a link planted in a target
  tree cannot redirect a write outside it.
* Copies are avoided: reflink (``FICLONE``) first, then a hard link where the
  caller allows it, and only then a kernel-side copy.

``OSError`` never escapes: ENOSPC/EDQUOT become ``NoSpaceError``, the rest
``StorageError`` (or ``ApplyError`` for the swap), each message naming the path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import os
import platform
import re
import secrets
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Final

from p2pupd.daemon.errors import ApplyError, LockedError, NoSpaceError, StorageError
from p2pupd.protocol.limits import MiB

BLOCK_BYTES: Final = 1 * MiB
"""Read/write block for streaming copies and hashing."""

WRITE_BYTES: Final = 64 * 1024
"""The most one write system call hands the page cache.

The kernel sizes the page-cache folios a write allocates by the length of the
call: a 1 MiB write asks for large folios, a 64 KiB one for small folios that
come from recently freed memory. On a virtual machine whose freed memory goes
back to the host (a balloon's free page reporting: Firecracker, cloud VMs) a
fresh large folio costs the host a fault per page on first touch, and writing
200 MiB in 1 MiB calls was measured at 0.15-0.63 s of system time against
0.044-0.048 s in 64 KiB calls (tools/bench/transfer_bench.py's machine). On
bare metal the extra calls cost about a microsecond each per 64 KiB.
"""

NO_SPACE_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})

FICLONE: Final = 0x40049409  # _IOW(0x94, 9, int) from linux/fs.h
RENAME_EXCHANGE: Final = 2  # linux/fs.h
AT_FDCWD: Final = -100

# renameat2 syscall numbers, for a libc too old to export the wrapper (glibc < 2.28).
_RENAMEAT2_SYSCALL: Final = {"x86_64": 316, "aarch64": 276, "arm64": 276}

# errnos with which FICLONE says "not here" rather than "broken": the filesystem
# has no clone support (EOPNOTSUPP/ENOTTY/EINVAL), the files are on different
# filesystems (EXDEV), or the fs refuses for its own reasons (EPERM on some FUSE
# and overlay setups, EBADF when the source fs cannot share extents at all).
_REFLINK_UNSUPPORTED: Final = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV, errno.EPERM, errno.EBADF}
)
_EXCHANGE_UNSUPPORTED: Final = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
_COPY_RANGE_UNSUPPORTED: Final = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}
)


_OCTAL_ESCAPE: Final = re.compile(r"\\([0-7]{3})")


class ExchangeUnsupportedError(ApplyError):
    """The filesystem cannot swap two names atomically (renameat2 RENAME_EXCHANGE)."""


class NotBeneathError(StorageError):
    """A path walk met a symlink, a non-directory or an escaping component."""


def storage_error(exc: OSError, what: str, path: str | os.PathLike[str]) -> StorageError:
    """Return the ``StorageError`` for ``exc`` raised while doing ``what`` on ``path``.

    ENOSPC and EDQUOT give ``NoSpaceError`` so callers can tell "the disk is full"
    from "the disk is broken" without looking at errno.
    """
    reason = exc.strerror or str(exc)
    if exc.errno in NO_SPACE_ERRNOS:
        return NoSpaceError(f"no space left to {what} {os.fspath(path)}: {reason}")
    return StorageError(f"cannot {what} {os.fspath(path)}: {reason}")


def filesystem_type(path: str | os.PathLike[str]) -> str:
    """Return the type of the filesystem holding ``path`` (``"ext4"``, ``"tmpfs"``...).

    Read from /proc/self/mountinfo (the longest mount point that is a prefix of
    the resolved path; the last one listed when mounts are stacked). Returns
    ``"unknown"`` when it cannot be found; never raises, as it only decorates
    error messages.
    """
    target = os.path.realpath(path)
    best, best_len = "unknown", -1
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                pre, sep, post = line.partition(" - ")
                fields = pre.split()
                if not sep or len(fields) < 5 or not post.split():
                    continue
                # Mount points escape blanks and backslashes as octal (\040).
                mnt = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
                inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= best_len:
                    best, best_len = post.split()[0], len(mnt)
    except OSError:
        return "unknown"
    return best


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (creations, renames, unlinks) to disk.

    Raises ``StorageError`` (``NoSpaceError`` on ENOSPC) if it cannot be opened
    or synced.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise storage_error(exc, "sync directory", path) from None


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` to ``fd``, looping over short writes (raises ``OSError``)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def buffer_fd(data: bytes, what: str, scratch: str | os.PathLike[str] | None = None) -> int:
    """An fd at the start of a private, unnamed file holding ``data``.

    For readers that hand out fds of blobs they hold only in memory (a blob cut
    from a pack, a decrypted one): a memfd where the kernel has them, else an
    unlinked file in ``scratch`` (default: the temp dir). ``StorageError``
    naming ``what`` if neither can be made or written.
    """
    fd = -1
    try:
        with contextlib.suppress(OSError, AttributeError):
            fd = os.memfd_create("p2pupd-" + what.replace(" ", "-"), os.MFD_CLOEXEC)
        if fd < 0:
            fd, name = tempfile.mkstemp(prefix="p2pupd-", dir=scratch)
            os.unlink(name)
        write_all(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        raise StorageError(f"cannot buffer a {what}: {exc.strerror or exc}") from None
    return fd


def create_temp(directory: str | os.PathLike[str], prefix: str, mode: int) -> tuple[int, Path]:
    """Create a new, empty temp file in ``directory``; return ``(fd, path)``.

    ``O_EXCL`` with a random name: never reuses or follows an existing entry.
    ``mode`` is applied with fchmod so the umask cannot widen or narrow it.
    Raises ``StorageError``.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(16):
        path = Path(directory, f".{prefix}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise storage_error(exc, "create temp file in", directory) from None
        try:
            os.fchmod(fd, mode)
        except OSError as exc:
            os.close(fd)
            unlink_quietly(path)
            raise storage_error(exc, "chmod", path) from None
        return fd, path
    raise StorageError(f"cannot find a free temp name in {os.fspath(directory)}")


def unlink_quietly(path: str | os.PathLike[str]) -> None:
    """Remove ``path`` if it exists; used on error paths, so it never raises."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new bytes, never a mix.

    Temp file in the same directory (``O_EXCL``), write, fsync, ``os.replace``,
    fsync the directory. The temp file is removed on any failure. Raises
    ``NoSpaceError`` when the filesystem is full and ``StorageError`` otherwise;
    in both cases ``path`` is unchanged.
    """
    target = Path(path)
    fd, tmp = create_temp(target.parent, target.name, mode)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as exc:
        unlink_quietly(tmp)
        raise storage_error(exc, "write", target) from None
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(target.parent)


@functools.cache
def _libc() -> tuple[ctypes.CDLL, Callable[..., int] | None]:
    """Load libc once; return it and its renameat2 wrapper if it has one (glibc >= 2.28)."""
    libc = ctypes.CDLL(None, use_errno=True)  # our own symbols: no ldconfig child
    wrapper: Callable[..., int] | None = getattr(libc, "renameat2", None)
    if wrapper is not None:
        wrapper.argtypes = [  # type: ignore[attr-defined]
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_uint,
        ]
        wrapper.restype = ctypes.c_int  # type: ignore[attr-defined]
    return libc, wrapper


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback, do not wait for it


def syncfs_fd(fd: int, what: str | os.PathLike[str]) -> None:
    """Flush everything dirty on the filesystem holding ``fd`` (``os.sync`` without syncfs).

    Raises ``StorageError`` (``NoSpaceError``) when the kernel reports a
    writeback error: data it could not write must not be declared durable.
    """
    fn = getattr(_libc()[0], "syncfs", None)
    if fn is None:
        os.sync()
        return
    if fn(ctypes.c_int(fd)) != 0:
        err = ctypes.get_errno()
        raise storage_error(OSError(err, os.strerror(err)), "sync filesystem of", what)


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages now, without waiting.

    ``offset`` and ``length`` narrow it to a range (length 0: to the end of
    the file), as a pack writer does for each stretch it has appended.

    Files made durable later by one ``syncfs_fd`` would otherwise all be
    written at that flush, after the work that produced them (on a real disk,
    a second pass as long as the first); starting writeback as each file is
    complete overlaps the disk with that work. Only a hint: durability still
    comes from the flush, and a libc without ``sync_file_range`` is ignored.
    """
    fn = getattr(_libc()[0], "sync_file_range", None)
    if fn is not None:
        fn(
            fd,
            ctypes.c_int64(offset),
            ctypes.c_int64(length),
            ctypes.c_uint(_SYNC_FILE_RANGE_WRITE),
        )


_FALLOC_FL_KEEP_SIZE = 1  # <linux/falloc.h>
_FALLOC_FL_PUNCH_HOLE = 2


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the blocks of ``fd`` in ``[offset, offset + length)``; the size stays.

    Those bytes then read as zeros and the filesystem gets their space back
    (partial blocks at either end are zeroed in place). Returns ``False``
    where the filesystem or libc cannot punch holes; raises ``StorageError``
    for other failures.
    """
    libc = _libc()[0]
    fn = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if fn is None or length <= 0:
        return False
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if fn(fd, ctypes.c_int(mode), ctypes.c_int64(offset), ctypes.c_int64(length)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise storage_error(OSError(err, os.strerror(err)), "free space in", f"fd {fd}")


def _renameat2(a: bytes, b: bytes, flags: int, *, via_syscall: bool = False) -> int:
    """Call renameat2; return 0 or the errno (ENOSYS when no way to call it exists).

    ``via_syscall`` skips libc's wrapper, as a libc without one would (tests use it).
    """
    libc, wrapper = _libc()
    if wrapper is not None and not via_syscall:
        rc = wrapper(AT_FDCWD, a, AT_FDCWD, b, flags)
    else:
        nr = _RENAMEAT2_SYSCALL.get(platform.machine())
        if nr is None:
            return errno.ENOSYS
        syscall = libc.syscall
        syscall.restype = ctypes.c_long
        rc = syscall(
            ctypes.c_long(nr),
            ctypes.c_long(AT_FDCWD),
            ctypes.c_char_p(a),
            ctypes.c_long(AT_FDCWD),
            ctypes.c_char_p(b),
            ctypes.c_long(flags),
        )
    return ctypes.get_errno() if rc != 0 else 0


def rename_exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
    """Atomically swap the entries ``a`` and ``b`` (files or directories, same fs).

    One ``renameat2(RENAME_EXCHANGE)`` call: every observer sees either the old
    pair or the swapped pair. The caller fsyncs the parent directories.
    Raises ``ExchangeUnsupportedError`` when the kernel or filesystem lacks the
    call (EINVAL/ENOSYS/EOPNOTSUPP), ``ApplyError`` for any other failure
    (a missing entry, EXDEV, permissions).
    """
    err = _renameat2(os.fsencode(a), os.fsencode(b), RENAME_EXCHANGE)
    if err == 0:
        return
    reason = os.strerror(err)
    if err in _EXCHANGE_UNSUPPORTED:
        fs = filesystem_type(os.path.dirname(os.path.abspath(a)))
        raise ExchangeUnsupportedError(
            f"filesystem {fs} at {os.fspath(a)} does not support atomic exchange "
            f"(renameat2 RENAME_EXCHANGE: {reason})"
        )
    raise ApplyError(f"cannot exchange {os.fspath(a)} and {os.fspath(b)}: {reason}")


def exchange_supported(directory: str | os.PathLike[str]) -> bool:
    """Probe whether ``directory``'s filesystem supports ``rename_exchange``.

    Creates two scratch directories inside it, swaps them and removes them.
    Returns ``False`` only for "unsupported"; raises ``StorageError`` if the
    scratch entries cannot be made and ``ApplyError`` for other swap failures.
    """
    base = Path(directory, f".p2pupd-exchange-probe-{secrets.token_hex(6)}")
    return probe_exchange(base.with_name(base.name + "-a"), base.with_name(base.name + "-b"))


def probe_exchange(a: Path, b: Path) -> bool:
    """Make directories ``a`` and ``b`` (new names, one parent), swap them, remove them.

    Returns ``False`` only when the filesystem does not support the exchange;
    raises as ``exchange_supported`` does.
    """
    try:
        try:
            a.mkdir()
            b.mkdir()
        except OSError as exc:
            raise storage_error(exc, "create probe entries in", a.parent) from None
        rename_exchange(a, b)
    except ExchangeUnsupportedError:
        return False
    finally:
        for p in (a, b):
            with contextlib.suppress(OSError):
                p.rmdir()
    return True


def reflink_fd(src_fd: int, dst_fd: int) -> bool:
    """Make ``dst_fd`` share ``src_fd``'s extents (ioctl FICLONE, copy-on-write).

    Returns ``False`` when this filesystem pair cannot clone (see
    ``_REFLINK_UNSUPPORTED``); raises ``StorageError``/``NoSpaceError`` for
    other failures. ``dst_fd`` must be open for writing.
    """
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as exc:
        if exc.errno in _REFLINK_UNSUPPORTED:
            return False
        raise storage_error(exc, "reflink into", f"fd {dst_fd}") from None
    return True


def _open_regular_source(src: str | os.PathLike[str]) -> tuple[int, os.stat_result]:
    """Open ``src`` read-only without following a final symlink; it must be a file."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise storage_error(exc, "open", src) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise StorageError(f"not a regular file: {os.fspath(src)}")
    return fd, st


def _create_dst(dst: str | os.PathLike[str]) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(dst, flags, 0o600)
    except OSError as exc:
        raise storage_error(exc, "create", dst) from None


def reflink(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> bool:
    """Create ``dst`` (which must not exist) as a copy-on-write clone of ``src``.

    Returns ``True`` on success, ``False`` when the filesystem cannot clone; in
    that case no ``dst`` is left behind. Raises ``StorageError`` if ``src`` is
    not a readable regular file, ``dst`` exists, or the clone fails otherwise.
    """
    src_fd, _ = _open_regular_source(src)
    try:
        dst_fd = _create_dst(dst)
        ok = False
        try:
            ok = reflink_fd(src_fd, dst_fd)
            if ok:
                os.fsync(dst_fd)
        except OSError as exc:
            raise storage_error(exc, "reflink", dst) from None
        finally:
            os.close(dst_fd)
            if not ok:
                unlink_quietly(dst)
        return ok
    finally:
        os.close(src_fd)


def copy_fd(src_fd: int, dst_fd: int) -> int:
    """Copy ``src_fd`` from its current offset to EOF into ``dst_fd``; return bytes copied.

    ``copy_file_range`` keeps the data in the kernel (and lets NFS/XFS copy
    server- or extent-side); a plain read/write loop covers the filesystems and
    kernels that refuse it. Raises ``OSError``.
    """
    total = 0
    use_range = hasattr(os, "copy_file_range")
    while True:
        if use_range:
            try:
                n = os.copy_file_range(src_fd, dst_fd, BLOCK_BYTES * 16)
            except OSError as exc:
                if exc.errno not in _COPY_RANGE_UNSUPPORTED or total:
                    raise
                use_range = False
                continue
        else:
            block = os.read(src_fd, BLOCK_BYTES)
            write_all(dst_fd, block)
            n = len(block)
        if n == 0:
            return total
        total += n


def copy_metadata(st: os.stat_result, dst_fd: int) -> None:
    """Give ``dst_fd`` the permission bits and mtime of ``st`` (and owner, as root).

    Owner first: chown clears set-id bits, so chmod must come after it.
    mtime last: any write would bump it again. Raises ``OSError``.
    """
    if os.geteuid() == 0:
        os.fchown(dst_fd, st.st_uid, st.st_gid)
    os.fchmod(dst_fd, stat.S_IMODE(st.st_mode))
    os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def clone_file(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, allow_hardlink: bool
) -> str:
    """Create ``dst`` (which must not exist) with ``src``'s content, as cheaply as possible.

    Tries reflink, then (if ``allow_hardlink``) a hard link, then a copy. Reflinked
    and copied files get ``src``'s mode, mtime and, as root, owner, and are
    fsynced; a hard link shares the inode, so the caller must treat both names
    as read-only. The caller fsyncs ``dst``'s directory.
    Returns ``"reflink"``, ``"hardlink"`` or ``"copy"``. Raises ``NoSpaceError``
    or ``StorageError``; no ``dst`` is left behind on failure (an existing
    ``dst`` is refused and left alone).
    """
    src_fd, st = _open_regular_source(src)
    try:
        # O_EXCL placeholder: "dst must not exist" is checked the same way on
        # every path, and from here on dst is ours to remove on failure.
        dst_fd = _create_dst(dst)
        try:
            try:
                if reflink_fd(src_fd, dst_fd):
                    how = "reflink"
                elif allow_hardlink:
                    how = "hardlink"
                else:
                    how = "copy"
                    copy_fd(src_fd, dst_fd)
                if how != "hardlink":
                    copy_metadata(st, dst_fd)
                    os.fsync(dst_fd)
            finally:
                os.close(dst_fd)
            if how == "hardlink":
                how = _link_or_copy(src_fd, st, src, dst)
        except OSError as exc:
            unlink_quietly(dst)
            raise storage_error(exc, "clone to", dst) from None
        except BaseException:
            unlink_quietly(dst)
            raise
        return how
    finally:
        os.close(src_fd)


def _link_or_copy(
    src_fd: int, st: os.stat_result, src: str | os.PathLike[str], dst: str | os.PathLike[str]
) -> str:
    """Replace the empty placeholder ``dst`` by a hard link to ``src``, else copy.

    link() cannot overwrite, so the placeholder goes first. EXDEV/EMLINK/EPERM
    (another fs, the link count limit, protected_hardlinks) fall back to a copy.
    Raises ``OSError``.
    """
    os.unlink(dst)
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM):
            raise
    else:
        if os.lstat(dst).st_ino == st.st_ino:
            return "hardlink"
        # src was replaced between open and link: the link names another file.
        os.unlink(dst)
    dst_fd = _create_dst(dst)
    try:
        os.lseek(src_fd, 0, os.SEEK_SET)
        copy_fd(src_fd, dst_fd)
        copy_metadata(st, dst_fd)
        os.fsync(dst_fd)
    finally:
        os.close(dst_fd)
    return "copy"


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Return the bytes an unprivileged user may still write on ``path``'s filesystem.

    Raises ``StorageError``.
    """
    try:
        st = os.statvfs(path)
    except OSError as exc:
        raise storage_error(exc, "stat filesystem of", path) from None
    return st.f_bavail * st.f_frsize


def ensure_free(path: str | os.PathLike[str], needed: int, margin: int) -> None:
    """Raise ``NoSpaceError`` unless ``needed + margin`` bytes are free at ``path``.

    Checked before a long write so an update fails before it starts, not half-way.
    """
    have = free_bytes(path)
    if have < needed + margin:
        fs = filesystem_type(path)
        raise NoSpaceError(
            f"need {(needed + margin) / MiB:.1f} MiB free on {fs} at {os.fspath(path)}, "
            f"have {have / MiB:.1f} MiB"
        )


def hash_file(path: str | os.PathLike[str]) -> tuple[bytes, int]:
    """Return ``(sha256 digest, size)`` of the file at ``path``, read in 1 MiB blocks.

    Raises ``StorageError``.
    """
    h = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb", buffering=0) as f:
            while block := f.read(BLOCK_BYTES):
                h.update(block)
                size += len(block)
    except OSError as exc:
        raise storage_error(exc, "read", path) from None
    return h.digest(), size


def _beneath_parts(relpath: str) -> list[str]:
    parts = relpath.split("/")
    if not relpath or relpath.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise NotBeneathError(f"path escapes or is not normalised: {relpath!r:.100}")
    return parts


def open_beneath(
    dirfd: int, relpath: str, flags: int, mode: int = 0o644, *, parents: bool = False
) -> int:
    """Open ``relpath`` under the directory ``dirfd`` without following any symlink.

    Each directory component is opened with ``O_NOFOLLOW | O_DIRECTORY`` relative
    to the previous one, so a symlink anywhere in the path is refused rather than
    followed out of the tree; the final component is opened with ``flags |
    O_NOFOLLOW`` (pass ``O_CREAT | O_EXCL`` for staging: an existing entry,
    symlink or not, is then refused too). With ``parents``, missing directories
    are created (mode 0o755). Returns a new fd the caller closes. Raises
    ``NotBeneathError`` (a ``StorageError``) for a symlink, a non-directory or a
    ``..``/absolute/empty component, and ``StorageError``/``NoSpaceError`` for
    other failures.
    """
    parts = _beneath_parts(relpath)
    cur = dirfd
    walked: list[str] = []
    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        for part in parts[:-1]:
            walked.append(part)
            if parents:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=cur)
            try:
                nxt = os.open(part, dir_flags, dir_fd=cur)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise NotBeneathError(
                        f"refusing to walk through {'/'.join(walked)!r}: symlink or not a directory"
                    ) from None
                raise
            if cur != dirfd:
                os.close(cur)
            cur = nxt
        try:
            return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=cur)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NotBeneathError(f"refusing to open symlink {relpath!r}") from None
            raise
    except OSError as exc:
        raise storage_error(exc, "open", relpath) from None
    finally:
        if cur != dirfd:
            os.close(cur)


_PID_BYTES = 16  # the pid, padded: rewriting it in place needs no new block


class FileLock:
    """An exclusive ``flock`` on a lock file, naming its holder's pid.

    flock locks belong to the open file description, so they are released by
    the kernel when the process dies (no stale locks after a crash) and two
    ``FileLock`` objects on one path exclude each other even in one process.
    The file is never unlinked: removing it would let a second process lock a
    fresh inode while the first still holds the old one.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object currently holds the lock."""
        return self._fd is not None

    def acquire(self, blocking: bool = False) -> None:
        """Take the lock; wait for it when ``blocking``.

        Raises ``LockedError`` (naming the holder's pid) when not blocking and
        another holder has it, ``StorageError`` when the file cannot be opened
        or written.
        """
        if self._fd is not None:
            raise LockedError(f"{self.path} is already held by this process")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise storage_error(exc, "open lock file", self.path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f"pid {holder}" if holder else "another process"
                raise LockedError(f"{self.path} is held by {who}") from None
            raise storage_error(exc, "lock", self.path) from None
        # The pid only helps the message of whoever waits for the lock: best
        # effort, so a full disk cannot stop the commands that free space (gc).
        with contextlib.suppress(OSError):
            os.pwrite(fd, f"{os.getpid()}\n".ljust(_PID_BYTES).encode(), 0)
            os.ftruncate(fd, _PID_BYTES)
        self._fd = fd

    def hand_over(self) -> int:
        """Stop managing the lock without releasing it: return its fd, made
        inheritable, for a process this one ``exec``s into (``adopt``). The
        lock then passes to the new program with no moment in which another
        process could take it. Raises ``LockedError`` when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            raise LockedError(f"{self.path} is not held by this process")
        os.set_inheritable(fd, True)
        return fd

    def adopt(self, fd: int) -> None:
        """Take over the lock an ``exec``ing predecessor held on ``fd`` (``hand_over``).

        Raises ``LockedError`` when ``fd`` is not an open descriptor of this
        lock file, or does not hold the lock.
        """
        if self._fd is not None:
            raise LockedError(f"{self.path} is already held by this process")
        try:
            st, want = os.fstat(fd), os.stat(self.path)
        except OSError as exc:
            raise LockedError(f"inherited lock fd {fd} of {self.path}: {exc.strerror}") from None
        if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino):
            raise LockedError(f"inherited fd {fd} is not the lock file {self.path}")
        try:
            # Succeeds at once if this open file description holds the lock.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise LockedError(f"inherited fd {fd} does not hold the lock {self.path}") from None
        os.set_inheritable(fd, False)  # children (health commands, hooks) must not keep it
        with contextlib.suppress(OSError):
            os.pwrite(fd, f"{os.getpid()}\n".ljust(_PID_BYTES).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (closing the fd releases it); a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.pwrite(fd, b" " * _PID_BYTES, 0)  # in place: the block stays allocated
            os.close(fd)

    def __enter__(self) -> FileLock:
        """Take the lock without waiting (``LockedError`` when busy)."""
        self.acquire(blocking=False)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
