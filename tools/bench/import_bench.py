"""Import throughput: ``p2pupd import`` of a bundle against ``sha256sum`` of the same bytes.

Run: ``python -m p2pupd.tools.bench.import_bench [--size 1G] [--workdir DIR] [--cold]``.

It publishes a tree of random files (``--size`` bytes, so every chunk is new),
exports it as a bundle, then in the same run measures:

* ``sha256sum`` over the bundle's blob files (the floor: read + hash, one pass);
* ``p2pupd import`` into a fresh node whose state is on the work directory's
  filesystem -- verify all metadata, read, hash and copy every blob, flush
  (syncfs) and commit into the store;
* the same with the state on a freshly made ext4 image (loop-mounted; root
  only) and on tmpfs (no disk writes), when available;
* beside each, writing the same number of bytes to one file there and
  fsyncing it: the floor of any import that leaves them durable, whatever
  it hashes (on the loop-mounted image every byte crosses the page cache
  twice and reaches the same disk).

The store packs small blobs (docs/store.md), so it creates a handful of
files per import, not one per chunk; the bundle on the medium still holds
one file per blob, which both ``sha256sum`` and the import open. The cost of
creating a file is printed for each filesystem all the same (aged or
virtual filesystems can spend a millisecond of kernel time on each). Each
row is the median of ``--repeat`` runs. With ``--cold`` (root only)
the page cache is dropped before every run, so the bundle is read from the
disk as from a stick; by default it is warm for both, which compares CPU work.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from p2pupd.daemon import api
from p2pupd.tools.cli import main as cli

FILE_BYTES = 64 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def run(*args: str | Path) -> None:
    code = cli([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"p2pupd {args[0]} failed with exit code {code}")


def make_bundle(work: Path, size: int) -> Path:
    """Publish ``size`` random bytes and export them; return the bundle directory."""
    src = work / "src"
    src.mkdir()
    left, i = size, 0
    while left > 0:
        n = min(FILE_BYTES, left)
        with open(src / f"f{i:04}.bin", "wb") as f:
            f.write(os.urandom(n))
        left -= n
        i += 1
    run("keygen", work / "root.key")
    run("keygen", work / "rel.key")
    run(
        "repo",
        "init",
        work / "repo",
        "--root-key",
        work / "root.key",
        "--release-key",
        work / "rel.key",
    )
    run("publish", work / "repo", "bench", "1.0", src, "--json")
    run("export", work / "repo", work / "bundle", "--json")
    shutil.rmtree(src)
    return work / "bundle"


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def time_sha256sum(bundle: Path, cold: bool) -> float:
    blobs = sorted(str(p) for p in (bundle / "blobs" / "sha256").iterdir())
    if cold:
        drop_caches()
    t = time.monotonic()
    subprocess.run(
        ["xargs", "-0", "sha256sum"],
        input="\0".join(blobs).encode(),
        stdout=subprocess.DEVNULL,
        check=True,
    )
    return time.monotonic() - t


def time_import(bundle: Path, root: Path, where: Path, cold: bool, run: int) -> float:
    """Import into a fresh node under ``where``; its state is kept until the end.

    Each run gets its own state directory and nothing is deleted between runs:
    right after thousands of files are deleted, ext4 spends kernel time on
    every new inode skipping the recently freed ones (a no-journal ext4 checks
    ``recently_deleted``), which would bill one run's cleanup to the next.
    """
    state = where / f"state-{run}"
    (where / f"target-{run}").mkdir(exist_ok=True)
    api.init_node(state, root, {"bench": where / f"target-{run}" / "bench"})
    os.sync()
    if cold:
        drop_caches()
    t = time.monotonic()
    report, _ = api.import_dir(state, bundle)
    elapsed = time.monotonic() - t
    if not report.releases or not report.releases[0].complete:
        raise SystemExit("benchmark import did not complete")
    return elapsed


def time_durable_write(where: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` to one new file under ``where`` and fsync it: the
    least any durable import onto that filesystem costs, hashing aside."""
    block = os.urandom(1 << 20)
    path = where / "durable-write.bin"
    t = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, block[: min(left, len(block))])
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.monotonic() - t
    path.unlink()
    return elapsed


