"""The stat cache: which files on disk can be trusted to hold which bytes, without reading them.

Theory of operation. When a version is staged, every file it contains was
either written and hash-checked by us or cloned from a file we trusted; right
then we record, per version serial and path, the file's ``lstat`` identity
``(size, mtime_ns, ctime_ns, ino, dev)`` and the sha256 the manifest gives it.
The version may later move (the stage becomes the target, the target becomes
a kept version): renaming a directory leaves its files' inodes untouched, so the
record stays valid wherever the version is.

A later stage trusts such a file when ``lstat`` still returns the recorded
identity. Any write, truncate, chmod, chown or link changes ``ctime``, which
user space cannot set, so a locally modified file is noticed for the price of
one ``lstat``; only then is it read and re-hashed (a ``touch`` or ``chmod`` leaves
the bytes right, and the file is trusted again). The cost of finding reusable
files thus grows with the number of files, at ``lstat`` speed, and reading
grows only with what changed.

The cache is a local optimisation: a lost or damaged cache file only costs a
re-hash, so it is written with a plain atomic write and read leniently.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import msgpack

from p2pupd.protocol.manifest import FileEntry, Manifest

from .errors import StorageError
from .fsutil import hash_file, storage_error

StatKey = tuple[int, int, int, int, int]  # size, mtime_ns, ctime_ns, ino, dev
Entry = tuple[int, int, int, int, int, bytes]  # stat key, then sha256 (flat: loads fast)


def stat_key(st: os.stat_result) -> StatKey:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


@dataclass(frozen=True)
class Source:
    """A file on disk trusted to hold ``entry``'s bytes, as ``lstat`` saw it then."""

    path: str
    st: os.stat_result
    entry: FileEntry

    @property
    def key(self) -> StatKey:
        return stat_key(self.st)


@dataclass
class Version:
    """One version on disk: its serial, where its files are, and its manifest (on demand)."""

    serial: int
    root: Path
    live: bool
    load: Callable[[], Manifest]
    _man: Manifest | None = None

    def man(self) -> Manifest:
        """The version's manifest, loaded on first use (``NotFoundError``, ``StorageError``)."""
        if self._man is None:
            self._man = self.load()
        return self._man

    def files(self, cache: StatCache) -> Iterable[tuple[str, bytes]]:
        """``(path, sha256)`` of its files: from the cache when it has them (no manifest)."""
        entries = cache.versions.get(self.serial)
        if entries:
            return [(rel, e[5]) for rel, e in entries.items()]
        return ((f.path, f.sha256) for f in self.man().files)


