"""Reading a sealed bundle (protocol/site/sealed.py): a plain bundle seen through its keys.

Theory of operation. ``open_bundle`` looks at a bundle's ``index.json``: a
plain bundle is returned as its ``BundleReader``; a sealed one (one artifact
of the sealed type) as a ``SealedReader`` over it, which offers the same
methods, so verify.py and the importer apply every rule of a plain bundle to
what is inside. Before anything is decrypted:

* the header, the table and each blob are read through the plain reader,
  which checks every ciphertext's sha256 against its name (a flipped byte is
  refused here, never handed to the cipher) and its size against the size
  its plaintext seals to;
* the file key is unwrapped with the site seal key(s) this node holds, or the
  import stops with ``NotMemberError`` (exit 3, one line, nothing changed).

Then each blob is decrypted (ChaCha20-Poly1305 segments) and its plaintext
hashed against the plaintext digest the bundle's own metadata names, as on a
plain stick. ``blobs/sha256`` must hold exactly the sealed artifact's layers,
and the table may list no blob the inner metadata leaves unreferenced.

Blobs up to ``WHOLE_BYTES`` of ciphertext are decrypted in memory (chunks,
packs); a larger one is hashed first, then decrypted segment by segment into
an unlinked file beside the state (never all in memory). Resume works as for
a plain bundle: the importer keeps complete *plaintext* blobs in the
spool (``store/spool.py``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2pupd.daemon.bundles.reader import BundleReader
from p2pupd.daemon.errors import BundleError, StorageError
from p2pupd.daemon.fsutil import buffer_fd, write_all
from p2pupd.protocol import bundle as oci
from p2pupd.protocol import ids, limits
from p2pupd.protocol.errors import HashMismatchError, SchemaError
from p2pupd.protocol.site import sealed

WHOLE_BYTES = 8 * limits.MiB


class SealedReader:
    """The plain bundle inside a sealed one (see the module docstring)."""

    def __init__(self, base: BundleReader, keys: list[X25519PrivateKey], scratch: Path) -> None:
        """Open the sealed layers; raises ``NotMemberError`` without a key that opens them."""
        self.base = base
        self.root = base.root
        self.scratch = scratch
        index = oci.parse_index(base.read("index.json", limits.MAX_INDEX_BYTES))
        d = index[0]
        if d.size > oci.MAX_ARTIFACT_BYTES:
            raise SchemaError("sealed bundle artifact is too large")
        self.artifact = d
        h, t, self.layers = sealed.parse_sealed_artifact(base.read_blob(d.digest, d.size))
        self.header = sealed.Header.decode(base.read_blob(h.digest, h.size))
        self.outer = {d.digest: d.size, h.digest: h.size, t.digest: t.size}
        self.outer.update({x.digest: x.size for x in self.layers.values()})
        empty = oci.empty_descriptor()
        self.outer[empty.digest] = empty.size
        if t.digest != self.header.table or t.size != sealed.sealed_size(self.header.table_size):
            raise SchemaError("sealed bundle's table layer is not the one its header names")
        self.file_key = sealed.unwrap_key(self.header, keys)
        tdata = base.read_blob(t.digest, t.size)  # hash-checked before it is decrypted
        self.table = sealed.Table.decode(
            sealed.open_blob(self.file_key, sealed.TABLE_LABEL, tdata, self.header.table_size)
        )
        for digest, b in self.table.blobs.items():
            layer = self.layers.get(b.sealed)
            if layer is None or layer.size != sealed.sealed_size(b.size):
                raise SchemaError(
                    f"sealed bundle's table names blob {digest.hex()[:16]} that its artifact "
                    "does not list at that size"
                )

    def __enter__(self) -> SealedReader:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.base.close()

    # -- the BundleReader interface --------------------------------------------------

    def read(self, name: str, max_bytes: int) -> bytes:
        if name == "oci-layout":
            return oci.OCI_LAYOUT
        if name == "index.json":
            if len(self.table.index) > max_bytes:
                raise SchemaError(f"bundle member index.json exceeds {max_bytes} bytes")
            return self.table.index
        raise SchemaError(f"sealed bundle has no member {name}")

    def _entry(self, digest: bytes, size: int) -> sealed.SealedBlob:
        entry = self.table.blobs.get(digest)
        if entry is None:
            raise SchemaError(f"bundle is missing blobs/sha256/{digest.hex()}")
        if entry.size != size:
            raise HashMismatchError(
                f"bundle blob {digest.hex()[:16]} is {entry.size} bytes, expected {size}"
            )
        return entry

    def read_blob(self, digest: bytes, size: int) -> bytes:
        """The plaintext of a blob: ciphertext hash-checked, decrypted, plaintext hash-checked."""
        entry = self._entry(digest, size)
        data = self.base.read_blob(entry.sealed, sealed.sealed_size(size))
        plain = sealed.open_blob(self.file_key, sealed.blob_label(digest), data, size)
        if ids.sha256(plain) != digest:
            raise HashMismatchError(
                f"bundle blob {digest.hex()[:16]} does not match its sha256 (damaged or tampered)"
            )
        return plain

    def open_blob(self, digest: bytes, size: int) -> int:
        """An fd reading the blob's plaintext from its start (the caller closes it)."""
        if sealed.sealed_size(size) <= WHOLE_BYTES:
            return buffer_fd(self.read_blob(digest, size), "sealed blob", self.scratch)
        entry = self._entry(digest, size)
        csize = sealed.sealed_size(size)
        fd = self.base.open_blob(entry.sealed, csize)
        try:
            h = hashlib.sha256()
            for block in _Blocks(fd, csize, 1 << 20, entry.sealed):
                h.update(block)
            if h.digest() != entry.sealed:  # before a byte of it is decrypted
                raise HashMismatchError(
                    f"sealed blob {entry.sealed.hex()[:16]} does not match its sha256 "
                    "(damaged or tampered)"
                )
            os.lseek(fd, 0, os.SEEK_SET)
            cipher = sealed.BlobCipher(self.file_key, sealed.blob_label(digest))
            out = _scratch_fd(self.scratch)
            try:
                step = sealed.SEGMENT_BYTES + sealed.TAG_BYTES
                n = max(1, -(-size // sealed.SEGMENT_BYTES))
                for i, seg in enumerate(_Blocks(fd, csize, step, entry.sealed)):
                    write_all(out, cipher.open(seg, i == n - 1))
                os.lseek(out, 0, os.SEEK_SET)
            except BaseException:
                os.close(out)
                raise
            return out
        except OSError as exc:
            raise StorageError(f"cannot decrypt a sealed blob: {exc.strerror or exc}") from None
        finally:
            os.close(fd)

    def scan_blob(self, digest: bytes, size: int, block_bytes: int = 1 << 20) -> Iterator[bytes]:
        """Yield a blob's plaintext in blocks (a first look before ``read_blob``)."""
        fd = self.open_blob(digest, size)
        try:
            while block := os.read(fd, block_bytes):
                yield block
        except OSError as exc:
            raise StorageError(f"cannot read a decrypted blob: {exc.strerror or exc}") from None
        finally:
            os.close(fd)

    def check_blobs(self, referenced: dict[bytes, int], max_entries: int) -> dict[bytes, int]:
        """Check the sealed layout holds exactly its layers; map inner blobs to inodes."""
        extra = set(self.table.blobs) - set(referenced)
        if extra:
            raise SchemaError(
                f"bundle holds an extra blob {min(extra).hex()[:16]} that nothing references "
                "(tampered or mixed-up medium: export it again)"
            )
        inodes = self.base.check_blobs(self.outer, len(self.outer) + (max_entries - len(referenced)))
        out: dict[bytes, int] = {}
        for digest, size in referenced.items():
            out[digest] = inodes[self._entry(digest, size).sealed]
        return out


class _Blocks:
    """Reads exactly ``size`` bytes of ``fd`` in pieces of ``step``."""

    def __init__(self, fd: int, size: int, step: int, digest: bytes) -> None:
        self.fd, self.left, self.step, self.digest = fd, size, step, digest

    def __iter__(self) -> _Blocks:
        return self

    def __next__(self) -> bytes:
        if self.left <= 0:
            raise StopIteration
        want = min(self.step, self.left)
        parts = []
        while want:
            try:
                b = os.read(self.fd, want)
            except OSError as exc:
                raise BundleError(
                    f"cannot read bundle blob {self.digest.hex()[:16]}: {exc.strerror or exc}"
                ) from None
            if not b:
                raise BundleError(f"bundle blob {self.digest.hex()[:16]} changed size while read")
            parts.append(b)
            want -= len(b)
        data = b"".join(parts)
        self.left -= len(data)
        return data


def _scratch_fd(scratch: Path) -> int:
    """An unlinked file beside the state: a large decrypted blob never sits in memory."""
    try:
        with tempfile.TemporaryFile(dir=scratch) as f:
            return os.dup(f.fileno())
    except OSError as exc:
        raise StorageError(f"cannot make a scratch file in {scratch}: {exc.strerror}") from None


def open_bundle(
    src: os.PathLike[str] | str, keys: Callable[[], list[X25519PrivateKey]], scratch: Path
) -> BundleReader | SealedReader:
    """Open the bundle at ``src``: plain, or sealed and opened with ``keys``.

    Raises ``NotMemberError`` for a sealed bundle none of ``keys`` opens, and
    what ``BundleReader`` raises for a medium that cannot be read.
    """
    base = BundleReader(src)
    try:
        try:
            index = oci.parse_index(base.read("index.json", limits.MAX_INDEX_BYTES))
        except SchemaError:
            return base  # not a bundle at all: verify.py says so in its words
        if not sealed.is_sealed(index):
            return base
        return SealedReader(base, keys(), scratch)
    except BaseException:
        base.close()
        raise
