"""Apply cost against ``cp -a``: a many-file tree with one file changed, a big image
with 1 % changed, and the swap window of each.

Run: ``python -m p2pupd.tools.bench.apply_bench [--files N] [--size MB]
[--image MB] [--repeat N] [--workdir DIR] [--btrfs]``. It builds a repository
of successive releases (each changes one file of the tree, or rewrites 1 % of
the image in scattered 32 KiB blocks), a node with the default retention, and
applies them one after the other, so every measured apply is a steady-state
update: stage beside the live version, swap, commit, drop the oldest kept
version. Columns, best of ``--repeat``:

* ``apply``: ``api.apply`` in-process (lock, recovery, planning against the
  stat cache, staging, swap, commit, cleanup; no interpreter start-up);
* ``live``: the part of that until the new version is live (the swap returned);
* ``stage``: planning and building the stage;
* ``cp -a``: ``cp -a`` of the same live tree in the same run, and ``+sync``
  with the ``sync`` after it (the durability apply provides);
* ``swap us``: the swap window: the duration of the one system call
  (``renameat2``/``rename``) between the old version being whole at the target
  and the new one being whole there.

Cases: (a) the tree, copied where the filesystem cannot reflink, then declared
immutable (hard links); (b) the image. ``--btrfs`` (root) repeats both on a
loop-mounted btrfs, where unchanged data is reflinked.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from p2pupd.daemon import api
from p2pupd.daemon.apply.engine import Applier
from p2pupd.daemon.fsutil import filesystem_type
from p2pupd.daemon.state.node import Node
from p2pupd.tools.cli import main as cli_main
from p2pupd.tools.publisher.repo import Repo

MiB = 1 << 20


def cli(*args: object) -> None:
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        code = cli_main([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"p2pupd {args[0]} failed ({code})")


def make_tree(root: Path, files: int, total: int, rnd: random.Random) -> None:
    """``files`` files of random sizes summing to about ``total`` bytes, 200 per directory."""
    pool = rnd.randbytes(4 * MiB)
    mean = max(1, total // files)
    for i in range(files):
        d = root / f"d{i // 200:03}"
        if i % 200 == 0:
            d.mkdir(parents=True)
        size = rnd.randrange(1, 2 * mean)
        off = rnd.randrange(0, len(pool) - size) if size < len(pool) else 0
        (d / f"f{i:05}.bin").write_bytes(pool[off : off + size])


def next_tree(src: Path, dst: Path, files: int, rnd: random.Random) -> None:
    """Hard-link copy of ``src`` with one random file given new content."""
    subprocess.run(["cp", "-al", str(src), str(dst)], check=True)
    i = rnd.randrange(files)
    victim = dst / f"d{i // 200:03}" / f"f{i:05}.bin"
    victim.unlink()
    victim.write_bytes(rnd.randbytes(20_000))


def next_image(src: Path, dst: Path, fraction: float, rnd: random.Random) -> None:
    """A copy of the image ``src`` with ``fraction`` of it rewritten in scattered 32 KiB blocks."""
    dst.parent.mkdir(parents=True)
    if src.exists():
        shutil.copyfile(src, dst)
    size = dst.stat().st_size
    block = 32 * 1024
    with open(dst, "r+b") as f:
        for _ in range(max(1, int(size * fraction) // block)):
            f.seek(rnd.randrange(0, size - block))
            f.write(rnd.randbytes(block))


def make_image(path: Path, size: int, rnd: random.Random) -> None:
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(rnd.randbytes(n))
            left -= n


def timed_cp(src: Path, dst: Path, repeat: int) -> tuple[float, float]:
    """Best of ``repeat``: (seconds of ``cp -a``, seconds of the ``sync`` after it)."""
    best = (float("inf"), 0.0)
    for _ in range(repeat):
        subprocess.run(["sync"], check=True)
        t0 = time.monotonic()
        subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
        t1 = time.monotonic()
        subprocess.run(["sync"], check=True)
        t2 = time.monotonic()
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        best = min(best, (t1 - t0, t2 - t1))
    return best


class Releases:
    """Applies a component's releases in order: each apply changes what one release changed."""

    def __init__(self, state: Path, component: str, count: int) -> None:
        self.state, self.component, self.next, self.count = state, component, 1, count

    def apply(self) -> tuple[float, api.ApplyResult]:
        if self.next > self.count:
            raise SystemExit(f"bench: out of {self.component} releases")
        subprocess.run(["sync"], check=True)
        t0 = time.monotonic()
        r = api.apply(self.state, self.component, serial=self.next)
        self.next += 1
        return time.monotonic() - t0, r

    def best_of(self, repeat: int) -> tuple[float, api.ApplyResult]:
        runs = [self.apply() for _ in range(repeat)]
        return min(runs, key=lambda x: x[0])


