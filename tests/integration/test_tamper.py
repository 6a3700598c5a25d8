"""The tamper suite: one test per way a stick can be damaged or hostile.

Each imports a bundle through the real command line (``p2pupd import --apply``,
in-process) into a node that runs v1, and checks: exit code 3 (refused) or 1
(I/O), exactly one clear line on stderr and no traceback, and nothing changed
-- the whole state directory, every stored blob's bytes, the installed version
and the target tree are as they were.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _sneaker import (
    V1,
    V2,
    assert_refused,
    blob,
    flip_bit,
    installed_version,
    parts,
    snapshot,
    store_blobs,
    writable,
)
from _store import spooled, tail_records
from conftest import Run, World, make_tree

from p2pupd.daemon.bundles.reader import BundleReader
from p2pupd.daemon.fsutil import rename_exchange
from p2pupd.protocol import bundle as oci
from p2pupd.protocol import ids, limits
from p2pupd.protocol.request import sign_request, verify_request
from p2pupd.tools.commands import progress
from p2pupd.tools.publisher.export import ReleaseSource, write_bundle
from p2pupd.tools.publisher.keys import generate
from p2pupd.tools.publisher.repo import Repo


@dataclasses.dataclass
class Site:
    w: World
    usb1: Path  # v1, already imported
    usb2: Path  # v2, fresh


@pytest.fixture
def site(world: World) -> Site:
    world.publish("1.0", V1)
    usb1 = world.export("usb1")
    r = world.import_(usb1, "--apply")
    assert r.code == 0, r.err
    world.publish("2.0", V2)
    return Site(world, usb1, world.export("usb2"))


def refused(s: Site, bundle: Path, words: str, code: int = 3) -> None:
    before = snapshot(s.w)
    assert_refused(s.w.import_(bundle, "--apply"), words, code)
    assert snapshot(s.w) == before
    assert installed_version(s.w) == "1.0"


def replace_artifact(bundle: Path, old: Path, art: dict[str, object]) -> None:
    """Write ``art`` as a new artifact blob and point index.json at it instead of ``old``."""
    data = json.dumps(art, sort_keys=True, separators=(",", ":")).encode()
    h = ids.sha256(data).hex()
    blob(bundle, h).write_bytes(data)
    writable(old).unlink()
    doc = json.loads((bundle / "index.json").read_text())
    for d in doc["manifests"]:
        if d["digest"] == f"sha256:{old.name}":
            d["digest"], d["size"] = f"sha256:{h}", len(data)
    (bundle / "index.json").write_text(json.dumps(doc))


# -- a bit flipped in every kind of file -------------------------------------------


def test_bit_flip_in_oci_layout(site: Site) -> None:
    flip_bit(site.usb2 / "oci-layout", 0)
    refused(site, site.usb2, "oci-layout is not valid JSON")


def test_bit_flip_in_index_json(site: Site) -> None:
    flip_bit(site.usb2 / "index.json", 0)
    refused(site, site.usb2, "index.json is not valid JSON")


def test_bit_flip_in_release_artifact_manifest(site: Site) -> None:
    flip_bit(parts(site.usb2).release_artifact, 40)
    refused(site, site.usb2, "does not match its sha256")


def test_bit_flip_in_trust_artifact_manifest(site: Site) -> None:
    trust = parts(site.usb2).trust_artifact
    assert trust is not None  # a full export carries the root chain
    flip_bit(trust, 40)
    refused(site, site.usb2, "does not match its sha256")


def test_bit_flip_in_root_envelope(site: Site) -> None:
    flip_bit(parts(site.usb2).roots[0], 100)
    refused(site, site.usb2, "does not match its sha256")


def test_bit_flip_in_release_envelope(site: Site) -> None:
    flip_bit(parts(site.usb2).release_envelope, 200)
    refused(site, site.usb2, "does not match its sha256")


def test_bit_flip_in_chunk_blob(site: Site) -> None:
    held = store_blobs(site.w.state)
    needed = [c for c in parts(site.usb2).chunks if c.name not in held]
    # The blob read last (copy order is on-disk order): the others are copied
    # first, then discarded when this one fails.
    flip_bit(max(needed, key=lambda c: c.stat().st_ino), 1000, 3)
    refused(site, site.usb2, "does not match its sha256")


def test_bit_flip_in_config_blob(site: Site) -> None:
    flip_bit(parts(site.usb2).config, 0)
    refused(site, site.usb2, "does not match its sha256")


def test_release_envelope_edited_and_rehashed(site: Site) -> None:
    """A smarter attacker fixes every digest: the signature still catches it."""
    p = parts(site.usb2)
    env = bytearray(p.release_envelope.read_bytes())
    i = env.index(b"2.0")
    env[i : i + 3] = b"9.9"
    h = ids.sha256(bytes(env)).hex()
    blob(site.usb2, h).write_bytes(bytes(env))
    writable(p.release_envelope).unlink()
    art = json.loads(p.release_artifact.read_text())
    art["layers"][0]["digest"] = f"sha256:{h}"
    replace_artifact(site.usb2, p.release_artifact, art)
    refused(site, site.usb2, "does not verify")


# -- blobs missing, short, extra, odd ------------------------------------------------


def test_truncated_blob(site: Site) -> None:
    c = writable(parts(site.usb2).chunks[0])
    c.write_bytes(c.read_bytes()[:-1])
    refused(site, site.usb2, "truncated")


def test_missing_blob(site: Site) -> None:
    writable(parts(site.usb2).chunks[0]).unlink()
    refused(site, site.usb2, "bundle is missing blobs/sha256/")


def test_extra_blob(site: Site) -> None:
    data = b"not referenced by anything"
    blob(site.usb2, ids.sha256(data).hex()).write_bytes(data)
    refused(site, site.usb2, "extra blob")


def test_stray_entry_in_blob_dir(site: Site) -> None:
    (site.usb2 / "blobs" / "sha256" / "tmp.12345").write_bytes(b"half a blob")
    refused(site, site.usb2, "stray entry")


def test_artifact_lists_blob_the_signed_release_does_not_name(site: Site) -> None:
    p = parts(site.usb2)
    junk = b"a payload smuggled in as a layer"
    hj = ids.sha256(junk).hex()
    blob(site.usb2, hj).write_bytes(junk)
    art = json.loads(p.release_artifact.read_text())
    layer = {"mediaType": "application/vnd.p2pupd.chunk.v1", "digest": f"sha256:{hj}", "size": 32}
    art["layers"].append(layer)
    replace_artifact(site.usb2, p.release_artifact, art)
    refused(site, site.usb2, "not part of the signed release")


# -- packs: small blobs of a release in one blob ---------------------------------------


def uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def pack_of(blobs: list[bytes], sizes: list[int] | None = None, count: int | None = None) -> bytes:
    """A pack as a writer would make it, or with a lying header."""
    sizes = [len(b) for b in blobs] if sizes is None else sizes
    head = oci.PACK_MAGIC + uvarint(len(sizes) if count is None else count)
    return head + b"".join(uvarint(n) for n in sizes) + b"".join(blobs)


def pack_blobs(s: Site) -> list[bytes]:
    """The blobs the release's one pack holds."""
    p = parts(s.usb2)
    assert len(p.packs) == 1 and len(p.packed) >= 2, "V2's small files travel in a pack"
    data = p.packs[0].read_bytes()
    return [data[o : o + n] for o, n in oci.parse_pack(data)]


