"""One test per attack on the offline path: each is refused with exit code 3,
one clear line on stderr, and the node's state and target tree unchanged."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
from _sneaker import holder
from conftest import World, make_tree, tree_snapshot

from p2pupd.protocol import encoding
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.trust import RELEASE_TYPE, ROOT_TYPE, Envelope, Role, Root, key_id, sign
from p2pupd.tools.publisher.export import ReleaseSource, write_bundle
from p2pupd.tools.publisher.keys import generate, load_private
from p2pupd.tools.publisher.repo import Repo

V1 = {"a.txt": b"one\n", "lib/data.bin": bytes(range(256)) * 300}
V2 = {"a.txt": b"two\n", "lib/data.bin": bytes(range(256)) * 300, "new.txt": b"new\n"}


@pytest.fixture
def installed(world: World) -> World:
    """A node with v1 installed from a bundle."""
    world.publish("1.0", V1)
    r = world.import_(world.export("usb1"), "--apply")
    assert r.code == 0, r.err
    return world


def craft_bundle(
    w: World, name: str, man: Manifest, env: Envelope, roots: dict[int, bytes] | None = None
) -> Path:
    repo = Repo(w.repo)
    dest = w.base / name
    write_bundle(
        dest,
        roots if roots is not None else repo.roots(),
        [ReleaseSource(man, env, man.blob_sizes())],
        repo.store,
    )
    return dest


def next_manifest(
    w: World, version: str = "2.0", files: dict[str, bytes] | None = None, serial: int | None = None
) -> Manifest:
    """Publish a real release so its blobs exist, then return its manifest."""
    w.publish(version, files or V2)
    repo = Repo(w.repo)
    man, _ = repo.release("app", repo.serials("app")[-1])
    return man if serial is None else dataclasses.replace(man, serial=serial)


def release_keys(w: World) -> list:
    return [load_private(w.key("rel1")), load_private(w.key("rel2"))]


def assert_refused(
    w: World, bundle: Path, before: tuple[object, object], words: str, *extra: str
) -> None:
    r = w.import_(bundle, "--apply", *extra)
    assert r.code == 3, (r.code, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.err, r.err
    assert words in lines[0], lines[0]
    assert_unchanged(w, before)


def assert_unchanged(w: World, before: tuple[object, object]) -> None:
    """Installed versions, trust, releases and state are as they were; every
    stored blob is intact (an import may leave complete, verified blobs behind
    for a resumed import, but never a changed or partial one)."""
    state_before, tree_before = before
    state_after, tree_after = w.snapshot()
    assert tree_after == tree_before
    assert isinstance(state_before, dict) and isinstance(state_after, dict)

    def meta(snap: dict) -> dict:
        return {k: v for k, v in snap.items() if not k.startswith("blobs/")}

    assert meta(state_after) == meta(state_before)
    for k, v in state_before.items():
        if k.startswith("blobs/"):
            assert state_after[k] == v
    for k, v in state_after.items():
        if k.startswith("blobs/sha256/"):
            assert v[2] == k.rsplit("/", 1)[1], f"{k} does not match its name"


def test_bad_signature(installed: World) -> None:
    w = installed
    man = next_manifest(w)
    good = sign(RELEASE_TYPE, man.encode(), release_keys(w))
    forged = Envelope(good.payload, tuple((k, bytes(64)) for k, _ in good.signatures))
    before = w.snapshot()
    assert_refused(w, craft_bundle(w, "b", man, forged), before, "does not verify")


def test_signatures_below_threshold(installed: World) -> None:
    w = installed
    man = next_manifest(w)
    env = sign(RELEASE_TYPE, man.encode(), release_keys(w)[:1])
    before = w.snapshot()
    assert_refused(w, craft_bundle(w, "b", man, env), before, "1 valid signature(s), 2 required")


def test_signature_by_unknown_key(installed: World) -> None:
    w = installed
    man = next_manifest(w)
    generate(w.base / "keys" / "stranger.key")
    env = sign(RELEASE_TYPE, man.encode(), [load_private(w.base / "keys" / "stranger.key")])
    before = w.snapshot()
    assert_refused(w, craft_bundle(w, "b", man, env), before, "does not list")


def test_duplicate_signatures_do_not_meet_threshold(installed: World) -> None:
    w = installed
    man = next_manifest(w)
    one = sign(RELEASE_TYPE, man.encode(), release_keys(w)[:1])
    env = Envelope(one.payload, one.signatures * 2)
    before = w.snapshot()
    assert_refused(w, craft_bundle(w, "b", man, env), before, "2 required")


def test_lower_serial_is_rollback(installed: World) -> None:
    w = installed
    w.publish("2.0", V2)
    assert w.import_(w.export("usb2"), "--apply").code == 0
    repo = Repo(w.repo)
    old_man, old_env = repo.release("app", 1)
    before = w.snapshot()
    assert_refused(w, craft_bundle(w, "b", old_man, old_env), before, "not newer")


def test_equal_serial_other_content_is_rollback(installed: World) -> None:
    w = installed
    man = next_manifest(w, "1.0-evil", serial=1)
    env = sign(RELEASE_TYPE, man.encode(), release_keys(w))
    before = w.snapshot()
    assert_refused(w, craft_bundle(w, "b", man, env), before, "not newer")


def test_expired_release(installed: World, monkeypatch: pytest.MonkeyPatch) -> None:
    w = installed
    src = w.base / "src2"
    src.mkdir()
    (src / "a.txt").write_bytes(b"two\n")
    assert w.run("publish", w.repo, "app", "2.0", src, "--expires-days", "1").code == 0
    bundle = w.export("usb2")
    before = w.snapshot()
    monkeypatch.setenv("P2PUPD_NOW", str(int(time.time()) + 3 * 86400))
    assert_refused(w, bundle, before, "expired")


def test_manifest_for_another_component_swapped_in(installed: World) -> None:
    w = installed
    man = dataclasses.replace(next_manifest(w), component="other")
    env = sign(RELEASE_TYPE, man.encode(), release_keys(w))
    bundle = craft_bundle(w, "b", man, env)
    # Relabel the artifact as a release of "app": the mix-and-match attack.
    idx = (bundle / "index.json").read_text().replace('"other"', '"app"')
    art_digest = None
    import json

    from p2pupd.protocol import ids

    doc = json.loads(idx)
    for d in doc["manifests"]:
        p = bundle / "blobs" / "sha256" / d["digest"].split(":")[1]
        art = p.read_text()
        if '"other"' in art:
            new = art.replace('"other"', '"app"').encode()
            h = ids.sha256(new).hex()
            (bundle / "blobs" / "sha256" / h).write_bytes(new)
            d["digest"], d["size"] = "sha256:" + h, len(new)
            art_digest = h
    assert art_digest
    (bundle / "index.json").write_text(json.dumps(doc))
    before = w.snapshot()
    assert_refused(w, bundle, before, "signed manifest is for 'other'")


def test_blob_bytes_do_not_match_name(installed: World) -> None:
    w = installed
    w.publish("2.0", V2)
    bundle = w.export("usb2")
    man, _ = Repo(w.repo).release("app", 2)
    chunk = next(c.digest for f in man.files if f.path == "new.txt" for c in f.chunks)
    p = holder(bundle, chunk)  # a 4-byte file's chunk travels in a pack
    p.chmod(0o644)
    p.write_bytes(p.read_bytes().replace(b"new\n", b"NEW\n"))
    before = w.snapshot()
    assert_refused(w, bundle, before, "does not match")


def test_file_hash_mismatch_in_signed_manifest(installed: World) -> None:
    """A release whose signed file hash disagrees with its chunks (a buggy or
    compromised publisher) is stored but refused at staging; nothing goes live."""
    w = installed
    man = next_manifest(w)
    files = tuple(
        dataclasses.replace(f, sha256=bytes(32)) if f.path == "new.txt" else f for f in man.files
    )
    man = dataclasses.replace(man, files=files, serial=man.serial + 1)
    env = sign(RELEASE_TYPE, man.encode(), release_keys(w))
    before_tree = tree_snapshot(w.target)
    r = w.import_(craft_bundle(w, "b", man, env), "--apply")
    assert r.code == 3, r.err
    assert "does not match its sha256" in r.err and len(r.err.strip().splitlines()) == 1
    assert tree_snapshot(w.target) == before_tree
    assert not list(w.target.parent.glob(".app.p2pupd-stage*"))


def _root_v2(w: World, signers: list[str], new_keys: list[str]) -> bytes:
    cur = Repo(w.repo).trusted().root
    pubs = {
        key_id(load_private(w.key(k)).public_key().public_bytes_raw()): load_private(w.key(k))
        .public_key()
        .public_bytes_raw()
        for k in new_keys
    }
    keys = dict(pubs)
    rel = cur.roles["release"]
    keys.update({k: cur.keys[k] for k in rel.keyids})
    root = Root(
        version=2,
        keys=keys,
        roles={"root": Role(tuple(sorted(pubs)), 2), "release": rel},
        name=cur.name,
    )
    return sign(ROOT_TYPE, root.encode(), [load_private(w.key(k)) for k in signers]).encode()


def test_root_rotation_without_old_threshold(installed: World) -> None:
    w = installed
    for k in ("new1", "new2"):
        generate(w.key(k))
    forged = _root_v2(w, ["root1", "new1", "new2"], ["new1", "new2"])  # 1 of 2 old keys
    man = next_manifest(w)
    env = sign(RELEASE_TYPE, man.encode(), release_keys(w))
    roots = {**Repo(w.repo).roots(), 2: forged}
    before = w.snapshot()
    assert_refused(w, craft_bundle(w, "b", man, env, roots), before, "old keys")


def test_valid_root_rotation_accepted(installed: World) -> None:
    w = installed
    for k in ("new1", "new2"):
        generate(w.key(k))
    r = w.run(
        "repo",
        "rotate-root",
        w.repo,
        "--old-key",
        w.key("root1"),
        "--old-key",
        w.key("root2"),
        "--root-key",
        w.key("new1"),
        "--root-key",
        w.key("new2"),
        "--threshold",
        "2",
    )
    assert r.code == 0, r.err
    w.publish("2.0", V2)
    r = w.import_(w.export("usb2"), "--apply")
    assert r.code == 0, r.err
    st = w.run("status", "--state-dir", w.state, "--json")
    import json

    doc = json.loads(st.out)
    assert doc["root_version"] == 2
    assert doc["components"]["app"]["version"] == "2.0"


def test_release_keys_replaced_by_rotation_publish_and_install(installed: World) -> None:
    """After a rotation that replaces the release keys, the next publish (which reads
    the releases signed under the old keys for its serial and deltas) works, and a
    node pinned to the old root walks to the new one and installs it."""
    w = installed
    w.publish("2.0", V2)  # signed by rel1+rel2 under root v1
    generate(w.key("rel3"))
    r = w.run(
        "repo", "rotate-root", w.repo, "--old-key", w.key("root1"), "--old-key", w.key("root2"),
        "--root-key", w.key("root1"), "--root-key", w.key("root2"), "--threshold", "2",
        "--release-key", w.key("rel3"), "--release-threshold", "1",
    )  # fmt: skip
    assert r.code == 0, r.err
    src = make_tree(w.base / "src" / "3.0", {**V2, "etc/new.conf": b"three\n"})
    r = w.run("publish", w.repo, "app", "3.0", src, "--key", w.key("rel3"), "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["serial"] == 3
    # The old releases are still verified -- under the root that signed them.
    repo = Repo(w.repo)
    assert [repo.release("app", serial)[0].version for serial in (1, 2)] == ["1.0", "2.0"]
    r = w.import_(w.export("usb3"), "--apply")
    assert r.code == 0, r.err
    assert w.app_status()["version"] == "3.0"
    # A release signed by the retired keys after the rotation is still refused by nodes.
    man = dataclasses.replace(Repo(w.repo).release("app", 3)[0], serial=4, version="4.0")
    env = sign(RELEASE_TYPE, encoding.encode(man.to_value()), release_keys(w))
    before = w.snapshot()
    assert_refused(w, craft_bundle(w, "retired", man, env), before, "does not list")


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../x", "a\x00b", "a\nb", "a//b", "."])
def test_hostile_path_in_signed_manifest_refused_at_import(installed: World, bad: str) -> None:
    w = installed
    man = next_manifest(w)
    v = man.to_value()
    v["files"][0][0] = bad
    v["serial"] = man.serial + 1
    payload = encoding.encode(v)
    env = sign(RELEASE_TYPE, payload, release_keys(w))
    repo = Repo(w.repo)
    dest = w.base / "hostile"
    write_bundle(dest, repo.roots(), [ReleaseSource(man, env, man.blob_sizes())], repo.store)
    before = w.snapshot()
    assert_refused(w, dest, before, "refused")
    assert not (w.base / "x").exists()


def test_hostile_name_refused_at_publish(world: World) -> None:
    src = world.base / "evil"
    src.mkdir()
    (src / "ok.txt").write_bytes(b"x")
    (src / "bad\nname").write_bytes(b"x")
    r = world.run("publish", world.repo, "app", "1.0", src)
    assert r.code == 3
    assert "control character" in r.err and len(r.err.strip().splitlines()) == 1
    assert Repo(world.repo).serials("app") == []


def test_entry_beneath_symlink_refused(installed: World) -> None:
    """A signed manifest may not place a file beneath one of its symlinks
    (the link would redirect the write outside the tree)."""
    w = installed
    man = next_manifest(w)
    v = man.to_value()
    v["symlinks"] = [["lib", "/etc"]]
    v["dirs"] = [d for d in v["dirs"] if d[0] != "lib"]
    v["files"] = [f for f in v["files"] if not f[0].startswith("lib/")]
    v["files"].append(
        [
            "lib/passwd",
            0o644,
            0,
            bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
            0,
            [],
        ]
    )
    v["files"].sort()
    v["serial"] = man.serial + 1
    env = sign(RELEASE_TYPE, encoding.encode(v), release_keys(w))
    repo = Repo(w.repo)
    dest = w.base / "b"
    write_bundle(dest, repo.roots(), [ReleaseSource(man, env, man.blob_sizes())], repo.store)
    before = w.snapshot()
    assert_refused(w, dest, before, "beneath a symlink")
