"""Deltas end to end through the command line: v1 installed, v2 imported from a
delta-only bundle (``export --from-version``) and applied; the tree equals v2
byte for byte and the bundle is a small fraction of v2's content. A wrong base
on disk is refused with exit code 3 and nothing staged."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from _store import drop
from conftest import World, tree_snapshot

from p2pupd.daemon.store.packstore import PackStore
from p2pupd.protocol import limits

# Small enough to be fast, big enough that both delta kinds are exercised: the
# whole-file limit is lowered so "img" takes the per-chunk path.
WHOLE_FILE_LIMIT = 256 * 1024


def blob(seed: int, size: int) -> bytes:
    r = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        if r.random() < 0.5:
            out += r.randbytes(r.randint(100, 3000))
        else:
            out += b"record %d;" % r.randint(0, 999) * r.randint(1, 40)
    return bytes(out[:size])


def edit(data: bytes, seed: int, places: int, insert: int = 0) -> bytes:
    r = random.Random(seed)
    out = bytearray(data)
    for _ in range(places):
        p = r.randrange(len(out) - 600)
        out[p : p + 500] = r.randbytes(500)
    if insert:
        p = len(out) // 2
        out[p:p] = r.randbytes(insert)
    return bytes(out)


IMG = blob(1, 3_000_000)
LIB = blob(2, 180_000)
V1 = {"img": IMG, "lib/libx.so": LIB, "etc/a.conf": b"a=1\n", "etc/gone.conf": b"x\n"}
V2 = {
    "img": edit(IMG, 3, places=8, insert=20_000),
    "lib/libx.so": edit(LIB, 4, places=2),
    "etc/a.conf": b"a=2\n",
    "etc/new.conf": b"new\n",
}


def bundle_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path / "blobs" / "sha256").iterdir())


@pytest.fixture
def at_v1(world: World, monkeypatch: pytest.MonkeyPatch) -> World:
    monkeypatch.setattr(limits, "WHOLE_FILE_DELTA_MAX_BYTES", WHOLE_FILE_LIMIT)
    world.publish("1.0", V1)
    r = world.import_(world.export("usb1"), "--apply")
    assert r.code == 0, r.err
    world.publish("2.0", V2)
    return world


def forget_blobs(w: World) -> None:
    """Empty the node's blob store, as if it had been garbage-collected: the
    node then holds v1 only as the files of its live tree."""
    drop(w.state, set(PackStore(w.state).iter_digests()))


@pytest.mark.parametrize("empty_store", [False, True])
def test_delta_only_bundle_updates_v1_to_v2(at_v1: World, empty_store: bool) -> None:
    w = at_v1
    if empty_store:
        forget_blobs(w)
    r = w.run("export", w.repo, w.base / "usb2", "--from-version", "1.0", "--json")
    assert r.code == 0, r.err
    size = bundle_bytes(w.base / "usb2")
    full = sum(len(v) for v in V2.values())
    assert size < full // 20, (size, full)  # 8 small edits + 20 kB: tens of kB, not MBs

    r = w.import_(w.base / "usb2", "--apply")
    assert r.code == 0, r.err
    assert tree_snapshot(w.target) == tree_snapshot(w.base / "src" / "2.0")
    st = json.loads(w.run("status", "--state-dir", w.state, "--json").out)
    assert st["components"]["app"]["version"] == "2.0"
    # And back: the kept v1 is swapped in again.
    assert w.run("rollback", "app", "--state-dir", w.state).code == 0
    assert tree_snapshot(w.target) == tree_snapshot(w.base / "src" / "1.0")


def test_publish_records_both_delta_kinds(at_v1: World) -> None:
    from p2pupd.tools.publisher.repo import Repo

    repo = Repo(at_v1.repo)
    man, _ = repo.release("app", repo.serials("app")[-1])
    kinds = {d.kind for d in man.deltas}
    assert {"chunk", "file"} <= kinds
    assert all(repo.store.has(d.patch) for d in man.deltas)


def test_delta_bundle_without_the_base_is_not_applied(world: World) -> None:
    world.publish("1.0", V1)
    world.publish("2.0", V2)
    dest = world.export("usb2", "--from-version", "1.0")
    before = tree_snapshot(world.target)
    r = world.import_(dest, "--apply")
    assert r.code == 1 and "Traceback" not in r.err
    assert tree_snapshot(world.target) == before


def test_modified_base_is_refused_and_nothing_staged(at_v1: World) -> None:
    w = at_v1
    dest = w.export("usb2", "--from-version", "1.0")
    forget_blobs(w)  # so the live file is the only base
    assert w.import_(dest).code == 0
    img = w.target / "img"
    data = bytearray(img.read_bytes())
    data[1_000_000] ^= 0xFF  # a local change the delta does not expect
    img.write_bytes(bytes(data))
    r = w.run("apply", "app", "--state-dir", w.state)
    assert r.code == 3, r.err
    assert "Traceback" not in r.err
    assert img.read_bytes() == bytes(data)  # v1 (as modified) still live
    assert not list(w.target.parent.glob(".app.p2pupd-stage*"))
