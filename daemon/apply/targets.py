"""The three kinds of apply target, each swapped with one system call.

Theory of operation. A component's *target* is the path its users see. Every
version other than the live one lives beside it, in the same directory and so
on the same filesystem, under names only p2pupd uses::

    TARGET                       the live version (a dir, a symlink or a file)
    .NAME.p2pupd-stage           a version being staged (dir and file kinds)
    .NAME.p2pupd-v<serial>       a kept version (all kinds), or a live one (symlink kind)
    .NAME.p2pupd-link            the new symlink, just before it is renamed over TARGET
    .NAME.p2pupd-probe-*         capability probes (RENAME_EXCHANGE, FICLONE)
    .NAME.p2pupd-hookview        a file target's image shown to a hook as a directory
    .NAME.p2pupd-orig            what was at TARGET before p2pupd first managed it

Fixed names make a killed process's debris findable: ``discard`` and
``prune`` remove what no state or transaction accounts for. Each kind makes
one version live with a single system call:

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

import abc
import contextlib
import errno
import functools
import os
import re
import stat
import time
from pathlib import Path

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
from p2pupd.daemon.stage.stagefs import reflink_supported, remove_tree
from p2pupd.daemon.stage.statcache import StatKey, stat_key
from p2pupd.daemon.state.statedir import ComponentConfig
from p2pupd.protocol.manifest import Manifest

Identity = int | str | None


def lstat_or_none(path: Path) -> os.stat_result | None:
    """``os.lstat`` that returns ``None`` for a missing entry; ``StorageError`` otherwise."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise storage_error(exc, "stat", path) from None


