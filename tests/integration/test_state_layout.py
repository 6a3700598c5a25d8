"""Issue 13: the state directory does not trust its own layout.

A member of STATE replaced by a symlink to a victim directory (or by a file
where a directory belongs) must never make a command read, write or -- above
all -- delete through it: ``gc``, ``fsck --repair`` and every daemon start used
to empty whatever ``STATE/tmp`` pointed at, and a ``STATE/fetching`` link killed
the daemon with a traceback. Each command now says one line (exit 2) and the
victim keeps every byte.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _kit import Site, cli, tree_snapshot

from p2pupd.daemon.errors import StateLayoutError
from p2pupd.daemon.store.packstore import PackStore
from p2pupd.daemon.store.spool import Spool
from p2pupd.tools.cli import main

MEMBERS = [
    "tmp",
    "spool",
    "fetching",
    "incoming",
    "blobs/sha256",
    "blobs/packs",
    "blobs",
    "cache/manifests",
    "trust",
]
COMMANDS = [["gc"], ["fsck", "--repair"], ["status"], ["import", "{bundle}"], ["recover"]]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Site, Path, Path]:
    base = tmp_path_factory.mktemp("layout")
    site = Site(base / "site")
    site.publish("1.0", {"bin/tool": b"#!/bin/sh\necho 1\n", "data/a": os.urandom(70_000)})
    bundle = site.bundle("v1")
    state, _ = site.node("template")
    cli("import", "--state-dir", state, bundle)
    (state / "cache" / "manifests").mkdir(parents=True, exist_ok=True)
    (state / "spool").mkdir(exist_ok=True)
    (state / "fetching").mkdir(exist_ok=True)  # format 1's spool directories
    (state / "incoming").mkdir(exist_ok=True)
    return site, state, bundle


def victim_dir(base: Path) -> Path:
    v = base / "victim"
    (v / "sub").mkdir(parents=True)
    for name in ("precious.txt", "a" * 64, "sub/deep.txt"):  # a hex name, as a blob would be
        (v / name).write_text(f"keep {name}\n")
    return v


def plant(template: Path, base: Path, member: str, victim: Path) -> Path:
    """A copy of the template state dir whose ``member`` is a symlink to ``victim``."""
    state = base / "state"
    shutil.copytree(template, state, symlinks=True)
    target = state / member
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)
    target.symlink_to(victim, target_is_directory=True)
    return state


def p2pupd(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a process of its own (the daemon)."""
    return subprocess.run(
        [sys.executable, "-m", "p2pupd.tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def in_process(*args: str) -> tuple[int, str]:
    """Run the CLI in this process (fast); returns (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, err.getvalue()


@pytest.mark.parametrize("member", MEMBERS)
def test_a_member_that_is_a_symlink_is_refused_by_every_command(
    world: tuple[Site, Path, Path], member: str, tmp_path: Path
) -> None:
    _, template, bundle = world
    victim = victim_dir(tmp_path)
    before = tree_snapshot(victim)
    state = plant(template, tmp_path, member, victim)
    for cmd in COMMANDS:
        args = [a.replace("{bundle}", str(bundle)) for a in cmd]
        code, err = in_process(*args, "--state-dir", str(state))
        lines = err.strip().splitlines()
        assert code == 2, (cmd, err)
        assert len(lines) == 1 and "Traceback" not in err, err
        assert f"{member} is a symbolic link (to {victim})" in lines[0], lines[0]
        assert tree_snapshot(victim) == before, cmd


def test_daemon_start_refuses_a_linked_tmp_and_fetching(
    world: tuple[Site, Path, Path], tmp_path: Path
) -> None:
    """The daemon empties tmp and fetching at start-up: with either a link it
    does not start, says why in one line, and the victim is intact."""
    _, template, _ = world
    for member in ("tmp", "fetching"):
        base = tmp_path / member
        victim = victim_dir(base)
        before = tree_snapshot(victim)
        state = plant(template, base, member, victim)
        r = p2pupd("daemon", "--state-dir", str(state), "--listen", "127.0.0.1:0", "--no-mdns")
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        assert f"{member} is a symbolic link" in r.stderr.strip().splitlines()[-1]
        assert tree_snapshot(victim) == before


def test_a_file_where_a_directory_belongs_is_refused(
    world: tuple[Site, Path, Path], tmp_path: Path
) -> None:
    _, template, _ = world
    state = tmp_path / "state"
    shutil.copytree(template, state, symlinks=True)
    shutil.rmtree(state / "tmp")
    (state / "tmp").write_text("not a directory\n")
    code, err = in_process("gc", "--state-dir", str(state))
    assert code == 2
    assert "tmp is a regular file, not a directory" in err


def test_store_and_spool_never_delete_through_a_link(tmp_path: Path) -> None:
    """Below the layout check, the store and the spool refuse on their own (an
    fd opened O_NOFOLLOW), and a link *inside* tmp is removed as a link."""
    victim = victim_dir(tmp_path)
    before = tree_snapshot(victim)
    root = tmp_path / "store"
    store = PackStore(root)
    (root / "tmp" / "link").symlink_to(victim, target_is_directory=True)
    (root / "tmp" / "torn").write_bytes(b"x")
    assert store.clean_tmp() == 2
    assert not os.listdir(root / "tmp") and tree_snapshot(victim) == before
    shutil.rmtree(root / "tmp")
    (root / "tmp").symlink_to(victim, target_is_directory=True)
    for op in (store.clean_tmp, lambda: store.fsck(repair=True), lambda: store.gc(set())):
        with pytest.raises(StateLayoutError, match="tmp is a symbolic link"):
            op()
    (root / "tmp").unlink()
    (root / "tmp").mkdir()
    (root / "spool").symlink_to(victim, target_is_directory=True)
    with pytest.raises(StateLayoutError, match="spool is a symbolic link"):
        Spool(root, store).resume()
    assert tree_snapshot(victim) == before
    shutil.rmtree(root / "blobs" / "packs")
    (root / "blobs" / "packs").symlink_to(victim, target_is_directory=True)
    with pytest.raises(StateLayoutError, match="packs is a symbolic link"):
        PackStore(root)
    assert tree_snapshot(victim) == before