class StatCache:
    """``{serial: {path: (*stat key, sha256)}}`` for one component, in one file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.versions: dict[int, dict[str, Entry]] = {}
        with contextlib.suppress(OSError, ValueError, TypeError, msgpack.UnpackException):
            raw = msgpack.unpackb(path.read_bytes(), strict_map_key=False, use_list=False)
            if isinstance(raw, dict):
                self.versions = {int(s): dict(e) for s, e in raw.items()}

    def get(self, serial: int, rel: str) -> Entry | None:
        e = self.versions.get(serial, {}).get(rel)
        return e if isinstance(e, tuple) and len(e) == 6 else None

    def put(self, serial: int, rel: str, key: StatKey, sha: bytes) -> None:
        self.versions.setdefault(serial, {})[rel] = (*key, sha)

    def replace_version(self, serial: int, entries: dict[str, Entry]) -> None:
        self.versions[serial] = entries

    def adopt_links(self, serial: int) -> None:
        """Refresh other versions' records of inodes that ``serial`` shares by hard link.

        Linking changes an inode's ctime; the file's bytes are the same, so a
        record with the same inode and sha256 may take the new identity.
        """
        shared = {(e[3], e[4]): e for e in self.versions.get(serial, {}).values()}
        for other, entries in self.versions.items():
            if other == serial:
                continue
            for rel, e in entries.items():
                new = shared.get((e[3], e[4]))
                if new is not None and new[5] == e[5] and new[:2] == e[:2]:
                    entries[rel] = new

    def rekey(self, old: StatKey, new: StatKey) -> None:
        """Give every record of identity ``old`` the identity ``new`` (we changed its ctime)."""
        for entries in self.versions.values():
            for rel, e in entries.items():
                if e[:5] == old:
                    entries[rel] = (*new, e[5])

    def retain(self, serials: Iterable[int]) -> None:
        keep = set(serials)
        self.versions = {s: e for s, e in self.versions.items() if s in keep}

    def save(self) -> None:
        """Replace the cache file (temp file + rename); raises ``StorageError``.

        Not fsynced: after a power cut a lost or empty cache only costs a
        re-hash, never a wrong answer (an entry must match ``lstat`` exactly).
        """
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(msgpack.packb(self.versions, use_bin_type=True))
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise storage_error(exc, "write", self.path) from None

    def trusted_files(
        self, serial: int, files: Iterable[FileEntry], root: str
    ) -> dict[str, os.stat_result]:
        """``{path: lstat}`` of the ``files`` under ``root`` (a tree version ``serial``) that
        the cache vouches for, as ``trusted`` decides each, in one tight loop (no
        ``Path``, no method call per file: this runs over every file of a tree)."""
        entries = self.versions.get(serial, {})
        lstat = os.lstat
        out: dict[str, os.stat_result] = {}
        for f in files:
            rel = f.path
            rec = entries.get(rel)
            if not (isinstance(rec, tuple) and len(rec) == 6 and rec[5] == f.sha256):
                continue
            try:
                st = lstat(f"{root}/{rel}")
            except OSError:
                continue
            if (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev) == rec[:5]:
                out[rel] = st
        return out

    def trusted(self, serial: int, rel: str, path: str | Path, sha: bytes) -> os.stat_result | None:
        """Return ``lstat(path)`` if the cache vouches that ``path`` holds ``sha``, else ``None``."""
        rec = self.get(serial, rel)
        if rec is None or rec[5] != sha:
            return None
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return st if stat_key(st) == rec[:5] else None


@dataclass
class Reuse:
    """What ``find_sources`` found: trusted files by sha256, and what it had to read."""

    sources: dict[bytes, Source]
    modified: list[str]
    rehashed: int = 0
    rehashed_bytes: int = 0


def find_sources(
    man: Manifest,
    versions: list[Version],
    cache: StatCache,
    file_at: Callable[[str, str], str],
    skip: Collection[bytes] = (),
) -> Reuse:
    """Find, for each file content ``man`` needs, a trusted copy in a version on disk.

    ``versions`` are searched in order (put the live version first), each only
    for what the ones before it lacked, by their cache records (a version the
    cache does not know is read from its manifest); ``file_at(root, path)``
    names a path of a version at ``root``. A file whose ``lstat`` differs from
    the cache is re-hashed: if the bytes are still right it is trusted (and the
    cache updated), otherwise it is skipped, and if it is live it is reported
    in ``modified``. Contents in ``skip`` are not looked for. Raises
    ``NotFoundError``/``StorageError`` only when an unknown version's manifest
    cannot be read.
    """
    need = {f.sha256: f for f in man.files if f.sha256 not in skip}
    reuse = Reuse({}, [])
    for v in versions:
        if len(reuse.sources) == len(need):
            break
        at = str(v.root)
        for rel, sha in v.files(cache):
            f = need.get(sha)
            if f is None or sha in reuse.sources:
                continue
            path = file_at(at, rel)
            st = cache.trusted(v.serial, rel, path, sha)
            if st is None:
                st = _rehash(path, f, reuse)
                if st is None:
                    if v.live:
                        reuse.modified.append(rel)
                    continue
                cache.put(v.serial, rel, stat_key(st), sha)
            reuse.sources[sha] = Source(path, st, f)
    return reuse


def _rehash(path: str, f: FileEntry, reuse: Reuse) -> os.stat_result | None:
    """Read ``path`` and return its ``lstat`` if it is a regular file holding ``f``'s bytes."""
    try:
        before = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(before.st_mode) or before.st_size != f.size:
        return None
    try:
        digest, _ = hash_file(path)
        after = os.lstat(path)
    except (StorageError, OSError):
        return None
    reuse.rehashed += 1
    reuse.rehashed_bytes += f.size
    if digest != f.sha256 or stat_key(after) != stat_key(before):
        return None
    return after


def record_tree(
    man: Manifest, root: Path, file_at: Callable[[str, str], str], known: dict[str, StatKey]
) -> dict[str, Entry]:
    """Return the cache records of a freshly staged version at ``root``.

    ``known`` holds identities already taken during staging (from ``fstat``);
    other files are ``lstat``ed. Raises ``StorageError`` if a file is missing.
    """
    if all(f.path in known for f in man.files):  # the usual case: one pass, no lstat
        return {f.path: (*known[f.path], f.sha256) for f in man.files}
    out: dict[str, Entry] = {}
    for f in man.files:
        key = known.get(f.path)
        if key is None:
            p = file_at(str(root), f.path)
            try:
                key = stat_key(os.lstat(p))
            except OSError as exc:
                raise StorageError(f"cannot stat staged {p}: {exc.strerror}") from None
        out[f.path] = (*key, f.sha256)
    return out
