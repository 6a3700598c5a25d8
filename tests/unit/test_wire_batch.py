"""The data-frame fast path of ``wire`` and the "batch" feature (wire and session)."""

from __future__ import annotations

import pytest

from p2pupd.protocol import encoding, limits
from p2pupd.protocol.errors import CodecError, LocalProtocolError, RemoteProtocolError, SchemaError
from p2pupd.protocol.session import NEED_DATA, Session, Signal, State
from p2pupd.protocol.wire import (
    FEATURE_BATCH,
    MAX_BATCH_DIGESTS,
    MAX_PAYLOAD_BYTES,
    MAX_REQUEST_ID,
    BlobRangeData,
    ChunkBatchRequest,
    ChunkData,
    ChunkMissing,
    ChunkRequest,
    FrameDecoder,
    Message,
    decode_body,
    encode_message,
    encode_parts,
)

D1, D2, D3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
IDS = [0, 1, 127, 128, 255, 256, 65535, 65536, MAX_REQUEST_ID]
SIZES = [0, 1, 255, 256, 65535, 65536, 70_000]


def generic(msg: Message, *fields: object) -> bytes:
    """The frame the generic canonical-msgpack encoder makes for these fields."""
    body = encoding.encode([msg.TYPE, *fields])
    return len(body).to_bytes(4, "big") + body


# ----- the fast path ---------------------------------------------------------------


