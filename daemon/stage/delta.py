"""Node-side delta reconstruction: build a file from what the node already holds.

Theory of operation
-------------------
``protocol.deltaplan`` decides, per file, the cheapest path the node can take
(reuse, a whole-file delta, or chunk by chunk); this module carries the plan
out while ``daemon.stage`` writes the release's stage directory. ``stage_tree``
calls a ``DeltaBuilder`` for every file it cannot reuse; the builder either
writes the whole file into the given fd and returns True, or returns False and
leaves the file to the plain chunk copy (a file made only of stored chunks
needs nothing from us).

Memory is bounded by the plan's limits, never by the file: a chunk plan is
carried out one chunk at a time -- read the chunk from the store or from a
held file (pread at its offset), or rebuild it with one small patch (bsdiff4
or hdiffpatch, as the patch's container says) over a window of base chunks,
or inflate a zstd literal -- and each chunk is written
and hashed before the next is made. Only a whole-file delta, which the
publisher makes only for files below ``WHOLE_FILE_DELTA_MAX_BYTES``, is built
in memory.

Nothing unverified is staged as good: every chunk rebuilt or read from a held
file is checked against its digest, and the whole file against the manifest's
sha256, before the builder returns. A corrupted patch, a wrong or locally
modified base, or a short result raises ``HashMismatchError``; ``stage_tree``
propagates it and the caller discards the stage.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import bsdiff4
import zstandard

from p2pupd.daemon.errors import NotFoundError, StorageError
from p2pupd.daemon.fsutil import storage_error, write_all
from p2pupd.daemon.store.blobs import BlobStore
from p2pupd.protocol import limits
from p2pupd.protocol.deltaplan import (
    BSDIFF40_MAGIC,
    MAX_FILE_DELTA_TARGET_BYTES,
    PATCH2_MAGIC,
    PATCH_MAGIC,
    ChunkStep,
    Codec,
    DeltaIndex,
    FilePlan,
    Holdings,
    Method,
    Packing,
    PatchHeader,
    Source,
    UnknownPatchCodecError,
    lzma2_dict_size,
    max_control_bytes,
    parse_hdiff_header,
    parse_patch_header,
    plan_file,
)
from p2pupd.protocol.errors import HashMismatchError, SchemaError
from p2pupd.protocol.manifest import FileEntry, Manifest


def inflate(frame: bytes | memoryview, max_size: int) -> bytes:
    """Return the zstd ``frame`` decompressed, refusing more than ``max_size`` bytes.

    The bound holds before anything is allocated: a frame declaring more is
    refused from its header, and one declaring nothing gets a buffer of
    ``max_size`` at most. Raises ``HashMismatchError`` for a corrupt or
    oversized frame.
    """
    try:
        declared = zstandard.frame_content_size(frame)
        if declared > max_size:
            raise HashMismatchError(f"zstd frame declares {declared} bytes, limit {max_size}")
        # With a declared size zstandard allocates exactly that; without one
        # the bound applies while decompressing.
        return zstandard.ZstdDecompressor().decompress(frame, max_output_size=max_size)
    except zstandard.ZstdError as exc:
        raise HashMismatchError(f"corrupt zstd data in a patch: {exc}") from None


def _inflate_blocks(frame: memoryview, control: int, diff: int, max_extra: int) -> list[bytes]:
    """Decompress a patch body straight into its three blocks (control, diff,
    extra <= ``max_extra``), so no joined copy of the body is ever made.

    Raises ``HashMismatchError`` for a corrupt, short or oversized body.
    """
    blocks: list[bytes] = []
    try:
        with zstandard.ZstdDecompressor().stream_reader(frame) as r:
            for size in (control, diff):
                block = _read_exact(r, size)
                if len(block) != size:
                    raise HashMismatchError("patch body is truncated")
                blocks.append(block)
            extra = _read_exact(r, max_extra + 1)
    except zstandard.ZstdError as exc:
        raise HashMismatchError(f"corrupt zstd data in a patch: {exc}") from None
    if len(extra) > max_extra:
        raise HashMismatchError("patch body is larger than its header allows")
    blocks.append(extra)
    return blocks


def _read_exact(reader: zstandard.ZstdDecompressionReader, size: int) -> bytes:
    """Read ``size`` bytes (fewer only at the end of the frame)."""
    parts: list[bytes] = []
    left = size
    while left > 0:
        part = reader.read(min(left, 1 << 22))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def apply_patch(base: bytes, patch: bytes, target_size: int) -> bytes:
    """Return ``patch`` applied to ``base``, which must give ``target_size`` bytes.

    Dispatches on the container (``protocol.deltaplan``): v1 (bsdiff4, zstd),
    v2 (bsdiff4 or hdiffpatch; zstd or LZMA2) and classic BSDIFF40. What it
    may decompress is fixed by ``target_size`` (and ``base``) before it
    starts: for bsdiff4 at most 3 x the target (``deltaplan.max_control_bytes``),
    held once; for hdiffpatch 2 x the target (``deltaplan.max_raw_size``).
    Raises ``UnknownPatchCodecError`` for a codec or packing this node does
    not know, ``HashMismatchError`` for a malformed patch or one made for
    another size; the caller still checks the result's hash.
    """
    try:
        if patch[:4] in (PATCH_MAGIC, PATCH2_MAGIC):
            hdr = parse_patch_header(patch)
            if hdr.target_size != target_size:
                raise HashMismatchError("patch was made for a different target size")
            packed = memoryview(patch)[hdr.body_offset :]
            if hdr.codec is Codec.HDIFFPATCH:
                out = _hpatch(base, _unpack(packed, hdr), target_size)
            elif hdr.packing is Packing.ZSTD:
                control, diff, extra = _inflate_blocks(
                    packed, hdr.control_size, hdr.diff_size, target_size
                )
                if hdr.raw_size is not None and len(extra) != hdr.raw_size - len(control) - len(
                    diff
                ):
                    raise HashMismatchError("patch body is not the size its header says")
                out = bsdiff4.core.patch(base, target_size, control, diff, extra)
            else:
                body = _unpack(packed, hdr)
                c, d = hdr.control_size, hdr.control_size + hdr.diff_size
                out = bsdiff4.core.patch(base, target_size, body[:c], body[c:d], body[d:])
        elif patch[:8] == BSDIFF40_MAGIC and len(patch) >= 32:
            out = _classic(base, patch, target_size)
        else:
            raise HashMismatchError("patch is in an unknown format")
    except (SchemaError, ValueError, OSError, MemoryError) as exc:
        # bsdiff4 reports a corrupt control block as ValueError; bz2 as OSError.
        raise HashMismatchError(f"corrupt patch: {exc}") from None
    if len(out) != target_size:
        raise HashMismatchError("patch produced the wrong number of bytes")
    return out


def _unpack(packed: bytes | memoryview, hdr: PatchHeader) -> bytes:
    """Return a container's body, never more than ``hdr.max_body_size`` bytes."""
    if hdr.packing is Packing.LZMA2:
        assert hdr.raw_size is not None  # only container v2 has packings
        return _unlzma2(packed, hdr.raw_size)
    body = inflate(packed, hdr.max_body_size)
    if hdr.raw_size is not None and len(body) != hdr.raw_size:
        raise HashMismatchError("patch body is not the size its header says")
    return body


