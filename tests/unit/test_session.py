"""The per-peer Session state machine, driven in pairs over a fake link."""

from __future__ import annotations

import pytest

from p2pupd.protocol import encoding, ids, limits
from p2pupd.protocol.errors import (
    CodecError,
    HashMismatchError,
    LocalProtocolError,
    RemoteProtocolError,
)
from p2pupd.protocol.session import (
    CLOSED,
    NEED_DATA,
    TRANSITIONS,
    Direction,
    HandshakeError,
    Session,
    Signal,
    State,
    negotiate_version,
    verify_chunk,
)
from p2pupd.protocol.wire import (
    FEATURE_HAVE,
    FEATURE_RANGE,
    FEATURE_REQUEST,
    FEATURE_SWARM,
    FEATURE_VARIANTS,
    MAGIC,
    MAX_RANGE_BYTES,
    Announce,
    BlobRangeData,
    Bye,
    ChunkData,
    ChunkMissing,
    ChunkRequest,
    Error,
    Have,
    HaveBits,
    Hello,
    ManifestData,
    ManifestMissing,
    ManifestRangeData,
    ManifestRequest,
    Message,
    NodeRequestData,
    NodeRequestQuery,
    RootData,
    RootRequest,
    encode_message,
)

A_ID = b"A" * 16
B_ID = b"B" * 16
D = b"\x05" * 32


class Pair:
    """Two sessions joined by a fake link (like h11's ConnectionPair)."""

    def __init__(self, max_in_flight: int = limits.MAX_IN_FLIGHT_PER_PEER) -> None:
        self.a = Session(A_ID, "site", 7000, max_in_flight=max_in_flight)
        self.b = Session(B_ID, "site", 7001, max_in_flight=max_in_flight)

    def send(self, sender: Session, msg: Message) -> list[Message | Signal]:
        """Send ``msg`` from ``sender``; return what the other side sees."""
        receiver = self.b if sender is self.a else self.a
        receiver.receive_data(sender.send(msg))
        return drain(receiver)

    def handshake(self) -> None:
        assert self.send(self.a, self.a.hello) == [self.a.hello, NEED_DATA]
        assert self.send(self.b, self.b.hello) == [self.b.hello, NEED_DATA]
        assert self.a.state is self.b.state is State.OPEN


def drain(session: Session) -> list[Message | Signal]:
    events: list[Message | Signal] = []
    while True:
        event = session.next_event()
        events.append(event)
        if isinstance(event, Signal):
            return events


def test_full_conversation() -> None:
    pair = Pair()
    pair.handshake()
    assert pair.a.peer_hello is not None and pair.a.peer_hello.listen_port == 7001

    manifest = b"signed manifest envelope"
    announce = Announce.from_holdings({"app": (3, ids.sha256(manifest))})
    assert pair.send(pair.b, announce) == [announce, NEED_DATA]

    req = pair.a.request_manifest("app", 3)
    assert pair.send(pair.a, req) == [req, NEED_DATA]
    assert pair.b.peer_outstanding == {req.request_id: req}
    reply = ManifestData(req.request_id, manifest)
    assert pair.send(pair.b, reply) == [reply, NEED_DATA]
    assert pair.a.outstanding == {}
    assert pair.b.peer_outstanding == {}

    chunk = b"chunk content"
    creq = pair.a.request_chunk(ids.sha256(chunk))
    assert creq.request_id != req.request_id
    pair.send(pair.a, creq)
    data = ChunkData(creq.request_id, creq.digest, chunk)
    [got, _] = pair.send(pair.b, data)
    assert isinstance(got, ChunkData)
    verify_chunk(got)

    rreq = pair.b.request_root(2)
    pair.send(pair.b, rreq)
    assert pair.send(pair.a, RootData(rreq.request_id, 2, b"root v2"))[0] == RootData(
        rreq.request_id, 2, b"root v2"
    )

    assert pair.send(pair.a, Bye("done")) == [Bye("done"), CLOSED]
    assert pair.a.state is pair.b.state is State.CLOSED
    assert pair.a.next_event() is CLOSED


def test_hellos_may_cross() -> None:
    pair = Pair()
    to_b, to_a = pair.a.send_hello(), pair.b.send_hello()
    pair.a.receive_data(to_a)
    pair.b.receive_data(to_b)
    assert isinstance(pair.a.next_event(), Hello)
    assert isinstance(pair.b.next_event(), Hello)
    assert pair.a.state is pair.b.state is State.OPEN


