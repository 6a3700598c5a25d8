"""The budgets unverified bytes are decoded under (protocol/limits.py), rule by rule.

Each limit of a ``DecodeBudget`` or ``JsonBudget`` refuses the input that
breaks it, before building what it declares; the honest maxima (the largest
request file, Have and Announce frames, OCI index and artifact) stay inside
them; and a signed envelope's payload is never decoded before its signature
verified.
"""

from __future__ import annotations

import dataclasses
import json
import struct

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pupd.protocol import bundle as oci
from p2pupd.protocol import encoding, ids, limits, request
from p2pupd.protocol.deltaplan import CONTROL_SLACK_BYTES, encode_patch_header, parse_patch_header
from p2pupd.protocol.errors import (
    BadSignatureError,
    CodecError,
    FrameTooLargeError,
    SchemaError,
)
from p2pupd.protocol.trust import (
    RELEASE_TYPE,
    ROOT_TYPE,
    Envelope,
    Role,
    Root,
    TrustedRoot,
    key_id,
    sign,
)
from p2pupd.protocol.wire import (
    MAX_ANNOUNCE_ENTRIES,
    MAX_HAVE_DIGESTS,
    Announce,
    AnnounceEntry,
    Have,
    decode_body,
    encode_message,
)

TINY = limits.DecodeBudget(1024, 10, 2, 4, 8, 8, "tiny")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\xcc\x05", "shortest form"),  # uint8 for a fixint
        (b"\xcd\x00\xff", "shortest form"),
        (b"\xd0\xff", "shortest form"),  # int8 for a negative fixint
        (b"\xd0\x05", "shortest form"),  # a positive value in a signed form
        (b"\xd9\x01a", "shortest form"),  # str8 for a fixstr
        (b"\xc5\x00\x01a", "shortest form"),  # bin16 for a bin8
        (b"\xdc\x00\x01\x01", "shortest form"),  # array16 of 1
        (b"\xde\x00\x01\xa1a\x01", "shortest form"),
        (b"\x82\xa1b\x01\xa1a\x02", "canonical order"),
        (b"\x82\xa1a\x01\xa1a\x02", "canonical order"),  # a key twice
        (b"\x81\x01\x02", "not a string"),
        (b"\xcb" + bytes(8), "floats"),
        (b"\xd4\x01\x00", "not allowed"),  # fixext
        (b"\xc1", "not allowed"),
        (b"\x01\x02", "after its value"),
        (b"\x92\x01", "input ends first"),
        (b"\xa3ab", "truncated"),
        (b"\xa2\xff\xfe", "not UTF-8"),
        (b"", "truncated"),
    ],
)
def test_non_canonical_and_malformed_input_is_refused(data: bytes, words: str) -> None:
    with pytest.raises(CodecError, match=words):
        encoding.decode(data)


