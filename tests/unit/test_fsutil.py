"""fsutil against the real filesystem under tmp_path (real syscalls, no mocks
except where a failure such as ENOSPC must be injected)."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pupd.daemon import fsutil
from p2pupd.daemon.errors import ApplyError, LockedError, NoSpaceError, StorageError
from p2pupd.daemon.fsutil import ExchangeUnsupportedError, NotBeneathError

REFLINK_FS = {"btrfs", "xfs", "bcachefs", "ocfs2"}


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


# --- error mapping ------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_storage_error_maps_full_disk_to_no_space(code: int) -> None:
    err = fsutil.storage_error(OSError(code, os.strerror(code)), "write", "/x/y")
    assert isinstance(err, NoSpaceError)
    assert "/x/y" in str(err)


def test_storage_error_maps_other_errors_to_storage_error() -> None:
    err = fsutil.storage_error(OSError(errno.EIO, "I/O error"), "read", "/x")
    assert type(err) is StorageError
    assert str(err) == "cannot read /x: I/O error"


# --- atomic_write / fsync_dir -------------------------------------------------


def test_atomic_write_creates_and_replaces(tmp_path: Path) -> None:
    p = tmp_path / "state"
    fsutil.atomic_write(p, b"one")
    fsutil.atomic_write(p, b"two", mode=0o600)
    assert p.read_bytes() == b"two"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert leftovers(tmp_path) == []


def test_atomic_write_mode_ignores_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        fsutil.atomic_write(tmp_path / "f", b"x", mode=0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644


def test_atomic_write_no_space_keeps_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "state"
    fsutil.atomic_write(p, b"old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(NoSpaceError, match="state"):
        fsutil.atomic_write(p, b"new")
    assert p.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_atomic_write_into_missing_dir_is_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="missing"):
        fsutil.atomic_write(tmp_path / "missing" / "f", b"x")


def test_fsync_dir(tmp_path: Path) -> None:
    fsutil.fsync_dir(tmp_path)
    with pytest.raises(StorageError):
        fsutil.fsync_dir(tmp_path / "nope")


# --- rename_exchange ------------------------------------------------------------


def make_tree(d: Path, tag: str) -> None:
    d.mkdir()
    (d / "version").write_text(tag)
    (d / "sub").mkdir()
    (d / "sub" / "f").write_text(tag * 3)


@pytest.mark.parametrize("via_syscall", [False, True])
def test_rename_exchange_swaps_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, via_syscall: bool
) -> None:
    make_tree(tmp_path / "live", "old")
    make_tree(tmp_path / "staged", "new")
    ino_live = (tmp_path / "live").stat().st_ino
    if via_syscall:
        # The path a libc without the renameat2 wrapper takes.
        real = fsutil._renameat2
        monkeypatch.setattr(fsutil, "_renameat2", lambda a, b, f: real(a, b, f, via_syscall=True))
    fsutil.rename_exchange(tmp_path / "live", tmp_path / "staged")
    assert (tmp_path / "live" / "version").read_text() == "new"
    assert (tmp_path / "live" / "sub" / "f").read_text() == "newnewnew"
    assert (tmp_path / "staged" / "version").read_text() == "old"
    assert (tmp_path / "staged").stat().st_ino == ino_live


def test_rename_exchange_swaps_file_and_directory(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("file")
    (tmp_path / "b").mkdir()
    fsutil.rename_exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a").is_dir()
    assert (tmp_path / "b").read_text() == "file"


def test_rename_exchange_missing_entry_is_apply_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(ApplyError, match="No such file") as info:
        fsutil.rename_exchange(tmp_path / "a", tmp_path / "b")
    assert not isinstance(info.value, ExchangeUnsupportedError)
    assert (tmp_path / "a").is_dir()


def test_rename_exchange_unsupported_names_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fsutil, "_renameat2", lambda a, b, f: errno.EINVAL)
    with pytest.raises(ExchangeUnsupportedError) as info:
        fsutil.rename_exchange(tmp_path / "a", tmp_path / "b")
    assert fsutil.filesystem_type(tmp_path) in str(info.value)
    assert isinstance(info.value, ApplyError)
    assert fsutil.exchange_supported(tmp_path) is False
    assert list(tmp_path.iterdir()) == []


def test_exchange_supported_probe_leaves_nothing(tmp_path: Path) -> None:
    assert fsutil.exchange_supported(tmp_path) is True
    assert list(tmp_path.iterdir()) == []


def test_filesystem_type() -> None:
    assert fsutil.filesystem_type("/proc/self") == "proc"
    assert fsutil.filesystem_type("/") != "unknown"


# --- reflink / clone_file -------------------------------------------------------


@pytest.fixture
def src_file(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(300_000))
    os.chmod(src, 0o751)
    os.utime(src, ns=(1_000_000_000_123, 1_500_000_000_456_789_000))
    return src


def test_reflink_without_support_returns_false_and_leaves_no_dst(
    tmp_path: Path, src_file: Path
) -> None:
    if fsutil.filesystem_type(tmp_path) in REFLINK_FS:
        pytest.skip("tmp_path is on a filesystem that may support reflinks")
    assert fsutil.reflink(src_file, tmp_path / "dst") is False
    assert not (tmp_path / "dst").exists()


def test_reflink_refuses_existing_dst(tmp_path: Path, src_file: Path) -> None:
    (tmp_path / "dst").write_bytes(b"keep")
    with pytest.raises(StorageError, match="File exists"):
        fsutil.reflink(src_file, tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == b"keep"


def test_clone_file_copy_preserves_content_mode_mtime(tmp_path: Path, src_file: Path) -> None:
    dst = tmp_path / "dst"
    how = fsutil.clone_file(src_file, dst, allow_hardlink=False)
    assert how in {"reflink", "copy"}
    assert dst.read_bytes() == src_file.read_bytes()
    s, d = src_file.stat(), dst.stat()
    assert stat.S_IMODE(d.st_mode) == 0o751
    assert d.st_mtime_ns == s.st_mtime_ns
    assert d.st_ino != s.st_ino
    assert (d.st_uid, d.st_gid) == (s.st_uid, s.st_gid)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_clone_file_copy_preserves_owner_as_root(tmp_path: Path, src_file: Path) -> None:
    os.chown(src_file, 1234, 5678)
    fsutil.clone_file(src_file, tmp_path / "dst", allow_hardlink=False)
    d = (tmp_path / "dst").stat()
    assert (d.st_uid, d.st_gid) == (1234, 5678)
    assert stat.S_IMODE(d.st_mode) == 0o751


def test_clone_file_hardlink_shares_inode(tmp_path: Path, src_file: Path) -> None:
    if fsutil.filesystem_type(tmp_path) in REFLINK_FS:
        pytest.skip("reflink would be preferred over a hard link here")
    how = fsutil.clone_file(src_file, tmp_path / "dst", allow_hardlink=True)
    assert how == "hardlink"
    assert (tmp_path / "dst").stat().st_ino == src_file.stat().st_ino


def test_clone_file_falls_back_to_copy_when_link_fails(
    tmp_path: Path, src_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(fsutil, "reflink_fd", lambda s, d: False)
    monkeypatch.setattr(os, "link", no_link)
    assert fsutil.clone_file(src_file, tmp_path / "dst", allow_hardlink=True) == "copy"
    assert (tmp_path / "dst").read_bytes() == src_file.read_bytes()
    assert (tmp_path / "dst").stat().st_mtime_ns == src_file.stat().st_mtime_ns


def test_clone_file_copy_without_copy_file_range(
    tmp_path: Path, src_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(*args: object) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fsutil, "reflink_fd", lambda s, d: False)
    monkeypatch.setattr(os, "copy_file_range", unsupported)
    assert fsutil.clone_file(src_file, tmp_path / "dst", allow_hardlink=False) == "copy"
    assert (tmp_path / "dst").read_bytes() == src_file.read_bytes()


def test_clone_file_refuses_existing_dst_and_symlink_src(tmp_path: Path, src_file: Path) -> None:
    (tmp_path / "dst").write_bytes(b"keep")
    with pytest.raises(StorageError):
        fsutil.clone_file(src_file, tmp_path / "dst", allow_hardlink=True)
    assert (tmp_path / "dst").read_bytes() == b"keep"
    (tmp_path / "link").symlink_to(src_file)
    with pytest.raises(StorageError):
        fsutil.clone_file(tmp_path / "link", tmp_path / "dst2", allow_hardlink=False)
    assert not (tmp_path / "dst2").exists()


def test_clone_file_no_space_leaves_no_dst(
    tmp_path: Path, src_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil, "reflink_fd", lambda s, d: False)
    monkeypatch.setattr(fsutil, "copy_fd", full)
    with pytest.raises(NoSpaceError):
        fsutil.clone_file(src_file, tmp_path / "dst", allow_hardlink=False)
    assert not (tmp_path / "dst").exists()


# --- space and hashing ----------------------------------------------------------


def test_free_bytes_and_ensure_free(tmp_path: Path) -> None:
    free = fsutil.free_bytes(tmp_path)
    assert free > 0
    fsutil.ensure_free(tmp_path, 1, 0)
    with pytest.raises(NoSpaceError, match=r"need \d+\.\d MiB free on \S+ at .*, have"):
        fsutil.ensure_free(tmp_path, free, 1 << 40)
    with pytest.raises(StorageError):
        fsutil.free_bytes(tmp_path / "nope")


@pytest.mark.parametrize("size", [0, 1, fsutil.BLOCK_BYTES, 3 * fsutil.BLOCK_BYTES + 7])
def test_hash_file(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    assert fsutil.hash_file(tmp_path / "f") == (hashlib.sha256(data).digest(), size)


def test_hash_file_missing(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="nope"):
        fsutil.hash_file(tmp_path / "nope")


# --- open_beneath ---------------------------------------------------------------

CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL


@pytest.fixture
def root_fd(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "root").mkdir()
    fd = os.open(tmp_path / "root", os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def test_open_beneath_creates_file(tmp_path: Path, root_fd: int) -> None:
    (tmp_path / "root" / "a" / "b").mkdir(parents=True)
    fd = fsutil.open_beneath(root_fd, "a/b/c", CREATE, 0o640)
    os.write(fd, b"hi")
    os.close(fd)
    assert (tmp_path / "root" / "a" / "b" / "c").read_bytes() == b"hi"


def test_open_beneath_parents(tmp_path: Path, root_fd: int) -> None:
    os.close(fsutil.open_beneath(root_fd, "x/y/z", CREATE, parents=True))
    assert (tmp_path / "root" / "x" / "y" / "z").is_file()
    with pytest.raises(StorageError):
        fsutil.open_beneath(root_fd, "q/z", CREATE)


def test_open_beneath_refuses_symlinked_component(tmp_path: Path, root_fd: int) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "root" / "a").mkdir()
    (tmp_path / "root" / "a" / "evil").symlink_to(outside)
    with pytest.raises(NotBeneathError, match="a/evil"):
        fsutil.open_beneath(root_fd, "a/evil/passwd", CREATE)
    with pytest.raises(NotBeneathError):
        fsutil.open_beneath(root_fd, "a/evil/new/passwd", CREATE, parents=True)
    assert list(outside.iterdir()) == []


def test_open_beneath_refuses_symlink_as_final_component(tmp_path: Path, root_fd: int) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"secret")
    (tmp_path / "root" / "link").symlink_to(target)
    with pytest.raises(NotBeneathError, match="symlink"):
        fsutil.open_beneath(root_fd, "link", os.O_RDONLY)
    with pytest.raises(StorageError):
        fsutil.open_beneath(root_fd, "link", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with pytest.raises(StorageError):
        fsutil.open_beneath(root_fd, "link", CREATE)
    assert target.read_bytes() == b"secret"


def test_open_beneath_refuses_file_as_directory(tmp_path: Path, root_fd: int) -> None:
    (tmp_path / "root" / "f").write_bytes(b"")
    with pytest.raises(NotBeneathError, match="not a directory"):
        fsutil.open_beneath(root_fd, "f/x", CREATE)


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/"])
def test_open_beneath_refuses_escaping_paths(root_fd: int, bad: str) -> None:
    with pytest.raises(NotBeneathError):
        fsutil.open_beneath(root_fd, bad, CREATE)


def test_open_beneath_does_not_leak_fds(root_fd: int) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for i in range(20):
        os.close(fsutil.open_beneath(root_fd, f"d/e/f{i}", CREATE, parents=True))
        with pytest.raises(StorageError):
            fsutil.open_beneath(root_fd, f"d/e/f{i}", CREATE)
    assert len(os.listdir("/proc/self/fd")) == before


# --- FileLock -------------------------------------------------------------------


def test_file_lock_excludes_second_holder(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    with fsutil.FileLock(path) as lock:
        assert lock.held
        assert path.read_text().strip() == str(os.getpid())
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            fsutil.FileLock(path).acquire(blocking=False)
    assert not lock.held
    with fsutil.FileLock(path):
        pass


def test_file_lock_held_by_other_process_until_it_dies(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    code = (
        "import sys, time; from p2pupd.daemon.fsutil import FileLock; "
        "l = FileLock(sys.argv[1]); l.acquire(); print('ok', flush=True); time.sleep(60)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ok"
        with pytest.raises(LockedError, match=f"pid {child.pid}"):
            fsutil.FileLock(path).acquire()
    finally:
        child.kill()
        child.wait()
    # The kernel dropped the dead process's lock: no stale-lock cleanup needed.
    lock = fsutil.FileLock(path)
    lock.acquire(blocking=True)
    lock.release()
    lock.release()  # idempotent


def test_file_lock_cannot_open(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        fsutil.FileLock(tmp_path / "missing" / "lock").acquire()


def test_syncfs_reports_a_failed_flush_instead_of_ignoring_it(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    fsutil.syncfs_fd(fd, tmp_path)  # a working flush returns quietly
    os.close(fd)
    with pytest.raises(StorageError, match="sync filesystem of"):
        fsutil.syncfs_fd(fd, tmp_path)  # closed: the kernel says EBADF


def test_start_writeback_leaves_the_file_as_written(tmp_path: Path) -> None:
    p = tmp_path / "f"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"x" * 100_000)
    fsutil.start_writeback(fd)
    os.close(fd)
    assert p.read_bytes() == b"x" * 100_000


def test_file_lock_is_taken_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing the pid is best effort: a full disk must not stop the commands (gc) that
    would free it."""
    path = tmp_path / "lock"

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    monkeypatch.setattr(os, "write", full)
    monkeypatch.setattr(os, "ftruncate", full)
    with fsutil.FileLock(path) as lock:
        assert lock.held
        with pytest.raises(LockedError, match="another process"):
            fsutil.FileLock(path).acquire(blocking=False)
