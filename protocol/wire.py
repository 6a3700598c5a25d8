"""Wire messages and their framing.

A frame is a 4-byte big-endian length N, then N bytes of canonical msgpack
(``encoding``): an array ``[type_code, field, ...]``. Messages are frozen
dataclasses that validate every field on construction, so a message object is
always encodable and a decoded frame is always well-typed.

Compatibility: the six fields of ``Hello`` are frozen across protocol versions
(later versions may only append fields), so a peer of another version can
always be told *why* it was refused. Other messages have an exact arity; new
kinds are only sent to peers that advertised the matching Hello feature:

* ``"range"`` (``FEATURE_RANGE``): ``BlobRangeRequest``/``BlobRangeData`` and
  ``ManifestRangeRequest``/``ManifestRangeData`` move a blob or a signed
  manifest in pieces, so documents larger than one frame (patches and hooks
  up to ``limits.MAX_BLOB_BYTES``, manifests up to ``MAX_MANIFEST_BYTES``)
  still travel while ``MAX_FRAME_BYTES`` keeps bounding what a peer can make
  us buffer. The receiver checks the whole document's hash or signature once
  every piece is in, exactly as for a single-frame transfer.
* ``"have"`` (``FEATURE_HAVE``): ``Have`` tells a peer which blobs of a release
  we can serve before we hold all of it, so fetching nodes serve each other
  (swarming) instead of all pulling from the one node that had it first.
* ``"batch"`` (``FEATURE_BATCH``): ``ChunkBatchRequest`` asks for up to
  ``MAX_BATCH_DIGESTS`` blobs in one frame and one in-flight slot; the peer
  answers with one ``ChunkData`` or ``ChunkMissing`` per digest, in the
  order asked. A fetch then keeps far more blobs in flight than the
  per-peer request cap would allow one request per blob, and neither side
  handles a request frame per blob.
* ``"request"`` (``FEATURE_REQUEST``): ``NodeRequestQuery`` asks a peer for
  its signed request file (what it has installed and holds), answered by
  ``NodeRequestData``; a daemon collects these into a site request for the
  publisher (protocol/request.py). The collector checks each one's signature
  and that it names the node id the peer proved in its Hello.
* ``"proof"`` (``FEATURE_PROOF``): the Hello carries the sender's node public
  key and a fresh random challenge, and each side then sends ``Proof``: its
  signature over the other side's challenge (protocol/fleet/identity.py). A node id
  is then bound to the connection, so bans and admission can key on it.
* ``"view"`` (``FEATURE_VIEW``): the partial-view messages of protocol/fleet/view.py
  (``Neighbor``, ``ForwardJoin``, ``Shuffle``, ``ViewFull``, ``Ping``): why a
  connection was opened, joins spread as random walks, address exchange, and
  a refusal that says "full" with other addresses to try.
* ``"swarm"`` (``FEATURE_SWARM``): ``HaveBits`` says which blobs of a release
  the sender offers, as a bitfield over the release's sorted blob list (a
  byte or two per 16 blobs, where ``Have`` spends 34 bytes per blob), and an
  Announce means "I verified this manifest", not "I hold all of it"
  (protocol/fleet/swarm.py).
* ``"site"`` (``FEATURE_SITE``): ``SiteNews`` pushes a signed site document
  -- a revocation list, or a site document of a key rotation -- so that
  revocations spread like releases (protocol/site/membership.py). A hint like
  Announce: the receiver verifies it against its own pinned site.
* ``"report"`` (``FEATURE_REPORT``): ``ReportNews`` pushes signed node reports
  and rollout actions (protocol/rollout), ``ReportDigest`` says which reports
  (node id, seq) and actions (digests) the sender holds, so the peer can send
  what it lacks. Both are hints like Announce: every document is verified by
  the receiver (signature, site, membership, replay) before it counts. An
  older peer simply never sees them.
* ``"variants"`` (``FEATURE_VARIANTS``): no new message, a wider name. The
  ``component`` field of ``Announce`` entries, ``ManifestRequest``,
  ``ManifestRangeRequest``, ``Have`` and ``HaveBits`` may then be a release
  key ``component@platform``: one platform variant of a release, which nodes
  of other platforms carry and serve (protocol/fleet/variants.py). The
  session refuses such a key from or to a peer that did not offer the
  feature, so an older peer never sees one.

Why the receive side stays O(n) under hostile input
---------------------------------------------------
A peer decides how its bytes are split. A decoder that appends each read to a
buffer and re-parses the buffer is O(n^2) when a big frame arrives a byte at a
time, and it buffers a body before noticing the length is absurd.
``FrameDecoder`` walks each input byte exactly once instead:

* The 4 header bytes go into a tiny buffer; the moment it is full the length is
  checked against ``limits.MAX_FRAME_BYTES`` (and zero), before any body byte
  is kept.
* Body bytes are then copied until exactly N are held: N is known, so nothing
  is searched for or rescanned; ``bytearray`` appends are amortised O(1).
* Complete bodies are queued and decoded lazily by ``next_message``;
  ``encoding.decode`` is linear too (one parse that checks canonical form as
  it goes) and spends at most ``limits.FRAME_BUDGET`` on a frame: 40,000
  values, 4 levels deep, ~13 MiB all told, however the frame is built.

After a bad frame the decoder is poisoned (it raises again, ignores input):
a length-prefixed stream has no boundary to resynchronise on.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from p2pupd.protocol import PROTOCOL_VERSION, encoding, ids, limits
from p2pupd.protocol.errors import (
    FrameTooLargeError,
    LocalProtocolError,
    RemoteProtocolError,
    SchemaError,
)

MAGIC = b"p2pupd"
HEADER_BYTES = 4
NODE_ID_BYTES = 16
DIGEST_BYTES = ids.DIGEST_BYTES
MAX_MAGIC_BYTES = 16
MAX_REQUEST_ID = (1 << 32) - 1
MAX_SERIAL = (1 << 63) - 1
MAX_PORT = 65535
MAX_ERROR_CODE = 65535
# Room for the largest envelope (type code, request id, digest, bin header).
MAX_PAYLOAD_BYTES = limits.MAX_FRAME_BYTES - 1 * limits.KiB
MAX_ANNOUNCE_ENTRIES = 4096
MAX_FEATURES = 32
MAX_CLUSTER_ID_BYTES = 64
MAX_TEXT_BYTES = 1 * limits.KiB  # Bye reasons and Error messages end up in logs
# A "component" field holds a release key: a component, or (feature "variants")
# ``component@platform``.
MAX_COMPONENT_BYTES = ids.MAX_RELEASE_KEY_BYTES
# Largest piece a range request may ask for: what fits in one data frame.
MAX_RANGE_BYTES = MAX_PAYLOAD_BYTES
# Digests per Have message: 32 Ki x 34 encoded bytes ~ 1.1 MiB, well inside a frame.
MAX_HAVE_DIGESTS = 32 * limits.KiB
FEATURE_RANGE = "range"
FEATURE_HAVE = "have"
FEATURE_BATCH = "batch"
# Blobs one ChunkBatchRequest may ask for: 64 x ~64 KiB chunks keep a fast
# link busy; the answers are paced by the reader, never buffered at once.
MAX_BATCH_DIGESTS = 64
FEATURE_REQUEST = "request"
FEATURE_PROOF = "proof"
FEATURE_VIEW = "view"
FEATURE_SWARM = "swarm"
PUBLIC_KEY_BYTES = 32  # Ed25519
SIGNATURE_BYTES = 64
MIN_CHALLENGE_BYTES = 16
MAX_CHALLENGE_BYTES = 64
# Addresses one view message may carry (HyParView exchanges a handful).
MAX_PEER_ADDRS = 32
MAX_HOST_BYTES = 64  # an IPv4 or IPv6 literal, never a name to resolve
MAX_TTL = 15
NEIGHBOR_KINDS = 4  # protocol/fleet/view.py: join, high, low, forward
# One HaveBits covers up to 64 Ki x 8 = 512 Ki blobs; larger releases send several.
MAX_HAVE_BITS_BYTES = 64 * limits.KiB
FEATURE_SITE = "site"
FEATURE_REPORT = "report"
FEATURE_VARIANTS = "variants"
# Signed documents per ReportNews, and their sizes (protocol/rollout bounds them
# again when it decodes them): 32 x 8 KiB + 32 x 6 KiB stays far below a frame.
MAX_NEWS_DOCS = 32
MAX_NEWS_REPORT_BYTES = 8 * limits.KiB
MAX_NEWS_ACTION_BYTES = 6 * limits.KiB
# A digest lists every report a node holds (a site is bounded at 10,000 nodes):
# 10,000 x ~28 encoded bytes ~ 280 KiB.
MAX_DIGEST_REPORTS = 10_000
MAX_DIGEST_ACTIONS = 1024
_CLUSTER_RE = re.compile(r"\S(.*\S)?")  # no leading/trailing blanks, not empty
_FEATURE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")
HELLO_MIN_FIELDS = 6  # frozen across versions; later fields are optional
_HOST_RE = re.compile(r"[0-9A-Fa-f.:]{2,64}")  # IP literals only: nothing to resolve


def _uint(value: Any, name: str, lo: int, hi: int) -> Any:
    # bool is an int subclass; True must not pass as request id 1.
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise LocalProtocolError(f"{name} must be an integer in [{lo}, {hi}], got {value!r:.40}")
    return value


def _blob(
    value: Any, name: str, *, exact: int | None = None, most: int = 0, view: bool = False
) -> Any:
    if not (isinstance(value, bytes) or (view and isinstance(value, memoryview))):
        raise LocalProtocolError(f"{name} must be bytes, got {type(value).__name__}")
    if exact is not None and len(value) != exact:
        raise LocalProtocolError(f"{name} must be exactly {exact} bytes, got {len(value)}")
    if exact is None and len(value) > most:
        raise LocalProtocolError(f"{name} of {len(value)} bytes exceeds {most}")
    return value


def _text(value: Any, name: str, most: int, pattern: re.Pattern[str] | None = None) -> Any:
    # isprintable() refuses control characters and lone surrogates, so the
    # UTF-8 length below cannot fail and nothing odd reaches a log line.
    if not isinstance(value, str) or not value.isprintable() or len(value.encode()) > most:
        raise LocalProtocolError(f"{name} must be printable text of <= {most} bytes")
    if pattern is not None and not pattern.fullmatch(value):
        raise LocalProtocolError(f"invalid {name} {value!r:.80}")
    return value


def _bool(value: Any, name: str) -> Any:
    if not isinstance(value, bool):
        raise LocalProtocolError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _digests(value: Any) -> Any:
    if not isinstance(value, tuple) or len(value) > MAX_HAVE_DIGESTS:
        raise LocalProtocolError(f"digests must be a tuple of at most {MAX_HAVE_DIGESTS}")
    for digest in value:
        _blob(digest, "digest", exact=DIGEST_BYTES)
    return value


def _batch(value: Any) -> Any:
    if not isinstance(value, tuple) or not 1 <= len(value) <= MAX_BATCH_DIGESTS:
        raise LocalProtocolError(f"batch must be a tuple of 1 to {MAX_BATCH_DIGESTS} digests")
    for digest in value:
        _blob(digest, "digest", exact=DIGEST_BYTES)
    return value


def _docs(value: Any, name: str, most: int) -> Any:
    if not isinstance(value, tuple) or len(value) > MAX_NEWS_DOCS:
        raise LocalProtocolError(f"{name} must be a tuple of at most {MAX_NEWS_DOCS} documents")
    for doc in value:
        _blob(doc, name, most=most)
    return value


def _summary(value: Any) -> Any:
    if not isinstance(value, tuple) or len(value) > MAX_DIGEST_REPORTS:
        raise LocalProtocolError(f"summary must be a tuple of at most {MAX_DIGEST_REPORTS}")
    for entry in value:
        if not isinstance(entry, tuple) or len(entry) != 2:
            raise LocalProtocolError("summary entry must be (node_id, seq)")
        _blob(entry[0], "node_id", exact=NODE_ID_BYTES)
        _uint(entry[1], "seq", 1, MAX_SERIAL)
    # Sorted and unique, so a summary has exactly one encoding.
    if any(a[0] >= b[0] for a, b in itertools.pairwise(value)):
        raise LocalProtocolError("summary entries must be sorted by node id, unique")
    return value


def _known(value: Any) -> Any:
    if not isinstance(value, tuple) or len(value) > MAX_DIGEST_ACTIONS:
        raise LocalProtocolError(f"known must be a tuple of at most {MAX_DIGEST_ACTIONS}")
    for digest in value:
        _blob(digest, "digest", exact=DIGEST_BYTES)
    if any(a >= b for a, b in itertools.pairwise(value)):
        raise LocalProtocolError("known digests must be sorted and unique")
    return value


def is_host(text: str) -> bool:
    """True if ``text`` may travel as a peer's host: an IP literal, not a name."""
    return bool(_HOST_RE.fullmatch(text))