def reseal_pack(s: Site, data: bytes) -> None:
    """Replace the release's pack with ``data`` and fix every digest above it."""
    p = parts(s.usb2)
    old = p.packs[0]
    h = ids.sha256(data).hex()
    writable(old).unlink()
    blob(s.usb2, h).write_bytes(data)
    art = json.loads(p.release_artifact.read_text())
    for layer in art["layers"]:
        if layer["digest"] == f"sha256:{old.name}":
            layer["digest"], layer["size"] = f"sha256:{h}", len(data)
    replace_artifact(s.usb2, p.release_artifact, art)


def test_bit_flip_in_pack(site: Site) -> None:
    flip_bit(parts(site.usb2).packs[0], 7, 1)
    refused(site, site.usb2, "does not match its sha256")


def test_pack_entry_changed_and_resealed(site: Site) -> None:
    """An entry is the blob its bytes hash to: changed bytes are a blob the
    signed release does not name, whatever the digests above say."""
    blobs = pack_blobs(site)
    blobs[0] = bytes([blobs[0][0] ^ 1]) + blobs[0][1:]
    reseal_pack(site, pack_of(blobs))
    refused(site, site.usb2, "is not part of the signed release")


def test_pack_with_a_smuggled_entry(site: Site) -> None:
    reseal_pack(site, pack_of([*pack_blobs(site), b"#!/bin/sh\nrm -rf /\n"]))
    refused(site, site.usb2, "is not part of the signed release")


