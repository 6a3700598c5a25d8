"""Delta planning: which blobs a node must receive, and how it builds each file.

Theory of operation
-------------------
A release names every file by its sha256 and its content-defined chunks, and may
add *deltas* (``Manifest.deltas``), each a recipe for one target::

    kind "file"   target = a file sha256,  bases = whole files (sha256s),
                  patch = a patch blob:    target = patch(concat(bases))
    kind "chunk"  target = the first chunk of a *run* of consecutive chunks
                  of a file, target_size = the run's length in bytes (one
                  chunk's size for a single-chunk run), bases = chunks (a
                  bounded window of old chunks), patch = a patch blob:
                  bytes of the run = patch(concat(bases))
    kind "zchunk" target = a chunk digest, bases = (), patch = a zstd frame of
                  the chunk's bytes (a compressed literal)

Every blob stays named by the sha256 of its own bytes (patches and zstd frames
too), so stores and bundles verify them like any chunk, and every recipe's
output is checked against signed digests: a file against its sha256, a run
chunk by chunk against the manifest's chunk digests. A run applies at a place
in a file where its first chunk is followed by chunks whose sizes add up to
``target_size`` exactly; the publisher starts multi-chunk runs only at chunks
that occur once in the release, so the place is unambiguous. (Runs exist
because a patch per 64 KiB chunk loses the diff's context: on rebuilt binaries
1 MiB runs come within ~25 % of one whole-file patch, single chunks far worse.)
A patch blob is bsdiff4's or hdiffpatch's, in a container that names its
codec (laid out at the end of this module).

A node holds two kinds of things: *held files* -- whole files of the versions
on its disk (installed, kept), each of which it can read by sha256, and whose
chunks it can therefore read too -- and *blobs* in its store. For each file of
the new release ``plan_file`` picks the cheapest path it can satisfy:

1. ``REUSE``: a file with the same sha256 is held; nothing to receive.
2. ``FILE_DELTA``: a "file" delta whose bases are all held files; receive the
   patch (nothing if the store has it).
3. ``CHUNKS``: the cheapest cover of the file's chunk list by steps, each
   one chunk -- the store has it; a held file contains it; a "zchunk"; the
   literal -- or a run rebuilt by a "chunk" delta whose bases the node has
   (held or stored). Found by dynamic programming from the file's end.

Cost is the bytes still to receive. Between equal costs the chunk path wins:
it streams in bounded memory. The same function answers both questions -- what
a bundle or a peer must carry (``needed_blobs``) and, once those blobs are
stored, how the node builds the file (every step then costs nothing). This
module does no I/O: callers supply ``have_blob``.
"""

from __future__ import annotations

import enum
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import accumulate

from p2pupd.protocol import limits
from p2pupd.protocol.errors import SchemaError, VerificationError
from p2pupd.protocol.manifest import ChunkRef, Delta, FileEntry, Manifest
from p2pupd.protocol.varint import encode_uvarint, read_uvarint

KIND_FILE = "file"
KIND_CHUNK = "chunk"
KIND_ZCHUNK = "zchunk"
DELTA_KINDS = (KIND_FILE, KIND_CHUNK, KIND_ZCHUNK)

HaveBlob = Callable[[bytes], bool]

# A node builds a file delta in memory (base, patch and result together), and
# a chunk recipe from at most 64 bases of <= CHUNK_MAX_BYTES each. Recipes
# beyond these bounds are ignored, whatever the (signed) manifest says, so the
# node's memory stays bounded; the file then comes from chunks.
MAX_FILE_DELTA_TARGET_BYTES = limits.WHOLE_FILE_DELTA_MAX_BYTES
MAX_FILE_PATCH_BYTES = 2 * limits.WHOLE_FILE_DELTA_MAX_BYTES
MAX_RUN_BYTES = 4 * limits.MiB
MAX_CHUNK_PATCH_BYTES = 2 * MAX_RUN_BYTES


class Method(enum.Enum):
    """How a whole file is built."""

    REUSE = "reuse"
    FILE_DELTA = "file-delta"
    CHUNKS = "chunks"