def _challenge(value: Any, name: str) -> Any:
    _blob(value, name, most=MAX_CHALLENGE_BYTES)
    if value and len(value) < MIN_CHALLENGE_BYTES:
        raise LocalProtocolError(f"{name} must be empty or {MIN_CHALLENGE_BYTES}+ bytes")
    return value


def _public_key(value: Any, name: str) -> Any:
    _blob(value, name, most=PUBLIC_KEY_BYTES)
    if value and len(value) != PUBLIC_KEY_BYTES:
        raise LocalProtocolError(f"{name} must be empty or {PUBLIC_KEY_BYTES} bytes")
    return value


def _peers(value: Any) -> tuple[PeerAddr, ...]:
    if not isinstance(value, tuple) or len(value) > MAX_PEER_ADDRS:
        raise LocalProtocolError(f"peers must be a tuple of at most {MAX_PEER_ADDRS} addresses")
    if not all(isinstance(a, tuple) and len(a) == 2 for a in value):
        raise LocalProtocolError("a peer address must be (host, port)")
    return tuple(
        PeerAddr(_text(h, "host", MAX_HOST_BYTES, _HOST_RE), _uint(p, "port", 1, MAX_PORT))
        for h, p in value
    )


def _features(value: Any) -> Any:
    if not isinstance(value, frozenset) or len(value) > MAX_FEATURES:
        raise LocalProtocolError(f"features must be a frozenset of at most {MAX_FEATURES}")
    for feature in value:
        _text(feature, "feature", 32, _FEATURE_RE)
    return value


