"""The two delta codecs and two packings, as a node applies them: for random old
bytes and random edits every form round-trips, the publisher's choice is the
smallest form it tried, and hostile bodies -- mutated HDiffPatch buffers
behind a valid container, sizes that do not fit the base or the target,
a packed body of another length than its header says -- end in
``HashMismatchError`` (or bytes the caller's hash check refuses), never in
another exception, a crash or an allocation the header chose."""

from __future__ import annotations

import zlib

import bsdiff4
import pytest
import zstandard
from _edits import base_bytes as _base_bytes
from _edits import edit_scripts, mutate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pupd.daemon.stage.delta import apply_patch
from p2pupd.protocol.deltaplan import (
    PATCH2_MAGIC,
    Codec,
    Packing,
    UnknownPatchCodecError,
    encode_patch2_header,
    parse_hdiff_header,
    parse_patch_header,
)
from p2pupd.protocol.errors import HashMismatchError
from p2pupd.protocol.patchcodec import (
    BSDIFF_MAX_INPUT_BYTES,
    encode_as,
    encode_best,
    pack_lzma2,
    packings_for,
)

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FORMS = [(c, p) for c in Codec for p in Packing]

edits = edit_scripts(max_len=3000, max_edits=6)


def base_bytes(seed: int, size: int) -> bytes:
    return _base_bytes(seed, size, runs=(20, 1500), word=b"entry %d; ", repeat=30)


@FAST
@given(st.integers(0, 2**16), st.integers(0, 120_000), edits)
def test_every_codec_and_packing_round_trips(
    seed: int, size: int, script: list[tuple[str, float, int, int]]
) -> None:
    old = base_bytes(seed, size)
    new = mutate(old, script)
    sizes = {}
    for codec, packing in FORMS:
        patch = encode_as(old, new, codec, packing)
        hdr = parse_patch_header(patch)
        assert (hdr.codec, hdr.packing, hdr.target_size) == (codec, packing, len(new))
        assert apply_patch(old, patch, len(new)) == new
        sizes[codec, packing] = len(patch)
    best = encode_best(old, new, bsdiff=True)
    assert best is not None
    assert apply_patch(old, best.data, len(new)) == new
    # The choice is the smallest of the forms the body sizes let it try.
    control, diff, extra = bsdiff4.core.diff(old, new)
    tried = [(Codec.HDIFFPATCH, p) for p in packings_for(len(raw_body(old, new)))]
    tried += [(Codec.BSDIFF4, p) for p in packings_for(len(control + diff + extra))]
    assert len(best.data) == min(sizes[f] for f in tried)


@FAST
@given(st.integers(0, 2**16), st.integers(1, 20_000), edits)
def test_small_inputs_try_bsdiff4_and_keep_the_smaller(
    seed: int, size: int, script: list[tuple[str, float, int, int]]
) -> None:
    old = base_bytes(seed, size)
    new = mutate(old, script)
    if len(old) + len(new) > BSDIFF_MAX_INPUT_BYTES:
        return
    best = encode_best(old, new)
    assert best is not None
    both = [encode_as(old, new, c, Packing.ZSTD) for c in Codec]
    assert len(best.data) <= min(map(len, both))


def hdiff_patch(old: bytes, new: bytes, raw: bytes, packing: Packing = Packing.ZSTD) -> bytes:
    """A valid v2 container around ``raw``, whatever ``raw`` holds."""
    body = pack_lzma2(raw) if packing is Packing.LZMA2 else zstd_frame(raw)
    return encode_patch2_header(Codec.HDIFFPATCH, packing, len(new), len(raw)) + body


def zstd_frame(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(raw)


def raw_body(old: bytes, new: bytes) -> bytes:
    patch = encode_as(old, new, Codec.HDIFFPATCH, Packing.ZSTD)
    hdr = parse_patch_header(patch)
    return zstandard.ZstdDecompressor().decompress(patch[hdr.body_offset :])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 2**16),
    st.integers(200, 30_000),
    edits,
    st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8),
    st.booleans(),
)
def test_mutated_hdiffpatch_bodies_fail_cleanly(
    seed: int,
    size: int,
    script: list[tuple[str, float, int, int]],
    flips: list[tuple[float, int]],
    lzma2: bool,
) -> None:
    old = base_bytes(seed, size)
    new = mutate(old, script)
    raw = bytearray(raw_body(old, new))
    head = parse_hdiff_header(bytes(raw)).header_size
    for frac, value in flips:  # the buffers only: the header is checked on its own
        if len(raw) > head:
            raw[head + int(frac * (len(raw) - head - 1))] = value
    patch = hdiff_patch(old, new, bytes(raw), Packing.LZMA2 if lzma2 else Packing.ZSTD)
    try:
        out = apply_patch(old, patch, len(new))
    except HashMismatchError:
        return
    assert len(out) == len(new)  # wrong bytes, maybe: the caller's hash check decides


def test_hdiffpatch_header_that_does_not_fit_is_refused_before_patching() -> None:
    old = base_bytes(1, 50_000)
    new = mutate(old, [("insert", 0.5, 100, 1)])
    raw = raw_body(old, new)
    # Target size as the manifest says, but the body claims another: refused
    # before HDiffPatch allocates what its header declares.
    other = raw_body(old, new + b"x")
    with pytest.raises(HashMismatchError, match="other sizes"):
        apply_patch(old, hdiff_patch(old, new, other), len(new))
    # A base of another length than the one the body was made for.
    with pytest.raises(HashMismatchError, match="other sizes"):
        apply_patch(old + b"!", hdiff_patch(old, new, raw), len(new))
    # A body whose header names a compressor (HDiffPatch would reach for it).
    named = raw.replace(b"HDIFF13&\0", b"HDIFF13&zstd\0", 1)
    with pytest.raises(HashMismatchError, match="not an uncompressed"):
        apply_patch(old, hdiff_patch(old, new, named), len(new))


@pytest.mark.parametrize("packing", list(Packing))
def test_packed_body_of_another_length_is_refused(packing: Packing) -> None:
    old = base_bytes(2, 40_000)
    new = mutate(old, [("replace", 0.3, 500, 2)])
    raw = raw_body(old, new)
    patch = hdiff_patch(old, new, raw, packing)
    hdr = parse_patch_header(patch)
    for claimed in (len(raw) - 1, len(raw) + 1):
        head = encode_patch2_header(Codec.HDIFFPATCH, packing, len(new), claimed)
        with pytest.raises(HashMismatchError):
            apply_patch(old, head + patch[hdr.body_offset :], len(new))


def test_unknown_codec_is_refused_with_one_line() -> None:
    patch = PATCH2_MAGIC + bytes((9, 1)) + b"\x10\x10" + zlib.compress(b"x")
    with pytest.raises(UnknownPatchCodecError) as exc:
        apply_patch(b"base", patch, 16)
    assert "codec 9" in str(exc.value) and "\n" not in str(exc.value)
