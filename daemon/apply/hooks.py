"""Run update hooks: WASI command modules, in wasmtime, inside fixed limits.

Theory of operation
-------------------
A release may carry hooks (pre-apply, post-apply, health) as WebAssembly
modules. Their bytes come from the store and are named by sha256 in a manifest
whose signatures were verified; ``HookRunner.run`` hashes them again before
compiling, so a node never executes a module no verified manifest names.

Even a signed hook is treated as code that may be buggy, so it gets only what it
needs to inspect the staged release:

* **Files**: the staged tree, pre-opened *read-only* as ``/tree`` (fd 3), and an
  empty scratch directory, read-write, as ``/scratch`` (fd 4). WASI has no
  ambient filesystem: every open is relative to one of those two fds and
  wasmtime (cap-std) refuses ``..`` and symlinks that leave them.
* **No environment from us**: argv is ``["hook", point]`` and the environment
  holds only ``P2PUPD_*`` variables (hook point, component, old and new
  version, the two guest paths). No stdin; stdout and stderr go to bounded
  in-memory buffers (``output_bytes`` each, the rest is counted and dropped),
  so a chatty hook cannot fill a disk. No sockets, no clock-driven sleep.
* **CPU**: fuel (``Config.consume_fuel``), roughly one unit per instruction.
* **Wall clock**: epoch interruption. A ticker thread advances the engine's
  epoch every ``EPOCH_TICK_SECONDS`` while any hook runs; each store's deadline
  is the number of ticks in ``seconds``. Epoch checks only happen inside
  WebAssembly, so the one WASI call that could block for long, ``poll_oneoff``
  (sleep), is replaced by one that fails with ``ENOSYS``.
* **Memory**: ``Store.set_limits`` caps linear memory (``memory.grow`` returns
  -1 beyond it) and table elements.

Whatever the module does, ``run`` returns a ``HookResult``: wasmtime's
exceptions (``Trap``, ``WasmtimeError``, ``ExitTrap``) are turned into one line
of ``reason`` here, at the boundary. Compiled modules are cached on disk by
``hookcache.ModuleCache``. ``run`` is synchronous and thread-safe; the daemon
calls it from a worker thread (``trio.to_thread.run_sync``).

Known limits: a hook can fill ``/scratch`` (the caller should put it on a
filesystem where that is harmless and empty it afterwards); compile time is not
under the deadline (a module is at most ``MAX_HOOK_BYTES``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import wasmtime

from p2pupd.daemon.apply.hookcache import ModuleCache, engine_fingerprint, wasmtime_version
from p2pupd.daemon.errors import HookError
from p2pupd.protocol import ids
from p2pupd.protocol.limits import (
    HOOK_DEFAULT_FUEL,
    HOOK_DEFAULT_MEMORY_BYTES,
    HOOK_DEFAULT_SECONDS,
    HOOK_MAX_OUTPUT_BYTES,
    MAX_HOOK_BYTES,
    KiB,
    MiB,
)

__all__ = ["HookResult", "HookRunner", "hook_env", "run_hook_or_raise", "wasmtime_version"]

TREE_GUEST_PATH = "/tree"
SCRATCH_GUEST_PATH = "/scratch"
EPOCH_TICK_SECONDS = 0.01
# Tables hold 8 bytes per element outside linear memory; without a cap a
# ``table.grow`` loop would be a memory bomb the memory limit does not see.
HOOK_MAX_TABLE_ELEMENTS = 100_000
WASM_PAGE_BYTES = 64 * KiB
WASM_MAGIC = b"\0asm"
WASI = "wasi_snapshot_preview1"
WASI_ENOSYS = 52
RESERVED_ENV = frozenset({"P2PUPD_HOOK", "P2PUPD_TREE", "P2PUPD_SCRATCH"})
# Every Config option changed in _make_engine, so the cache fingerprint follows it.
ENGINE_SETTINGS = "consume_fuel; epoch_interruption"


@dataclass(frozen=True)
class HookResult:
    """What one hook run did. ``ok`` is true only for exit status 0.

    ``exit_code`` is ``None`` when the module never exited (refused, trapped,
    ran out of a limit). ``reason`` is one line for logs and the CLI.
    ``seconds`` is execution time (instantiation and ``_start``),
    ``load_seconds`` the time to compile or load it from the cache.
    ``fuel_used`` is exact for a completed run and equals the limit when fuel ran
    out; after another trap it may undercount (wasmtime does not flush the fuel
    counter of the function that trapped).
    """

    point: str
    ok: bool
    exit_code: int | None
    reason: str
    stdout: str
    stderr: str
    seconds: float
    fuel_used: int
    cached: bool
    load_seconds: float = 0.0


def hook_env(component: str, old_version: str | None, new_version: str) -> dict[str, str]:
    """Return the release-describing variables for ``HookRunner.run``'s ``env``.

    ``old_version`` is ``None`` on a first install and is passed as an empty string.
    """
    return {
        "P2PUPD_COMPONENT": component,
        "P2PUPD_OLD_VERSION": old_version or "",
        "P2PUPD_NEW_VERSION": new_version,
    }


class HookRunner:
    """Compiles, caches and runs hook modules under fixed limits (thread-safe)."""

    def __init__(
        self,
        cache_dir: Path | None,
        fuel: int = HOOK_DEFAULT_FUEL,
        memory_bytes: int = HOOK_DEFAULT_MEMORY_BYTES,
        seconds: float = HOOK_DEFAULT_SECONDS,
        output_bytes: int = HOOK_MAX_OUTPUT_BYTES,
    ) -> None:
        """Create an engine with the given limits; ``cache_dir=None`` disables caching.

        Raises ``ValueError`` for a non-positive limit and ``StorageError`` if
        ``cache_dir`` cannot be made private to this user.
        """
        if fuel <= 0 or memory_bytes <= 0 or seconds <= 0 or output_bytes < 0:
            raise ValueError("hook limits must be positive")
        self.fuel = fuel
        self.memory_bytes = memory_bytes
        self.seconds = seconds
        self.output_bytes = output_bytes
        config = wasmtime.Config()
        config.consume_fuel = True
        config.epoch_interruption = True
        self._engine = wasmtime.Engine(config)
        self._linker = _make_linker(self._engine)
        self._ticker = _EpochTicker(self._engine)
        self._cache = (
            None
            if cache_dir is None
            else ModuleCache(cache_dir, self._engine, engine_fingerprint(ENGINE_SETTINGS))
        )

    def run(
        self,
        point: str,
        module: bytes,
        sha256: bytes,
        tree: Path,
        scratch: Path,
        env: Mapping[str, str],
    ) -> HookResult:
        """Run ``module`` (whose verified digest is ``sha256``) as hook ``point``.

        ``tree`` is pre-opened read-only as ``/tree``, ``scratch`` read-write as
        ``/scratch``; ``env`` (see ``hook_env``) is added to the ``P2PUPD_HOOK``,
        ``P2PUPD_TREE`` and ``P2PUPD_SCRATCH`` variables. Returns a ``HookResult``
        whatever the module does, including when its bytes do not match
        ``sha256`` (refused without compiling) or do not compile. Raises
        ``ValueError`` only for a caller bug: ``env`` overriding a reserved name
        or holding NUL or ``=`` in a name.
        """
        pairs = _env_pairs(point, env)
        started = time.monotonic()

        def refused(reason: str) -> HookResult:
            took = time.monotonic() - started
            return HookResult(point, False, None, reason, "", "", 0.0, 0, False, took)

        if len(sha256) != ids.DIGEST_BYTES or ids.sha256(module) != sha256:
            return refused(f"module does not match its sha256 {sha256.hex()[:16]}…")
        for path, guest in ((tree, TREE_GUEST_PATH), (scratch, SCRATCH_GUEST_PATH)):
            if not path.is_dir():
                return refused(f"cannot pre-open {guest}: {path} is not a directory")
        try:
            compiled, cached = self._load(module, sha256)
        except _InvalidModuleError as exc:
            return refused(f"invalid module: {exc}")
        load_seconds = time.monotonic() - started
        ran = self._execute(point, compiled, tree, scratch, pairs)
        return HookResult(
            point, ran.exit_code == 0, ran.exit_code, ran.reason, ran.stdout, ran.stderr,
            ran.seconds, ran.fuel_used, cached, load_seconds,
        )  # fmt: skip

    def _load(self, module: bytes, sha256: bytes) -> tuple[wasmtime.Module, bool]:
        """Return ``(compiled module, came from cache)``.

        Raises ``_InvalidModuleError`` if ``module`` is not a WebAssembly binary
        that compiles.
        """
        if self._cache is not None and (hit := self._cache.load(sha256)) is not None:
            return hit, True
        # wasmtime-py would parse anything else as WAT text; hooks ship binaries.
        if not module.startswith(WASM_MAGIC):
            raise _InvalidModuleError("not a WebAssembly binary")
        if len(module) > MAX_HOOK_BYTES:
            raise _InvalidModuleError(f"larger than {MAX_HOOK_BYTES // MiB} MiB")
        try:
            compiled = wasmtime.Module(self._engine, module)
        except wasmtime.WasmtimeError as exc:
            raise _InvalidModuleError(_one_line(str(exc))) from None
        if self._cache is not None:
            self._cache.store(sha256, compiled)
        return compiled, False

    def _execute(
        self,
        point: str,
        module: wasmtime.Module,
        tree: Path,
        scratch: Path,
        env: list[list[str]],
    ) -> _Ran:
        """Instantiate ``module`` in a fresh store and call ``_start``; never raises."""
        stdout, stderr = _BoundedSink(self.output_bytes), _BoundedSink(self.output_bytes)
        store = wasmtime.Store(self._engine)
        exit_code: int | None = None
        fuel_used, seconds = 0, 0.0
        try:
            store.set_fuel(self.fuel)
            store.set_limits(memory_size=self.memory_bytes, table_elements=HOOK_MAX_TABLE_ELEMENTS)
            wasi = wasmtime.WasiConfig()
            wasi.argv = ["hook", point]
            wasi.env = env
            wasi.stdout_custom = stdout.write
            wasi.stderr_custom = stderr.write
            # Order fixes the fds: /tree is 3, /scratch is 4.
            wasi.preopen_dir(str(tree), TREE_GUEST_PATH, False)
            wasi.preopen_dir(str(scratch), SCRATCH_GUEST_PATH, True)
            store.set_wasi(wasi)
            with self._ticker:
                store.set_epoch_deadline(math.ceil(self.seconds / EPOCH_TICK_SECONDS) + 1)
                began = time.monotonic()
                exit_code, reason = self._start(store, module)
                seconds = time.monotonic() - began
            fuel_used = self.fuel - _fuel_left(store)
        except wasmtime.WasmtimeError as exc:
            reason = f"cannot set up the hook sandbox: {_one_line(str(exc))}"
        finally:
            # Closing now, not at garbage collection, runs wasmtime's finalizers
            # for the output callbacks while the interpreter is surely alive.
            store.close()
        return _Ran(exit_code, reason, stdout.text(), stderr.text(), seconds, fuel_used)

    def _start(self, store: wasmtime.Store, module: wasmtime.Module) -> tuple[int | None, str]:
        """Instantiate and run; return ``(exit code or None, reason)``. Never raises."""
        instance: wasmtime.Instance | None = None
        try:
            if self._needs_too_much_memory(module):
                return None, f"memory limit {_size(self.memory_bytes)} exceeded"
            instance = self._linker.instantiate(store, module)
            start = instance.exports(store).get("_start")
            if not isinstance(start, wasmtime.Func):
                return None, "invalid module: no _start function"
            start(store)
            return 0, "exited with 0"
        except wasmtime.ExitTrap as exc:
            if exc.code == 0:
                return 0, "exited with 0"
            # C's malloc returns NULL at the limit and programs exit(1) on it.
            return exc.code, self._blame_memory(store, instance, f"exited with {exc.code}")
        except wasmtime.Trap as exc:
            if exc.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
                return None, f"out of fuel ({self.fuel:,} units)"
            if exc.trap_code == wasmtime.TrapCode.INTERRUPT:
                return None, f"deadline of {self.seconds}s exceeded"
            return None, self._blame_memory(store, instance, f"trap: {_one_line(str(exc))}")
        except wasmtime.WasmtimeError as exc:
            if instance is None:
                return None, f"invalid module: {_one_line(str(exc))}"
            return None, self._blame_memory(store, instance, f"trap: {_one_line(str(exc))}")

    def _needs_too_much_memory(self, module: wasmtime.Module) -> bool:
        """Return whether a memory ``module`` defines starts above the limit."""
        return any(
            isinstance(export.type, wasmtime.MemoryType)
            and export.type.limits.min * WASM_PAGE_BYTES > self.memory_bytes
            for export in module.exports
        )

    def _blame_memory(
        self, store: wasmtime.Store, instance: wasmtime.Instance | None, reason: str
    ) -> str:
        """Return ``reason``, led by the memory limit if memory ended at that limit.

        wasmtime's C API cannot trap on a refused ``memory.grow``; the guest sees
        -1 and usually aborts (Rust's allocator traps, C code exits non-zero).
        When it failed with its memory within one page of the limit, the limit
        is the likely cause; a single large refused ``memory.grow`` is not seen.
        """
        memory = None if instance is None else instance.exports(store).get("memory")
        if isinstance(memory, wasmtime.Memory):
            try:
                if memory.data_len(store) + WASM_PAGE_BYTES > self.memory_bytes:
                    return f"memory limit {_size(self.memory_bytes)} exceeded ({reason})"
            except wasmtime.WasmtimeError:
                pass
        return reason


class _Ran(NamedTuple):
    """What ``HookRunner._execute`` observed."""

    exit_code: int | None
    reason: str
    stdout: str
    stderr: str
    seconds: float
    fuel_used: int


class _InvalidModuleError(Exception):
    """The bytes are not a WebAssembly module wasmtime can compile."""


class _BoundedSink:
    """Keeps the first ``limit`` bytes written to a guest stream and counts the rest.

    wasmtime calls ``write`` on one of its own threads; the lock makes the
    buffer safe to read from ours.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._total = 0
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        """Take ``data``; returning ``None`` tells wasmtime all of it was written."""
        with self._lock:
            room = self._limit - len(self._buf)
            if room > 0:
                self._buf += data[:room]
            self._total += len(data)

    def text(self) -> str:
        """Return the kept bytes as text, with a note of how many were dropped."""
        with self._lock:
            text = self._buf.decode("utf-8", errors="replace")
            dropped = self._total - len(self._buf)
        return text + (f"\n[… {dropped} more bytes not kept]" if dropped else "")


class _EpochTicker:
    """Advances an engine's epoch every ``EPOCH_TICK_SECONDS`` while any hook runs.

    The epoch is engine-wide, so one ticker serves every concurrent run and each
    store counts its own deadline in ticks. The thread exists only while a run
    is active, so an idle daemon (or a test) has no thread left behind.
    """

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._users = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> None:
        with self._lock:
            self._users += 1
            if self._users == 1:
                self._stop = threading.Event()
                self._thread = threading.Thread(
                    target=self._tick, args=(self._stop,), name="p2pupd-hook-epoch", daemon=True
                )
                self._thread.start()

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._users -= 1
            if self._users:
                return
            self._stop.set()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _tick(self, stop: threading.Event) -> None:
        while not stop.wait(EPOCH_TICK_SECONDS):
            self._engine.increment_epoch()


def run_hook_or_raise(
    runner: HookRunner,
    point: str,
    module: bytes,
    sha256: bytes,
    tree: Path,
    scratch: Path,
    env: Mapping[str, str],
) -> HookResult:
    """Run a hook like ``HookRunner.run`` and return its result if it succeeded.

    Raises ``HookError("<point> hook: <reason>")`` if it did not.
    """
    result = runner.run(point, module, sha256, tree, scratch, env)
    if not result.ok:
        raise HookError(f"{point} hook: {result.reason}")
    return result


def _make_linker(engine: wasmtime.Engine) -> wasmtime.Linker:
    """Return a linker with WASI preview 1, minus blocking sleeps."""
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    linker.allow_shadowing = True
    # poll_oneoff sleeps inside the host, where the epoch deadline cannot reach.
    i32 = wasmtime.ValType.i32()
    linker.define_func(
        WASI, "poll_oneoff", wasmtime.FuncType([i32] * 4, [i32]), lambda *_: WASI_ENOSYS
    )
    return linker


def _env_pairs(point: str, env: Mapping[str, str]) -> list[list[str]]:
    """Return the guest environment; raise ``ValueError`` on a bad or reserved name."""
    pairs = [
        ["P2PUPD_HOOK", point],
        ["P2PUPD_TREE", TREE_GUEST_PATH],
        ["P2PUPD_SCRATCH", SCRATCH_GUEST_PATH],
    ]
    for name, value in env.items():
        if name in RESERVED_ENV:
            raise ValueError(f"hook environment may not override {name}")
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise ValueError(f"invalid hook environment variable {name!r:.40}")
        pairs.append([name, value])
    if "\0" in point:
        raise ValueError("hook point holds NUL")
    return pairs


def _fuel_left(store: wasmtime.Store) -> int:
    """Return the store's remaining fuel (0 if wasmtime cannot say)."""
    try:
        return store.get_fuel()
    except wasmtime.WasmtimeError:
        return 0


def _one_line(message: str) -> str:
    """Condense a wasmtime error (backtrace, "Caused by:" chain) into one short line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    head, cause = lines[0], lines[-1]
    if "Caused by:" in lines:
        cause = cause.split(": ", 1)[-1] if cause[:1].isdigit() else cause
        cause = cause.removeprefix("wasm trap: ")
        line = cause if head.startswith("error while executing") else f"{head}: {cause}"
    else:
        line = head
    return line[:200]


def _size(n: int) -> str:
    """Return ``n`` bytes as ``"64 MiB"``, ``"512 KiB"`` or ``"1000 bytes"``."""
    for unit, name in ((MiB, "MiB"), (KiB, "KiB")):
        if n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} bytes"
