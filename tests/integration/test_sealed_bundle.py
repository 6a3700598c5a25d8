"""Sealed sticks (``export --encrypt-to``): only members of the site read them.

Real CLI, real files. A member imports and applies a sealed bundle like a
plain one; a node of no site, or of another site, is refused with one line
(exit 3) and nothing changes; a flipped byte is refused by the sha256 of the
ciphertext before anything is decrypted; a SIGKILLed import resumes; a copy
made the way registry tools copy an OCI layout (following index, manifest,
config and layers only) still imports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from _sneaker import rand, store_blobs
from _store import spooled
from conftest import Run, World, state_snapshot, tree_snapshot
from test_import_resume import cli

from p2pupd.daemon.bundles import sealedreader
from p2pupd.protocol.site import sealed
from p2pupd.tools.publisher import sealexport

TREE = {"big/one.bin": rand(21, 1_500_000), "big/two.bin": rand(22, 700_000), "small": b"x\n"}


def join_site(w: World, run: Run, state: Path, site_dir: Path) -> None:
    """Enrol the node at ``state`` in the site at ``site_dir`` (the real commands)."""
    req = w.base / f"enrol-{state.name}.msgpack"
    mem = w.base / f"member-{state.name}.msgpack"
    for args in (
        ("site", "request", "--state-dir", state, "--out", req),
        ("site", "enroll", req, "--site-dir", site_dir, "--out", mem),
        ("site", "join", mem, "--state-dir", state),
    ):
        r = run(*args)
        assert r.code == 0, r.err


@pytest.fixture
def site(world: World, run: Run) -> Path:
    site_dir = world.base / "site"
    assert run("site", "init", site_dir, "--name", "plant-7").code == 0
    world.reinit("--site", site_dir / "site.pub")
    join_site(world, run, world.state, site_dir)
    world.publish("1.0", TREE)
    return site_dir


def sealed_export(w: World, site_dir: Path, name: str = "usb") -> Path:
    return w.export(name, "--encrypt-to", str(site_dir / "site.pub"))


def sealed_blobs(usb: Path) -> list[Path]:
    """The ciphertext blob files of a sealed bundle (not header, table, artifact, config)."""
    idx = json.loads((usb / "index.json").read_text())
    art = json.loads(_blob(usb, idx["manifests"][0]["digest"]).read_text())
    return [_blob(usb, d["digest"]) for d in art["layers"][2:]]


def _blob(usb: Path, digest: str) -> Path:
    return usb / "blobs" / "sha256" / digest.removeprefix("sha256:")


def test_member_imports_and_applies_a_sealed_bundle(world: World, site: Path) -> None:
    usb = sealed_export(world, site)
    # Nothing readable travels: no plaintext blob, no release names in the OCI JSON.
    plain = {p.name for p in (world.repo / "blobs" / "sha256").iterdir()}
    on_stick = {p.name for p in (usb / "blobs" / "sha256").iterdir()}
    assert not (plain & on_stick - {sealed_empty_config()})
    small = b"".join(p.read_bytes() for p in (usb / "blobs" / "sha256").iterdir()
                     if p.stat().st_size < 20000)  # fmt: skip
    assert b"org.p2pupd.component" not in small and b"big/one.bin" not in small
    r = world.run("show", usb)  # no seal key here: it says what the stick is, in one line
    assert r.code == 3 and "sealed bundle for site(s)" in r.err and len(r.err.splitlines()) == 1
    r = world.import_(usb, "--apply", "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["releases"][0]["version"] == "1.0" and doc["applied"][0]["changed"]
    assert tree_snapshot(world.target) == tree_snapshot(world.base / "src" / "1.0")


def sealed_empty_config() -> str:
    import hashlib

    return hashlib.sha256(b"{}").hexdigest()  # the OCI empty config is the same everywhere


@pytest.mark.parametrize("who", ["no-site", "other-site", "pinned-not-enrolled"])
def test_non_member_is_refused_with_one_line(world: World, site: Path, run: Run, who: str) -> None:
    usb = sealed_export(world, site)
    state, target = world.base / f"n-{who}", world.base / f"t-{who}" / "app"
    target.parent.mkdir(parents=True)
    extra: tuple[str | Path, ...] = ()
    if who == "other-site":
        other = world.base / "other-site"
        assert run("site", "init", other, "--name", "plant-8").code == 0
        extra = ("--site", other / "site.pub")
    elif who == "pinned-not-enrolled":
        extra = ("--site", site / "site.pub")
    r = run("init", "--state-dir", state, "--trust", world.repo / "root.msgpack",
            "--component", f"app={target}", *extra)  # fmt: skip
    assert r.code == 0, r.err
    if who == "other-site":
        join_site(world, run, state, world.base / "other-site")
    before = state_snapshot(state)
    r = run("import", usb, "--state-dir", state)
    assert r.code == 3
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "sealed to site(s)" in lines[0], r.err
    assert "Traceback" not in r.err
    assert state_snapshot(state) == before
    assert not (state / "spool").exists()


def test_flipped_byte_is_refused_before_decryption(
    world: World, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usb = sealed_export(world, site)
    victim = max(sealed_blobs(usb), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    os.chmod(victim, 0o644)
    victim.write_bytes(bytes(data))
    opened: list[bytes] = []
    real = sealed.BlobCipher.open

    def spy(self: sealed.BlobCipher, segment: bytes, last: bool) -> bytes:
        opened.append(segment)
        return real(self, segment, last)

    monkeypatch.setattr(sealed.BlobCipher, "open", spy)
    before = state_snapshot(world.state)
    r = world.import_(usb)
    assert r.code == 3
    assert f"{victim.name[:16]} does not match its sha256" in r.err, r.err
    # The damaged ciphertext never reached the cipher: its segments are not among those opened.
    assert not any(seg in bytes(data) for seg in opened if len(seg) > 64)
    assert state_snapshot(world.state) == before


def test_tampered_header_or_table_is_refused(world: World, site: Path) -> None:
    usb = sealed_export(world, site)
    idx = json.loads((usb / "index.json").read_text())
    art = json.loads(_blob(usb, idx["manifests"][0]["digest"]).read_text())
    for layer in art["layers"][:2]:  # header, table
        p = _blob(usb, layer["digest"])
        good = p.read_bytes()
        os.chmod(p, 0o644)
        p.write_bytes(good[:-1] + bytes([good[-1] ^ 0x80]))
        r = world.import_(usb)
        assert r.code == 3 and "does not match its sha256" in r.err, r.err
        p.write_bytes(good)
    assert world.import_(usb).code == 0


def test_sigkill_halfway_then_rerun_resumes(world: World, site: Path) -> None:
    usb = sealed_export(world, site)
    r = cli("import", usb, "--state-dir", world.state, env={"P2PUPD_IMPORT_KILL_AFTER": "8"})
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    left = [d.hex() for d in spooled(world.state)]  # plaintext blobs, checked by their names
    assert len(left) >= 8
    r = cli("import", usb, "--state-dir", world.state, "--apply", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["blobs_resumed"] == len(left) and doc["blobs_copied"] > 0
    assert tree_snapshot(world.target) == tree_snapshot(world.base / "src" / "1.0")
    assert all(name in store_blobs(world.state) for name in left)


def test_copy_by_oci_references_still_imports(world: World, site: Path) -> None:
    """What oras/skopeo copy: index, then each manifest's config and layers, nothing else."""
    usb = sealed_export(world, site)
    copy = world.base / "copy"
    (copy / "blobs" / "sha256").mkdir(parents=True)
    shutil.copy(usb / "oci-layout", copy / "oci-layout")
    shutil.copy(usb / "index.json", copy / "index.json")
    for m in json.loads((usb / "index.json").read_text())["manifests"]:
        art = json.loads(_blob(usb, m["digest"]).read_text())
        for d in [m, art["config"], *art["layers"]]:
            shutil.copy(_blob(usb, d["digest"]), _blob(copy, d["digest"]))
    r = world.import_(copy, "--apply")
    assert r.code == 0, r.err


