"""Members of the state directory, opened and emptied without following links.

Theory of operation. The state directory is ours, but nothing in it is taken
on faith: a member replaced by a symlink (``STATE/tmp -> /home``) must not make
a routine clean-up delete whatever the link points at, and a member of the
wrong kind must not crash the daemon with a traceback. So:

* every member is reached from an fd of the state root, one path component at
  a time, with ``O_NOFOLLOW``/``AT_SYMLINK_NOFOLLOW``; the root itself is the
  operator's argument and may be a link;
* a member that is a symlink or not the kind it should be raises
  ``StateLayoutError`` with one line naming it (exit code 2): p2pupd refuses
  the state directory rather than repairing it, since it cannot know what the
  link was for;
* emptying a directory (``clear``) lists it through its fd and unlinks each
  entry relative to that fd; a subdirectory goes through ``shutil.rmtree``
  with ``dir_fd``, which never follows a link either. A symlink inside is
  removed as a link; its target is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path

from p2pupd.daemon import fsutil
from p2pupd.daemon.errors import StateLayoutError, StorageError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

DIR = stat.S_IFDIR
FILE = stat.S_IFREG
SOCKET = stat.S_IFSOCK
_KIND_NAMES = {DIR: "a directory", FILE: "a regular file", SOCKET: "a socket"}


def kind_of(st: os.stat_result) -> str:
    """What ``st`` (an lstat) is, in words."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return _KIND_NAMES.get(stat.S_IFMT(mode), "a special file")


def layout_error(root: Path, rel: str, st: os.stat_result, want: int) -> StateLayoutError:
    """The one-line refusal for member ``rel`` of ``root`` found as ``st``."""
    what = kind_of(st)
    if stat.S_ISLNK(st.st_mode):
        with contextlib.suppress(OSError):
            what += f" (to {os.readlink(root / rel)})"
    return StateLayoutError(
        f"state directory {root}: {rel} is {what}, not {_KIND_NAMES[want]}; "
        "p2pupd will not use or clean it (move it aside)"
    )


def check(root: Path, rel: str, want: int, root_fd: int | None = None) -> bool:
    """Return whether member ``rel`` exists; raise ``StateLayoutError`` if it is not ``want``.

    ``rel`` may hold ``/``: each component is looked up without following a link.
    """
    fd = open_dir(root, *rel.split("/")[:-1]) if root_fd is None else root_fd
    name = rel.rsplit("/", 1)[-1]
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise fsutil.storage_error(exc, "inspect", root / rel) from None
    finally:
        if root_fd is None:
            os.close(fd)
    if stat.S_IFMT(st.st_mode) != want:
        raise layout_error(root, rel, st, want)
    return True


def open_dir(root: Path, *parts: str) -> int:
    """Return an fd of the directory ``root/parts...``, no component after ``root`` a link.

    Raises ``StateLayoutError`` for a component that is a link or not a
    directory, ``StorageError`` (``FileNotFoundError`` inside) otherwise.
    """
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise fsutil.storage_error(exc, "open", root) from None
    rel = ""
    for part in parts:
        rel = f"{rel}/{part}" if rel else part
        try:
            nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                os.close(fd)
                raise layout_error(root, rel, st, DIR) from None
            os.close(fd)
            raise fsutil.storage_error(exc, "open", root / rel) from None
        os.close(fd)
        fd = nfd
    return fd


def clear_fd(fd: int, where: Path) -> int:
    """Delete every entry of the directory open as ``fd``; return how many.

    Nothing is followed: a link is unlinked, a directory removed with
    ``rmtree(dir_fd=...)``. Raises ``StorageError``.
    """
    try:
        names = os.listdir(fd)
    except OSError as exc:
        raise fsutil.storage_error(exc, "list", where) from None
    for name in names:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(name, dir_fd=fd)
            else:
                os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise fsutil.storage_error(exc, "remove", where / name) from None
    return len(names)


def clear(root: Path, *parts: str) -> int:
    """Empty the member directory ``root/parts...`` (see ``clear_fd``); 0 if it is absent."""
    try:
        fd = open_dir(root, *parts)
    except StorageError:  # a StateLayoutError is not one: it propagates
        if not _absent(root, parts):
            raise
        return 0
    try:
        return clear_fd(fd, root.joinpath(*parts))
    finally:
        os.close(fd)


def _absent(root: Path, parts: tuple[str, ...]) -> bool:
    return not os.path.lexists(root.joinpath(*parts))