@contextlib.contextmanager
def btrfs_mount(work: Path) -> Iterator[Path | None]:
    """Loop-mount a sparse btrfs image under ``work`` (root only); yield None if impossible."""
    if os.geteuid() != 0 or shutil.which("mkfs.btrfs") is None:
        yield None
        return
    image, mnt = work / "btrfs.img", work / "btrfs"
    with open(image, "wb") as f:
        f.truncate(16 << 30)
    mnt.mkdir()
    mkfs = ["mkfs.btrfs", "-q", "-f", str(image)]
    ok = subprocess.run(mkfs, capture_output=True, check=False).returncode == 0
    mount = ["mount", "-o", "loop", str(image), str(mnt)]
    ok = ok and subprocess.run(mount, check=False).returncode == 0
    try:
        yield mnt if ok else None
    finally:
        if ok:
            subprocess.run(["umount", str(mnt)], check=False)
        image.unlink(missing_ok=True)


def row(case: str, run: tuple[float, api.ApplyResult], cp: tuple[float, float]) -> str:
    apply_s, r = run
    cp_s, sync_s = cp
    st = r.stage
    how = ",".join(f"{k}:{v}" for k, v in sorted((st.methods if st else {}).items()))
    if st and st.from_chunks:
        how += f",chunks:{st.from_chunks}"
    return (
        f"{case:<40} {apply_s:>7.3f} {r.live_seconds:>7.3f} {r.stage_seconds:>7.3f}"
        f" {cp_s:>7.3f} {cp_s + sync_s:>7.3f} {100 * apply_s / cp_s:>7.1f}%"
        f" {100 * r.live_seconds / cp_s:>7.1f}% {r.swap_ns / 1000:>8.1f}  {how.strip(',')}"
    )


HEADER = (
    f"{'case':<40} {'apply':>7} {'live':>7} {'stage':>7} {'cp -a':>7} {'+sync':>7}"
    f" {'apply/cp':>8} {'live/cp':>8} {'swap us':>8}  how files were made"
)


def seed_node(repo_dir: Path, state: Path) -> None:
    """Give the node every release of the repository, as an import would, but with the
    blobs hard-linked from the repository (same filesystem): exporting and
    importing gigabytes of bundle is not what is measured here."""
    repo, node = Repo(repo_dir), Node(state)
    root, applier = node.trusted_root(), Applier(node)
    for comp in repo.components():
        for serial in repo.serials(comp):
            man, env = root.verify_release(repo.release_bytes(comp, serial), None, comp)
            for digest in man.blob_sizes():
                if not node.store.has(digest):
                    os.link(repo.store.path(digest), node.store.path(digest))
            node.releases.put(comp, serial, env)
            applier.manifest(comp, serial)  # as an import does: verified and decoded once


