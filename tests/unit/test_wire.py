"""Wire messages and the incremental frame decoder."""

from __future__ import annotations

import pytest

from p2pupd.protocol import PROTOCOL_VERSION, encoding, limits
from p2pupd.protocol.errors import (
    CodecError,
    FrameTooLargeError,
    LocalProtocolError,
    RemoteProtocolError,
    SchemaError,
)
from p2pupd.protocol.wire import (
    MAGIC,
    MAX_HAVE_DIGESTS,
    MAX_PAYLOAD_BYTES,
    MAX_RANGE_BYTES,
    MAX_REQUEST_ID,
    MAX_SERIAL,
    Announce,
    AnnounceEntry,
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
    PeerAddr,
    Ping,
    Proof,
    RootData,
    RootMissing,
    RootRequest,
    Shuffle,
    ViewFull,
    decode_body,
    encode_message,
)

NODE = bytes(range(16))
D1 = b"\x01" * 32
D2 = b"\x02" * 32

EXAMPLES: list[Message] = [
    Hello.create(NODE, "plant-7", 7070, frozenset({"delta", "roots"})),
    Announce.from_holdings({"app": (3, D1), "base": (12, D2)}),
    Announce(()),
    ManifestRequest(1, "app", 4),
    ManifestData(2, b"signed envelope"),
    ManifestMissing(3),
    ChunkRequest(4, D1),
    ChunkData(5, D1, b"chunk bytes"),
    ChunkMissing(6, D2),
    RootRequest(7, 2),
    RootData(8, 2, b"root"),
    RootMissing(9),
    Bye("shutting down"),
    Bye(),
    Error(400, "bad request"),
    BlobRangeRequest(10, D1, 4 * limits.MiB, limits.MiB),
    BlobRangeData(11, D1, 4 * limits.MiB, b"piece"),
    ManifestRangeRequest(12, "app", 3, 0, MAX_RANGE_BYTES),
    ManifestRangeData(13, 0, 9, b"first"),
    Have("app", 3, True),
    Have("app", 3, False, (D1, D2)),
    NodeRequestQuery(14),
    NodeRequestData(15, b"signed request"),
    ChunkBatchRequest(16, (D1, D2)),
    Hello.create(NODE, "plant-7", 7070, frozenset({"proof"}), b"k" * 32, b"c" * 32),
    Proof(b"s" * 64, "169.254.77.3"),
    Proof(b"s" * 64, ""),
    Ping(),
    Neighbor(2),
    ForwardJoin("10.0.0.7", 7707, 4),
    Shuffle(False, (PeerAddr("10.0.0.1", 7707), PeerAddr("fe80::1", 7707))),
    Shuffle(True, ()),
    ViewFull((PeerAddr("10.0.0.2", 1),)),
    HaveBits("app", 3, 0, b""),
    HaveBits("app", 3, 2, b"\x81\x00\x01"),
    HaveBits("a" * 40, 1 << 40, 70000, b"\xff" * 300),
    # Release keys of platform variants (feature "variants"), up to their longest.
    HaveBits("a" * 64 + "@" + "b" * 32, 3, 0, b"\x01"),
    Have("app@linux-aarch64", 2, True),
    ManifestRequest(5, "app@linux-aarch64", 2),
    Announce.from_holdings({"app": (2, D1), "app@linux-aarch64": (2, D2)}),
]


def frame(value: object) -> bytes:
    body = encoding.encode(value)
    return len(body).to_bytes(4, "big") + body


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    data = encode_message(msg)
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert encoding.decode(data[4:])[0] == msg.TYPE
    assert decode_body(data[4:]) == msg


def test_type_codes_are_unique() -> None:
    codes = {type(m).TYPE for m in EXAMPLES}
    assert len(codes) == len({type(m) for m in EXAMPLES}) == 28


def test_hello_create_uses_our_magic_and_version() -> None:
    hello = Hello.create(NODE, "c")
    assert hello.magic == MAGIC
    assert hello.protocol_version == PROTOCOL_VERSION


def test_announce_from_holdings_is_sorted() -> None:
    announce = Announce.from_holdings({"zeta": (1, D1), "alpha": (2, D2)})
    assert [e.component for e in announce.entries] == ["alpha", "zeta"]
    assert announce.entries[0] == AnnounceEntry("alpha", 2, D2)


