"""A node's own releases and blobs as an export source: one site carries on to the next.

Theory of operation. ``p2pupd export --state-dir STATE DEST`` writes a bundle
from what a node holds: the roots it accepted (``trust/root.N.msgpack``), the
release envelopes it verified (``releases/``) and their blobs. Every document is
re-verified against the node's pinned root on the way out, so a node never
passes on anything it would not accept itself.

A blob comes from the store if it is there; otherwise, if it is a chunk of a
file of a version on disk (installed or kept), its bytes are read from that
file at the chunk's offset -- a node whose store was trimmed after an update
can still carry it on. The bundle writer re-hashes every blob, so a file
changed on disk since it was applied yields an error, not a bad bundle.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from p2pupd.daemon import fsutil
from p2pupd.daemon.apply.targets import target_for
from p2pupd.daemon.errors import NotFoundError, StorageError
from p2pupd.daemon.state.node import Node
from p2pupd.protocol.errors import CodecError, VerificationError
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.trust import Envelope, TrustedRoot


@dataclass(frozen=True)
class _Span:
    path: Path
    offset: int
    size: int


class StateSource:
    """The releases and blobs of one state directory, for the bundle writer."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.chain = node.trust_chain()
        self.trusted: TrustedRoot = self.chain.current
        self._spans: dict[bytes, _Span] | None = None

    @property
    def repository(self) -> str:
        return self.trusted.root.name

    def roots(self) -> dict[int, bytes]:
        """Return the root envelopes this node accepted, by version."""
        return self.node.trust_store.history()

    def components(self) -> list[str]:
        return self.node.releases.components()

    def serials(self, component: str) -> list[int]:
        return self.node.releases.serials(component)

    def release(self, component: str, serial: int) -> tuple[Manifest, Envelope] | None:
        """Return a stored release, re-verified, or None if absent or damaged."""
        try:
            return self.node.releases.get(self.chain, component, serial)
        except (NotFoundError, StorageError, CodecError, VerificationError):
            return None

    def _held_spans(self) -> dict[bytes, _Span]:
        if self._spans is not None:
            return self._spans
        spans: dict[bytes, _Span] = {}
        states = self.node.state.read_states()
        for name, cfg in self.node.config.components.items():
            st = states.get(name)
            if st is None:
                continue
            target = target_for(cfg)
            serials = [*st.kept, *([st.installed] if st.installed is not None else [])]
            for serial in serials:  # the live version last: it wins
                found = self.release(name, serial)
                if found is None:
                    continue
                root = target.version_root(serial, st.installed)
                for f in found[0].files:
                    path = target.file_in(root, f.path)
                    for digest, off, size in f.chunk_spans():
                        spans[digest] = _Span(path, off, size)
        self._spans = spans
        return spans

    def has_blob(self, digest: bytes) -> bool:
        """Whether this node can supply the blob (from its store or a file on disk)."""
        return self.node.store.has(digest) or digest in self._held_spans()

    def open(self, digest: bytes) -> BinaryIO:
        """Return a reader of the blob's bytes (the caller verifies them).

        Raises ``NotFoundError`` if the node cannot supply it, ``StorageError``
        if a file on disk cannot be read.
        """
        if self.node.store.has(digest):
            return self.node.store.open(digest)
        span = self._held_spans().get(digest)
        if span is None:
            raise NotFoundError(f"blob {digest.hex()[:16]} is not held on this node")
        try:
            fd = os.open(span.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise fsutil.storage_error(exc, "open", span.path) from None
        try:
            data = os.pread(fd, span.size, span.offset)
        except OSError as exc:
            raise fsutil.storage_error(exc, "read", span.path) from None
        finally:
            os.close(fd)
        return io.BytesIO(data)
