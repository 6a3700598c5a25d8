"""Throw-away mounts for filesystem tests: a small tmpfs, a loop-mounted btrfs/xfs, and a
loop-mounted ext4 to fill, make read-only or cut the power of (crash tests).

Each context manager skips the calling test (with the reason) when the machine
cannot provide the mount — not root, no mkfs tool, no loop device — and always
unmounts, so a failing test leaves no mount behind.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import time
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


# ioctl(fd, EXT4_IOC_SHUTDOWN, &flags) = _IOR('X', 125, __u32); NOLOGFLUSH cuts the
# filesystem off without flushing its journal: what a power cut leaves.
EXT4_IOC_SHUTDOWN = 0x8004587D
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


class Ext4:
    """A loop-mounted ext4 a test can fill, make read-only and cut the power of.

    ``fill``, ``set_readonly`` and ``shutdown`` may be called from a forked child
    (the process under test); ``free``, ``remount`` and ``set_readonly(False)``
    from the test.
    """

    def __init__(self, image: Path, where: Path) -> None:
        self.image = image
        self.where = where
        self.filler = where / ".filler"
        self.device: str | None = None

    def mount(self) -> None:
        """Mount the image through a loop device of its own.

        Not ``mount -o loop``: that reuses a loop device already bound to the
        image, and if the old filesystem lives on there (a mount namespace
        another process made holds it), the kernel hands back that shut-down
        filesystem instead of replaying the journal into a new one.
        """
        r = _run("losetup", "--find", "--show", str(self.image))
        if r.returncode != 0:
            raise AssertionError(f"losetup {self.image}: {r.stderr.strip()}")
        self.device = r.stdout.strip()
        r = _run("mount", "-t", "ext4", self.device, str(self.where))
        if r.returncode != 0:
            self.detach()
            raise AssertionError(f"mount {self.image}: {r.stderr.strip()}")

    def detach(self) -> None:
        if self.device is not None:
            _run("losetup", "-d", self.device)  # deferred by the kernel while still in use
            self.device = None

    def remount(self) -> None:
        """Unmount and mount again: after a shutdown, ext4 replays its journal.

        Never a lazy unmount here: the image must be closed before it is
        mounted again, or the new mount could meet the old, shut-down one.
        """
        for _ in range(50):
            # This process's own pack readers (PackIndex, shared per directory
            # and closed when the last store using it goes) may be in a cycle.
            gc.collect()
            r = _run("umount", str(self.where))
            if r.returncode == 0:
                break
            time.sleep(0.1)  # a process that had it open is still being torn down
        else:
            raise AssertionError(
                f"cannot unmount {self.where}: {r.stderr.strip()}; open there: {self.holders()}"
            )
        self.detach()
        self.mount()

    def holders(self) -> list[str]:
        """``pid: path`` of every open file under the mount point (what keeps it busy)."""
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith(f"{self.where}/") or link == str(self.where):
                    out.append(f"{pid}: {link}")
        return out

    def set_readonly(self, readonly: bool) -> bool:
        """Remount read-only (or back); whether it worked (busy: a file open for writing)."""
        r = _run("mount", "-o", f"remount,{'ro' if readonly else 'rw'}", str(self.where))
        return r.returncode == 0

    def fill(self) -> None:
        """Use every free block: one preallocated file, then small writes until ENOSPC."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            st = os.statvfs(self.where)
            size = st.f_bavail * st.f_frsize
            while size > 1 << 16:
                try:
                    os.posix_fallocate(fd, os.fstat(fd).st_size, size)
                except OSError:
                    size //= 2
                    continue
                break
            block = b"\0" * 4096
            while True:
                try:
                    os.write(fd, block)
                except OSError:
                    break
            for n in (1024, 256, 64, 16, 1):  # the last bytes of a partly used block
                while True:
                    try:
                        os.write(fd, block[:n])
                    except OSError:
                        break
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def shutdown(self) -> None:
        """Cut the filesystem off as a power cut would (nothing more reaches the disk)."""
        import fcntl
        import struct

        fd = os.open(self.where, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(fd)


@contextmanager
def ext4(workdir: Path, size: int = 96 << 20) -> Iterator[Ext4]:
    """A fresh loop-mounted ext4 (no blocks reserved for root) under ``workdir``."""
    _need_root()
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 not installed")
    image = workdir / "ext4.img"
    with open(image, "wb") as f:
        f.truncate(size)
    r = _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    if r.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {r.stderr.strip()}")
    fs = Ext4(image, workdir / "ext4-mnt")
    fs.where.mkdir()
    try:
        fs.mount()
    except AssertionError as exc:
        pytest.skip(f"cannot loop-mount an ext4 image: {exc}")
    try:
        yield fs
    finally:
        fs.set_readonly(False)
        _unmount(fs.where)
        fs.detach()
        image.unlink(missing_ok=True)