@pytest.mark.parametrize(
    ("value", "error", "words"),
    [
        ([[1, 2], [3, 4], [5, 6], [7, 8]], FrameTooLargeError, "more than 10 values"),
        ([[[]]], CodecError, "nests deeper than 2"),
        ([1, 2, 3, 4, 5], FrameTooLargeError, "container of 5 entries"),
        ("x" * 9, FrameTooLargeError, "str of 9 bytes"),
        (b"x" * 9, FrameTooLargeError, "bin of 9 bytes"),
    ],
)
def test_each_limit_of_a_budget_refuses(value: object, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        encoding.decode(encoding.encode(value), budget=TINY)


def test_values_are_counted_before_they_are_built() -> None:
    budget = dataclasses.replace(TINY, max_len=100, max_objects=5)
    assert encoding.decode(encoding.encode([1, 2, 3, 4]), budget=budget) == [1, 2, 3, 4]
    with pytest.raises(FrameTooLargeError, match="more than 5 values"):
        encoding.decode(encoding.encode([1, 2, 3, 4, 5]), budget=budget)


def test_a_header_cannot_declare_more_entries_than_bytes_follow() -> None:
    """A 5-byte header claiming a million entries is refused at once, not after a
    million appends (or a preallocation) fail."""
    data = b"\xdd" + struct.pack(">I", 1_000_000) + b"\x80" * 10
    with pytest.raises(CodecError, match="input ends first"):
        encoding.decode(data)


def test_input_over_the_byte_limit_is_refused_before_parsing() -> None:
    with pytest.raises(FrameTooLargeError, match="2000 bytes exceeds limit 1024"):
        encoding.decode(b"\xc0" * 2000, budget=TINY)
    with pytest.raises(FrameTooLargeError, match="exceeds limit 10"):
        encoding.decode(encoding.encode("x" * 20), 10)


def test_the_stated_memory_bound_covers_input_copies_and_objects() -> None:
    b = limits.ENVELOPE_BUDGET
    assert b.memory_bytes == 2 * b.max_bytes + b.max_objects * limits.DECODED_OBJECT_BYTES
    assert b.capped(1000).max_bytes == 1000 and b.capped(1000).max_bin == 1000


# -- envelopes: the payload is raw bytes until its signature verified --------------------

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUB = KEY.public_key().public_bytes_raw()
KID = key_id(PUB)
ROOT = sign(
    ROOT_TYPE,
    Root(1, {KID: PUB}, {"root": Role((KID,), 1), "release": Role((KID,), 1)}).encode(),
    [KEY],
).encode()


def test_an_envelope_builds_only_its_own_fields() -> None:
    """The payload may be anything (here: a lying msgpack header); the envelope
    decodes, and its payload stays bytes."""
    payload = b"\xdd\xff\xff\xff\xff" + b"\x80" * 100
    env = Envelope.decode(Envelope(payload, ((KID, bytes(64)),)).encode(), 1 << 20)
    assert env.payload == payload


def test_an_envelope_with_more_than_its_fields_is_refused_within_its_budget() -> None:
    doc = encoding.encode({"signatures": [[[]] * 64] * 64, "signed": b""})
    with pytest.raises((FrameTooLargeError, CodecError)):
        Envelope.decode(doc, 1 << 20)


def test_a_release_payload_is_not_decoded_before_its_signature_verifies() -> None:
    """Garbage that would fail to decode, signed by nobody: the refusal is the
    signature's, so the payload was never decoded."""
    trusted = TrustedRoot.load(ROOT)
    forged = Envelope(b"\xdd\xff\xff\xff\xff", ((KID, bytes(64)),)).encode()
    with pytest.raises(BadSignatureError):
        trusted.verify_release(forged, None)
    good = sign(RELEASE_TYPE, b"\xdd\xff\xff\xff\xff", [KEY]).encode()
    with pytest.raises((CodecError, FrameTooLargeError)):  # signed: only now is it decoded
        trusted.verify_release(good, None)


# -- the honest maxima fit -----------------------------------------------------------


def test_request_budget_counts_the_largest_request() -> None:
    per_file = 2 + 2 * 13  # the map, its 13 keys and their values
    most = (
        per_file
        + request.MAX_EXTRA_BLOBS
        + 6 * request.MAX_REQUEST_RELEASES
        + 4 * request.MAX_REQUEST_COMPONENTS
    )
    assert most <= limits.REQUEST_MAX_OBJECTS
    assert limits.REQUEST_BUDGET.max_len >= request.MAX_EXTRA_BLOBS
    assert limits.SITE_REQUEST_BUDGET.max_len >= request.MAX_SITE_NODES


def test_the_largest_have_and_announce_frames_decode() -> None:
    have = Have(
        "app", 1, False, tuple(ids.sha256(i.to_bytes(4, "big")) for i in range(MAX_HAVE_DIGESTS))
    )
    assert decode_body(encode_message(have)[4:]) == have
    entries = tuple(
        AnnounceEntry(f"c{i:04}", 2**40, ids.sha256(bytes(4))) for i in range(MAX_ANNOUNCE_ENTRIES)
    )
    ann = Announce(entries)
    assert decode_body(encode_message(ann)[4:]) == ann


def test_a_frame_of_many_small_values_is_refused_at_its_budget() -> None:
    body = msgpack.packb([19, [0] * 30_000, [0] * 30_000])
    with pytest.raises(FrameTooLargeError, match="more than 40000 values"):
        decode_body(body)


def _descriptor(i: int) -> oci.Descriptor:
    return oci.Descriptor(oci.CHUNK_MEDIA_TYPE, ids.sha256(i.to_bytes(4, "big")), 65536)


def test_an_honest_artifact_of_many_layers_fits_its_json_budget() -> None:
    first = oci.Descriptor(oci.RELEASE_MEDIA_TYPE, ids.sha256(b"e"), 1000)
    layers = (first, *(_descriptor(i) for i in range(50_000)))
    data = oci.build_artifact(
        oci.Artifact(oci.RELEASE_ARTIFACT, layers, {"org.p2pupd.component": "a"})
    )
    assert len(oci.parse_artifact(data).layers) == 50_001
    assert oci.json_values_bound(data) <= limits.ARTIFACT_JSON_BUDGET.values_allowed(len(data))


def test_an_honest_full_index_fits_its_json_budget() -> None:
    ann = {oci.ANNOTATION_COMPONENT: "a", oci.ANNOTATION_VERSION: "1", oci.ANNOTATION_SERIAL: "1",
           oci.ANNOTATION_PLATFORM: "linux-x86_64", oci.ANNOTATION_REF_NAME: "a-1"}  # fmt: skip
    mans = [
        oci.Descriptor(oci.MANIFEST_MEDIA_TYPE, ids.sha256(i.to_bytes(4, "big")), 500, ann)
        for i in range(oci.MAX_INDEX_ENTRIES)
    ]
    assert len(oci.parse_index(oci.build_index(mans))) == oci.MAX_INDEX_ENTRIES


@pytest.mark.parametrize(
    "doc",
    [
        b'{"layers":[' + b",".join([b"{}"] * 5000) + b"]}",  # 3 bytes a value
        b"[" + b",".join([b"0"] * 5000) + b"]",
        json.dumps({"a": [[]] * 3000}).encode(),
    ],
)
def test_json_denser_than_honest_metadata_is_refused_before_parsing(doc: bytes) -> None:
    with pytest.raises(FrameTooLargeError, match="JSON values"):
        oci.parse_artifact(doc)


def test_json_floats_and_constants_are_refused() -> None:
    for doc in (b'{"schemaVersion":2.0}', b'{"size":NaN}', b'{"size":1e400}'):
        with pytest.raises(CodecError, match="not valid JSON"):
            oci.parse_artifact(doc)


# -- patches and packs -----------------------------------------------------------


def test_a_patch_header_may_not_declare_a_control_block_beyond_its_target() -> None:
    target = 1 << 20
    ok = (target + CONTROL_SLACK_BYTES) // 24 * 24
    assert (
        parse_patch_header(encode_patch_header(target, ok, 0)).max_body_size
        <= 3 * target + CONTROL_SLACK_BYTES
    )
    with pytest.raises(SchemaError, match="inconsistent"):
        parse_patch_header(encode_patch_header(target, ok + 24, 0))


def test_a_pack_may_not_list_more_entries_than_the_manifest_names() -> None:
    data = oci.build_pack([b"a", b"b", b"c"])
    named = {ids.sha256(b"a"): 1, ids.sha256(b"b"): 1}
    with pytest.raises(SchemaError, match="more than the 2 blobs"):
        oci.pack_entries(data, named)
    with pytest.raises(SchemaError, match="not part of the signed release"):
        oci.pack_entries(oci.build_pack([b"a", b"z"]), named)
    assert [e.size for e in oci.pack_entries(oci.build_pack([b"a", b"b"]), named)] == [1, 1]
