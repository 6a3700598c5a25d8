"""Release envelopes carried as patches in delta-only bundles.

A ``--from-version`` or ``--for`` bundle carries the new signed envelope as a
patch against the envelope the node holds (bsdiff4, or zstd with the held
envelope as dictionary), when that is smaller. On a tree of many small files
with a few edits the envelope is most of the bundle, so this is what makes such
a bundle small. The node rebuilds the envelope from its stored copy, checks the
result's sha256 and size, and then verifies it as a whole one: a corrupted
patch, a wrong result, a forged envelope and a missing base are each refused
with one line and nothing changed. Such a bundle also leaves out the roots the
node already trusts.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _sneaker import assert_refused, installed_version, parts, snapshot, status
from conftest import World, make_tree, tree_snapshot
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pupd.protocol import bundle as oci
from p2pupd.protocol import ids, limits
from p2pupd.protocol.errors import SchemaError
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.patchcodec import encode_dict_patch, encode_patch
from p2pupd.protocol.trust import RELEASE_TYPE, ROOT_TYPE, Envelope, Role, Root, key_id, sign
from p2pupd.tools.publisher.export import HeldEnvelope, ReleaseSource, receiver_root
from p2pupd.tools.publisher.keys import generate

ENCODERS = {
    oci.RELEASE_PATCH_MEDIA_TYPE: encode_patch,
    oci.RELEASE_ZPATCH_MEDIA_TYPE: encode_dict_patch,
}

FILES = 400


def small_tree(seed: int) -> dict[str, bytes]:
    r = random.Random(seed)
    return {
        f"share/d{i % 20:02d}/f{i:04d}.txt": b"line %d\n" % i + r.randbytes(r.randint(100, 1500))
        for i in range(FILES)
    }


V1 = small_tree(1)
V2 = dict(V1)
for _i in range(0, FILES, 40):  # 10 edited files
    _p = f"share/d{_i % 20:02d}/f{_i:04d}.txt"
    V2[_p] = V2[_p][:50] + b"edited in 2.0\n" + V2[_p][50:]
V2["share/new.txt"] = b"added in 2.0\n"
del V2["share/d01/f0001.txt"]
V3 = dict(V2, **{"share/d00/f0000.txt": b"3.0\n"})


# -- bundle surgery -----------------------------------------------------------------


def _blob(bundle: Path, digest: str) -> Path:
    return bundle / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _put(bundle: Path, data: bytes) -> str:
    hexd = hashlib.sha256(data).hexdigest()
    _blob(bundle, hexd).write_bytes(data)
    return "sha256:" + hexd


def release_layer(bundle: Path) -> tuple[dict[str, Any], bytes]:
    """Return (descriptor, bytes) of the first layer of the bundle's release artifact."""
    idx = json.loads((bundle / "index.json").read_text())
    for d in idx["manifests"]:
        art = json.loads(_blob(bundle, d["digest"]).read_text())
        if art["artifactType"] == oci.RELEASE_ARTIFACT:
            layer = art["layers"][0]
            return layer, _blob(bundle, layer["digest"]).read_bytes()
    raise AssertionError("no release artifact")


def rewrite_first_layer(
    bundle: Path,
    data: bytes | None = None,
    annotations: dict[str, str] | None = None,
    media_type: str | None = None,
) -> None:
    """Replace the release artifact's first layer (bytes and/or annotations) and
    re-seal the OCI metadata, as a tamperer with write access to the stick would."""
    idx = json.loads((bundle / "index.json").read_text())
    for d in idx["manifests"]:
        art_path = _blob(bundle, d["digest"])
        art = json.loads(art_path.read_text())
        if art["artifactType"] != oci.RELEASE_ARTIFACT:
            continue
        layer = art["layers"][0]
        if data is not None:
            _blob(bundle, layer["digest"]).unlink()
            layer["digest"], layer["size"] = _put(bundle, data), len(data)
        layer["annotations"].update(annotations or {})
        layer["mediaType"] = media_type or layer["mediaType"]
        raw = json.dumps(art, sort_keys=True, separators=(",", ":")).encode()
        art_path.unlink()
        d["digest"], d["size"] = _put(bundle, raw), len(raw)
    index = bundle / "index.json"
    os.chmod(index, 0o644)
    index.write_text(json.dumps(idx, sort_keys=True, separators=(",", ":")))


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture
def at_v1(world: World) -> World:
    world.publish("1.0", V1)
    r = world.import_(world.export("usb1"), "--apply")
    assert r.code == 0, r.err
    world.publish("2.0", V2)
    return world


def envelope_file(w: World, serial: int) -> bytes:
    return (w.repo / "releases" / "app" / f"{serial}.msgpack").read_bytes()


# -- the good path ------------------------------------------------------------------


