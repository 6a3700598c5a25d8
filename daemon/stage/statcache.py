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

The same holds for directories: with a tree's records we keep the ``lstat``
identity of each of its directories once the version is complete
(``Shape``). Adding, removing or renaming an entry changes a directory's
mtime and ctime, so a directory that still has that identity holds exactly
the entries it held then, and reshaping a recycled version (recycle.py) need
not list it.

The cache is a local optimisation: a lost or damaged cache file only costs a
re-hash, so it is written with a plain atomic write and read leniently.

Its cost must not grow with the versions kept: it is stored as one file of
columns per version (``StatCache``), a version is read only when used and
decoded only when a path is looked up in it, the contents an update needs are
searched for in the stored sha256 column directly, and only the versions that
changed are written.
"""

from __future__ import annotations

import array
import contextlib
import os
import re
import stat
import struct
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import msgpack

from p2pupd.daemon.errors import StorageError
from p2pupd.daemon.fsutil import hash_file, storage_error
from p2pupd.protocol.manifest import FileEntry, Manifest

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


DirKey = tuple[int, int, int, int]  # mtime_ns, ctime_ns, ino, dev


def dir_key(st: os.stat_result) -> DirKey:
    return st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


@dataclass(frozen=True)
class Shape:
    """What a version's tree held besides files, recorded with its files' records.

    ``dirs``: the ``lstat`` identity of each directory (but the root) taken once
    the version was complete. Adding, removing or renaming an entry changes a
    directory's mtime and ctime, and ctime cannot be set back, so a directory
    with the same identity later still holds exactly the entries it held then:
    the version's files (as many as ``files``), ``links`` and directories in it.
    """

    dirs: dict[str, DirKey]
    links: tuple[str, ...]
    files: int


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
        entries = cache.entries(self.serial)
        if entries:
            return [(rel, e[5]) for rel, e in entries.items()]
        return ((f.path, f.sha256) for f in self.man().files)

    def holding(
        self, cache: StatCache, shas: Collection[bytes]
    ) -> Iterable[tuple[str, bytes, Entry | None]]:
        """``(path, sha256, cache record)`` of its files holding one of ``shas``, in order;
        the record is ``None`` when the cache does not know the version (then its
        manifest is read)."""
        found = cache.candidates(self.serial, shas)
        if found is not None:
            return ((rel, e[5], e) for rel, e in found)
        want = set(shas)
        return ((f.path, f.sha256, None) for f in self.man().files if f.sha256 in want)


class _Records:
    """One version's records: stored columns, read and decoded only when needed.

    ``raw`` is ``(paths joined by NUL, sha256s, signed columns, unsigned
    columns)`` exactly as stored, read from ``file`` on first use with the
    version's ``shape`` (if recorded); it stays valid until a record is
    changed, when ``StatCache`` drops it so that ``save`` writes the version
    again. A file that cannot be read or is malformed is a miss: no records.
    """

    __slots__ = ("_map", "_paths", "_raw", "_shape", "file")

    def __init__(
        self,
        file: Path | None = None,
        entries: dict[str, Entry] | None = None,
        shape: Shape | None = None,
    ) -> None:
        self.file = file
        self._raw: _Raw | None = None
        self._map = entries
        self._shape = shape
        self._paths: list[str] | None = None

    def _read(self) -> None:
        if self._raw is None and self.file is not None and self._map is None:
            stored = _read_columns(self.file)
            self._raw, self._shape = stored or (("", b"", b"", b""), None)

    @property
    def raw(self) -> _Raw | None:
        """The stored columns, or ``None`` once changed (or for records never stored)."""
        self._read()
        return self._raw

    @property
    def shape(self) -> Shape | None:
        self._read()
        return self._shape

    def changed(self) -> dict[str, Entry]:
        """The records, to be changed: what is stored is no longer what they are (a
        file's record changes, not which entries the version holds: the shape stays)."""
        entries = self.entries()
        self._raw, self._paths, self.file = None, None, None
        return entries

    def stored(self, raw: _Raw, file: Path) -> None:
        """Note that ``raw`` is now what ``file`` holds."""
        self._raw, self._paths, self.file = raw, None, file

    def empty(self) -> bool:
        raw = self.raw
        return not raw[1] if raw is not None else not self.entries()

    def entries(self) -> dict[str, Entry]:
        if self._map is None:
            raw = self.raw
            self._map = _decode(raw) if raw is not None else {}
        return self._map

    def paths(self) -> list[str]:
        if self._paths is None:
            raw = self.raw
            assert raw is not None
            self._paths = raw[0].split("\0") if raw[1] else []
        return self._paths

    def find(self, shas: Collection[bytes]) -> list[tuple[str, Entry]]:
        """``(path, record)`` of every file holding one of ``shas``, in stored order."""
        raw = self.raw
        if raw is None or len(shas) > _FIND_MAX:
            want = set(shas)
            return [(rel, e) for rel, e in self.entries().items() if e[5] in want]
        blob = raw[1]
        hits: list[int] = []
        for sha in shas:
            pos = blob.find(sha)
            while pos >= 0:
                if pos % 32 == 0:  # not a match straddling two digests
                    hits.append(pos // 32)
                pos = blob.find(sha, pos + 1)
        if not hits:
            return []
        hits.sort()
        paths = self.paths()
        return [(paths[i], _entry_at(raw, i)) for i in hits]


FORMAT = 2  # columns, one file per version; format 1 (one map of records) is still read
_Raw = tuple[str, bytes, bytes, bytes]
_FIND_MAX = 64  # more contents than this: one pass over the decoded records is cheaper
_I64 = struct.Struct("<q")
_U64 = struct.Struct("<Q")
_VERSION_FILE = re.compile(r"v([0-9]{1,19})")


def _columns(kind: str, data: bytes) -> list[int]:
    a = array.array(kind)
    a.frombytes(data)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tolist()


def _encode(entries: dict[str, Entry]) -> _Raw:
    """Columns of ``entries``; ``ValueError``/``OverflowError`` if one cannot be stored."""
    if not entries:
        return ("", b"", b"", b"")
    sizes, mtimes, ctimes, inos, devs, shas = zip(*entries.values(), strict=True)
    signed = array.array("q", sizes)
    signed.extend(mtimes)
    signed.extend(ctimes)
    unsigned = array.array("Q", inos)
    unsigned.extend(devs)
    digests = b"".join(shas)
    paths = "\0".join(entries)
    if len(digests) != 32 * len(shas) or paths.count("\0") != len(shas) - 1:
        raise ValueError("not a sha256, or a NUL in a path")
    if sys.byteorder == "big":
        signed.byteswap()
        unsigned.byteswap()
    return paths, digests, signed.tobytes(), unsigned.tobytes()


def _read_columns(file: Path) -> tuple[_Raw, Shape | None] | None:
    """The columns and shape stored in ``file``, or ``None`` if unreadable or malformed."""
    try:
        raw = msgpack.unpackb(file.read_bytes(), use_list=False)
    except (OSError, ValueError, TypeError, msgpack.UnpackException):
        return None
    if not (isinstance(raw, tuple) and len(raw) == 6 and raw[0] == FORMAT):
        return None
    _, paths, shas, signed, unsigned, shape = raw
    if not (
        isinstance(paths, str)
        and isinstance(shas, bytes)
        and isinstance(signed, bytes)
        and isinstance(unsigned, bytes)
    ):
        return None
    n, rem = divmod(len(shas), 32)
    names = paths.count("\0") + 1 if n else 0
    if rem or len(signed) != 24 * n or len(unsigned) != 16 * n or names != n or (paths and not n):
        return None
    return (paths, shas, signed, unsigned), _shape(shape)


def _shape(value: object) -> Shape | None:
    """The ``Shape`` stored as ``value``; ``None`` (trust no directory) if malformed."""
    if not (isinstance(value, tuple) and len(value) == 3):
        return None
    dirs, links, files = value
    if not (isinstance(dirs, dict) and isinstance(links, tuple) and isinstance(files, int)):
        return None
    for rel, key in dirs.items():
        if not (isinstance(rel, str) and isinstance(key, tuple) and len(key) == 4):
            return None
        if not all(isinstance(x, int) for x in key):
            return None
    if not all(isinstance(rel, str) for rel in links):
        return None
    return Shape(dirs, links, files)


def _shape_value(shape: Shape | None) -> object:
    return None if shape is None else (shape.dirs, list(shape.links), shape.files)


def _decode(raw: _Raw) -> dict[str, Entry]:
    paths, shas, signed, unsigned = raw
    n = len(shas) // 32
    if not n:
        return {}
    s, u = _columns("q", signed), _columns("Q", unsigned)
    digests = [shas[i : i + 32] for i in range(0, 32 * n, 32)]
    rows = zip(s[:n], s[n : 2 * n], s[2 * n :], u[:n], u[n:], digests, strict=True)
    return dict(zip(paths.split("\0"), rows, strict=True))


def _entry_at(raw: _Raw, i: int) -> Entry:
    _, shas, signed, unsigned = raw
    n = len(shas) // 32
    return (
        _I64.unpack_from(signed, 8 * i)[0],
        _I64.unpack_from(signed, 8 * (n + i))[0],
        _I64.unpack_from(signed, 8 * (2 * n + i))[0],
        _U64.unpack_from(unsigned, 8 * i)[0],
        _U64.unpack_from(unsigned, 8 * (n + i))[0],
        shas[32 * i : 32 * i + 32],
    )


def _valid_entry(e: object) -> bool:
    return (
        isinstance(e, tuple)
        and len(e) == 6
        and all(isinstance(x, int) for x in e[:5])
        and isinstance(e[5], bytes)
    )


def _read_format1(file: Path) -> dict[int, _Records]:
    """The versions of a format 1 cache file (``{serial: {path: record}}``); damage is a miss."""
    out: dict[int, _Records] = {}
    with contextlib.suppress(OSError, ValueError, TypeError, msgpack.UnpackException):
        raw = msgpack.unpackb(file.read_bytes(), strict_map_key=False, use_list=False)
        if isinstance(raw, dict):
            for s, entries in raw.items():
                if isinstance(s, int) and isinstance(entries, dict):
                    good = {
                        r: e for r, e in entries.items() if isinstance(r, str) and _valid_entry(e)
                    }
                    out[s] = _Records(entries=good)
    return out


class StatCache:
    """``{serial: {path: (*stat key, sha256)}}`` for one component.

    Stored in the directory ``<path>.d``, one file per version (``v<serial>``)
    holding its records as columns: all paths in one string, all sha256s in
    one byte string, the five stat numbers as two arrays of 64-bit integers.
    A version's file is read only when the version is used, decoded only when
    a path is looked up in it, and written only when it changed; so an update
    writes the new version's file and removes the recycled one's, and never
    rewrites (or makes the filesystem flush) the kept versions' records. A
    format 1 cache (one file at ``path``) is still read, and replaced by the
    directory on the next save.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dir = path.with_name(path.name + ".d")
        self._versions: dict[int, _Records] = {}
        self._gone: set[int] = set()  # versions whose file is to be removed
        self._dirty = False
        self._legacy = False  # records came from a format 1 file
        try:
            names = os.listdir(self.dir)
        except OSError:
            names = []
        self._debris: list[str] = []  # temp files of a save that was cut short
        for name in names:
            m = _VERSION_FILE.fullmatch(name)
            if m:
                self._versions[int(m.group(1))] = _Records(file=self.dir / name)
            elif name.endswith(".tmp"):
                self._debris.append(name)
                self._dirty = True
        if not names and path.exists():
            self._versions = _read_format1(path)
            self._legacy = self._dirty = True

    def serials(self) -> list[int]:
        return list(self._versions)

    def entries(self, serial: int) -> Mapping[str, Entry]:
        """The records of version ``serial`` by path (read-only: change them with ``put``)."""
        rec = self._versions.get(serial)
        return rec.entries() if rec is not None else {}

    def get(self, serial: int, rel: str) -> Entry | None:
        return self.entries(serial).get(rel)

    def _changing(self, serial: int) -> dict[str, Entry]:
        rec = self._versions.get(serial)
        if rec is None:
            rec = self._versions[serial] = _Records(entries={})
        self._dirty = True
        return rec.changed()

    def put(self, serial: int, rel: str, key: StatKey, sha: bytes) -> None:
        self._changing(serial)[rel] = (*key, sha)

    def replace_version(
        self, serial: int, entries: dict[str, Entry], shape: Shape | None = None
    ) -> None:
        """Record a freshly staged version: its files and, for a tree, its ``shape``."""
        self._versions[serial] = _Records(entries=entries, shape=shape)
        self._dirty = True

    def shape(self, serial: int) -> Shape | None:
        """The recorded shape of version ``serial``, if its file records are complete."""
        rec = self._versions.get(serial)
        shape = rec.shape if rec is not None else None
        if rec is None or shape is None or len(rec.entries()) != shape.files:
            return None
        return shape

    def take(self, serial: int) -> dict[str, Entry]:
        """Remove version ``serial`` and hand its records over (a recycled version's)."""
        rec = self._versions.pop(serial, None)
        if rec is None:
            return {}
        self._gone.add(serial)
        self._dirty = True
        return rec.changed()

    def candidates(self, serial: int, shas: Collection[bytes]) -> list[tuple[str, Entry]] | None:
        """``(path, record)`` of the files of ``serial`` recorded with one of ``shas``, in
        stored order; ``None`` if the cache knows nothing of that version.

        Searches the stored sha256 column without decoding the version when
        only a few contents are looked for (the usual update).
        """
        rec = self._versions.get(serial)
        if rec is None or rec.empty():
            return None
        return rec.find(shas)

    def adopt_links(self, serial: int) -> None:
        """Refresh other versions' records of inodes that ``serial`` shares by hard link.

        Linking changes an inode's ctime; the file's bytes are the same, so a
        record with the same inode and sha256 may take the new identity.
        """
        shared = {(e[3], e[4]): e for e in self.entries(serial).values()}
        for other in self.serials():
            if other == serial:
                continue
            changed = {}
            for rel, e in self.entries(other).items():
                new = shared.get((e[3], e[4]))
                if new is not None and new is not e and new[5] == e[5] and new[:2] == e[:2]:
                    changed[rel] = new
            if changed:
                self._changing(other).update(changed)

    def rekey(self, old: StatKey, new: StatKey) -> None:
        """Give every record of identity ``old`` the identity ``new`` (we changed its ctime)."""
        for serial in self.serials():
            changed = {rel: (*new, e[5]) for rel, e in self.entries(serial).items() if e[:5] == old}
            if changed:
                self._changing(serial).update(changed)

    def retain(self, serials: Iterable[int]) -> None:
        keep = set(serials)
        gone = self._versions.keys() - keep
        if gone:
            self._versions = {s: r for s, r in self._versions.items() if s in keep}
            self._gone |= gone
            self._dirty = True

    def save(self) -> None:
        """Write the versions that changed, remove those dropped; ``StorageError``.

        Each version's file is replaced atomically (temp file + rename), but
        not fsynced: after a power cut a lost, empty or damaged file only costs
        a re-hash, never a wrong answer (an entry must match ``lstat``
        exactly, and a file not of the stored shape is no records at all).
        A version that cannot be stored (an inode number beyond 64 bits, say)
        is left out: a miss.
        """
        if not self._dirty:
            return
        try:
            self.dir.mkdir(mode=0o700, exist_ok=True)
            for serial, rec in self._versions.items():
                if rec.file is not None:
                    continue  # stored, unchanged
                file = self.dir / f"v{serial}"
                try:
                    raw = _encode(rec.entries())
                except (ValueError, OverflowError, TypeError):
                    self._gone.add(serial)
                    continue
                self._gone.discard(serial)
                tmp = self.dir / f".v{serial}.{os.getpid()}.tmp"
                try:
                    data = (FORMAT, *raw, _shape_value(rec.shape))
                    tmp.write_bytes(msgpack.packb(data, use_bin_type=True))
                    os.replace(tmp, file)
                except OSError:
                    with contextlib.suppress(OSError):
                        tmp.unlink()
                    raise
                rec.stored(raw, file)
            for serial in self._gone - self._versions.keys():
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / f"v{serial}").unlink()
            self._gone.clear()
            for name in self._debris:
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / name).unlink()
            self._debris.clear()
            if self._legacy:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                self._legacy = False
        except OSError as exc:
            raise storage_error(exc, "write", self.dir) from None
        self._dirty = False

    def trusted(self, serial: int, rel: str, path: str | Path, sha: bytes) -> os.stat_result | None:
        """Return ``lstat(path)`` if the cache vouches that ``path`` holds ``sha``, else ``None``."""
        rec = self.get(serial, rel)
        if rec is None or rec[5] != sha:
            return None
        return _lstat_matching(path, rec)


def _lstat_matching(path: str | Path, rec: Entry) -> os.stat_result | None:
    """``lstat(path)`` if it still has the identity recorded in ``rec``, else ``None``."""
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
    files: Iterable[FileEntry],
    versions: list[Version],
    cache: StatCache,
    file_at: Callable[[str, str], str],
) -> Reuse:
    """Find, for the contents of ``files``, a trusted copy in a version on disk.

    ``versions`` are searched in order (put the live version first), each only
    for what the ones before it lacked, by their cache records (a version the
    cache does not know is read from its manifest); ``file_at(root, path)``
    names a path of a version at ``root``. A file whose ``lstat`` differs from
    the cache is re-hashed: if the bytes are still right it is trusted (and the
    cache updated), otherwise it is skipped, and if it is live it is reported
    in ``modified``. Raises ``NotFoundError``/``StorageError`` only when an
    unknown version's manifest cannot be read.
    """
    need = {f.sha256: f for f in files}
    reuse = Reuse({}, [])
    for v in versions:
        wanted = [sha for sha in need if sha not in reuse.sources]
        if not wanted:
            break
        at = str(v.root)
        for rel, sha, rec in v.holding(cache, wanted):
            if sha in reuse.sources:
                continue
            f = need[sha]
            path = file_at(at, rel)
            st = _lstat_matching(path, rec) if rec is not None else None
            if st is None:
                st = _rehash(path, f, reuse)
                if st is None:
                    if v.live:
                        reuse.modified.append(rel)
                    continue
                cache.put(v.serial, rel, stat_key(st), f.sha256)
            reuse.sources[f.sha256] = Source(path, st, f)
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
    man: Manifest,
    root: Path,
    file_at: Callable[[str, str], str],
    made: Mapping[str, Entry],
    carried: dict[str, Entry] | None = None,
) -> dict[str, Entry]:
    """Return the cache records of a freshly staged version at ``root``.

    ``made`` holds the records of the files staging made (identities from
    ``fstat``), ``carried`` those of files a recycled stage kept in place
    unchanged (that dict is reused); both hold only paths of ``man``. Other
    files are ``lstat``ed. Raises ``StorageError`` if a file is missing.
    """
    out = carried if carried is not None else {}
    out.update(made)
    if len(out) == len(man.files):  # the usual case: every file accounted for, no lstat
        return out
    for f in man.files:
        if f.path not in out:
            p = file_at(str(root), f.path)
            try:
                out[f.path] = (*stat_key(os.lstat(p)), f.sha256)
            except OSError as exc:
                raise StorageError(f"cannot stat staged {p}: {exc.strerror}") from None
    return out