@pytest.mark.parametrize(
    ("mangle", "words"),
    [
        # Offsets follow from the sizes: an entry can only run out of range.
        (lambda b: pack_of(b, [len(x) for x in b[:-1]] + [len(b[-1]) + 1]), "add up to"),
        (lambda b: pack_of(b) + b"\0", "add up to"),  # trailing bytes
        (lambda b: pack_of(b, [len(x) for x in b[:-1]]), "add up to"),  # an entry left out
        (lambda b: pack_of(b, count=oci.MAX_PACK_ENTRIES + 1), "entries, limit 1..16384"),
        (lambda b: pack_of([], count=0), "0 entries"),
        (lambda b: pack_of([bytes(oci.PACK_BLOB_MAX_BYTES + 1)]), "exceeds limit 16384"),
        (lambda b: pack_of([b[0], b[0]]), "holds one blob twice"),
        (lambda b: b"PK\3\4" + pack_of(b)[4:], "pack magic"),
        (lambda b: oci.PACK_MAGIC + b"\x80\x80", "truncated or malformed"),
        (lambda b: oci.PACK_MAGIC + b"\xff" * 9 + b"\x01", "truncated or malformed"),
    ],
    ids=[
        "entry-past-end", "trailing", "entry-missing", "too-many", "empty",
        "entry-too-big", "twice", "magic", "truncated-header", "overlong-varint",
    ],
)  # fmt: skip
def test_malformed_pack_resealed(
    site: Site, mangle: Callable[[list[bytes]], bytes], words: str
) -> None:
    reseal_pack(site, mangle(pack_blobs(site)))
    refused(site, site.usb2, words)


def test_pack_descriptor_over_the_pack_limit(site: Site) -> None:
    p = parts(site.usb2)
    art = json.loads(p.release_artifact.read_text())
    for layer in art["layers"]:
        if layer["mediaType"] == oci.PACK_MEDIA_TYPE:
            layer["size"] = oci.MAX_PACK_BYTES + 1
    replace_artifact(site.usb2, p.release_artifact, art)
    refused(site, site.usb2, f"pack of {oci.MAX_PACK_BYTES + 1} bytes is out of bounds")


def test_blob_in_a_pack_and_as_a_layer(site: Site) -> None:
    p = parts(site.usb2)
    first = pack_blobs(site)[0]
    h = ids.sha256(first).hex()
    blob(site.usb2, h).write_bytes(first)
    art = json.loads(p.release_artifact.read_text())
    art["layers"].append(
        {"mediaType": oci.CHUNK_MEDIA_TYPE, "digest": f"sha256:{h}", "size": len(first)}
    )
    replace_artifact(site.usb2, p.release_artifact, art)
    refused(site, site.usb2, "twice for one release")


def test_missing_pack(site: Site) -> None:
    writable(parts(site.usb2).packs[0]).unlink()
    refused(site, site.usb2, "bundle is missing blobs/sha256/")