@pytest.mark.parametrize(
    "build",
    [
        lambda: ChunkRequest(1, b"\x00" * 31),
        lambda: ChunkRequest(True, D1),  # bool is not an id
        lambda: ChunkRequest(-1, D1),
        lambda: ChunkRequest(1 << 32, D1),
        lambda: ManifestRequest(1, "App", 1),  # upper case component
        lambda: ManifestRequest(1, "app", 0),  # serials start at 1
        lambda: Hello(MAGIC, 1, b"short", "c", 0),
        lambda: Hello(MAGIC, 1, NODE, " padded", 0),
        lambda: Hello(MAGIC, 1, NODE, "", 0),
        lambda: Hello(MAGIC, 1, NODE, "c", 70000),
        lambda: Hello(MAGIC, 1, NODE, "c", 0, frozenset({"Bad Feature"})),
        lambda: Bye("line\nbreak"),
        lambda: Error(1, "x" * 2000),
        lambda: ChunkData(1, D1, b"x" * (MAX_PAYLOAD_BYTES + 1)),
        lambda: RootData(1, 1, b"x" * (limits.MAX_ROOT_BYTES + 1)),
        lambda: Announce((("b", 1, D1), ("a", 1, D2))),  # unsorted
        lambda: Announce((("a", 1, D1), ("a", 2, D2))),  # duplicate component
        lambda: Announce((("a", 1),)),  # type: ignore[arg-type]
        lambda: BlobRangeRequest(1, D1, 0, 0),  # empty range
        lambda: BlobRangeRequest(1, D1, 0, MAX_RANGE_BYTES + 1),
        lambda: BlobRangeRequest(1, D1, limits.MAX_BLOB_BYTES + 1, 1),
        lambda: BlobRangeData(1, D1, 0, b"x" * (MAX_RANGE_BYTES + 1)),
        lambda: ManifestRangeData(1, 0, limits.MAX_MANIFEST_BYTES + 1, b""),
        lambda: Have("app", 1, 1, ()),  # type: ignore[arg-type]
        lambda: Have("app", 1, False, [D1]),  # type: ignore[arg-type]
        lambda: Have("app", 1, False, (b"short",)),
        lambda: Have("app", 1, False, (D1,) * (MAX_HAVE_DIGESTS + 1)),
        lambda: NodeRequestQuery(-1),
        lambda: Have("app@", 1, True),  # a release key names a platform after '@'
        lambda: Have("app@linux-aarch64@x", 1, True),
        lambda: ManifestRequest(1, "app@Linux", 1),
        lambda: HaveBits("a" * 65 + "@x", 1, 0, b""),
        lambda: NodeRequestData(1, "text"),  # type: ignore[arg-type]
        lambda: NodeRequestData(1, b"x" * (MAX_PAYLOAD_BYTES + 1)),
    ],
)
def test_invalid_fields_refused_on_construction(build: object) -> None:
    with pytest.raises(LocalProtocolError):
        build()  # type: ignore[operator]


def test_plain_tuples_are_normalised_to_entries() -> None:
    announce = Announce((("a", 1, D1),))  # type: ignore[arg-type]
    assert isinstance(announce.entries[0], AnnounceEntry)
    assert announce.entries[0].manifest_digest == D1


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ([6, 1, b"\x00" * 31], SchemaError),  # short digest
        ([6, 1], SchemaError),  # missing field
        ([6, 1, D1, b"extra"], SchemaError),  # extra field
        ([99, 1], SchemaError),  # unknown type
        ([True, 1, D1], SchemaError),  # bool type code
        ({"type": 6}, SchemaError),  # not an array
        ([], SchemaError),
        ([12, 5], SchemaError),  # Bye reason not text
        ([2, [["b", 1, D1], ["a", 1, D2]]], SchemaError),  # unsorted announce
        ([2, [["a", 1]]], SchemaError),
        ([2, "a"], SchemaError),
        ([1, MAGIC, 1, NODE, "c", 0, ["b", "a"]], SchemaError),  # unsorted features
        ([1, MAGIC, 1, NODE, "c", 0, [["x"]]], SchemaError),  # unhashable feature
        ([1, MAGIC, 1, NODE, "c", 0, ["a", 1]], SchemaError),  # mixed types
        ([18, "app", 1, False, D1], SchemaError),  # Have digests not a list
        ([18, "app", 1, 0, []], SchemaError),  # Have complete not a bool
        ([14, 1, D1, 0], SchemaError),  # range request without length
    ],
)
def test_bad_bodies_raise_schema_error(value: object, error: type[Exception]) -> None:
    decoder = FrameDecoder()
    decoder.feed(frame(value))
    with pytest.raises(error):
        decoder.next_message()


