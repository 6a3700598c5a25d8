"""Per-platform variants of one release, through the real command line.

`p2pupd publish ... --platform P` with the newest release's version adds a
variant to that release (same serial, its own signed manifest). One bundle
carries every variant, with the chunks they share once; each node installs its
own platform's variant and carries the others for its neighbours (stored, never
installed), and a node of a platform the release lacks says so and changes
nothing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from _sneaker import carried_blobs
from _store import stored_sizes
from conftest import Result, Run, World, make_tree, tree_snapshot

from p2pupd.tools.publisher.repo import Repo

X86, ARM, RISCV = "linux-x86_64", "linux-aarch64", "linux-riscv64"
V1 = {"bin/tool": b"v1\n", "etc/conf": b"a=1\n"}
# A shared payload big enough to be several chunks, identical in both variants.
SHARED = random.Random(7).randbytes(600_000)
V2 = {
    X86: {"bin/tool": b"\x7fELF x86-64 tool v2\n", "etc/conf": b"a=2\n", "share/data": SHARED},
    ARM: {"bin/tool": b"\x7fELF aarch64 tool v2\n", "etc/conf": b"a=2\n", "share/data": SHARED},
}


class Node:
    """One node's state directory and target, driven through the CLI."""

    def __init__(self, world: World, name: str, platform: str) -> None:
        self.run = world.run
        self.state = world.base / f"state-{name}"
        self.target = world.base / f"target-{name}" / "app"
        self.target.parent.mkdir(parents=True)
        r = self.run("init", "--state-dir", self.state, "--trust", world.repo / "root.msgpack",
                     "--component", f"app={self.target}", "--platform", platform)  # fmt: skip
        assert r.code == 0, r.err

    def import_(self, bundle: Path, *extra: str) -> dict[str, object]:
        r = self.run("import", bundle, "--state-dir", self.state, "--json", *extra)
        assert r.code == 0, r.err
        doc: dict[str, object] = json.loads(r.out)
        return doc

    def status(self) -> dict[str, object]:
        r = self.run("status", "--state-dir", self.state, "--json")
        assert r.code == 0, r.err
        doc: dict[str, object] = json.loads(r.out)["components"]["app"]
        return doc

    def blobs(self) -> set[str]:
        return set(stored_sizes(self.state))


def blob_names(root: Path) -> set[str]:
    return set(os.listdir(root / "blobs" / "sha256"))


def publish(world: World, version: str, files: dict[str, bytes], *extra: str) -> Path:
    src = make_tree(world.base / "src" / f"{version}{'-'.join(extra)}", files)
    r = world.run("publish", world.repo, "app", version, src, "--delta-depth", "0", *extra)
    assert r.code == 0, r.err
    return src


@pytest.fixture
def fleet(world: World) -> tuple[Node, Node, Node, Path]:
    """Three nodes of three platforms, all running the universal release 1.0."""
    nodes = Node(world, "x86", X86), Node(world, "arm", ARM), Node(world, "riscv", RISCV)
    v1 = publish(world, "1.0", V1)
    usb1 = world.export("usb1")
    for n in nodes:
        doc = n.import_(usb1, "--apply")
        assert doc["applied"], doc
        assert tree_snapshot(n.target) == tree_snapshot(v1)
    return (*nodes, v1)