def _entries(value: Any) -> tuple[AnnounceEntry, ...]:
    if not isinstance(value, tuple) or len(value) > MAX_ANNOUNCE_ENTRIES:
        raise LocalProtocolError(f"entries must be a tuple of at most {MAX_ANNOUNCE_ENTRIES}")
    if not all(isinstance(entry, tuple) and len(entry) == 3 for entry in value):
        raise LocalProtocolError("announce entry must be (component, serial, manifest_digest)")
    entries = tuple(
        AnnounceEntry(*(_check(n, v, 0) for n, v in zip(_ENTRY, e, strict=True))) for e in value
    )
    # Sorted and unique, so a set of holdings has exactly one encoding.
    if any(a.component >= b.component for a, b in itertools.pairwise(entries)):
        raise LocalProtocolError("announce entries must be sorted with unique components")
    return entries


# One rule per field name: a name means the same thing in every message.
# Each rule takes (value, name, the class's DATA_LIMIT) and returns the value.
_RULES: dict[str, Callable[[Any, str, int], Any]] = {
    "request_id": lambda v, n, _: _uint(v, n, 0, MAX_REQUEST_ID),
    "protocol_version": lambda v, n, _: _uint(v, n, 0, MAX_REQUEST_ID),
    "serial": lambda v, n, _: _uint(v, n, 1, MAX_SERIAL),
    "version": lambda v, n, _: _uint(v, n, 1, MAX_SERIAL),
    "listen_port": lambda v, n, _: _uint(v, n, 0, MAX_PORT),
    "code": lambda v, n, _: _uint(v, n, 0, MAX_ERROR_CODE),
    "digest": lambda v, n, _: _blob(v, n, exact=DIGEST_BYTES),
    "manifest_digest": lambda v, n, _: _blob(v, n, exact=DIGEST_BYTES),
    "node_id": lambda v, n, _: _blob(v, n, exact=NODE_ID_BYTES),
    "magic": lambda v, n, _: _blob(v, n, most=MAX_MAGIC_BYTES),
    "data": lambda v, n, limit: _blob(v, n, most=limit, view=True),  # see ChunkData
    "component": lambda v, n, _: _text(v, n, MAX_COMPONENT_BYTES, ids.RELEASE_KEY_RE),
    "cluster_id": lambda v, n, _: _text(v, n, MAX_CLUSTER_ID_BYTES, _CLUSTER_RE),
    "reason": lambda v, n, _: _text(v, n, MAX_TEXT_BYTES),
    "message": lambda v, n, _: _text(v, n, MAX_TEXT_BYTES),
    "features": lambda v, n, _: _features(v),
    "entries": lambda v, n, _: _entries(v),
    "offset": lambda v, n, _: _uint(v, n, 0, limits.MAX_BLOB_BYTES),
    "length": lambda v, n, _: _uint(v, n, 1, MAX_RANGE_BYTES),
    "total": lambda v, n, _: _uint(v, n, 0, limits.MAX_MANIFEST_BYTES),
    "complete": lambda v, n, _: _bool(v, n),
    "digests": lambda v, n, _: _digests(v),
    "batch": lambda v, n, _: _batch(v),
    "reports": lambda v, n, _: _docs(v, n, MAX_NEWS_REPORT_BYTES),
    "actions": lambda v, n, _: _docs(v, n, MAX_NEWS_ACTION_BYTES),
    "summary": lambda v, n, _: _summary(v),
    "known": lambda v, n, _: _known(v),
    "relay": lambda v, n, _: _bool(v, n),
    "public_key": lambda v, n, _: _public_key(v, n),
    "challenge": lambda v, n, _: _challenge(v, n),
    "signature": lambda v, n, _: _blob(v, n, exact=SIGNATURE_BYTES),
    "kind": lambda v, n, _: _uint(v, n, 0, NEIGHBOR_KINDS - 1),
    "host": lambda v, n, _: _text(v, n, MAX_HOST_BYTES, _HOST_RE),
    "seen_host": lambda v, n, _: v if v == "" else _text(v, n, MAX_HOST_BYTES, _HOST_RE),
    "port": lambda v, n, _: _uint(v, n, 1, MAX_PORT),
    "ttl": lambda v, n, _: _uint(v, n, 0, MAX_TTL),
    "reply": lambda v, n, _: _bool(v, n),
    "peers": lambda v, n, _: _peers(v),
    "bits": lambda v, n, _: _blob(v, n, most=MAX_HAVE_BITS_BYTES),
}


