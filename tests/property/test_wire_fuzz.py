"""Hostile and random input for the frame decoder and the session.

Input from a peer may only ever raise ``RemoteProtocolError`` (a subclass of
``ProtocolError``): anything else escaping -- a msgpack exception, a
``TypeError``, or a ``LocalProtocolError`` -- would be a bug here. Each fuzz
target also holds a frame to its budget (``limits.FRAME_BUDGET``: memory per
input, ``_fuzz``); ``make fuzz`` runs them longer.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

from _fuzz import decode_cost, fuzz, hostile_msgpack, within_budget
from hypothesis import given
from hypothesis import strategies as st

from p2pupd.protocol import encoding, ids, limits
from p2pupd.protocol.errors import RemoteProtocolError
from p2pupd.protocol.session import Session, Signal
from p2pupd.protocol.wire import (
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
    FrameDecoder,
    Have,
    Hello,
    ManifestData,
    ManifestMissing,
    ManifestRangeData,
    ManifestRangeRequest,
    ManifestRequest,
    Message,
    RootData,
    RootMissing,
    RootRequest,
    decode_body,
    encode_message,
)

request_id = st.integers(0, MAX_REQUEST_ID)
serial = st.integers(1, MAX_SERIAL)
digest = st.binary(min_size=32, max_size=32)
blob = st.binary(max_size=512)
component = st.from_regex(ids.COMPONENT_RE, fullmatch=True)
visible = st.characters(categories=("L", "N", "P", "S"))
text = st.text(visible, max_size=40)
cluster = st.text(visible, min_size=1, max_size=16)
features = st.frozensets(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,31}", fullmatch=True), max_size=5)
entries = st.dictionaries(component, st.tuples(serial, digest), max_size=5).map(
    lambda d: tuple(AnnounceEntry(c, *d[c]) for c in sorted(d))
)

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Hello,
        st.binary(max_size=16),
        st.integers(0, MAX_REQUEST_ID),
        st.binary(min_size=16, max_size=16),
        cluster,
        st.integers(0, 65535),
        features,
    ),
    st.builds(Announce, entries),
    st.builds(ManifestRequest, request_id, component, serial),
    st.builds(ManifestData, request_id, blob),
    st.builds(ManifestMissing, request_id),
    st.builds(ChunkRequest, request_id, digest),
    st.builds(ChunkData, request_id, digest, blob),
    st.builds(ChunkMissing, request_id, digest),
    st.builds(RootRequest, request_id, serial),
    st.builds(RootData, request_id, serial, blob),
    st.builds(RootMissing, request_id),
    st.builds(Bye, text),
    st.builds(Error, st.integers(0, 65535), text),
    st.builds(BlobRangeRequest, request_id, digest, st.integers(0, 1 << 30), st.integers(1, 4096)),
    st.builds(BlobRangeData, request_id, digest, st.integers(0, 1 << 30), blob),
    st.builds(
        ManifestRangeRequest,
        request_id,
        component,
        serial,
        st.integers(0, 1 << 20),
        st.integers(1, 4096),
    ),
    st.builds(
        ManifestRangeData, request_id, st.integers(0, 1 << 20), st.integers(0, 1 << 20), blob
    ),
    st.builds(Have, component, serial, st.booleans(), st.lists(digest, max_size=4).map(tuple)),
    st.builds(ChunkBatchRequest, request_id, st.lists(digest, min_size=1, max_size=4).map(tuple)),
)

# Well-formed msgpack of arbitrary shape: exercises the schema checks rather
# than the msgpack parser.
msgpack_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def frame(value: Any) -> bytes:
    body = encoding.encode(value)
    return len(body).to_bytes(4, "big") + body


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@given(messages)
def test_round_trip(msg: Message) -> None:
    data = encode_message(msg)
    assert decode_body(data[4:]) == msg
    assert encode_message(decode_body(data[4:])) == data  # one encoding per value


@given(st.lists(messages, max_size=8), st.lists(st.integers(0, 10**6), max_size=12))
def test_split_anywhere_decodes_identically(msgs: list[Message], cuts: list[int]) -> None:
    stream = b"".join(encode_message(m) for m in msgs)
    decoder = FrameDecoder()
    got: list[Message] = []
    for piece in split(stream, cuts):
        decoder.feed(piece)
        got.extend(decoder)
    assert got == msgs


@fuzz(300)
@given(st.binary(max_size=2048), st.lists(st.integers(0, 10**6), max_size=6))
def test_random_bytes_raise_only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder()
    try:
        for piece in split(data, cuts):
            decoder.feed(piece)
            list(decoder)
        decoder.feed_eof()
        list(decoder)
    except RemoteProtocolError:  # the peer's fault; LocalProtocolError would be ours
        pass


@fuzz(300)
@given(st.lists(msgpack_values, min_size=1, max_size=4))
def test_random_msgpack_frames_raise_only_protocol_errors(values: list[Any]) -> None:
    decoder = FrameDecoder()
    for value in values:
        decoder.feed(frame(value))
    with contextlib.suppress(RemoteProtocolError):
        list(decoder)


@given(st.integers(0, 16), st.lists(st.integers(0, 2**32), min_size=1, max_size=6))
def test_random_type_codes_with_junk_fields(code: int, fields: list[int]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_body(encoding.encode([code, *fields]))


def open_session() -> Session:
    session = Session(b"A" * 16, "site")
    session.send_hello()
    session.receive_data(encode_message(Hello.create(b"B" * 16, "site")))
    assert isinstance(session.next_event(), Hello)
    return session


@fuzz(200)
@given(
    st.booleans(),
    st.lists(
        st.one_of(st.binary(min_size=1, max_size=256), messages.map(encode_message)), max_size=8
    ),
)
def test_session_survives_hostile_peer(handshake: bool, pieces: list[bytes]) -> None:
    session = open_session() if handshake else Session(b"A" * 16, "site")
    if handshake:
        session.send(session.request_chunk(b"\x01" * 32))  # something to answer
    try:
        for piece in pieces:
            session.receive_data(piece)
            while not isinstance(session.next_event(), Signal):
                pass
        session.receive_data(b"")
        while not isinstance(session.next_event(), Signal):
            pass
    except RemoteProtocolError:
        pass


@fuzz(60)
@given(st.one_of(hostile_msgpack, st.binary(max_size=4096)), st.integers(0, 2**32))
def test_hostile_frames_stay_within_the_frame_budget(body: bytes, code: int) -> None:
    """Frames of deep nesting and lying container headers, as a peer would
    send them: refused (or decoded) within ``limits.FRAME_BUDGET``."""
    frames = [body, b"\x93" + bytes([code % 20]) + body]  # [type code, ...] then the rest
    for b in frames:
        data = len(b).to_bytes(4, "big") + b if b else b""

        def run(data: bytes = data) -> None:
            decoder = FrameDecoder()
            decoder.feed(data)
            list(decoder)

        within_budget(run, len(data) + decode_cost(limits.FRAME_BUDGET, len(data)))
