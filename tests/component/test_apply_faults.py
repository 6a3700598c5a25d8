"""The apply engine under faults, in-process on a real filesystem: a process cut off
between swap and commit, a disk that fills or a journal that cannot be written in
the commit window, recovery that cannot write, kept versions that share content
with the release being staged, a lost stat cache, a link the state disagrees with.

A kill is simulated by raising ``Killed`` (a ``BaseException``, which no apply code
catches) at a transaction point; the real SIGKILL and power-cut campaigns are in
tests/integration/test_crash_apply.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _store import drop
from conftest import World, tree_snapshot

from p2pupd.daemon import api
from p2pupd.daemon.apply import transaction
from p2pupd.daemon.apply.engine import Applier
from p2pupd.daemon.errors import NoSpaceError
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.state.statedir import StateDir

FILES = {f"lib/f{i:02}": os.urandom(2000 + i) for i in range(8)}
V1 = {**FILES, "bin/tool": b"v1\n", "old/notes.txt": b"notes kept from 1.0\n"}
V2 = {**FILES, "bin/tool": b"v2\n"}
# 3.0 brings back 1.0's notes at a new path: with --retain 1, 1.0 is the kept
# version recycled into 3.0's stage, and the only trusted copy of those bytes.
V3 = {**FILES, "bin/tool": b"v3\n", "doc/notes.txt": b"notes kept from 1.0\n"}


class Killed(BaseException):
    """The process died here."""


def publish_all(world: World, *trees: dict[str, bytes]) -> list[Path]:
    srcs = [world.publish(f"{k}.0", t) for k, t in enumerate(trees, 1)]
    assert world.import_(world.export("usb", "--history", str(len(trees)))).code == 0
    return srcs


def kill_at(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    """Make the next transaction die at ``point`` (and only there)."""
    real = transaction.crash_point

    def fake(p: str) -> None:
        if p == point:
            raise Killed(p)
        real(p)

    monkeypatch.setattr(transaction, "crash_point", fake)


def state(world: World) -> Any:
    return StateDir(world.state).read_state("app")


def live(world: World, trees: list[Path]) -> int:
    """Which release (1-based) the target holds exactly."""
    snap = tree_snapshot(world.target)
    for k, src in enumerate(trees, 1):
        if snap == tree_snapshot(src):
            return k
    raise AssertionError(f"{world.target} holds no release: {sorted(snap)[:5]}")


# -- item 2: an interruption is not a verdict --------------------------------------------


def test_apply_cut_off_between_swap_and_commit_is_retried_then_marked_bad(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    trees = publish_all(world, V1, V2)
    api.apply(world.state, "app", version="1.0")
    for n in (1, 2, 3):
        with monkeypatch.context() as m:
            kill_at(m, "swapped")
            with pytest.raises(Killed):
                api.apply(world.state, "app")  # the newest not marked bad: 2.0
        assert live(world, trees) == 2  # swapped in, not committed
        doc = api.status(world.state)  # recovers
        assert doc["recovered"] == [
            "app: rolled back serial 2 (interrupted between swap and commit)"
        ]
        assert live(world, trees) == 1
        app = doc["components"]["app"]
        assert app["serial"] == 1 and app["interrupted"] == {"2": n}
        last = world.app_history()[-1]
        assert (last["event"], last["serial"]) == ("interrupted", 2)
        assert last["detail"] == f"interrupted between swap and commit ({n} of 3)"
        if n < 3:
            assert app["bad"] == {}
            assert "will be retried" in app["last_error"]
        else:
            assert app["bad"] == {"2": "interrupted between swap and commit, 3 times"}
    # Bounded: after the third interruption it is no longer chosen by itself...
    r = world.run("apply", "app", "--state-dir", world.state)
    assert r.code == 0 and r.out.startswith("app 1.0 is live (no change)\n")
    assert "app 2.0 (serial 2), is marked bad here" in r.out
    # ...and --force retries it; a commit clears the count.
    r = world.run("apply", "app", "--state-dir", world.state, "--version", "2.0", "--force")
    assert r.code == 0, r.err
    assert live(world, trees) == 2
    assert state(world).interrupted == {} and state(world).bad == {}


def test_import_apply_after_an_interruption_applies_the_newest_release(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    trees = publish_all(world, V1, V2)
    api.apply(world.state, "app", version="1.0")
    with monkeypatch.context() as m:
        kill_at(m, "health")
        with pytest.raises(Killed):
            api.apply(world.state, "app")
    r = world.import_(world.base / "usb", "--apply")
    assert r.code == 0, r.err
    assert "applied app 2.0" in r.out
    assert live(world, trees) == 2
    assert state(world).installed == 2


# -- item 3: a plan pins its sources before anything is dropped -----------------------------


@pytest.mark.parametrize("kind", ["dir", "symlink"])
def test_update_over_a_recycled_version_holding_its_only_trusted_copy(
    world: World, kind: str
) -> None:
    world.reinit("--kind", kind, "--retain", "1")
    trees = publish_all(world, V1, V2, V3)
    for version in ("1.0", "2.0"):
        api.apply(world.state, "app", version=version)
    r = world.run("apply", "app", "--state-dir", world.state, "--version", "3.0")
    assert r.code == 0, r.err
    assert live(world, trees) == 3
    assert state(world).kept == (2,)
    assert world.run("fsck", "--state-dir", world.state, "--full").code == 0
    assert api.rollback(world.state, "app").version == "2.0"
    assert live(world, trees) == 2


@pytest.mark.parametrize("kind", ["dir", "symlink", "file"])
def test_rollback_to_a_touched_kept_version(world: World, kind: str) -> None:
    world.reinit("--kind", kind, "--retain", "1")
    if kind == "file":
        img = {"disk.img": os.urandom(300_000)}
        trees = publish_all(world, img, {"disk.img": os.urandom(300_000)})
    else:
        trees = publish_all(world, V1, V2)
    api.apply(world.state, "app", version="1.0")
    api.apply(world.state, "app", version="2.0")
    kept = world.target.parent / ".app.p2pupd-v1"
    os.utime(kept if kind == "file" else kept / "lib/f03")  # one touch: bytes unchanged
    r = world.run("rollback", "app", "--state-dir", world.state)
    assert r.code == 0, r.err
    if kind == "file":
        assert (world.target).read_bytes() == (trees[0] / "disk.img").read_bytes()
    else:
        assert live(world, trees) == 1
    assert state(world).installed == 1 and state(world).kept == (2,)
    assert world.run("fsck", "--state-dir", world.state, "--full").code == 0


# -- item 8: a lost stat cache costs a re-hash, never a kept version ---------------------


def test_kept_version_whose_cache_file_was_lost_is_rolled_back_to(world: World) -> None:
    world.reinit("--kind", "symlink")
    trees = publish_all(world, V1, V2)
    api.apply(world.state, "app", version="1.0")
    api.apply(world.state, "app", version="2.0")
    (world.state / "cache" / "app.stats.d" / "v1").unlink()  # lost in a power cut
    node = Node(world.state)
    man = Applier(node).manifest("app", 1)
    only_v1 = {c.digest for f in man.files if f.path == "old/notes.txt" for c in f.chunks}
    drop(world.state, only_v1)  # the store can no longer rebuild it: only the disk can
    r = world.run("rollback", "app", "--state-dir", world.state)
    assert r.code == 0, r.err
    assert live(world, trees) == 1
    assert world.run("fsck", "--state-dir", world.state).code == 0


# -- item 4: exit 1 means the old version is live -------------------------------------------


def fail_when(
    monkeypatch: pytest.MonkeyPatch, obj: Any, name: str, when: Callable[..., bool]
) -> None:
    real = getattr(obj, name)

    def fake(self: Any, *args: Any, **kw: Any) -> Any:
        if when(*args, **kw):
            raise NoSpaceError("no space left to write (injected)")
        return real(self, *args, **kw)

    monkeypatch.setattr(obj, name, fake)


def test_disk_full_writing_the_committed_state_exits_4_with_the_new_version_live(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    trees = publish_all(world, V1, V2)
    api.apply(world.state, "app", version="1.0")
    with monkeypatch.context() as m:
        fail_when(m, StateDir, "update_state", lambda name, st: st.installed == 2)
        r = world.run("apply", "app", "--state-dir", world.state, "--version", "2.0")
    assert r.code == 4, r.err
    assert "serial 2 is live" in r.err and "p2pupd recover" in r.err
    assert live(world, trees) == 2
    r = world.run("recover", "--state-dir", world.state)
    assert r.code == 0, r.err
    assert state(world).installed == 2
    assert world.run("fsck", "--state-dir", world.state).code == 0


@pytest.mark.parametrize("step", ["swapped", "health", "commit"])
def test_journal_full_before_the_commit_is_durable_exits_1_with_the_old_version_live(
    world: World, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    trees = publish_all(world, V1, V2)
    api.apply(world.state, "app", version="1.0")
    with monkeypatch.context() as m:
        fail_when(m, transaction.Journal, "append", lambda rec: rec.get("step") == step)
        r = world.run("apply", "app", "--state-dir", world.state, "--version", "2.0")
    assert r.code == 1
    assert "no space left" in r.err
    assert live(world, trees) == 1
    assert state(world).installed == 1
    r = world.run("apply", "app", "--state-dir", world.state, "--version", "2.0")
    assert r.code == 0, r.err
    assert live(world, trees) == 2
    assert sorted(os.listdir(world.target.parent)) == [".app.p2pupd-v1", "app"]


# -- item 5: status never needs to write ----------------------------------------------------


def test_status_reports_the_open_transaction_when_recovery_cannot_write(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_all(world, V1, V2)
    api.apply(world.state, "app", version="1.0")
    with monkeypatch.context() as m:
        kill_at(m, "swapped")
        with pytest.raises(Killed):
            api.apply(world.state, "app")
    with monkeypatch.context() as m:
        fail_when(m, transaction.Journal, "append", lambda rec: True)  # a full disk
        r = world.run("status", "--state-dir", world.state, "--json")
        assert r.code == 0, r.err
        app = json.loads(r.out)["components"]["app"]
        tx = app["transaction"]
        assert (tx["op"], tx["to"], tx["from"], tx["step"]) == ("apply", 2, 1, "swapped")
        r = world.run("status", "--state-dir", world.state)
        assert r.code == 0, r.err
        assert "open transaction: apply of serial 2 at step swapped" in r.out
        assert world.run("history", "app", "--state-dir", world.state).code == 0
    assert api.status(world.state)["components"]["app"]["transaction"] is None  # recovered


# -- item 6: init re-run on a symlink-kind node -----------------------------------------


def test_init_again_on_a_symlink_node_keeps_the_link_as_target(world: World) -> None:
    world.reinit("--kind", "symlink")
    trees = publish_all(world, V1, V2)
    api.apply(world.state, "app", version="1.0")
    assert world.target.is_symlink()
    world.reinit("--kind", "symlink")  # e.g. to change the health command
    cfg = StateDir(world.state).read_config().component("app")
    assert cfg.target == world.target
    api.apply(world.state, "app", version="2.0")
    assert world.target.is_symlink() and live(world, trees) == 2


# -- item 1: fsck reads the link -----------------------------------------------------------


def test_fsck_catches_a_link_the_state_disagrees_with(world: World) -> None:
    world.reinit("--kind", "symlink")
    publish_all(world, V1, V2)
    api.apply(world.state, "app", version="1.0")
    api.apply(world.state, "app", version="2.0")
    assert world.run("fsck", "--state-dir", world.state).code == 0
    tmp = world.target.parent / "relink"
    os.symlink(".app.p2pupd-v1", tmp)
    os.rename(tmp, world.target)  # the link says 1.0, the state says 2.0
    r = world.run("fsck", "--state-dir", world.state)
    assert r.code == 1
    assert "points to .app.p2pupd-v1, but the state says serial 2" in r.out


def test_gc_runs_when_recovery_cannot_write(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """gc is how room is made on a full disk: it runs with a transaction left open
    that recovery cannot close, and keeps that transaction's releases."""
    trees = publish_all(world, V1, V2, V3)
    api.apply(world.state, "app", version="1.0")
    with monkeypatch.context() as m:
        kill_at(m, "swapped")
        with pytest.raises(Killed):
            api.apply(world.state, "app", version="2.0")
    with monkeypatch.context() as m:
        fail_when(m, transaction.Journal, "append", lambda rec: True)
        r = world.run("gc", "--state-dir", world.state, "--json")
        assert r.code == 0, r.err
        assert json.loads(r.out)["recovered"][0].startswith("recovery deferred: no space")
    # Recovery got as far as it could without the journal: the old version is back.
    assert live(world, trees) == 1
    assert len(api.status(world.state)["recovered"]) == 1  # and finishes now
    assert state(world).installed == 1
    r = world.run("apply", "app", "--state-dir", world.state, "--version", "2.0")
    assert r.code == 0, r.err  # its blobs were kept
    assert live(world, trees) == 2