def test_only_hello_is_accepted_before_the_handshake() -> None:
    pair = Pair()
    pair.b.receive_data(encode_message(Announce(())))
    with pytest.raises(RemoteProtocolError, match="Announce in state idle"):
        pair.b.next_event()
    assert pair.b.state is State.ERROR


def test_cannot_send_before_handshake_completes() -> None:
    pair = Pair()
    pair.a.send_hello()
    with pytest.raises(LocalProtocolError):
        pair.a.send(Announce(()))
    with pytest.raises(LocalProtocolError):
        pair.a.send(pair.a.hello)  # twice


def test_must_send_its_own_hello() -> None:
    with pytest.raises(LocalProtocolError):
        Pair().a.send(Hello.create(b"Z" * 16, "site"))


@pytest.mark.parametrize(
    ("hello", "match"),
    [
        (Hello(b"HTTP/1", 1, B_ID, "site", 0), "not a p2pupd node"),
        (Hello(MAGIC, 0, B_ID, "site", 0), "protocol version 0, this node speaks versions 1 to 1"),
        (Hello(MAGIC, 1, B_ID, "other-site", 0), "cluster 'other-site', this node to 'site'"),
        (Hello(MAGIC, 1, A_ID, "site", 0), "ourselves"),
    ],
)
def test_incompatible_peers_are_refused_clearly(hello: Hello, match: str) -> None:
    session = Session(A_ID, "site")
    session.send_hello()
    session.receive_data(encode_message(hello))
    with pytest.raises(HandshakeError, match=match):
        session.next_event()
    # After the failure we may still tell the peer why, and nothing else.
    with pytest.raises(LocalProtocolError):
        session.send(Announce(()))
    session.send(Error(1, "incompatible"))
    assert session.state is State.CLOSED


def test_a_newer_peer_is_spoken_to_at_our_version_and_its_extra_features_ignored() -> None:
    """Mixed sites: a node of a later protocol version, offering features we have
    never heard of, still gets a conversation -- at our version, with only the
    features both offered -- and so does an older peer within our range."""
    session = Session(A_ID, "site", features=frozenset({FEATURE_HAVE}))
    session.send_hello()
    newer = Hello(MAGIC, 7, B_ID, "site", 7001, frozenset({FEATURE_HAVE, "teleport"}))
    session.receive_data(encode_message(newer))
    assert session.next_event() == newer
    assert session.state is State.OPEN
    assert session.protocol_version == 1
    assert session.supports(FEATURE_HAVE) and not session.supports("teleport")
    # A feature only the peer offered is never sent to it by us, nor accepted from it.
    with pytest.raises(LocalProtocolError, match="did not offer feature 'range'"):
        session.send(BlobRangeData(1, b"\x01" * 32, 0, b"x"))


def test_version_negotiation_rule() -> None:
    # The lower of the two versions; refused only below the oldest we speak.
    assert negotiate_version(1, ours=3, oldest=1) == 1
    assert negotiate_version(5, ours=3, oldest=2) == 3
    assert negotiate_version(2, ours=3, oldest=2) == 2
    with pytest.raises(HandshakeError, match="version 1, this node speaks versions 2 to 3"):
        negotiate_version(1, ours=3, oldest=2)


def test_error_state_raises_again() -> None:
    session = Session(A_ID, "site")
    session.receive_data(b"\x00\x00\x00\x01\xc1")  # 0xc1 is never valid msgpack
    with pytest.raises(CodecError):
        session.next_event()
    with pytest.raises(RemoteProtocolError):
        session.next_event()


@pytest.mark.parametrize(
    "reply",
    [
        lambda rid, d: ChunkData(rid + 1, d, b"x"),  # no such request
        lambda rid, d: ChunkData(rid, b"\x09" * 32, b"x"),  # other digest
        lambda rid, d: ChunkMissing(rid, b"\x09" * 32),
        lambda rid, d: ManifestData(rid, b"x"),  # answers a ChunkRequest
        lambda rid, d: ManifestMissing(rid),
    ],
)
def test_responses_must_match_an_outstanding_request(reply: object) -> None:
    pair = Pair()
    pair.handshake()
    req = pair.a.request_chunk(b"\x01" * 32)
    pair.send(pair.a, req)
    # A lying peer: the bytes are built directly, bypassing b's own checks.
    pair.a.receive_data(encode_message(reply(req.request_id, req.digest)))  # type: ignore[operator]
    with pytest.raises(RemoteProtocolError):
        pair.a.next_event()


