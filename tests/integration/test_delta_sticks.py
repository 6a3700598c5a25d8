"""Delta sticks and how to look into them: a version label published once (unless
--force), unchanged hooks left at home, and `show`/`verify` of a `--from-version`
bundle that read the release it carries as a patch -- or say plainly they could not."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import wasmtime
from conftest import Run, World, make_tree, tree_snapshot

from p2pupd.tools.publisher.deltas import source_for_node_at
from p2pupd.tools.publisher.repo import Repo

V1 = {"bin/tool": b"v1\n" * 100, "etc/conf": b"a=1\n", "lib/big.bin": random.Random(1).randbytes(300_000)}
V2 = {**V1, "bin/tool": b"v2\n" * 100, "etc/conf": b"a=2\n"}
V3 = {**V2, "etc/conf": b"a=3\n"}


def health_hook(code: int = 0, pad: int = 40_000) -> bytes:
    """A WASI health hook that exits with ``code``, padded to the size of a real one."""
    return bytes(wasmtime.wat2wasm(
        '(module (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))'
        f' (memory (export "memory") 1) (data (i32.const 64) "{"x" * pad}")'
        f' (func (export "_start") (call $exit (i32.const {code}))))'
    ))  # fmt: skip


def publish(w: World, version: str, files: dict[str, bytes], *extra: str | Path) -> Any:
    src = make_tree(w.base / "src" / f"{version}-{len(list(w.base.glob('src/*')))}", files)
    return w.run("publish", w.repo, "app", version, src, *extra), src


def one_line(r: Any, code: int, *words: str) -> None:
    assert r.code == code, (r.code, r.err)
    assert len(r.err.strip().splitlines()) == 1, r.err
    for word in words:
        assert word in r.err, (word, r.err)


def repo_files(repo: Path) -> set[str]:
    return {str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()}


# -- one label, one release ----------------------------------------------------------------


def test_publishing_a_label_again_is_refused_unless_forced(world: World) -> None:
    assert publish(world, "1.0", V1)[0].code == 0
    assert publish(world, "2.0", V2)[0].code == 0
    before = repo_files(world.repo)
    for label in ("2.0", "1.0"):  # the newest release's label, and an older one
        r, _ = publish(world, label, V3)
        one_line(r, 1, f"app {label} is already published", "--force")
        assert repo_files(world.repo) == before  # refused before any chunk was stored
    r, _ = publish(world, "2.0", V3, "--force", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["serial"] == 3
    # Platform variants of the newest release still join it under its label.
    for platform in ("linux-x86_64", "linux-aarch64"):
        r, _ = publish(world, "4.0", V3, "--platform", platform, "--json")
        assert r.code == 0 and json.loads(r.out)["serial"] == 4, r.err


def test_from_version_of_a_label_published_twice_serves_a_node_at_either(world: World) -> None:
    assert publish(world, "1.0", V1)[0].code == 0
    assert publish(world, "2.0", V2)[0].code == 0
    r = world.import_(world.export("usb2"), "--apply")  # this node holds serial 2
    assert r.code == 0, r.err
    _, rebuilt = publish(world, "2.0", V3, "--force")  # serial 3, other bytes, same label
    r = world.run("export", world.repo, world.base / "usb3", "--from-version", "2.0", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["notes"] == [
        "app 2.0 names 2 releases (serials 2, 3): the bundle serves a node at any of them"
    ]
    r = world.import_(world.base / "usb3", "--apply", "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert [(x["serial"], x["complete"]) for x in doc["releases"]] == [(3, True)]
    assert tree_snapshot(world.target) == tree_snapshot(rebuilt)


# -- hooks the node holds stay home --------------------------------------------------------


def test_unchanged_hooks_are_not_carried_in_from_version_sticks(
    world: World, tmp_path: Path
) -> None:
    hook = tmp_path / "health.wasm"
    hook.write_bytes(health_hook())
    assert publish(world, "1.0", V1, "--hook", f"health={hook}")[0].code == 0
    r = world.import_(world.export("usb1"), "--apply")
    assert r.code == 0, r.err
    assert publish(world, "2.0", V2, "--hook", f"health={hook}")[0].code == 0
    repo = Repo(world.repo)
    man2 = repo.release("app", 2)[0]
    hook_digest = man2.hooks["health"].sha256
    carried = source_for_node_at(repo, "app", "1.0").blobs
    assert hook_digest not in carried and carried  # file deltas go, the hook stays home
    full = man2.blob_sizes()
    assert sum(carried.values()) < sum(full.values()) - full[hook_digest]
    # The node builds and checks 2.0 with the hook from its own store.
    r = world.import_(world.export("usb2", "--from-version", "1.0"), "--apply", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["releases"][0]["complete"] is True
    hooks = [h for h in world.app_history() if h["event"] == "hook" and h["version"] == "2.0"]
    assert len(hooks) == 1 and "health hook passed" in hooks[0]["detail"]
    assert world.app_status()["version"] == "2.0"
    # A changed hook does travel.
    hook.write_bytes(health_hook(pad=40_001))
    assert publish(world, "3.0", V3, "--hook", f"health={hook}")[0].code == 0
    man3 = repo.release("app", 3)[0]
    assert man3.hooks["health"].sha256 in source_for_node_at(repo, "app", "2.0").blobs


# -- show and verify of a --from-version bundle ---------------------------------------------


def test_show_and_verify_read_a_patched_release_or_say_they_cannot(
    world: World, run: Run
) -> None:
    assert publish(world, "1.0", V1)[0].code == 0
    r = world.import_(world.export("usb1"), "--apply")
    assert r.code == 0, r.err
    assert publish(world, "2.0", V2, "--expires-days", "30")[0].code == 0
    stick = world.export("usb2", "--from-version", "1.0")
    root = world.repo / "root.msgpack"

    # No base: the release is listed from its annotations, and verify does not pass.
    r = run("show", stick, "--json")
    doc = json.loads(r.out)
    assert doc["releases"] == []
    assert doc["patched_releases"] == [
        {"component": "app", "version": "2.0", "patch_against": "app 1.0"}
    ]
    r = run("show", stick)
    assert "app            2.0" in r.out and "patch against app 1.0: not read" in r.out
    r = run("verify", stick, "--trust", root)
    one_line(r, 1, "not verified: app 2.0 is a patch against app 1.0", "--state-dir", "--repo")
    assert r.out == ""

    # With the publisher's repository or the node's state, it is read and verified whole.
    for basis in (["--repo", world.repo], ["--state-dir", world.state]):
        r = run("show", stick, "--json", *basis)
        rel = json.loads(r.out)["releases"]
        assert [(x["version"], x["serial"], x["patch_against"]) for x in rel] == [
            ("2.0", 2, "app 1.0")
        ]
        assert rel[0]["files"] == len(V2) and rel[0]["expires"] is not None
        r = run("verify", stick, *basis)
        assert r.code == 0, r.err
        assert "1 release(s) (1 rebuilt from patches)" in r.out
    assert "verifies against the pinned root of node" in r.out

    # ... so an expired release is refused, as the node would refuse it.
    later = str(json.loads(run("show", stick, "--json", "--repo", world.repo).out)
                ["releases"][0]["expires"] + 1)  # fmt: skip
    os.environ["P2PUPD_NOW"] = later
    try:
        r = run("verify", stick, "--state-dir", world.state)
    finally:
        del os.environ["P2PUPD_NOW"]
    one_line(r, 3, "release app 2.0 expired at")
    # A node that does not hold the base: said so.
    other = world.base / "other-state"
    assert run("init", "--state-dir", other, "--trust", root,
               "--component", f"app={world.base / 'other'}").code == 0  # fmt: skip
    r = run("verify", stick, "--state-dir", other)
    one_line(r, 1, "not verified", f"(node {other} does not hold it)")
