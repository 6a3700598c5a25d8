"""What this node can serve to peers: blobs, pieces of blobs, manifests, roots.

Theory of operation. A blob can be served from two places:

* the blob store (``blobs/sha256/<hex>``), named by its hash;
* a *held file*: a file of a version on disk (installed or kept) whose
  manifest says which chunks it is made of and at which offsets. A node that
  built a release from deltas, or whose store was garbage-collected, can so
  still serve the literal chunks its neighbours need.

A blob a fetch just landed (``STATE/fetching``, hash-checked, not yet made
durable) is served too: a swarm relays each blob as soon as it is here.

Every whole blob read is re-hashed before it leaves (a held file may have been
edited on disk, a stored blob may have rotted): serving bad bytes would get
this node banned by its peers. A piece of a blob (range request) cannot be
checked alone; the receiver checks the reassembled blob.

The held-file index is rebuilt by ``refresh`` after every apply or rollback.
Reads are small (one chunk, one range piece) and done inline.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

from p2pupd.daemon.apply.engine import reusable_files
from p2pupd.daemon.errors import DaemonError, NotFoundError
from p2pupd.daemon.state.gate import held_manifests
from p2pupd.daemon.state.node import Node
from p2pupd.protocol import ids
from p2pupd.protocol.manifest import Manifest

MANIFEST_CACHE = 4


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return -1


class Content:
    """Read-side view of a node's store and held files; see the module docstring."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._held: dict[bytes, tuple[Path, int, int]] = {}  # chunk -> (file, offset, size)
        self._manifests: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._blob_dir = str(node.store.blob_dir)
        self._landing_dir: str | None = None

    def serve_landed(self, landing_dir: Path) -> None:
        """Also serve blobs landed in ``landing_dir`` (the fetch's, before they are committed)."""
        self._landing_dir = str(landing_dir)

    def refresh(self) -> None:
        """Rebuild the index of chunks readable from held files."""
        index: dict[bytes, tuple[Path, int, int]] = {}
        for name, cfg in self.node.config.components.items():
            try:
                st = self.node.state.read_state(name)
                files = reusable_files(self.node, cfg, st)
                mans = held_manifests(self.node, name)
            except DaemonError:
                continue
            for man in mans:
                for f in man.files:
                    path = files.get(f.sha256)
                    if path is None:
                        continue
                    for digest, offset, size in f.chunk_spans():
                        index.setdefault(digest, (path, offset, size))
        self._held = index

    def has(self, digest: bytes) -> bool:
        return digest in self._held or self.node.store.has(digest)

    def servable(self, man: Manifest) -> tuple[bool, list[bytes]]:
        """Return (every blob of ``man`` can be served, the digests that can)."""
        blobs = man.blob_sizes()
        have = [d for d in blobs if self.has(d)]
        return len(have) == len(blobs), have

    def read_blob(self, digest: bytes, max_bytes: int) -> bytes | None:
        """The whole blob, hash-checked, or None (absent, too big, unreadable)."""
        # One open, fstat and read: this runs for every chunk a peer asks for.
        name = digest.hex()
        fd = _open(os.path.join(self._blob_dir, name))
        if fd < 0 and self._landing_dir is not None:
            # Landed from a peer and hash-checked, not yet committed: served at
            # once (a swarm relays a blob as soon as it is here); if the commit
            # moved it meanwhile, the store has it now.
            fd = _open(os.path.join(self._landing_dir, name))
            if fd < 0:
                fd = _open(os.path.join(self._blob_dir, name))
        if fd >= 0:
            try:
                size = os.fstat(fd).st_size
                data = os.read(fd, size) if size <= max_bytes else b""
            except OSError:
                data = b""
            finally:
                os.close(fd)
            if data and ids.sha256(data) == digest:
                return data
            return None  # too big for one frame, unreadable or rotted: not served
        held = self._held.get(digest)
        if held is None or held[2] > max_bytes:
            return None
        path, offset, size = held
        try:
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), size, offset)
        except OSError:
            data = b""
        if len(data) != size or ids.sha256(data) != digest:
            self._held.pop(digest, None)  # the file changed on disk: stop offering it
            return None
        return data

    def read_range(self, digest: bytes, offset: int, length: int) -> bytes | None:
        """Up to ``length`` bytes of the blob from ``offset``, or None if not served."""
        store = self.node.store
        if store.has(digest):
            try:
                with store.open(digest) as f:
                    size = os.fstat(f.fileno()).st_size
                    if offset >= size:
                        return None
                    return os.pread(f.fileno(), min(length, size - offset), offset)
            except (DaemonError, OSError):
                return None
        held = self._held.get(digest)
        if held is None or offset >= held[2]:
            return None
        data = self.read_blob(digest, held[2])
        return None if data is None else data[offset : offset + length]

    def manifest_bytes(self, component: str, serial: int) -> bytes | None:
        """The stored envelope of a release, or None (small LRU cache: ranged reads)."""
        key = (component, serial)
        data = self._manifests.get(key)
        if data is None:
            try:
                data = self.node.releases.get_bytes(component, serial)
            except (DaemonError, ValueError):
                return None
            self._manifests[key] = data
            while len(self._manifests) > MANIFEST_CACHE:
                self._manifests.popitem(last=False)
        self._manifests.move_to_end(key)
        return data

    def root_bytes(self, version: int) -> bytes | None:
        """Root metadata of ``version`` if this node accepted it, else None."""
        try:
            return self.node.trust_store.history().get(version)
        except (DaemonError, NotFoundError):
            return None
