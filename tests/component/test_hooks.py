"""The hook runner against real wasmtime: limits, confinement, refusal, caching.

Every guest is written in WAT below and speaks raw ``wasi_snapshot_preview1``,
so each test shows exactly which system call the hook makes and what the
sandbox answers. Limits are small (fuel 10^6, deadlines of 0.3 s) to keep the
file fast.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime

from p2pupd.daemon.apply.hooks import (
    HookResult,
    HookRunner,
    hook_env,
    run_hook_or_raise,
    wasmtime_version,
)
from p2pupd.daemon.errors import HookError
from p2pupd.protocol.ids import sha256
from p2pupd.protocol.limits import KiB, MiB

SMALL_FUEL = 1_000_000
HUGE_FUEL = 10**15
SHORT_SECONDS = 0.3

IMPORTS = """
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get"
    (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get"
    (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
"""

# $write(fd, ptr, len): one fd_write with the iovec at address 0 (bytes 0-7).
WRITE_FUNC = """
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
"""

# WASI constants used below.
O_CREAT, O_TRUNC = 1, 8
RIGHT_FD_READ, RIGHT_FD_WRITE = 1 << 1, 1 << 6
TREE_FD, SCRATCH_FD = 3, 4
WASI_ENOSYS = 52


def wasm(body: str, data: dict[int, str] | None = None, memory_pages: int = 1) -> bytes:
    """Return a WASI command whose ``_start`` runs ``body``; ``data`` maps address -> text."""
    segments = "".join(f'  (data (i32.const {a}) "{t}")\n' for a, t in (data or {}).items())
    return bytes(
        wasmtime.wat2wasm(
            f'(module {IMPORTS}\n  (memory (export "memory") {memory_pages})\n{segments}'
            f'{WRITE_FUNC}\n  (func (export "_start") {body}))'
        )
    )


PASS = wasm(
    """
    (call $write (i32.const 1) (i32.const 1024) (i32.const 3))
    (call $write (i32.const 2) (i32.const 1028) (i32.const 4))
    (call $proc_exit (i32.const 0))""",
    {1024: "ok\\0a", 1028: "warn"},
)

EXIT_1 = wasm("(call $proc_exit (i32.const 1))")

# Reads /tree/version.txt; exit 0 if it is exactly "v2.0", 1 if not, 2 if unreadable.
EXPECTED_VERSION = b"v2.0"
CHECK_VERSION = wasm(
    f"""
    (if (call $path_open (i32.const {TREE_FD}) (i32.const 0) (i32.const 1024) (i32.const 11)
          (i32.const 0) (i64.const {RIGHT_FD_READ}) (i64.const 0) (i32.const 0) (i32.const 16))
      (then (call $proc_exit (i32.const 2))))
    (i32.store (i32.const 32) (i32.const 2048))
    (i32.store (i32.const 36) (i32.const 64))
    (if (call $fd_read (i32.load (i32.const 16)) (i32.const 32) (i32.const 1) (i32.const 40))
      (then (call $proc_exit (i32.const 2))))
    (if (i32.and (i32.eq (i32.load (i32.const 40)) (i32.const 4))
                 (i32.eq (i32.load (i32.const 2048))
                         (i32.const {int.from_bytes(EXPECTED_VERSION, "little")})))
      (then (call $proc_exit (i32.const 0))))
    (call $proc_exit (i32.const 1))""",
    {1024: "version.txt"},
)

LOOP = wasm("(loop $forever (br $forever))")

# Grows memory one page at a time until refused, then aborts like an allocator would.
MEMORY_BOMB = wasm(
    """
    (loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
    unreachable"""
)

# Prints argv then the environment, each as NUL-terminated strings.
PRINT_ARGS_AND_ENV = wasm(
    """
    (drop (call $args_sizes_get (i32.const 16) (i32.const 20)))
    (drop (call $args_get (i32.const 4096) (i32.const 8192)))
    (call $write (i32.const 1) (i32.const 8192) (i32.load (i32.const 20)))
    (drop (call $environ_sizes_get (i32.const 16) (i32.const 20)))
    (drop (call $environ_get (i32.const 4096) (i32.const 8192)))
    (call $write (i32.const 1) (i32.const 8192) (i32.load (i32.const 20)))"""
)

# Asks poll_oneoff to sleep 10 s on the monotonic clock; exits with its errno.
SLEEP_10S = wasm(
    """
    (i64.store (i32.const 128) (i64.const 7))
    (i32.store8 (i32.const 136) (i32.const 0))
    (i32.store (i32.const 144) (i32.const 1))
    (i64.store (i32.const 152) (i64.const 10000000000))
    (i64.store (i32.const 160) (i64.const 0))
    (i32.store16 (i32.const 168) (i32.const 0))
    (call $proc_exit
      (call $poll_oneoff (i32.const 128) (i32.const 256) (i32.const 1) (i32.const 16)))"""
)

# Writes 8 x 64 KiB to stdout.
CHATTY = wasm(
    """
    (local $i i32)
    (loop $more
      (call $write (i32.const 1) (i32.const 0) (i32.const 65536))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $more (i32.lt_u (local.get $i) (i32.const 8))))"""
)


def open_and_write(fd: int, path: str, oflags: int, rights: int) -> bytes:
    """A hook that opens ``path`` relative to ``fd``; exit 3 if refused, else writes "pwned"."""
    return wasm(
        f"""
        (if (call $path_open (i32.const {fd}) (i32.const 0) (i32.const 1024)
              (i32.const {len(path.encode())}) (i32.const {oflags}) (i64.const {rights})
              (i64.const 0) (i32.const 0) (i32.const 16))
          (then (call $proc_exit (i32.const 3))))
        (call $write (i32.load (i32.const 16)) (i32.const 1536) (i32.const 5))
        (call $proc_exit (i32.const 0))""",
        {1024: path, 1536: "pwned"},
    )


def big_module(functions: int = 400) -> bytes:
    """A module with enough code that compiling it takes measurable time."""
    funcs = "".join(
        f"""
  (func $f{i} (param $x i32) (result i32)
    (local $y i32)
    (local.set $y (i32.mul (local.get $x) (i32.const {i + 3})))
    (if (result i32) (i32.gt_u (local.get $y) (i32.const {i * 7 + 1}))
      (then (i32.xor (local.get $y) (i32.rotl (local.get $x) (i32.const {i % 31}))))
      (else (i32.add (local.get $y) (i32.popcnt (local.get $x))))))"""
        for i in range(functions)
    )
    calls = "".join(f"(drop (call $f{i} (i32.const {i})))" for i in range(functions))
    return bytes(
        wasmtime.wat2wasm(f'(module {IMPORTS} (memory (export "memory") 1) {funcs}\n'
                          f'  (func (export "_start") {calls}))')
    )  # fmt: skip


@pytest.fixture(autouse=True)
def no_ticker_left_behind() -> Iterator[None]:
    """The epoch ticker thread must exist only while a hook runs."""
    yield
    names = [t.name for t in threading.enumerate()]
    assert "p2pupd-hook-epoch" not in names


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """A staged tree holding version.txt and an empty scratch directory."""
    tree, scratch = tmp_path / "tree", tmp_path / "scratch"
    tree.mkdir()
    scratch.mkdir()
    (tree / "version.txt").write_bytes(EXPECTED_VERSION)
    return tree, scratch


def run(
    runner: HookRunner,
    dirs: tuple[Path, Path],
    module: bytes,
    digest: bytes | None = None,
    point: str = "pre-apply",
) -> HookResult:
    tree, scratch = dirs
    env = hook_env("app", "1.0", "2.0")
    return runner.run(point, module, digest or sha256(module), tree, scratch, env)


@pytest.fixture
def runner() -> HookRunner:
    return HookRunner(None, fuel=SMALL_FUEL, memory_bytes=4 * MiB, seconds=5.0)


# --- outcomes ----------------------------------------------------------------


def test_passing_hook_output_is_captured(runner: HookRunner, dirs: tuple[Path, Path]) -> None:
    result = run(runner, dirs, PASS)
    assert result.ok
    assert (result.exit_code, result.reason) == (0, "exited with 0")
    assert (result.stdout, result.stderr) == ("ok\n", "warn")
    assert result.point == "pre-apply"
    assert 0 < result.fuel_used < SMALL_FUEL
    assert not result.cached


def test_returning_from_start_is_exit_0(runner: HookRunner, dirs: tuple[Path, Path]) -> None:
    result = run(runner, dirs, wasm("nop"))
    assert result.ok and result.exit_code == 0


def test_nonzero_exit_fails(runner: HookRunner, dirs: tuple[Path, Path]) -> None:
    result = run(runner, dirs, EXIT_1)
    assert not result.ok
    assert (result.exit_code, result.reason) == (1, "exited with 1")
    with pytest.raises(HookError, match=r"^health hook: exited with 1$"):
        run_hook_or_raise(runner, "health", EXIT_1, sha256(EXIT_1), *dirs, {})
    assert run_hook_or_raise(runner, "health", PASS, sha256(PASS), *dirs, {}).ok


def test_reads_the_staged_tree(runner: HookRunner, dirs: tuple[Path, Path]) -> None:
    assert run(runner, dirs, CHECK_VERSION).ok
    (dirs[0] / "version.txt").write_bytes(b"v1.9")
    result = run(runner, dirs, CHECK_VERSION)
    assert (result.ok, result.exit_code) == (False, 1)


def test_argv_and_environment_name_the_hook_only(
    runner: HookRunner, dirs: tuple[Path, Path]
) -> None:
    result = run(runner, dirs, PRINT_ARGS_AND_ENV, point="post-apply")
    words = result.stdout.split("\0")
    assert words[:2] == ["hook", "post-apply"]
    env = dict(w.split("=", 1) for w in words[2:] if w)
    assert env == {
        "P2PUPD_HOOK": "post-apply",
        "P2PUPD_COMPONENT": "app",
        "P2PUPD_OLD_VERSION": "1.0",
        "P2PUPD_NEW_VERSION": "2.0",
        "P2PUPD_TREE": "/tree",
        "P2PUPD_SCRATCH": "/scratch",
    }


def test_env_may_not_override_reserved_names(runner: HookRunner, dirs: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match="P2PUPD_TREE"):
        runner.run("pre-apply", PASS, sha256(PASS), *dirs, {"P2PUPD_TREE": "/"})


def test_trap_is_a_result_not_an_exception(runner: HookRunner, dirs: tuple[Path, Path]) -> None:
    result = run(runner, dirs, wasm("unreachable"))
    assert not result.ok and result.exit_code is None
    assert result.reason == "trap: wasm `unreachable` instruction executed"


def test_output_is_bounded(dirs: tuple[Path, Path]) -> None:
    runner = HookRunner(None, fuel=SMALL_FUEL, output_bytes=1000)
    result = run(runner, dirs, CHATTY)
    assert result.ok
    assert len(result.stdout) < 1100
    assert result.stdout.endswith(f"[… {8 * 64 * KiB - 1000} more bytes not kept]")


# --- limits ------------------------------------------------------------------


def test_infinite_loop_runs_out_of_fuel(runner: HookRunner, dirs: tuple[Path, Path]) -> None:
    result = run(runner, dirs, LOOP)
    assert not result.ok and result.exit_code is None
    assert result.reason == "out of fuel (1,000,000 units)"
    assert result.seconds < 2


def test_infinite_loop_hits_the_deadline(dirs: tuple[Path, Path]) -> None:
    runner = HookRunner(None, fuel=HUGE_FUEL, seconds=SHORT_SECONDS)
    result = run(runner, dirs, LOOP)
    assert not result.ok and result.exit_code is None
    assert result.reason == "deadline of 0.3s exceeded"
    assert SHORT_SECONDS <= result.seconds < SHORT_SECONDS + 1.0


def test_concurrent_hooks_each_keep_their_deadline(dirs: tuple[Path, Path]) -> None:
    runner = HookRunner(None, fuel=HUGE_FUEL, seconds=SHORT_SECONDS)
    results: list[HookResult] = []
    threads = [threading.Thread(target=lambda: results.append(run(runner, dirs, LOOP)))
               for _ in range(3)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.reason for r in results] == ["deadline of 0.3s exceeded"] * 3
    assert all(SHORT_SECONDS <= r.seconds < SHORT_SECONDS + 1.0 for r in results)


def test_sleeping_is_refused_so_the_deadline_holds(
    runner: HookRunner, dirs: tuple[Path, Path]
) -> None:
    result = run(runner, dirs, SLEEP_10S)
    assert result.exit_code == WASI_ENOSYS
    assert result.seconds < 1


def test_memory_bomb_hits_the_memory_limit(dirs: tuple[Path, Path]) -> None:
    runner = HookRunner(None, fuel=SMALL_FUEL, memory_bytes=2 * MiB)
    result = run(runner, dirs, MEMORY_BOMB)
    assert not result.ok and result.exit_code is None
    assert result.reason.startswith("memory limit 2 MiB exceeded (trap: ")


def test_exit_at_the_memory_limit_names_the_limit(dirs: tuple[Path, Path]) -> None:
    runner = HookRunner(None, fuel=SMALL_FUEL, memory_bytes=2 * MiB)
    bomb_then_exit = wasm(
        """
        (loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
        (call $proc_exit (i32.const 1))"""
    )
    result = run(runner, dirs, bomb_then_exit)
    assert (result.ok, result.exit_code) == (False, 1)
    assert result.reason == "memory limit 2 MiB exceeded (exited with 1)"


def test_initial_memory_above_the_limit_is_refused(dirs: tuple[Path, Path]) -> None:
    runner = HookRunner(None, fuel=SMALL_FUEL, memory_bytes=1 * MiB)
    result = run(runner, dirs, wasm("nop", memory_pages=100))
    assert (result.ok, result.reason) == (False, "memory limit 1 MiB exceeded")


# --- confinement ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "oflags", "rights"),
    [
        ("../etc/passwd", 0, RIGHT_FD_READ),
        ("/etc/passwd", 0, RIGHT_FD_READ),
        ("escape/secret.txt", 0, RIGHT_FD_READ),
        ("link-to-secret", 0, RIGHT_FD_READ),
        ("created.txt", O_CREAT, RIGHT_FD_WRITE),
        ("version.txt", O_TRUNC, RIGHT_FD_WRITE),
        ("version.txt", 0, RIGHT_FD_WRITE),
    ],
)
def test_opens_outside_or_writes_into_the_tree_are_refused(
    runner: HookRunner, dirs: tuple[Path, Path], path: str, oflags: int, rights: int
) -> None:
    tree, _ = dirs
    outside = tree.parent / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (tree / "escape").symlink_to("../outside")
    (tree / "link-to-secret").symlink_to(outside / "secret.txt")
    before = sorted(p.name for p in tree.iterdir())
    result = run(runner, dirs, open_and_write(TREE_FD, path, oflags, rights))
    assert (result.ok, result.exit_code) == (False, 3)
    assert sorted(p.name for p in tree.iterdir()) == before
    assert (tree / "version.txt").read_bytes() == EXPECTED_VERSION
    assert (outside / "secret.txt").read_text() == "secret"


def test_reading_inside_the_tree_is_allowed(runner: HookRunner, dirs: tuple[Path, Path]) -> None:
    """The control for the refusals above: the same call succeeds inside /tree."""
    result = run(runner, dirs, open_and_write(TREE_FD, "version.txt", 0, RIGHT_FD_READ))
    assert result.ok
    assert (dirs[0] / "version.txt").read_bytes() == EXPECTED_VERSION


def test_scratch_is_writable(runner: HookRunner, dirs: tuple[Path, Path]) -> None:
    result = run(runner, dirs, open_and_write(SCRATCH_FD, "note.txt", O_CREAT, RIGHT_FD_WRITE))
    assert result.ok
    assert (dirs[1] / "note.txt").read_bytes() == b"pwned"


# --- refusal before running ----------------------------------------------------


def test_hash_mismatch_is_refused_without_running(
    runner: HookRunner, dirs: tuple[Path, Path]
) -> None:
    module = open_and_write(SCRATCH_FD, "ran.txt", O_CREAT, RIGHT_FD_WRITE)
    result = run(runner, dirs, module, digest=sha256(PASS))
    assert not result.ok and result.exit_code is None
    assert result.reason.startswith("module does not match its sha256 ")
    assert (result.fuel_used, result.stdout) == (0, "")
    assert not (dirs[1] / "ran.txt").exists()
    with pytest.raises(HookError, match="does not match its sha256"):
        run_hook_or_raise(runner, "pre-apply", module, sha256(PASS), *dirs, {})


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (b"garbage, not wasm", "invalid module: not a WebAssembly binary"),
        (b"", "invalid module: not a WebAssembly binary"),
        (b"(module)", "invalid module: not a WebAssembly binary"),
        (b"\0asm\x01\0\0\0\xff", "invalid module: failed to parse WebAssembly module: "),
        (bytes(wasmtime.wat2wasm('(module (func (export "main")))')),
         "invalid module: no _start function"),
        (bytes(wasmtime.wat2wasm('(module (import "env" "x" (func)) (func (export "_start")))')),
         "invalid module: unknown import: `env::x`"),
    ],
)  # fmt: skip
def test_invalid_modules_are_refused(
    runner: HookRunner, dirs: tuple[Path, Path], module: bytes, reason: str
) -> None:
    result = run(runner, dirs, module)
    assert not result.ok and result.exit_code is None
    assert result.reason.startswith(reason)
    assert "\n" not in result.reason


def test_missing_tree_is_a_result(runner: HookRunner, dirs: tuple[Path, Path]) -> None:
    result = runner.run("pre-apply", PASS, sha256(PASS), dirs[0] / "nope", dirs[1], {})
    assert (result.ok, result.reason) == (
        False,
        f"cannot pre-open /tree: {dirs[0]}/nope is not a directory",
    )


# --- compiled-module cache -----------------------------------------------------


def cache_entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.cwasm"))


def test_cache_hit_is_faster_than_compiling(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "wasm"
    module = big_module()
    cold = run(HookRunner(cache), dirs, module)
    warm_same = run(HookRunner(cache), dirs, module)
    warm = run(HookRunner(cache), dirs, module)  # a fresh runner: the cache is on disk
    assert cold.ok and warm_same.ok and warm.ok
    assert (cold.cached, warm_same.cached, warm.cached) == (False, True, True)
    assert warm.load_seconds < cold.load_seconds
    print(
        f"\nhook start-up (wasmtime {wasmtime_version()}, {len(module)} byte module): "
        f"cold compile {cold.load_seconds * 1e3:.1f} ms, "
        f"cached load {warm.load_seconds * 1e3:.1f} ms, run {warm.seconds * 1e3:.2f} ms"
    )
    assert len(cache_entries(cache)) == 1
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cache_entries(cache)[0]).st_mode) == 0o600


@pytest.mark.parametrize("damage", ["garbage", "flip", "truncate", "empty"])
def test_corrupt_cache_entry_is_rebuilt(
    dirs: tuple[Path, Path], tmp_path: Path, damage: str
) -> None:
    cache = tmp_path / "cache"
    assert not run(HookRunner(cache), dirs, PASS).cached
    [entry] = cache_entries(cache)
    data = bytearray(entry.read_bytes())
    if damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    elif damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        del data[len(data) // 2 :]
    else:
        data.clear()
    entry.write_bytes(data)
    rebuilt = run(HookRunner(cache), dirs, PASS)
    assert rebuilt.ok and not rebuilt.cached
    again = run(HookRunner(cache), dirs, PASS)
    assert again.ok and again.cached
    assert len(cache_entries(cache)) == 1


def test_entries_for_another_engine_are_replaced(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    stale = cache / f"{sha256(PASS).hex()}-{'0' * 16}-{'0' * 64}.cwasm"
    stale.write_bytes(b"compiled by some older wasmtime")
    result = run(HookRunner(cache), dirs, PASS)
    assert result.ok and not result.cached
    assert not stale.exists() and len(cache_entries(cache)) == 1
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700


def test_no_cache_dir_means_no_cache(runner: HookRunner, dirs: tuple[Path, Path]) -> None:
    assert not run(runner, dirs, PASS).cached
    assert not run(runner, dirs, PASS).cached


def test_cache_load_time_is_reported(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    start = time.monotonic()
    result = run(HookRunner(tmp_path / "c"), dirs, PASS)
    assert 0 < result.load_seconds <= time.monotonic() - start
