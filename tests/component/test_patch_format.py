"""Patch formats for mixed sites (protocol/patchcodec.py, "Patch formats"): a
publisher whose fleet still runs p2pupd 0.1.0 writes only container v1
(bsdiff4 in PZB1), which every node applies; a repository made before the
setting existed is taken to be such a fleet's, a new one writes the newest
format; envelope patches in bundles are always format 1.
"""

from __future__ import annotations

import random

import pytest
from conftest import World, make_tree, tree_snapshot

from p2pupd.daemon.stage.delta import apply_patch
from p2pupd.protocol import encoding
from p2pupd.protocol.deltaplan import PATCH_MAGIC, Codec, Packing, parse_patch_header
from p2pupd.protocol.patchcodec import PATCH_FORMAT, encode_best
from p2pupd.tools.publisher.repo import Repo


def binary(seed: int, size: int) -> bytes:
    r = random.Random(seed)
    return bytes(r.getrandbits(8) if r.random() < 0.3 else 65 for _ in range(size))


OLD = binary(1, 300_000)  # big enough that the newest format would take hdiffpatch + LZMA2
NEW = OLD[:1000] + b"changed" * 40 + OLD[1280:]


def test_format_1_is_bsdiff4_in_container_v1_and_applies() -> None:
    best = encode_best(OLD, NEW, patch_format=1)
    assert best is not None and best.data.startswith(PATCH_MAGIC)
    assert (best.codec, best.packing) == (Codec.BSDIFF4, Packing.ZSTD)
    assert apply_patch(OLD, best.data, len(NEW)) == NEW
    newest = encode_best(OLD, NEW)
    assert newest is not None and (newest.codec, newest.packing) != (Codec.BSDIFF4, Packing.ZSTD)
    with pytest.raises(ValueError, match="patch format 3"):
        encode_best(OLD, NEW, patch_format=3)


def test_publish_writes_the_repository_format_or_the_one_asked(world: World) -> None:
    repo = Repo(world.repo)
    assert repo.settings().patch_format == PATCH_FORMAT == 2  # `repo init`: a new fleet
    world.publish("1.0", {"lib/core.so": OLD})
    src2 = make_tree(world.base / "src" / "2.0", {"lib/core.so": NEW})
    r = world.run("publish", world.repo, "app", "2.0", src2, "--patch-format", "1")
    assert r.code == 0, r.err
    # zchunk deltas are zstd frames of a chunk (every node reads them); the patches:
    patches = [d.patch for d in repo.release("app", 2)[0].deltas if d.kind != "zchunk"]
    assert patches
    for p in patches:
        h = parse_patch_header(repo.store.get_bytes(p))
        assert (h.codec, h.packing) == (Codec.BSDIFF4, Packing.ZSTD)
        assert repo.store.get_bytes(p).startswith(PATCH_MAGIC)
    # A node at 1.0 builds 2.0 from those patches.
    assert world.import_(world.export("s1", "--history", "2")).code == 0
    assert world.run("apply", "app", "--version", "1.0", "--state-dir", world.state).code == 0
    stick = world.export("s2", "--from-version", "1.0")
    assert world.import_(stick, "--apply").code == 0
    assert tree_snapshot(world.target) == tree_snapshot(src2)


def test_a_repository_from_before_the_setting_keeps_its_fleet_on_format_1(world: World) -> None:
    repo = Repo(world.repo)
    doc = encoding.decode(repo.settings_path.read_bytes())
    del doc["patch_format"]  # as p2pupd before patch formats wrote it
    repo.settings_path.write_bytes(encoding.encode(doc))
    assert repo.settings().patch_format == 1
    world.publish("1.0", {"lib/core.so": OLD})
    world.publish("2.0", {"lib/core.so": NEW})
    deltas = [d for d in repo.release("app", 2)[0].deltas if d.kind != "zchunk"]
    assert deltas
    for d in deltas:
        assert repo.store.get_bytes(d.patch).startswith(PATCH_MAGIC)
