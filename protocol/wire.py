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
  ``encoding.decode`` is linear too (one parse, one re-encode to prove
  canonical form, every size bounded).

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

from . import PROTOCOL_VERSION, encoding, ids, limits
from .errors import FrameTooLargeError, LocalProtocolError, RemoteProtocolError, SchemaError

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
MAX_COMPONENT_BYTES = limits.MAX_COMPONENT_NAME_BYTES
# Largest piece a range request may ask for: what fits in one data frame.
MAX_RANGE_BYTES = MAX_PAYLOAD_BYTES
# Digests per Have message: 32 Ki x 34 encoded bytes ~ 1.1 MiB, well inside a frame.
MAX_HAVE_DIGESTS = 32 * limits.KiB
FEATURE_RANGE = "range"
FEATURE_HAVE = "have"
_CLUSTER_RE = re.compile(r"\S(.*\S)?")  # no leading/trailing blanks, not empty
_FEATURE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")


def _uint(value: Any, name: str, lo: int, hi: int) -> Any:
    # bool is an int subclass; True must not pass as request id 1.
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise LocalProtocolError(f"{name} must be an integer in [{lo}, {hi}], got {value!r:.40}")
    return value


def _blob(value: Any, name: str, *, exact: int | None = None, most: int = 0) -> Any:
    if not isinstance(value, bytes):
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
    "data": lambda v, n, limit: _blob(v, n, most=limit),
    "component": lambda v, n, _: _text(v, n, MAX_COMPONENT_BYTES, ids.COMPONENT_RE),
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


class _Wire:
    """Base of every message: validates all fields on construction."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, Any]]
    TYPE: ClassVar[int]
    DATA_LIMIT: ClassVar[int] = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            checked = _check(f.name, value, self.DATA_LIMIT)
            if checked is not value:
                object.__setattr__(self, f.name, checked)  # frozen: normalise once


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

    @classmethod
    def create(
        cls,
        node_id: bytes,
        cluster_id: str,
        listen_port: int = 0,
        features: frozenset[str] = frozenset(),
    ) -> Hello:
        """Return our Hello with this build's magic and protocol version."""
        return cls(MAGIC, PROTOCOL_VERSION, node_id, cluster_id, listen_port, features)


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
    """A blob claimed to hash to ``digest``; the receiver must check it."""

    TYPE: ClassVar[int] = 7
    DATA_LIMIT: ClassVar[int] = MAX_PAYLOAD_BYTES
    request_id: int
    digest: bytes
    data: bytes


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


# fmt: off
Message = (
    Hello | Announce | ManifestRequest | ManifestData | ManifestMissing | ChunkRequest
    | ChunkData | ChunkMissing | RootRequest | RootData | RootMissing | Bye | Error
    | BlobRangeRequest | BlobRangeData | ManifestRangeRequest | ManifestRangeData | Have
)
Request = ManifestRequest | ChunkRequest | RootRequest | BlobRangeRequest | ManifestRangeRequest
Response = (
    ManifestData | ManifestMissing | ChunkData | ChunkMissing | RootData | RootMissing
    | BlobRangeData | ManifestRangeData
)
# fmt: on

_CLASSES: tuple[type[Message], ...] = (
    Hello, Announce, ManifestRequest, ManifestData, ManifestMissing, ChunkRequest,
    ChunkData, ChunkMissing, RootRequest, RootData, RootMissing, Bye, Error,
    BlobRangeRequest, BlobRangeData, ManifestRangeRequest, ManifestRangeData, Have,
)  # fmt: skip
_BY_CODE: dict[int, type[Message]] = {cls.TYPE: cls for cls in _CLASSES}


def _to_wire(msg: Message) -> list[Any]:
    if isinstance(msg, Hello):
        fields = [msg.magic, msg.protocol_version, msg.node_id, msg.cluster_id, msg.listen_port]
        return [*fields, sorted(msg.features)]
    if isinstance(msg, Announce):
        return [[list(entry) for entry in msg.entries]]
    if isinstance(msg, Have):
        return [msg.component, msg.serial, msg.complete, list(msg.digests)]
    return [getattr(msg, f.name) for f in dataclasses.fields(msg)]


def _from_wire(cls: type[Message], fields: list[Any]) -> Message:
    arity = len(dataclasses.fields(cls))
    if len(fields) < arity or (len(fields) > arity and cls is not Hello):
        raise SchemaError(f"{cls.__name__} needs {arity} fields, got {len(fields)}")
    if cls is Hello:
        features = fields[5]
        # Sorted and unique, so each feature set has exactly one encoding.
        if not isinstance(features, list) or features != sorted(set(features)):
            raise SchemaError("Hello features must be a sorted list of unique names")
        magic, version, node_id, cluster_id, port = fields[:5]  # more fields: a newer peer
        return Hello(magic, version, node_id, cluster_id, port, frozenset(features))
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
    factory: Callable[..., Message] = cls  # every other message maps fields 1:1
    return factory(*fields)


def encode_message(msg: Message) -> bytes:
    """Return the frame (length header + body) for ``msg``.

    Raises ``LocalProtocolError`` if ``msg`` is not a message or would not fit
    in ``limits.MAX_FRAME_BYTES``.
    """
    if type(msg) not in _CLASSES:
        raise LocalProtocolError(f"not a wire message: {type(msg).__name__}")
    body = encoding.encode([msg.TYPE, *_to_wire(msg)])
    if len(body) > limits.MAX_FRAME_BYTES:
        raise LocalProtocolError(f"{type(msg).__name__} frame of {len(body)} bytes is too large")
    return len(body).to_bytes(HEADER_BYTES, "big") + body


def decode_body(body: bytes) -> Message:
    """Decode one frame body (without its length header).

    Raises ``CodecError`` (``SchemaError`` for wrong fields) or
    ``FrameTooLargeError``; no other exception escapes.
    """
    value = encoding.decode(body, max_bytes=limits.MAX_FRAME_BYTES)
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
        self._frames: deque[bytes] = deque()
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
                # Whole body in this read: one copy instead of two.
                self._frames.append(bytes(view[pos : pos + self._need]))
                pos += self._need
                self._need = None
            else:
                take = min(self._need - len(self._body), end - pos)
                self._body += view[pos : pos + take]
                pos += take
                if len(self._body) == self._need:
                    self._frames.append(bytes(self._body))
                    self._body.clear()
                    self._need = None

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
