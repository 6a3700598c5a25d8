"""The release manifest: what a signed release contains.

A manifest describes one release of one component completely: every file (mode,
size, mtime, sha256 and the chunks it is cut into), symlink and empty directory,
plus the deltas a node may use instead of chunks and the hooks it may run. It is
the unit of trust: a node acts only on bytes a verified manifest names.

``Manifest.from_value`` is the only way in from untrusted bytes. It checks every
field's type and bound and the tree's shape (paths safe and unique, no entry
beneath a file or symlink, chunk sizes summing to the file size), raising
``SchemaError``/``UnsafePathError``; a manifest that decodes is safe to stage.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from p2pupd.protocol import encoding, ids, limits
from p2pupd.protocol.errors import CodecError, HazardousModeError, SchemaError, UnsafePathError

SPEC_VERSION = 1
HOOK_POINTS = ("pre-apply", "post-apply", "health")
MODE_MASK = 0o7777


@dataclass(frozen=True)
class ChunkRef:
    """One content-defined chunk of a file: its sha256 and length."""

    digest: bytes
    size: int


@dataclass(frozen=True)
class FileEntry:
    path: str
    mode: int
    size: int
    sha256: bytes
    mtime: int
    chunks: tuple[ChunkRef, ...]

    def chunk_spans(self) -> Iterator[tuple[bytes, int, int]]:
        """Yield ``(digest, offset, size)`` of each chunk, in file order."""
        off = 0
        for c in self.chunks:
            yield c.digest, off, c.size
            off += c.size


@dataclass(frozen=True)
class SymlinkEntry:
    path: str
    target: str


@dataclass(frozen=True)
class DirEntry:
    path: str
    mode: int
    mtime: int


@dataclass(frozen=True)
class Delta:
    """Bytes hashing to ``target`` = bspatch(concat(bytes of ``bases``), patch blob).

    ``kind`` is ``"file"`` when ``target`` and ``bases`` are whole-file sha256s
    (the node reads the base from an installed version) or ``"chunk"`` when they
    are chunk digests (the node reads bases from its store or a held file).
    ``"zchunk"`` has no bases: the patch blob is a zstd frame of the chunk
    ``target`` (a compressed literal). See ``deltaplan``.
    """

    kind: str
    target: bytes
    target_size: int
    bases: tuple[bytes, ...]
    patch: bytes
    patch_size: int


@dataclass(frozen=True)
class HookRef:
    """A WebAssembly hook module, a blob named by its sha256."""

    sha256: bytes
    size: int


@dataclass(frozen=True)
class Manifest:
    component: str
    version: str
    serial: int
    created: int
    files: tuple[FileEntry, ...]
    symlinks: tuple[SymlinkEntry, ...] = ()
    dirs: tuple[DirEntry, ...] = ()
    expires: int | None = None
    platform: str | None = None
    hooks: dict[str, HookRef] = field(default_factory=dict)
    deltas: tuple[Delta, ...] = ()

    # -- derived views -------------------------------------------------------

    def chunk_digests(self) -> set[bytes]:
        """Return every chunk digest the files of this release are made of."""
        return {c.digest for f in self.files for c in f.chunks}

    def blob_sizes(self) -> dict[bytes, int]:
        """Return {digest: size} of every blob a node may need: chunks, patches, hooks."""
        out: dict[bytes, int] = {}
        for f in self.files:
            for c in f.chunks:
                out[c.digest] = c.size
        for d in self.deltas:
            out[d.patch] = d.patch_size
        for h in self.hooks.values():
            out[h.sha256] = h.size
        return out

    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def file_map(self) -> dict[str, FileEntry]:
        return {f.path: f for f in self.files}

    # -- encoding ------------------------------------------------------------

    def to_value(self) -> dict[str, Any]:
        return {
            "_type": "release",
            "spec": SPEC_VERSION,
            "component": self.component,
            "version": self.version,
            "serial": self.serial,
            "created": self.created,
            "expires": self.expires,
            "platform": self.platform,
            "files": [
                [f.path, f.mode, f.size, f.sha256, f.mtime, [[c.digest, c.size] for c in f.chunks]]
                for f in self.files
            ],
            "symlinks": [[s.path, s.target] for s in self.symlinks],
            "dirs": [[d.path, d.mode, d.mtime] for d in self.dirs],
            "hooks": {k: [h.sha256, h.size] for k, h in self.hooks.items()},
            "deltas": [
                [d.kind, d.target, d.target_size, list(d.bases), d.patch, d.patch_size]
                for d in self.deltas
            ],
        }

    def encode(self) -> bytes:
        return encoding.encode(self.to_value())

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Decode and validate canonical manifest bytes (see ``from_value``)."""
        return cls.from_value(encoding.decode(data, budget=limits.MANIFEST_BUDGET))

    @classmethod
    def from_value(cls, v: Any) -> Manifest:
        """Build a manifest from a decoded value, checking every rule.

        Raises ``SchemaError`` for a wrong shape or bound and ``UnsafePathError``
        for a hostile path.
        """
        m = _map(v, "manifest")
        if m.get("_type") != "release":
            raise SchemaError("document is not a release manifest")
        if m.get("spec") != SPEC_VERSION:
            raise SchemaError(f"unsupported manifest spec {m.get('spec')!r}")
        files = tuple(
            _file(x) for x in _list(m.get("files"), "files", limits.MAX_FILES_PER_MANIFEST)
        )
        symlinks = tuple(
            _symlink(x) for x in _list(m.get("symlinks"), "symlinks", limits.MAX_FILES_PER_MANIFEST)
        )
        dirs = tuple(_dir(x) for x in _list(m.get("dirs"), "dirs", limits.MAX_FILES_PER_MANIFEST))
        hooks_v = _map(m.get("hooks"), "hooks")
        hooks: dict[str, HookRef] = {}
        for point, ref in hooks_v.items():
            if point not in HOOK_POINTS:
                raise SchemaError(f"unknown hook point {point!r:.40}")
            r = _list(ref, "hook", 2)
            if len(r) != 2:
                raise SchemaError("hook entry must be [sha256, size]")
            hooks[point] = HookRef(
                ids.check_digest(r[0]), _int(r[1], "hook size", limits.MAX_HOOK_BYTES)
            )
        deltas = tuple(
            _delta(x) for x in _list(m.get("deltas"), "deltas", limits.MAX_FILES_PER_MANIFEST)
        )
        expires = m.get("expires")
        platform = m.get("platform")
        man = cls(
            component=ids.check_component(m.get("component")),
            version=ids.check_version_label(m.get("version")),
            serial=_int(m.get("serial"), "serial", (1 << 63) - 1, minimum=1),
            created=_int(m.get("created"), "created", (1 << 63) - 1),
            expires=None if expires is None else _int(expires, "expires", (1 << 63) - 1),
            platform=None if platform is None else ids.check_platform(platform),
            files=files,
            symlinks=symlinks,
            dirs=dirs,
            hooks=hooks,
            deltas=deltas,
        )
        check_tree(man)
        return man


