"""Patches in the forms nodes accept: the one encoder of binary deltas.

``encode_patch`` is used for file and chunk deltas (``tools/publisher/deltas.py``)
and for release envelopes carried as patches in bundles
(``tools/publisher/export.py``); nodes apply them with
``daemon.stage.delta.apply_patch``. The containers are laid out in
``protocol.deltaplan``.

How a patch is chosen
---------------------
Two diff algorithms, two ways to pack the result, and the smallest wins:

* **hdiffpatch** (HDiffPatch's cover search over a suffix array, in C, without
  the GIL): on rebuilt native libraries its diff packs 10-20 % smaller than
  bsdiff4's and is computed 3-10x faster (a 12 MiB library: ~2 s against
  ~11 s). It is always tried.
* **bsdiff4**: its suffix sort holds the GIL and ~17x its input in memory,
  and on the benchmark's real pairs it won only on inputs of a few hundred
  bytes (by a few bytes), so it is tried only where it costs nothing: inputs
  up to ``BSDIFF_MAX_INPUT_BYTES``, or when hdiffpatch gives no usable patch
  (up to ``BSDIFF_FALLBACK_MAX_INPUT_BYTES``; ``bsdiff=True`` forces it).

Each algorithm's raw output is packed as a raw LZMA2 stream (bodies of at
least ``LZMA2_MIN_BODY`` bytes) and as one zstd frame (bodies below
``ZSTD_MAX_BODY``): LZMA2 wins on large bodies (5-10 % on relinked
libraries), zstd on small ones (less framing), and zstd level 19 on a large
body would cost as much time as the diff. A bsdiff4 patch packed with zstd is
written in container v1 (``PZB1``), which every node applies; the other three
forms need container v2 (``PZP2``).

Patch formats, for mixed sites
------------------------------
A node applies only the containers its version knows, so what a publisher
may write depends on the oldest p2pupd among the nodes a release must reach
(docs/self-update.md, "Version rules"):

* format 1 -- ``PZB1`` (bsdiff4, zstd) and classic ``BSDIFF40``: every p2pupd
  applies them (0.1.0 included);
* format 2 -- ``PZP2`` as well (hdiffpatch; LZMA2 packing): p2pupd with
  this module's codecs.

``encode_best(..., patch_format=1)`` writes only what format 1 allows: the
bsdiff4 patch, packed with zstd whatever its size. The publisher's choice is
the repository's ``patch_format`` (``publish --patch-format``); patches of
release envelopes in bundles are always format 1 (tools/publisher/export.py:
a bundle is written in the oldest format that carries it).

``encode_dict_patch``: a zstd frame of the new bytes compressed with the old as
a raw-content dictionary, the other form a bundle may carry a release envelope
in (``daemon.metadata`` decodes it). An envelope is mostly 32-byte digests:
a diff can only express a new digest as a byte difference from the old one in
its place, while zstd may also copy it from earlier in the *new* envelope --
the digest of an edited file recurs as its chunk's digest and as the target of
its deltas -- so on the delta benchmark's tree of small files it is ~20 % smaller.
"""

from __future__ import annotations

import lzma
from dataclasses import dataclass

import bsdiff4
import hdiffpatch
import zstandard

from p2pupd.protocol import limits
from p2pupd.protocol.deltaplan import (
    Codec,
    Packing,
    encode_patch2_header,
    encode_patch_header,
    lzma2_dict_size,
    max_raw_size,
)