class Source(enum.Enum):
    """Where the bytes of one step of a ``CHUNKS`` plan come from."""

    STORE = "store"  # the blob store has the chunk (or will, once received)
    HELD = "held"  # a held file contains it: read it from disk
    DELTA = "delta"  # bspatch(bases, patch) gives the run of chunks
    ZCHUNK = "zchunk"  # zstd-decompress the patch blob


@dataclass(frozen=True)
class ChunkStep:
    """One chunk, or (``DELTA`` only) a run of consecutive chunks, and its source."""

    chunks: tuple[ChunkRef, ...]
    source: Source
    delta: Delta | None = None

    @property
    def size(self) -> int:
        return sum(c.size for c in self.chunks)


@dataclass(frozen=True)
class FilePlan:
    """The chosen path for one file and the blobs it still needs.

    ``blobs`` is empty when the node can build the file now.
    """

    path: str
    method: Method
    blobs: dict[bytes, int] = field(default_factory=dict)
    delta: Delta | None = None
    steps: tuple[ChunkStep, ...] = ()

    @property
    def cost(self) -> int:
        """Bytes still to receive for this file."""
        return sum(self.blobs.values())

    @property
    def complete(self) -> bool:
        return not self.blobs

    @property
    def uses_deltas(self) -> bool:
        """True if building needs more than copying chunks from the store."""
        return self.method is Method.FILE_DELTA or any(
            s.source is not Source.STORE for s in self.steps
        )


@dataclass(frozen=True)
class Holdings:
    """What a node has on disk outside its store: held files and their chunks."""

    files: frozenset[bytes] = frozenset()
    chunks: frozenset[bytes] = frozenset()

    @classmethod
    def of(cls, held: Iterable[Manifest], files: Iterable[bytes] | None = None) -> Holdings:
        """Holdings from the manifests of the versions on disk.

        ``files``, if given, restricts them to the file sha256s the caller can
        actually open (e.g. the keys of a node's ``reusable`` map).
        """
        allowed = None if files is None else frozenset(files)
        fs: set[bytes] = set()
        cs: set[bytes] = set()
        for man in held:
            for f in man.files:
                if allowed is not None and f.sha256 not in allowed:
                    continue
                fs.add(f.sha256)
                cs.update(c.digest for c in f.chunks)
        return cls(frozenset(fs), frozenset(cs))


class DeltaIndex:
    """A release's deltas grouped by target, built once per manifest."""

    def __init__(self, man: Manifest) -> None:
        self.file: dict[bytes, list[Delta]] = {}
        self.chunk: dict[bytes, list[Delta]] = {}
        self.zchunk: dict[bytes, Delta] = {}
        for d in man.deltas:
            if d.kind == KIND_FILE:
                self.file.setdefault(d.target, []).append(d)
            elif d.kind == KIND_CHUNK:
                self.chunk.setdefault(d.target, []).append(d)
            elif d.kind == KIND_ZCHUNK and not d.bases:
                # Keep the smallest if a (strange) manifest lists several.
                old = self.zchunk.get(d.target)
                if old is None or d.patch_size < old.patch_size:
                    self.zchunk[d.target] = d


def plan_file(f: FileEntry, index: DeltaIndex, holdings: Holdings, have_blob: HaveBlob) -> FilePlan:
    """Return the cheapest way to build ``f`` (see the module doc)."""
    if f.sha256 in holdings.files:
        return FilePlan(f.path, Method.REUSE)
    chunked = _plan_chunks(f, index, holdings, have_blob)
    best = chunked
    for d in index.file.get(f.sha256, ()):
        if (
            d.target_size != f.size
            or d.target_size > MAX_FILE_DELTA_TARGET_BYTES
            or d.patch_size > MAX_FILE_PATCH_BYTES
            or not d.bases
            or not all(b in holdings.files for b in d.bases)
        ):
            continue
        blobs = {} if have_blob(d.patch) else {d.patch: d.patch_size}
        cand = FilePlan(f.path, Method.FILE_DELTA, blobs, d)
        if cand.cost < best.cost:
            best = cand
    return best


