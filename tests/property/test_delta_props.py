"""Delta engine properties: for random old/new pairs (edits, insertions,
deletions), what the publisher computes and the node rebuilds is the new file
byte for byte, from exactly the blobs ``needed_blobs`` names; a corrupted patch
or a wrong base is refused with ``HashMismatchError`` and nothing is staged."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path

import bsdiff4
import pytest
from _edits import base_bytes, edit_scripts, mutate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pupd.daemon.stage.delta import DeltaBuilder, apply_patch
from p2pupd.daemon.stage.stager import missing_blobs, stage_tree
from p2pupd.daemon.store.blobs import BlobStore
from p2pupd.protocol import chunking
from p2pupd.protocol.deltaplan import (
    KIND_CHUNK,
    Holdings,
    Method,
    needed_blobs,
    parse_patch_header,
    plan_release,
)
from p2pupd.protocol.errors import HashMismatchError, SchemaError
from p2pupd.protocol.manifest import ChunkRef, Delta, FileEntry, Manifest
from p2pupd.protocol.patchcodec import encode_patch
from p2pupd.tools.publisher.deltas import DeltaMaker
from p2pupd.tools.publisher.segments import plan_segments

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

edits = edit_scripts(max_len=5000, max_edits=8)


def entry(path: str, data: bytes, store: BlobStore) -> FileEntry:
    refs = []
    for off, n in chunking.cut(data):
        refs.append(ChunkRef(store.put_bytes(data[off : off + n]), n))
    return FileEntry(path, 0o644, len(data), hashlib.sha256(data).digest(), 0, tuple(refs))


def manifest(serial: int, files: tuple[FileEntry, ...], deltas: tuple[Delta, ...] = ()) -> Manifest:
    return Manifest("app", f"{serial}.0", serial, 0, files, deltas=deltas)


@contextmanager
def scratch() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="deltaprop"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def publish_pair(
    tmp: Path, old: bytes, new: bytes, whole_file_max: int
) -> tuple[Manifest, Manifest, BlobStore]:
    repo = BlobStore(tmp / "repo")
    m1 = manifest(1, (entry("img", old, repo),))
    files = (entry("img", new, repo),)
    deltas = DeltaMaker(repo, [m1], workers=2, whole_file_max=whole_file_max).compute(files)
    return m1, manifest(2, files, deltas), repo


def node_with(
    tmp: Path, old: bytes, m1: Manifest, m2: Manifest, repo: BlobStore, hold: bool = True
) -> tuple[BlobStore, list[Manifest], dict[bytes, Path]]:
    """A node (empty store) holding v1 on disk, or nothing, that received what
    ``needed_blobs`` names for it."""
    (tmp / "live").mkdir()
    (tmp / "live" / "img").write_bytes(old)
    held = [m1] if hold else []
    node = BlobStore(tmp / "node")
    for dg in needed_blobs(m2, held, node.has):
        node.put_bytes(repo.get_bytes(dg), dg)
    return node, held, {m1.files[0].sha256: tmp / "live" / "img"} if hold else {}


def rebuild(
    tmp: Path, held: list[Manifest], m2: Manifest, node: BlobStore, reusable: dict[bytes, Path]
) -> bytes:
    stage = tmp / "stage"
    builder = DeltaBuilder(m2, held, reusable, node)
    assert not missing_blobs(m2, reusable, node, held)
    stage_tree(m2, stage, node, reusable, delta_builder=builder)
    return (stage / "img").read_bytes()


@FAST
@given(st.integers(0, 2**16), st.integers(0, 300_000), edits)
def test_whole_file_patch_round_trips(
    seed: int, size: int, script: list[tuple[str, float, int, int]]
) -> None:
    old = base_bytes(seed, size)
    new = mutate(old, script)
    patch = encode_patch(old, new)
    if patch.startswith(b"PZB1"):
        assert parse_patch_header(patch).target_size == len(new)
    assert apply_patch(old, patch, len(new)) == new
    # Classic BSDIFF40 files are accepted too.
    assert apply_patch(old, bsdiff4.diff(old, new), len(new)) == new


@FAST
@given(st.integers(0, 2**16), st.integers(100_000, 600_000), edits, st.booleans())
def test_reconstruct_old_plus_delta_equals_new(
    seed: int, size: int, script: list[tuple[str, float, int, int]], per_chunk: bool
) -> None:
    old = base_bytes(seed, size)
    new = mutate(old, script)
    with scratch() as tmp:
        m1, m2, repo = publish_pair(tmp, old, new, 0 if per_chunk else 1 << 24)
        node, held, reusable = node_with(tmp, old, m1, m2, repo)
        assert rebuild(tmp, held, m2, node, reusable) == new
        # Whatever the path, a node at v1 never needs more than the new chunks.
        lacking = {
            c.digest: c.size for c in m2.files[0].chunks if c.digest not in m1.chunk_digests()
        }
        need = needed_blobs(m2, [m1], lambda _d: False)
        assert sum(need.values()) <= sum(lacking.values())


def test_small_edits_cost_kilobytes() -> None:
    old = base_bytes(7, 2_000_000)
    new = mutate(
        old, [("replace", i / 10, 300, i) for i in range(10)] + [("insert", 0.5, 4000, 99)]
    )
    with scratch() as tmp:
        m1, m2, _repo = publish_pair(tmp, old, new, 0)
        assert {d.kind for d in m2.deltas} >= {KIND_CHUNK}
        need = needed_blobs(m2, [m1], lambda _d: False)
        assert sum(need.values()) < 40_000  # vs ~2 MB of content
        plans = plan_release(m2, Holdings.of([m1]), lambda d: d in need)
        assert plans["img"].method is Method.CHUNKS and plans["img"].complete


def corrupt_one_patch(m2: Manifest, node: BlobStore, kind: str) -> Manifest:
    """Swap one delta's patch for a flipped copy that is validly named by its hash."""
    for i, d in enumerate(m2.deltas):
        if d.kind == kind and node.has(d.patch):
            data = bytearray(node.get_bytes(d.patch))
            data[len(data) // 2] ^= 0x40
            bad = node.put_bytes(bytes(data))
            deltas = list(m2.deltas)
            deltas[i] = replace(d, patch=bad)
            return replace(m2, deltas=tuple(deltas))
    pytest.skip(f"no {kind} delta was received")


@pytest.mark.parametrize("kind", ["chunk", "file", "zchunk"])
def test_corrupted_patch_is_refused(tmp_path: Path, kind: str) -> None:
    # (That the apply then discards the stage is checked end to end in
    # tests/integration/test_delta_e2e.py.)
    old = base_bytes(3, 400_000)
    new = mutate(old, [("replace", 0.3, 2000, 1), ("replace", 0.6, 3000, 2)])
    m1, m2, repo = publish_pair(tmp_path, old, new, 0 if kind != "file" else 1 << 24)
    # A node holding nothing rebuilds from zstd literals; one at v1 from patches.
    node, held, reusable = node_with(tmp_path, old, m1, m2, repo, hold=kind != "zchunk")
    bad = corrupt_one_patch(m2, node, kind)
    with pytest.raises(HashMismatchError):
        rebuild(tmp_path, held, bad, node, reusable)


@pytest.mark.parametrize("whole", [0, 1 << 24])
def test_wrong_base_is_refused(tmp_path: Path, whole: int) -> None:
    old = base_bytes(4, 400_000)
    new = mutate(old, [("replace", 0.2, 500, 1), ("replace", 0.7, 500, 2)])
    m1, m2, repo = publish_pair(tmp_path, old, new, whole)
    node, held, reusable = node_with(tmp_path, old, m1, m2, repo)
    # The installed copy was modified locally after it was installed.
    live = tmp_path / "live" / "img"
    data = bytearray(live.read_bytes())
    for off in range(0, len(data), 50_000):
        data[off] ^= 1
    live.write_bytes(bytes(data))
    with pytest.raises(HashMismatchError):
        rebuild(tmp_path, held, m2, node, reusable)


@given(st.binary(max_size=300))
def test_garbage_patches_raise_only_hash_errors(junk: bytes) -> None:
    for patch in (junk, b"PZB1" + junk, b"BSDIFF40" + junk):
        with suppress(HashMismatchError):
            apply_patch(b"base bytes" * 10, patch, 50)
    with pytest.raises(SchemaError):
        parse_patch_header(b"PZB1\xff")


@given(
    st.lists(st.integers(1, 5), min_size=1, max_size=40),
    st.lists(st.integers(0, 60), max_size=60),
    st.booleans(),
)
def test_segments_cover_new_chunks_with_bounded_bases(
    old_ids: list[int], new_ids: list[int], votes: bool
) -> None:
    old = [ChunkRef(bytes([i]) * 32, 1000 * i) for i in old_ids]
    pool = old + [ChunkRef(bytes([100 + k % 50]) * 32, 3000) for k in range(60)]
    new = [pool[k % len(pool)] for k in new_ids]
    old_set = {c.digest for c in old}
    once = {c.digest for c in new if sum(x.digest == c.digest for x in new) == 1}
    segs = plan_segments(
        old,
        new,
        may_start_run=lambda d: d in once,
        locate=(lambda s, e: (s * 7) % len(old)) if votes else None,
        seg_max=7000,
        base_max=8000,
    )
    covered = [k for g in segs for k in range(g.start, g.end)]
    assert covered == [k for k, c in enumerate(new) if c.digest not in old_set]
    for g in segs:
        assert g.end - g.start == 1 or (
            new[g.start].digest in once and sum(c.size for c in new[g.start : g.end]) <= 7000
        )
        idx = g.bases
        assert idx and list(idx) == list(range(idx[0], idx[-1] + 1))
        assert idx[0] >= 0 and idx[-1] < len(old)
        assert len(idx) == 1 or sum(old[i].size for i in idx) <= 8000


def test_dense_changes_use_multi_chunk_runs(tmp_path: Path) -> None:
    # Like a relinked binary: a small change every few hundred bytes, so no
    # chunk survives; the node rebuilds runs of chunks from single patches.
    old = base_bytes(11, 900_000)
    new = bytearray(old)
    for off in range(0, len(new), 700):
        new[off] = (new[off] + 1) % 256
    m1, m2, repo = publish_pair(tmp_path, old, bytes(new), 0)
    node, held, reusable = node_with(tmp_path, old, m1, m2, repo)
    plan = plan_release(m2, Holdings.of(held), node.has)["img"]
    assert any(len(s.chunks) > 1 for s in plan.steps)
    assert plan.cost == 0
    assert rebuild(tmp_path, held, m2, node, reusable) == bytes(new)
    assert sum(needed_blobs(m2, [m1], lambda _d: False).values()) < len(new) // 10


@FAST
@given(st.integers(0, 2**16), edits, edits)
def test_deltas_do_not_depend_on_the_order_files_arrive(
    seed: int, a: list[tuple[str, float, int, int]], b: list[tuple[str, float, int, int]]
) -> None:
    # publish streams files into DeltaMaker as they are chunked, largest
    # first; the signed result must be what the whole sorted list gives.
    olds = {"big": base_bytes(seed, 400_000), "small": base_bytes(seed + 1, 60_000)}
    news = {"big": mutate(olds["big"], a), "small": mutate(olds["small"], b), "added": b"x" * 999}
    with scratch() as tmp:
        repo = BlobStore(tmp / "repo")
        m1 = manifest(1, tuple(entry(p, data, repo) for p, data in sorted(olds.items())))
        files = tuple(entry(p, data, repo) for p, data in sorted(news.items()))
        whole = DeltaMaker(repo, [m1], workers=2, whole_file_max=100_000).compute(files)
        streamed = DeltaMaker(repo, [m1], workers=2, whole_file_max=100_000).compute(
            iter(files[::-1]), [f.path for f in files]
        )
        assert streamed == whole
        # "big" (over whole_file_max) took the segment path, planned last.
        big = next(f for f in files if f.path == "big")
        if news["big"] != olds["big"]:
            assert (
                any(d.kind == KIND_CHUNK for d in whole)
                or not set(c.digest for c in big.chunks) - m1.chunk_digests()
            )
