"""Where things go on the box, and the two atomic writes every step uses.

Paths are named as the running system sees them (``/opt/p2pupd``,
``/etc/systemd/system``) and written below ``Layout.root``, so tests and image
staging install into a scratch tree while the unit and the links still name
the real paths.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from preflight import RefusedError

DEFAULT_PREFIX = "/opt/p2pupd"
PATH_LINK = "/usr/local/bin/p2pupd"


@dataclass(frozen=True)
class Layout:
    """Paths as the running system sees them, and where they are written
    (below ``root``, for tests and image staging)."""

    root: Path
    prefix: str
    version: str

    def at(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    @property
    def prefix_dir(self) -> Path:
        return self.at(self.prefix)

    @property
    def version_dir(self) -> Path:
        return self.prefix_dir / self.version

    @property
    def current(self) -> Path:
        return self.prefix_dir / "current"

    @property
    def command(self) -> str:
        """The command as the running system names it (unit, PATH link)."""
        return f"{self.prefix}/current/bin/p2pupd"


def check_conflicts(lay: Layout, path_link: bool) -> None:
    """Refuse, before writing anything, what the install would have to clobber."""
    if (lay.prefix_dir / "pyvenv.cfg").exists():
        raise RefusedError(
            f"{lay.prefix_dir} is a virtualenv from an earlier pip install: move it away first "
            f"(its state dir and config stay where they are)"
        )
    cur = lstat_or_none(lay.current)
    if cur is not None and not stat.S_ISLNK(cur.st_mode):
        raise RefusedError(f"{lay.current} exists and is not a symlink: move it away first")
    link = lay.at(PATH_LINK)
    st = lstat_or_none(link)
    if path_link and st is not None and not stat.S_ISLNK(st.st_mode):
        raise RefusedError(
            f"{link} exists and is not a symlink (an earlier pip install?): remove it, "
            f"or pass --no-path-link"
        )


def lstat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """One installer at a time per prefix (flock on the directory itself)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RefusedError(f"another install is running in {path}") from None
        yield
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int) -> bool:
    """Write ``path`` (temp file, fsync, rename) if its bytes differ; True if written."""
    with contextlib.suppress(OSError):
        if path.read_bytes() == data and stat.S_IMODE(path.stat().st_mode) == mode:
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.install-tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return True


def point_link(link: Path, text: str) -> bool:
    """Make ``link`` a symlink to ``text`` by renaming a new link over it; True if changed."""
    with contextlib.suppress(OSError):
        if os.readlink(link) == text:
            return False
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.install-link")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(text, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)
    return True