def _unlzma2(packed: bytes | memoryview, raw_size: int) -> bytes:
    """Return the raw LZMA2 stream ``packed`` decoded: exactly ``raw_size`` bytes.

    The dictionary (the decoder's memory) follows from ``raw_size``, which the
    header check has bounded, never from the stream itself.
    """
    flt = {"id": lzma.FILTER_LZMA2, "dict_size": lzma2_dict_size(raw_size)}
    d = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[flt])
    try:
        out = d.decompress(packed, max_length=raw_size + 1)
    except lzma.LZMAError as exc:
        raise HashMismatchError(f"corrupt LZMA2 data in a patch: {exc}") from None
    if len(out) != raw_size or not d.eof:
        raise HashMismatchError("patch body is not the size its header says")
    return out


def _hpatch(base: bytes, body: bytes, target_size: int) -> bytes:
    """HDiffPatch's patch over an uncompressed body whose header fits ``base`` and the target.

    HDiffPatch allocates the size its header declares, and would reach for a
    decompressor the header names: both are checked first (``parse_hdiff_header``).
    """
    hdr = parse_hdiff_header(body)
    if hdr.new_size != target_size or hdr.old_size != len(base):
        raise HashMismatchError("hdiffpatch patch was made for other sizes")
    import hdiffpatch  # ~3 MB with its C++ runtime: loaded by the first such patch

    try:
        out: bytes = hdiffpatch.apply(base, body)
    except hdiffpatch.HDiffPatchError as exc:
        raise HashMismatchError(f"corrupt hdiffpatch patch: {exc}") from None
    return out