def check_tree(man: Manifest) -> None:
    """Check the shape of the tree a manifest describes.

    At most ``MAX_ENTRIES_PER_MANIFEST`` entries, none deeper than
    ``MAX_TREE_DEPTH``; every path is unique; no entry lies beneath a file or a
    symlink (so a symlink can never redirect where staging writes); a file's
    chunks sum to its size. Raises ``UnsafePathError`` or ``SchemaError``.
    Each directory on the way to an entry is checked once, however deep.
    """
    total = len(man.files) + len(man.symlinks) + len(man.dirs)
    if total > limits.MAX_ENTRIES_PER_MANIFEST:
        raise SchemaError(f"manifest has {total} entries, limit {limits.MAX_ENTRIES_PER_MANIFEST}")
    kinds: dict[str, str] = {}
    for path, kind in _entries(man):
        if path in kinds:
            raise UnsafePathError(f"duplicate path in manifest: {path!r:.100}")
        kinds[path] = kind
    dirs_ok: set[str] = set()  # directories known to lie beneath directories only
    for path in kinds:
        depth = path.count("/") + 1
        if depth > limits.MAX_TREE_DEPTH:
            raise UnsafePathError(
                f"{path!r:.60} is {depth} levels deep, limit {limits.MAX_TREE_DEPTH}"
            )
        parent = path.rpartition("/")[0]
        while parent and parent not in dirs_ok:
            pk = kinds.get(parent)
            if pk is not None and pk != "dir":
                raise UnsafePathError(f"{path!r:.100} lies beneath a {pk}")
            dirs_ok.add(parent)
            parent = parent.rpartition("/")[0]
    for f in man.files:
        if sum(c.size for c in f.chunks) != f.size:
            raise SchemaError(f"chunks of {f.path!r:.100} do not add up to its size")


def _entries(man: Manifest) -> Iterator[tuple[str, str]]:
    for f in man.files:
        yield f.path, "file"
    for s in man.symlinks:
        yield s.path, "symlink"
    for d in man.dirs:
        yield d.path, "dir"


# -- field readers: each raises SchemaError naming the field ------------------