def _check(name: str, value: Any, data_limit: int) -> Any:
    """Return ``value`` (normalised) if valid for field ``name``; else ``LocalProtocolError``."""
    return _RULES[name](value, name, data_limit)


class AnnounceEntry(NamedTuple):
    """One verified holding: the highest serial of a component and its digest."""

    component: str
    serial: int
    manifest_digest: bytes


_ENTRY = AnnounceEntry._fields


class PeerAddr(NamedTuple):
    """Where a peer listens: an IP literal and a TCP port."""

    host: str
    port: int


class _Wire:
    """Base of every message: validates all fields on construction."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, Any]]
    TYPE: ClassVar[int]
    DATA_LIMIT: ClassVar[int] = 0

    def __post_init__(self) -> None:
        limit = self.DATA_LIMIT
        for name in _field_names(type(self)):
            value = getattr(self, name)
            checked = _RULES[name](value, name, limit)
            if checked is not value:
                object.__setattr__(self, name, checked)  # frozen: normalise once


_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    """A message class's field names (``dataclasses.fields`` is slow for every chunk)."""
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


@dataclass(frozen=True, slots=True)
class Hello(_Wire):
    """First message on a connection, from each side. See ``Hello.create``."""

    TYPE: ClassVar[int] = 1
    magic: bytes
    protocol_version: int
    node_id: bytes
    cluster_id: str
    listen_port: int
    features: frozenset[str] = frozenset()
    # Appended for feature "proof" (older peers ignore trailing Hello fields).
    public_key: bytes = b""
    challenge: bytes = b""

    @classmethod
    def create(
        cls,
        node_id: bytes,
        cluster_id: str,
        listen_port: int = 0,
        features: frozenset[str] = frozenset(),
        public_key: bytes = b"",
        challenge: bytes = b"",
    ) -> Hello:
        """Return our Hello with this build's magic and protocol version."""
        return cls(
            MAGIC, PROTOCOL_VERSION, node_id, cluster_id, listen_port, features,
            public_key, challenge,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Announce(_Wire):
    """Our verified holdings, sorted by component (one encoding per value)."""

    TYPE: ClassVar[int] = 2
    entries: tuple[AnnounceEntry, ...]

    @classmethod
    def from_holdings(cls, holdings: Mapping[str, tuple[int, bytes]]) -> Announce:
        """Return an Announce of ``{component: (serial, digest)}``, sorted."""
        return cls(tuple(AnnounceEntry(c, *holdings[c]) for c in sorted(holdings)))


@dataclass(frozen=True, slots=True)
class ManifestRequest(_Wire):
    TYPE: ClassVar[int] = 3
    request_id: int
    component: str
    serial: int


@dataclass(frozen=True, slots=True)
class ManifestData(_Wire):
    """The signed manifest envelope bytes; the receiver verifies them."""

    TYPE: ClassVar[int] = 4
    DATA_LIMIT: ClassVar[int] = min(MAX_PAYLOAD_BYTES, limits.MAX_MANIFEST_BYTES)
    request_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ManifestMissing(_Wire):
    """The peer does not have (or no longer has) the requested manifest."""

    TYPE: ClassVar[int] = 5
    request_id: int


@dataclass(frozen=True, slots=True)
class ChunkRequest(_Wire):
    TYPE: ClassVar[int] = 6
    request_id: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class ChunkData(_Wire):
    """A blob claimed to hash to ``digest``; the receiver must check it.

    Decoded from a whole frame in a read that is mostly chunks, ``data`` is
    a read-only view of that read's buffer, not a copy (``FrameDecoder``): the receiver hashes
    and stores it from there, and whoever keeps it keeps the whole buffer
    alive (daemon/service/fetch.py charges the buffer, not the view).
    """

    TYPE: ClassVar[int] = 7
    DATA_LIMIT: ClassVar[int] = MAX_PAYLOAD_BYTES
    request_id: int
    digest: bytes
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class ChunkMissing(_Wire):
    TYPE: ClassVar[int] = 8
    request_id: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class RootRequest(_Wire):
    """Ask for the signed root metadata of this version (for key rotation)."""

    TYPE: ClassVar[int] = 9
    request_id: int
    version: int


@dataclass(frozen=True, slots=True)
class RootData(_Wire):
    TYPE: ClassVar[int] = 10
    DATA_LIMIT: ClassVar[int] = limits.MAX_ROOT_BYTES
    request_id: int
    version: int
    data: bytes


@dataclass(frozen=True, slots=True)
class RootMissing(_Wire):
    TYPE: ClassVar[int] = 11
    request_id: int


@dataclass(frozen=True, slots=True)
class Bye(_Wire):
    """Orderly close; nothing follows it in that direction."""

    TYPE: ClassVar[int] = 12
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Error(_Wire):
    """Why the sender is closing the connection; nothing follows it."""

    TYPE: ClassVar[int] = 13
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class BlobRangeRequest(_Wire):
    """Ask for up to ``length`` bytes of blob ``digest`` from ``offset`` (feature "range").

    Answered by ``BlobRangeData`` or ``ChunkMissing``.
    """

    TYPE: ClassVar[int] = 14
    request_id: int
    digest: bytes
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class BlobRangeData(_Wire):
    """A piece of a blob; only the reassembled blob can be hash-checked."""

    TYPE: ClassVar[int] = 15
    DATA_LIMIT: ClassVar[int] = MAX_RANGE_BYTES
    request_id: int
    digest: bytes
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ManifestRangeRequest(_Wire):
    """Ask for a piece of a signed manifest envelope (feature "range").

    Answered by ``ManifestRangeData`` or ``ManifestMissing``.
    """

    TYPE: ClassVar[int] = 16
    request_id: int
    component: str
    serial: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class ManifestRangeData(_Wire):
    """A piece of a manifest envelope of ``total`` bytes; the receiver verifies the whole."""

    TYPE: ClassVar[int] = 17
    DATA_LIMIT: ClassVar[int] = MAX_RANGE_BYTES
    request_id: int
    offset: int
    total: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Have(_Wire):
    """Blobs of release (component, serial) the sender can serve (feature "have").

    ``complete`` means every blob the manifest names; otherwise ``digests``
    lists them (one message may add to an earlier one). A hint, like
    Announce: every blob received is still hash-checked.
    """

    TYPE: ClassVar[int] = 18
    component: str
    serial: int
    complete: bool
    digests: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class ChunkBatchRequest(_Wire):
    """Ask for several blobs at once (feature "batch").

    Answered by one ``ChunkData`` or ``ChunkMissing`` per digest of ``batch``,
    in that order, all with this ``request_id``; the request stays in flight
    (one slot) until the last of them.
    """

    TYPE: ClassVar[int] = 19
    request_id: int
    batch: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class NodeRequestQuery(_Wire):
    """Ask the peer for its signed request file (feature "request")."""

    TYPE: ClassVar[int] = 30
    request_id: int


@dataclass(frozen=True, slots=True)
class NodeRequestData(_Wire):
    """The peer's signed request file; the receiver verifies it (feature "request")."""

    TYPE: ClassVar[int] = 31
    DATA_LIMIT: ClassVar[int] = MAX_PAYLOAD_BYTES
    request_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Proof(_Wire):
    """The sender's node-key signature over the receiver's Hello challenge (feature "proof").

    What is signed is ``identity.proof_statement``; sent once, right after both Hellos.
    """

    TYPE: ClassVar[int] = 20
    signature: bytes
    seen_host: str  # the receiver's IP address as the sender sees it ("" if unknown)


@dataclass(frozen=True, slots=True)
class Ping(_Wire):
    """Nothing but "still here": keeps an idle view link from timing out (feature "view")."""

    TYPE: ClassVar[int] = 21


@dataclass(frozen=True, slots=True)
class Neighbor(_Wire):
    """Why the dialler opened this connection (feature "view"; protocol/fleet/view.py ``Kind``)."""

    TYPE: ClassVar[int] = 22
    kind: int


@dataclass(frozen=True, slots=True)
class ForwardJoin(_Wire):
    """A node joined at ``host:port``; pass it on ``ttl`` more hops (feature "view")."""

    TYPE: ClassVar[int] = 23
    host: str
    port: int
    ttl: int


@dataclass(frozen=True, slots=True)
class Shuffle(_Wire):
    """A sample of known addresses, asked for (``reply`` False) or answered (feature "view")."""

    TYPE: ClassVar[int] = 24
    reply: bool
    peers: tuple[PeerAddr, ...]


@dataclass(frozen=True, slots=True)
class ViewFull(_Wire):
    """ "My view is full": sent before closing a refused or evicted link, with addresses to try."""

    TYPE: ClassVar[int] = 25
    peers: tuple[PeerAddr, ...]


@dataclass(frozen=True, slots=True)
class HaveBits(_Wire):
    """Blobs of (component, serial) the sender offers us, as a bitfield (feature "swarm").

    Bit ``k`` (little-endian: byte ``k // 8``, bit ``k % 8``) of ``bits`` stands
    for blob ``8 * offset + k`` of the release's blobs sorted by digest. Bits
    only add up: each message ORs into what the sender offered before. A hint,
    like ``Have``: every blob received is still hash-checked.
    """

    TYPE: ClassVar[int] = 26
    component: str
    serial: int
    offset: int
    bits: bytes


@dataclass(frozen=True, slots=True)
class SiteNews(_Wire):
    """A signed site document the sender holds (feature "site"); verified by the receiver."""

    TYPE: ClassVar[int] = 40
    DATA_LIMIT: ClassVar[int] = MAX_PAYLOAD_BYTES
    data: bytes


@dataclass(frozen=True, slots=True)
class ReportNews(_Wire):
    """Signed node reports and rollout actions (feature "report"); the receiver verifies each."""

    TYPE: ClassVar[int] = 50
    reports: tuple[bytes, ...] = ()
    actions: tuple[bytes, ...] = ()
    # True for news (pass on what is new to you), False for an answer to a
    # digest: a catch-up, mostly old news to the rest of the site.
    relay: bool = True


@dataclass(frozen=True, slots=True)
class ReportDigest(_Wire):
    """What the sender holds (feature "report"): (node id, seq) of each report, sorted,
    and the digests of the rollout actions; the peer answers with ``ReportNews``."""

    TYPE: ClassVar[int] = 51
    summary: tuple[tuple[bytes, int], ...] = ()
    known: tuple[bytes, ...] = ()


# fmt: off
Message = (
    Hello | Announce | ManifestRequest | ManifestData | ManifestMissing | ChunkRequest
    | ChunkData | ChunkMissing | RootRequest | RootData | RootMissing | Bye | Error
    | BlobRangeRequest | BlobRangeData | ManifestRangeRequest | ManifestRangeData | Have
    | NodeRequestQuery | NodeRequestData | ChunkBatchRequest | Proof | Ping | Neighbor
    | ForwardJoin | Shuffle | ViewFull | HaveBits | SiteNews | ReportNews | ReportDigest
)
Request = (
    ManifestRequest | ChunkRequest | RootRequest | BlobRangeRequest | ManifestRangeRequest
    | NodeRequestQuery | ChunkBatchRequest
)
Response = (
    ManifestData | ManifestMissing | ChunkData | ChunkMissing | RootData | RootMissing
    | BlobRangeData | ManifestRangeData | NodeRequestData
)
# fmt: on

_CLASSES: tuple[type[Message], ...] = (
    Hello, Announce, ManifestRequest, ManifestData, ManifestMissing, ChunkRequest,
    ChunkData, ChunkMissing, RootRequest, RootData, RootMissing, Bye, Error,
    BlobRangeRequest, BlobRangeData, ManifestRangeRequest, ManifestRangeData, Have,
    NodeRequestQuery, NodeRequestData, ChunkBatchRequest, Proof, Ping, Neighbor,
    ForwardJoin, Shuffle, ViewFull, HaveBits, SiteNews, ReportNews, ReportDigest,
)  # fmt: skip
_BY_CODE: dict[int, type[Message]] = {cls.TYPE: cls for cls in _CLASSES}


def _to_wire(msg: Message) -> list[Any]:
    if isinstance(msg, Hello):
        fields = [msg.magic, msg.protocol_version, msg.node_id, msg.cluster_id, msg.listen_port]
        fields.append(sorted(msg.features))
        if msg.public_key or msg.challenge:  # else byte for byte an older Hello
            fields += [msg.public_key, msg.challenge]
        return fields
    if isinstance(msg, Shuffle):
        return [msg.reply, [list(a) for a in msg.peers]]
    if isinstance(msg, ViewFull):
        return [[list(a) for a in msg.peers]]
    if isinstance(msg, Announce):
        return [[list(entry) for entry in msg.entries]]
    if isinstance(msg, Have):
        return [msg.component, msg.serial, msg.complete, list(msg.digests)]
    if isinstance(msg, ChunkBatchRequest):
        return [msg.request_id, list(msg.batch)]
    if isinstance(msg, ReportNews):
        return [list(msg.reports), list(msg.actions), msg.relay]
    if isinstance(msg, ReportDigest):
        return [[list(e) for e in msg.summary], list(msg.known)]
    return [getattr(msg, f.name) for f in dataclasses.fields(msg)]


def _from_wire(cls: type[Message], fields: list[Any]) -> Message:
    # A Hello has six fields at least (older peers send just those), any number more.
    arity = HELLO_MIN_FIELDS if cls is Hello else len(_field_names(cls))
    if len(fields) < arity or (len(fields) > arity and cls is not Hello):
        raise SchemaError(f"{cls.__name__} needs {arity} fields, got {len(fields)}")
    if cls is Hello:
        features = fields[5]
        # Sorted and unique, so each feature set has exactly one encoding.
        if not isinstance(features, list) or features != sorted(set(features)):
            raise SchemaError("Hello features must be a sorted list of unique names")
        magic, version, node_id, cluster_id, port = fields[:5]  # more fields: a newer peer
        base = (magic, version, node_id, cluster_id, port, frozenset(features))
        if len(fields) >= 8:
            try:
                return Hello(*base, *fields[6:8])
            except LocalProtocolError:
                if version == PROTOCOL_VERSION:
                    raise
                # Another version may mean other things there; its version
                # must still reach the session, which says why it refuses.
        return Hello(*base)
    if cls is Shuffle or cls is ViewFull:
        peers = fields[-1]
        if not isinstance(peers, list) or not all(isinstance(a, list) for a in peers):
            raise SchemaError(f"{cls.__name__} peers must be a list of [host, port]")
        addrs: Any = tuple(tuple(a) for a in peers)  # checked by the constructor
        return Shuffle(fields[0], addrs) if cls is Shuffle else ViewFull(addrs)
    if cls is Announce:
        entries = fields[0]
        if not isinstance(entries, list) or not all(isinstance(e, list) for e in entries):
            raise SchemaError("Announce entries must be a list of lists")
        return Announce(tuple(AnnounceEntry(*e) for e in entries))
    if cls is Have:
        component, serial, complete, digests = fields
        if not isinstance(digests, list):
            raise SchemaError("Have digests must be a list")
        return Have(component, serial, complete, tuple(digests))
    if cls is ChunkBatchRequest:
        request_id, batch = fields
        if not isinstance(batch, list):
            raise SchemaError("ChunkBatchRequest batch must be a list")
        return ChunkBatchRequest(request_id, tuple(batch))
    if cls is ReportNews:
        reports, actions, relay = fields
        if not isinstance(reports, list) or not isinstance(actions, list):
            raise SchemaError("ReportNews reports and actions must be lists")
        return ReportNews(tuple(reports), tuple(actions), relay)
    if cls is ReportDigest:
        summary, known = fields
        if not isinstance(summary, list) or not all(
            isinstance(e, list) and len(e) == 2 for e in summary
        ):
            raise SchemaError("ReportDigest summary must be a list of [node_id, seq]")
        if not isinstance(known, list):
            raise SchemaError("ReportDigest known must be a list")
        return ReportDigest(tuple(tuple(e) for e in summary), tuple(known))
    factory: Callable[..., Message] = cls  # every other message maps fields 1:1
    return factory(*fields)


def encode_message(msg: Message) -> bytes:
    """Return the frame (length header + body) for ``msg``.

    Raises ``LocalProtocolError`` if ``msg`` is not a message or would not fit
    in ``limits.MAX_FRAME_BYTES``.
    """
    parts = encode_parts(msg)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def encode_parts(msg: Message) -> tuple[bytes, ...]:
    """The frame for ``msg`` as pieces to send in order (``encode_message`` joins them).

    A data message's payload is its own piece, so a sender that can write a
    list of buffers at once never copies it. Raises like ``encode_message``.
    """
    hot = _pack_hot(msg)
    if hot is not None:
        envelope, payload = hot
        size = sum(map(len, envelope)) + len(payload)
        if size > limits.MAX_FRAME_BYTES:
            raise LocalProtocolError(f"{type(msg).__name__} frame of {size} bytes is too large")
        head = b"".join((size.to_bytes(HEADER_BYTES, "big"), *envelope))
        return (head, payload) if payload else (head,)
    if type(msg) not in _CLASSES:
        raise LocalProtocolError(f"not a wire message: {type(msg).__name__}")
    body = encoding.encode([msg.TYPE, *_to_wire(msg)])
    if len(body) > limits.MAX_FRAME_BYTES:
        raise LocalProtocolError(f"{type(msg).__name__} frame of {len(body)} bytes is too large")
    return (len(body).to_bytes(HEADER_BYTES, "big") + body,)


def decode_body(body: bytes | memoryview) -> Message:
    """Decode one frame body (without its length header).

    Raises ``CodecError`` (``SchemaError`` for wrong fields) or
    ``FrameTooLargeError``; no other exception escapes.
    """
    hot = _HOT.get(bytes(body[:2]))
    if hot is not None:
        try:
            msg = _parse_hot(hot, body)
        except LocalProtocolError as exc:  # canonical bytes, but a field out of range
            raise SchemaError(f"bad {hot.__name__}: {exc}") from None
        if msg is not None:
            return msg
    value = encoding.decode(body, budget=limits.FRAME_BUDGET)
    if not isinstance(value, list) or not value or type(value[0]) is not int:
        raise SchemaError("frame body must be an array starting with an integer type code")
    cls = _BY_CODE.get(value[0])
    if cls is None:
        raise SchemaError(f"unknown message type {value[0]}")
    try:
        return _from_wire(cls, value[1:])
    except LocalProtocolError as exc:  # field validation speaks for local callers
        raise SchemaError(f"bad {cls.__name__}: {exc}") from None
    except (TypeError, ValueError, UnicodeError, OverflowError) as exc:
        raise SchemaError(f"bad {cls.__name__}: {type(exc).__name__}") from None


# ----- the hot path -------------------------------------------------------------
# Nearly every frame of a transfer is a ChunkRequest, ChunkData, BlobRangeData or
# HaveBits.
# Canonical msgpack gives each exactly one layout, so they are packed and parsed
# by hand: no generic walk, no msgpack copy of the payload and no re-encoding to
# prove canonical form (a parse that accepts only the canonical layout proves it).
# Anything that does not match that layout byte for byte falls back to the
# generic decoder, which refuses or accepts it exactly as before.

_DIGEST_HEAD = b"\xc4" + bytes((DIGEST_BYTES,))  # bin 8 of 32 bytes
_UINT_WIDTH = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}  # msgpack uint 8/16/32/64
_BIN_WIDTH = {0xC4: 1, 0xC5: 2, 0xC6: 4}  # msgpack bin 8/16/32
_MIN_OF_WIDTH = {1: 0, 2: 1 << 8, 4: 1 << 16, 8: 1 << 32}  # below: a shorter form exists


