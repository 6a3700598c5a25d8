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
  stays where it is (its mode and mtime are fixed in place only if no other
  version shares its inode: an inode is never changed under another name);
* everything else is built as in a fresh stage (stage.py).

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
import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from p2pupd.protocol.manifest import Manifest

from .fsutil import storage_error
from .statcache import StatCache


@dataclass(frozen=True)
class Recycled:
    """A dropped version now at the stage's name: the cache that knows what it held.

    ``load`` returns its manifest, needed only to patch a file target's image.
    """

    serial: int
    cache: StatCache
    load: Callable[[], Manifest]
    keep: dict[str, os.stat_result] = field(default_factory=dict)


def trusted_in(rec: Recycled, man: Manifest, root: Path) -> dict[str, os.stat_result]:
    """The files of the dropped version at ``root`` that ``man`` can keep as they are.

    Same path, same sha256 by the stat cache, and the cache still trusts them:
    one ``lstat`` each, taken while planning; the rename to the stage's name
    does not change them, and ``prepare_tree`` checks each inode number again.
    """
    return rec.cache.trusted_files(rec.serial, man.files, str(root))


@dataclass
class Kept:
    """What ``prepare_tree`` left in place in a recycled stage."""

    files: dict[str, os.stat_result] = field(default_factory=dict)
    links: set[str] = field(default_factory=set)


def wanted_dirs(man: Manifest) -> set[str]:
    """Every directory of ``man``'s tree, listed or implied by a deeper entry."""
    listed = {d.path for d in man.dirs}
    implied: set[str] = set()
    for p in itertools.chain((f.path for f in man.files), (s.path for s in man.symlinks), listed):
        i = p.rfind("/")
        while i > 0:
            parent = p[:i]
            if parent in implied:
                break  # and so are all of its ancestors
            implied.add(parent)
            i = parent.rfind("/")
    return listed | implied


def prepare_tree(rec: Recycled, man: Manifest, stage: Path, dirs: set[str] | None = None) -> Kept:
    """Strip the recycled tree at ``stage`` down to what ``man`` can keep (see module doc).

    Returns the files (with the ``lstat`` that trusted them) and symlinks left
    in place; ``dirs`` is ``wanted_dirs(man)`` if the caller has it. Raises
    ``StorageError`` if an entry cannot be listed or removed.
    """
    files = {f.path: f.sha256 for f in man.files}
    links = {s.path: s.target for s in man.symlinks}
    if dirs is None:
        dirs = wanted_dirs(man)
    kept = Kept()
    todo = [("", str(stage))]
    try:
        while todo:
            prefix, path = todo.pop()
            with os.scandir(path) as it:
                entries = list(it)
            for e in entries:
                rel = prefix + e.name
                if e.is_dir(follow_symlinks=False):
                    if rel in dirs:
                        todo.append((rel + "/", e.path))
                    else:
                        shutil.rmtree(e.path)
                elif e.is_symlink():
                    if links.get(rel) == os.readlink(e.path):
                        kept.links.add(rel)
                    else:
                        os.unlink(e.path)
                else:
                    # Kept only if planning trusted it, and it is still that inode.
                    st = rec.keep.get(rel)
                    if st is None or rel not in files or e.inode() != st.st_ino:
                        os.unlink(e.path)
                    else:
                        kept.files[rel] = st
    except OSError as exc:
        raise storage_error(exc, "reshape recycled stage", stage) from None
    return kept


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