def _plan_chunks(
    f: FileEntry, index: DeltaIndex, holdings: Holdings, have_blob: HaveBlob
) -> FilePlan:
    chunks = f.chunks
    n = len(chunks)
    offs = [0, *accumulate(c.size for c in chunks)]

    def fetch(digest: bytes, size: int) -> tuple[int, tuple[bytes, int] | None]:
        return (0, None) if have_blob(digest) else (size, (digest, size))

    # best[i]: least bytes to receive for chunks[i:]; pick[i]: the first step
    # of that cover, the blob it needs (if any), and where the next step starts.
    best = [0] * (n + 1)
    pick: list[tuple[ChunkStep, tuple[bytes, int] | None, int]] = [
        (ChunkStep((), Source.STORE), None, 0)
    ] * n
    for i in range(n - 1, -1, -1):
        c = chunks[i]
        one = (c,)
        if have_blob(c.digest):
            best[i], pick[i] = best[i + 1], (ChunkStep(one, Source.STORE), None, i + 1)
            continue
        if c.digest in holdings.chunks:
            best[i], pick[i] = best[i + 1], (ChunkStep(one, Source.HELD), None, i + 1)
            continue
        # The literal is always possible; a recipe must beat it strictly.
        cost, blob = fetch(c.digest, c.size)
        best[i], pick[i] = cost + best[i + 1], (ChunkStep(one, Source.STORE), blob, i + 1)
        z = index.zchunk.get(c.digest)
        if z is not None and z.target_size == c.size and z.patch_size <= MAX_CHUNK_PATCH_BYTES:
            cost, blob = fetch(z.patch, z.patch_size)
            if cost + best[i + 1] < best[i]:
                best[i], pick[i] = (
                    cost + best[i + 1],
                    (ChunkStep(one, Source.ZCHUNK, z), blob, i + 1),
                )
        for d in index.chunk.get(c.digest, ()):
            j = bisect_left(offs, offs[i] + d.target_size, i + 1)
            if (
                j > n
                or offs[j] - offs[i] != d.target_size
                or d.target_size > MAX_RUN_BYTES
                or d.patch_size > MAX_CHUNK_PATCH_BYTES
                or not d.bases
                or not all(b in holdings.chunks or have_blob(b) for b in d.bases)
            ):
                continue
            cost, blob = fetch(d.patch, d.patch_size)
            if cost + best[j] < best[i]:
                best[i], pick[i] = (
                    cost + best[j],
                    (ChunkStep(chunks[i:j], Source.DELTA, d), blob, j),
                )
    steps: list[ChunkStep] = []
    blobs: dict[bytes, int] = {}
    i = 0
    while i < n:
        step, blob, i = pick[i]
        steps.append(step)
        if blob is not None:
            blobs[blob[0]] = blob[1]
    return FilePlan(f.path, Method.CHUNKS, blobs, None, tuple(steps))


def plan_release(new: Manifest, holdings: Holdings, have_blob: HaveBlob) -> dict[str, FilePlan]:
    """Return the plan of every file of ``new``, by path."""
    index = DeltaIndex(new)
    return {f.path: plan_file(f, index, holdings, have_blob) for f in new.files}


def needed_with(new: Manifest, holdings: Holdings, have_blob: HaveBlob) -> dict[bytes, int]:
    """``needed_blobs`` for callers that already built their ``Holdings``."""
    out: dict[bytes, int] = {}
    for plan in plan_release(new, holdings, have_blob).values():
        out.update(plan.blobs)
    for h in new.hooks.values():
        if not have_blob(h.sha256):
            out[h.sha256] = h.size
    return out


def needed_blobs(new: Manifest, held: Iterable[Manifest], have_blob: HaveBlob) -> dict[bytes, int]:
    """Return {digest: size} of the blobs (chunks, patches, hooks) a node must receive to build `new`,
    given the manifests of versions whose files it has on disk (`held`) and the blobs in its store.

    Chooses per file the cheapest path it can satisfy: reuse (file sha256
    present in a held version), delta (a Delta whose bases the node has:
    whole-file bases from held versions, chunk bases from held manifests'
    chunks or the store), else chunks (zstd-compressed literals where the
    release carries them). An empty result means the node can build ``new``.
    """
    return needed_with(new, Holdings.of(held), have_blob)