def _packed_uint(value: int) -> bytes:
    """The canonical msgpack form of a non-negative integer."""
    if value < 0x80:
        return bytes((value,))
    for code, width in _UINT_WIDTH.items():
        if value < 1 << (8 * width):
            return bytes((code,)) + value.to_bytes(width, "big")
    raise LocalProtocolError(f"integer {value} does not fit 64 bits")


def _bin_head(size: int) -> bytes:
    """The canonical msgpack header of a bin of ``size`` bytes."""
    if size < 1 << 8:
        return b"\xc4" + bytes((size,))
    if size < 1 << 16:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


def _pack_hot(msg: object) -> tuple[tuple[bytes, ...], bytes] | None:
    """The body of a hot message as (envelope pieces, payload), or None for another."""
    kind = type(msg)
    if kind is ChunkData:
        assert isinstance(msg, ChunkData)
        rid, data = _packed_uint(msg.request_id), msg.data
        if isinstance(data, memoryview):  # a received chunk sent on (tests, tools)
            data = data.tobytes()
        return (b"\x94\x07", rid, _DIGEST_HEAD, msg.digest, _bin_head(len(data))), data
    if kind is BlobRangeData:
        assert isinstance(msg, BlobRangeData)
        rid, offset, data = _packed_uint(msg.request_id), _packed_uint(msg.offset), msg.data
        envelope = (b"\x95\x0f", rid, _DIGEST_HEAD, msg.digest, offset, _bin_head(len(data)))
        return envelope, data
    if kind is ChunkRequest:
        assert isinstance(msg, ChunkRequest)
        return (b"\x93\x06", _packed_uint(msg.request_id), _DIGEST_HEAD, msg.digest), b""
    if kind is HaveBits:
        assert isinstance(msg, HaveBits)
        name = msg.component.encode()  # ASCII by ids.RELEASE_KEY_RE, at most 97 bytes
        head = bytes((0xA0 | len(name),)) if len(name) < 32 else b"\xd9" + bytes((len(name),))
        serial, offset = _packed_uint(msg.serial), _packed_uint(msg.offset)
        return (b"\x95\x1a", head, name, serial, offset, _bin_head(len(msg.bits))), msg.bits
    return None