def test_pack_changes_between_check_and_copy(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pack is read again to copy its entries: a medium that changed in
    between is caught by the pack's digest, and what was copied is discarded."""
    pack = parts(site.usb2).packs[0]
    real = BundleReader.check_blobs

    def then_tamper(self: BundleReader, referenced: dict[bytes, int], n: int) -> dict[bytes, int]:
        out = real(self, referenced, n)
        flip_bit(pack, 9, 2)
        return out

    monkeypatch.setattr(BundleReader, "check_blobs", then_tamper)
    refused(site, site.usb2, "does not match its sha256")
    assert not (site.w.state / "spool").exists() and not tail_records(site.w.state)


# -- links and special files ---------------------------------------------------------


def test_symlink_as_index_json(site: Site) -> None:
    real = site.w.base / "elsewhere-index.json"
    shutil.move(site.usb2 / "index.json", real)
    os.symlink(real, site.usb2 / "index.json")
    refused(site, site.usb2, "index.json is a symlink")


def test_symlink_as_blob(site: Site) -> None:
    c = parts(site.usb2).chunks[0]
    real = site.w.base / "elsewhere-blob"
    shutil.move(c, real)
    os.symlink(real, c)
    refused(site, site.usb2, "is a symlink")


def test_symlink_as_blobs_dir(site: Site) -> None:
    real = site.w.base / "elsewhere-blobs"
    shutil.move(site.usb2 / "blobs", real)
    os.symlink(real, site.usb2 / "blobs")
    refused(site, site.usb2, "bundle member blobs is a symlink")


def test_fifo_as_blob_does_not_hang(site: Site) -> None:
    c = parts(site.usb2).chunks[0]
    writable(c).unlink()
    os.mkfifo(c)
    refused(site, site.usb2, "is a FIFO")


# -- hostile names and sizes in index.json -------------------------------------------


@pytest.mark.parametrize(
    ("name", "digest"),
    [("traversal", "sha256:../../../../etc/passwd"), ("absolute", "sha256:/etc/shadow")],
)
def test_hostile_digest_names_in_index(site: Site, name: str, digest: str) -> None:
    doc = json.loads((site.usb2 / "index.json").read_text())
    doc["manifests"][0]["digest"] = digest
    (site.usb2 / "index.json").write_text(json.dumps(doc))
    refused(site, site.usb2, "not a sha256 hex digest")


def test_oversized_index(site: Site) -> None:
    doc = (site.usb2 / "index.json").read_bytes()
    (site.usb2 / "index.json").write_bytes(doc + b" " * limits.MAX_INDEX_BYTES)
    refused(site, site.usb2, f"limit {limits.MAX_INDEX_BYTES}")


# -- well-formed, but not for this node ---------------------------------------------


def other_repo(w: World, run: Run) -> Repo:
    """A second repository (same default name, its own keys) with a release of app."""
    base = w.base / "other"
    base.mkdir()
    for k in ("root", "rel"):
        generate(base / f"{k}.key")
    r = run(
        "repo",
        "init",
        base / "repo",
        "--root-key",
        base / "root.key",
        "--release-key",
        base / "rel.key",
    )
    assert r.code == 0, r.err
    src = make_tree(base / "src", V2)
    assert run("publish", base / "repo", "app", "7.0", src).code == 0
    assert run("publish", base / "repo", "app", "7.1", src).code == 0
    return Repo(base / "repo")


def test_bundle_signed_by_another_repositorys_root(site: Site) -> None:
    other = other_repo(site.w, site.w.run)
    r = site.w.run("export", other.path, site.w.base / "foreign")
    assert r.code == 0, r.err
    refused(site, site.w.base / "foreign", "from another repository")


def test_release_signed_by_another_repository_under_our_roots(site: Site) -> None:
    other = other_repo(site.w, site.w.run)
    man, env = other.release("app", 2)
    dest = site.w.base / "mixed"
    write_bundle(
        dest, Repo(site.w.repo).roots(), [ReleaseSource(man, env, man.blob_sizes())], other.store
    )
    refused(site, dest, "which the trusted root does not list")


def test_older_serial(site: Site) -> None:
    r = site.w.import_(site.usb2, "--apply")
    assert r.code == 0, r.err
    before = snapshot(site.w)
    assert_refused(site.w.import_(site.usb1, "--apply"), "not newer")
    assert snapshot(site.w) == before
    assert installed_version(site.w) == "2.0"


def test_expired_release(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_tree(site.w.base / "src" / "3.0", {**V2, "x": b"3"})
    assert site.w.run("publish", site.w.repo, "app", "3.0", src, "--expires-days", "1").code == 0
    bundle = site.w.export("usb3")
    monkeypatch.setenv("P2PUPD_NOW", str(int(time.time()) + 3 * 86400))
    refused(site, bundle, "expired")


def node2(s: Site) -> Path:
    """A second node of the same site, with its own state (and node key)."""
    st = s.w.base / "state2"
    r = s.w.run(
        "init", "--state-dir", st, "--trust", s.w.repo / "root.msgpack",
        "--component", f"app={s.w.base / 'target2' / 'app'}",
    )  # fmt: skip
    assert r.code == 0, r.err
    (s.w.base / "target2").mkdir(exist_ok=True)
    return st


def test_bundle_cut_for_another_nodes_request(site: Site) -> None:
    st2 = node2(site)
    req = site.w.base / "req2"
    req.mkdir()
    assert site.w.run("export", "--request", req, "--state-dir", st2).code == 0
    # This node made a request too, so it has a key: the id and key still differ.
    assert (
        site.w.run("export", "--request", site.w.base / "own.req", "--state-dir", site.w.state).code
        == 0
    )
    r = site.w.run("export", site.w.repo, site.w.base / "for2", "--for", req)
    assert r.code == 0, r.err
    refused(site, site.w.base / "for2", "bundle was cut for node")


def test_request_from_another_node_refused_by_publisher(site: Site) -> None:
    """Node 2 passes its request off as node 1's: the publisher knows node 1's key."""
    w = site.w
    assert w.run("export", "--request", w.base / "r1", "--state-dir", w.state).code == 0
    assert w.run("export", w.repo, w.base / "b1", "--for", w.base / "r1").code == 0
    st2 = node2(site)
    assert w.run("export", "--request", w.base / "r2", "--state-dir", st2).code == 0
    req1, _ = verify_request((w.base / "r1").read_bytes())
    req2, _ = verify_request((w.base / "r2").read_bytes())
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key2 = Ed25519PrivateKey.from_private_bytes((st2 / "node.key").read_bytes())
    forged = sign_request(dataclasses.replace(req2, node_id=req1.node_id), key2)
    (w.base / "forged").write_bytes(forged)
    r = w.run("export", w.repo, w.base / "b2", "--for", w.base / "forged")
    assert_refused(r, "not the key this publisher knows")
    assert not (w.base / "b2").exists()


def test_tampered_request_file_refused_by_publisher(site: Site) -> None:
    w = site.w
    assert w.run("export", "--request", w.base / "r1", "--state-dir", w.state).code == 0
    flip_bit(w.base / "r1", 60)
    r = w.run("export", w.repo, w.base / "b1", "--for", w.base / "r1")
    assert r.code == 3 and len(r.err.strip().splitlines()) == 1, r.err
    assert not (w.base / "b1").exists()


# -- the medium changes or fails while being read ------------------------------------


@pytest.fixture
def on_first_progress(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[], None]], None]:
    """Run an action the first time the import reports copied bytes."""

    def install(action: Callable[[], None]) -> None:
        real = progress.Progress.advance
        fired = []

        def advance(self: progress.Progress, n: int) -> None:
            if not fired:
                fired.append(True)
                action()
            real(self, n)

        monkeypatch.setattr(progress.Progress, "advance", advance)

    return install


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_blob_turns_into_special_file_mid_import(
    site: Site, on_first_progress: Callable[[Callable[[], None]], None], kind: str
) -> None:
    chunks = parts(site.usb2).chunks

    def swap() -> None:
        # Every blob path, each replaced atomically (copy threads may be opening
        # them right now); blobs already open are unaffected.
        for c in chunks:
            tmp = c.with_name("." + c.name)
            if kind == "fifo":
                os.mkfifo(tmp)
                os.rename(tmp, c)
            else:
                tmp.mkdir()
                rename_exchange(tmp, c)
                os.unlink(tmp)

    on_first_progress(swap)
    refused(site, site.usb2, f"is a {'FIFO' if kind == 'fifo' else 'directory'}")


