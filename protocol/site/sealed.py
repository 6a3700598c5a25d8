"""Sealed bundles: sticks only the members of a site can read. The format, pure.

Theory of operation
-------------------
A sealed bundle is still an OCI image layout: ``index.json`` lists one
artifact (``SEALED_ARTIFACT``) whose layers are a *header*, an encrypted
*table* and the encrypted blobs, each named by the sha256 of its
**ciphertext**. So registry tools copy it like any layout, and an importer
checks every blob against its name *before* decrypting anything: a flipped
byte is refused by its digest, as on a plain stick.

Keys. The writer draws a random 32-byte *file key* per bundle and wraps it
for each recipient site (``wrap_key``): an ephemeral X25519 key agreement with
the site's seal key, HKDF-SHA256 over the shared secret (salted with both
public keys), ChaCha20-Poly1305 around the file key -- the construction of
age's X25519 recipient stanza. The header lists one stanza per recipient with
the recipient's seal key id. The same construction (``seal_to``/``open_sealed``)
carries the site's seal key to each enrolled node, sealed to that node's own
X25519 box key.

Blobs. Each blob (and the table) is encrypted under its own key, HKDF of the
file key and a label (``b"blob\\0" + plaintext digest``; ``b"table"``), in the
STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizar 2015) over
ChaCha20-Poly1305: 64 KiB segments, nonce = 11-byte segment counter and a
last-segment flag, so segments cannot be reordered, dropped or the blob
truncated without the tag failing. The ciphertext size follows from the
plaintext size (``sealed_size``), so it is checked before decryption too.

The table (canonical msgpack, encrypted) holds the plaintext bundle's
``index.json`` and, per blob, its plaintext digest and size and its ciphertext
digest. Decrypted, the bundle is exactly a plain bundle, and the importer
applies every rule of a plain one to it: sealing gives confidentiality, not
trust -- anyone holding the site's public seal key can seal a stick to it,
so every release inside is verified against the pinned root as always.

ChaCha20-Poly1305 rather than AES-GCM: constant time and fast on nodes
without AES instructions (many ARM boards), and a 64 KiB segment keeps one
in memory at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from p2pupd.protocol import bundle as oci
from p2pupd.protocol import encoding, ids, limits
from p2pupd.protocol.errors import HashMismatchError, NotMemberError, SchemaError
from p2pupd.protocol.site.membership import seal_key_id

SEALED_ARTIFACT = "application/vnd.p2pupd.sealed.v1"
HEADER_MEDIA_TYPE = "application/vnd.p2pupd.sealed-header.v1+msgpack"
TABLE_MEDIA_TYPE = "application/vnd.p2pupd.sealed-table.v1"
BLOB_MEDIA_TYPE = "application/vnd.p2pupd.sealed-blob.v1"
# The bundle format of a sealed stick (protocol/bundle.py): a reader of 1.x
# would not know its artifact. The plain bundle inside keeps its own format.
BUNDLE_FORMAT = (2, 0)
_SEALED_TYPES = (SEALED_ARTIFACT, HEADER_MEDIA_TYPE, TABLE_MEDIA_TYPE, BLOB_MEDIA_TYPE)
oci.FORMAT_OF.update(dict.fromkeys(_SEALED_TYPES, BUNDLE_FORMAT))
HEADER_TYPE = "sealed-header"
SPEC_VERSION = 1

SEGMENT_BYTES = 64 * limits.KiB
TAG_BYTES = 16
KEY_BYTES = 32
MAX_RECIPIENTS = 64
MAX_HEADER_BYTES = 64 * limits.KiB
# The header is read before anything is verified: a map of 5, recipients of 3.
HEADER_BUDGET = limits.DecodeBudget(
    max_bytes=MAX_HEADER_BYTES, max_objects=16 + 4 * MAX_RECIPIENTS, max_depth=3,
    max_len=MAX_RECIPIENTS, max_str=64, max_bin=64, name="sealed bundle header",
)  # fmt: skip
# Per blob the table holds two digests and a size (~75 bytes encoded).
MAX_TABLE_BYTES = limits.MAX_INDEX_BYTES + 128 * limits.MiB
_CONTEXT = b"p2pupd sealed v1\x00"
_WRAP_INFO = b"p2pupd seal-key wrap v1\x00"


def sealed_size(size: int) -> int:
    """Bytes of the ciphertext of a ``size``-byte plaintext (one tag per segment, >= 1 segment)."""
    segments = max(1, -(-size // SEGMENT_BYTES))
    return size + segments * TAG_BYTES


def _hkdf(secret: bytes, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), KEY_BYTES, salt, info).derive(secret)


def x25519_public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


# -- key wrapping ---------------------------------------------------------------------


@dataclass(frozen=True)
class Stanza:
    """The file key, wrapped for one recipient."""

    recipient: str  # seal key id of the recipient
    epk: bytes  # ephemeral X25519 public key
    wrapped: bytes  # ChaCha20-Poly1305 of the file key (48 bytes)


def _wrap_cipher(shared: bytes, epk: bytes, recipient: bytes, context: bytes) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(_hkdf(shared, epk + recipient, _WRAP_INFO + context))


def seal_to(
    secret: bytes, recipient: bytes, ephemeral: X25519PrivateKey, context: bytes
) -> tuple[bytes, bytes]:
    """Return (ephemeral public key, ciphertext) of ``secret`` for the X25519 key ``recipient``.

    ``context`` is bound into the key derivation: a sealed value opens only
    for the same purpose. ``ephemeral`` is fresh per call (the caller draws it).
    """
    epk = x25519_public(ephemeral)
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    except ValueError:
        raise SchemaError("recipient is not a usable X25519 key") from None
    return epk, _wrap_cipher(shared, epk, recipient, context).encrypt(bytes(12), secret, None)


def open_sealed(
    epk: bytes, ciphertext: bytes, private: X25519PrivateKey, context: bytes
) -> bytes | None:
    """Return what ``seal_to`` sealed for ``private``'s public key, or None if it is not ours."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(epk))
        return _wrap_cipher(shared, epk, x25519_public(private), context).decrypt(
            bytes(12), ciphertext, None
        )
    except (ValueError, InvalidTag):
        return None


