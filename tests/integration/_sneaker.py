"""Helpers shared by the sneakernet tests: trees, bundles taken apart, refusal checks."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from conftest import Result, World, state_snapshot, tree_snapshot

from p2pupd.protocol import bundle as oci


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
    """The members of a bundle, by kind (paths under ``blobs/sha256``)."""

    root: Path
    index: Path
    layout: Path
    trust_artifact: Path
    release_artifact: Path
    roots: list[Path]
    release_envelope: Path
    chunks: list[Path]
    config: Path


def blob(bundle: Path, digest: str) -> Path:
    return bundle / "blobs" / "sha256" / digest.removeprefix("sha256:")


def parts(bundle: Path) -> Parts:
    idx = json.loads((bundle / "index.json").read_text())
    trust = release = None
    for d in idx["manifests"]:
        art = json.loads(blob(bundle, d["digest"]).read_text())
        if art["artifactType"] == oci.TRUST_ARTIFACT:
            trust = (blob(bundle, d["digest"]), [blob(bundle, x["digest"]) for x in art["layers"]])
        elif art["artifactType"] == oci.RELEASE_ARTIFACT:
            release = (blob(bundle, d["digest"]), art)
    assert trust is not None and release is not None
    art = release[1]
    return Parts(
        root=bundle,
        index=bundle / "index.json",
        layout=bundle / "oci-layout",
        trust_artifact=trust[0],
        release_artifact=release[0],
        roots=trust[1],
        release_envelope=blob(bundle, art["layers"][0]["digest"]),
        chunks=[blob(bundle, x["digest"]) for x in art["layers"][1:]],
        config=blob(bundle, art["config"]["digest"]),
    )


def writable(p: Path) -> Path:
    os.chmod(p, 0o644)  # blobs are written read-only
    return p


def flip_bit(p: Path, offset: int = 0, bit: int = 0) -> None:
    data = bytearray(writable(p).read_bytes())
    data[offset % len(data)] ^= 1 << bit
    p.write_bytes(bytes(data))


def store_blobs(state: Path) -> dict[str, bytes]:
    d = state / "blobs" / "sha256"
    return {p.name: p.read_bytes() for p in d.iterdir()}


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
