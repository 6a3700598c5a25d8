"""The apply engine on a real filesystem, in-process: the stat cache, cheap staging,
recycling, retention, owners, the refusals, gc, fsck and status."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from _store import drop
from conftest import World, make_tree, tree_snapshot

from p2pupd.daemon import api, fsutil
from p2pupd.daemon.apply import targets
from p2pupd.daemon.apply.engine import Applier
from p2pupd.daemon.errors import ApplyError, CorruptStoreError, NotFoundError
from p2pupd.daemon.stage import statcache
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.store.packstore import PackStore

FILES = {f"lib/f{i:02}": os.urandom(3000 + i) for i in range(20)}
V1 = {**FILES, "bin/tool": b"v1\n", "etc/conf": b"a=1\n"}
V2 = {**FILES, "bin/tool": b"v2\n", "etc/conf": b"a=1\n", "etc/new": b"new\n"}
V3 = {**FILES, "bin/tool": b"v3\n", "etc/conf": b"a=3\n"}


def publish_all(world: World, *trees: dict[str, bytes]) -> list[Path]:
    srcs = [world.publish(f"{k}.0", t, empty_dirs=("var/empty",)) for k, t in enumerate(trees, 1)]
    assert world.import_(world.export("usb", "--history", str(len(trees)))).code == 0
    return srcs


def count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every file the stat cache had to read back."""
    seen: list[str] = []
    real = statcache.hash_file

    def spy(path: str | os.PathLike[str]) -> tuple[bytes, int]:
        seen.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(statcache, "hash_file", spy)
    return seen


