"""Cheap file creation for staging: clone without per-file fsync, owners, one syncfs.

Staging makes thousands of files of which most are unchanged. ``fsutil.clone_file``
fsyncs every file it makes, which is right for a single file and ruinous for
20,000 of them (an fsync is a disk flush). Here a stage creates its files
without syncing and makes them durable together with one ``syncfs(2)`` of the
target's filesystem before the journal records the stage as complete: the
swap never happens before the data it exposes is on disk.

Owners: a manifest carries no owner (user ids differ between the publisher and
the nodes), so when run as root a staged entry gets the owner of the entry at
the same path in the live version, else that of its (staged) parent
directory, else that of the live target; unchanged files keep their owner.
Not root: everything staged belongs to this user, as it did before.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from p2pupd.daemon.fsutil import copy_fd, reflink_fd, storage_error, syncfs_fd, unlink_quietly

Owner = tuple[int, int]
StrPath = str | os.PathLike[str]

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: Path) -> None:
    """Remove ``path`` (file, link or tree) if it exists; ``StorageError`` otherwise.

    A loop, not a recursion (``shutil.rmtree`` recurses once per level: a tree
    1,000 deep raised ``RecursionError``, and a stage left that deep stopped
    every command that cleans up). Entries are named relative to one open
    descriptor of ``path``, so depth costs neither stack nor descriptors, and a
    link inside the tree is removed, never followed.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise storage_error(exc, "remove", path) from None
    try:
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path)
            return
        top = os.open(path, _O_DIR)
        try:
            _empty_tree(top)
        finally:
            os.close(top)
        os.rmdir(path)
    except FileNotFoundError:
        return  # removed meanwhile
    except OSError as exc:
        raise storage_error(exc, "remove", path) from None


def _empty_tree(top: int) -> None:
    """Remove everything below the open directory ``top``, depth first, without recursion."""
    # (directory relative to top, its subdirectories still to empty and remove)
    stack: list[tuple[str, list[str]]] = [("", _list_and_unlink(top, ""))]
    while stack:
        rel, subdirs = stack[-1]
        if subdirs:
            sub = subdirs.pop()
            child = f"{rel}/{sub}" if rel else sub
            stack.append((child, _list_and_unlink(top, child)))
            continue
        stack.pop()
        if rel:
            os.rmdir(rel, dir_fd=top)


def _list_and_unlink(top: int, rel: str) -> list[str]:
    """Unlink every non-directory in ``top``/``rel``; return its subdirectories' names."""
    fd = os.open(rel or ".", _O_DIR, dir_fd=top)
    try:
        with os.scandir(fd) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    finally:
        os.close(fd)
    subdirs = []
    for name, is_dir in entries:
        if is_dir:
            subdirs.append(name)
        else:
            os.unlink(f"{rel}/{name}" if rel else name, dir_fd=top)
    return subdirs


def walk_tree(root: Path) -> Iterator[str]:
    """Yield the path of every entry below ``root``, relative to it (links not followed).

    A loop over a stack of directories, not a recursion (``os.walk`` recurses
    once per level before Python 3.12); parents come before their entries.
    """
    top = str(root)
    todo = [""]
    while todo:
        rel = todo.pop()
        with os.scandir(f"{top}/{rel}" if rel else top) as it:
            for e in it:
                child = f"{rel}/{e.name}" if rel else e.name
                yield child
                if e.is_dir(follow_symlinks=False):
                    todo.append(child)