# -- the patch containers --------------------------------------------------------
#
# A patch blob says which codec made it, so a node dispatches on its first bytes:
#
#   b"BSDIFF40"  classic bsdiff4 file (three bz2 blocks); accepted, no longer written.
#   b"PZB1"      container v1: bsdiff4's control/diff/extra blocks as one zstd frame
#                    "PZB1" | uvarint target_size | uvarint control_size
#                           | uvarint diff_size | zstd frame of (control||diff||extra)
#                (written whenever bsdiff4 + zstd is the smallest form: every
#                node since the first release applies it)
#   b"PZP2"      container v2: a codec id and a packing id
#                    "PZP2" | u8 codec | u8 packing | uvarint target_size
#                           | uvarint raw_size | codec fields | packed body
#                codec 1 bsdiff4:    fields uvarint control_size, uvarint diff_size;
#                                    body = control || diff || extra
#                codec 2 hdiffpatch: no fields; body = an uncompressed HDiffPatch
#                                    diff ("HDIFF13&" with no compressor)
#                packing 1 zstd:  one zstd frame of the body
#                packing 2 lzma2: a raw LZMA2 stream of the body, dictionary size
#                                 ``lzma2_dict_size(raw_size)``
#
# Each header is bounded before anything is allocated: raw_size is exact and must
# fit the codec's bound for target_size (``max_raw_size``), so a node inflates at
# most that many bytes, and an LZMA2 dictionary never exceeds the body it
# decodes. A node that meets a codec or packing id it does not know refuses the
# patch with ``UnknownPatchCodecError`` (one line, nothing staged) instead of
# guessing; a node older than v2 refuses "PZP2" as an unknown format. New codecs
# therefore get a new id, never a new meaning for an old one.
#
# (The compression itself happens in patchcodec.py and daemon/; this module
# only lays out and checks headers, the HDiffPatch one included.)

PATCH_MAGIC = b"PZB1"
PATCH2_MAGIC = b"PZP2"
BSDIFF40_MAGIC = b"BSDIFF40"
_CONTROL_RECORD_BYTES = 24  # three int64 per bsdiff control record
# bsdiff writes one control record per match it extends, each covering far
# more than its own 24 bytes of output (on real patches the control block is
# a few thousandths of the target). Bounding it by the target size (plus
# slack for tiny targets) bounds what a patch may decompress to, before it is
# decompressed, at 3 x the target: a patch that needs more is refused.
CONTROL_SLACK_BYTES = 64 * limits.KiB


def max_control_bytes(target_size: int) -> int:
    """The largest control block a patch for ``target_size`` bytes may have."""
    return min(target_size + CONTROL_SLACK_BYTES, _CONTROL_RECORD_BYTES * (target_size + 1))


class Codec(enum.IntEnum):
    """Which diff algorithm made a patch (the id byte of container v2)."""

    BSDIFF4 = 1
    HDIFFPATCH = 2


class Packing(enum.IntEnum):
    """How a container's body is compressed (the packing byte of container v2)."""

    ZSTD = 1
    LZMA2 = 2


class UnknownPatchCodecError(VerificationError):
    """A patch names a codec or packing this node does not implement."""


# The HDiffPatch body holds the uncovered new bytes once, the covered ones as
# byte differences (at most one byte each, plus run-length control) and a few
# bytes per cover: twice the target plus a header is more than any honest
# patch needs, and the publisher drops a patch that would not fit.
HDIFF_RAW_SLACK_BYTES = 4 * limits.KiB
LZMA2_MIN_DICT_BYTES = 4 * limits.KiB
LZMA2_MAX_DICT_BYTES = 64 * limits.MiB