def test_stored_envelope_is_the_publishers_bytes(at_v1: World) -> None:
    """The base is found by sha256, so the node must store the very bytes."""
    stored = (at_v1.state / "releases" / "app" / "1.msgpack").read_bytes()
    assert stored == envelope_file(at_v1, 1)
    assert Envelope.decode(stored, limits.MAX_MANIFEST_BYTES).encode() == stored


def test_from_version_bundle_carries_a_small_patch_and_applies(at_v1: World) -> None:
    w = at_v1
    dest = w.export("usb2", "--from-version", "1.0")
    layer, patch = release_layer(dest)
    env2 = envelope_file(w, 2)
    assert layer["mediaType"] in oci.RELEASE_PATCH_MEDIA_TYPES
    ann = layer["annotations"]
    assert ann[oci.ANNOTATION_PATCH_BASE] == "sha256:" + ids.sha256(envelope_file(w, 1)).hex()
    assert ann[oci.ANNOTATION_PATCH_RESULT] == "sha256:" + ids.sha256(env2).hex()
    assert ann[oci.ANNOTATION_PATCH_RESULT_SIZE] == str(len(env2))
    assert ann[oci.ANNOTATION_PATCH_BASE_VERSION] == "1.0"
    assert len(patch) * 8 < len(env2), (len(patch), len(env2))
    r = w.import_(dest, "--apply")
    assert r.code == 0, r.err
    assert tree_snapshot(w.target) == tree_snapshot(w.base / "src" / "2.0")
    assert (w.state / "releases" / "app" / "2.msgpack").read_bytes() == env2
    assert installed_version(w) == "2.0"


def test_for_request_bundle_carries_a_patch(at_v1: World) -> None:
    w = at_v1
    req = w.base / "req.msgpack"
    assert w.run("export", "--request", req, "--state-dir", w.state).code == 0
    dest = w.base / "usb-for"
    r = w.run("export", w.repo, dest, "--for", req)
    assert r.code == 0, r.err
    layer, _ = release_layer(dest)
    assert layer["mediaType"] in oci.RELEASE_PATCH_MEDIA_TYPES
    assert layer["annotations"][oci.ANNOTATION_PATCH_BASE_SERIAL] == "1"
    r = w.import_(dest, "--apply")
    assert r.code == 0, r.err
    assert tree_snapshot(w.target) == tree_snapshot(w.base / "src" / "2.0")


@pytest.mark.parametrize("media_type", sorted(ENCODERS))
def test_either_patch_form_rebuilds_the_envelope(at_v1: World, media_type: str) -> None:
    """The exporter picks the smaller form; a node takes both (and a bundle
    written before the zstd form existed)."""
    w = at_v1
    dest = w.export("usb2", "--from-version", "1.0")
    patch = ENCODERS[media_type](envelope_file(w, 1), envelope_file(w, 2))
    rewrite_first_layer(dest, patch, media_type=media_type)
    r = w.import_(dest, "--apply")
    assert r.code == 0, r.err
    assert tree_snapshot(w.target) == tree_snapshot(w.base / "src" / "2.0")


def test_zstd_form_is_smaller_on_many_small_files(at_v1: World) -> None:
    """New digests recur in the new envelope (file, chunk, delta target): zstd
    copies them, bsdiff cannot."""
    base, new = envelope_file(at_v1, 1), envelope_file(at_v1, 2)
    assert len(encode_dict_patch(base, new)) < len(encode_patch(base, new))
    layer, _ = release_layer(at_v1.export("usb2", "--from-version", "1.0"))
    assert layer["mediaType"] == oci.RELEASE_ZPATCH_MEDIA_TYPE


def test_from_version_bundle_leaves_out_roots_the_node_trusts(at_v1: World) -> None:
    w = at_v1
    dest = w.export("usb2", "--from-version", "1.0")
    assert parts(dest).trust_artifact is None
    full = parts(w.export("usb-full"))
    assert full.trust_artifact is not None and len(full.roots) == 1


def test_from_version_bundle_carries_roots_newer_than_the_held_release(at_v1: World) -> None:
    """Release 1.0 was signed under root v1, so the node trusts v1 or later:
    v2, made after it, travels, and the node rotates to it."""
    w = at_v1
    for k in ("new1", "new2"):
        generate(w.key(k))
    r = w.run(
        "repo", "rotate-root", w.repo, "--old-key", w.key("root1"), "--old-key", w.key("root2"),
        "--root-key", w.key("new1"), "--root-key", w.key("new2"),
    )  # fmt: skip
    assert r.code == 0, r.err
    w.publish("3.0", V3)
    dest = w.export("usb3", "--from-version", "1.0")
    roots = parts(dest).roots
    assert [p.read_bytes() for p in roots] == [(w.repo / "roots" / "2.msgpack").read_bytes()]
    r = w.import_(dest, "--apply", "--json")
    assert r.code == 0, r.err
    assert status(w)["root_version"] == 2
    assert installed_version(w) == "3.0"