def _classic(base: bytes, patch: bytes, target_size: int) -> bytes:
    """bspatch for a classic BSDIFF40 file, with every bz2 block size-bounded
    (``bsdiff4.patch`` would inflate them without limit)."""
    lc, ld, dst = (bsdiff4.core.decode_int64(patch[k : k + 8]) for k in (8, 16, 24))
    if dst != target_size or not 0 <= lc <= len(patch) - 32 or not 0 <= ld <= len(patch) - 32 - lc:
        raise HashMismatchError("classic patch header does not fit its target")
    blocks = (patch[32 : 32 + lc], patch[32 + lc : 32 + lc + ld], patch[32 + lc + ld :])
    limits_ = (max_control_bytes(target_size), target_size, target_size)
    control, diff, extra = (_bunzip(b, n) for b, n in zip(blocks, limits_, strict=True))
    out: bytes = bsdiff4.core.patch(base, target_size, control, diff, extra)
    return out


def _bunzip(data: bytes, max_size: int) -> bytes:
    d = bz2.BZ2Decompressor()
    out = d.decompress(data, max_length=max_size + 1)
    if len(out) > max_size or not d.eof:
        raise HashMismatchError("classic patch block is oversized or truncated")
    return out


@dataclass
class BuildReport:
    files: int = 0
    file_deltas: int = 0
    chunks_patched: int = 0
    chunks_inflated: int = 0
    chunks_held: int = 0
    chunks_stored: int = 0


