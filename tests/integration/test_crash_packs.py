"""The pack store survives SIGKILL anywhere: during an append, a repack or a gc.

Real processes (``_pack_driver.py``), real files, real SIGKILL: at each of the
store's crash points (``packs.CRASH_POINTS``) and at random moments of a
fill-and-collect loop. After every kill:

* every blob an index names reads back and hashes to its name
  (``fsck(full=True)`` finds nothing corrupt) -- a blob is absent or whole;
* every blob committed before the kill, and not being dropped by a gc, is
  still there;
* the next writer or gc runs to the end and leaves a clean store (the debris
  of the kill -- a tail past an index, an index without its pack -- is
  salvaged or removed).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _pack_driver import blob

from p2pupd.daemon.store.packs import CRASH_POINTS
from p2pupd.daemon.store.packstore import PackStore

DRIVER = Path(__file__).with_name("_pack_driver.py")


def drive(state: Path, *args: object, crash: str | None = None, skip: int = 0) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PUPD_CRASH")}
    if crash is not None:
        env.update(P2PUPD_CRASH_AT=crash, P2PUPD_CRASH_SKIP=str(skip))
    r = subprocess.run(
        [sys.executable, str(DRIVER), str(state), *map(str, args)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert crash is not None or r.returncode == 0, r.stderr
    return r.returncode


def digests(seed: int, n: int) -> dict[bytes, bytes]:
    return {hashlib.sha256(b).digest(): b for b in (blob(seed, i) for i in range(n))}


def check(state: Path, must: dict[bytes, bytes]) -> set[bytes]:
    """Every indexed blob whole, every blob of ``must`` there; returns what is stored."""
    store = PackStore(state)
    report = store.fsck(full=True)
    assert report.corrupt == [] and report.stray == [], report
    held = set(store.iter_digests())
    missing = [d.hex()[:12] for d in must if d not in held]
    assert not missing, f"lost committed blobs: {missing}"
    assert all(store.get_bytes(d) == data for d, data in must.items())
    return held


@pytest.mark.parametrize(
    ("point", "skip"),
    [("pack-append", 21), ("pack-appended", 2), ("pack-synced", 2), ("pack-indexed", 2)],
)
def test_sigkill_during_pack_append(tmp_path: Path, point: str, skip: int) -> None:
    state = tmp_path / "state"
    drive(state, "fill", 0, 40)
    first = digests(0, 40)
    assert drive(state, "fill", 1, 40, crash=point, skip=skip) == -signal.SIGKILL
    second = digests(1, 40)
    committed = dict(list(second.items())[: 8 * (skip if point != "pack-append" else 2)])
    held = check(state, first | committed)
    assert held <= set(first) | set(second)  # nothing else appeared
    drive(state, "fill", 1, 40)  # the next writer salvages or rewrites what the kill left
    check(state, first | second)
    assert PackStore(state).fsck(full=True).clean


@pytest.mark.parametrize(
    "point",
    [
        "repack-copied",
        "repack-committed",
        "gc-data-unlinked",
        "gc-index-unlinked",
        "gc-index-rewritten",
        "gc-punched",
    ],
)
def test_sigkill_during_repack_and_gc(tmp_path: Path, point: str) -> None:
    """Three packs: one mostly kept (trimmed in place), one mostly dropped
    (repacked), one dropped whole (deleted)."""
    assert point in CRASH_POINTS
    state = tmp_path / "state"
    drive(state, "packs", 7)
    every = {hashlib.sha256(b).digest(): b for b in (blob(7, i) for i in range(30))}
    order = list(every)
    keep = {d: every[d] for d in order[:8] + order[10:12]}
    (tmp_path / "keep").write_text("\n".join(d.hex() for d in keep))
    assert drive(state, "gc", tmp_path / "keep", crash=point) == -signal.SIGKILL
    held = check(state, keep)
    assert held <= set(every)
    drive(state, "gc", tmp_path / "keep")
    assert check(state, keep) == set(keep)
    assert PackStore(state).fsck(full=True).clean


def test_sigkill_at_random_moments_of_fill_and_gc(tmp_path: Path) -> None:
    state = tmp_path / "state"
    rng = random.Random(18)
    must: dict[bytes, bytes] = {}
    for round_ in range(12):
        seed = 100 + round_
        pool = {hashlib.sha256(b).digest(): b for b in (blob(seed, i) for i in range(2400))}
        proc = subprocess.Popen(
            [sys.executable, str(DRIVER), str(state), "churn", str(seed)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        time.sleep(rng.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        for line in out.splitlines():
            word, *hexes = line.split()
            if word == "committed":
                must.update((d, pool[d]) for d in map(bytes.fromhex, hexes))
            elif word == "drop":
                for d in map(bytes.fromhex, hexes):
                    must.pop(d, None)
        check(state, must)
    drive(state, "gc", _write(tmp_path / "keep", must))
    assert check(state, must) == set(must)
    assert PackStore(state).fsck(full=True).clean


def _write(path: Path, must: dict[bytes, bytes]) -> Path:
    path.write_text("\n".join(d.hex() for d in must))
    return path
