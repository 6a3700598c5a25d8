"""Helpers shared by the sneakernet tests: trees, bundles taken apart, refusal checks."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from _store import stored
from conftest import Result, World, state_snapshot, tree_snapshot

from p2pupd.protocol import bundle as oci
from p2pupd.protocol import ids


def rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# Big enough that each large file is cut into several chunks (64 KiB average).
V1 = {"bin/tool": b"#!/bin/sh\necho v1\n", "data/big.bin": rand(1, 400_000), "etc/a.conf": b"a=1\n"}
V2 = {
    "bin/tool": b"#!/bin/sh\necho v2\n",
    "data/big.bin": rand(1, 200_000) + b"inserted" + rand(1, 400_000)[200_000:],
    "data/new.bin": rand(2, 300_000),
    "etc/a.conf": b"a=1\n",
}


@dataclass
class Parts:
    """The members of a bundle, by kind (paths under ``blobs/sha256``).

    ``chunks`` are the release's blobs stored as files of their own, ``packs``
    the packs holding its small blobs, ``packed`` those blobs (hex digests).
    A bundle cut for a node that trusts every root has no trust artifact.
    """

    root: Path
    index: Path
    layout: Path
    trust_artifact: Path | None
    release_artifact: Path
    roots: list[Path]
    release_envelope: Path
    chunks: list[Path]
    config: Path
    packs: list[Path]
    packed: list[str]

    @property
    def blob_count(self) -> int:
        """Blobs the release carries, files and packed ones."""
        return len(self.chunks) + len(self.packed)


def blob(bundle: Path, digest: str) -> Path:
    return bundle / "blobs" / "sha256" / digest.removeprefix("sha256:")


def pack_members(pack: Path) -> list[str]:
    """Hex digests of the blobs a pack holds, in order."""
    data = pack.read_bytes()
    return [ids.sha256(data[o : o + n]).hex() for o, n in oci.parse_pack(data)]


def parts(bundle: Path) -> Parts:
    idx = json.loads((bundle / "index.json").read_text())
    trust: tuple[Path | None, list[Path]] = (None, [])
    release = None
    for d in idx["manifests"]:
        art = json.loads(blob(bundle, d["digest"]).read_text())
        if art["artifactType"] == oci.TRUST_ARTIFACT:
            trust = (blob(bundle, d["digest"]), [blob(bundle, x["digest"]) for x in art["layers"]])
        elif art["artifactType"] == oci.RELEASE_ARTIFACT:
            release = (blob(bundle, d["digest"]), art)
    assert release is not None
    art = release[1]
    rest = art["layers"][1:]
    packs = [blob(bundle, x["digest"]) for x in rest if x["mediaType"] == oci.PACK_MEDIA_TYPE]
    return Parts(
        root=bundle,
        index=bundle / "index.json",
        layout=bundle / "oci-layout",
        trust_artifact=trust[0],
        release_artifact=release[0],
        roots=trust[1],
        release_envelope=blob(bundle, art["layers"][0]["digest"]),
        chunks=[blob(bundle, x["digest"]) for x in rest if x["mediaType"] != oci.PACK_MEDIA_TYPE],
        config=blob(bundle, art["config"]["digest"]),
        packs=packs,
        packed=[h for p in packs for h in pack_members(p)],
    )


def carried_blobs(bundle: Path) -> dict[str, int]:
    """Every blob the bundle's releases carry, files and packed ones: hex digest -> size."""
    out: dict[str, int] = {}
    idx = json.loads((bundle / "index.json").read_text())
    for d in idx["manifests"]:
        art = json.loads(blob(bundle, d["digest"]).read_text())
        if art["artifactType"] != oci.RELEASE_ARTIFACT:
            continue
        for x in art["layers"][1:]:
            if x["mediaType"] == oci.PACK_MEDIA_TYPE:
                data = blob(bundle, x["digest"]).read_bytes()
                for o, n in oci.parse_pack(data):
                    out[ids.sha256(data[o : o + n]).hex()] = n
            else:
                out[x["digest"].removeprefix("sha256:")] = x["size"]
    return out


def holder(bundle: Path, digest: bytes) -> Path:
    """The file of the bundle that holds a blob: its own, or the pack it is in."""
    own = blob(bundle, digest.hex())
    if own.exists():
        return own
    return next(p for p in parts(bundle).packs if digest.hex() in pack_members(p))


def writable(p: Path) -> Path:
    os.chmod(p, 0o644)  # blobs are written read-only
    return p


def flip_bit(p: Path, offset: int = 0, bit: int = 0) -> None:
    data = bytearray(writable(p).read_bytes())
    data[offset % len(data)] ^= 1 << bit
    p.write_bytes(bytes(data))


def store_blobs(state: Path) -> dict[str, bytes]:
    return stored(state)


def snapshot(w: World) -> tuple[object, ...]:
    """Everything an import could change: the state directory (but the lock and
    scratch dirs), the stored blobs' bytes, and the target tree."""
    return state_snapshot(w.state), store_blobs(w.state), tree_snapshot(w.target)


def assert_refused(r: Result, words: str, code: int = 3) -> None:
    """Exit ``code``, exactly one clear line on stderr naming ``words``, no traceback."""
    assert r.code == code, (r.code, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert "Traceback" not in r.err
    assert lines[0].startswith("p2pupd: "), lines[0]
    assert words in lines[0], lines[0]


def status(w: World) -> dict[str, object]:
    r = w.run("status", "--state-dir", w.state, "--json")
    assert r.code == 0, r.err
    doc: dict[str, object] = json.loads(r.out)
    return doc


def installed_version(w: World) -> object:
    comps = status(w)["components"]
    assert isinstance(comps, dict)
    return comps["app"]["version"]
