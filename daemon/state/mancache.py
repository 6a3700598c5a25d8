"""A cache of verified release manifests, so a command does not re-decode them.

Theory of operation. Loading a stored release re-verifies it: signature check,
canonical-encoding check and per-entry validation of every path — for a
20,000-file release that is most of a second, paid several times per apply
(the new release, the live one, kept ones). The result of that work depends
only on the release envelope's bytes and on the pinned root, so it is cached
under ``STATE/cache/manifests/`` keyed by
``sha256(envelope) . sha256(root) . format``:

* a release file changed on disk hashes differently: a miss, fully verified;
* a root rotation (keys may have been revoked) changes the key: a miss;
* a change to the ``Manifest`` classes changes ``format``: a miss.

Entries are pickles read back with an unpickler that only builds the
manifest's own dataclasses, so even a tampered cache file cannot run code;
it lives in the state directory, whose writers could replace the trusted root
anyway. Any damage reads as a miss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import pickle
from pathlib import Path
from typing import Any

from p2pupd.daemon.errors import CorruptStoreError, StorageError
from p2pupd.daemon.fsutil import atomic_write
from p2pupd.daemon.state.node import Node
from p2pupd.protocol import manifest as manifest_module
from p2pupd.protocol.errors import CodecError, RevokedKeyError, VerificationError
from p2pupd.protocol.manifest import ChunkRef, FileEntry, Manifest

_CLASSES = ("ChunkRef", "Delta", "DirEntry", "FileEntry", "HookRef", "Manifest", "SymlinkEntry")
FORMAT = hashlib.sha256(
    repr(
        [(c, [f.name for f in dataclasses.fields(getattr(manifest_module, c))]) for c in _CLASSES]
    ).encode()
).hexdigest()[:16]


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == manifest_module.__name__ and name in _CLASSES:
            return getattr(manifest_module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a manifest class")


class ManifestCache:
    """Verified manifests of one node, in memory for this process and on disk across runs."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.dir = node.state.cache_dir / "manifests"
        self._mem: dict[tuple[str, int], Manifest] = {}
        self._root_digest: bytes | None = None

    def get(self, component: str, serial: int) -> Manifest:
        """Return the verified manifest of ``component`` ``serial``.

        Raises ``NotFoundError`` if it is not stored, ``CorruptStoreError`` if
        it no longer verifies, ``StorageError`` if it cannot be read.
        """
        key = (component, serial)
        if key not in self._mem:
            self._mem[key] = self._load(component, serial)
        return self._mem[key]

    def _root(self) -> bytes:
        if self._root_digest is None:
            try:
                data = self.node.trust_store.current_path.read_bytes()
            except OSError as exc:
                raise StorageError(f"cannot read the pinned root: {exc.strerror}") from None
            self._root_digest = hashlib.sha256(data).digest()
        return self._root_digest

    def _load(self, component: str, serial: int) -> Manifest:
        data = self.node.releases.get_bytes(component, serial)
        h = hashlib.sha256(data)
        h.update(self._root())
        path = self.dir / f"{h.hexdigest()}-{FORMAT}.pickle"
        cached = _read(path)
        if cached is not None and (cached.component, cached.serial) == (component, serial):
            return cached
        try:
            man = self.node.trust_chain().verify_held(data, component)[0]
        except RevokedKeyError:
            raise
        except (CodecError, VerificationError) as exc:
            raise CorruptStoreError(
                f"stored release {component}/{serial} is damaged: {exc}"
            ) from None
        with contextlib.suppress(StorageError, OSError):  # a cache: best effort
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(path, _dump(man), mode=0o600)
        return man


# Files are most of a manifest: they are stored as plain tuples and rebuilt
# without running each frozen dataclass's __init__ (a third of the time).
# Only while the two classes have exactly these fields; else whole pickles.
_FAST = [f.name for f in dataclasses.fields(FileEntry)] == [
    "path", "mode", "size", "sha256", "mtime", "chunks",
] and [f.name for f in dataclasses.fields(ChunkRef)] == ["digest", "size"]  # fmt: skip


def _whole(f: FileEntry) -> bool:
    """Whether ``f`` is one chunk: its own bytes (most files of a tree are)."""
    return len(f.chunks) == 1 and f.chunks[0].digest == f.sha256 and f.chunks[0].size == f.size


def _chunks(f: FileEntry) -> list[tuple[bytes, int]]:
    return [(c.digest, c.size) for c in f.chunks]


def _dump(man: Manifest) -> bytes:
    """The cache entry of ``man``: files as tuples, the chunk list ``None`` for a file
    that is one chunk (rebuilt from the file's own sha256 and size, so that
    neither the list nor a second digest is stored and read back)."""
    if not _FAST:
        return pickle.dumps(man, protocol=pickle.HIGHEST_PROTOCOL)
    files = [
        (f.path, f.mode, f.size, f.sha256, f.mtime, None if _whole(f) else _chunks(f))
        for f in man.files
    ]
    head = dataclasses.replace(man, files=())
    return pickle.dumps((head, files), protocol=pickle.HIGHEST_PROTOCOL)


def _read(path: Path) -> Manifest | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        obj = _Unpickler(io.BytesIO(data)).load()
        if isinstance(obj, tuple) and _FAST:
            head, files = obj
            obj = dataclasses.replace(head, files=_files(files))
    except Exception:  # any damage is a miss
        return None
    return obj if isinstance(obj, Manifest) else None


def _files(
    rows: list[tuple[str, int, int, bytes, int, list[tuple[bytes, int]] | None]],
) -> tuple[FileEntry, ...]:
    """Rebuild the file entries of ``_dump``'s tuples (also those written before a whole
    file was stored as ``None``: every chunk listed). One inline loop, without
    calling ``__init__``: this builds 20,000 entries and more per tree."""
    new = object.__new__
    out: list[FileEntry] = []
    append = out.append
    for path, mode, size, sha, mtime, chunks in rows:
        if chunks is None:
            c = new(ChunkRef)
            c.__dict__.update(digest=sha, size=size)
            refs: tuple[ChunkRef, ...] = (c,)
        else:
            parts: list[ChunkRef] = []
            for digest, n in chunks:
                c = new(ChunkRef)
                c.__dict__.update(digest=digest, size=n)
                parts.append(c)
            refs = tuple(parts)
        f = new(FileEntry)
        f.__dict__.update(path=path, mode=mode, size=size, sha256=sha, mtime=mtime, chunks=refs)
        append(f)
    return tuple(out)
