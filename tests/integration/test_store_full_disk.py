"""A full filesystem, for real: a 2 MiB tmpfs, blobs larger than what is left.

Shows the store's promise under ENOSPC from the kernel (not an injected one):
``NoSpaceError``, no temp file left, every earlier blob intact, and the store
usable again once space is freed.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from _mounts import tmpfs

from p2pupd.daemon import fsutil
from p2pupd.daemon.errors import NoSpaceError
from p2pupd.daemon.store.blobs import BlobStore

MiB = 1 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "mnt", size="2m") as where:
        yield where


@pytest.fixture
def full_store(small_fs: Path) -> tuple[BlobStore, dict[bytes, bytes]]:
    """A store on the tmpfs holding a few blobs, with under 2 MiB left."""
    store = BlobStore(small_fs / "store")
    earlier = {}
    for _ in range(4):
        data = os.urandom(100_000)
        earlier[store.put_bytes(data)] = data
    assert fsutil.free_bytes(small_fs) < 2 * MiB
    return store, earlier


def assert_unchanged(store: BlobStore, earlier: dict[bytes, bytes]) -> None:
    assert os.listdir(store.tmp_dir) == []
    assert set(store.iter_digests()) == set(earlier)
    report = store.fsck()
    assert report.clean, report
    for digest, data in earlier.items():
        assert store.get_bytes(digest) == data


def test_put_bytes_larger_than_free_space(full_store: tuple[BlobStore, dict[bytes, bytes]]) -> None:
    store, earlier = full_store
    big = os.urandom(3 * MiB)
    with pytest.raises(NoSpaceError, match="no space left"):
        store.put_bytes(big)
    assert_unchanged(store, earlier)


def test_put_stream_larger_than_free_space(
    full_store: tuple[BlobStore, dict[bytes, bytes]],
) -> None:
    store, earlier = full_store
    big = os.urandom(3 * MiB)
    progress: list[int] = []
    with pytest.raises(NoSpaceError):
        store.put_stream(
            io.BytesIO(big), hashlib.sha256(big).digest(), 4 * MiB, progress=progress.append
        )
    assert 0 < sum(progress) < len(big)  # it really was cut off mid-copy
    assert_unchanged(store, earlier)


def test_put_file_larger_than_free_space(
    tmp_path: Path, full_store: tuple[BlobStore, dict[bytes, bytes]]
) -> None:
    store, earlier = full_store
    src = tmp_path / "big"  # on the real disk: a cross-filesystem copy
    src.write_bytes(os.urandom(3 * MiB))
    with pytest.raises(NoSpaceError):
        store.put_file(src)
    assert_unchanged(store, earlier)


def test_store_usable_after_space_is_freed(
    full_store: tuple[BlobStore, dict[bytes, bytes]],
) -> None:
    store, earlier = full_store
    big = os.urandom(int(1.8 * MiB))
    with pytest.raises(NoSpaceError):
        store.put_bytes(big)
    report = store.gc(keep=set())
    assert report.removed == len(earlier)
    assert store.put_bytes(big) == hashlib.sha256(big).digest()
    assert store.fsck().clean


def test_atomic_write_on_full_disk_keeps_old_file(small_fs: Path) -> None:
    target = small_fs / "state"
    fsutil.atomic_write(target, b"old state")
    with pytest.raises(NoSpaceError):
        fsutil.atomic_write(target, os.urandom(3 * MiB))
    assert target.read_bytes() == b"old state"
    assert os.listdir(small_fs) == ["state"]


def test_ensure_free_names_filesystem_and_sizes(small_fs: Path) -> None:
    fsutil.ensure_free(small_fs, MiB, 0)
    with pytest.raises(NoSpaceError, match=r"need 3\.0 MiB free on tmpfs at .*, have 2\.0 MiB"):
        fsutil.ensure_free(small_fs, 2 * MiB, MiB)
