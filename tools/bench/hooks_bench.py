"""Hook start-up cost: compiling a module vs loading it from the compiled-module cache.

Run: ``python -m p2pupd.tools.bench.hooks_bench [--repeat N]``. For modules of
growing size it prints the median of N runs of:

* compile: ``HookRunner(None)``, Cranelift compiles the module in memory;
* cold: first run with an empty cache (compile, serialise, write + fsync);
* cached: a fresh runner over the warm cache (hash check + ``deserialize_file``);
* run: instantiating the module and running ``_start`` (a trivial hook).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import wasmtime

from p2pupd.daemon.apply.hooks import HookResult, HookRunner, wasmtime_version
from p2pupd.protocol.ids import sha256


def synthetic_module(functions: int) -> bytes:
    """Return a WASI command with ``functions`` small functions, all called by ``_start``."""
    funcs = "".join(
        f"(func $f{i} (param $x i32) (result i32)"
        f" (i32.xor (i32.mul (local.get $x) (i32.const {i + 3}))"
        f" (i32.rotl (local.get $x) (i32.const {i % 31}))))\n"
        for i in range(functions)
    )
    calls = "".join(f"(drop (call $f{i} (i32.const {i})))" for i in range(functions))
    wat = f'(module (memory (export "memory") 1) {funcs} (func (export "_start") {calls}))'
    return bytes(wasmtime.wat2wasm(wat))


def median_ms(samples: list[float]) -> float:
    """Return the median of ``samples`` (seconds) in milliseconds."""
    return statistics.median(samples) * 1e3


def measure(module: bytes, repeat: int, work: Path) -> tuple[float, float, float, float]:
    """Return median (compile, cold, cached, run) milliseconds for ``module``."""
    tree, scratch = work / "tree", work / "scratch"
    tree.mkdir(exist_ok=True)
    scratch.mkdir(exist_ok=True)
    digest = sha256(module)

    def once(runner: HookRunner) -> HookResult:
        result = runner.run("bench", module, digest, tree, scratch, {})
        if not result.ok:
            raise SystemExit(f"benchmark hook failed: {result.reason}")
        return result

    def sample(make: Callable[[int], HookRunner]) -> list[HookResult]:
        return [once(make(i)) for i in range(repeat)]

    compiled = sample(lambda i: HookRunner(None))
    cold = sample(lambda i: HookRunner(work / f"cache-{i}"))
    cached = sample(lambda i: HookRunner(work / f"cache-{i}"))
    assert all(r.cached for r in cached) and not any(r.cached for r in cold)
    return (
        median_ms([r.load_seconds for r in compiled]),
        median_ms([r.load_seconds for r in cold]),
        median_ms([r.load_seconds for r in cached]),
        median_ms([r.seconds for r in cached]),
    )


def main() -> None:
    """Print the start-up table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=5, help="runs per cell (median shown)")
    args = parser.parse_args()
    print(f"wasmtime {wasmtime_version()}, median of {args.repeat} runs, milliseconds")
    header = ("module", "bytes", "compile", "cold+store", "cached load", "run")
    print("{:>12} {:>9} {:>9} {:>11} {:>12} {:>8}".format(*header))
    for functions in (1, 100, 1_000, 10_000):
        module = synthetic_module(functions)
        with tempfile.TemporaryDirectory(prefix="p2pupd-hooks-bench-") as tmp:
            compile_ms, cold_ms, cached_ms, run_ms = measure(module, args.repeat, Path(tmp))
        print(
            f"{f'{functions} funcs':>12} {len(module):>9} {compile_ms:>9.2f} {cold_ms:>11.2f}"
            f" {cached_ms:>12.2f} {run_ms:>8.3f}"
        )


if __name__ == "__main__":
    main()
