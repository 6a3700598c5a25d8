"""gc and fsck of a store of many chunks: one file per chunk (before packs) vs packs.

Run: ``python -m p2pupd.tools.bench.store_bench [--chunks 100000] [--size 64K] [--dir DIR]``.

Builds the same ``--chunks`` random chunks (``--size`` bytes each, default
64 KiB, the chunker's average) twice: as one file per chunk in
``blobs/sha256`` (a ``BlobStore``: the node store before packs, today's code
path on a format-1 state directory) and in packs (``PackStore``, appended and
committed in batches of 256 as a fetch does). Then, on each, with a warm page
cache (what a maintenance run on a busy node sees):

* ``fsck``: the file store re-hashes every file; the pack store checks every
  entry's checksum (its default) and, as ``fsck --full``, its sha256 on every
  core;
* ``gc`` keeping half: the first half of the chunks (an old release: in
  arrival order, so whole packs die) and, on a second copy of the pack store,
  every other chunk (the worst case for packs: every pack is repacked).

Prints a table with the load average; the target of issue 18 is gc and fsck
at least 5x faster than the file store.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from p2pupd.daemon.store import packfile
from p2pupd.daemon.store.blobs import BlobStore
from p2pupd.daemon.store.packstore import PackStore

BATCH = 256


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20}
    t = text.strip().upper().removesuffix("B")
    return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(t)


class Chunks:
    """``n`` distinct chunks of ``size`` bytes, windows into one random buffer
    (so 100,000 of them need not all be in memory at once)."""

    def __init__(self, n: int, size: int) -> None:
        self.pool, self.n, self.size = os.urandom(size + n), n, size
        self.digests = [hashlib.sha256(self.data(i)).digest() for i in range(n)]

    def data(self, i: int) -> bytes:
        return self.pool[i : i + self.size]

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        for i in range(self.n):
            yield self.digests[i], self.data(i)


def fill_files(store: BlobStore, data: Chunks) -> None:
    """Write files as the landing did: each complete, renamed into place, one sync at the end."""
    for digest, b in data:
        p = store.blob_dir / digest.hex()
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        os.write(fd, b)
        os.close(fd)
    os.sync()


def fill_packs(store: PackStore, data: Chunks) -> None:
    w = store.writer()
    for i, (digest, b) in enumerate(data):
        if w.size >= packfile.PACK_TARGET_BYTES:
            w.commit()
            w.close()
            w = store.writer()
        w.append(digest, b, packfile.checksum(b))
        if i % BATCH == BATCH - 1:
            w.commit()
    w.commit()
    w.close()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run(base: Path, n: int, size: int) -> list[tuple[str, float, float | None, str]]:
    data = Chunks(n, size)
    digests = data.digests
    rows: list[tuple[str, float, float | None, str]] = []
    files = BlobStore(base / "files")
    t, _ = timed(lambda: fill_files(files, data))
    print(f"built the file store in {t:.0f} s", flush=True)
    packs = PackStore(base / "packs")
    t, _ = timed(lambda: fill_packs(packs, data))
    print(f"built the pack store in {t:.0f} s", flush=True)
    shutil.copytree(base / "packs", base / "packs2")

    def warm(root: Path) -> None:  # read everything once: both measured warm
        for dirpath, _, names in os.walk(root):
            for name in names:
                with open(os.path.join(dirpath, name), "rb") as f:
                    while f.read(1 << 24):
                        pass

    warm(base / "files")
    old_fsck, rep = timed(files.fsck)
    assert rep.checked == n and rep.clean, rep  # type: ignore[attr-defined]
    rows.append(("fsck, one file per chunk (re-hash)", old_fsck, None, load()))
    warm(base / "packs")
    t, rep = timed(packs.fsck)
    assert rep.checked == n and rep.clean, rep  # type: ignore[attr-defined]
    rows.append(("fsck, packs (checksums)", t, old_fsck / t, load()))
    t, rep = timed(lambda: packs.fsck(full=True))
    assert rep.checked == n and rep.clean, rep  # type: ignore[attr-defined]
    rows.append(("fsck --full, packs (sha256, all cores)", t, old_fsck / t, load()))

    keep_old = set(digests[n // 2 :])
    old_gc, _ = timed(lambda: files.gc(keep_old))
    rows.append(("gc of the older half, one file per chunk", old_gc, None, load()))
    t, rep = timed(lambda: packs.gc(keep_old))
    assert sorted(packs.iter_digests()) == sorted(keep_old)
    rows.append(("gc of the older half, packs", t, old_gc / t, load()))
    other = PackStore(base / "packs2")
    keep_alt = set(digests[::2])
    t, rep = timed(lambda: other.gc(keep_alt))
    assert sorted(other.iter_digests()) == sorted(keep_alt)
    rows.append(("gc of every other chunk, packs (all repacked)", t, old_gc / t, load()))
    return rows


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=100_000, help="chunks (default 100000)")
    ap.add_argument("--size", default="64K", help="bytes per chunk (default 64K)")
    ap.add_argument("--dir", help="where to build (default: a temp dir in /var/tmp)")
    args = ap.parse_args()
    size = parse_size(args.size)
    base = Path(tempfile.mkdtemp(prefix="p2pupd-store-bench-", dir=args.dir or "/var/tmp"))
    try:
        rows = run(base, args.chunks, size)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n{args.chunks} chunks of {size} bytes ({args.chunks * size / 1e9:.1f} GB), warm cache")
    print(f"{'what':<48} {'seconds':>8} {'speed-up':>9} {'load':>5}")
    for name, secs, gain, ld in rows:
        g = "" if gain is None else f"{gain:8.1f}x"
        print(f"{name:<48} {secs:>8.2f} {g:>9} {ld:>5}")


if __name__ == "__main__":
    main()