def test_large_blobs_stream_through_disk_not_memory(
    world: World, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blobs beyond the in-memory bound take the streaming paths on both sides."""
    monkeypatch.setattr(sealexport, "WHOLE_BYTES", 32 * 1024)
    monkeypatch.setattr(sealedreader, "WHOLE_BYTES", 32 * 1024)
    streamed: list[int] = []
    real = sealedreader._scratch_fd

    def spy(scratch: Path) -> int:
        streamed.append(1)
        return real(scratch)

    monkeypatch.setattr(sealedreader, "_scratch_fd", spy)
    usb = sealed_export(world, site)
    r = world.import_(usb, "--apply")
    assert r.code == 0, r.err
    assert streamed, "no blob took the streaming path"
    assert tree_snapshot(world.target) == tree_snapshot(world.base / "src" / "1.0")


def test_bundle_cut_for_a_members_request_comes_back_sealed(
    world: World, site: Path, run: Run
) -> None:
    """The round trip: a member's request names its site; the bundle cut for it is sealed."""
    r = run("export", "--request", world.base / "req.msgpack", "--state-dir", world.state)
    assert r.code == 0, r.err
    r = run("export", world.repo, world.base / "back", "--for", world.base / "req.msgpack",
            "--json")  # fmt: skip
    assert r.code == 0, r.err
    assert any("sealed to the site" in n for n in json.loads(r.out)["notes"])
    idx = json.loads((world.base / "back" / "index.json").read_text())
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in idx["manifests"]] == [
        sealed.SEALED_REF
    ]
    r = world.import_(world.base / "back", "--apply")
    assert r.code == 0, r.err
    assert tree_snapshot(world.target) == tree_snapshot(world.base / "src" / "1.0")