def syncfs(path: Path) -> None:
    """Flush everything dirty on ``path``'s filesystem (``fsutil.syncfs_fd``).

    Raises ``StorageError`` (``NoSpaceError``) when the flush reports an error.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise storage_error(exc, "open", path) from None
    try:
        syncfs_fd(fd, path)
    finally:
        os.close(fd)


@functools.cache
def _reflink_probe(dev: int, a: Path, b: Path) -> bool:
    try:
        fa = os.open(a, _CREATE & ~os.O_WRONLY | os.O_RDWR, 0o600)  # FICLONE reads it
        try:
            os.write(fa, b"p2pupd")
            fb = os.open(b, _CREATE, 0o600)
            try:
                return reflink_fd(fa, fb)
            finally:
                os.close(fb)
        finally:
            os.close(fa)
    except OSError:
        return False
    finally:
        unlink_quietly(a)
        unlink_quietly(b)


def reflink_supported(directory: Path, prefix: str | None = None) -> bool:
    """Whether files in ``directory`` can be cloned with FICLONE (probed once per filesystem).

    The probe makes two scratch files named ``<prefix>probe-r1``/``-r2`` (a
    random prefix by default), so a caller can find and remove them if the
    process is killed mid-probe.
    """
    try:
        dev = os.stat(directory).st_dev
    except OSError:
        return False
    base = prefix if prefix is not None else f".p2pupd-{secrets.token_hex(6)}-"
    return _reflink_probe(
        dev, Path(directory, f"{base}probe-r1"), Path(directory, f"{base}probe-r2")
    )


class Owners:
    """Who owns a staged entry (see module doc); ``None`` means "leave as created"."""

    def __init__(self, live_root: Path | None, single_file: bool = False) -> None:
        self.enabled = os.geteuid() == 0 and live_root is not None
        self.live_root = live_root
        self.single_file = single_file
        self._dirs: dict[str, Owner | None] = {}

    def live_path(self, rel: str) -> str | None:
        if self.live_root is None:
            return None
        return str(self.live_root) if self.single_file else f"{self.live_root}/{rel}"

    def _live_owner(self, rel: str) -> Owner | None:
        p = self.live_path(rel) if rel else str(self.live_root)
        if p is None:
            return None
        try:
            st = os.lstat(p)
        except OSError:
            return None
        return st.st_uid, st.st_gid

    def for_dir(self, rel: str) -> Owner | None:
        """The owner of directory ``rel``: its live twin's, else its parent's (a loop
        up the path, not a recursion: a tree may be as deep as its paths allow)."""
        if not self.enabled:
            return None
        todo = []  # ``rel`` and those of its ancestors not looked up yet, deepest first
        d = rel
        while d not in self._dirs:
            own = self._live_owner(d)
            if own is not None or not d:
                self._dirs[d] = own
                break
            todo.append(d)
            d = d.rpartition("/")[0]
        inherited = self._dirs[d]
        for d in reversed(todo):
            self._dirs[d] = inherited
        return self._dirs[rel]

    def for_file(self, rel: str) -> Owner | None:
        if not self.enabled:
            return None
        own = self._live_owner(rel)
        return own if own is not None else self.for_dir(rel.rpartition("/")[0])


class ReflinkState:
    """Remembers, per stage, whether FICLONE works, so a refusal is not retried per file."""

    def __init__(self, supported: bool | None = None) -> None:
        self.supported = supported


def set_fd_meta(fd: int, mode: int, mtime: int, owner: Owner | None) -> os.stat_result:
    """Give ``fd`` its owner, mode and mtime (in that order: chown clears set-id bits).

    Returns the final ``fstat``. Raises ``OSError``.
    """
    if owner is not None:
        os.fchown(fd, owner[0], owner[1])
    os.fchmod(fd, mode)
    ns = mtime * 1_000_000_000
    os.utime(fd, ns=(ns, ns))
    return os.fstat(fd)


def clone_data(
    src: StrPath, dst: StrPath, reflink: ReflinkState
) -> tuple[str, int, os.stat_result]:
    """Create ``dst`` with ``src``'s bytes: FICLONE if it works, else an in-kernel copy.

    Returns ``(how, open dst fd, fstat of src taken while it was open)``; the
    caller sets metadata and closes the fd. No fsync (see module doc). Raises
    ``StorageError``/``NoSpaceError``; no ``dst`` is left behind on failure.
    """
    try:
        sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise storage_error(exc, "open", src) from None
    try:
        try:
            dfd = os.open(dst, _CREATE, 0o600)
        except OSError as exc:
            raise storage_error(exc, "create", dst) from None
        try:
            how = "copy"
            if reflink.supported is not False:
                reflink.supported = reflink_fd(sfd, dfd)
                if reflink.supported:
                    how = "reflink"
            if how == "copy":
                copy_fd(sfd, dfd)
            return how, dfd, os.fstat(sfd)
        except BaseException as exc:
            os.close(dfd)
            unlink_quietly(dst)
            if isinstance(exc, OSError):
                raise storage_error(exc, "copy to", dst) from None
            raise
    finally:
        os.close(sfd)


def hardlink(src: StrPath, dst: StrPath) -> bool:
    """Hard-link ``dst`` to ``src``; ``False`` where links are impossible (EXDEV, EMLINK, EPERM).

    Raises ``StorageError`` for other failures.
    """
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EOPNOTSUPP):
            return False
        raise storage_error(exc, "link", dst) from None
    return True


def lchown_quietly(path: Path, owner: Owner | None) -> None:
    """Set a symlink's or directory's owner if one is wanted; best effort for links."""
    if owner is not None:
        with contextlib.suppress(OSError):
            os.chown(path, owner[0], owner[1], follow_symlinks=False)
