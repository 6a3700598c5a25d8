"""The apt-offline round trip, signed and minimal: site request -> publisher bundle
-> import brings the site up to date, and the bundle holds no blob the site had.
Also: carrying updates from one site's state to the next, and stick re-use."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from _sneaker import V1, V2, carried_blobs, installed_version, rand, store_blobs
from _store import drop
from conftest import World, tree_snapshot

from p2pupd.daemon.store.packstore import PackStore
from p2pupd.protocol.request import verify_request
from p2pupd.tools.publisher.repo import Repo

V3 = {**V2, "etc/b.conf": b"b=2\n", "data/new.bin": rand(2, 300_000)[:-1000] + rand(3, 5000)}


def bundle_blobs(bundle: Path) -> set[str]:
    """Every blob the bundle carries for its releases (chunks, patches, hooks; packed or not)."""
    if not (bundle / "index.json").exists():
        return set()
    return set(carried_blobs(bundle))


def parts_or_none(bundle: Path) -> list[Path]:
    """The files of the releases' blob layers (packs included)."""
    idx = json.loads((bundle / "index.json").read_text())
    out = []
    for d in idx["manifests"]:
        art = json.loads((bundle / "blobs/sha256" / d["digest"][7:]).read_text())
        if art["artifactType"] == "application/vnd.p2pupd.release.v1":
            out += [bundle / "blobs/sha256" / x["digest"][7:] for x in art["layers"][1:]]
    return out


def held_chunks(w: World, serial: int) -> set[str]:
    man, _ = Repo(w.repo).release("app", serial)
    return {c.hex() for c in man.chunk_digests()}


@pytest.fixture
def site_at_v1(world: World) -> World:
    world.publish("1.0", V1)
    assert world.import_(world.export("usb1"), "--apply").code == 0
    world.publish("2.0", V2)
    world.publish("3.0", V3)
    return world