def test_roots_left_out_are_those_the_held_release_proves() -> None:
    """A node holding a release trusts at least the lowest root whose release
    keys sign it: the roots up to that one stay home, later ones travel."""
    root_key, rel_a, rel_b = (Ed25519PrivateKey.generate() for _ in range(3))

    def root(version: int, rel: Ed25519PrivateKey) -> bytes:
        pubs = [k.public_key().public_bytes_raw() for k in (root_key, rel)]
        doc = Root(
            version,
            {key_id(p): p for p in pubs},
            {"root": Role((key_id(pubs[0]),), 1), "release": Role((key_id(pubs[1]),), 1)},
        )
        return sign(ROOT_TYPE, doc.encode(), [root_key]).encode()

    roots = {1: root(1, rel_a), 2: root(2, rel_b), 3: root(3, rel_b)}
    man = Manifest("app", "1.0", 1, 0, ())

    def held_by(signer: Ed25519PrivateKey) -> list[ReleaseSource]:
        env = sign(RELEASE_TYPE, man.encode(), [signer])
        return [ReleaseSource(man, env, {}, HeldEnvelope(1, "1.0", env))]

    assert receiver_root(roots, held_by(rel_b)) == 2  # signed under v2 (and v3): v3 travels
    assert receiver_root(roots, held_by(rel_a)) == 1
    assert receiver_root(roots, held_by(Ed25519PrivateKey.generate())) == 0  # proves nothing
    no_base = ReleaseSource(man, sign(RELEASE_TYPE, man.encode(), [rel_b]), {})
    assert receiver_root(roots, [no_base]) == 0  # a full export carries the whole chain


def test_full_export_still_carries_whole_envelopes(at_v1: World) -> None:
    layer, data = release_layer(at_v1.export("usb-full"))
    assert layer["mediaType"] == oci.RELEASE_MEDIA_TYPE
    assert data == envelope_file(at_v1, 2)


# -- refusals ---------------------------------------------------------------------


def test_corrupted_patch_is_refused(at_v1: World) -> None:
    w = at_v1
    dest = w.export("usb2", "--from-version", "1.0")
    _, patch = release_layer(dest)
    rewrite_first_layer(dest, patch[:-12])  # a truncated zstd frame, re-sealed
    before = snapshot(w)
    r = w.import_(dest, "--apply")
    assert_refused(r, "release patch for app 2.0 does not apply")
    assert snapshot(w) == before


def test_patch_with_wrong_result_hash_is_refused(at_v1: World) -> None:
    w = at_v1
    dest = w.export("usb2", "--from-version", "1.0")
    rewrite_first_layer(dest, annotations={oci.ANNOTATION_PATCH_RESULT: "sha256:" + "ab" * 32})
    before = snapshot(w)
    r = w.import_(dest, "--apply")
    assert_refused(r, "does not rebuild the envelope it names")
    assert snapshot(w) == before


@pytest.mark.parametrize("media_type", sorted(ENCODERS))
def test_patch_to_a_forged_envelope_fails_its_signature(at_v1: World, media_type: str) -> None:
    """A patch that rebuilds exactly what its annotations say is still only
    bytes: the rebuilt envelope must verify like a whole one."""
    w = at_v1
    dest = w.export("usb2", "--from-version", "1.0")
    base, good = envelope_file(w, 1), envelope_file(w, 2)
    env = Envelope.decode(good, limits.MAX_MANIFEST_BYTES)
    forged = Envelope(env.payload.replace(b"share/new.txt", b"share/EVL.txt"), env.signatures)
    assert forged.payload != env.payload
    data = forged.encode()
    rewrite_first_layer(
        dest,
        ENCODERS[media_type](base, data),
        {
            oci.ANNOTATION_PATCH_RESULT: "sha256:" + ids.sha256(data).hex(),
            oci.ANNOTATION_PATCH_RESULT_SIZE: str(len(data)),
        },
        media_type,
    )
    before = snapshot(w)
    r = w.import_(dest, "--apply")
    assert_refused(r, "signature")
    assert snapshot(w) == before


@pytest.mark.parametrize(
    ("mangle", "words"),
    [
        (lambda p: p + b"\0", "unused data"),  # trailing bytes after the frame
        (lambda p: p + p, "unused data"),  # a second frame
        (lambda p: p[:4] + bytes([p[4] ^ 0x20]) + p[5:], "does not apply"),  # header flags
    ],
)
def test_malformed_zstd_patch_is_refused(
    at_v1: World, mangle: Callable[[bytes], bytes], words: str
) -> None:
    w = at_v1
    dest = w.export("usb2", "--from-version", "1.0")
    patch = encode_dict_patch(envelope_file(w, 1), envelope_file(w, 2))
    rewrite_first_layer(dest, mangle(patch), media_type=oci.RELEASE_ZPATCH_MEDIA_TYPE)
    before = snapshot(w)
    r = w.import_(dest, "--apply")
    assert_refused(r, "release patch for app 2.0 does not apply")
    assert words in r.err
    assert snapshot(w) == before