def test_unchanged_files_are_trusted_without_reading(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, v2, _ = publish_all(world, V1, V2, V3)
    api.apply(world.state, "app", version="1.0")
    read = count_hashing(monkeypatch)
    r = api.apply(world.state, "app", version="2.0")
    assert read == []
    assert r.stage is not None and r.stage.reused == len(V2) - 2
    assert r.stage.from_chunks == 2  # bin/tool and etc/new: only they came from the store
    assert tree_snapshot(world.target) == tree_snapshot(v2)


def test_touched_file_is_read_once_and_trusted_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, v2, _ = publish_all(world, V1, V2, V3)
    api.apply(world.state, "app", version="1.0")
    os.utime(world.target / "lib/f03", (1, 1))  # ctime and mtime change, bytes do not
    read = count_hashing(monkeypatch)
    r = api.apply(world.state, "app", version="2.0")
    assert read == [str(world.target / "lib/f03")]
    assert r.modified == ()
    assert tree_snapshot(world.target) == tree_snapshot(v2)


def test_locally_modified_file_is_detected_and_rebuilt(world: World) -> None:
    _, v2, _ = publish_all(world, V1, V2, V3)
    api.apply(world.state, "app", version="1.0")
    live = world.target / "lib/f05"
    st = live.stat()
    live.write_bytes(b"X" * st.st_size)  # same size, same mtime: only ctime tells
    os.utime(live, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = api.apply(world.state, "app", version="2.0")
    assert r.modified == ("lib/f05",)
    assert r.message == "rebuilt 1 locally modified file(s)"
    assert tree_snapshot(world.target) == tree_snapshot(v2)


def test_locally_modified_file_without_its_chunks_is_refused(world: World) -> None:
    publish_all(world, V1, V2, V3)
    api.apply(world.state, "app", version="1.0")
    live = world.target / "lib/f05"
    live.write_bytes(b"Y" * len(FILES["lib/f05"]))
    before = tree_snapshot(world.target)
    node = Node(world.state)
    man = Applier(node).manifest("app", 2)
    drop(world.state, {c.digest for c in man.file_map()["lib/f05"].chunks})
    with pytest.raises(NotFoundError) as info:
        api.apply(world.state, "app", version="2.0")
    assert "1 live file(s) were modified locally (lib/f05)" in str(info.value)
    assert "import the release again" in str(info.value)
    assert tree_snapshot(world.target) == before
    assert sorted(os.listdir(world.target.parent)) == ["app"]


def test_immutable_component_hard_links_and_keeps_its_cache(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.reinit("--immutable")
    _, v2, v3 = publish_all(world, V1, V2, V3)
    api.apply(world.state, "app", version="1.0")
    r = api.apply(world.state, "app", version="2.0")
    assert r.stage is not None and r.stage.methods.get("hardlink") == len(FILES) + 1
    kept = world.target.parent / ".app.p2pupd-v1"
    assert (kept / "lib/f00").stat().st_ino == (world.target / "lib/f00").stat().st_ino
    read = count_hashing(monkeypatch)  # linking changed ctimes; the cache followed
    api.apply(world.state, "app", version="3.0")
    assert read == []
    assert tree_snapshot(world.target) == tree_snapshot(v3)
    assert api.rollback(world.state, "app").version == "2.0"
    assert tree_snapshot(world.target) == tree_snapshot(v2)


def test_retain_one_recycles_the_dropped_version(world: World) -> None:
    world.reinit("--retain", "1")
    *_, v4 = publish_all(world, V1, V2, V3, {**V3, "etc/conf": b"a=4\n"})
    for version in ("1.0", "2.0", "3.0"):
        api.apply(world.state, "app", version=version)
    assert sorted(os.listdir(world.target.parent)) == [".app.p2pupd-v2", "app"]
    r = api.apply(world.state, "app", version="4.0")
    assert r.stage is not None and r.stage.methods["kept"] == len(FILES)  # reshaped v2 in place
    assert tree_snapshot(world.target) == tree_snapshot(v4)
    assert sorted(os.listdir(world.target.parent)) == [".app.p2pupd-v3", "app"]
    assert api.status(world.state)["components"]["app"]["kept"] == [{"serial": 3, "version": "3.0"}]


def test_filesystem_without_exchange_is_refused_before_staging(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_all(world, V1, V2)
    api.apply(world.state, "app", version="1.0")
    before = tree_snapshot(world.target)
    real = fsutil._renameat2

    def no_exchange(a: bytes, b: bytes, flags: int, **kw: bool) -> int:
        return errno.EINVAL if flags & fsutil.RENAME_EXCHANGE else real(a, b, flags, **kw)

    monkeypatch.setattr(fsutil, "_renameat2", no_exchange)
    targets._exchange_ok.cache_clear()
    r = world.run("apply", "app", "--state-dir", world.state)
    targets._exchange_ok.cache_clear()
    assert r.code == 1
    assert r.err.count("\n") == 1
    assert "cannot swap directories atomically (no renameat2 RENAME_EXCHANGE)" in r.err
    assert "configure the component with the symlink kind (`p2pupd init --kind symlink`)" in r.err
    assert tree_snapshot(world.target) == before
    assert sorted(os.listdir(world.target.parent)) == ["app"]


def test_kind_preconditions_are_clear_errors(world: World) -> None:
    publish_all(world, V1)
    world.reinit("--kind", "file")
    with pytest.raises(ApplyError, match=r"must hold exactly one file \(it has 22 files"):
        api.apply(world.state, "app")
    world.reinit("--kind", "symlink")
    world.target.mkdir()
    with pytest.raises(ApplyError, match="exists and is not a symlink"):
        api.apply(world.state, "app")
    assert list(world.target.iterdir()) == []


def test_first_install_keeps_what_was_at_the_target(world: World) -> None:
    (v1,) = publish_all(world, V1)
    world.target.mkdir()
    (world.target / "local.txt").write_text("operator's file")
    api.apply(world.state, "app")
    assert tree_snapshot(world.target) == tree_snapshot(v1)
    orig = world.target.parent / ".app.p2pupd-orig"
    assert (orig / "local.txt").read_text() == "operator's file"


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_owners_follow_the_live_version(world: World) -> None:
    publish_all(world, V1, V2)
    api.apply(world.state, "app", version="1.0")
    for p in (world.target / "etc", world.target / "etc/conf", world.target / "bin/tool"):
        os.chown(p, 4242, 4343)
    r = api.apply(world.state, "app", version="2.0")
    assert r.stage is not None

    def owner(rel: str) -> tuple[int, int]:
        st = (world.target / rel).lstat()
        return st.st_uid, st.st_gid

    assert owner("etc") == (4242, 4343)
    assert owner("etc/conf") == (4242, 4343)  # unchanged file, cloned: keeps its owner
    assert owner("bin/tool") == (4242, 4343)  # changed file: the owner of the old one
    assert owner("etc/new") == (4242, 4343)  # new file: the owner of its directory
    assert owner("lib/f00") == (0, 0)


def test_gc_keeps_every_blob_a_kept_or_newer_release_needs(world: World) -> None:
    world.reinit("--retain", "1")
    publish_all(world, V1, V2, V3, {**V3, "etc/conf": b"a=4\n"})
    for version in ("1.0", "2.0", "3.0"):
        api.apply(world.state, "app", version=version)
    node = Node(world.state)
    a = Applier(node)
    need = {d for s in (2, 3, 4) for d in a.manifest("app", s).blob_sizes()}
    only_v1 = set(a.manifest("app", 1).blob_sizes()) - need
    assert only_v1
    dry = api.gc(world.state, dry_run=True)
    assert dry["blobs_removed"] == len(only_v1)
    assert set(PackStore(world.state).iter_digests()) >= need | only_v1
    r = world.run("gc", "--state-dir", world.state, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["blobs_removed"] == len(only_v1)
    assert set(PackStore(world.state).iter_digests()) == need
    assert api.rollback(world.state, "app").version == "2.0"  # the kept one
    assert api.apply(world.state, "app", version="4.0").version == "4.0"  # the pending one
    assert world.run("fsck", "--state-dir", world.state, "--full").code == 0


def test_fsck_reports_a_modified_target(world: World) -> None:
    publish_all(world, V1)
    api.apply(world.state, "app")
    assert world.run("fsck", "--state-dir", world.state).code == 0
    (world.target / "etc/conf").write_bytes(b"a=9\n")
    (world.target / "stray").write_bytes(b"")
    os.chmod(world.target / "bin/tool", 0o700)
    r = world.run("fsck", "--state-dir", world.state)
    assert r.code == 1
    assert "app 1.0: 3 problem(s)" in r.out
    assert "  etc/conf: content differs from the release" in r.out
    assert "  stray: not in the release" in r.out
    assert "  bin/tool: mode 700, expected 644" in r.out


def test_status_shows_an_open_transaction_while_another_process_holds_the_lock(
    world: World,
) -> None:
    publish_all(world, V1, V2)
    api.apply(world.state, "app", version="1.0")
    node = Node(world.state)
    a = Applier(node)
    cfg = node.config.component("app")
    a.tx.begin(cfg, 2, 1, world.target.parent / ".app.p2pupd-stage", "apply", True, "applied")
    holder = Node(world.state)
    with holder.lock:
        doc = api.status(world.state)
    tx = doc["components"]["app"]["transaction"]
    assert (tx["op"], tx["to"], tx["from"], tx["step"]) == ("apply", 2, 1, "begin")
    assert doc["recovered"] == []
    doc = api.status(world.state)  # the lock is free: status recovers
    assert doc["recovered"] == ["app: discarded an interrupted apply of serial 2; old version kept"]
    assert doc["components"]["app"]["transaction"] is None


def test_recycled_version_modified_on_disk_is_repaired(world: World) -> None:
    """What the stat cache no longer vouches for in the recycled version is rebuilt,
    and what the release does not have is removed."""
    world.reinit("--retain", "1")
    *_, v4 = publish_all(world, V1, V2, V3, {**V3, "etc/conf": b"a=4\n"})
    for version in ("1.0", "2.0", "3.0"):
        api.apply(world.state, "app", version=version)
    kept = world.target.parent / ".app.p2pupd-v2"
    (kept / "lib/f01").write_bytes(b"tampered")
    (kept / "lib/extra").write_bytes(b"not in any release")
    os.symlink("/etc/passwd", kept / "lib/f02.link")
    r = api.apply(world.state, "app", version="4.0")
    assert r.stage is not None
    assert r.stage.methods["kept"] == len(FILES) - 1  # all but the tampered one
    assert tree_snapshot(world.target) == tree_snapshot(v4)


def test_manifest_cache_gives_back_the_verified_manifest(world: World) -> None:
    publish_all(world, V1, V2)
    node = Node(world.state)
    verified = node.manifest("app", 2)
    cached = sorted((world.state / "cache" / "manifests").iterdir())
    assert len(cached) == 2  # the import kept both releases, verified and decoded
    assert Applier(Node(world.state)).manifest("app", 2) == verified  # read back
    for c in cached:
        c.write_bytes(b"\x80\x05garbage")  # a damaged cache entry is only a miss
    assert Applier(Node(world.state)).manifest("app", 2) == verified
    release = world.state / "releases" / "app" / "2.msgpack"
    data = bytearray(release.read_bytes())
    data[-5] ^= 1  # the release itself altered on disk: verified again, and refused
    release.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError):
        Applier(Node(world.state)).manifest("app", 2)


def publish_with_mode(world: World, version: str, files: dict[str, bytes], rel: str) -> Path:
    """Publish ``files`` with ``rel`` made owner-only: same bytes, another mode."""
    src = make_tree(world.base / "src" / version, files)
    (src / rel).chmod(0o600)
    assert world.run("publish", world.repo, "app", version, src).code == 0
    return src


def test_recycled_file_with_a_new_mode_is_fixed_in_place(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.reinit("--retain", "1")
    publish_all(world, V1, V2, V3)
    v4 = publish_with_mode(world, "4.0", V3, "lib/f00")
    assert world.import_(world.export("usb4", "--history", "4")).code == 0
    for version in ("1.0", "2.0", "3.0"):
        api.apply(world.state, "app", version=version)
    ino = (world.target.parent / ".app.p2pupd-v2" / "lib/f00").stat().st_ino
    r = api.apply(world.state, "app", version="4.0")
    assert r.stage is not None and r.stage.methods["kept"] == len(FILES)
    assert (world.target / "lib/f00").stat().st_ino == ino  # the same inode, its mode fixed
    assert tree_snapshot(world.target) == tree_snapshot(v4)
    read = count_hashing(monkeypatch)
    api.rollback(world.state, "app")  # v3 is kept: a switch, checked by the cache
    assert api.apply(world.state, "app", version="4.0").changed
    assert read == []  # the record of the fixed file is right: nothing re-read


def test_immutable_recycled_file_with_a_new_mode_is_planned_from_another_copy(
    world: World,
) -> None:
    """A shared inode is never changed in place: planning sources that file elsewhere
    (here the live copy), so its chunks need not be stored."""
    world.reinit("--retain", "1", "--immutable")
    publish_all(world, V1, V2, V3)
    v4 = publish_with_mode(world, "4.0", V3, "lib/f00")
    assert world.import_(world.export("usb4", "--history", "4")).code == 0
    for version in ("1.0", "2.0", "3.0"):
        api.apply(world.state, "app", version=version)
    node = Node(world.state)
    drop(world.state, {c.digest for c in Applier(node).manifest("app", 4).file_map()["lib/f00"].chunks})
    r = api.apply(world.state, "app", version="4.0")
    assert r.stage is not None and r.stage.methods.get("copy") == 1
    assert tree_snapshot(world.target) == tree_snapshot(v4)
    kept = world.target.parent / ".app.p2pupd-v3" / "lib/f00"
    assert kept.stat().st_mode & 0o7777 == 0o644  # the version it shared an inode with


def test_manifest_cache_reads_entries_that_list_every_chunk(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries now store a one-chunk file without its chunk list; entries written
    before, with every chunk listed, are still read (not re-verified)."""
    publish_all(world, V1, V2)
    verified = Node(world.state).manifest("app", 2)
    rows = [
        (f.path, f.mode, f.size, f.sha256, f.mtime, [(c.digest, c.size) for c in f.chunks])
        for f in verified.files
    ]
    for entry in (world.state / "cache" / "manifests").iterdir():
        head, files = pickle.loads(entry.read_bytes())
        assert any(chunks is None for *_, chunks in files)  # one-chunk files, compact
        if head.serial == 2:
            entry.write_bytes(pickle.dumps((dataclasses.replace(verified, files=()), rows)))

    def refuse(self: Node) -> None:
        raise AssertionError("the release was verified again: the cache entry was not read")

    monkeypatch.setattr(Node, "trusted_root", refuse)
    assert Applier(Node(world.state)).manifest("app", 2) == verified


def listed_dirs(world: World, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every directory of the stage that gets listed (by its path in it)."""
    seen: list[str] = []
    stage = str(world.target.parent / ".app.p2pupd-stage")
    real = os.scandir

    def spy(path: str) -> Any:
        if str(path) == stage or str(path).startswith(stage + "/"):
            seen.append(os.path.relpath(path, stage))
        return real(path)

    monkeypatch.setattr(os, "scandir", spy)
    return seen


def test_recycled_version_is_reshaped_by_its_records_not_listed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.reinit("--retain", "1")
    *_, v4 = publish_all(world, V1, V2, V3, {**V3, "etc/conf": b"a=4\n"})
    for version in ("1.0", "2.0", "3.0"):
        api.apply(world.state, "app", version=version)
    listed = listed_dirs(world, monkeypatch)
    api.apply(world.state, "app", version="4.0")  # v2 had etc/new: removed by name
    assert listed == ["."]  # only the top, whose ctime the renames changed
    assert tree_snapshot(world.target) == tree_snapshot(v4)


def test_recycled_directory_changed_behind_a_restored_mtime_is_listed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changing a directory changes its ctime, which cannot be put back: it is
    listed and repaired even when its mtime was."""
    world.reinit("--retain", "1")
    *_, v4 = publish_all(world, V1, V2, V3, {**V3, "etc/conf": b"a=4\n"})
    for version in ("1.0", "2.0", "3.0"):
        api.apply(world.state, "app", version=version)
    kept = world.target.parent / ".app.p2pupd-v2"
    lib, empty = kept / "lib", kept / "var" / "empty"
    before = {d: d.stat() for d in (lib, empty)}
    (lib / "sub").mkdir()
    (lib / "sub" / "x").write_bytes(b"planted")
    (empty / "y").write_bytes(b"planted")
    for d, st in before.items():
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
    listed = listed_dirs(world, monkeypatch)
    r = api.apply(world.state, "app", version="4.0")
    assert sorted(listed) == [".", "lib", "lib/sub", "var/empty"]
    assert r.stage is not None and r.stage.methods["kept"] == len(FILES)
    assert tree_snapshot(world.target) == tree_snapshot(v4)