# The first two body bytes of each hot message: array header, type code.
_CHUNK_HEAD = b"\x94\x07"  # a ChunkData body begins so (array of 4, type 7)
_HOT: dict[bytes, type[ChunkData | BlobRangeData | ChunkRequest | HaveBits]] = {
    _CHUNK_HEAD: ChunkData,
    b"\x95\x0f": BlobRangeData,
    b"\x93\x06": ChunkRequest,
    b"\x95\x1a": HaveBits,
}


def _read_uint(body: bytes | memoryview, pos: int) -> tuple[int, int]:
    """(value, next position) of the canonical uint at ``pos``; (-1, -1) if there is none."""
    if pos >= len(body):
        return -1, -1
    code = body[pos]
    if code < 0x80:
        return code, pos + 1
    width = _UINT_WIDTH.get(code, 0)
    end = pos + 1 + width
    if not width or end > len(body):
        return -1, -1
    value = int.from_bytes(body[pos + 1 : end], "big")
    return (value, end) if value >= max(_MIN_OF_WIDTH[width], 0x80) else (-1, -1)


def _read_bin(body: bytes | memoryview, pos: int) -> tuple[int, int]:
    """(size, data position) of the canonical bin header at ``pos``; (-1, -1) if none."""
    width = _BIN_WIDTH.get(body[pos], 0) if pos < len(body) else 0
    if not width:
        return -1, -1
    size = int.from_bytes(body[pos + 1 : pos + 1 + width], "big")
    return (size, pos + 1 + width) if size >= _MIN_OF_WIDTH[width] else (-1, -1)


