"""A full disk during apply, for real: the target lives on a small tmpfs the test
mounts, the update is bigger than what is free there.

* Checked before staging: `p2pupd apply` exits 1 with one NoSpaceError line.
* Hit mid-stage (the check disabled, so the kernel's ENOSPC arrives half-way
  through writing): the same clean error.

Either way the old version is untouched, nothing is left beside the target,
and the store (on another filesystem) is unchanged and passes fsck.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _mounts import tmpfs
from conftest import Run, make_tree, tree_snapshot

from p2pupd.daemon import api, fsutil
from p2pupd.daemon.errors import NoSpaceError
from p2pupd.daemon.stage import stager as stage
from p2pupd.daemon.store.packstore import PackStore

MiB = 1 << 20


@dataclass
class Setup:
    state: Path
    target: Path
    v1: Path
    v2: Path


@pytest.fixture
def full(tmp_path: Path, run: Run) -> Iterator[Setup]:
    """v1 (1 MiB) live on a 24 MiB tmpfs; v2 (adds 30 MiB) imported, not applied."""
    ok = lambda *a: run(*a).code == 0  # noqa: E731
    assert ok("keygen", tmp_path / "k")
    assert ok("repo", "init", tmp_path / "repo", "--root-key", tmp_path / "k",
              "--release-key", tmp_path / "k")  # fmt: skip
    base = {"bin/tool": b"#!/bin/sh\n", "data/a.bin": os.urandom(MiB)}
    v1 = make_tree(tmp_path / "v1", base, links={"l": "bin/tool"}, empty_dirs=("var/e",))
    v2 = make_tree(tmp_path / "v2", {**base, "data/huge.bin": os.urandom(30 * MiB)})
    assert ok("publish", tmp_path / "repo", "app", "1.0", v1)
    assert ok("publish", tmp_path / "repo", "app", "2.0", v2)
    assert ok("export", tmp_path / "repo", tmp_path / "usb", "--history", "2")
    with tmpfs(tmp_path / "mnt", size="24m") as mnt:
        target = mnt / "app"
        state = tmp_path / "state"
        assert ok("init", "--state-dir", state, "--trust", tmp_path / "repo/root.msgpack",
                  "--component", f"app={target}")  # fmt: skip
        assert ok("import", tmp_path / "usb", "--state-dir", state)
        assert ok("apply", "app", "--state-dir", state, "--version", "1.0")
        assert tree_snapshot(target) == tree_snapshot(v1)
        assert fsutil.free_bytes(mnt) < 30 * MiB
        yield Setup(state, target, v1, v2)


def assert_untouched(s: Setup, blobs_before: set[bytes]) -> None:
    assert tree_snapshot(s.target) == tree_snapshot(s.v1)
    assert os.listdir(s.target.parent) == ["app"]  # no stage, no scratch left
    store = PackStore(s.state)
    assert set(store.iter_digests()) == blobs_before
    assert store.fsck().clean
    doc = api.status(s.state)["components"]["app"]
    assert doc["version"] == "1.0" and doc["transaction"] is None


def test_update_bigger_than_free_space_is_refused_before_staging(full: Setup) -> None:
    blobs = set(PackStore(full.state).iter_digests())
    r = subprocess.run(
        [sys.executable, "-m", "p2pupd.tools.cli", "apply", "app", "--state-dir", full.state],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("p2pupd: error: need ")
    assert f"MiB free on tmpfs at {full.target.parent}, have " in lines[0]
    assert_untouched(full, blobs)
    # Not a health failure: the release may be applied once space is made.
    hist = api.history(full.state, "app")
    assert [h["event"] for h in hist].count("health-failed") == 0
    assert json.dumps(api.status(full.state)["components"]["app"]["bad"]) == "{}"


def test_disk_full_mid_stage_is_a_clean_error(full: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    blobs = set(PackStore(full.state).iter_digests())
    # Skip the up-front check so the kernel's ENOSPC arrives half-way.
    monkeypatch.setattr(stage, "ensure_free", lambda *a: None)
    with pytest.raises(NoSpaceError, match=r"no space left to .*huge\.bin"):
        api.apply(full.state, "app")
    assert_untouched(full, blobs)
    # Space made (here: a smaller update) and the node applies normally again.
    monkeypatch.undo()
    assert api.apply(full.state, "app", version="1.0").changed is False
