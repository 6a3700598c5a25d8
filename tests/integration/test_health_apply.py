"""Health-gated commit: a failing or hanging health check (command or WebAssembly
hook) swaps the old version back, says why in `status` and `history`, and marks
the release bad so it is not retried automatically; a pre-apply hook can refuse
a release before anything is swapped."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import wasmtime
from conftest import Run, World, tree_snapshot

V1 = {"bin/tool": b"v1\n", "etc/conf": b"a=1\n"}
V2 = {"bin/tool": b"v2\n", "etc/conf": b"a=2\n", "new": b"n\n"}


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def exit_module(code: int) -> bytes:
    """A WASI command that exits with ``code``."""
    return bytes(
        wasmtime.wat2wasm(
            '(module (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))'
            ' (memory (export "memory") 1)'
            f' (func (export "_start") (call $exit (i32.const {code}))))'
        )
    )


def install_v1_then_import_v2(world: World, **publish_v2: object) -> tuple[Path, Path]:
    v1 = world.publish("1.0", V1)
    r = world.import_(world.export("usb1"), "--apply")
    assert r.code == 0, r.err
    v2 = world.publish("2.0", V2, **publish_v2)
    r = world.import_(world.export("usb2"))
    assert r.code == 0, r.err
    assert tree_snapshot(world.target) == tree_snapshot(v1)
    return v1, v2


def assert_rolled_back(world: World, v1: Path, reason: str) -> None:
    assert tree_snapshot(world.target) == tree_snapshot(v1)
    assert sorted(os.listdir(world.target.parent)) == ["app"]
    st = world.app_status()
    assert st["version"] == "1.0"
    assert st["bad"] == {"2": reason}
    assert st["last_error"] == f"2.0 rolled back: {reason}"
    last = world.app_history()[-1]
    assert (last["event"], last["version"], last["detail"]) == ("health-failed", "2.0", reason)
    # Never retried automatically: the newest good release is the live one.
    r = world.run("apply", "app", "--state-dir", world.state)
    assert r.code == 0 and "no change" in r.out
    assert tree_snapshot(world.target) == tree_snapshot(v1)


def test_health_command_failure_rolls_back(world: World, tmp_path: Path) -> None:
    check = script(tmp_path / "check", 'grep -q v2 "$P2PUPD_TARGET/bin/tool" && '
                   '{ echo "starting..."; echo "v2 answers 500" >&2; exit 3; }; exit 0\n')  # fmt: skip
    world.reinit("--health-cmd", str(check))
    v1, _ = install_v1_then_import_v2(world)
    r = world.run("apply", "app", "--state-dir", world.state)
    assert r.code == 1
    reason = "health check exited with 3: v2 answers 500"
    assert r.err == f"p2pupd: error: app 2.0 rolled back: {reason}\n"
    assert_rolled_back(world, v1, reason)
    # --force retries it (and it still fails, and is still recorded).
    r = world.run("apply", "app", "--state-dir", world.state, "--version", "2.0", "--force")
    assert r.code == 1
    assert [h["event"] for h in world.app_history()].count("health-failed") == 2


def test_health_command_timeout_rolls_back_and_kills_its_children(
    world: World, tmp_path: Path
) -> None:
    pidfile = tmp_path / "child.pid"
    check = script(
        tmp_path / "hang",
        f'grep -q v1 "$P2PUPD_TARGET/bin/tool" && exit 0; sleep 60 & echo $! > {pidfile}; wait\n',
    )
    world.reinit("--health-cmd", str(check), "--health-timeout", "0.5")
    v1, _ = install_v1_then_import_v2(world)
    r = world.run("apply", "app", "--state-dir", world.state)
    assert r.code == 1
    assert_rolled_back(world, v1, "health check timed out after 0.5s")
    child = int(pidfile.read_text())
    for _ in range(50):  # the whole process group was killed, not just the shell
        if not Path(f"/proc/{child}").exists() or "Z" in _proc_state(child):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"health check child {child} survived the time-out")


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return "gone"


def test_passing_health_command_commits(world: World, tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    check = script(tmp_path / "ok", f'echo "$P2PUPD_VERSION $P2PUPD_KIND" > {seen}\n')
    world.reinit("--health-cmd", str(check))
    _, v2 = install_v1_then_import_v2(world)
    r = world.run("apply", "app", "--state-dir", world.state)
    assert r.code == 0, r.err
    assert tree_snapshot(world.target) == tree_snapshot(v2)
    assert seen.read_text() == "2.0 dir\n"
    assert world.app_status()["last_error"] is None


def test_wasm_health_hook_failure_rolls_back(world: World, tmp_path: Path) -> None:
    hook = tmp_path / "health.wasm"
    hook.write_bytes(exit_module(7))
    v1, _ = install_v1_then_import_v2(world)
    # Publishing with a hook is a new release (serial 3) of the same tree.
    world.publish("3.0", V2)
    r = world.run("publish", world.repo, "app", "4.0", world.base / "src" / "3.0",
                  "--hook", f"health={hook}")  # fmt: skip
    assert r.code == 0, r.err
    assert world.import_(world.export("usb3")).code == 0
    r = world.run("apply", "app", "--state-dir", world.state, "--version", "4.0")
    assert r.code == 1
    assert r.err == "p2pupd: error: app 4.0 rolled back: health hook: exited with 7\n"
    assert tree_snapshot(world.target) == tree_snapshot(v1)
    st = world.app_status()
    assert st["bad"] == {"4": "health hook: exited with 7"}
    assert world.app_history()[-1]["event"] == "health-failed"


def test_wasm_pre_apply_hook_refuses_before_the_swap(world: World, tmp_path: Path) -> None:
    hook = tmp_path / "pre.wasm"
    hook.write_bytes(exit_module(2))
    v1 = world.publish("1.0", V1)
    assert world.import_(world.export("usb1"), "--apply").code == 0
    src = world.publish("2.0", V2)
    r = world.run("publish", world.repo, "app", "3.0", src, "--hook", f"pre-apply={hook}")
    assert r.code == 0, r.err
    assert world.import_(world.export("usb2")).code == 0
    r = world.run("apply", "app", "--state-dir", world.state, "--version", "3.0")
    assert r.code == 1
    assert r.err == "p2pupd: error: app 3.0 not applied: pre-apply hook: exited with 2\n"
    assert tree_snapshot(world.target) == tree_snapshot(v1)
    assert sorted(os.listdir(world.target.parent)) == ["app"]
    last = world.app_history()[-1]
    assert (last["event"], last["detail"]) == ("refused", "pre-apply hook: exited with 2")
    assert world.app_status()["bad"] == {"3": "pre-apply hook: exited with 2"}


def test_history_is_recovered_and_shown_to_humans(world: World, run: Run, tmp_path: Path) -> None:
    check = script(tmp_path / "fail", 'grep -q v2 "$P2PUPD_TARGET/bin/tool" && exit 9; exit 0\n')
    world.reinit("--health-cmd", str(check))
    install_v1_then_import_v2(world)
    assert run("apply", "app", "--state-dir", world.state).code == 1
    r = run("history", "app", "--state-dir", world.state)
    assert r.code == 0
    last = r.out.rstrip().splitlines()[-1].split()
    assert last[2:] == ["health-failed", "2.0", "health", "check", "exited", "with", "9"]


def test_wasm_health_hook_on_a_file_target(world: World, tmp_path: Path) -> None:
    """The image is shown to the hook as the only file of a directory beside it."""
    image = world.target.parent / "disk.img"
    node_with_target = ("--component", f"app={image}", "--kind", "file")
    r = world.run("init", "--state-dir", world.state, "--trust", world.repo / "root.msgpack",
                  *node_with_target)  # fmt: skip
    assert r.code == 0, r.err
    hook = tmp_path / "health.wasm"
    hook.write_bytes(exit_module(5))
    world.publish("1.0", {"disk.img": b"one" * 1000})
    src = world.publish("2.0", {"disk.img": b"two" * 1000})
    r = world.run("publish", world.repo, "app", "3.0", src, "--hook", f"health={hook}")
    assert r.code == 0, r.err
    assert world.import_(world.export("usb", "--history", "3")).code == 0
    assert world.run("apply", "app", "--state-dir", world.state, "--version", "2.0").code == 0
    r = world.run("apply", "app", "--state-dir", world.state, "--version", "3.0")
    assert r.err == "p2pupd: error: app 3.0 rolled back: health hook: exited with 5\n"
    assert image.read_bytes() == b"two" * 1000
    assert os.listdir(image.parent) == ["disk.img"]  # no view or stage left behind
