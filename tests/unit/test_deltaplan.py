"""The pure delta planner: per file the cheapest path a node can satisfy."""

from __future__ import annotations

import hashlib

import pytest

from p2pupd.protocol.deltaplan import (
    MAX_RUN_BYTES,
    Holdings,
    Method,
    Source,
    encode_patch_header,
    needed_blobs,
    parse_patch_header,
    plan_release,
)
from p2pupd.protocol.errors import SchemaError
from p2pupd.protocol.manifest import ChunkRef, Delta, FileEntry, HookRef, Manifest


def d(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


A, B, C, X = (ChunkRef(d(n), 1000) for n in "abcx")
OLD = FileEntry("f", 0o644, 2000, d("old-file"), 0, (A, X))
NEW = FileEntry("f", 0o644, 3000, d("new-file"), 0, (A, B, C))
V1 = Manifest("app", "1", 1, 0, (OLD,))


def v2(*deltas: Delta, hooks: dict[str, HookRef] | None = None) -> Manifest:
    return Manifest("app", "2", 2, 0, (NEW,), deltas=deltas, hooks=hooks or {})


def nothing(_d: bytes) -> bool:
    return False


def test_reuse_needs_nothing() -> None:
    plan = plan_release(v2(), Holdings(frozenset({NEW.sha256})), nothing)["f"]
    assert plan.method is Method.REUSE and plan.complete


def test_chunks_held_on_disk_are_not_fetched() -> None:
    assert needed_blobs(v2(), [V1], nothing) == {B.digest: 1000, C.digest: 1000}
    plan = plan_release(v2(), Holdings.of([V1]), nothing)["f"]
    assert [s.source for s in plan.steps] == [Source.HELD, Source.STORE, Source.STORE]


def test_cheapest_recipe_wins_and_bases_must_be_held() -> None:
    run = Delta("chunk", B.digest, 2000, (X.digest,), d("run"), 300)  # covers B and C
    single = Delta("chunk", B.digest, 1000, (X.digest,), d("one"), 200)
    z = Delta("zchunk", C.digest, 1000, (), d("zc"), 600)
    filed = Delta("file", NEW.sha256, 3000, (OLD.sha256,), d("fd"), 900)
    man = v2(run, single, z, filed)
    assert needed_blobs(man, [V1], nothing) == {d("run"): 300}
    plan = plan_release(man, Holdings.of([V1]), nothing)["f"]
    assert [len(s.chunks) for s in plan.steps] == [1, 2]
    # Without v1 on disk no base is available: literals and the zchunk.
    assert needed_blobs(man, [], nothing) == {A.digest: 1000, B.digest: 1000, d("zc"): 600}


def test_file_delta_when_cheapest() -> None:
    filed = Delta("file", NEW.sha256, 3000, (OLD.sha256,), d("fd"), 100)
    plan = plan_release(v2(filed), Holdings.of([V1]), nothing)["f"]
    assert plan.method is Method.FILE_DELTA and plan.blobs == {d("fd"): 100}
    # Once the patch is stored the node can build the file.
    assert needed_blobs(v2(filed), [V1], lambda x: x == d("fd")) == {}


@pytest.mark.parametrize(
    "bad",
    [
        Delta("chunk", B.digest, 1500, (X.digest,), d("p"), 10),  # sizes do not add up
        Delta("chunk", B.digest, MAX_RUN_BYTES + 1, (X.digest,), d("p"), 10),  # too big
        Delta("chunk", B.digest, 1000, (), d("p"), 10),  # no bases
        Delta("chunk", B.digest, 1000, (d("unheld"),), d("p"), 10),
    ],
)
def test_unusable_recipes_are_ignored(bad: Delta) -> None:
    assert d("p") not in needed_blobs(v2(bad), [V1], nothing)


def test_hooks_are_needed_unless_stored() -> None:
    man = v2(hooks={"health": HookRef(d("hook"), 77)})
    assert needed_blobs(man, [V1], nothing)[d("hook")] == 77
    assert d("hook") not in needed_blobs(man, [V1], lambda x: x == d("hook"))


def test_patch_header_round_trips_and_is_bounded() -> None:
    hdr = parse_patch_header(encode_patch_header(70_000, 48, 65_000) + b"body")
    assert (hdr.target_size, hdr.control_size, hdr.diff_size) == (70_000, 48, 65_000)
    for bad in (
        encode_patch_header(10, 25, 0),  # control not whole records
        encode_patch_header(10, 24, 11),  # diff longer than the target
        b"PZB1\x80\x80",  # truncated varint
        b"BSDIFF40",
    ):
        with pytest.raises(SchemaError):
            parse_patch_header(bad)