def create_ms(where: Path, n: int = 1000) -> float:
    """Milliseconds the filesystem at ``where`` takes to create (and close) one empty file."""
    d = Path(tempfile.mkdtemp(dir=where))
    t = time.monotonic()
    for i in range(n):
        os.close(os.open(d / f"{i:064x}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444))
    ms = (time.monotonic() - t) / n * 1e3
    shutil.rmtree(d)
    return ms


def sh(*argv: str) -> bool:
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


@contextlib.contextmanager
def fresh_ext4(work: Path, size: int) -> Iterator[Path | None]:
    """Loop-mount a new ext4 image under ``work`` (None if not root or it fails)."""
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        yield None
        return
    img, mnt = work / "ext4.img", work / "ext4"
    with open(img, "wb") as f:
        f.truncate(2 * size + (512 << 20))
    mnt.mkdir()
    ok = sh("mkfs.ext4", "-q", "-F", str(img)) and sh("mount", "-o", "loop", str(img), str(mnt))
    try:
        yield mnt if ok else None
    finally:
        if ok:
            sh("umount", str(mnt))
        img.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="bundle payload, e.g. 1G, 200M (default 1G)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row (median; default 3)")
    ap.add_argument("--workdir", help="where to build (default: a temp dir in /var/tmp)")
    ap.add_argument(
        "--cold", action="store_true", help="drop the page cache before each run (root)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="p2pupd-import-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    shm = (
        Path(tempfile.mkdtemp(prefix="p2pupd-bench-", dir="/dev/shm"))
        if Path("/dev/shm").is_dir()
        else None
    )
    try:
        t = time.monotonic()
        bundle = make_bundle(work, size)
        blobs = sum(p.stat().st_size for p in (bundle / "blobs" / "sha256").iterdir())
        count = len(os.listdir(bundle / "blobs" / "sha256"))
        print(
            f"bundle: {blobs / 1e6:.0f} MB in {count} blobs, built in {time.monotonic() - t:.0f} s"
        )
        root = work / "repo" / "root.msgpack"
        with fresh_ext4(work, size * args.repeat) as ext4:  # every run's state stays
            places = [("state on the work filesystem", work)]
            if ext4 is not None:
                places.append(("state on a fresh ext4 (loop)", ext4))
            if shm is not None:
                places.append(("state on tmpfs", shm))
            for name, where in places:
                print(f"{name}: creating a file takes {create_ms(where):.3f} ms")
            shas: list[float] = []
            imps: dict[str, list[float]] = {name: [] for name, _ in places}
            writes: dict[str, list[float]] = {name: [] for name, _ in places}
            for run in range(args.repeat):  # interleaved, so drift hits every row alike
                shas.append(time_sha256sum(bundle, args.cold))
                for name, where in places:
                    imps[name].append(time_import(bundle, root, where, args.cold, run))
                    writes[name].append(time_durable_write(where, blobs))
        rows = [("sha256sum of the blob files", statistics.median(shas))]
        for name, v in imps.items():
            rows.append((f"p2pupd import, {name}", statistics.median(v)))
            rows.append(
                ("  (ref: write + fsync of the bytes there)", statistics.median(writes[name]))
            )
        base = rows[0][1]
        cache = "cold" if args.cold else "warm"
        print(f"\n({cache} page cache, median of {args.repeat}, {count} blobs)")
        print(f"{'what':<46} {'MB':>6} {'seconds':>8} {'MB/s':>6} {'vs sha256sum':>13}")
        for name, secs in rows:
            mb = blobs / 1e6
            print(
                f"{name:<46} {mb:>6.0f} {secs:>8.2f} {mb / secs:>6.0f} {100 * base / secs:>12.0f}%"
            )
    finally:
        if shm is not None:
            shutil.rmtree(shm, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