def test_unsolicited_data_is_a_remote_error() -> None:
    pair = Pair()
    pair.handshake()
    pair.a.receive_data(encode_message(ManifestData(0, b"surprise")))
    with pytest.raises(RemoteProtocolError, match="no outstanding ManifestRequest"):
        pair.a.next_event()


def test_root_version_must_match() -> None:
    pair = Pair()
    pair.handshake()
    req = pair.a.request_root(3)
    pair.send(pair.a, req)
    pair.a.receive_data(encode_message(RootData(req.request_id, 4, b"r")))
    with pytest.raises(RemoteProtocolError, match="root version 4"):
        pair.a.next_event()


def test_answering_a_request_never_received_is_our_bug() -> None:
    pair = Pair()
    pair.handshake()
    with pytest.raises(LocalProtocolError):
        pair.b.send(ChunkMissing(5, b"\x01" * 32))
    req = pair.a.request_chunk(b"\x01" * 32)
    pair.send(pair.a, req)
    with pytest.raises(LocalProtocolError):
        pair.b.send(ChunkData(req.request_id, b"\x02" * 32, b""))
    assert pair.b.peer_outstanding  # a refused send changes nothing


def test_outgoing_requests_are_capped() -> None:
    pair = Pair(max_in_flight=3)
    pair.handshake()
    reqs = [pair.a.request_chunk(bytes([i]) * 32) for i in range(3)]
    for req in reqs:
        pair.send(pair.a, req)
    assert not pair.a.can_request
    with pytest.raises(LocalProtocolError, match="in flight"):
        pair.a.send(pair.a.request_chunk(b"\x09" * 32))
    pair.send(pair.b, ChunkMissing(reqs[0].request_id, reqs[0].digest))
    assert pair.a.can_request
    pair.send(pair.a, pair.a.request_chunk(b"\x09" * 32))


def test_incoming_requests_beyond_cap_are_a_remote_error() -> None:
    greedy = Session(A_ID, "site", max_in_flight=10)
    victim = Session(B_ID, "site", max_in_flight=2)
    victim.receive_data(greedy.send_hello())
    greedy.receive_data(victim.send_hello())
    drain(victim)
    drain(greedy)
    for i in range(3):
        victim.receive_data(greedy.send(greedy.request_chunk(bytes([i]) * 32)))
    assert isinstance(victim.next_event(), ChunkRequest)
    assert isinstance(victim.next_event(), ChunkRequest)
    with pytest.raises(RemoteProtocolError, match="exceeded 2 requests"):
        victim.next_event()


def test_reused_request_id_from_peer_is_an_error() -> None:
    pair = Pair()
    pair.handshake()
    pair.b.receive_data(encode_message(ManifestRequest(7, "app", 1)) * 2)
    assert isinstance(pair.b.next_event(), ManifestRequest)
    with pytest.raises(RemoteProtocolError, match="reused request id 7"):
        pair.b.next_event()


def test_own_request_id_cannot_be_reused_while_in_flight() -> None:
    pair = Pair()
    pair.handshake()
    pair.a.send(ChunkRequest(5, b"\x01" * 32))
    with pytest.raises(LocalProtocolError):
        pair.a.send(ChunkRequest(5, b"\x02" * 32))
    ids_seen = {pair.a.next_request_id() for _ in range(100)}
    assert len(ids_seen) == 100 and 5 not in ids_seen


def test_cancelled_request_keeps_slot_until_answer_then_is_dropped() -> None:
    pair = Pair(max_in_flight=1)
    pair.handshake()
    req = pair.a.request_chunk(b"\x01" * 32)
    pair.send(pair.a, req)
    pair.a.cancel_request(req.request_id)
    assert not pair.a.can_request  # the peer still counts it
    assert pair.send(pair.b, ChunkMissing(req.request_id, req.digest)) == [NEED_DATA]
    assert pair.a.can_request
    with pytest.raises(LocalProtocolError):
        pair.a.cancel_request(req.request_id)


def test_end_of_stream() -> None:
    pair = Pair()
    pair.handshake()
    pair.a.receive_data(b"")
    assert pair.a.next_event() is CLOSED
    assert pair.a.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        pair.a.send(Announce(()))
    with pytest.raises(LocalProtocolError):
        pair.a.receive_data(b"more")
    pair.a.receive_data(b"")  # repeating end of stream is harmless