def wrap_key(file_key: bytes, recipient: bytes, ephemeral: X25519PrivateKey) -> Stanza:
    """Wrap a bundle's file key for the site whose seal key is ``recipient``."""
    epk, ct = seal_to(file_key, recipient, ephemeral, b"file key")
    return Stanza(seal_key_id(recipient), epk, ct)


def unwrap_key(header: Header, keys: list[X25519PrivateKey]) -> bytes:
    """Return the file key from the first stanza one of ``keys`` opens.

    Raises ``NotMemberError`` naming the recipients when none does.
    """
    for key in keys:
        kid = seal_key_id(x25519_public(key))
        for s in header.recipients:
            if s.recipient != kid:
                continue
            file_key = open_sealed(s.epk, s.wrapped, key, b"file key")
            if file_key is not None and len(file_key) == KEY_BYTES:
                return file_key
    shown = ", ".join(s.recipient[:16] for s in header.recipients)
    if not keys:
        raise NotMemberError(
            f"bundle is sealed to site(s) {shown}; this node is not a member of any site "
            "(enrol it: `p2pupd site request`, then `p2pupd site join`)"
        )
    raise NotMemberError(
        f"bundle is sealed to site(s) {shown}; this node is a member of none of them"
    )


# -- blob encryption (STREAM over ChaCha20-Poly1305) ---------------------------------------


def blob_label(plain_digest: bytes) -> bytes:
    return b"blob\x00" + plain_digest


TABLE_LABEL = b"table"


class BlobCipher:
    """Encrypts or decrypts one blob segment by segment."""

    def __init__(self, file_key: bytes, label: bytes) -> None:
        self._aead = ChaCha20Poly1305(_hkdf(file_key, None, _CONTEXT + label))
        self._counter = 0
        self._done = False

    def _nonce(self, last: bool) -> bytes:
        if self._done:
            raise SchemaError("sealed blob continues past its last segment")
        nonce = self._counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")
        self._counter += 1
        self._done = last
        return nonce

    def seal(self, segment: bytes, last: bool) -> bytes:
        return self._aead.encrypt(self._nonce(last), segment, None)

    def open(self, segment: bytes, last: bool) -> bytes:
        try:
            return self._aead.decrypt(self._nonce(last), segment, None)
        except InvalidTag:
            raise HashMismatchError("sealed blob does not decrypt (damaged or tampered)") from None