@dataclass(frozen=True)
class PatchHeader:
    target_size: int
    control_size: int
    diff_size: int
    body_offset: int
    codec: Codec = Codec.BSDIFF4
    packing: Packing = Packing.ZSTD
    raw_size: int | None = None  # exact body size (v2); v1 gives only a bound

    @property
    def max_body_size(self) -> int:
        """The most bytes the packed body may expand to: exactly ``raw_size``
        (v2), else control + diff + extra <= target, at most 3 x
        ``target_size`` + ``CONTROL_SLACK_BYTES``."""
        if self.raw_size is not None:
            return self.raw_size
        return self.control_size + self.diff_size + self.target_size


def max_raw_size(codec: Codec, target_size: int, control_size: int = 0, diff_size: int = 0) -> int:
    """Return the largest unpacked body a ``codec`` patch of ``target_size`` may have."""
    if codec is Codec.BSDIFF4:
        return control_size + diff_size + target_size
    return 2 * target_size + HDIFF_RAW_SLACK_BYTES


def lzma2_dict_size(raw_size: int) -> int:
    """Return the LZMA2 dictionary for a body of ``raw_size`` bytes (encoder and decoder agree)."""
    return max(LZMA2_MIN_DICT_BYTES, min(LZMA2_MAX_DICT_BYTES, raw_size))


def encode_patch_header(target_size: int, control_size: int, diff_size: int) -> bytes:
    """Return the v1 container header for a bsdiff4 patch with these block sizes."""
    return PATCH_MAGIC + _uvarint(target_size) + _uvarint(control_size) + _uvarint(diff_size)


def encode_patch2_header(
    codec: Codec,
    packing: Packing,
    target_size: int,
    raw_size: int,
    control_size: int = 0,
    diff_size: int = 0,
) -> bytes:
    """Return the v2 container header (control and diff sizes only for bsdiff4)."""
    out = PATCH2_MAGIC + bytes((codec, packing)) + _uvarint(target_size) + _uvarint(raw_size)
    if codec is Codec.BSDIFF4:
        out += _uvarint(control_size) + _uvarint(diff_size)
    return out


def parse_patch_header(data: bytes | memoryview) -> PatchHeader:
    """Parse and bound-check a v1 or v2 container header.

    Raises ``UnknownPatchCodecError`` for a v2 codec or packing id this node
    does not know, ``SchemaError`` if the magic is wrong, a field is truncated,
    or the sizes are impossible for a patch of ``target_size`` bytes (for
    bsdiff4, a control block over ``max_control_bytes``: see
    ``CONTROL_SLACK_BYTES``).
    """
    magic = bytes(data[:4])
    if magic == PATCH_MAGIC:
        (target, control, diff), pos = _fields(data, 4, 3)
        _check_bsdiff(target, control, diff)
        return PatchHeader(target, control, diff, pos)
    if magic != PATCH2_MAGIC:
        raise SchemaError("patch is not a p2pupd patch container")
    if len(data) < 6:
        raise SchemaError("patch header is truncated or malformed")
    codec_id, packing_id = data[4], data[5]
    if codec_id not in Codec._value2member_map_:
        raise UnknownPatchCodecError(
            f"patch was made with codec {codec_id}, which this p2pupd does not know "
            "(published by a newer p2pupd: upgrade this node)"
        )
    if packing_id not in Packing._value2member_map_:
        raise UnknownPatchCodecError(
            f"patch body uses packing {packing_id}, which this p2pupd does not know "
            "(published by a newer p2pupd: upgrade this node)"
        )
    codec, packing = Codec(codec_id), Packing(packing_id)
    nfields = 4 if codec is Codec.BSDIFF4 else 2
    values, pos = _fields(data, 6, nfields)
    target, raw = values[0], values[1]
    control, diff = (values[2], values[3]) if codec is Codec.BSDIFF4 else (0, 0)
    if codec is Codec.BSDIFF4:
        _check_bsdiff(target, control, diff)
        if raw < control + diff:
            raise SchemaError("patch header sizes are inconsistent")
    if raw > max_raw_size(codec, target, control, diff):
        raise SchemaError("patch body is larger than any patch for its target")
    return PatchHeader(target, control, diff, pos, codec, packing, raw)