def _parse_have_bits(body: bytes | memoryview) -> Message | None:
    head = body[2] if len(body) > 2 else 0
    if 0xA0 <= head <= 0xBF:
        size, pos = head & 0x1F, 3
    elif head == 0xD9 and len(body) > 3 and body[3] >= 32:
        size, pos = body[3], 4
    else:
        return None
    try:
        component = bytes(body[pos : pos + size]).decode("ascii")
    except UnicodeDecodeError:
        return None
    serial, pos = _read_uint(body, pos + size)
    offset, pos = _read_uint(body, pos) if pos >= 0 else (-1, -1)
    size, pos = _read_bin(body, pos) if pos >= 0 else (-1, -1)
    if pos < 0 or pos + size != len(body):
        return None
    return HaveBits(component, serial, offset, bytes(body[pos:]))


def _parse_hot(
    cls: type[ChunkData | BlobRangeData | ChunkRequest | HaveBits], body: bytes | memoryview
) -> Message | None:
    """Parse a hot message laid out canonically; None if the layout differs.

    Raises ``LocalProtocolError`` when the layout is right but a field is out
    of range (the message constructor's checks).
    """
    if cls is HaveBits:
        return _parse_have_bits(body)
    rid, pos = _read_uint(body, 2)
    if pos < 0 or bytes(body[pos : pos + 2]) != _DIGEST_HEAD or pos + 34 > len(body):
        return None
    digest, pos = bytes(body[pos + 2 : pos + 34]), pos + 34
    if cls is ChunkRequest:
        return ChunkRequest(rid, digest) if pos == len(body) else None
    offset = 0
    if cls is BlobRangeData:
        offset, pos = _read_uint(body, pos)
        if pos < 0:
            return None
    width = _BIN_WIDTH.get(body[pos], 0) if pos < len(body) else 0
    size = int.from_bytes(body[pos + 1 : pos + 1 + width], "big") if width else -1
    pos += 1 + width
    if size < _MIN_OF_WIDTH[width or 1] or pos + size != len(body):
        return None
    if cls is ChunkData:  # a view of the read, not a copy (see ChunkData)
        return ChunkData(rid, digest, body[pos:])
    data = bytes(body[pos:])
    return BlobRangeData(rid, digest, offset, data)


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes, then take messages out.

    ``feed`` never raises for bad input; the error is raised by
    ``next_message`` after every message that preceded it, in order.
    Holds at most one partial frame (<= ``max_frame_bytes``) plus the complete
    frames not yet taken; callers bound the latter by reading only when they
    have consumed what they fed.
    """

    def __init__(self, max_frame_bytes: int = limits.MAX_FRAME_BYTES) -> None:
        self._max = max_frame_bytes
        self._header = bytearray()
        self._body = bytearray()
        self._need: int | None = None  # body length once the header is complete
        self._frames: deque[bytes | memoryview] = deque()
        self._error: RemoteProtocolError | None = None
        self._eof = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes held: the partial frame plus complete frames not yet decoded."""
        return len(self._header) + len(self._body) + sum(len(f) for f in self._frames)

    @property
    def eof(self) -> bool:
        """True once ``feed_eof`` was called."""
        return self._eof

    def feed(self, data: bytes) -> None:
        """Add bytes from the peer. Raises ``LocalProtocolError`` after ``feed_eof``."""
        if self._eof:
            raise LocalProtocolError("data fed after end of stream")
        view = memoryview(data)
        pos, end = 0, len(view)
        got: list[tuple[memoryview, bool]] = []  # frames completed here; a view of data?
        chunks = 0  # bytes of the ChunkData frames whole in this read
        while pos < end and self._error is None:
            if self._need is None:
                take = min(HEADER_BYTES - len(self._header), end - pos)
                self._header += view[pos : pos + take]
                pos += take
                if len(self._header) < HEADER_BYTES:
                    break
                length = int.from_bytes(self._header, "big")
                self._header.clear()
                if length > self._max:
                    self._error = FrameTooLargeError(f"frame of {length} bytes exceeds {self._max}")
                elif length == 0:
                    self._error = SchemaError("empty frame")
                else:
                    self._need = length
            elif not self._body and end - pos >= self._need:
                body = view[pos : pos + self._need]  # whole in this read
                got.append((body, True))
                if body[:2] == _CHUNK_HEAD:
                    chunks += self._need
                pos += self._need
                self._need = None
            else:
                take = min(self._need - len(self._body), end - pos)
                self._body += view[pos : pos + take]
                pos += take
                if len(self._body) == self._need:
                    got.append((memoryview(bytes(self._body)), False))
                    self._body.clear()
                    self._need = None
        # A ChunkData keeps a view of its payload (the other messages copy
        # theirs), and a view keeps the whole read alive. So views of a read
        # are kept only when chunks fill at least half of it: a peer padding
        # small chunks with other frames makes them copies, and what they pin
        # stays within twice their bytes. Bytes that are not ``bytes`` may
        # change under a view: always copied.
        keep = isinstance(data, bytes) and 2 * chunks >= end
        for body, of_data in got:
            self._frames.append(body if keep or not of_data else memoryview(bytes(body)))

    def feed_eof(self) -> None:
        """Mark the end of the stream; a partial frame then becomes an error."""
        if not self._eof and self._error is None and (self._header or self._need is not None):
            self._error = RemoteProtocolError("connection closed in the middle of a frame")
        self._eof = True

    def next_message(self) -> Message | None:
        """Return the next complete message, or None if more bytes are needed.

        Raises ``RemoteProtocolError`` (``CodecError``, ``FrameTooLargeError``)
        for a bad frame, and again on every later call.
        """
        if self._frames:  # frames complete before any framing error come first
            try:
                return decode_body(self._frames.popleft())
            except RemoteProtocolError as exc:
                self._error = exc
                self._frames.clear()
                raise
        if self._error is not None:
            raise type(self._error)(*self._error.args)
        return None

    def __iter__(self) -> Iterator[Message]:
        """Yield every complete message buffered so far."""
        while (msg := self.next_message()) is not None:
            yield msg
