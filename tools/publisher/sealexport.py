"""Writing a sealed bundle: ``export --encrypt-to SITE.pub``.

``SealingStore`` stands in for the bundle's ``BlobStore`` while
``export.write_bundle`` writes: every blob it is given (envelopes, OCI JSON,
packs, chunks) is encrypted under the bundle's file key and stored under the
sha256 of its ciphertext; it remembers which plaintext blob each is. ``finish``
then writes the encrypted table (the plaintext ``index.json`` and that map),
the header (the file key wrapped for each recipient site) and the one
artifact that lists them, and returns the outer ``index.json``. The format
is in protocol/site/sealed.py.

Blobs up to ``WHOLE_BYTES`` are encrypted in memory; a larger one is read
twice (once to learn its ciphertext's digest, once to store it), so memory
stays at one 64 KiB segment.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2pupd.daemon.api import BlobStore
from p2pupd.protocol import bundle as oci
from p2pupd.protocol import ids
from p2pupd.protocol.errors import FrameTooLargeError, HashMismatchError
from p2pupd.protocol.site import sealed
from p2pupd.protocol.site.membership import TrustedSite

WHOLE_BYTES = 8 * 1024 * 1024


def seal_recipients(site_files: list[bytes]) -> list[bytes]:
    """The seal keys of the site documents given to ``--encrypt-to`` (each verified)."""
    return [TrustedSite.load(data).current.seal for data in site_files]


class _Encrypting:
    """A reader of ``f``'s bytes, sealed segment by segment (for ``BlobStore.put_stream``)."""

    def __init__(self, f: BinaryIO, file_key: bytes, digest: bytes, size: int) -> None:
        self.f = f
        self.cipher = sealed.BlobCipher(file_key, sealed.blob_label(digest))
        self.left = size
        self.started = False
        self.plain = hashlib.sha256()
        self._buf = b""

    def _segment(self) -> bytes | None:
        if self.started and self.left == 0:
            return None
        self.started = True
        n = min(sealed.SEGMENT_BYTES, self.left)
        data = self.f.read(n)
        if len(data) != n:
            raise HashMismatchError("blob changed size while being sealed")
        self.left -= n
        self.plain.update(data)
        return self.cipher.seal(data, self.left == 0)

    def read(self, n: int, /) -> bytes:
        while len(self._buf) < n:
            seg = self._segment()
            if seg is None:
                break
            self._buf += seg
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


class SealingStore:
    """Blobs of a bundle being written, sealed (see the module docstring)."""

    def __init__(
        self, dest: os.PathLike[str] | str, recipients: list[bytes], writer: str | None = None
    ) -> None:
        self.out = BlobStore(Path(dest))
        self.recipients = recipients
        self.writer = writer  # "p2pupd VERSION", informative in index.json
        self.file_key = os.urandom(sealed.KEY_BYTES)
        self.table: dict[bytes, sealed.SealedBlob] = {}

    def has(self, digest: bytes) -> bool:
        return digest in self.table

    def put_bytes(self, data: bytes) -> bytes:
        """Seal and store ``data``; returns its plaintext digest (what the bundle calls it)."""
        dg = ids.sha256(data)
        if dg not in self.table:
            c = sealed.seal_blob(self.file_key, sealed.blob_label(dg), data)
            self.table[dg] = sealed.SealedBlob(len(data), self.out.put_bytes(c))
        return dg

    def put_stream(
        self,
        f: BinaryIO,
        digest: bytes,
        max_bytes: int,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Seal the blob ``digest`` (at most ``max_bytes``) read from ``f``; returns its size."""
        if digest in self.table:
            return 0
        if max_bytes <= WHOLE_BYTES:
            data = f.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise FrameTooLargeError(f"blob {digest.hex()[:16]} exceeds {max_bytes} bytes")
            if ids.sha256(data) != digest:
                raise HashMismatchError(f"blob {digest.hex()[:16]} does not match its sha256 here")
            self.put_bytes(data)
            if progress is not None:
                progress(len(data))
            return len(data)
        size = max_bytes  # export passes the blob's exact size
        start = f.tell()
        cipher = hashlib.sha256()
        enc = _Encrypting(f, self.file_key, digest, size)
        while seg := enc._segment():
            cipher.update(seg)
        if f.read(1) or enc.plain.digest() != digest:
            raise HashMismatchError(f"blob {digest.hex()[:16]} does not match its sha256 here")
        f.seek(start)
        csize = sealed.sealed_size(size)
        self.out.put_stream(
            _Encrypting(f, self.file_key, digest, size), cipher.digest(), csize, None
        )
        self.table[digest] = sealed.SealedBlob(size, cipher.digest())
        if progress is not None:
            progress(size)
        return size

    def finish(self, index: bytes, keep: Collection[bytes]) -> bytes:
        """Write table, header and artifact; drop blobs not in ``keep``; return ``index.json``."""
        table = sealed.Table(index, {d: b for d, b in self.table.items() if d in keep})
        tdata = table.encode()
        tsealed = sealed.seal_blob(self.file_key, sealed.TABLE_LABEL, tdata)
        tdigest = self.out.put_bytes(tsealed)
        header = sealed.Header(
            tuple(
                sealed.wrap_key(self.file_key, r, X25519PrivateKey.generate())
                for r in self.recipients
            ),
            tdigest,
            len(tdata),
        ).encode()
        hdigest = self.out.put_bytes(header)
        empty = oci.empty_descriptor()
        self.out.put_bytes(oci.EMPTY_JSON)
        blobs = sorted({b.sealed: b for b in table.blobs.values()}.values(), key=lambda b: b.sealed)
        art = oci.build_artifact(
            sealed.sealed_layers(
                oci.Descriptor(sealed.HEADER_MEDIA_TYPE, hdigest, len(header), {}),
                oci.Descriptor(sealed.TABLE_MEDIA_TYPE, tdigest, len(tsealed), {}),
                [
                    oci.Descriptor(sealed.BLOB_MEDIA_TYPE, b.sealed, sealed.sealed_size(b.size), {})
                    for b in blobs
                ],
            )
        )
        adigest = self.out.put_bytes(art)
        self.out.gc({adigest, hdigest, tdigest, empty.digest, *(b.sealed for b in blobs)})
        return oci.build_index(
            [
                oci.Descriptor(
                    oci.MANIFEST_MEDIA_TYPE,
                    adigest,
                    len(art),
                    {oci.ANNOTATION_REF_NAME: sealed.SEALED_REF},
                )
            ],
            sealed.BUNDLE_FORMAT,
            self.writer,
        )

    def clean_tmp(self) -> int:
        return self.out.clean_tmp()

    def gc(self, keep: Collection[bytes]) -> None:
        """Nothing to do before ``finish`` (which collects): a plain store's step."""