def test_each_node_installs_its_own_variant_from_one_bundle(
    world: World, run: Run, fleet: tuple[Node, Node, Node, Path]
) -> None:
    x86, arm, riscv, v1 = fleet
    repo = Repo(world.repo)
    before = blob_names(world.repo)
    src_x86 = publish(world, "2.0", V2[X86], "--platform", X86)
    after_x86 = blob_names(world.repo)
    src_arm = publish(world, "2.0", V2[ARM], "--platform", ARM)
    after_arm = blob_names(world.repo)

    # One release, two signed variants, at one serial.
    assert repo.serials("app") == [1, 2]
    assert repo.platforms("app", 2) == [ARM, X86]
    assert sorted(p.name for p in (world.repo / "releases" / "app").iterdir()) == [
        "1.msgpack", f"2.{ARM}.msgpack", f"2.{X86}.msgpack",
    ]  # fmt: skip
    man = {m.platform: m for m, _env in repo.variants("app", 2)}
    assert {m.version for m in man.values()} == {"2.0"}
    shared = set(man[X86].chunk_digests()) & set(man[ARM].chunk_digests())
    assert len(shared) >= 3  # the shared payload and etc/conf
    # The repository stored the second variant's own chunks only.
    arm_only = {d.hex() for d in man[ARM].chunk_digests()} - {
        d.hex() for d in man[X86].chunk_digests()
    }
    assert after_arm - after_x86 == arm_only
    assert after_x86 - before == {d.hex() for d in man[X86].chunk_digests()} - before

    # One bundle carries both variants and every shared chunk once.
    r = world.run("export", world.repo, world.base / "usb2", "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert sorted((d["version"], d["serial"]) for d in doc["releases"]) == [("2.0", 2)] * 2
    union = {**man[X86].blob_sizes(), **man[ARM].blob_sizes()}
    assert doc["blobs_written"] == len(union)
    assert doc["bytes_written"] == sum(union.values())
    assert doc["bytes_written"] < sum(man[X86].blob_sizes().values()) + sum(
        man[ARM].blob_sizes().values()
    )
    index = json.loads((world.base / "usb2" / "index.json").read_text())
    refs = sorted(m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"])
    assert refs == [f"app-2-{ARM}", f"app-2-{X86}", "trust"]

    # Each node takes its own variant from the same bundle.
    for node, src, platform in ((x86, src_x86, X86), (arm, src_arm, ARM)):
        imp = node.import_(world.base / "usb2", "--apply")
        assert [(r["version"], r["serial"]) for r in imp["releases"]] == [("2.0", 2)]  # type: ignore[index]
        assert imp["skipped"] == []
        neighbour = ARM if platform == X86 else X86
        assert imp["carried"] == [
            {"component": "app", "version": "2.0", "serial": 2, "platform": neighbour}
        ]
        assert tree_snapshot(node.target) == tree_snapshot(src)
        st = node.status()
        assert (st["version"], st["serial"]) == ("2.0", 2)
        assert st["carried"] == [{"serial": 2, "platform": neighbour}]
        # Its store holds its variant's chunks and, to serve the other platform's
        # nodes over the LAN, the other variant's (what the bundle brought for it).
        own = {d.hex() for d in man[platform].chunk_digests()}
        other = {d.hex() for d in man[neighbour].chunk_digests()}
        assert own | other <= node.blobs()

    # A platform the release lacks: a clear message, and nothing changes.
    state_before = tree_snapshot(riscv.state)
    imp = riscv.import_(world.base / "usb2", "--apply")
    message = f"no variant of app 2.0 for {RISCV}; the release has {ARM}, {X86}"
    assert imp["skipped"] == [message]
    assert imp["releases"] == [] and imp["applied"] == []
    assert tree_snapshot(riscv.target) == tree_snapshot(v1)
    st = riscv.status()
    assert (st["version"], st["serial"], st["last_error"]) == ("1.0", 1, None)
    usb1 = world.base / "usb1"
    assert riscv.blobs() <= blob_names(usb1) | set(carried_blobs(usb1))  # small ones are packed
    changed = {
        k
        for k in tree_snapshot(riscv.state)
        if state_before.get(k) != tree_snapshot(riscv.state)[k]
    }
    assert changed <= {"state.msgpack"}  # only the history line below
    r = run("import", world.base / "usb2", "--state-dir", riscv.state)
    assert r.code == 0 and f"skipped {message}" in r.out
    r = run("apply", "app", "--version", "2.0", "--state-dir", riscv.state)
    assert r.code == 1
    assert r.err == f"p2pupd: error: {message}\n"
    hist = json.loads(run("history", "app", "--state-dir", riscv.state, "--json").out)["history"]
    assert [h["event"] for h in hist].count("no-variant") == 1  # recorded once, not per import


def test_publishing_refuses_mixed_or_duplicate_variants(world: World) -> None:
    publish(world, "1.0", V1)
    src = make_tree(world.base / "src" / "x", V2[X86])

    def pub(*extra: str) -> tuple[int, str]:
        r = world.run("publish", world.repo, "app", *extra)
        return r.code, r.err

    # A variant cannot join a universal release.
    code, err = pub("1.0", str(src), "--platform", X86)
    assert code == 1 and "universal" in err
    assert pub("2.0", str(src), "--platform", X86) == (0, "")
    # The same platform twice, or a universal tree under a variant release's serial.
    code, err = pub("2.0", str(src), "--platform", X86)
    assert code == 1 and f"already has a variant for {X86}" in err
    code, err = pub("2.0", str(src))
    assert code == 1 and f"variants for {X86}" in err
    # A new version starts a new serial, universal or not.
    assert pub("3.0", str(src)) == (0, "")
    assert Repo(world.repo).serials("app") == [1, 2, 3]
    assert Repo(world.repo).platforms("app", 3) == [None]


def test_rollback_protection_stays_per_component(
    world: World, fleet: tuple[Node, Node, Node, Path]
) -> None:
    """A variant at the serial a node already holds is neither new nor a rollback."""
    x86, arm, _riscv, _v1 = fleet
    publish(world, "2.0", V2[X86], "--platform", X86)
    usb_x86_only = world.export("usb-x86")
    assert x86.import_(usb_x86_only, "--apply")["applied"]
    # The aarch64 variant arrives later at the same serial: the x86 node has
    # nothing to do, the aarch64 node installs it.
    publish(world, "2.0", V2[ARM], "--platform", ARM)
    usb = world.export("usb-both")
    doc = x86.import_(usb)
    assert [(r["serial"], r["new"]) for r in doc["releases"]] == [(2, False)]  # type: ignore[index]
    assert arm.import_(usb, "--apply")["applied"]
    assert arm.status()["version"] == "2.0"
    # Replaying the older universal bundle is still refused as a rollback.
    r = world.run("import", world.base / "usb1", "--state-dir", arm.state)
    assert r.code == 3, r.err


def refs(bundle: Path) -> list[str]:
    index = json.loads((bundle / "index.json").read_text())
    return sorted(m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"])


def one_line_error(r: Result, code: int, text: str) -> None:
    assert r.code == code, (r.code, r.err)
    assert r.err.count("\n") == 1 and text in r.err, r.err


def test_from_version_sticks_carry_every_variant_or_the_ones_named(
    world: World, fleet: tuple[Node, Node, Node, Path]
) -> None:
    """`export --from-version` of a release with variants: every variant by default,
    each from its platform's release at that version; `--platform P` (repeatable,
    or `all`) names them; a platform it cannot serve is one clear line."""
    x86, arm, _riscv, _v1 = fleet
    src = {p: publish(world, "2.0", V2[p], "--platform", p) for p in (X86, ARM)}
    both = world.base / "usb-both"
    r = world.run("export", world.repo, both, "--from-version", "1.0", "--json")
    assert r.code == 0, r.err
    assert [(d["version"], d["serial"]) for d in json.loads(r.out)["releases"]] == [("2.0", 2)] * 2
    assert refs(both) == [f"app-2-{ARM}", f"app-2-{X86}"]  # nodes at 1.0 trust its root
    for node, platform in ((x86, X86), (arm, ARM)):
        imp = node.import_(both, "--apply")
        assert imp["applied"] and tree_snapshot(node.target) == tree_snapshot(src[platform])
        assert [c["platform"] for c in imp["carried"]] == [ARM if platform == X86 else X86]  # type: ignore[index]
    # One variant, named; `all` is the default spelled out.
    only_arm = world.base / "usb-arm"
    r = world.run("export", world.repo, only_arm, "--from-version", "1.0", "--platform", ARM)
    assert r.code == 0, r.err
    assert refs(only_arm) == [f"app-2-{ARM}"]
    r = world.run("export", world.repo, world.base / "usb-all", "--from-version", "1.0",
                  "--platform", "all")  # fmt: skip
    assert r.code == 0 and refs(world.base / "usb-all") == refs(both), r.err
    # A platform the release lacks, a name that is no platform, a stick cut for a request.
    r = world.run("export", world.repo, world.base / "x", "--from-version", "1.0",
                  "--platform", RISCV)  # fmt: skip
    one_line_error(r, 1, f"app 2.0 has no variant for {RISCV} (it has {ARM}, {X86})")
    r = world.run("export", world.repo, world.base / "x", "--platform", "Linux x86")
    one_line_error(r, 2, "is not a platform name")
    r = world.run("export", world.repo, world.base / "x", "--for", world.base / "req",
                  "--platform", X86)  # fmt: skip
    one_line_error(r, 2, "--platform is for a repository export without --for")
    # 3.0 adds riscv: no riscv node can be at 2.0 (it had no riscv variant), so
    # "every variant from 2.0" is ambiguous -- say so, and which to name.
    for p in (X86, ARM, RISCV):
        publish(world, "3.0", V2[X86] if p == RISCV else V2[p], "--platform", p)
    r = world.run("export", world.repo, world.base / "y", "--from-version", "2.0")
    one_line_error(r, 1, f"app 2.0 has no variant for {RISCV} (only {ARM}, {X86})")
    assert "--platform" in r.err
    r = world.run("export", world.repo, world.base / "y", "--from-version", "2.0",
                  "--platform", X86, "--platform", ARM)  # fmt: skip
    assert r.code == 0, r.err
    assert refs(world.base / "y") == [f"app-3-{ARM}", f"app-3-{X86}"]
    # A full export names variants the same way.
    r = world.run("export", world.repo, world.base / "z", "--platform", RISCV)
    assert r.code == 0 and refs(world.base / "z") == [f"app-3-{RISCV}", "trust"], r.err


def variants_of(version: str, salt: int) -> dict[str, dict[str, bytes]]:
    """A release's tree per platform: a native binary each, and SHARED."""
    return {
        p: {"bin/tool": f"ELF {p} tool {version} {salt}\n".encode() * 50, "share/data": SHARED}
        for p in (X86, ARM)
    }


def test_carried_variants_live_as_long_as_the_own_release_of_their_serial(
    world: World, fleet: tuple[Node, Node, Node, Path]
) -> None:
    """gc keeps what a node carries exactly as long as it keeps its own release of
    that serial (installed, kept for rollback, newer, newest), then drops the
    variant's manifest and the blobs only it named."""
    x86, _arm, _riscv, _v1 = fleet
    for n, version in enumerate(("2.0", "3.0", "4.0", "5.0")):
        for p, files in variants_of(version, n).items():
            publish(world, version, files, "--platform", p)
        doc = x86.import_(world.export(f"usb-{version}"), "--apply")
        assert doc["applied"] and [c["platform"] for c in doc["carried"]] == [ARM]  # type: ignore[index]
    repo = Repo(world.repo)
    arm_tool = {s: {c.digest.hex() for c in repo.release("app", s, ARM)[0].files[0].chunks}
                for s in (2, 3, 4, 5)}  # fmt: skip
    st = x86.status()
    assert st["serial"] == 5 and [k["serial"] for k in st["kept"]] == [4, 3]  # type: ignore[index]
    assert st["carried"] == [{"serial": s, "platform": ARM} for s in (2, 3, 4, 5)]
    r = world.run("gc", "--state-dir", x86.state, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["variants_dropped"] == 1
    st = x86.status()
    assert st["carried"] == [{"serial": s, "platform": ARM} for s in (3, 4, 5)]
    blobs = x86.blobs()
    assert arm_tool[3] | arm_tool[4] | arm_tool[5] <= blobs  # with 3, 4 (kept) and 5 (live)
    assert not arm_tool[2] & blobs  # went with release 2
    assert not (x86.state / "releases" / "app" / f"2.{ARM}.msgpack").exists()


def test_a_node_never_applies_another_platforms_variant(
    world: World, fleet: tuple[Node, Node, Node, Path]
) -> None:
    """Even a state directory altered by hand to hold the aarch64 manifest where
    the node's own release belongs: `apply` refuses with one line, nothing changes."""
    x86, _arm, _riscv, v1 = fleet
    for p, files in variants_of("2.0", 0).items():
        publish(world, "2.0", files, "--platform", p)
    doc = x86.import_(world.export("usb2"))  # stored, not applied
    assert [c["platform"] for c in doc["carried"]] == [ARM]  # type: ignore[index]
    releases = x86.state / "releases" / "app"
    (releases / "2.msgpack").write_bytes((releases / f"2.{ARM}.msgpack").read_bytes())
    shutil.rmtree(x86.state / "cache", ignore_errors=True)  # no decoded copy of the real one
    r = world.run("apply", "app", "--state-dir", x86.state)
    assert r.code == 1, r.err
    assert r.err == (
        f"p2pupd: error: app 2.0 is the variant for {ARM}; this node installs {X86} "
        "(nothing changed)\n"
    )
    assert tree_snapshot(x86.target) == tree_snapshot(v1)
    assert x86.status()["serial"] == 1


def test_a_variant_whose_manifest_patch_has_no_base_here_is_skipped_not_refused(
    world: World, fleet: tuple[Node, Node, Node, Path]
) -> None:
    """A `--from-version` stick carries each variant's envelope as a patch against
    that platform's earlier one. A node that never carried the earlier aarch64
    variant takes its own and says it cannot carry the other; one that did carries it."""
    x86, arm, _riscv, _v1 = fleet
    for p, files in variants_of("2.0", 0).items():
        publish(world, "2.0", files, "--platform", p)
    assert x86.import_(world.export("usb2-x86", "--platform", X86), "--apply")["applied"]
    assert arm.import_(world.export("usb2-all"), "--apply")["applied"]  # and carries x86's
    for p, files in variants_of("3.0", 1).items():
        publish(world, "3.0", files, "--platform", p)
    stick = world.export("usb3", "--from-version", "2.0")
    doc = x86.import_(stick, "--apply")
    assert doc["applied"] and doc["carried"] == []
    assert doc["skipped"] == [
        f"app 3.0 for {ARM}: not carried, its manifest is a patch against a release "
        "this node does not hold"
    ]
    doc = arm.import_(stick, "--apply")
    assert doc["applied"] and [c["platform"] for c in doc["carried"]] == [X86]  # type: ignore[index]
