"""The patch containers' headers (protocol.deltaplan): v1 and v2 round trip, every
size is bounded by the target before a node allocates, an unknown codec or
packing id is refused by name, and an HDiffPatch body header is checked
against what p2pupd writes (no compressor, buffers filling the body)."""

from __future__ import annotations

import pytest

from p2pupd.protocol import limits
from p2pupd.protocol.deltaplan import (
    HDIFF_MAGIC,
    HDIFF_RAW_SLACK_BYTES,
    PATCH2_MAGIC,
    Codec,
    Packing,
    UnknownPatchCodecError,
    encode_patch2_header,
    encode_patch_header,
    lzma2_dict_size,
    max_raw_size,
    parse_hdiff_header,
    parse_patch_header,
)
from p2pupd.protocol.errors import SchemaError
from p2pupd.protocol.varint import encode_uvarint


@pytest.mark.parametrize("packing", list(Packing))
def test_v2_header_round_trips_for_hdiffpatch(packing: Packing) -> None:
    head = encode_patch2_header(Codec.HDIFFPATCH, packing, 70_000, 90_000)
    hdr = parse_patch_header(head + b"body")
    assert (hdr.codec, hdr.packing, hdr.target_size, hdr.raw_size) == (
        Codec.HDIFFPATCH,
        packing,
        70_000,
        90_000,
    )
    assert hdr.body_offset == len(head) and hdr.max_body_size == 90_000


def test_v2_header_round_trips_for_bsdiff4() -> None:
    head = encode_patch2_header(Codec.BSDIFF4, Packing.LZMA2, 70_000, 70_100, 48, 65_000)
    hdr = parse_patch_header(head)
    assert (hdr.codec, hdr.packing, hdr.control_size, hdr.diff_size) == (
        Codec.BSDIFF4,
        Packing.LZMA2,
        48,
        65_000,
    )
    assert hdr.max_body_size == 70_100


def test_v1_header_is_bsdiff4_with_zstd() -> None:
    hdr = parse_patch_header(encode_patch_header(70_000, 48, 65_000))
    assert (hdr.codec, hdr.packing, hdr.raw_size) == (Codec.BSDIFF4, Packing.ZSTD, None)
    assert hdr.max_body_size == 48 + 65_000 + 70_000


@pytest.mark.parametrize(
    ("codec_byte", "packing_byte", "word"),
    [(9, 1, "codec 9"), (0, 1, "codec 0"), (2, 7, "packing 7")],
)
def test_unknown_codec_or_packing_is_refused_by_name(
    codec_byte: int, packing_byte: int, word: str
) -> None:
    head = PATCH2_MAGIC + bytes((codec_byte, packing_byte)) + encode_uvarint(10) * 2
    with pytest.raises(UnknownPatchCodecError) as exc:
        parse_patch_header(head)
    msg = str(exc.value)
    assert word in msg and "upgrade" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "bad",
    [
        # hdiffpatch: a body larger than twice the target plus slack
        encode_patch2_header(
            Codec.HDIFFPATCH, Packing.ZSTD, 1000, 2000 + HDIFF_RAW_SLACK_BYTES + 1
        ),
        # bsdiff4: a body shorter than its control and diff blocks
        encode_patch2_header(Codec.BSDIFF4, Packing.ZSTD, 1000, 100, 48, 900),
        # bsdiff4: a body longer than control + diff + target
        encode_patch2_header(Codec.BSDIFF4, Packing.LZMA2, 1000, 2000, 24, 900),
        # bsdiff4: control not whole records, diff longer than the target
        encode_patch2_header(Codec.BSDIFF4, Packing.LZMA2, 1000, 1000, 25, 0),
        encode_patch2_header(Codec.BSDIFF4, Packing.LZMA2, 10, 40, 24, 11),
        PATCH2_MAGIC + b"\x02",  # truncated before the packing
        PATCH2_MAGIC + b"\x02\x01\x80\x80",  # truncated varint
        b"PZP3\x02\x01\x00\x00",  # an unknown container version
    ],
)
def test_impossible_v2_headers_are_refused(bad: bytes) -> None:
    with pytest.raises(SchemaError):
        parse_patch_header(bad)


def test_raw_bounds_follow_the_target() -> None:
    assert max_raw_size(Codec.HDIFFPATCH, 1 << 20) == (2 << 20) + HDIFF_RAW_SLACK_BYTES
    assert max_raw_size(Codec.BSDIFF4, 1000, 48, 900) == 1948


def test_lzma2_dictionary_never_exceeds_the_body_or_the_cap() -> None:
    assert lzma2_dict_size(0) == 4 * limits.KiB  # liblzma's smallest
    assert lzma2_dict_size(1_000_000) == 1_000_000
    assert lzma2_dict_size(1 << 40) == 64 * limits.MiB


# -- HDiffPatch body headers ---------------------------------------------------


def hdiff_uint(n: int) -> bytes:
    """HDiffPatch's integer: 7 bits a byte, most significant first."""
    groups = [n & 0x7F]
    n >>= 7
    while n:
        groups.append(0x80 | (n & 0x7F))
        n >>= 7
    return bytes(reversed(groups))


def hdiff_head(
    new: int, old: int, buffers: tuple[int, int, int, int], compressed: int = 0, name: bytes = b""
) -> bytes:
    cover, ctrl, code, ndiff = buffers
    fields = (new, old, 3, cover, compressed, ctrl, 0, code, 0, ndiff, 0)
    return HDIFF_MAGIC + name + b"\0" + b"".join(hdiff_uint(v) for v in fields)


def test_hdiff_header_fields_and_sizes() -> None:
    head = hdiff_head(100_005, 100_000, (9, 3, 0, 5))
    body = head + bytes(17)
    h = parse_hdiff_header(body)
    assert (h.new_size, h.old_size, h.cover_count) == (100_005, 100_000, 3)
    assert (h.buffers_size, h.header_size) == (17, len(head))


def test_hdiff_integer_matches_hdiffpatch() -> None:
    # A header hdiffpatch itself wrote for a 100,005-byte target over 100,000 bytes.
    real = b"HDIFF13&\x00\x86\x8d%\x86\x8d \x02\t\x00\x03\x00\x00\x00\x05\x00"
    h = parse_hdiff_header(real + bytes(9 + 3 + 0 + 5))
    assert (h.new_size, h.old_size, h.cover_count) == (100_005, 100_000, 2)


@pytest.mark.parametrize(
    "bad",
    [
        hdiff_head(10, 10, (1, 1, 1, 1), name=b"zstd") + bytes(4),  # names a compressor
        hdiff_head(10, 10, (1, 1, 1, 1), compressed=1) + bytes(4),  # a compressed part
        hdiff_head(10, 10, (1, 1, 1, 1)) + bytes(3),  # buffers longer than the body
        hdiff_head(10, 10, (1, 1, 1, 1)) + bytes(5),  # trailing bytes
        hdiff_head(10, 10, (1, 1, 1, 1))[:14],  # truncated header
        b"HDIFF13&\0" + b"\xff" * 20,  # an integer that never ends
        b"HDIFFSF20" + bytes(20),  # another HDiffPatch format
    ],
)
def test_hdiff_headers_p2pupd_does_not_write_are_refused(bad: bytes) -> None:
    with pytest.raises(SchemaError):
        parse_hdiff_header(bad)
