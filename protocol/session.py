"""The per-peer conversation as a sans-IO state machine (h11 style).

Theory of operation
-------------------
A ``Session`` sits between one TCP stream and the daemon. The daemon feeds it
whatever bytes arrive (``receive_data``; ``b""`` means end of stream), pulls
validated messages out with ``next_event`` until it returns ``NEED_DATA`` or
``CLOSED``, and turns each outgoing message into bytes with ``send``. The
session never does I/O and never looks at a clock; timeouts belong to the
caller (the gossip and planner modules take ``now``).

The conversation has one shared state, and every legal move is a row of
``TRANSITIONS``: (state, direction, message type) -> next state. Anything not in
the table is refused -- with ``RemoteProtocolError`` when the peer did it and
``LocalProtocolError`` when we tried to. A failed peer leaves the session in
``ERROR``; from there we may still send ``Error`` or ``Bye`` to say why.

Handshake: both sides send ``Hello`` first, in either order. The peer's Hello
must carry our magic, a protocol version we can speak (``negotiate_version``:
the conversation runs at the lower of the two versions; only a peer below our
``MIN_PROTOCOL_VERSION`` is refused), our cluster id and a node id other than
ours (else ``HandshakeError``). Features are the intersection of both Hellos'
(``supports``): offered, never required. Until both Hellos are through,
nothing else may be sent or received.

Proof (feature "proof", protocol/fleet/identity.py): when both sides offer it, the
handshake goes on through ``PROVING``: each side sends one ``Proof``
(``make_proof``) and nothing else until both are through. The peer's Hello
must then carry a public key whose ``node_id_of`` is its node id and a
challenge other than ours, and its Proof must be a valid signature by that key
(else ``HandshakeError``). ``proven`` then says whether the Proof was made on
this very connection (the addresses agree); a peer without the feature is
never proven.

Requests: the session allocates request ids (``request_manifest``,
``request_chunk``, ``request_root`` build requests with fresh ids) and tracks
requests in each direction. A response must answer an outstanding request of
its kind (chunk digest, root version and range offset must match too, and a
range answer may not be longer than asked), otherwise the peer is lying or
confused. Messages of a Hello feature (ranges, Have) may only be sent to a
peer that advertised the feature, and are refused from a peer we did not
advertise it to; so is a release key naming a platform variant
(``app@linux-aarch64``, feature "variants") in any message. At most ``max_in_flight`` requests may be outstanding each
way: sending more is our bug, receiving more is the peer's abuse. A request we
gave up on (``cancel_request``) keeps its slot until the peer answers, because
the peer still counts it; its answer is then dropped silently.

A ``ChunkBatchRequest`` (feature "batch") takes one slot and is answered by
one ChunkData or ChunkMissing per digest, in the order asked: the session
keeps the digests still due and refuses an answer for any other than the
next one; the request leaves flight with its last answer.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping

from p2pupd.protocol import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, ids, limits
from p2pupd.protocol.errors import HashMismatchError, LocalProtocolError, RemoteProtocolError
from p2pupd.protocol.fleet import identity
from p2pupd.protocol.wire import (
    FEATURE_BATCH,
    FEATURE_HAVE,
    FEATURE_PROOF,
    FEATURE_RANGE,
    FEATURE_REPORT,
    FEATURE_REQUEST,
    FEATURE_SITE,
    FEATURE_SWARM,
    FEATURE_VARIANTS,
    FEATURE_VIEW,
    MAGIC,
    MAX_RANGE_BYTES,
    MAX_REQUEST_ID,
    Announce,
    BlobRangeData,
    BlobRangeRequest,
    Bye,
    ChunkBatchRequest,
    ChunkData,
    ChunkMissing,
    ChunkRequest,
    Error,
    ForwardJoin,
    FrameDecoder,
    Have,
    HaveBits,
    Hello,
    ManifestData,
    ManifestMissing,
    ManifestRangeData,
    ManifestRangeRequest,
    ManifestRequest,
    Message,
    Neighbor,
    NodeRequestData,
    NodeRequestQuery,
    Ping,
    Proof,
    ReportDigest,
    ReportNews,
    Request,
    Response,
    RootData,
    RootMissing,
    RootRequest,
    Shuffle,
    SiteNews,
    ViewFull,
    encode_parts,
)


class HandshakeError(RemoteProtocolError):
    """The peer is not a compatible member of our cluster."""


def negotiate_version(
    theirs: int, ours: int = PROTOCOL_VERSION, oldest: int = MIN_PROTOCOL_VERSION
) -> int:
    """The protocol version a conversation with a peer of version ``theirs`` runs at.

    The lower of the two: a newer node speaks down to an older one, so the
    older side accepts any newer peer, and a node refuses only a peer older
    than the oldest version it still speaks (``HandshakeError``, naming both).
    mDNS discovery applies the same rule to the TXT ``proto`` of a service.
    """
    agreed = min(theirs, ours)
    if agreed < oldest:
        raise HandshakeError(
            f"peer speaks p2pupd protocol version {theirs}, this node speaks versions "
            f"{oldest} to {ours}; update the older node"
        )
    return agreed


class State(enum.Enum):
    IDLE = "idle"  # nobody has sent Hello
    HELLO_SENT = "hello-sent"  # ours is out, theirs not yet in
    HELLO_RECEIVED = "hello-received"  # theirs is in, ours not yet out
    PROVING = "proving"  # both Hellos through, no Proof yet (feature "proof")
    PROOF_SENT = "proof-sent"
    PROOF_RECEIVED = "proof-received"
    OPEN = "open"
    CLOSED = "closed"  # Bye or Error went either way, or the stream ended
    ERROR = "error"  # the peer broke the protocol


class Direction(enum.Enum):
    SEND = "send"
    RECEIVE = "receive"


class Signal(enum.Enum):
    NEED_DATA = "need-data"
    CLOSED = "closed"


NEED_DATA = Signal.NEED_DATA
CLOSED = Signal.CLOSED

_SEND, _RECV = Direction.SEND, Direction.RECEIVE
_CONVERSATION: tuple[type[Message], ...] = (
    Announce, ManifestRequest, ManifestData, ManifestMissing, ChunkRequest, ChunkData,
    ChunkMissing, RootRequest, RootData, RootMissing, BlobRangeRequest, BlobRangeData,
    ManifestRangeRequest, ManifestRangeData, Have, NodeRequestQuery, NodeRequestData,
    ChunkBatchRequest, SiteNews, Ping, Neighbor, ForwardJoin, Shuffle, ViewFull, HaveBits,
    ReportNews, ReportDigest,
)  # fmt: skip
_LIVE = (
    State.IDLE, State.HELLO_SENT, State.HELLO_RECEIVED, State.PROVING, State.PROOF_SENT,
    State.PROOF_RECEIVED, State.OPEN,
)  # fmt: skip

TRANSITIONS: dict[tuple[State, Direction, type[Message]], State] = {
    # Handshake: each side's Hello, in either order.
    (State.IDLE, _SEND, Hello): State.HELLO_SENT,
    (State.IDLE, _RECV, Hello): State.HELLO_RECEIVED,
    (State.HELLO_SENT, _RECV, Hello): State.OPEN,
    (State.HELLO_RECEIVED, _SEND, Hello): State.OPEN,  # or PROVING: see _after_hellos
    # Proof: one each way, in either order, when both offered feature "proof".
    (State.PROVING, _SEND, Proof): State.PROOF_SENT,
    (State.PROVING, _RECV, Proof): State.PROOF_RECEIVED,
    (State.PROOF_SENT, _RECV, Proof): State.OPEN,
    (State.PROOF_RECEIVED, _SEND, Proof): State.OPEN,
    # Conversation: every other message, both ways, only once open.
    **{(State.OPEN, d, t): State.OPEN for d in Direction for t in _CONVERSATION},
    # Closing: Bye or Error from any live state ends it.
    **{(s, d, t): State.CLOSED for s in _LIVE for d in Direction for t in (Bye, Error)},
    # After the peer broke the protocol we may still tell it why.
    (State.ERROR, _SEND, Error): State.CLOSED,
    (State.ERROR, _SEND, Bye): State.CLOSED,
}

_REQUESTS = (
    ManifestRequest, ChunkRequest, RootRequest, BlobRangeRequest, ManifestRangeRequest,
    NodeRequestQuery, ChunkBatchRequest,
)  # fmt: skip
_RESPONSES = (
    ManifestData, ManifestMissing, ChunkData, ChunkMissing, RootData, RootMissing,
    BlobRangeData, ManifestRangeData, NodeRequestData,
)  # fmt: skip
# Which request kinds each response may answer.
_ANSWERS: dict[type[Message], tuple[type[Request], ...]] = {
    ManifestData: (ManifestRequest,),
    ManifestMissing: (ManifestRequest, ManifestRangeRequest),
    ChunkData: (ChunkRequest, ChunkBatchRequest),
    ChunkMissing: (ChunkRequest, BlobRangeRequest, ChunkBatchRequest),
    RootData: (RootRequest,),
    RootMissing: (RootRequest,),
    BlobRangeData: (BlobRangeRequest,),
    ManifestRangeData: (ManifestRangeRequest,),
    NodeRequestData: (NodeRequestQuery,),
}
# Messages that exist only between peers that both advertised a Hello feature.
_FEATURE_OF: dict[type[Message], str] = {
    BlobRangeRequest: FEATURE_RANGE,
    BlobRangeData: FEATURE_RANGE,
    ManifestRangeRequest: FEATURE_RANGE,
    ManifestRangeData: FEATURE_RANGE,
    Have: FEATURE_HAVE,
    NodeRequestQuery: FEATURE_REQUEST,
    NodeRequestData: FEATURE_REQUEST,
    ChunkBatchRequest: FEATURE_BATCH,
    Proof: FEATURE_PROOF,
    Ping: FEATURE_VIEW,
    Neighbor: FEATURE_VIEW,
    ForwardJoin: FEATURE_VIEW,
    Shuffle: FEATURE_VIEW,
    ViewFull: FEATURE_VIEW,
    HaveBits: FEATURE_SWARM,
    SiteNews: FEATURE_SITE,
    ReportNews: FEATURE_REPORT,
    ReportDigest: FEATURE_REPORT,
}

_KEYED = (ManifestRequest, ManifestRangeRequest, Have, HaveBits)


def names_variant(msg: Message) -> bool:
    """True if ``msg`` names a release by a platform variant key (feature "variants")."""
    if isinstance(msg, _KEYED):
        return "@" in msg.component
    if isinstance(msg, Announce):
        return any("@" in e.component for e in msg.entries)
    return False


def _features_of(msg: Message) -> tuple[str, ...]:
    """The Hello features both sides must have offered for ``msg`` to flow."""
    feature = _FEATURE_OF.get(type(msg))
    needs = () if feature is None else (feature,)
    return (*needs, FEATURE_VARIANTS) if names_variant(msg) else needs


def verify_chunk(msg: ChunkData) -> None:
    """Raise ``HashMismatchError`` unless ``msg.data`` hashes to ``msg.digest``."""
    if ids.sha256(msg.data) != msg.digest:
        raise HashMismatchError(f"chunk data does not match {msg.digest.hex()[:16]}")


class Session:
    """One peer conversation; see the module docstring."""

    def __init__(
        self,
        node_id: bytes,
        cluster_id: str,
        listen_port: int = 0,
        features: frozenset[str] = frozenset(),
        max_in_flight: int = limits.MAX_IN_FLIGHT_PER_PEER,
        *,
        key: identity.NodeKey | None = None,
        challenge: bytes = b"",
        local_host: str = "",
        remote_host: str = "",
    ) -> None:
        """``key``, ``challenge`` (fresh random bytes) and the two ends' IP addresses
        are needed for feature "proof"; raises ``LocalProtocolError`` if it is
        offered without them or ``key`` is not ``node_id``'s."""
        if FEATURE_PROOF in features:
            if key is None or len(challenge) < identity.CHALLENGE_BYTES // 2:
                raise LocalProtocolError('feature "proof" needs the node key and a challenge')
            if key.node_id != node_id:
                raise LocalProtocolError("the node key does not belong to this node id")
        public_key = key.public_key if key is not None and FEATURE_PROOF in features else b""
        if not public_key:
            challenge = b""
        self.hello = Hello.create(node_id, cluster_id, listen_port, features, public_key, challenge)
        self.peer_hello: Hello | None = None
        # The version the conversation runs at, once the peer's Hello is in.
        self.protocol_version: int | None = None
        self.state = State.IDLE
        self._key = key
        self._local_host = local_host
        self._remote_host = remote_host
        self.proven = False  # the peer proved its node id on this connection
        self._max_in_flight = max_in_flight
        self._decoder = FrameDecoder()
        self._ours: dict[int, Request] = {}  # our requests awaiting the peer's answer
        self._theirs: dict[int, Request] = {}  # the peer's requests awaiting our answer
        self._cancelled: set[int] = set()  # subset of _ours whose answers we drop
        # Batch requests: the digests still to be answered, in order, each way.
        self._ours_due: dict[int, deque[bytes]] = {}
        self._theirs_due: dict[int, deque[bytes]] = {}
        self._next_id = 0

    # ----- incoming -------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the stream ended.

        Never raises for bad bytes (``next_event`` does). Raises
        ``LocalProtocolError`` if called again after end of stream.
        """
        if self._decoder.eof:
            if data:
                raise LocalProtocolError("data received after end of stream")
        elif not data:
            self._decoder.feed_eof()
        elif self.state not in (State.CLOSED, State.ERROR):
            self._decoder.feed(data)  # anything after Bye or an error is ignored

    def next_event(self) -> Message | Signal:
        """Return the next message from the peer, ``NEED_DATA`` or ``CLOSED``.

        Raises ``RemoteProtocolError`` (``CodecError``, ``FrameTooLargeError``,
        ``HandshakeError``, ...) when the peer breaks the protocol; the session
        is then in ``State.ERROR`` and raises again on every later call.
        """
        while True:
            if self.state is State.ERROR:
                raise RemoteProtocolError("peer already broke the protocol on this session")
            if self.state is State.CLOSED:
                return CLOSED
            try:
                msg = self._decoder.next_message()
                if msg is None:
                    if self._decoder.eof:
                        self.state = State.CLOSED  # peer vanished without Bye
                        return CLOSED
                    return NEED_DATA
                deliver = self._process_incoming(msg)
            except RemoteProtocolError:
                self.state = State.ERROR
                raise
            if deliver:
                return msg

    def _process_incoming(self, msg: Message) -> bool:
        """Apply ``msg`` to the state; return False if it must not be delivered."""
        new_state = TRANSITIONS.get((self.state, _RECV, type(msg)))
        if new_state is None:
            raise RemoteProtocolError(f"peer sent {type(msg).__name__} in state {self.state.value}")
        deliver = True
        for feature in _features_of(msg):
            if feature not in self.hello.features:
                raise RemoteProtocolError(
                    f"peer sent {type(msg).__name__}, but feature {feature!r} was not offered"
                )
        if isinstance(msg, Hello):
            self._check_peer_hello(msg)
            self.peer_hello = msg
            new_state = self._after_hellos(new_state)
        elif isinstance(msg, Proof):
            self._check_proof(msg)
        elif isinstance(msg, _REQUESTS):
            if msg.request_id in self._theirs:
                raise RemoteProtocolError(f"peer reused request id {msg.request_id}")
            if len(self._theirs) >= self._max_in_flight:
                raise RemoteProtocolError(f"peer exceeded {self._max_in_flight} requests in flight")
            self._theirs[msg.request_id] = msg
            if isinstance(msg, ChunkBatchRequest):
                self._theirs_due[msg.request_id] = deque(msg.batch)
        elif isinstance(msg, _RESPONSES):
            rid = msg.request_id
            due = self._ours_due.get(rid)
            _check_answer(self._ours.get(rid), msg, "peer sent", RemoteProtocolError, due)
            if _last_answer(self._ours_due, rid, due):
                del self._ours[rid]
                if rid in self._cancelled:
                    self._cancelled.discard(rid)
                    deliver = False
            elif rid in self._cancelled:
                deliver = False
        self.state = new_state
        return deliver

    def _check_peer_hello(self, hello: Hello) -> None:
        if hello.magic != MAGIC:
            raise HandshakeError(f"peer is not a p2pupd node (magic {hello.magic!r})")
        self.protocol_version = negotiate_version(hello.protocol_version)
        if hello.cluster_id != self.hello.cluster_id:
            raise HandshakeError(
                f"peer belongs to cluster {hello.cluster_id!r}, "
                f"this node to {self.hello.cluster_id!r}"
            )
        if hello.node_id == self.hello.node_id:
            raise HandshakeError("connected to ourselves")
        if FEATURE_PROOF in hello.features and FEATURE_PROOF in self.hello.features:
            if not hello.public_key or not hello.challenge:
                raise HandshakeError("peer offers proof but sent no key or challenge")
            if identity.node_id_of(hello.public_key) != hello.node_id:
                raise HandshakeError("peer's node id is not the hash of its public key")
            if hello.challenge == self.hello.challenge:
                raise HandshakeError("peer sent our own challenge back")

    def _after_hellos(self, new_state: State) -> State:
        """Both Hellos through: proving first if both sides offered "proof"."""
        if new_state is State.OPEN and self.supports(FEATURE_PROOF):
            return State.PROVING
        return new_state

    def _check_proof(self, msg: Proof) -> None:
        peer = self.peer_hello
        assert peer is not None  # the table admits Proof only after both Hellos
        statement = identity.proof_statement(
            self.hello.cluster_id,
            peer.node_id,
            peer.public_key,
            self.hello.challenge,
            peer.challenge,
            msg.seen_host,
        )
        if not identity.verify_signature(peer.public_key, statement, msg.signature):
            raise HandshakeError("peer's proof of its node id does not verify")
        seen = identity.normal_host(msg.seen_host)
        self.proven = seen == identity.normal_host(self._local_host)

    # ----- outgoing -------------------------------------------------------

    def send(self, msg: Message) -> bytes:
        """Return the bytes for ``msg`` and advance the state; see ``send_parts``."""
        parts = self.send_parts(msg)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def send_parts(self, msg: Message) -> tuple[bytes, ...]:
        """Return the bytes for ``msg`` in pieces (``wire.encode_parts``) and advance the state.

        Raises ``LocalProtocolError`` when ``msg`` is not allowed now: before
        the handshake, after close, a Hello other than ``self.hello``, a
        request beyond the in-flight cap or with a used id, or a response to
        no outstanding peer request.
        """
        new_state = TRANSITIONS.get((self.state, _SEND, type(msg)))
        if new_state is None:
            raise LocalProtocolError(
                f"cannot send {type(msg).__name__} in state {self.state.value}"
            )
        if isinstance(msg, Hello) and msg != self.hello:
            raise LocalProtocolError("send session.hello, not another Hello")
        for feature in _features_of(msg):
            if feature not in self.peer_features:
                raise LocalProtocolError(f"peer did not offer feature {feature!r}")
        if isinstance(msg, _REQUESTS):
            if msg.request_id in self._ours:
                raise LocalProtocolError(f"request id {msg.request_id} is already in flight")
            if len(self._ours) >= self._max_in_flight:
                raise LocalProtocolError(f"already {self._max_in_flight} requests in flight")
        elif isinstance(msg, _RESPONSES):
            due = self._theirs_due.get(msg.request_id)
            _check_answer(self._theirs.get(msg.request_id), msg, "we sent", LocalProtocolError, due)
        if isinstance(msg, Proof):
            raise LocalProtocolError("send make_proof(), not another Proof")
        data = encode_parts(msg)  # may raise; the state is untouched until it succeeds
        if isinstance(msg, _REQUESTS):
            self._ours[msg.request_id] = msg
            if isinstance(msg, ChunkBatchRequest):
                self._ours_due[msg.request_id] = deque(msg.batch)
        elif isinstance(msg, _RESPONSES):
            rid = msg.request_id
            if _last_answer(self._theirs_due, rid, self._theirs_due.get(rid)):
                del self._theirs[rid]
        if isinstance(msg, Hello):
            new_state = self._after_hellos(new_state)
        self.state = new_state
        return data

    def send_hello(self) -> bytes:
        """Return the bytes of our Hello; shorthand for ``send(self.hello)``."""
        return self.send(self.hello)

    @property
    def proof_due(self) -> bool:
        """True while we owe the peer our ``Proof`` (send ``send_proof()``)."""
        return self.state in (State.PROVING, State.PROOF_RECEIVED)

    def send_proof(self) -> bytes:
        """Return the bytes of our Proof (signed over the peer's challenge) and advance.

        Raises ``LocalProtocolError`` unless a Proof is due (``proof_due``).
        """
        new_state = TRANSITIONS.get((self.state, _SEND, Proof))
        peer = self.peer_hello
        if new_state is None or peer is None or self._key is None:
            raise LocalProtocolError(f"cannot send Proof in state {self.state.value}")
        statement = identity.proof_statement(
            self.hello.cluster_id,
            self.hello.node_id,
            self.hello.public_key,
            peer.challenge,
            self.hello.challenge,
            self._remote_host,
        )
        host = identity.normal_host(self._remote_host)
        data = encode_parts(Proof(self._key.sign(statement), host))
        self.state = new_state
        return data[0]

    def next_request_id(self) -> int:
        """Return an id not used by any of our outstanding requests."""
        while True:
            request_id = self._next_id
            self._next_id = 0 if request_id == MAX_REQUEST_ID else request_id + 1
            if request_id not in self._ours:
                return request_id

    def request_manifest(self, component: str, serial: int) -> ManifestRequest:
        """Return a ManifestRequest with a fresh id (not yet sent)."""
        return ManifestRequest(self.next_request_id(), component, serial)

    def request_chunk(self, digest: bytes) -> ChunkRequest:
        """Return a ChunkRequest with a fresh id (not yet sent)."""
        return ChunkRequest(self.next_request_id(), digest)

    def request_chunk_batch(self, digests: tuple[bytes, ...]) -> ChunkBatchRequest:
        """Return a ChunkBatchRequest with a fresh id (not yet sent; feature "batch")."""
        return ChunkBatchRequest(self.next_request_id(), digests)

    def request_root(self, version: int) -> RootRequest:
        """Return a RootRequest with a fresh id (not yet sent)."""
        return RootRequest(self.next_request_id(), version)

    def request_blob_range(self, digest: bytes, offset: int, length: int) -> BlobRangeRequest:
        """Return a BlobRangeRequest with a fresh id (not yet sent)."""
        return BlobRangeRequest(
            self.next_request_id(), digest, offset, min(length, MAX_RANGE_BYTES)
        )

    def request_manifest_range(
        self, component: str, serial: int, offset: int, length: int = MAX_RANGE_BYTES
    ) -> ManifestRangeRequest:
        """Return a ManifestRangeRequest with a fresh id (not yet sent)."""
        return ManifestRangeRequest(
            self.next_request_id(), component, serial, offset, min(length, MAX_RANGE_BYTES)
        )

    def request_node_request(self) -> NodeRequestQuery:
        """Return a NodeRequestQuery with a fresh id (not yet sent; feature "request")."""
        return NodeRequestQuery(self.next_request_id())

    def cancel_request(self, request_id: int) -> None:
        """Drop the answer to our request when it comes; its slot stays taken until then.

        Raises ``LocalProtocolError`` if no such request is outstanding.
        """
        if request_id not in self._ours:
            raise LocalProtocolError(f"no request {request_id} in flight")
        self._cancelled.add(request_id)

    # ----- inspection -----------------------------------------------------

    @property
    def peer_features(self) -> frozenset[str]:
        """Features the peer advertised in its Hello (empty before it arrived)."""
        return self.peer_hello.features if self.peer_hello is not None else frozenset()

    def supports(self, feature: str) -> bool:
        """True when both sides advertised ``feature``, so its messages may flow."""
        return feature in self.hello.features and feature in self.peer_features

    @property
    def can_request(self) -> bool:
        """True when ``send`` would accept one more request now."""
        return self.state is State.OPEN and len(self._ours) < self._max_in_flight

    def in_flight(self, request_id: int) -> bool:
        """True while our request ``request_id`` awaits (more) answers."""
        return request_id in self._ours

    @property
    def outstanding(self) -> Mapping[int, Request]:
        """Our requests awaiting an answer, by request id (read-only view)."""
        return dict(self._ours)

    @property
    def peer_outstanding(self) -> Mapping[int, Request]:
        """The peer's requests we have not answered yet, by request id."""
        return dict(self._theirs)


def _last_answer(due: dict[int, deque[bytes]], request_id: int, left: deque[bytes] | None) -> bool:
    """Count one answer to ``request_id``; True if it was the last one due."""
    if left is None:
        return True  # not a batch: one answer ends it
    left.popleft()
    if left:
        return False
    del due[request_id]
    return True


def _check_answer(
    request: Request | None,
    msg: Response,
    who: str,
    error: type[Exception],
    due: deque[bytes] | None = None,
) -> None:
    """Raise ``error`` unless ``msg`` answers ``request`` (same kind, digest, version).

    ``due``: for a batch request, the digests still to be answered, in order.
    """
    name = type(msg).__name__
    kinds = _ANSWERS[type(msg)]
    if request is None or type(request) not in kinds:
        raise error(f"{who} {name} answering no outstanding {kinds[0].__name__}")
    if isinstance(request, ChunkBatchRequest):
        assert due and isinstance(msg, ChunkData | ChunkMissing)  # by _ANSWERS
        if msg.digest != due[0]:
            raise error(
                f"{who} {name} for digest {msg.digest.hex()[:16]}, "
                f"not the next one of the batch ({due[0].hex()[:16]})"
            )
    if (
        isinstance(msg, ChunkData | ChunkMissing | BlobRangeData)
        and isinstance(request, ChunkRequest | BlobRangeRequest)
        and msg.digest != request.digest
    ):
        raise error(f"{who} {name} for digest {msg.digest.hex()[:16]}, not the one requested")
    if isinstance(msg, BlobRangeData | ManifestRangeData) and isinstance(
        request, BlobRangeRequest | ManifestRangeRequest
    ):
        if msg.offset != request.offset or len(msg.data) > request.length:
            raise error(
                f"{who} {name} of {len(msg.data)} bytes at {msg.offset}, "
                f"requested {request.length} at {request.offset}"
            )
        if isinstance(msg, ManifestRangeData) and msg.offset + len(msg.data) > msg.total:
            raise error(f"{who} {name} runs past the manifest's total of {msg.total} bytes")
    if (
        isinstance(msg, RootData)
        and isinstance(request, RootRequest)
        and msg.version != request.version
    ):
        raise error(f"{who} root version {msg.version}, requested {request.version}")