def seal_segments(file_key: bytes, label: bytes, data: bytes) -> Iterator[bytes]:
    """The ciphertext of ``data`` as segments (concatenated: the sealed blob)."""
    c = BlobCipher(file_key, label)
    n = max(1, -(-len(data) // SEGMENT_BYTES))
    for i in range(n):
        yield c.seal(data[i * SEGMENT_BYTES : (i + 1) * SEGMENT_BYTES], i == n - 1)


def seal_blob(file_key: bytes, label: bytes, data: bytes) -> bytes:
    return b"".join(seal_segments(file_key, label, data))


def open_blob(file_key: bytes, label: bytes, data: bytes, size: int) -> bytes:
    """Decrypt a whole sealed blob of plaintext ``size``; ``HashMismatchError`` if it fails."""
    if len(data) != sealed_size(size):
        raise HashMismatchError(
            f"sealed blob is {len(data)} bytes, a {size}-byte blob seals to {sealed_size(size)}"
        )
    c = BlobCipher(file_key, label)
    step = SEGMENT_BYTES + TAG_BYTES
    n = max(1, -(-size // SEGMENT_BYTES))
    return b"".join(c.open(data[i * step : (i + 1) * step], i == n - 1) for i in range(n))


# -- header and table ----------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    recipients: tuple[Stanza, ...]
    table: bytes  # sha256 of the sealed table
    table_size: int  # plaintext size of the table

    def encode(self) -> bytes:
        return encoding.encode(
            {
                "_type": HEADER_TYPE,
                "spec": SPEC_VERSION,
                "recipients": [[s.recipient, s.epk, s.wrapped] for s in self.recipients],
                "table": self.table,
                "table_size": self.table_size,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Header:
        """Parse a header; ``CodecError``/``SchemaError`` on anything out of shape or bounds."""
        v = encoding.decode(data, budget=HEADER_BUDGET)
        if (
            not isinstance(v, dict)
            or v.get("_type") != HEADER_TYPE
            or v.get("spec") != SPEC_VERSION
        ):
            raise SchemaError("sealed bundle header is not a p2pupd sealed header")
        raw = v.get("recipients")
        if not isinstance(raw, list) or not 0 < len(raw) <= MAX_RECIPIENTS:
            raise SchemaError(f"sealed bundle names 1..{MAX_RECIPIENTS} recipients")
        stanzas = []
        for r in raw:
            if (
                not isinstance(r, list)
                or len(r) != 3
                or not isinstance(r[0], str)
                or len(r[0]) != 64
                or not isinstance(r[1], bytes)
                or len(r[1]) != 32
                or not isinstance(r[2], bytes)
                or len(r[2]) != KEY_BYTES + TAG_BYTES
            ):
                raise SchemaError("sealed bundle header: malformed recipient")
            stanzas.append(Stanza(r[0], r[1], r[2]))
        table, size = v.get("table"), v.get("table_size")
        if not isinstance(table, bytes) or len(table) != 32:
            raise SchemaError("sealed bundle header: bad table digest")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_TABLE_BYTES:
            raise SchemaError("sealed bundle header: table size out of bounds")
        return cls(tuple(stanzas), table, size)


@dataclass(frozen=True)
class SealedBlob:
    size: int  # plaintext
    sealed: bytes  # sha256 of the ciphertext: its name in the layout


TABLE_MAGIC = b"P2ST"
_TABLE_ENTRY = 32 + 8 + 32  # plaintext digest, plaintext size, sealed digest


@dataclass(frozen=True)
class Table:
    """The sealed table, in a fixed binary layout (not msgpack: it is decoded before
    anything in the bundle is verified, so its cost must be linear and flat):

        "P2ST" | u32 len | index.json | u32 n | n x (digest | u64 size | sealed digest)
    """

    index: bytes  # the plaintext bundle's index.json
    blobs: dict[bytes, SealedBlob]  # by plaintext digest

    def encode(self) -> bytes:
        parts = [TABLE_MAGIC, len(self.index).to_bytes(4, "big"), self.index]
        parts.append(len(self.blobs).to_bytes(4, "big"))
        for d, b in sorted(self.blobs.items()):
            parts += [d, b.size.to_bytes(8, "big"), b.sealed]
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> Table:
        """Parse a table; ``SchemaError`` for anything out of shape or bounds."""
        if len(data) > MAX_TABLE_BYTES or data[:4] != TABLE_MAGIC or len(data) < 12:
            raise SchemaError("sealed bundle table is not a p2pupd sealed table")
        n_index = int.from_bytes(data[4:8], "big")
        if n_index > limits.MAX_INDEX_BYTES or 8 + n_index + 4 > len(data):
            raise SchemaError("sealed bundle table: bad index")
        index = data[8 : 8 + n_index]
        pos = 8 + n_index
        count = int.from_bytes(data[pos : pos + 4], "big")
        pos += 4
        if count > limits.MAX_BUNDLE_MEMBERS or len(data) - pos != count * _TABLE_ENTRY:
            raise SchemaError("sealed bundle table: blob list does not fill the table")
        blobs: dict[bytes, SealedBlob] = {}
        for i in range(pos, len(data), _TABLE_ENTRY):
            digest = data[i : i + 32]
            size = int.from_bytes(data[i + 32 : i + 40], "big")
            if size > limits.MAX_BLOB_BYTES:
                raise SchemaError("sealed bundle table: blob size out of bounds")
            if digest in blobs:
                raise SchemaError(f"sealed bundle table lists blob {digest.hex()[:16]} twice")
            blobs[digest] = SealedBlob(size, data[i + 40 : i + 72])
        return cls(index, blobs)


def check_sealed(data: bytes, digest: bytes, what: str) -> None:
    """Refuse ciphertext that does not hash to its name, before any decryption."""
    if ids.sha256(data) != digest:
        raise HashMismatchError(
            f"sealed {what} {digest.hex()[:16]} does not match its sha256 (damaged or tampered)"
        )


def header_value(header: Header) -> dict[str, Any]:
    """What ``show`` prints of a sealed bundle (nothing secret)."""
    return {
        "recipients": [s.recipient for s in header.recipients],
        "table_bytes": header.table_size,
    }


# -- the OCI side: one artifact holding header, table and blobs --------------------------


def sealed_layers(
    header: oci.Descriptor, table: oci.Descriptor, blobs: list[oci.Descriptor]
) -> oci.Artifact:
    """The artifact of a sealed bundle (``oci.build_artifact`` writes it)."""
    return oci.Artifact(SEALED_ARTIFACT, (header, table, *blobs), {})


def is_sealed(index: list[oci.Descriptor]) -> bool:
    """True if ``index.json``'s descriptors are those of a sealed bundle."""
    return len(index) == 1 and index[0].annotations.get(oci.ANNOTATION_REF_NAME) == SEALED_REF


SEALED_REF = "sealed"


def parse_sealed_artifact(
    data: bytes,
) -> tuple[oci.Descriptor, oci.Descriptor, dict[bytes, oci.Descriptor]]:
    """Return (header, table, sealed blobs by digest) of a sealed bundle's artifact.

    Raises ``SchemaError``/``CodecError`` for anything but a bounded OCI
    manifest of type ``SEALED_ARTIFACT`` with the empty config, a header, a
    table and sealed blobs, each listed once.
    """
    if len(data) > oci.MAX_ARTIFACT_BYTES:
        raise SchemaError("sealed bundle artifact is too large")
    try:
        v = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SchemaError(f"sealed bundle artifact is not valid JSON: {exc}") from None
    if not isinstance(v, dict) or v.get("schemaVersion") != 2:
        raise SchemaError("sealed bundle artifact is not an OCI image manifest")
    if v.get("artifactType") != SEALED_ARTIFACT:
        raise SchemaError("bundle index names one artifact that is not a sealed bundle")
    if oci.parse_descriptor(v.get("config"), "artifact config") != oci.empty_descriptor():
        raise SchemaError("artifact config must be the OCI empty descriptor")
    raw = v.get("layers")
    if not isinstance(raw, list) or not 2 <= len(raw) <= limits.MAX_BUNDLE_MEMBERS:
        raise SchemaError("sealed bundle artifact must list a header, a table and blobs")
    layers = [oci.parse_descriptor(x, "sealed layer") for x in raw]
    header, table, rest = layers[0], layers[1], layers[2:]
    if header.media_type != HEADER_MEDIA_TYPE or not 0 < header.size <= MAX_HEADER_BYTES:
        raise SchemaError("sealed bundle: first layer must be its header")
    if table.media_type != TABLE_MEDIA_TYPE:
        raise SchemaError("sealed bundle: second layer must be its table")
    blobs: dict[bytes, oci.Descriptor] = {}
    for d in rest:
        if d.media_type != BLOB_MEDIA_TYPE:
            raise SchemaError("sealed bundle holds a layer of unknown media type")
        if d.digest in blobs or d.digest in (header.digest, table.digest):
            raise SchemaError(f"sealed bundle lists layer {d.digest.hex()[:16]} twice")
        blobs[d.digest] = d
    return header, table, blobs
