"""Recycling: the version a commit would drop becomes the next stage (A/B style).

Theory of operation. With ``retain`` N, every update drops the oldest kept
version once N are kept. Deleting it costs a walk of its whole tree, and
staging the new version beside the live one costs a clone of every unchanged
file: both grow with the size of the tree. Instead, the version about to be
dropped is taken out of the kept list (state first, so a crash can only lose
what was going to be dropped anyway), renamed to the stage's name, and
reshaped in place into the new release:

* every entry the new release does not have, or has with another kind, is
  removed;
* a file whose old and new sha256 agree and that the stat cache still trusts
  stays where it is; if its mode or mtime differs it stays only if no other
  version shares its inode (an inode is never changed under another name),
  and is fixed in place. Planning decides this (``trusted_in``), so what
  cannot stay is sourced like any other file;
* everything else is built as in a fresh stage (stage.py).

To find what to remove, a directory is listed only if it changed since the
version was made: one that still has the identity the stat cache recorded
then (statcache.Shape) holds just the recorded entries, removed by name.
Removing a file that is a hard link changes the ctime of its other names (in
versions still kept): that change is followed, in the stat cache and in the
sources planned, as ours.

So an update touches only what changed, plus one ``lstat`` per file to trust
the rest. A file target's image is patched in place, chunk by chunk, but only
while a write lease proves no process has it open (``F_SETLEASE``): a program
still holding that old version must not see it change. Anything unexpected
(the cache does not trust a file, a lease is refused) only means more is
rebuilt; the result is checked exactly as a fresh stage is.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from p2pupd.daemon.fsutil import storage_error
from p2pupd.daemon.stage.statcache import StatCache, StatKey, dir_key, stat_key
from p2pupd.protocol.manifest import FileEntry, Manifest


@dataclass
class Recycled:
    """A dropped version now at the stage's name: the cache that knows what it held.

    ``load`` returns its manifest, needed only to patch a file target's image.
    Planning (``trusted_in``) fills in the files it can keep (``keep``: with the
    inode number that was trusted; ``per_dir``: how many in each directory),
    ``stale``, those of them whose mode or mtime must be fixed in place (with
    their entry in the release and the trusted ``lstat``), and ``rest``: the
    files of the release it cannot keep.
    """

    serial: int
    cache: StatCache
    load: Callable[[], Manifest]
    keep: dict[str, int] = field(default_factory=dict)
    stale: dict[str, tuple[FileEntry, os.stat_result]] = field(default_factory=dict)
    per_dir: dict[str, int] = field(default_factory=dict)
    rest: list[FileEntry] | None = None


_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)
_O_DIR = _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_O_ENTRY = _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def trusted_in(rec: Recycled, man: Manifest, root: Path) -> None:
    """Find the files of the dropped version at ``root`` that ``man`` can keep as they are.

    Same path, same sha256 by the stat cache, and the cache still trusts them:
    one ``lstat`` each, taken while planning; the rename to the stage's name
    does not change them, and ``prepare_tree`` makes sure each is still that
    inode. Fills in ``rec.keep`` (with their inode number), ``rec.per_dir``,
    ``rec.rest`` (the other files of ``man``), and, apart, ``rec.stale``: the
    kept files whose mode or mtime differs from ``man``;
    such a file is kept only if no other name shares its inode (it is then
    fixed in place; an inode is never changed under another name). This is one
    pass over every file of the release, so it is written as one tight loop:
    each directory is opened once and its files are ``lstat``ed relative to
    it, which spares the kernel the walk of the whole path per file, and no
    ``lstat`` result outlives its iteration unless needed (keeping 20,000 of
    them costs more than the comparisons).
    """
    entries = rec.cache.entries(rec.serial)
    if not entries:
        rec.rest = list(man.files)
        return
    keep, stale, per_dir = rec.keep, rec.stale, rec.per_dir
    rest: list[FileEntry] = []
    skip = rest.append
    get, lstat, top = entries.get, os.lstat, str(root)
    # The directory of the previous file (NUL: none yet), open (-1: cannot be), its kept files.
    cur, fd, n = "\0", -1, 0
    try:
        for f in man.files:
            rel = f.path
            old = get(rel)
            if old is None or old[5] != f.sha256:
                skip(f)
                continue
            parent, _, name = rel.rpartition("/")
            if parent != cur:
                if n:
                    per_dir[cur] = per_dir.get(cur, 0) + n
                    n = 0
                if fd >= 0:
                    os.close(fd)
                    fd = -1
                cur = parent
                with contextlib.suppress(OSError):
                    fd = os.open(f"{top}/{parent}" if parent else top, _O_DIR)
            if fd < 0:
                skip(f)
                continue
            try:
                st = lstat(name, dir_fd=fd)
            except OSError:
                skip(f)
                continue
            if (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, f.sha256) != old:
                skip(f)
                continue
            if st.st_mode & 0o7777 != f.mode or st.st_mtime_ns != f.mtime * 1_000_000_000:
                if st.st_nlink != 1:
                    skip(f)
                    continue
                stale[rel] = (f, st)
            keep[rel] = old[3]  # the inode number (an object that exists already)
            n += 1
        if n:
            per_dir[cur] = per_dir.get(cur, 0) + n
    finally:
        if fd >= 0:
            os.close(fd)
    rec.rest = rest


@dataclass
class Kept:
    """What ``prepare_tree`` left in place in a recycled stage: files (with their inode
    number), symlinks, and the directories it went through (they exist); and
    what its removals did to other names of the same inodes."""

    files: dict[str, int] = field(default_factory=dict)
    links: set[str] = field(default_factory=set)
    dirs: set[str] = field(default_factory=set)
    # (before, after) identities of files elsewhere that shared an inode with
    # a file removed here: their ctime changed (statcache.StatCache.rekey).
    rekeys: list[tuple[StatKey, StatKey]] = field(default_factory=list)


def wanted_dirs(man: Manifest, rec: Recycled | None = None) -> set[str]:
    """Every directory of ``man``'s tree, listed or implied by a deeper entry.

    With ``rec`` (planned for ``man``), the directories of the files it keeps
    are known (``per_dir``) and only those of the others are looked at.
    """
    listed = {d.path for d in man.dirs}
    if rec is not None and rec.rest is not None:
        parents = set(rec.per_dir)
        parents.update(f.path.rpartition("/")[0] for f in rec.rest)
    else:
        parents = {f.path.rpartition("/")[0] for f in man.files}
    parents.update(s.path.rpartition("/")[0] for s in man.symlinks)
    parents.update(p.rpartition("/")[0] for p in listed)
    implied: set[str] = set()
    for p in parents:
        while p and p not in implied:
            implied.add(p)  # and, below, each of its ancestors
            p = p.rpartition("/")[0]
    return listed | implied


def prepare_tree(rec: Recycled, man: Manifest, stage: Path, dirs: set[str] | None = None) -> Kept:
    """Strip the recycled tree at ``stage`` down to what ``man`` can keep (see module doc).

    Returns the files (with their trusted inode number) and symlinks left in
    place; ``dirs`` is ``wanted_dirs(man)`` if the caller has it. Raises
    ``StorageError`` if an entry cannot be listed or removed.

    The tree is gone through from the top, directories only. A directory
    whose ``lstat`` identity is the one recorded when the version was made
    (statcache.Shape) still holds exactly what it held then: the recorded
    files, symlinks and directories in it, of which those ``man`` does not
    keep are removed by name, without listing it. Any other directory (the
    top one always: renames changed its ctime) is listed and each entry
    checked: a file is kept only if planning kept it and it is still that
    inode, a symlink only if ``man`` has it with that target, a directory only
    if ``man`` has it. An update thus lists only what someone changed.
    """
    links = {s.path: s.target for s in man.symlinks}
    if dirs is None:
        dirs = wanted_dirs(man)
    keep, top = rec.keep, str(stage)
    known = _Known(rec, keep)
    kept = Kept()
    lost: list[str] = []  # files planning kept that are not here as the same inode
    met, vouched = 0, 0  # kept files found by listing, and in unchanged directories
    todo = [""]
    try:
        while todo:
            d = todo.pop()
            path = f"{top}/{d}" if d else top
            if d:
                kept.dirs.add(d)
                if known.unchanged(d, path):
                    vouched += rec.per_dir.get(d, 0)
                    for rel in known.files.get(d, ()):
                        _unlink(f"{top}/{rel}", kept.rekeys)
                    for rel in known.links.get(d, ()):
                        if links.get(rel) == os.readlink(f"{top}/{rel}"):
                            kept.links.add(rel)
                        else:
                            _unlink(f"{top}/{rel}", kept.rekeys)
                    for rel in known.dirs.get(d, ()):
                        if rel in dirs:
                            todo.append(rel)
                        else:
                            _remove_tree(f"{top}/{rel}", kept.rekeys)
                    continue
            prefix = d + "/" if d else ""
            with os.scandir(path) as it:
                entries = list(it)
            for e in entries:
                rel = prefix + e.name
                ino = keep.get(rel)
                if ino is not None:
                    # Kept only if it is still the file planning trusted.
                    if e.inode() == ino and e.is_file(follow_symlinks=False):
                        met += 1
                        continue
                    lost.append(rel)
                if e.is_dir(follow_symlinks=False):
                    if rel in dirs:
                        todo.append(rel)
                    else:
                        _remove_tree(e.path, kept.rekeys)
                elif e.is_symlink() and links.get(rel) == os.readlink(e.path):
                    kept.links.add(rel)
                else:
                    _unlink(e.path, kept.rekeys)
    except OSError as exc:
        raise storage_error(exc, "reshape recycled stage", stage) from None
    if lost or met + vouched != len(keep):
        gone = set(lost)
        kept.files = _still_there({r: i for r, i in keep.items() if r not in gone}, stage)
    else:
        kept.files = keep  # the usual case: every file planning kept is here, unchanged
    return kept


class _Known:
    """What the stat cache recorded of a recycled version's tree (statcache.Shape), by
    directory: the files ``keep`` does not have, the symlinks and the
    subdirectories. Empty when the version's shape was not recorded."""

    def __init__(self, rec: Recycled, keep: dict[str, int]) -> None:
        shape = rec.cache.shape(rec.serial)
        self.identities = shape.dirs if shape is not None else {}
        self.files: dict[str, list[str]] = {}
        self.links: dict[str, list[str]] = {}
        self.dirs: dict[str, list[str]] = {}
        if shape is None:
            return
        for into, paths in (
            (self.files, rec.cache.entries(rec.serial).keys() - keep.keys()),
            (self.links, shape.links),
            (self.dirs, shape.dirs),
        ):
            for rel in paths:
                into.setdefault(rel.rpartition("/")[0], []).append(rel)

    def unchanged(self, d: str, path: str) -> bool:
        """Whether directory ``d`` (at ``path``) still has its recorded identity."""
        key = self.identities.get(d)
        if key is None:
            return False
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode) and dir_key(st) == key