@pytest.mark.parametrize("rid", IDS)
@pytest.mark.parametrize("size", SIZES)
def test_fast_chunk_data_is_the_canonical_encoding(rid: int, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    msg = ChunkData(rid, D1, data)
    frame = encode_message(msg)
    assert frame == generic(msg, rid, D1, data)
    assert decode_body(frame[4:]) == msg


@pytest.mark.parametrize("rid", IDS)
@pytest.mark.parametrize("offset", [0, 127, 128, 70_000, limits.MAX_BLOB_BYTES])
def test_fast_range_data_and_requests_are_canonical(rid: int, offset: int) -> None:
    piece = BlobRangeData(rid, D2, offset, b"piece")
    assert encode_message(piece) == generic(piece, rid, D2, offset, b"piece")
    assert decode_body(encode_message(piece)[4:]) == piece
    req = ChunkRequest(rid, D3)
    assert encode_message(req) == generic(req, rid, D3)
    assert decode_body(encode_message(req)[4:]) == req


def test_encode_parts_keeps_the_payload_apart() -> None:
    data = b"x" * 1000
    parts = encode_parts(ChunkData(7, D1, data))
    assert len(parts) == 2 and parts[1] is data  # never copied into a joined buffer
    assert b"".join(parts) == encode_message(ChunkData(7, D1, data))
    assert encode_parts(ChunkMissing(7, D1)) == (encode_message(ChunkMissing(7, D1)),)


@pytest.mark.parametrize(
    "body",
    [
        b"\x94\x07\xcc\x05\xc4\x20" + D1 + b"\xc4\x01x",
        b"\x94\x07\x05\xc4\x20" + D1 + b"\xc5\x00\x01x",
        b"\x94\x07\x05\xc4\x20" + D1 + b"\xc4\x01xy",
        b"\x94\x07\x05\xc4\x20" + D1 + b"\xc4\x02x",
        b"\x94\x07\x05\xc4\x1f" + D1[:31] + b"\xc4\x01x",
        b"\x93\x06\x05\xc4\x20" + D1 + b"\x00",
        b"\x95\x0f\x05\xc4\x20" + D1 + b"\xcd\x00\x10\xc4\x01x",
    ],
    ids=[
        "request-id-5-in-a-2-byte-form",
        "1-byte-payload-in-a-bin-16",
        "a-byte-past-the-payload",
        "payload-cut-short",
        "31-byte-digest",
        "chunk-request-with-a-trailing-byte",
        "range-offset-16-in-3-bytes",
    ],
)
def test_non_canonical_data_frames_are_refused(body: bytes) -> None:
    with pytest.raises(CodecError):  # the generic decoder's verdict, after the fast path
        decode_body(body)


def test_canonical_frame_with_a_field_out_of_range_is_a_schema_error() -> None:
    body = b"\x94\x07\xcf" + (1 << 40).to_bytes(8, "big") + b"\xc4\x20" + D1 + b"\xc4\x01x"
    with pytest.raises(SchemaError, match="ChunkData"):
        decode_body(body)
    big = bytes(MAX_PAYLOAD_BYTES + 1)
    body = b"\x94\x07\x01\xc4\x20" + D1 + b"\xc6" + len(big).to_bytes(4, "big") + big
    with pytest.raises(SchemaError, match="exceeds"):
        decode_body(body)


def test_decoder_copies_input_that_may_change_under_it() -> None:
    frame = bytearray(encode_message(ChunkData(1, D1, b"abc")))
    decoder = FrameDecoder()
    decoder.feed(frame)  # type: ignore[arg-type]
    frame[-1] = ord("z")  # the caller reuses its buffer
    assert decoder.next_message() == ChunkData(1, D1, b"abc")


def test_frames_split_across_reads_still_decode() -> None:
    frames = b"".join(encode_message(ChunkData(i, D1, bytes(300 * i))) for i in range(1, 4))
    decoder = FrameDecoder()
    for i in range(0, len(frames), 7):
        decoder.feed(frames[i : i + 7])
    assert [m.request_id for m in decoder] == [1, 2, 3]  # type: ignore[union-attr]


# ----- ChunkBatchRequest on the wire ------------------------------------------------


def test_batch_request_bounds() -> None:
    assert ChunkBatchRequest(1, (D1,) * MAX_BATCH_DIGESTS).batch[0] == D1
    with pytest.raises(LocalProtocolError, match="batch"):
        ChunkBatchRequest(1, ())
    with pytest.raises(LocalProtocolError, match="batch"):
        ChunkBatchRequest(1, (D1,) * (MAX_BATCH_DIGESTS + 1))
    with pytest.raises(LocalProtocolError, match="digest"):
        ChunkBatchRequest(1, (b"short",))


@pytest.mark.parametrize(
    "fields",
    [
        [1, []],  # empty
        [1, [D1] * (MAX_BATCH_DIGESTS + 1)],  # oversized
        [1, [b"\x01" * 31]],  # a digest of the wrong size
        [1, D1],  # not a list
        [1, [D1], 2],  # an extra field
    ],
)
def test_malformed_batch_requests_are_schema_errors(fields: list[object]) -> None:
    with pytest.raises(SchemaError, match="ChunkBatchRequest"):
        decode_body(encoding.encode([ChunkBatchRequest.TYPE, *fields]))


# ----- the batch in a session -------------------------------------------------------


def pair(a_batch: bool = True, b_batch: bool = True) -> tuple[Session, Session]:
    a = Session(b"A" * 16, "site", 0, frozenset({FEATURE_BATCH}) if a_batch else frozenset())
    b = Session(b"B" * 16, "site", 0, frozenset({FEATURE_BATCH}) if b_batch else frozenset())
    b.receive_data(a.send_hello())
    a.receive_data(b.send_hello())
    assert a.next_event() is not NEED_DATA and b.next_event() is not NEED_DATA
    assert a.state is b.state is State.OPEN
    return a, b


def events(session: Session) -> list[Message | Signal]:
    out: list[Message | Signal] = []
    while not isinstance(event := session.next_event(), Signal):
        out.append(event)
    return out


def test_a_batch_is_answered_in_order_and_holds_one_slot_until_the_last_answer() -> None:
    a, b = pair()
    req = a.request_chunk_batch((D1, D2, D3))
    b.receive_data(a.send(req))
    assert events(b) == [req]
    assert len(a.outstanding) == 1 and a.in_flight(req.request_id)
    answers = [ChunkData(req.request_id, D1, b"1"), ChunkMissing(req.request_id, D2)]
    a.receive_data(b.send(answers[0]) + b.send(answers[1]))
    assert events(a) == answers
    assert a.in_flight(req.request_id) and b.peer_outstanding  # D3 still due
    last = ChunkData(req.request_id, D3, b"3")
    a.receive_data(b.send(last))
    assert events(a) == [last]
    assert not a.in_flight(req.request_id) and not a.outstanding and not b.peer_outstanding
    # A further answer with the same id now answers nothing.
    a.receive_data(encode_message(ChunkData(req.request_id, D3, b"3")))
    with pytest.raises(RemoteProtocolError, match="no outstanding"):
        events(a)


def test_an_answer_out_of_turn_is_the_peers_fault() -> None:
    a, b = pair()
    req = a.request_chunk_batch((D1, D2))
    b.receive_data(a.send(req))
    events(b)
    with pytest.raises(LocalProtocolError, match="not the next one"):
        b.send(ChunkData(req.request_id, D2, b"2"))  # our own session will not send it
    a.receive_data(encode_message(ChunkData(req.request_id, D2, b"2")))
    with pytest.raises(RemoteProtocolError, match="not the next one"):
        events(a)
    assert a.state is State.ERROR


def test_batch_needs_the_feature_on_both_sides() -> None:
    a, b = pair(b_batch=False)
    assert not a.supports(FEATURE_BATCH)
    with pytest.raises(LocalProtocolError, match="feature"):
        a.send(a.request_chunk_batch((D1,)))
    b.receive_data(encode_message(ChunkBatchRequest(1, (D1,))))
    with pytest.raises(RemoteProtocolError, match="not offered"):
        events(b)


def test_batches_count_against_the_in_flight_cap() -> None:
    a = Session(b"A" * 16, "site", 0, frozenset({FEATURE_BATCH}), max_in_flight=2)
    b = Session(b"B" * 16, "site", 0, frozenset({FEATURE_BATCH}), max_in_flight=2)
    b.receive_data(a.send_hello())
    a.receive_data(b.send_hello())
    events(a), events(b)
    frames = b"".join(a.send(a.request_chunk_batch((D1, D2))) for _ in range(2))
    assert not a.can_request
    b.receive_data(frames + encode_message(ChunkBatchRequest(99, (D1,))))
    with pytest.raises(RemoteProtocolError, match="in flight"):
        events(b)


def test_answers_to_a_cancelled_batch_are_dropped_until_its_last() -> None:
    a, b = pair()
    req = a.request_chunk_batch((D1, D2))
    b.receive_data(a.send(req))
    events(b)
    a.cancel_request(req.request_id)
    a.receive_data(b.send(ChunkData(req.request_id, D1, b"1")))
    assert events(a) == [] and a.in_flight(req.request_id)
    a.receive_data(b.send(ChunkMissing(req.request_id, D2)))
    assert events(a) == [] and not a.in_flight(req.request_id)
