"""What every target kind shares: the names beside the target, identities, scratch.

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
``prune`` remove what no state or transaction accounts for. A kind reports an
*identity* of what is live at TARGET (an inode number, or a link's text), so
recovery can tell which version is live by looking. The kinds are in
targets.py.
"""

from __future__ import annotations

import abc
import os
import re
import stat
import time
from pathlib import Path

from p2pupd.daemon.fsutil import fsync_dir, storage_error
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
