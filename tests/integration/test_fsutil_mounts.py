"""fsutil on real filesystems other than the one tmp_path is on: tmpfs, and a
loop-mounted btrfs/xfs where reflinks really happen."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from _mounts import reflink_fs, tmpfs

from p2pupd.daemon import fsutil
from p2pupd.daemon.store.blobs import BlobStore


@pytest.fixture
def tmpfs_dir(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "mnt", size="8m") as where:
        yield where


def make_tree(d: Path, tag: str) -> None:
    d.mkdir()
    (d / "version").write_text(tag)


def test_rename_exchange_on_tmpfs(tmpfs_dir: Path) -> None:
    assert fsutil.filesystem_type(tmpfs_dir) == "tmpfs"
    assert fsutil.exchange_supported(tmpfs_dir)
    make_tree(tmpfs_dir / "live", "old")
    make_tree(tmpfs_dir / "staged", "new")
    fsutil.rename_exchange(tmpfs_dir / "live", tmpfs_dir / "staged")
    assert (tmpfs_dir / "live" / "version").read_text() == "new"
    assert (tmpfs_dir / "staged" / "version").read_text() == "old"


def test_rename_exchange_across_filesystems_is_apply_error(tmp_path: Path, tmpfs_dir: Path) -> None:
    make_tree(tmp_path / "a", "a")
    make_tree(tmpfs_dir / "b", "b")
    with pytest.raises(fsutil.ApplyError, match="cross-device") as info:
        fsutil.rename_exchange(tmp_path / "a", tmpfs_dir / "b")
    assert not isinstance(info.value, fsutil.ExchangeUnsupportedError)


def test_reflink_unsupported_on_tmpfs_and_clone_falls_back(tmpfs_dir: Path) -> None:
    src = tmpfs_dir / "src"
    src.write_bytes(os.urandom(100_000))
    os.chmod(src, 0o640)
    assert fsutil.reflink(src, tmpfs_dir / "r") is False
    assert not (tmpfs_dir / "r").exists()
    assert fsutil.clone_file(src, tmpfs_dir / "c", allow_hardlink=False) == "copy"
    assert fsutil.clone_file(src, tmpfs_dir / "h", allow_hardlink=True) == "hardlink"
    assert (tmpfs_dir / "c").read_bytes() == src.read_bytes()
    assert stat.S_IMODE((tmpfs_dir / "c").stat().st_mode) == 0o640


def test_clone_across_filesystems_falls_back_to_copy(tmp_path: Path, tmpfs_dir: Path) -> None:
    src = tmp_path / "src"  # the real disk; dst on tmpfs: EXDEV for reflink and link
    src.write_bytes(os.urandom(100_000))
    assert fsutil.clone_file(src, tmpfs_dir / "dst", allow_hardlink=True) == "copy"
    assert (tmpfs_dir / "dst").read_bytes() == src.read_bytes()
    assert (tmpfs_dir / "dst").stat().st_mtime_ns == src.stat().st_mtime_ns


def test_open_beneath_on_tmpfs_refuses_link_out_of_tree(tmp_path: Path, tmpfs_dir: Path) -> None:
    (tmpfs_dir / "tree").mkdir()
    (tmpfs_dir / "tree" / "etc").symlink_to(tmp_path)
    fd = os.open(tmpfs_dir / "tree", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(fsutil.NotBeneathError):
            fsutil.open_beneath(fd, "etc/shadow", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    finally:
        os.close(fd)
    assert not (tmp_path / "shadow").exists()


def test_reflink_on_cow_filesystem(tmp_path: Path) -> None:
    with reflink_fs(tmp_path) as (fs, mnt):
        assert fsutil.filesystem_type(mnt) == fs
        data = os.urandom(1 << 20)
        src = mnt / "src"
        src.write_bytes(data)
        os.chmod(src, 0o600)
        assert fsutil.reflink(src, mnt / "r") is True
        assert (mnt / "r").read_bytes() == data
        assert fsutil.clone_file(src, mnt / "c", allow_hardlink=True) == "reflink"
        c = (mnt / "c").stat()
        assert c.st_ino != src.stat().st_ino
        assert stat.S_IMODE(c.st_mode) == 0o600
        assert c.st_mtime_ns == src.stat().st_mtime_ns
        # Copy-on-write: changing the clone leaves the source alone.
        with open(mnt / "c", "r+b") as f:
            f.write(b"changed")
        assert src.read_bytes() == data
        # The store reflinks put_file sources on the same filesystem and still verifies.
        store = BlobStore(mnt / "store")
        digest = store.put_file(src)
        assert store.get_bytes(digest) == data
        assert fsutil.exchange_supported(mnt)