class LoopStick:
    """A small ext4 'stick' on a loop device.

    Fill ``mnt``, then ``seal()`` remounts it read-only with a cold page cache;
    ``pull()`` makes the device vanish (capacity 0): every read of data not yet
    cached fails with EIO, as when a stick is pulled out mid-import.
    """

    def __init__(self, base: Path) -> None:
        self.img, self.mnt = base / "stick.img", base / "stick"

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, check=False)

    def make(self) -> None:
        self.mnt.mkdir()
        with open(self.img, "wb") as f:
            f.truncate(32 << 20)
        if self._run("mkfs.ext4", "-q", "-F", str(self.img)).returncode:
            pytest.skip("mkfs.ext4 failed")
        if self._run("mount", "-o", "loop", str(self.img), str(self.mnt)).returncode:
            pytest.skip("cannot loop-mount an ext4 image here")

    def seal(self) -> None:
        assert self._run("umount", str(self.mnt)).returncode == 0
        r = self._run("mount", "-o", "loop,ro", str(self.img), str(self.mnt))
        assert r.returncode == 0, r.stderr

    def pull(self) -> None:
        dev = self._run("losetup", "-j", str(self.img)).stdout.split(":")[0]
        os.truncate(self.img, 0)
        assert self._run("losetup", "-c", dev).returncode == 0

    def remove(self) -> None:
        if self._run("umount", str(self.mnt)).returncode:
            self._run("umount", "-l", str(self.mnt))


