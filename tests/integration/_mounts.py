"""Throw-away mounts for filesystem tests: a small tmpfs, a loop-mounted btrfs/xfs.

Each context manager skips the calling test (with the reason) when the machine
cannot provide the mount — not root, no mkfs tool, no loop device — and always
unmounts, so a failing test leaves no mount behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a test filesystem needs root")


def _unmount(where: Path) -> None:
    if _run("umount", str(where)).returncode != 0:
        # Something still has it open: detach now, the kernel finishes later.
        _run("umount", "-l", str(where))


@contextmanager
def tmpfs(where: Path, size: str = "2m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on ``where`` (created) for the block's duration."""
    _need_root()
    where.mkdir(parents=True, exist_ok=True)
    r = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where))
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.strip() or r.returncode}")
    try:
        yield where
    finally:
        _unmount(where)


# (filesystem, mkfs tool, its arguments, image size): smallest sizes mkfs accepts.
_REFLINK_FS = [
    ("btrfs", "mkfs.btrfs", ["-q", "-f"], 128 << 20),
    ("xfs", "mkfs.xfs", ["-q", "-f", "-m", "reflink=1"], 320 << 20),
]


@contextmanager
def reflink_fs(workdir: Path) -> Iterator[tuple[str, Path]]:
    """Loop-mount a fresh btrfs (or xfs with reflink=1) image; yield (fs type, mount point).

    The image is a sparse file under ``workdir``, so it costs little real space.
    """
    _need_root()
    tried = []
    for fs, tool, args, size in _REFLINK_FS:
        if shutil.which(tool) is None:
            tried.append(f"{tool} not installed")
            continue
        image = workdir / f"{fs}.img"
        with open(image, "wb") as f:
            f.truncate(size)
        r = _run(tool, *args, str(image))
        if r.returncode != 0:
            tried.append(f"{tool} failed: {r.stderr.strip()}")
            continue
        where = workdir / f"{fs}-mnt"
        where.mkdir()
        r = _run("mount", "-o", "loop", "-t", fs, str(image), str(where))
        if r.returncode != 0:
            tried.append(f"mount -t {fs} -o loop failed: {r.stderr.strip()}")
            continue
        try:
            yield fs, where
        finally:
            _unmount(where)
            image.unlink(missing_ok=True)
        return
    pytest.skip("no reflink-capable filesystem to test on: " + "; ".join(tried))
