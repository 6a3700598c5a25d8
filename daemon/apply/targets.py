"""The three kinds of apply target, each swapped with one system call.

Theory of operation. Versions other than the live one sit beside the
target under fixed names (targetbase.py); each kind makes one live with a
single system call:

* ``dir``: TARGET is a directory. The swap is ``renameat2(RENAME_EXCHANGE)``:
  TARGET never disappears, and afterwards the replaced tree sits at the
  source's name. Filesystems without the exchange are refused before staging,
  with a pointer to the symlink kind: never a non-atomic copy.
* ``symlink``: TARGET is a symlink to ``.NAME.p2pupd-v<serial>``. Versions are
  staged straight into their versioned directory; the swap is a new link made
  beside TARGET and ``rename``d over it. Works on any POSIX filesystem.
* ``file``: TARGET is one regular file (an image). Before the swap the live
  file is hard-linked (or, where links are impossible, copied) to its kept
  name, then the staged file is ``rename``d over TARGET.

Each kind reports an *identity* of whatever is live at TARGET (inode number, or
link text) so recovery can tell which version is live by looking: the journal
records both identities before the swap. ``undo`` and ``finish`` are
idempotent, because recovery may run them again after a crash half-way.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import time
from pathlib import Path

from p2pupd.daemon.apply.targetbase import Identity, Target, lstat_or_none
from p2pupd.daemon.errors import ApplyError, StorageError
from p2pupd.daemon.fsutil import (
    ExchangeUnsupportedError,
    clone_file,
    filesystem_type,
    fsync_dir,
    probe_exchange,
    rename_exchange,
    storage_error,
)
from p2pupd.daemon.stage.stagefs import remove_tree
from p2pupd.daemon.state.statedir import ComponentConfig
from p2pupd.protocol.manifest import Manifest

__all__ = ["Identity", "Target", "lstat_or_none", "target_for"]

SYMLINK_HINT = "configure the component with the symlink kind (`p2pupd init --kind symlink`)"


@functools.cache
def _exchange_ok(dev: int, a: Path, b: Path) -> bool:
    """``probe_exchange``, once per filesystem (``dev`` is the cache key)."""
    return probe_exchange(a, b)


class DirTarget(Target):
    """An in-place directory swapped with ``renameat2(RENAME_EXCHANGE)``."""

    kind = "dir"

    def check(self, man: Manifest) -> None:
        super().check(man)
        st = lstat_or_none(self.path)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise ApplyError(f"target {self.path} is not a directory (component kind is dir)")
        dev = os.stat(self.parent).st_dev
        self._remove_scratch()  # a probe killed half-way
        if not _exchange_ok(dev, *self._probe_names("x1", "x2")):
            raise ExchangeUnsupportedError(
                f"filesystem {filesystem_type(self.parent)} at {self.parent} cannot swap "
                f"directories atomically (no renameat2 RENAME_EXCHANGE); {SYMLINK_HINT}"
            )

    def swap(self, src: Path) -> None:
        if lstat_or_none(self.path) is None:
            self._rename(src, self.path, "move into place")  # first install
        else:
            try:
                t0 = time.perf_counter_ns()
                rename_exchange(src, self.path)
                self.swap_ns = time.perf_counter_ns() - t0
            except ExchangeUnsupportedError as exc:
                raise ExchangeUnsupportedError(f"{exc}; {SYMLINK_HINT}") from None
        fsync_dir(self.parent)

    def undo(self, src: Path, new_id: Identity, old_id: Identity, frm: int | None, op: str) -> None:
        if self.identity() == new_id:
            if lstat_or_none(src) is not None:
                rename_exchange(src, self.path)
            else:  # first install: nothing was there to swap back
                self._rename(self.path, src, "move aside")
            fsync_dir(self.parent)
        if op == "apply":
            remove_tree(src)

    def finish(self, src: Path, frm: int | None) -> None:
        st = lstat_or_none(src)
        if st is None:
            return
        if frm is not None:
            # Kept or not, it goes to its versioned name; ``prune`` drops it
            # if not kept (one place removes versions: see Transactions.cleanup).
            dst = self.version_path(frm)
            remove_tree(dst)
            self._rename(src, dst, "keep previous version at")
        else:
            # What was at TARGET before p2pupd managed it: an empty directory
            # made by the operator goes, anything else is kept for them.
            try:
                src.rmdir()
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise storage_error(exc, "remove", src) from None
                remove_tree(self.orig_path)
                self._rename(src, self.orig_path, "keep original at")
        fsync_dir(self.parent)


class SymlinkTarget(Target):
    """A ``current`` symlink to versioned directories, replaced with ``rename``."""

    kind = "symlink"

    def stage_path(self, serial: int) -> Path:
        return self.version_path(serial)

    def identity_of(self, path: Path) -> Identity:
        try:
            return os.readlink(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINVAL):  # absent, or not a link
                return None
            raise storage_error(exc, "read link", path) from None

    def identity(self) -> Identity:
        st = lstat_or_none(self.path)
        if st is None or not stat.S_ISLNK(st.st_mode):
            return None
        return self.identity_of(self.path)

    def version_root(self, serial: int, installed: int | None) -> Path:
        return self.version_path(serial)

    def check(self, man: Manifest) -> None:
        super().check(man)
        st = lstat_or_none(self.path)
        if st is not None and not stat.S_ISLNK(st.st_mode):
            raise ApplyError(
                f"target {self.path} exists and is not a symlink; the symlink kind makes it a "
                f"link to versions kept beside it, so move it away first"
            )

    def swap(self, src: Path) -> None:
        self._link_to(src.name)

    def new_identity(self, src: Path) -> Identity:
        return src.name

    def _link_to(self, text: str) -> None:
        tmp = self.parent / f"{self._prefix}link"
        remove_tree(tmp)
        try:
            os.symlink(text, tmp)
        except OSError as exc:
            raise storage_error(exc, "create link", tmp) from None
        self._rename(tmp, self.path, "replace link")
        fsync_dir(self.parent)

    def undo(self, src: Path, new_id: Identity, old_id: Identity, frm: int | None, op: str) -> None:
        if self.identity() == new_id:
            if old_id is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                fsync_dir(self.parent)
            else:
                self._link_to(str(old_id))
        if op == "apply" and self.identity() != src.name:
            remove_tree(src)

    def discard(self, src: Path, op: str, frm: int | None) -> None:
        if op == "apply" and self.identity() != src.name:
            remove_tree(src)
        self._remove_scratch()

    def _is_live(self, serial: int, live: int | None) -> bool:
        return serial == live or self.identity() == self.version_path(serial).name


class FileTarget(Target):
    """A single file (an image) replaced with ``rename``; the old one kept by hard link."""

    kind = "file"

    def __init__(self, cfg: ComponentConfig) -> None:
        super().__init__(cfg)
        self._keep: Path | None = None  # where ``prepare`` linked the live image

    def file_in(self, root: Path, rel: str) -> Path:
        return root

    def file_at(self, root: str, rel: str) -> str:
        return root

    def keep_path(self, frm: int | None) -> Path:
        return self.version_path(frm) if frm is not None else self.orig_path

    def check(self, man: Manifest) -> None:
        super().check(man)
        if len(man.files) != 1 or man.symlinks or man.dirs:
            raise ApplyError(
                f"{man.component} is a file target: release {man.version} must hold exactly one "
                f"file (it has {len(man.files)} files, {len(man.symlinks)} symlinks, "
                f"{len(man.dirs)} directories)"
            )
        st = lstat_or_none(self.path)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise ApplyError(f"target {self.path} is not a regular file (component kind is file)")

    def prepare(self, frm: int | None) -> None:
        live = self.identity()
        if live is None:
            return
        keep = self._keep = self.keep_path(frm)
        if self.identity_of(keep) == live:
            return  # already done before a crash
        remove_tree(keep)
        before = lstat_or_none(self.path)
        try:
            os.link(self.path, keep, follow_symlinks=False)
            self._moved(before, self.path)
        except OSError as exc:
            # No hard links here (vfat, some FUSE), or the link limit: a copy
            # (reflinked where possible) keeps the old version just as well.
            if exc.errno not in (errno.EPERM, errno.EMLINK, errno.EXDEV, errno.EOPNOTSUPP):
                raise storage_error(exc, "keep previous version at", keep) from None
            clone_file(self.path, keep, allow_hardlink=False)
        fsync_dir(self.parent)

    def swap(self, src: Path) -> None:
        old = lstat_or_none(self.path)
        self._rename(src, self.path, "move into place")
        if self._keep is not None:
            # The old image lost its name at TARGET: its ctime changed.
            self._moved(old, self._keep)
        fsync_dir(self.parent)

    def undo(self, src: Path, new_id: Identity, old_id: Identity, frm: int | None, op: str) -> None:
        if self.identity() == new_id:
            if op == "switch" and lstat_or_none(src) is None:
                # The version switched in must stay kept under its own name.
                try:
                    os.link(self.path, src, follow_symlinks=False)
                except OSError as exc:
                    raise storage_error(exc, "keep version at", src) from None
            keep = self.keep_path(frm)
            if lstat_or_none(keep) is not None:
                self._rename(keep, self.path, "put back")
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            fsync_dir(self.parent)
        if op == "apply" and self.identity_of(src) not in (None, self.identity()):
            remove_tree(src)

    def discard(self, src: Path, op: str, frm: int | None) -> None:
        super().discard(src, op, frm)
        keep = self.keep_path(frm)
        live = self.identity()
        if live is not None and self.identity_of(keep) == live:
            remove_tree(keep)  # the link ``prepare`` made; the old version is still live


_KINDS: dict[str, type[Target]] = {"dir": DirTarget, "symlink": SymlinkTarget, "file": FileTarget}


def target_for(cfg: ComponentConfig) -> Target:
    """Return the ``Target`` for ``cfg.kind``; ``StorageError`` for an unknown kind."""
    try:
        return _KINDS[cfg.kind](cfg)
    except KeyError:
        raise StorageError(f"component {cfg.name}: unknown target kind {cfg.kind!r}") from None
