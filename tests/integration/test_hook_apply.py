"""WebAssembly hooks through the real apply path (`p2pupd import --apply`, `p2pupd apply`).

Each hook is a WASI command compiled from WAT here. A hook named in the signed
manifest runs at its point (pre-apply on the stage, post-apply and health on
the live tree); its output lands in `history`; every way a hook can fail (exit
code, trap, fuel, deadline, memory, escape attempt, a module the manifest does
not name) swaps the old version back byte for byte and says why in
`status --json` and `history --json`. Limits are the node's own, set small with
`p2pupd init --hook-*` so the file stays fast.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import wasmtime
from _store import rewrite_packed
from conftest import World, make_tree, tree_snapshot

from p2pupd.protocol import ids

V1 = {"bin/tool": b"v1\n", "etc/conf": b"a=1\n"}
V2 = {"bin/tool": b"v2\n", "etc/conf": b"a=2\n", "new": b"n\n"}

WASI_IMPORTS = """
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  ;; say(fd, ptr, len): one iovec at 0, bytes written at 8
  (func $say (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  ;; open(dirfd, ptr, len) -> errno: for reading (rights fd_read|fd_seek|fd_tell|
  ;; fd_filestat_get, as wasi-libc's open(O_RDONLY) asks), following symlinks;
  ;; the new fd is stored at 12
  (func $open (param $dir i32) (param $ptr i32) (param $len i32) (result i32)
    (call $path_open (local.get $dir) (i32.const 1) (local.get $ptr) (local.get $len)
      (i32.const 0) (i64.const 0x200026) (i64.const 0) (i32.const 0) (i32.const 12)))
"""


def wat_bytes(data: bytes) -> str:
    return "".join(f"\\{b:02x}" for b in data)


def compile_wat(body: str, data: dict[int, bytes] | None = None) -> bytes:
    """A WASI command: the helpers above, ``data`` segments, and ``_start`` = ``body``."""
    segs = "".join(f'(data (i32.const {at}) "{wat_bytes(b)}")' for at, b in (data or {}).items())
    return bytes(wasmtime.wat2wasm(f"(module {WASI_IMPORTS} {segs} {body})"))


def say_module(text: bytes, code: int = 0, fd: int = 1) -> bytes:
    """Writes ``text`` to ``fd`` and exits with ``code``."""
    return compile_wat(
        f"""(func (export "_start")
              (call $say (i32.const {fd}) (i32.const 1024) (i32.const {len(text)}))
              (call $exit (i32.const {code})))""",
        {1024: text},
    )


def expect_file_module(rel: str, expected: bytes) -> bytes:
    """Reads ``/tree/<rel>``; exits 0 if it holds exactly ``expected``, else 1 with a message."""
    path, good, bad = rel.encode(), b"content ok\n", f"{rel} has the wrong content\n".encode()
    n = len(expected)
    fail = f"(call $say (i32.const 2) (i32.const 3072) (i32.const {len(bad)})) (call $exit (i32.const 1))"
    return compile_wat(
        f"""(func (export "_start") (local $i i32)
              (if (call $open (i32.const 3) (i32.const 16) (i32.const {len(path)}))
                (then {fail}))
              (i32.store (i32.const 0) (i32.const 4096))
              (i32.store (i32.const 4) (i32.const 4096))
              (drop (call $fd_read (i32.load (i32.const 12)) (i32.const 0) (i32.const 1) (i32.const 8)))
              (if (i32.ne (i32.load (i32.const 8)) (i32.const {n})) (then {fail}))
              (block $done (loop $cmp
                (br_if $done (i32.ge_u (local.get $i) (i32.const {n})))
                (if (i32.ne (i32.load8_u (i32.add (i32.const 4096) (local.get $i)))
                            (i32.load8_u (i32.add (i32.const 512) (local.get $i))))
                  (then {fail}))
                (local.set $i (i32.add (local.get $i) (i32.const 1)))
                (br $cmp)))
              (call $say (i32.const 1) (i32.const 2048) (i32.const {len(good)})))""",
        {16: path, 512: expected, 2048: good, 3072: bad},
    )


def escape_module() -> bytes:
    """Tries to open files outside its pre-opens; exits 0 if any open works, else 13."""
    attempts = [
        (3, b"../../../../../../../../etc/passwd"),  # climb out of /tree
        (3, b"/etc/passwd"),  # an absolute path
        (3, b"out/secret"),  # a symlink in the tree to the directory holding it
        (4, b"../../../../../../../../etc/passwd"),  # climb out of /scratch
        (5, b"etc/passwd"),  # a descriptor nobody pre-opened
    ]
    data, tries = {}, []
    for i, (fd, path) in enumerate(attempts):
        at = 64 + 128 * i
        data[at] = path
        tries.append(
            f"(if (i32.eqz (call $open (i32.const {fd}) (i32.const {at}) (i32.const {len(path)})))"
            " (then (call $exit (i32.const 0))))"
        )
    msg = b"every escape was refused\n"
    data[2048] = msg
    return compile_wat(
        f"""(func (export "_start") {" ".join(tries)}
              (call $say (i32.const 2) (i32.const 2048) (i32.const {len(msg)}))
              (call $exit (i32.const 13)))""",
        data,
    )


LOOP = compile_wat('(func (export "_start") (loop $l (br $l)))')
# Grows memory a page at a time until refused, then traps as an allocator would.
MEMORY_BOMB = compile_wat(
    """(func (export "_start")
         (loop $l (br_if $l (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
         unreachable)"""
)


# -- node helpers ---------------------------------------------------------------------


def publish_with_hooks(
    world: World, tmp_path: Path, version: str, files: dict[str, bytes], **hooks: bytes
) -> Path:
    """Publish ``files`` as ``version`` with hook modules by point (``health=...``)."""
    src = make_tree(world.base / "src" / version, files)
    args: list[str | Path] = []
    for point, module in hooks.items():
        path = tmp_path / f"{version}-{point}.wasm"
        path.write_bytes(module)
        args += ["--hook", f"{point.replace('_', '-')}={path}"]
    r = world.run("publish", world.repo, "app", version, src, *args)
    assert r.code == 0, r.err
    return src


@pytest.fixture
def v1(world: World) -> Path:
    """Version 1.0 live (no hooks): what every failure must leave byte for byte."""
    src = world.publish("1.0", V1)
    r = world.import_(world.export("usb1"), "--apply")
    assert r.code == 0, r.err
    return src


def assert_rolled_back(world: World, v1: Path, version: str, serial: int, reason: str) -> None:
    assert tree_snapshot(world.target) == tree_snapshot(v1)
    assert sorted(os.listdir(world.target.parent)) == ["app"]  # no stage or view left
    st = world.app_status()
    assert st["version"] == "1.0"
    assert st["bad"] == {str(serial): reason}
    assert st["last_error"] == f"{version} rolled back: {reason}"
    hist = world.app_history()
    assert (hist[-1]["event"], hist[-1]["version"], hist[-1]["detail"]) == (
        "health-failed", version, reason,
    )  # fmt: skip


# -- tests ------------------------------------------------------------------------------


def test_hooks_run_at_each_point_and_their_output_is_in_history(
    world: World, tmp_path: Path, v1: Path
) -> None:
    src = publish_with_hooks(
        world, tmp_path, "2.0", V2,
        pre_apply=expect_file_module("etc/conf", b"a=2\n"),  # sees the stage: new content
        post_apply=say_module(b"post-apply says hi\n"),
        health=say_module(b"healthy\n", fd=2),
    )  # fmt: skip
    r = world.import_(world.export("usb2"), "--apply", "--json")
    assert r.code == 0, r.err
    assert tree_snapshot(world.target) == tree_snapshot(src)
    assert world.app_status()["version"] == "2.0"
    hist = world.app_history()
    hooks = [h for h in hist if h["event"] == "hook"]
    assert [str(h["detail"]).split(" hook ")[0] for h in hooks] == [
        "pre-apply", "post-apply", "health",
    ]  # fmt: skip
    assert all(" hook passed: exited with 0" in str(h["detail"]) for h in hooks)
    assert "stdout: content ok" in str(hooks[0]["detail"])
    assert "stdout: post-apply says hi" in str(hooks[1]["detail"])
    assert "stderr: healthy" in str(hooks[2]["detail"])
    assert hist[-1]["event"] == "applied"
    # Humans see the output lines indented under the detail column.
    r = world.run("history", "app", "--state-dir", world.state)
    assert r.code == 0
    assert any(line.strip() == "stderr: healthy" for line in r.out.splitlines())


def test_health_hook_reading_the_live_tree_refuses_wrong_content(
    world: World, tmp_path: Path, v1: Path
) -> None:
    bad = {**V2, "etc/conf": b"a=broken\n"}
    publish_with_hooks(world, tmp_path, "2.0", bad, health=expect_file_module("etc/conf", b"a=2\n"))
    r = world.import_(world.export("usb2"), "--apply")
    assert r.code == 1
    reason = "health hook: exited with 1"
    assert r.err == f"p2pupd: error: app 2.0 rolled back: {reason}\n"
    assert_rolled_back(world, v1, "2.0", 2, reason)
    hook = world.app_history()[-2]
    assert hook["event"] == "hook"
    detail = str(hook["detail"])
    assert re.fullmatch(
        r"health hook failed: exited with 1 \(\d+\.\d\ds\)\nstderr: etc/conf has the wrong content",
        detail,
    ), detail


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        (("--hook-fuel", "5000000"), "health hook: out of fuel (5,000,000 units)"),
        (("--hook-fuel", str(10**15), "--hook-seconds", "0.3"),
         "health hook: deadline of 0.3s exceeded"),
    ],
    ids=["fuel", "deadline"],
)  # fmt: skip
def test_infinite_loop_is_stopped_and_rolled_back(
    world: World, tmp_path: Path, v1: Path, limits: tuple[str, ...], reason: str
) -> None:
    world.reinit(*limits)
    publish_with_hooks(world, tmp_path, "2.0", V2, health=LOOP)
    r = world.import_(world.export("usb2"), "--apply")
    assert r.code == 1
    assert r.err == f"p2pupd: error: app 2.0 rolled back: {reason}\n"
    assert_rolled_back(world, v1, "2.0", 2, reason)


def test_memory_bomb_is_stopped_by_the_limit(world: World, tmp_path: Path, v1: Path) -> None:
    world.reinit("--hook-memory-mib", "4")
    assert status_limits(world)["memory"] == 4 * 1024 * 1024
    publish_with_hooks(world, tmp_path, "2.0", V2, health=MEMORY_BOMB)
    r = world.import_(world.export("usb2"))
    assert r.code == 0, r.err
    r = world.run("apply", "app", "--state-dir", world.state)
    assert r.code == 1
    reason = str(world.app_status()["bad"]["2"])  # type: ignore[index]
    assert reason.startswith("health hook: memory limit 4 MiB exceeded (trap: ")
    assert "unreachable" in reason
    assert_rolled_back(world, v1, "2.0", 2, reason)


def test_escape_from_the_preopens_is_refused(world: World, tmp_path: Path, v1: Path) -> None:
    secret = world.base / "secret"
    secret.write_text("s3cret")
    files = {**V2}
    publish_src = make_tree(world.base / "src" / "2.0", files, links={"out": str(secret.parent)})
    hook = tmp_path / "escape.wasm"
    hook.write_bytes(escape_module())
    r = world.run("publish", world.repo, "app", "2.0", publish_src, "--hook", f"health={hook}")
    assert r.code == 0, r.err
    r = world.import_(world.export("usb2"), "--apply")
    assert r.code == 1
    reason = "health hook: exited with 13"
    assert_rolled_back(world, v1, "2.0", 2, reason)
    assert "stderr: every escape was refused" in str(world.app_history()[-2]["detail"])


def test_pre_apply_failure_never_swaps(world: World, tmp_path: Path, v1: Path) -> None:
    publish_with_hooks(world, tmp_path, "2.0", V2, pre_apply=say_module(b"no\n", code=4, fd=2))
    r = world.import_(world.export("usb2"), "--apply")
    assert r.code == 1
    reason = "pre-apply hook: exited with 4"
    assert r.err == f"p2pupd: error: app 2.0 not applied: {reason}\n"
    assert tree_snapshot(world.target) == tree_snapshot(v1)
    st = world.app_status()
    assert (st["bad"], st["last_error"]) == ({"2": reason}, f"2.0 refused: {reason}")
    hist = world.app_history()
    assert [h["event"] for h in hist[-2:]] == ["hook", "refused"]
    assert "stderr: no" in str(hist[-2]["detail"])


def test_a_module_the_manifest_does_not_name_never_runs(
    world: World, tmp_path: Path, v1: Path
) -> None:
    """Swapping the hook's bytes in the node's store for a module that would pass
    does not get it run: the bytes must hash to what the signed manifest names."""
    good = say_module(b"y\n")  # passes; as long as the named module, to take its place
    publish_with_hooks(world, tmp_path, "2.0", V2, health=say_module(b"x\n", code=1))
    assert world.import_(world.export("usb2")).code == 0
    named = ids.sha256(say_module(b"x\n", code=1)).hex()
    # A forger with write access to the state directory fixes the checksum
    # too: only the sha256 check before a hook runs can tell.
    assert len(good) == len(say_module(b"x\n", code=1))
    rewrite_packed(world.state, bytes.fromhex(named), good, fix_checksum=True)
    r = world.run("apply", "app", "--state-dir", world.state)
    assert r.code != 0
    assert "does not match its name" in r.err
    assert tree_snapshot(world.target) == tree_snapshot(v1)
    st = world.app_status()
    assert st["version"] == "1.0"
    assert "does not match its name" in str(st["last_error"])
    assert not any(
        h["event"] == "hook" and "passed" in str(h["detail"]) for h in world.app_history()
    )


def status_limits(world: World) -> dict[str, int]:
    r = world.run("status", "--state-dir", world.state, "--json")
    assert r.code == 0, r.err
    limits: dict[str, int] = json.loads(r.out)["hook_limits"]
    return limits