def test_newer_hello_with_extra_fields_still_decodes() -> None:
    # A future version may append Hello fields; we must still read the version
    # to tell the user why we refuse the peer.
    msg = decode_body(encoding.encode([1, MAGIC, 9, NODE, "c", 0, [], "future", 42]))
    assert isinstance(msg, Hello)
    assert msg.protocol_version == 9


def test_non_canonical_msgpack_is_refused() -> None:
    body = b"\x93\x06\xcd\x00\x01\xc4\x20" + D1  # request id 1 as uint16: not minimal
    with pytest.raises(CodecError):
        decode_body(body)


def test_decoder_byte_by_byte_matches_whole() -> None:
    stream = b"".join(encode_message(m) for m in EXAMPLES)
    decoder = FrameDecoder()
    got = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        got.extend(decoder)
    assert got == EXAMPLES
    assert decoder.buffered_bytes == 0


def test_a_received_chunk_is_a_view_of_its_read_not_a_copy() -> None:
    """A whole ChunkData frame in one read keeps a view of that read; one that
    spans reads is assembled once, and its payload is a view of that copy."""
    chunks = [ChunkData(i, bytes([i]) * 32, bytes([i]) * (1000 + i)) for i in range(1, 4)]
    read = b"".join(encode_message(c) for c in chunks)
    decoder = FrameDecoder()
    decoder.feed(read)
    got = list(decoder)
    assert got == chunks
    for msg in got:
        assert isinstance(msg, ChunkData) and isinstance(msg.data, memoryview)
        assert msg.data.obj is read and msg.data.readonly
    split = len(read) - 500  # the last frame arrives in two reads
    decoder.feed(read[:split])
    decoder.feed(read[split:])
    *_, last = list(decoder)
    assert isinstance(last, ChunkData) and last == chunks[-1]
    assert isinstance(last.data, memoryview) and len(last.data.obj) < len(read)  # type: ignore[arg-type]
    assert encode_message(last) == encode_message(chunks[-1])  # sent on as it came


def test_a_small_chunk_padded_with_other_frames_is_copied_out_of_its_read() -> None:
    """A view keeps its whole read alive: where chunks are less than half of a
    read, they are copies, so a few bytes of chunk never pin a MiB."""
    chunk = ChunkData(1, D1, b"c" * 1000)
    padding = ManifestRangeData(2, 0, 200_000, b"p" * 100_000)
    decoder = FrameDecoder()
    padded = encode_message(chunk) + encode_message(padding)
    decoder.feed(padded)
    got, _ = list(decoder)
    assert got == chunk
    assert isinstance(got, ChunkData) and got.data.obj is not padded  # type: ignore[union-attr]
    mostly = encode_message(chunk) + encode_message(ChunkData(3, D2, b"d" * 900))
    decoder.feed(mostly)
    first, _ = list(decoder)
    assert isinstance(first, ChunkData) and first.data.obj is mostly  # type: ignore[union-attr]


