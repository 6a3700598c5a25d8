"""Issue 13: a validly signed release may not install hazardous modes unless the node allows it.

Set-id files that group or others can write, and world-writable directories
without the sticky bit, are refused when the release is verified for the node
(import, or a peer's offer), with one line naming the entry, before anything is
stored or staged; ``p2pupd init --allow-hazardous-modes`` lets a component
take them, and then they are installed as signed.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
from pathlib import Path

import pytest
from _kit import Site, cli, tree_snapshot

from p2pupd.daemon.state.gate import NotForThisNodeError, verify_offer
from p2pupd.daemon.state.node import Node
from p2pupd.protocol.errors import HazardousModeError
from p2pupd.protocol.manifest import DirEntry, FileEntry, Manifest, check_modes, hazards
from p2pupd.tools.cli import main


def publish_hazardous(site: Site) -> None:
    src = site.publish("1.0", {"bin/tool": b"#!/bin/sh\necho 1\n", "pub/readme": b"hi\n"})
    os.chmod(src / "bin" / "tool", 0o6777)  # -rwsrwsrwx
    os.chmod(src / "pub", 0o777)  # drwxrwxrwx, no sticky bit
    cli("publish", site.repo, "app", "1.1", src)


def state_files(state: Path) -> dict[str, tuple[str, int, str]]:
    snap = tree_snapshot(state)
    return {k: v for k, v in snap.items() if k != "lock" and not k.startswith(("tmp", "cache"))}


def test_refused_by_default_allowed_when_configured(tmp_path: Path) -> None:
    site = Site(tmp_path / "site")
    publish_hazardous(site)
    bundle = site.bundle("b")
    state, target = site.node("strict")
    before = state_files(state)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["import", "--state-dir", str(state), str(bundle), "--apply"])
    lines = err.getvalue().strip().splitlines()
    assert code == 3 and len(lines) == 1, err.getvalue()
    assert "'bin/tool' as -rwsrwsrwx, a set-id file others can write (and 1 more)" in lines[0]
    assert "--allow-hazardous-modes" in lines[0]
    assert state_files(state) == before  # nothing stored: no blob, no release, no mark
    assert not target.exists() or not any(target.iterdir())

    lax_state = tmp_path / "lax" / "state"
    lax_target = tmp_path / "lax" / "target"
    cli("init", "--state-dir", lax_state, "--trust", site.root_file,
        "--component", f"app={lax_target}", "--allow-hazardous-modes")  # fmt: skip
    cli("import", "--state-dir", lax_state, bundle, "--apply")
    assert stat.S_IMODE((lax_target / "bin" / "tool").stat().st_mode) == 0o6777
    assert stat.S_IMODE((lax_target / "pub").stat().st_mode) == 0o777


def test_a_peer_offering_one_is_not_for_this_node_and_not_banned(tmp_path: Path) -> None:
    """Over the network the release is valid and the peer honest: the offer is
    declined (``NotForThisNodeError``: no ban), nothing is stored."""
    site = Site(tmp_path / "site")
    publish_hazardous(site)
    state, _ = site.node("strict")
    from p2pupd.tools.publisher.repo import Repo

    data = Repo(site.repo).release_bytes("app", 2)
    node = Node(state)
    with pytest.raises(NotForThisNodeError, match="does not allow hazardous modes"):
        verify_offer(node, data, "app", 2, None)


def man(files: list[tuple[str, int]], dirs: list[tuple[str, int]]) -> Manifest:
    return Manifest(
        "app", "1.0", 1, 0,
        tuple(FileEntry(p, m, 0, bytes(32), 0, ()) for p, m in files),
        dirs=tuple(DirEntry(p, m, 0) for p, m in dirs),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "hazardous"),
    [(0o4755, False), (0o2755, False), (0o4775, True), (0o2757, True), (0o6777, True),
     (0o0777, False), (0o0666, False)],
)  # fmt: skip
def test_file_modes(mode: int, hazardous: bool) -> None:
    """Only set-id together with group or world write is hazardous for a file
    (a plain world-writable file is careless, not an escalation)."""
    assert bool(hazards(man([("f", mode)], []))) is hazardous


@pytest.mark.parametrize(
    ("mode", "hazardous"),
    [(0o777, True), (0o1777, False), (0o775, False), (0o757, True), (0o3777, False)],
)
def test_dir_modes(mode: int, hazardous: bool) -> None:
    assert bool(hazards(man([], [("d", mode)]))) is hazardous
    if hazardous:
        with pytest.raises(HazardousModeError, match=r"'d' as d"):
            check_modes(man([], [("d", mode)]), allowed=False)
        check_modes(man([], [("d", mode)]), allowed=True)
