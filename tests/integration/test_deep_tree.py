"""A signed tree as deep as the rules allow applies, one deeper is refused at
verification, and a deep tree left on disk stops none of the node's own commands.

Nothing in the apply path recurses over a tree's depth (Python stops a recursion
at about 1,000 frames): staging (owners of new directories), recycling, removal
of stages and versions, recovery, fsck. The releases are signed by the
publisher's keys but built here, entry by entry: the publisher's own walk of a
source tree is not what is under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _kit import Site, cli

from p2pupd.daemon.apply.engine import Applier
from p2pupd.daemon.stage.stagefs import remove_tree
from p2pupd.daemon.state.node import Node
from p2pupd.protocol import limits
from p2pupd.protocol.manifest import ChunkRef, DirEntry, FileEntry, Manifest
from p2pupd.protocol.trust import RELEASE_TYPE, Envelope, sign
from p2pupd.tools.cli import main
from p2pupd.tools.publisher.repo import Repo

MTIME = 1_700_000_000


def chain(depth: int) -> list[str]:
    """The directories ``d``, ``d/d``, ... of a chain ``depth`` deep."""
    out, path = [], ""
    for _ in range(depth):
        path = f"{path}/d" if path else "d"
        out.append(path)
    return out


def deep_release(repo: Repo, version: str, serial: int, depth: int, text: bytes) -> Envelope:
    """Sign a release of ``app``: a chain of directories, its deepest entry (a file)
    ``depth`` levels down, a file at the top and one half-way; its blobs stored."""
    dirs = chain(depth - 1)
    files = []
    for rel, data in (
        ("top.txt", b"top " + text),
        (f"{dirs[len(dirs) // 2]}/mid.txt", b"mid " + text),
        (f"{dirs[-1]}/leaf.txt", b"leaf " + text),
    ):
        digest = repo.store.put_bytes(data)  # small: one chunk, the whole file
        files.append(
            FileEntry(rel, 0o644, len(data), digest, MTIME, (ChunkRef(digest, len(data)),))
        )
    man = Manifest(
        component="app",
        version=version,
        serial=serial,
        created=MTIME,
        files=tuple(sorted(files, key=lambda f: f.path)),
        dirs=tuple(DirEntry(d, 0o755, MTIME) for d in dirs),
    )
    return sign(RELEASE_TYPE, man.encode(), repo.release_signers())


def publish_deep(site: Site, version: str, serial: int, depth: int, text: bytes) -> None:
    repo = Repo(site.repo)
    env = deep_release(repo, version, serial, depth, text)
    repo.write_release(Manifest.decode(env.payload), env)


def put_blob(bundle: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (bundle / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def replace_release(bundle: Path, envelope: bytes) -> None:
    """Put ``envelope`` in ``bundle`` in place of its one release's envelope, as a
    hostile or buggy signing station would (the publisher itself refuses to export
    a release that breaks the node's rules)."""
    index = json.loads((bundle / "index.json").read_text())
    desc = next(m for m in index["manifests"] if "org.p2pupd.serial" in m["annotations"])
    image_path = bundle / "blobs" / "sha256" / desc["digest"].split(":")[1]
    image = json.loads(image_path.read_text())
    layer = next(x for x in image["layers"] if x["mediaType"].endswith("release.v1+msgpack"))
    layer["digest"], layer["size"] = put_blob(bundle, envelope)
    desc["digest"], desc["size"] = put_blob(bundle, json.dumps(image).encode())
    (bundle / "index.json").write_text(json.dumps(index))


def deepest(target: Path) -> int:
    """How many directories deep the tree at ``target`` goes (a loop, not a walk)."""
    n, d = 0, target
    while (d / "d").is_dir():
        n, d = n + 1, d / "d"
    return n


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield Site(tmp_path)
    # pytest's own clean-up of old temporary directories recurses once per
    # level (shutil.rmtree): the deep trees go now, with a loop.
    for entry in tmp_path.iterdir():
        remove_tree(entry)


def test_a_tree_as_deep_as_the_limit_allows_applies(site: Site, tmp_path: Path) -> None:
    depth = limits.MAX_TREE_DEPTH - 24  # a 1,000-deep tree: 1,000 levels of recursion killed it
    site.publish("1.0", {"top.txt": b"shallow\n"})
    publish_deep(site, "2.0", 2, depth, b"two\n")
    publish_deep(site, "3.0", 3, depth, b"three\n")
    state, target = site.node("n")
    cli("init", "--state-dir", state, "--trust", site.root_file,
        "--component", f"app={target}", "--retain", "1")  # fmt: skip
    cli("export", site.repo, tmp_path / "all", "--history", "3")
    cli("import", tmp_path / "all", "--state-dir", state)
    cli("apply", "app", "--state-dir", state, "--version", "1.0")
    t0 = time.perf_counter()
    cli("apply", "app", "--state-dir", state, "--version", "2.0")  # owners of new dirs, as root
    took = time.perf_counter() - t0
    assert deepest(target) == depth - 1
    assert (target / "/".join(["d"] * (depth - 1)) / "leaf.txt").read_bytes() == b"leaf two\n"
    cli("apply", "app", "--state-dir", state, "--version", "3.0")  # 1.0 recycled into it
    cli("apply", "app", "--state-dir", state, "--version", "2.0")  # the kept deep 2.0: a switch
    assert main(["fsck", "--state-dir", str(state), "--full"]) == 0
    cli("rollback", "app", "--state-dir", state)  # to 1.0: the deep 3.0 recycled, reshaped
    assert deepest(target) == 0
    assert main(["fsck", "--state-dir", str(state), "--full"]) == 0
    assert main(["gc", "--state-dir", str(state)]) == 0
    assert sorted(os.listdir(target.parent)) == [".app.p2pupd-v2", "app"]
    assert deepest(target.parent / ".app.p2pupd-v2") == depth - 1
    print(f"apply of a {depth}-deep tree: {took:.2f} s")


def test_a_tree_deeper_than_the_limit_is_refused_at_verification(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    site.publish("1.0", {"top.txt": b"shallow\n"})
    bundle = site.bundle("deep")
    replace_release(bundle, deep_release(Repo(site.repo), "1.0", 1, 1_200, b"deep\n").encode())
    state, target = site.node("n")
    capsys.readouterr()
    assert main(["import", str(bundle), "--state-dir", str(state)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "levels deep, limit 1024" in err, err
    assert Node(state).releases.serials("app") == []
    assert os.listdir(target.parent) == []


def make_chain(top: Path, depth: int) -> None:
    """``depth`` nested directories under ``top``, made with a descriptor per level
    (``os.makedirs`` recurses once per level)."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            os.close(os.open("x", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)


@pytest.mark.parametrize("command", ["status", "fsck", "gc", "recover", "import"])
def test_a_deep_stage_left_behind_stops_no_recovery_command(
    site: Site, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stage 1,100 deep (deeper than any release may be: left by hand, or by an
    older version) with its transaction open: the command recovers and removes it."""
    site.publish("1.0", {"top.txt": b"one\n"})
    site.publish("2.0", {"top.txt": b"two\n"})
    state, target = site.node("n")
    bundle = site.base / "b"
    cli("export", site.repo, bundle, "--history", "2")
    cli("import", bundle, "--state-dir", state)
    cli("apply", "app", "--state-dir", state, "--version", "1.0")
    stage = target.parent / ".app.p2pupd-stage"
    make_chain(stage, 1_100)
    node = Node(state)
    cfg = node.config.component("app")
    Applier(node).tx.begin(cfg, 2, 1, stage, "apply", True, "applied")
    args = {"import": ["import", str(bundle)], "status": ["status"], "fsck": ["fsck"]}
    capsys.readouterr()
    code = main([*args.get(command, [command]), "--state-dir", str(state)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert not stage.exists()
    assert sorted(os.listdir(target.parent)) == ["app"]
    assert Applier(Node(state)).pending() == {}