def test_oversized_length_refused_before_body_is_buffered() -> None:
    decoder = FrameDecoder()
    decoder.feed((limits.MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
    decoder.feed(b"\x00" * (1 << 20))
    assert decoder.buffered_bytes == 0  # nothing of the claimed body was kept
    with pytest.raises(FrameTooLargeError):
        decoder.next_message()


def test_frame_at_limit_is_accepted_and_one_over_is_not() -> None:
    decoder = FrameDecoder(max_frame_bytes=100)
    body = encoding.encode([12, "x" * 96])
    assert len(body) == 100
    decoder.feed(len(body).to_bytes(4, "big") + body)
    assert decoder.next_message() == Bye("x" * 96)
    decoder.feed((101).to_bytes(4, "big"))
    with pytest.raises(FrameTooLargeError):
        decoder.next_message()


def test_empty_frame_is_an_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00\x00\x00")
    with pytest.raises(SchemaError):
        decoder.next_message()


def test_messages_before_a_bad_frame_are_delivered_first() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_message(Bye("a")) + b"\xff\xff\xff\xff")
    assert decoder.next_message() == Bye("a")
    with pytest.raises(FrameTooLargeError):
        decoder.next_message()


def test_decoder_stays_poisoned() -> None:
    decoder = FrameDecoder()
    decoder.feed(frame([99]))
    for _ in range(2):
        with pytest.raises(SchemaError):
            decoder.next_message()
    decoder.feed(encode_message(Bye()))  # ignored: no boundary to trust any more
    with pytest.raises(SchemaError):
        decoder.next_message()


def test_eof_in_middle_of_frame_is_an_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_message(Bye("bye"))[:-1])
    assert decoder.next_message() is None
    decoder.feed_eof()
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()


def test_eof_at_boundary_is_clean_and_feeding_after_it_is_our_bug() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_message(Bye()))
    decoder.feed_eof()
    assert decoder.eof
    assert decoder.next_message() == Bye()
    assert decoder.next_message() is None
    with pytest.raises(LocalProtocolError):
        decoder.feed(b"x")


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(LocalProtocolError):
        encode_message("hello")  # type: ignore[arg-type]


def test_largest_range_piece_fits_in_a_frame() -> None:
    msg = BlobRangeData(MAX_REQUEST_ID, D1, limits.MAX_BLOB_BYTES, b"x" * MAX_RANGE_BYTES)
    assert len(encode_message(msg)) <= limits.MAX_FRAME_BYTES + 4
    have = Have("a" * 64, MAX_SERIAL, False, (D1,) * MAX_HAVE_DIGESTS)
    assert len(encode_message(have)) <= limits.MAX_FRAME_BYTES + 4


def test_hello_without_proof_fields_is_an_older_hello_byte_for_byte() -> None:
    # Peers of the previous release decode exactly six fields; a node that
    # does not offer "proof" must still send them nothing else.
    body = encode_message(Hello.create(NODE, "c", 1))[4:]
    assert encoding.decode(body) == [1, MAGIC, PROTOCOL_VERSION, NODE, "c", 1, []]
    old = decode_body(encoding.encode([1, MAGIC, PROTOCOL_VERSION, NODE, "c", 1, []]))
    assert isinstance(old, Hello) and old.public_key == b"" and old.challenge == b""


@pytest.mark.parametrize(
    "build",
    [
        lambda: Hello.create(NODE, "c", 0, frozenset(), b"short", b"c" * 32),
        lambda: Hello.create(NODE, "c", 0, frozenset(), b"k" * 32, b"tiny"),
        lambda: Proof(b"s" * 63, ""),
        lambda: Proof(b"s" * 64, "not-an-ip!"),
        lambda: Neighbor(4),
        lambda: ForwardJoin("example.com", 7707, 1),  # names are never resolved
        lambda: ForwardJoin("10.0.0.1", 0, 1),
        lambda: ForwardJoin("10.0.0.1", 7707, 16),
        lambda: Shuffle(False, tuple(PeerAddr("10.0.0.1", p) for p in range(1, 34))),
        lambda: HaveBits("app", 1, 0, b"\x00" * (64 * 1024 + 1)),
    ],
)
def test_new_messages_refuse_bad_fields(build: object) -> None:
    with pytest.raises(LocalProtocolError):
        build()  # type: ignore[operator]


def test_have_bits_hot_path_matches_the_generic_encoding() -> None:
    for msg in (
        HaveBits("app", 1, 0, b""),
        HaveBits("x" * 33, 300, 1 << 16, b"\x01" * 999),
        HaveBits("app@linux-aarch64", 2, 0, b"\x03"),
    ):
        generic = encoding.encode([msg.TYPE, msg.component, msg.serial, msg.offset, msg.bits])
        assert encode_message(msg)[4:] == generic
        assert decode_body(generic) == msg
    # A component that is not a valid name is refused on the hot path too.
    body = encoding.encode([26, "Bad Name", 1, 0, b""])
    with pytest.raises(SchemaError):
        decode_body(body)