def test_end_of_stream_mid_frame_is_an_error() -> None:
    pair = Pair()
    pair.handshake()
    pair.a.receive_data(encode_message(Bye("x"))[:3])
    pair.a.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        pair.a.next_event()


def test_data_after_bye_is_ignored() -> None:
    pair = Pair()
    pair.handshake()
    pair.b.receive_data(encode_message(Bye()))
    assert pair.b.next_event() == Bye()
    pair.b.receive_data(b"\xff\xff\xff\xff garbage")
    assert pair.b.next_event() is CLOSED


def test_error_message_closes() -> None:
    pair = Pair()
    pair.handshake()
    assert pair.send(pair.a, Error(2, "going away")) == [Error(2, "going away"), CLOSED]


def test_verify_chunk_detects_mismatch() -> None:
    with pytest.raises(HashMismatchError):
        verify_chunk(ChunkData(0, ids.sha256(b"a"), b"b"))


def test_transition_table_shape() -> None:
    # Announce (and every request) is legal only once the handshake is through.
    states = {s for (s, d, t) in TRANSITIONS if t is Announce}
    assert states == {State.OPEN}
    for direction in Direction:
        assert TRANSITIONS[(State.OPEN, direction, ChunkRequest)] is State.OPEN
        assert TRANSITIONS[(State.IDLE, direction, Bye)] is State.CLOSED
    assert not any(s is State.CLOSED for (s, _, _) in TRANSITIONS)


def test_garbage_before_hello_is_a_codec_error() -> None:
    session = Session(A_ID, "site")
    session.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(RemoteProtocolError):
        session.next_event()


def test_request_helpers_validate() -> None:
    session = Session(A_ID, "site")
    with pytest.raises(LocalProtocolError):
        session.request_chunk(b"short")
    assert encoding.decode(session.send_hello()[4:])[0] == Hello.TYPE
    assert isinstance(session.request_root(1), RootRequest)


# ----- Hello features: ranged transfers and Have ---------------------------------------

FEATURES = frozenset({FEATURE_RANGE, FEATURE_HAVE, FEATURE_REQUEST})


def featured_pair(a_features: frozenset[str] = FEATURES, b_features: frozenset[str] = FEATURES):  # type: ignore[no-untyped-def]
    pair = Pair()
    pair.a = Session(A_ID, "site", 7000, a_features)
    pair.b = Session(B_ID, "site", 7001, b_features)
    pair.handshake()
    return pair


def test_ranged_blob_transfer_round_trip() -> None:
    pair = featured_pair()
    assert pair.a.supports(FEATURE_RANGE) and pair.b.supports(FEATURE_HAVE)
    req = pair.a.request_blob_range(D, 1 << 22, 1 << 30)  # length clipped to a frame
    assert req.length == MAX_RANGE_BYTES
    assert pair.send(pair.a, req) == [req, NEED_DATA]
    data = BlobRangeData(req.request_id, D, req.offset, b"piece")
    assert pair.send(pair.b, data) == [data, NEED_DATA]
    miss_req = pair.a.request_blob_range(D, 0, 10)
    pair.send(pair.a, miss_req)
    miss = ChunkMissing(miss_req.request_id, D)
    assert pair.send(pair.b, miss) == [miss, NEED_DATA]  # ChunkMissing answers ranges too
    assert not pair.a.outstanding


def test_ranged_manifest_transfer_round_trip() -> None:
    pair = featured_pair()
    req = pair.a.request_manifest_range("app", 2, 5, 4)
    pair.send(pair.a, req)
    piece = ManifestRangeData(req.request_id, 5, 9, b"abcd")
    assert pair.send(pair.b, piece) == [piece, NEED_DATA]
    req2 = pair.a.request_manifest_range("app", 2, 0)
    pair.send(pair.a, req2)
    assert pair.send(pair.b, ManifestMissing(req2.request_id))[0] == ManifestMissing(
        req2.request_id
    )