def _unlink(path: str, rekeys: list[tuple[StatKey, StatKey]]) -> None:
    """Remove the entry ``path``; if it was a hard link, note how the other names'
    identity changed (removing a link changes the inode's ctime, nothing else).

    ``OSError`` if it cannot be removed.
    """
    try:
        fd = os.open(path, _O_ENTRY)
    except OSError:
        os.unlink(path)
        return
    try:
        before = os.fstat(fd)
        os.unlink(path)
        if before.st_nlink > 1 and stat.S_ISREG(before.st_mode):
            rekeys.append((stat_key(before), stat_key(os.fstat(fd))))
    finally:
        os.close(fd)


def _remove_tree(path: str, rekeys: list[tuple[StatKey, StatKey]]) -> None:
    """Remove the tree ``path``, noting, like ``_unlink``, the hard links it removes.

    Depth first with a stack, not a recursion: a tree may be as deep as its
    paths allow.
    """
    stack: list[tuple[str, list[str]]] = [(path, _unlink_files(path, rekeys))]
    while stack:
        d, subdirs = stack[-1]
        if subdirs:
            sub = subdirs.pop()
            stack.append((sub, _unlink_files(sub, rekeys)))
            continue
        stack.pop()
        os.rmdir(d)


def _unlink_files(path: str, rekeys: list[tuple[StatKey, StatKey]]) -> list[str]:
    """Unlink every non-directory in ``path``; return the paths of its subdirectories."""
    with os.scandir(path) as it:
        entries = [(e.path, e.is_dir(follow_symlinks=False)) for e in it]
    subdirs = []
    for p, is_dir in entries:
        if is_dir:
            subdirs.append(p)
        else:
            _unlink(p, rekeys)
    return subdirs


def _still_there(files: dict[str, int], stage: Path) -> dict[str, int]:
    """Those of ``files`` (relative to ``stage``) still there as the same inode: a file
    the walk did not meet was removed with its directory, or by someone else."""
    out = {}
    for rel, ino in files.items():
        with contextlib.suppress(OSError):
            now = os.lstat(stage / rel)
            if now.st_ino == ino and stat.S_ISREG(now.st_mode):
                out[rel] = ino
    return out


@contextlib.contextmanager
def write_lease(fd: int) -> Iterator[bool]:
    """Hold a write lease on ``fd`` for the block; yields whether it was granted.

    A write lease is granted only when no other open file description refers
    to the file, so holding one proves nobody else is using it.
    """
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