class DeltaBuilder:
    """A ``stage.DeltaBuilder``: builds files of ``man`` by their cheapest plan.

    ``held`` are the manifests of the versions on disk; ``reusable`` maps a file
    sha256 to a path holding those bytes (what ``stage_tree`` is given).
    """

    def __init__(
        self,
        man: Manifest,
        held: Iterable[Manifest],
        reusable: Mapping[bytes, Path],
        store: BlobStore,
    ) -> None:
        held = list(held)
        self.store = store
        self.reusable = reusable
        self.index = DeltaIndex(man)
        self.holdings = Holdings.of(held, files=reusable.keys())
        self.holdings = Holdings(self.holdings.files | frozenset(reusable), self.holdings.chunks)
        # Where each held chunk can be read: (file, offset, size).
        self.where: dict[bytes, tuple[Path, int, int]] = {}
        for m in held:
            for f in m.files:
                path = reusable.get(f.sha256)
                if path is None:
                    continue
                for digest, off, size in f.chunk_spans():
                    self.where.setdefault(digest, (path, off, size))
        self.report = BuildReport()

    def plan(self, f: FileEntry) -> FilePlan:
        return plan_file(f, self.index, self.holdings, self.store.has)

    def __call__(self, f: FileEntry, fd: int) -> bool:
        """Write ``f`` into ``fd`` if a delta path applies; return whether it did.

        Raises ``HashMismatchError`` (nothing must be staged),
        ``UnknownPatchCodecError`` for a patch from a codec this node lacks,
        ``StorageError``/``NotFoundError`` on I/O.
        """
        plan = self.plan(f)
        if plan.method is Method.REUSE or not plan.complete or not plan.uses_deltas:
            return False
        h = hashlib.sha256()
        try:
            if plan.method is Method.FILE_DELTA:
                assert plan.delta is not None
                data = apply_patch(
                    self._read_file_bases(plan.delta.bases),
                    self.store.get_bytes(plan.delta.patch),
                    f.size,
                )
                h.update(data)
                _write(fd, data)
                self.report.file_deltas += 1
            else:
                reader = _HeldReader()
                try:
                    for step in plan.steps:
                        self._step(step, fd, h, reader)
                finally:
                    reader.close()
        except UnknownPatchCodecError as exc:
            raise UnknownPatchCodecError(f"cannot build {f.path}: {exc}") from None
        if h.digest() != f.sha256:
            raise HashMismatchError(f"rebuilt {f.path} does not match its sha256 in the manifest")
        self.report.files += 1
        return True

    # -- one chunk ------------------------------------------------------------

    def _step(self, step: ChunkStep, fd: int, h: hashlib._Hash, reader: _HeldReader) -> None:
        """Make the bytes of one step, check each chunk's digest, hash and write them."""
        c = step.chunks[0]
        if step.source is Source.STORE:
            self.report.chunks_stored += 1
            data = self.store.get_bytes(c.digest, verify=False)
        elif step.source is Source.HELD:
            self.report.chunks_held += 1
            data = reader.read(*self.where[c.digest])
        elif step.source is Source.ZCHUNK:
            assert step.delta is not None
            self.report.chunks_inflated += 1
            data = inflate(self.store.get_bytes(step.delta.patch), c.size)
        else:
            assert step.delta is not None
            self.report.chunks_patched += len(step.chunks)
            base = b"".join(self._base_chunk(b, reader) for b in step.delta.bases)
            data = apply_patch(base, self.store.get_bytes(step.delta.patch), step.size)
        if len(data) != step.size:
            raise HashMismatchError(f"{step.source.value} step produced {len(data)} bytes")
        view = memoryview(data)
        off = 0
        for ch in step.chunks:
            piece = view[off : off + ch.size]
            off += ch.size
            if hashlib.sha256(piece).digest() != ch.digest:
                raise HashMismatchError(
                    f"chunk {ch.digest.hex()[:16]} rebuilt from {step.source.value} does not match"
                )
            h.update(piece)
            _write(fd, piece)

    def _base_chunk(self, digest: bytes, reader: _HeldReader) -> bytes:
        if self.store.has(digest):
            # A base must be a chunk: never let a manifest make us load a big blob.
            if self.store.size(digest) > limits.CHUNK_MAX_BYTES:
                raise HashMismatchError(f"base {digest.hex()[:16]} is not a chunk")
            return self.store.get_bytes(digest, verify=False)
        loc = self.where.get(digest)
        if loc is None:
            raise NotFoundError(f"base chunk {digest.hex()[:16]} is not held here")
        return reader.read(*loc)

    def _read_file_bases(self, bases: Sequence[bytes]) -> bytes:
        parts = []
        total = 0
        for sha in bases:
            path = self.reusable.get(sha)
            if path is None:
                raise NotFoundError(f"base file {sha.hex()[:16]} is not held here")
            try:
                with open(path, "rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                    total += size
                    if total > 2 * MAX_FILE_DELTA_TARGET_BYTES:
                        raise HashMismatchError(f"base {path} is larger than any delta base")
                    parts.append(fh.read(size))
            except OSError as exc:
                raise storage_error(exc, "read", path) from None
        return b"".join(parts)


class _HeldReader:
    """Reads chunks out of held files, keeping the last file open (files are
    read mostly in order, so this opens each once)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.fd = -1

    def read(self, path: Path, offset: int, size: int) -> bytes:
        try:
            if path != self.path:
                self.close()
                self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                self.path = path
            return os.pread(self.fd, size, offset)
        except OSError as exc:
            raise storage_error(exc, "read", path) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.path = -1, None


def _write(fd: int, data: bytes | memoryview) -> None:
    try:
        write_all(fd, data)
    except OSError as exc:
        raise StorageError(f"cannot write staged file: {exc.strerror}") from None