@pytest.mark.parametrize(
    "answer",
    [
        lambda rid: BlobRangeData(rid, D, 99, b"x"),  # other offset
        lambda rid: BlobRangeData(rid, b"\x07" * 32, 0, b"x"),  # other blob
        lambda rid: BlobRangeData(rid, D, 0, b"x" * 11),  # longer than asked
        lambda rid: ChunkData(rid, D, b"x"),  # whole-blob answer to a range
    ],
)
def test_bad_range_answers_are_remote_errors(answer) -> None:  # type: ignore[no-untyped-def]
    pair = featured_pair()
    req = pair.a.request_blob_range(D, 0, 10)
    pair.send(pair.a, req)
    pair.a.receive_data(encode_message(answer(req.request_id)))
    with pytest.raises(RemoteProtocolError):
        drain(pair.a)


def test_manifest_piece_past_its_total_is_a_remote_error() -> None:
    pair = featured_pair()
    req = pair.a.request_manifest_range("app", 2, 8, 100)
    pair.send(pair.a, req)
    pair.a.receive_data(encode_message(ManifestRangeData(req.request_id, 8, 9, b"xy")))
    with pytest.raises(RemoteProtocolError, match="total"):
        drain(pair.a)


def test_feature_messages_need_both_sides() -> None:
    pair = featured_pair(b_features=frozenset())
    assert not pair.a.supports(FEATURE_HAVE)
    with pytest.raises(LocalProtocolError, match="feature"):
        pair.a.send(Have("app", 1, True))
    with pytest.raises(LocalProtocolError, match="feature"):
        pair.a.send(pair.a.request_blob_range(D, 0, 1))
    # b never offered "have": a Have arriving anyway is the peer's fault.
    pair.b.receive_data(encode_message(Have("app", 1, True)))
    with pytest.raises(RemoteProtocolError, match="not offered"):
        drain(pair.b)


def test_have_flows_both_ways_once_open() -> None:
    pair = featured_pair()
    msg = Have("app", 3, False, (D,))
    assert pair.send(pair.a, msg) == [msg, NEED_DATA]
    assert pair.send(pair.b, Have("app", 3, True)) == [Have("app", 3, True), NEED_DATA]


def test_node_request_query_is_answered_only_by_node_request_data() -> None:
    pair = featured_pair()
    req = pair.a.request_node_request()
    assert pair.send(pair.a, req) == [req, NEED_DATA]
    answer = NodeRequestData(req.request_id, b"signed request")
    assert pair.send(pair.b, answer) == [answer, NEED_DATA]
    # A second answer to the same id (or a data frame nobody asked for) is the peer's fault.
    pair.a.receive_data(encode_message(NodeRequestData(req.request_id, b"again")))
    with pytest.raises(RemoteProtocolError):
        drain(pair.a)


def test_node_request_query_needs_the_request_feature() -> None:
    pair = featured_pair(b_features=frozenset({FEATURE_RANGE, FEATURE_HAVE}))
    assert not pair.a.supports(FEATURE_REQUEST)
    with pytest.raises(LocalProtocolError, match="feature"):
        pair.a.send(pair.a.request_node_request())
    pair.b.receive_data(encode_message(NodeRequestQuery(5)))
    with pytest.raises(RemoteProtocolError, match="not offered"):
        drain(pair.b)


# ----- platform variant keys (feature "variants") ---------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        Announce.from_holdings({"app": (2, D), "app@linux-aarch64": (2, D)}),
        ManifestRequest(7, "app@linux-aarch64", 2),
        Have("app@linux-aarch64", 2, True),
        HaveBits("app@linux-aarch64", 2, 0, b"\x01"),
    ],
)
def test_a_variant_key_flows_only_between_peers_that_both_speak_variants(msg: Message) -> None:
    both = FEATURES | {FEATURE_SWARM, FEATURE_VARIANTS}
    pair = featured_pair(both, both)
    assert pair.a.supports(FEATURE_VARIANTS)
    assert pair.send(pair.a, msg)[0] == msg
    # An older peer: we never send it one, and one arriving from it is its fault.
    older = featured_pair(both, both - {FEATURE_VARIANTS})
    with pytest.raises(LocalProtocolError, match="'variants'"):
        older.a.send(msg)
    older.b.receive_data(encode_message(msg))
    with pytest.raises(RemoteProtocolError, match="'variants' was not offered"):
        drain(older.b)
    # Plain component names are spoken to everyone, as before.
    plain = Have("app", 2, True)
    fresh = featured_pair(both, both - {FEATURE_VARIANTS})
    assert fresh.send(fresh.a, plain) == [plain, NEED_DATA]
