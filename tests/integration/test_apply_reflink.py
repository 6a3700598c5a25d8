"""Staging on a filesystem that really reflinks (a loop-mounted btrfs or xfs): unchanged
files are cloned, a big image is cloned and only its changed chunks written."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from _mounts import reflink_fs
from conftest import World, make_tree, tree_snapshot

from p2pupd.daemon import api


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "fs").mkdir()
    with reflink_fs(tmp_path / "fs") as (_fs, where):
        yield where


def test_unchanged_files_are_reflinked(world: World, mnt: Path) -> None:
    target = mnt / "app"
    r = world.run("init", "--state-dir", world.state, "--trust", world.repo / "root.msgpack",
                  "--component", f"app={target}")  # fmt: skip
    assert r.code == 0, r.err
    files = {f"lib/f{i}": os.urandom(5000) for i in range(10)}
    world.publish("1.0", {**files, "bin/tool": b"v1"})
    v2 = world.publish("2.0", {**files, "bin/tool": b"v2"})
    assert world.import_(world.export("usb", "--history", "2")).code == 0
    api.apply(world.state, "app", version="1.0")
    res = api.apply(world.state, "app", version="2.0")
    assert res.stage is not None
    assert res.stage.methods == {"reflink": 10}
    assert res.stage.bytes_written == 2  # bin/tool only: clones write nothing
    assert tree_snapshot(target) == tree_snapshot(v2)


def test_image_is_cloned_and_only_changed_chunks_written(world: World, mnt: Path) -> None:
    image = mnt / "disk.img"
    r = world.run("init", "--state-dir", world.state, "--trust", world.repo / "root.msgpack",
                  "--component", f"app={image}", "--kind", "file")  # fmt: skip
    assert r.code == 0, r.err
    data = bytearray(os.urandom(4 << 20))
    make_tree(world.base / "i1", {"disk.img": bytes(data)})
    data[3_000_000:3_000_100] = os.urandom(100)
    i2 = make_tree(world.base / "i2", {"disk.img": bytes(data)})
    for version, src in (("1.0", world.base / "i1"), ("2.0", i2)):
        assert world.run("publish", world.repo, "app", version, src).code == 0
    assert world.import_(world.export("usb", "--history", "2")).code == 0
    api.apply(world.state, "app", version="1.0")
    res = api.apply(world.state, "app", version="2.0")
    assert res.stage is not None and res.stage.methods == {"patch-reflink": 1}
    assert res.stage.bytes_written < 300_000  # one or two chunks of the 4 MiB
    assert image.read_bytes() == bytes(data)
    kept = mnt / ".disk.img.p2pupd-v1"
    assert kept.read_bytes() == (world.base / "i1" / "disk.img").read_bytes()