def _map(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise SchemaError(f"{what} must be a map")
    return v


def _list(v: Any, what: str, max_len: int) -> list[Any]:
    if not isinstance(v, list):
        raise SchemaError(f"{what} must be a list")
    if len(v) > max_len:
        raise SchemaError(f"{what} has {len(v)} entries, limit {max_len}")
    return v


def _int(v: Any, what: str, maximum: int, minimum: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not minimum <= v <= maximum:
        raise SchemaError(f"{what} must be an integer in [{minimum}, {maximum}]")
    return v


def _fields(v: Any, what: str, n: int) -> list[Any]:
    lst = _list(v, what, n)
    if len(lst) != n:
        raise SchemaError(f"{what} entry must have {n} fields")
    return lst


def _file(v: Any) -> FileEntry:
    path, mode, size, sha, mtime, chunks = _fields(v, "file", 6)
    size_i = _int(size, "file size", limits.MAX_FILE_BYTES)
    crefs: list[ChunkRef] = []
    for c in _list(chunks, "chunks", limits.MAX_FILE_BYTES // limits.CHUNK_MIN_BYTES + 1):
        d, n = _fields(c, "chunk", 2)
        crefs.append(
            ChunkRef(ids.check_digest(d), _int(n, "chunk size", limits.CHUNK_MAX_BYTES, 1))
        )
    return FileEntry(
        path=ids.check_relpath(path),
        mode=_int(mode, "mode", MODE_MASK),
        size=size_i,
        sha256=ids.check_digest(sha),
        mtime=_int(mtime, "mtime", (1 << 63) - 1),
        chunks=tuple(crefs),
    )


def _symlink(v: Any) -> SymlinkEntry:
    path, target = _fields(v, "symlink", 2)
    return SymlinkEntry(ids.check_relpath(path), ids.check_symlink_target(target))


def _dir(v: Any) -> DirEntry:
    path, mode, mtime = _fields(v, "dir", 3)
    return DirEntry(
        ids.check_relpath(path), _int(mode, "mode", MODE_MASK), _int(mtime, "mtime", (1 << 63) - 1)
    )


def _delta(v: Any) -> Delta:
    kind, target, target_size, bases, patch, patch_size = _fields(v, "delta", 6)
    if kind not in ("file", "chunk", "zchunk"):
        raise SchemaError(f"unknown delta kind {kind!r:.20}")
    return Delta(
        kind=kind,
        target=ids.check_digest(target),
        target_size=_int(target_size, "delta target size", limits.MAX_FILE_BYTES),
        bases=tuple(ids.check_digest(b) for b in _list(bases, "delta bases", 64)),
        patch=ids.check_digest(patch),
        patch_size=_int(patch_size, "patch size", limits.MAX_BLOB_BYTES),
    )


def sort_entries(
    files: Iterable[FileEntry], symlinks: Iterable[SymlinkEntry], dirs: Iterable[DirEntry]
) -> tuple[tuple[FileEntry, ...], tuple[SymlinkEntry, ...], tuple[DirEntry, ...]]:
    """Return entries sorted by path so equal trees encode to equal bytes."""
    return (
        tuple(sorted(files, key=lambda e: e.path)),
        tuple(sorted(symlinks, key=lambda e: e.path)),
        tuple(sorted(dirs, key=lambda e: e.path)),
    )


# -- hazardous modes -------------------------------------------------------------
#
# What a signed release may not install unless the node allows it. A valid
# signature says who published a tree, not that every mode in it is safe to put
# on a node. Two kinds of entry are refused by default, because on
# a multi-user or networked node they hand the node to whoever can write them:
#
# * a **set-id file that others can write**: setuid or setgid (``0o6000``) with
#   group or world write (``0o022``): anyone in that group (or anyone) can swap
#   the program that then runs with the owner's or group's rights;
# * a **world-writable directory without the sticky bit** (``0o002`` without
#   ``0o1000``): anyone can delete or replace any file in it, including files
#   the release put there.
#
# A component may allow them (``p2pupd init --allow-hazardous-modes``), e.g. for
# a tree that is only ever unpacked into a container image. The check is pure
# and runs when a release is verified for the node -- on import and when a peer
# offers it -- so a refused release is never stored, staged or applied.

SET_ID_BITS = stat.S_ISUID | stat.S_ISGID
OTHERS_WRITE_BITS = stat.S_IWGRP | stat.S_IWOTH


@dataclass(frozen=True)
class Hazard:
    path: str
    shown: str  # ls-style mode, e.g. "-rwsrwsrwx"
    why: str


def hazards(man: Manifest) -> list[Hazard]:
    """Every entry of ``man`` whose mode is hazardous (see "hazardous modes" above), by path."""
    out: list[Hazard] = []
    for f in man.files:
        if f.mode & SET_ID_BITS and f.mode & OTHERS_WRITE_BITS:
            shown = stat.filemode(stat.S_IFREG | f.mode)
            out.append(Hazard(f.path, shown, "a set-id file others can write"))
    for d in man.dirs:
        if d.mode & stat.S_IWOTH and not d.mode & stat.S_ISVTX:
            shown = stat.filemode(stat.S_IFDIR | d.mode)
            out.append(Hazard(d.path, shown, "a world-writable directory without the sticky bit"))
    out.sort(key=lambda h: h.path)
    return out


def check_modes(man: Manifest, allowed: bool) -> None:
    """Raise ``HazardousModeError`` if ``man`` holds a hazardous mode and ``allowed`` is False."""
    if allowed:
        return
    found = hazards(man)
    if not found:
        return
    first = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    raise HazardousModeError(
        f"release {man.component} {man.version} would install {first.path!r:.120} as "
        f"{first.shown}, {first.why}{more}; component {man.component} does not allow "
        "hazardous modes (p2pupd init --allow-hazardous-modes to permit them)"
    )


__all__ = [
    "HOOK_POINTS",
    "ChunkRef",
    "CodecError",
    "Delta",
    "DirEntry",
    "FileEntry",
    "Hazard",
    "HookRef",
    "Manifest",
    "SymlinkEntry",
    "check_modes",
    "check_tree",
    "hazards",
    "sort_entries",
]
