"""Property tests of the pure core: canonical encoding, chunking, decoders."""

from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pupd.protocol import bundle, chunking, encoding, limits
from p2pupd.protocol.errors import P2pupdError, ProtocolError, VerificationError
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.trust import Envelope, TrustedRoot

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=30,
)


@given(values)
def test_encoding_round_trips(v: Any) -> None:
    data = encoding.encode(v)
    assert encoding.decode(data) == v


@given(values)
def test_encoding_is_byte_stable(v: Any) -> None:
    data = encoding.encode(v)
    assert encoding.encode(encoding.decode(data)) == data


@given(
    st.dictionaries(st.text(max_size=8), st.integers(0, 100), min_size=2, max_size=8), st.randoms()
)
def test_map_order_does_not_change_bytes(d: dict[str, int], rnd: random.Random) -> None:
    items = list(d.items())
    rnd.shuffle(items)
    assert encoding.encode(dict(items)) == encoding.encode(d)


def test_non_canonical_forms_are_refused() -> None:
    import msgpack

    with pytest.raises(ProtocolError):  # keys out of order
        encoding.decode(msgpack.packb({"b": 1, "a": 2}))
    with pytest.raises(ProtocolError):  # an int in a wider encoding than needed
        encoding.decode(b"\xcd\x00\x01")
    with pytest.raises(ProtocolError):  # floats
        encoding.decode(msgpack.packb(1.5))
    with pytest.raises(ProtocolError):  # trailing bytes
        encoding.decode(encoding.encode(1) + b"\x00")


DECODERS = {
    "canonical": encoding.decode,
    "manifest": Manifest.decode,
    "envelope": lambda b: Envelope.decode(b, limits.MAX_MANIFEST_BYTES),
    "root": TrustedRoot.load,
    "index": bundle.parse_index,
    "artifact": bundle.parse_artifact,
    "layout": bundle.parse_layout,
    "pack": bundle.pack_entries,
}


@pytest.mark.parametrize("name", sorted(DECODERS))
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_random_bytes_raise_only_typed_errors(name: str, data: bytes) -> None:
    with contextlib.suppress(ProtocolError, VerificationError):
        DECODERS[name](data)


@settings(max_examples=300)
@given(body=st.binary(max_size=300))
def test_a_pack_parses_to_entries_that_tile_it_or_is_refused(body: bytes) -> None:
    """Behind a valid magic, any bytes either parse to entries laid end to end
    up to the last byte -- no overlap, no gap, nothing past the end -- or raise
    a typed error."""
    data = bundle.PACK_MAGIC + body
    try:
        entries = bundle.parse_pack(data)
    except ProtocolError:
        return
    assert entries and all(n <= bundle.PACK_BLOB_MAX_BYTES for _, n in entries)
    ends = [o + n for o, n in entries]
    assert [o for o, _ in entries[1:]] == ends[:-1] and ends[-1] == len(data)


@settings(max_examples=100)
@given(blobs=st.lists(st.binary(max_size=64), min_size=1, max_size=20, unique=True))
def test_pack_round_trip(blobs: list[bytes]) -> None:
    data = bundle.build_pack(blobs)
    assert [data[e.offset : e.offset + e.size] for e in bundle.pack_entries(data)] == blobs


@pytest.mark.parametrize("name", ["manifest", "envelope", "root"])
@settings(max_examples=300)
@given(v=values)
def test_well_formed_msgpack_of_wrong_shape_raises_typed_errors(name: str, v: Any) -> None:
    with contextlib.suppress(P2pupdError):
        DECODERS[name](encoding.encode(v))


# -- chunking --------------------------------------------------------------------


def test_chunk_boundaries_test_vector() -> None:
    """Chunk boundaries are part of the format: this pins them."""
    data = random.Random(20261123).randbytes(2_000_000)
    cuts = list(chunking.cut(data))
    assert cuts[:3] == [(0, 66271), (66271, 77081), (143352, 47302)]
    assert hashlib.sha256(repr(cuts).encode()).hexdigest() == (
        "655c902e981cec101930cacde1ebc013dc19972614b717398df2bbcaa69d9a6a"
    )


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    where=st.floats(0.05, 0.75),
    insert=st.binary(min_size=1, max_size=5000),
)
def test_boundaries_realign_after_insertion(seed: int, where: float, insert: bytes) -> None:
    data = random.Random(seed).randbytes(2_500_000)
    pos = int(len(data) * where)
    changed = data[:pos] + insert + data[pos:]
    old = {data[o : o + n] for o, n in chunking.cut(data)}
    new_chunks = [(o, changed[o : o + n]) for o, n in chunking.cut(changed)]
    # Every chunk that starts well after the insertion (one max-size chunk of
    # slack for the boundary to resynchronise) is identical to an old chunk.
    after = [c for o, c in new_chunks if o > pos + len(insert) + limits.CHUNK_MAX_BYTES]
    assert after, "test data too short"
    assert all(c in old for c in after)
    # ...and so is every chunk that ends before it. FastCDC decides a cut after
    # hashing the byte *at* the cut, so a chunk ending exactly at the insertion
    # may differ: the byte after a chunk is part of its boundary.
    before = [c for o, c in new_chunks if o + len(c) < pos]
    assert all(c in old for c in before)


@settings(max_examples=20, deadline=None)
@given(st.binary(max_size=600_000))
def test_chunk_sizes_bounded_and_cover_input(data: bytes) -> None:
    cuts = list(chunking.cut(data))
    assert sum(n for _, n in cuts) == len(data)
    pos = 0
    for i, (o, n) in enumerate(cuts):
        assert o == pos
        pos += n
        assert n <= limits.CHUNK_MAX_BYTES
        if i < len(cuts) - 1:
            assert n >= limits.CHUNK_MIN_BYTES
