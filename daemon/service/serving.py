"""What this node can serve to peers: blobs, pieces of blobs, manifests, roots.

Theory of operation. A blob can be served from two places:

* the blob store (``store/packstore.py``), named by its hash;
* a *held file*: a file of a version on disk (installed or kept) whose
  manifest says which chunks it is made of and at which offsets. A node that
  built a release from deltas, or whose store was garbage-collected, can so
  still serve the literal chunks its neighbours need.

Serving bad bytes would get this node banned by its peers, so nothing leaves
unchecked, at the cheapest check that suffices: a packed blob was verified
(sha256) when it was stored, and its xxh3 checksum is checked at every read
(bit rot), which costs about a microsecond a chunk where re-hashing cost tens;
a blob from a held file (which may have been edited on disk) or a loose file
is re-hashed. A piece of a blob (range request) cannot be checked alone; the
receiver checks the reassembled blob.

The held-file index is rebuilt by ``refresh`` after every apply or rollback.
Reads are small (one chunk, one range piece) and done inline. Manifests are
asked for by name (``manifest_for``): a peer that speaks "variants" may ask
for one of another platform's variants this node carries (state/carried.py).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from p2pupd.daemon.apply.engine import reusable_files
from p2pupd.daemon.errors import DaemonError, NotFoundError
from p2pupd.daemon.service.links import Spelling
from p2pupd.daemon.state.gate import held_manifests
from p2pupd.daemon.state.node import Node
from p2pupd.protocol import ids
from p2pupd.protocol.errors import CodecError, P2pupdError
from p2pupd.protocol.fleet.variants import split_key
from p2pupd.protocol.manifest import Manifest

MANIFEST_CACHE = 4


class Content:
    """Read-side view of a node's store and held files; see the module docstring."""

    def __init__(self, node: Node, spelling: Spelling) -> None:
        """``spelling``: how releases are named (ours, and variants carried for others)."""
        self.node = node
        self.spelling = spelling
        # Blobs fetched and not yet committed (the fetch's ``Spool.read``).
        self.spooled: Callable[[bytes, int], bytes | None] = lambda _d, _n: None
        self._held: dict[bytes, tuple[Path, int, int]] = {}  # chunk -> (file, offset, size)
        self._manifests: OrderedDict[tuple[str, int, str | None], bytes] = OrderedDict()

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
        """The whole blob, checked, or None (absent, too big, unreadable, rotted)."""
        if self.node.store.has(digest):
            return self.node.store.read_blob(digest, max_bytes)
        held = self._held.get(digest)
        if held is None or held[2] > max_bytes:
            data = self.spooled(digest, max_bytes)
            if data is None and self.node.store.has(digest):
                # Committed between the two looks: the spool's commit runs in a
                # worker thread, indexes the blob, then forgets it. Answering
                # "missing" here would make the asker never ask us for it again.
                return self.node.store.read_blob(digest, max_bytes)
            return data
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
            return store.read_range(digest, offset, length)
        held = self._held.get(digest)
        if held is None or offset >= held[2]:
            return None
        data = self.read_blob(digest, held[2])
        return None if data is None else data[offset : offset + length]

    def manifest_bytes(
        self, component: str, serial: int, platform: str | None = None
    ) -> bytes | None:
        """The stored envelope of one of our releases, or with ``platform`` of a variant
        we carry for that platform; None if not here (small LRU cache: ranged reads)."""
        key = (component, serial, platform)
        data = self._manifests.get(key)
        if data is None:
            try:
                if platform is None:
                    data = self.node.releases.get_bytes(component, serial)
                else:
                    data = self.node.carried.get_bytes(component, serial, platform)
            except (DaemonError, P2pupdError, ValueError):
                return None
            self._manifests[key] = data
            while len(self._manifests) > MANIFEST_CACHE:
                self._manifests.popitem(last=False)
        self._manifests.move_to_end(key)
        return data

    def release_manifest(self, key: str, serial: int) -> Manifest:
        """A stored release by our key: ours, or a variant carried for another platform.

        Raises ``DaemonError`` (absent, unreadable) or a ``VerificationError``.
        """
        found = self.spelling.rules.carried(key)
        if found is None:
            return self.node.manifest(key, serial)
        component, platform = found
        return self.node.carried.get(self.node.trust_chain(), component, serial, platform)[0]

    def manifest_for(self, name: str, serial: int) -> bytes | None:
        """The envelope a peer asked for by ``name``: one of our releases, or a variant
        we carry; for a variant we neither hold nor carry, our release of that serial
        if it is universal (it serves every platform). None if there is none."""
        try:
            component, platform = split_key(name)
        except CodecError:
            return None
        if platform is None or platform == self.spelling.rules.platforms.get(component):
            return self.manifest_bytes(component, serial)
        doc = self.manifest_bytes(component, serial, platform)
        universal = self.node.releases.has(component, serial) and (
            self.spelling.platform_of(component, serial) is None
        )
        return self.manifest_bytes(component, serial) if doc is None and universal else doc

    def root_bytes(self, version: int) -> bytes | None:
        """Root metadata of ``version`` if this node accepted it, else None."""
        try:
            return self.node.trust_store.history().get(version)
        except (DaemonError, NotFoundError):
            return None