def init(state: Path, trust: Path, comp: str, target: Path, *extra: str) -> None:
    cli("init", "--state-dir", state, "--trust", trust, "--component", f"{comp}={target}", *extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--files", type=int, default=20_000, help="files in the tree (default 20000)")
    p.add_argument("--size", type=int, default=500, help="tree size in MB (default 500)")
    p.add_argument("--image", type=int, default=200, help="image size in MB (default 200)")
    p.add_argument("--repeat", type=int, default=3, help="runs per case, best shown (default 3)")
    p.add_argument("--workdir", type=Path, help="where to work (default: a temp dir in /var/tmp)")
    p.add_argument("--btrfs", action="store_true", help="also run on a loop-mounted btrfs (root)")
    args = p.parse_args()
    base = args.workdir or Path(tempfile.mkdtemp(prefix="p2pupd-bench-", dir="/var/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(1)
    rep = args.repeat
    # Releases: 3 to reach the steady state (retain 2: the next apply drops
    # and recycles one), then ``rep`` per case; again for btrfs.
    n_tree, n_img = 6 + 3 * rep, 6 + 2 * rep
    t0 = time.monotonic()
    make_tree(base / "t1", args.files, args.size * MiB, rnd)
    for k in range(2, n_tree + 1):
        next_tree(base / f"t{k - 1}", base / f"t{k}", args.files, rnd)
    make_image(base / "i1" / "disk.img", args.image * MiB, rnd)
    for k in range(2, n_img + 1):
        next_image(base / f"i{k - 1}" / "disk.img", base / f"i{k}" / "disk.img", 0.01, rnd)
    cli("keygen", base / "key")
    cli("repo", "init", base / "repo", "--root-key", base / "key", "--release-key", base / "key")
    for comp, prefix, n in (("tree", "t", n_tree), ("img", "i", n_img)):
        for k in range(1, n + 1):
            cli("publish", base / "repo", comp, str(k), base / f"{prefix}{k}")
    state, trust = base / "state", base / "repo" / "root.msgpack"
    tree, img = base / "srv" / "tree", base / "srv" / "disk.img"
    tree.parent.mkdir()
    init(state, trust, "tree", tree)
    init(state, trust, "img", img, "--kind", "file")
    seed_node(base / "repo", state)
    setup = time.monotonic() - t0
    trees, images = Releases(state, "tree", n_tree), Releases(state, "img", n_img)
    first, _ = trees.apply()
    for _ in range(2):
        trees.apply()
    for _ in range(3):
        images.apply()
    fs = filesystem_type(base)
    print(f"{fs} at {base}: setup {setup:.0f}s, first install of the tree {first:.1f}s")
    print(f"tree: {args.files} files, {args.size} MB; image: {args.image} MB; best of {rep}")
    print("seconds: apply = whole call, live = until the new version is live, stage = its build")
    print(HEADER)
    print(row(f"(a) 1 file changed ({fs})", trees.best_of(rep), timed_cp(tree, base / "cp", rep)))
    init(state, trust, "tree", tree, "--immutable")
    run = trees.best_of(rep)
    print(row(f"(a) 1 file changed, immutable ({fs})", run, timed_cp(tree, base / "cp", rep)))
    run = images.best_of(rep)
    print(row(f"(b) image, 1 % changed ({fs})", run, timed_cp(img, base / "cp", rep)))
    sys.stdout.flush()
    if args.btrfs:
        with btrfs_mount(base) as mnt:
            if mnt is None:
                print("(btrfs: not root, no mkfs.btrfs, or mount failed: skipped)")
            else:
                bt, bimg = mnt / "tree", mnt / "disk.img"
                init(state, trust, "tree", bt)
                init(state, trust, "img", bimg, "--kind", "file")
                for _ in range(3):  # first install on btrfs, then the steady state
                    trees.apply()
                    images.apply()
                run = trees.best_of(rep)
                print(row("(a) 1 file changed (btrfs)", run, timed_cp(bt, mnt / "cp", rep)))
                run = images.best_of(rep)
                print(row("(b) image, 1 % changed (btrfs)", run, timed_cp(bimg, mnt / "cp", rep)))
    if args.workdir is None:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