def _fields(data: bytes | memoryview, pos: int, n: int) -> tuple[list[int], int]:
    """Return ``n`` varints from ``pos`` and the position after them."""
    out = []
    for _ in range(n):
        value, pos = _read_uvarint(data, pos)
        out.append(value)
    return out, pos


def _check_bsdiff(target: int, control: int, diff: int) -> None:
    if control % _CONTROL_RECORD_BYTES or diff > target or control > max_control_bytes(target):
        raise SchemaError("patch header sizes are inconsistent")


def _uvarint(n: int) -> bytes:
    return encode_uvarint(n)


def _read_uvarint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    return read_uvarint(data, pos, 9, "patch header")


# -- the HDiffPatch body header --------------------------------------------------
#
#     "HDIFF13&" | compressor name | 0 | newDataSize | oldDataSize | coverCount
#         | cover_buf_size | compressed | rle_ctrl_size | compressed
#         | rle_code_size | compressed | new_data_diff_size | compressed
#         | the four buffers, in that order
#
# with HDiffPatch's integers: 7 bits a byte, most significant first, high bit
# set on every byte but the last. p2pupd writes the body uncompressed (it packs
# the whole body itself), so the name is empty and every "compressed" size 0;
# a node checks that, the sizes against the manifest and the base, and that the
# buffers fill the body exactly, before it hands the body to HDiffPatch.

HDIFF_MAGIC = b"HDIFF13&"
_HDIFF_FIELDS = 11
_HDIFF_MAX_INT_BYTES = 10


@dataclass(frozen=True)
class HdiffHeader:
    new_size: int
    old_size: int
    cover_count: int
    buffers_size: int  # bytes of the four buffers after the header
    header_size: int


def parse_hdiff_header(raw: bytes | memoryview) -> HdiffHeader:
    """Parse and check the header of an uncompressed HDiffPatch body.

    Raises ``SchemaError`` if it is not one, names a compressor, or its
    buffers do not add up to the body's length.
    """
    if bytes(raw[: len(HDIFF_MAGIC) + 1]) != HDIFF_MAGIC + b"\0":
        raise SchemaError("patch body is not an uncompressed HDiffPatch diff")
    pos = len(HDIFF_MAGIC) + 1
    values = []
    for _ in range(_HDIFF_FIELDS):
        value, pos = _read_hdiff_uint(raw, pos)
        values.append(value)
    new, old, covers, cover, ccover, ctrl, cctrl, code, ccode, ndiff, cndiff = values
    if ccover or cctrl or ccode or cndiff:
        raise SchemaError("HDiffPatch body has compressed parts")
    buffers = cover + ctrl + code + ndiff
    if pos + buffers != len(raw):
        raise SchemaError("HDiffPatch body sizes do not add up")
    return HdiffHeader(new, old, covers, buffers, pos)


def _read_hdiff_uint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    value = 0
    for k in range(_HDIFF_MAX_INT_BYTES):
        if pos + k >= len(data):
            break
        b = data[pos + k]
        value = (value << 7) | (b & 0x7F)
        if b < 0x80:
            return value, pos + k + 1
    raise SchemaError("HDiffPatch header is truncated or malformed")


__all__ = [
    "BSDIFF40_MAGIC",
    "CONTROL_SLACK_BYTES",
    "DELTA_KINDS",
    "HDIFF_MAGIC",
    "KIND_CHUNK",
    "KIND_FILE",
    "KIND_ZCHUNK",
    "PATCH2_MAGIC",
    "PATCH_MAGIC",
    "ChunkStep",
    "Codec",
    "DeltaIndex",
    "FilePlan",
    "HdiffHeader",
    "Holdings",
    "Method",
    "Packing",
    "PatchHeader",
    "Source",
    "UnknownPatchCodecError",
    "encode_patch2_header",
    "encode_patch_header",
    "lzma2_dict_size",
    "max_control_bytes",
    "max_raw_size",
    "needed_blobs",
    "needed_with",
    "parse_hdiff_header",
    "parse_patch_header",
    "plan_file",
    "plan_release",
]