def test_request_roundtrip_brings_site_up_to_date_with_a_minimal_bundle(site_at_v1: World) -> None:
    w = site_at_v1
    stick = w.base / "stick"
    stick.mkdir()
    r = w.run("export", "--request", stick, "--state-dir", w.state, "--json")
    assert r.code == 0, r.err
    req_path = Path(json.loads(r.out)["request"])
    req, _ = verify_request(req_path.read_bytes())
    assert req.node_id.hex() == json.loads(r.out)["node_id"]
    assert len(req_path.read_bytes()) < 2048  # held releases are listed, not their chunks

    r = w.run(
        "export", w.repo, stick, "--for", stick, "--json"
    )  # the same stick, request beside it
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert [x["version"] for x in doc["releases"]] == ["3.0"]
    assert doc["for_node"] == req.node_id.hex()

    carried = bundle_blobs(stick)
    had = set(store_blobs(w.state)) | held_chunks(w, 1)
    assert carried and not carried & had, "the bundle carries a blob the site already had"
    full = w.export("full")
    assert sum(p.stat().st_size for p in parts_or_none(stick)) < sum(
        p.stat().st_size for p in parts_or_none(full)
    )

    r = w.import_(stick, "--apply", "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["for_node"] == req.node_id.hex()
    assert out["releases"][0]["complete"] and out["applied"][0]["version"] == "3.0"
    assert installed_version(w) == "3.0"
    assert tree_snapshot(w.target) == tree_snapshot(w.base / "src" / "3.0")


def test_up_to_date_site_gets_an_empty_bundle(site_at_v1: World) -> None:
    w = site_at_v1
    assert w.import_(w.export("usb3"), "--apply").code == 0
    assert w.run("export", "--request", w.base / "req", "--state-dir", w.state).code == 0
    r = w.run("export", w.repo, w.base / "b", "--for", w.base / "req", "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["releases"] == [] and "up to date" in doc["notes"][0]
    assert w.import_(w.base / "b").code == 0


def test_request_from_a_node_of_another_repository_is_refused(site_at_v1: World) -> None:
    w = site_at_v1
    assert w.run("export", "--request", w.base / "req", "--state-dir", w.state).code == 0
    for k in ("r", "k"):
        assert w.run("keygen", w.base / f"{k}.key").code == 0
    r = w.run(
        "repo",
        "init",
        w.base / "repo2",
        "--root-key",
        w.base / "r.key",
        "--release-key",
        w.base / "k.key",
    )
    assert r.code == 0
    r = w.run("export", w.base / "repo2", w.base / "b", "--for", w.base / "req")
    assert r.code == 3 and "another repository" in r.err and len(r.err.splitlines()) == 1


def second_site(w: World, name: str) -> tuple[Path, Path]:
    st, target = w.base / f"{name}-state", w.base / f"{name}-target" / "app"
    target.parent.mkdir()
    r = w.run(
        "init",
        "--state-dir",
        st,
        "--trust",
        w.repo / "root.msgpack",
        "--component",
        f"app={target}",
    )
    assert r.code == 0, r.err
    return st, target


def test_one_site_carries_updates_on_to_the_next(site_at_v1: World) -> None:
    """Site A exports from its own state, even after its store was trimmed (the
    chunks are read back from its installed files); site B imports and applies."""
    w = site_at_v1
    assert w.import_(w.export("usb3"), "--apply").code == 0
    # A store collected after apply: only the installed files remain.
    drop(w.state, set(PackStore(w.state).iter_digests()))
    r = w.run("export", "--state-dir", w.state, w.base / "carry", "--json")
    assert r.code == 0, r.err
    assert [x["version"] for x in json.loads(r.out)["releases"]] == ["3.0"]

    st_b, target_b = second_site(w, "b")
    r = w.run("import", w.base / "carry", "--state-dir", st_b, "--apply")
    assert r.code == 0, r.err
    assert tree_snapshot(target_b) == tree_snapshot(w.base / "src" / "3.0")


def test_site_to_site_minimal_bundle_for_a_request(site_at_v1: World) -> None:
    """Site B (at v1) asks site A (at v3) for what it lacks."""
    w = site_at_v1
    st_b, target_b = second_site(w, "b")
    assert w.run("import", w.base / "usb1", "--state-dir", st_b, "--apply").code == 0
    assert w.import_(w.export("usb3"), "--apply").code == 0
    assert w.run("export", "--request", w.base / "req-b", "--state-dir", st_b).code == 0
    r = w.run("export", "--state-dir", w.state, w.base / "ab", "--for", w.base / "req-b")
    assert r.code == 0, r.err
    assert not bundle_blobs(w.base / "ab") & (set(store_blobs(st_b)) | held_chunks(w, 1))
    r = w.run("import", w.base / "ab", "--state-dir", st_b, "--apply")
    assert r.code == 0, r.err
    assert tree_snapshot(target_b) == tree_snapshot(w.base / "src" / "3.0")


def test_any_node_accepts_a_bundle_cut_for_another_node(site_at_v1: World) -> None:
    w = site_at_v1
    st_b, _ = second_site(w, "b")
    assert w.run("export", "--request", w.base / "req-b", "--state-dir", st_b).code == 0
    assert w.run("export", w.repo, w.base / "for-b", "--for", w.base / "req-b").code == 0
    assert w.import_(w.base / "for-b").code == 3
    r = w.import_(w.base / "for-b", "--any-node", "--apply")
    assert r.code == 0, r.err
    assert installed_version(w) == "3.0"


def test_stick_reused_for_a_new_export_holds_no_stale_blobs(site_at_v1: World) -> None:
    w = site_at_v1
    stick = w.base / "stick"
    assert w.run("export", w.repo, stick, "--history", "3").code == 0
    assert w.run("export", w.repo, stick).code == 0  # newest only: older blobs must go
    names = {p.name for p in (stick / "blobs" / "sha256").iterdir()}
    assert {p.name for p in parts_or_none(stick)} <= names
    assert w.import_(stick, "--apply").code == 0


def test_os_debris_on_the_stick_is_ignored(site_at_v1: World) -> None:
    w = site_at_v1
    stick = w.export("usb3")
    (stick / "System Volume Information").mkdir()
    (stick / "blobs" / "sha256" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (stick / "blobs" / "sha256" / "._0123").write_bytes(b"AppleDouble")
    shutil.copy(w.base / "usb1" / "index.json", stick / "index.json.old")
    r = w.import_(stick, "--apply")
    assert r.code == 0, r.err
    assert installed_version(w) == "3.0"


def check_oci_layout(bundle: Path) -> int:
    """Walk the bundle as a generic OCI tool would; return how many blobs it references.

    Every descriptor must name an existing blob of that size and sha256, every
    manifest must be an image manifest with a config blob, and blobs/sha256
    must hold exactly the referenced blobs.
    """
    assert json.loads((bundle / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((bundle / "index.json").read_text())
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    seen: set[str] = set()

    def fetch(desc: dict[str, object]) -> bytes:
        digest = str(desc["digest"])
        algo, _, hexd = digest.partition(":")
        data = (bundle / "blobs" / algo / hexd).read_bytes()
        assert len(data) == desc["size"] and hashlib.sha256(data).hexdigest() == hexd
        seen.add(hexd)
        return data

    for m in index["manifests"]:
        assert m["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
        man = json.loads(fetch(m))
        assert man["schemaVersion"] == 2 and man["mediaType"] == m["mediaType"]
        assert man["artifactType"].startswith("application/vnd.p2pupd.")
        assert fetch(man["config"]) == b"{}"
        for layer in man["layers"]:
            fetch(layer)
    assert {p.name for p in (bundle / "blobs" / "sha256").iterdir()} == seen
    return len(seen)


def test_bundles_are_valid_oci_image_layouts(site_at_v1: World) -> None:
    w = site_at_v1
    assert check_oci_layout(w.export("full", "--history", "2")) > 10
    assert w.run("export", "--request", w.base / "req", "--state-dir", w.state).code == 0
    assert w.run("export", w.repo, w.base / "min", "--for", w.base / "req").code == 0
    assert check_oci_layout(w.base / "min") > 3
    assert w.run("export", "--state-dir", w.state, w.base / "node").code == 0
    assert check_oci_layout(w.base / "node") > 3


def test_a_bundle_cut_for_the_old_id_imports_after_the_id_migrated(site_at_v1: World) -> None:
    """A node of an older version had a random id; its daemon now derives the id
    from the node key (proof in the Hello), keeping the old one for such bundles."""
    from dataclasses import replace

    from p2pupd.daemon.bundles.siterequest import node_identity
    from p2pupd.daemon.state.node import Node
    from p2pupd.protocol.fleet.identity import node_id_of

    w = site_at_v1
    node = Node(w.state)
    legacy = bytes(range(16))  # as an older version left it: random, not the key's
    node.state.write_config(replace(node.config, node_id=legacy, former_node_ids=()))
    stick = w.base / "stick"
    stick.mkdir()
    r = w.run("export", "--request", stick, "--state-dir", w.state, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["node_id"] == legacy.hex()

    node = Node(w.state)
    with node.lock:
        key = node_identity(node)  # what the daemon does at start
    assert node.config.node_id == key.node_id == node_id_of(key.public_key) != legacy
    assert Node(w.state).config.former_node_ids == (legacy,)

    r = w.run("export", w.repo, stick, "--for", stick, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["for_node"] == legacy.hex()
    r = w.import_(stick, "--apply")
    assert r.code == 0, r.err  # the request was this node's, under its old id
    assert installed_version(w) == "3.0"