PATCH_LEVEL = 19  # patch bodies are mostly zeros: level 19 is still fast on them
LZMA2_PRESET = 6  # presets 6-9 give the same size on patch bodies; 6 is the fastest
BSDIFF_MAX_INPUT_BYTES = 64 * limits.KiB  # old + new: a few ms of bsdiff4
BSDIFF_FALLBACK_MAX_INPUT_BYTES = 16 * limits.MiB  # ~17x this in memory when hdiffpatch fails
LZMA2_MIN_BODY = 4 * limits.KiB  # below this LZMA2 never won in the benchmark
ZSTD_MAX_BODY = 128 * limits.KiB  # above this zstd never won in the benchmark
BIG_CACHE_MATCH_BYTES = 1 * limits.MiB  # HDiffPatch's match cache pays off above this
PATCH_FORMAT = 2  # the newest patch format (above) this code writes and applies
PATCH_FORMATS = (1, 2)


@dataclass(frozen=True)
class EncodedPatch:
    """A patch blob and how it was made."""

    data: bytes
    codec: Codec
    packing: Packing


def encode_patch(
    old: bytes,
    new: bytes,
    level: int = PATCH_LEVEL,
    *,
    bsdiff: bool | None = None,
    patch_format: int = PATCH_FORMAT,
) -> bytes:
    """Return the smallest patch from ``old`` to ``new`` (see the module doc).

    Falls back to bsdiff4 whatever the size if hdiffpatch fails: for callers
    that need a patch (release envelopes in bundles, tests).
    """
    best = encode_best(
        old, new, level, bsdiff=bsdiff, fallback_max=None, patch_format=patch_format
    )
    assert best is not None  # bsdiff4 always yields a patch
    return best.data


def encode_best(
    old: bytes,
    new: bytes,
    level: int = PATCH_LEVEL,
    *,
    bsdiff: bool | None = None,
    fallback_max: int | None = BSDIFF_FALLBACK_MAX_INPUT_BYTES,
    patch_format: int = PATCH_FORMAT,
) -> EncodedPatch | None:
    """Return the smallest of the candidate patches from ``old`` to ``new``.

    ``bsdiff`` forces bsdiff4 on (True) or off (False); by default it is tried
    for inputs up to ``BSDIFF_MAX_INPUT_BYTES``, and when hdiffpatch gives
    nothing usable for inputs up to ``fallback_max`` (None: any size). Returns
    None only when neither gives a patch. ``patch_format`` 1: only the bsdiff4
    patch in container v1, which every node applies (see "Patch formats").
    """
    if patch_format not in PATCH_FORMATS:
        raise ValueError(f"patch format {patch_format} is not one of {PATCH_FORMATS}")
    if patch_format == 1:
        control, diff, extra = bsdiff4.core.diff(old, new)
        raw = control + diff + extra
        body = _pack(raw, Packing.ZSTD, level)
        frame = _bsdiff_frame(len(new), len(control), len(diff), raw, Packing.ZSTD, body)
        return EncodedPatch(frame, Codec.BSDIFF4, Packing.ZSTD)
    best: EncodedPatch | None = None
    for cand in _hdiff_candidates(old, new, level):
        if best is None or len(cand.data) < len(best.data):
            best = cand
    size = len(old) + len(new)
    if bsdiff is None:
        bsdiff = size <= BSDIFF_MAX_INPUT_BYTES or (
            best is None and (fallback_max is None or size <= fallback_max)
        )
    if bsdiff:
        for cand in _bsdiff_candidates(old, new, level):
            if best is None or len(cand.data) < len(best.data):
                best = cand
    return best


def encode_as(
    old: bytes, new: bytes, codec: Codec, packing: Packing, level: int = PATCH_LEVEL
) -> bytes:
    """Return the patch from ``old`` to ``new`` in one given form (for comparisons and tests).

    Raises ``hdiffpatch.HDiffPatchError`` if hdiffpatch fails, ``ValueError``
    if its body would exceed ``max_raw_size``.
    """
    if codec is Codec.HDIFFPATCH:
        raw = _hdiff_raw(old, new)
        if raw is None:
            raise ValueError("hdiffpatch body exceeds the bound for its target")
        return _hdiff_frame(len(new), raw, packing, _pack(raw, packing, level))
    control, diff, extra = bsdiff4.core.diff(old, new)
    raw = control + diff + extra
    return _bsdiff_frame(
        len(new), len(control), len(diff), raw, packing, _pack(raw, packing, level)
    )