@pytest.fixture
def stick(tmp_path: Path) -> Iterator[LoopStick]:
    if os.geteuid() != 0 or shutil.which("losetup") is None or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs root, losetup and mkfs.ext4 to build a loop device")
    s = LoopStick(tmp_path)
    s.make()
    try:
        yield s
    finally:
        s.remove()


def test_stick_pulled_out_mid_import(
    site: Site, stick: LoopStick, on_first_progress: Callable[[Callable[[], None]], None]
) -> None:
    """EIO from the kernel half-way: exit 1, store and target unchanged; the
    blobs that arrived complete wait past a pack's index and a rerun resumes."""
    w = site.w
    shutil.copytree(site.usb2, stick.mnt / "usb2")
    stick.seal()
    state0, blobs0, tree0 = snapshot(w)
    on_first_progress(stick.pull)
    r = w.import_(stick.mnt / "usb2", "--apply")
    assert_refused(r, "cannot read bundle", code=1)
    state1, blobs1, tree1 = snapshot(w)
    assert blobs1 == blobs0 and tree1 == tree0
    assert isinstance(state0, dict) and isinstance(state1, dict)
    spool = ("spool", "blobs/packs/")
    assert {k: v for k, v in state1.items() if not k.startswith(spool)} == {
        k: v for k, v in state0.items() if not k.startswith(spool)
    }
    assert installed_version(w) == "1.0"
    left = spooled(w.state)
    assert left
    # The stick comes back (a good copy): the import resumes, copying no blob twice.
    r = w.import_(site.usb2, "--apply", "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["blobs_resumed"] == len(left)
    total = doc["blobs_copied"] + doc["blobs_resumed"] + doc["blobs_present"]
    assert total == parts(site.usb2).blob_count
    assert installed_version(w) == "2.0"
    assert not (w.state / "spool").exists() and not tail_records(w.state)


# -- `verify` gives the verdict `import` gives ----------------------------------------


def _expired(s: Site, monkeypatch: pytest.MonkeyPatch) -> Path:
    src = make_tree(s.w.base / "src" / "3.0", {**V2, "x": b"3"})
    assert s.w.run("publish", s.w.repo, "app", "3.0", src, "--expires-days", "1").code == 0
    bundle = s.w.export("usb3")
    monkeypatch.setenv("P2PUPD_NOW", str(int(time.time()) + 3 * 86400))
    return bundle


def _foreign(s: Site, monkeypatch: pytest.MonkeyPatch) -> Path:
    other = other_repo(s.w, s.w.run)
    assert s.w.run("export", other.path, s.w.base / "foreign").code == 0
    return s.w.base / "foreign"


def _mixed(s: Site, monkeypatch: pytest.MonkeyPatch) -> Path:
    other = other_repo(s.w, s.w.run)
    man, env = other.release("app", 2)
    dest = s.w.base / "mixed"
    write_bundle(
        dest, Repo(s.w.repo).roots(), [ReleaseSource(man, env, man.blob_sizes())], other.store
    )
    return dest


def _flipped_root(s: Site, monkeypatch: pytest.MonkeyPatch) -> Path:
    flip_bit(parts(s.usb2).roots[0], 100)
    return s.usb2


def _flipped_release(s: Site, monkeypatch: pytest.MonkeyPatch) -> Path:
    flip_bit(parts(s.usb2).release_envelope, 200)
    return s.usb2


def _flipped_chunk(s: Site, monkeypatch: pytest.MonkeyPatch) -> Path:
    held = store_blobs(s.w.state)
    flip_bit(next(c for c in parts(s.usb2).chunks if c.name not in held), 7)
    return s.usb2


@pytest.mark.parametrize(
    "make", [_expired, _foreign, _mixed, _flipped_root, _flipped_release, _flipped_chunk]
)
def test_verify_and_import_give_the_same_verdict(
    site: Site, monkeypatch: pytest.MonkeyPatch, make: Callable[[Site, pytest.MonkeyPatch], Path]
) -> None:
    bundle = make(site, monkeypatch)
    verdict = site.w.run("verify", bundle, "--trust", site.w.state / "trust" / "root.msgpack")
    imported = site.w.import_(bundle)
    assert imported.code == 3, imported.err
    assert (verdict.code, verdict.err) == (imported.code, imported.err)