class Target(abc.ABC):
    """Operations common to all kinds; subclasses define the swap."""

    kind = ""

    def __init__(self, cfg: ComponentConfig) -> None:
        self.swap_ns = 0  # duration of the last swap's system call
        # (old, new) lstat identities of files whose ctime our renames and links
        # changed, so the stat cache can follow them (statcache.StatCache.rekey).
        self.rekeys: list[tuple[StatKey, StatKey]] = []
        self.cfg = cfg
        self.path = cfg.target
        self.parent = cfg.target.parent
        self._prefix = f".{cfg.target.name}.p2pupd-"

    # -- names ------------------------------------------------------------------

    def version_path(self, serial: int) -> Path:
        return self.parent / f"{self._prefix}v{serial}"

    def stage_path(self, serial: int) -> Path:
        """Where a new stage of ``serial`` is built."""
        return self.parent / f"{self._prefix}stage"

    @property
    def orig_path(self) -> Path:
        return self.parent / f"{self._prefix}orig"

    def version_root(self, serial: int, installed: int | None) -> Path:
        """Where the files of ``serial`` are on disk, live or kept."""
        return self.path if serial == installed else self.version_path(serial)

    def file_in(self, root: Path, rel: str) -> Path:
        """Path of the manifest file ``rel`` in a version located at ``root``."""
        return root / rel

    def file_at(self, root: str, rel: str) -> str:
        """``file_in`` for strings: hot loops over 20,000 files avoid ``Path`` objects."""
        return f"{root}/{rel}"

    def versions_on_disk(self) -> dict[int, Path]:
        """Return {serial: path} of every ``.NAME.p2pupd-v<serial>`` entry beside TARGET."""
        pat = re.compile(re.escape(self._prefix) + r"v([0-9]{1,19})")
        out: dict[int, Path] = {}
        try:
            names = os.listdir(self.parent)
        except FileNotFoundError:
            return out
        except OSError as exc:
            raise storage_error(exc, "list", self.parent) from None
        for name in names:
            m = pat.fullmatch(name)
            if m:
                out[int(m.group(1))] = self.parent / name
        return out

    def _probe_names(self, *tags: str) -> tuple[Path, ...]:
        """Scratch names for capability probes; a killed probe's debris is found by name."""
        return tuple(self.parent / f"{self._prefix}probe-{t}" for t in tags)

    def reflink_supported(self) -> bool:
        """Whether FICLONE works beside the target (probed once per filesystem)."""
        self._remove_scratch()
        return reflink_supported(self.parent, self._prefix)

    def scratch_path(self, name: str) -> Path:
        """``.NAME.p2pupd-<name>``: a scratch entry beside the target (``link``, ``hookview``)."""
        return self.parent / f"{self._prefix}{name}"

    def remove_scratch(self) -> None:
        """Remove probe and temporary-link debris a killed process may have left."""
        self._remove_scratch()

    def _remove_scratch(self) -> bool:
        """Remove the scratch names; return whether there was any."""
        found = False
        for p in (
            *self._probe_names("x1", "x2", "r1", "r2"),
            self.scratch_path("link"),
            self.scratch_path("hookview"),
        ):
            if lstat_or_none(p) is not None:
                remove_tree(p)
                found = True
        return found

    # -- identity -----------------------------------------------------------------

    def identity_of(self, path: Path) -> Identity:
        st = lstat_or_none(path)
        return None if st is None else st.st_ino

    def live_problems(self, installed: int) -> list[str]:
        """What is wrong with TARGET itself for serial ``installed`` to be live (fsck)."""
        st = lstat_or_none(self.path)
        if st is None:
            return [f"{self.path}: missing"]
        if not self._live_kind(st.st_mode):
            return [f"{self.path}: not a {self.kind_noun} (component kind is {self.kind})"]
        return []

    kind_noun = "directory"

    @staticmethod
    def _live_kind(mode: int) -> bool:
        return stat.S_ISDIR(mode)

    def identity(self) -> Identity:
        """What is live at TARGET now (``None``: nothing)."""
        return self.identity_of(self.path)

    def new_identity(self, src: Path) -> Identity:
        """What ``identity`` will return once ``src`` is swapped in."""
        return self.identity_of(src)

    def take(self, version: Path, src: Path) -> None:
        """Rename a dropped version to the stage's name, to be reshaped (recycle.py).

        Not synced here: staging ends by syncing the filesystem and this
        directory before the stage is journalled, and until then a crash
        leaves it under either name, both of which recovery removes.
        """
        self._rename(version, src, "recycle")

    # -- the transaction's steps (overridden per kind) ------------------------------

    def check(self, man: Manifest) -> None:
        """Refuse, before anything is staged, what this kind cannot swap atomically."""
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(exc, "create", self.parent) from None

    def prepare(self, frm: int | None) -> None:
        """Last step before the swap: keep what the swap would otherwise destroy."""
        return  # a kind whose swap keeps the old version needs nothing here

    @abc.abstractmethod
    def swap(self, src: Path) -> None:
        """Make the version at ``src`` live at the target in one system call."""

    @abc.abstractmethod
    def undo(self, src: Path, new_id: Identity, old_id: Identity, frm: int | None, op: str) -> None:
        """Put the old version back if the new one is live; keep or drop ``src``."""

    def finish(self, src: Path, frm: int | None) -> None:
        """After commit: move the replaced version (if at ``src``) to its versioned name."""
        return  # a kind that keeps the replaced version in place needs nothing here

    def discard(self, src: Path, op: str, frm: int | None) -> None:
        """Abort before the swap: remove a stage (never a live or kept version) and scratch."""
        if op == "apply" and self.identity_of(src) != self.identity():
            remove_tree(src)
        self._remove_scratch()

    def prune(self, kept: set[int], live: int | None) -> None:
        """Remove versions beside TARGET that are neither kept nor live, and scratch names.

        The directory is synced only if something was removed (every command
        prunes first; most find nothing, and a sync is a disk flush).
        """
        removed = False
        for serial, path in self.versions_on_disk().items():
            if serial not in kept and not self._is_live(serial, live):
                remove_tree(path)
                removed = True
        stage = self.parent / f"{self._prefix}stage"
        if lstat_or_none(stage) is not None:
            remove_tree(stage)
            removed = True
        if self._remove_scratch() or removed:
            fsync_dir(self.parent)

    def _is_live(self, serial: int, live: int | None) -> bool:
        return False

    def _rename(self, a: Path, b: Path, what: str) -> None:
        before = lstat_or_none(a)
        try:
            t0 = time.perf_counter_ns()
            os.rename(a, b)
            self.swap_ns = time.perf_counter_ns() - t0
        except OSError as exc:
            raise storage_error(exc, what, b) from None
        self._moved(before, b)

    def _moved(self, before: os.stat_result | None, now: Path) -> None:
        """Note that we changed the ctime of a file (rename, link) for the stat cache."""
        after = lstat_or_none(now)
        if before is not None and after is not None and stat.S_ISREG(after.st_mode):
            self.rekeys.append((stat_key(before), stat_key(after)))


# -- the kinds ---------------------------------------------------------------------

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

    def live_problems(self, installed: int) -> list[str]:
        """The link must point at the installed version: the state's word is not enough."""
        live, want = self.identity(), self.version_path(installed).name
        if live == want:
            return []
        if live is None:
            return [f"{self.path}: not a symlink to {want} (state says serial {installed})"]
        return [f"{self.path}: points to {live}, but the state says serial {installed} ({want})"]

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
    kind_noun = "regular file"

    @staticmethod
    def _live_kind(mode: int) -> bool:
        return stat.S_ISREG(mode)

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