def _hdiff_candidates(old: bytes, new: bytes, level: int) -> list[EncodedPatch]:
    try:
        raw = _hdiff_raw(old, new)
    except hdiffpatch.HDiffPatchError:
        return []
    if raw is None:
        return []
    return [
        EncodedPatch(_hdiff_frame(len(new), raw, p, _pack(raw, p, level)), Codec.HDIFFPATCH, p)
        for p in packings_for(len(raw))
    ]


def _hdiff_raw(old: bytes, new: bytes) -> bytes | None:
    """Return HDiffPatch's uncompressed diff, or None if it exceeds ``max_raw_size``."""
    # validate=True applies the diff and compares: cheap next to the search,
    # and a wrong patch would fail every node's hash check.
    raw = hdiffpatch.diff(
        old, new, None, validate=True, big_cache_match=len(old) > BIG_CACHE_MATCH_BYTES
    )
    return raw if len(raw) <= max_raw_size(Codec.HDIFFPATCH, len(new)) else None


def _hdiff_frame(target: int, raw: bytes, packing: Packing, body: bytes) -> bytes:
    return encode_patch2_header(Codec.HDIFFPATCH, packing, target, len(raw)) + body


def _bsdiff_candidates(old: bytes, new: bytes, level: int) -> list[EncodedPatch]:
    control, diff, extra = bsdiff4.core.diff(old, new)
    raw = control + diff + extra
    return [
        EncodedPatch(
            _bsdiff_frame(len(new), len(control), len(diff), raw, p, _pack(raw, p, level)),
            Codec.BSDIFF4,
            p,
        )
        for p in packings_for(len(raw))
    ]


def _bsdiff_frame(
    target: int, control: int, diff: int, raw: bytes, packing: Packing, body: bytes
) -> bytes:
    if packing is Packing.ZSTD:  # container v1: every node applies it
        return encode_patch_header(target, control, diff) + body
    return encode_patch2_header(Codec.BSDIFF4, packing, target, len(raw), control, diff) + body


def packings_for(raw_size: int) -> list[Packing]:
    """Return the packings tried for a body of ``raw_size`` bytes (see the module doc)."""
    out = []
    if raw_size < ZSTD_MAX_BODY:
        out.append(Packing.ZSTD)
    if raw_size >= LZMA2_MIN_BODY:
        out.append(Packing.LZMA2)
    return out


def _pack(raw: bytes, packing: Packing, level: int) -> bytes:
    if packing is Packing.ZSTD:
        return zstandard.ZstdCompressor(level=level).compress(raw)
    return pack_lzma2(raw)


def pack_lzma2(raw: bytes) -> bytes:
    """Return ``raw`` as a raw LZMA2 stream with the dictionary ``lzma2_dict_size`` gives."""
    flt = {"id": lzma.FILTER_LZMA2, "preset": LZMA2_PRESET, "dict_size": lzma2_dict_size(len(raw))}
    return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=[flt])


DICT_PATCH_MAX_WINDOW_LOG = 27  # 128 MiB: an old and a new envelope of 64 MiB each


def encode_dict_patch(old: bytes, new: bytes, level: int = PATCH_LEVEL) -> bytes:
    """Return ``new`` as one zstd frame using ``old`` as a raw-content dictionary.

    The frame declares its content size and no dictionary id; the window
    covers old and new together, so any of ``old`` stays reachable.
    """
    window_log = min(DICT_PATCH_MAX_WINDOW_LOG, max(10, (len(old) + len(new)).bit_length()))
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=len(new),
        dict_size=len(old),
        window_log=window_log,
        write_content_size=True,
        write_checksum=False,
        write_dict_id=False,
    )
    d = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(dict_data=d, compression_params=params).compress(new)