def test_zstd_patch_declaring_another_size_is_refused(at_v1: World) -> None:
    """The frame's declared size must be the annotated one, before anything is allocated."""
    w = at_v1
    dest = w.export("usb2", "--from-version", "1.0")
    env2 = envelope_file(w, 2)
    rewrite_first_layer(
        dest,
        encode_dict_patch(envelope_file(w, 1), env2 + b"x"),
        media_type=oci.RELEASE_ZPATCH_MEDIA_TYPE,
    )
    before = snapshot(w)
    r = w.import_(dest, "--apply")
    assert_refused(r, f"zstd frame declares {len(env2) + 1} bytes, the patch names {len(env2)}")
    assert snapshot(w) == before


def test_missing_base_is_refused_with_exit_1(at_v1: World) -> None:
    w = at_v1
    w.publish("3.0", V3)
    dest = w.export("usb3", "--from-version", "2.0")  # this node holds 1.0 only
    before = snapshot(w)
    r = w.import_(dest, "--apply")
    assert_refused(
        r, "bundle was cut for a node holding app 2.0, which this node does not have", code=1
    )
    assert snapshot(w) == before


# -- format bounds ------------------------------------------------------------------


def _patch_desc(**ann: str) -> oci.Descriptor:
    base = {
        oci.ANNOTATION_PATCH_BASE: "sha256:" + "11" * 32,
        oci.ANNOTATION_PATCH_RESULT: "sha256:" + "22" * 32,
        oci.ANNOTATION_PATCH_RESULT_SIZE: "1000",
    }
    return oci.Descriptor(oci.RELEASE_PATCH_MEDIA_TYPE, b"\x33" * 32, 100, {**base, **ann})


def test_release_patch_annotations_are_bounded() -> None:
    got = oci.parse_release_patch(_patch_desc(**{oci.ANNOTATION_PATCH_BASE_SERIAL: "4"}))
    assert (got.result_size, got.base_serial) == (1000, 4)
    too_big = str(limits.MAX_MANIFEST_BYTES + 1)
    for bad in (
        {oci.ANNOTATION_PATCH_RESULT_SIZE: too_big},
        {oci.ANNOTATION_PATCH_RESULT_SIZE: "0"},
        {oci.ANNOTATION_PATCH_RESULT_SIZE: "-5"},
        {oci.ANNOTATION_PATCH_RESULT_SIZE: "1e3"},
        {oci.ANNOTATION_PATCH_BASE: "sha256:../../etc"},
        {oci.ANNOTATION_PATCH_RESULT: "md5:" + "22" * 16},
        {oci.ANNOTATION_PATCH_BASE_SERIAL: "x"},
        {oci.ANNOTATION_PATCH_BASE_VERSION: "1.0\nfake line"},
    ):
        with pytest.raises(SchemaError):
            oci.parse_release_patch(_patch_desc(**bad))
    huge = oci.Descriptor(
        oci.RELEASE_PATCH_MEDIA_TYPE, b"\x33" * 32, limits.MAX_MANIFEST_BYTES + 1,
        _patch_desc().annotations,
    )  # fmt: skip
    with pytest.raises(SchemaError):
        oci.parse_release_patch(huge)


def test_patch_artifact_must_name_its_component() -> None:
    art = oci.Artifact(oci.RELEASE_ARTIFACT, (_patch_desc(),), {})
    with pytest.raises(SchemaError, match="component"):
        oci.parse_artifact(oci.build_artifact(art))
    named = oci.Artifact(oci.RELEASE_ARTIFACT, (_patch_desc(),), {oci.ANNOTATION_COMPONENT: "app"})
    assert oci.release_patch(oci.parse_artifact(oci.build_artifact(named))) is not None


def test_patch_for_a_component_not_run_here_is_skipped(at_v1: World) -> None:
    """A bundle for a fleet may carry patched releases of components this node
    does not run: their missing base is not this node's problem."""
    w = at_v1
    for version, files in (("1.0", V1), ("2.0", V2)):
        src = make_tree(w.base / "other-src" / version, files)
        assert w.run("publish", w.repo, "other", version, src).code == 0
    dest = w.export("usb2", "--from-version", "1.0")
    r = w.import_(dest, "--apply", "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert "other 2.0: not configured on this node" in doc["skipped"]
    assert tree_snapshot(w.target) == tree_snapshot(w.base / "src" / "2.0")
