"""`p2pupd show` and `p2pupd verify` on a repository and a bundle."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import Run, World


def published(world: World) -> Path:
    world.publish("1.0", {"a.txt": b"one\n", "big.bin": bytes(range(256)) * 1000})
    world.publish("2.0", {"a.txt": b"two\n", "big.bin": bytes(range(256)) * 1000})
    return world.export("usb")


def test_show_lists_roots_and_releases(world: World) -> None:
    usb = published(world)
    repo = json.loads(world.run("show", world.repo, "--json").out)
    assert repo["kind"] == "repository"
    assert [(r["version"], r["serial"]) for r in repo["releases"]] == [("1.0", 1), ("2.0", 2)]
    assert repo["roots"][0]["roles"]["root"]["threshold"] == 2
    bundle = json.loads(world.run("show", usb, "--json").out)
    assert bundle["kind"] == "bundle"
    assert [(r["version"], r["serial"]) for r in bundle["releases"]] == [("2.0", 2)]
    assert len(bundle["releases"][0]["signatures"]) == 2


def test_verify_passes_and_catches_tampering(world: World, run: Run, tmp_path: Path) -> None:
    usb = published(world)
    root = world.repo / "root.msgpack"
    for target in (world.repo, usb):
        r = run("verify", target, "--trust", root, "--json")
        assert r.code == 0, r.err
        assert json.loads(r.out)["blobs_checked"] > 0
    # Another repository's root does not vouch for this bundle.
    other = World(tmp_path / "other", run)
    (other.base / "keys").mkdir(parents=True)
    for k in ("r", "s"):
        assert run("keygen", other.key(k)).code == 0
    assert run("repo", "init", other.repo, "--root-key", other.key("r"),
               "--release-key", other.key("s")).code == 0  # fmt: skip
    r = run("verify", usb, "--trust", other.repo / "root.msgpack")
    # The same verdict as ``import`` (the pinned-root rule), not a key error.
    assert r.code == 3 and "another repository" in r.err
    # A flipped byte in a blob, then an extra blob.
    blob = next(p for p in (usb / "blobs" / "sha256").iterdir() if p.stat().st_size > 1000)
    data = bytearray(blob.read_bytes())
    data[10] ^= 1
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    r = run("verify", usb, "--trust", root)
    assert r.code == 3 and "does not match its sha256" in r.err
    data[10] ^= 1
    blob.write_bytes(bytes(data))
    assert run("verify", usb, "--trust", root).code == 0
    (usb / "blobs" / "sha256" / ("ab" * 32)).write_bytes(b"stray")
    r = run("verify", usb, "--trust", root)
    assert r.code == 3 and "unreferenced" in r.err
    assert len(r.err.strip().splitlines()) == 1


def test_command_line_names_and_wrong_root_files_are_clear(world: World, run: Run) -> None:
    src = world.base / "t"
    src.mkdir()
    r = run("publish", world.repo, "App Name", "1.0", src)
    assert r.code == 2 and r.err.strip() == (
        "p2pupd: error: invalid component name 'App Name' (want [a-z0-9._-], 1-64 chars)"
    )
    key = world.key("root1")
    r = run("init", "--state-dir", world.base / "s2", "--trust", key, "--component", "a=/tmp/x")
    assert r.code == 3 and r.err.startswith(f"p2pupd: refused: {key} is not a p2pupd root file")
    assert not (world.base / "s2").exists()
    r = run("verify", world.repo, "--trust", key)
    assert r.code == 3 and f"{key} is not a p2pupd root file" in r.err
