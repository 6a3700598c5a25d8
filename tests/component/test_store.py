"""BlobStore on a real directory; failures (ENOSPC, EIO) injected at the syscall seam."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from pathlib import Path

import pytest

from p2pupd.daemon import fsutil
from p2pupd.daemon.errors import CorruptStoreError, NoSpaceError, NotFoundError, StorageError
from p2pupd.daemon.store.blobs import BLOB_MODE, BlobStore
from p2pupd.protocol.errors import CodecError, FrameTooLargeError, HashMismatchError

MiB = 1 << 20


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "store")


def tmp_entries(store: BlobStore) -> list[str]:
    return os.listdir(store.tmp_dir)


def blob_names(store: BlobStore) -> list[str]:
    return sorted(os.listdir(store.blob_dir))


class Trickle:
    """A reader that hands out at most ``step`` bytes per read, like a socket."""

    def __init__(self, data: bytes, step: int = 7, fail_at: int | None = None) -> None:
        self.buf = io.BytesIO(data)
        self.step = step
        self.fail_at = fail_at

    def read(self, n: int, /) -> bytes:
        if self.fail_at is not None and self.buf.tell() >= self.fail_at:
            raise ConnectionResetError("peer went away")
        return self.buf.read(min(n, self.step))


# --- layout and basic round trips ----------------------------------------------


def test_layout_is_oci_blob_dir(tmp_path: Path, store: BlobStore) -> None:
    digest = store.put_bytes(b"hello")
    p = tmp_path / "store" / "blobs" / "sha256" / sha(b"hello").hex()
    assert digest == sha(b"hello")
    assert store.path(digest) == p
    assert p.read_bytes() == b"hello"
    assert stat.S_IMODE(p.stat().st_mode) == BLOB_MODE
    assert (tmp_path / "store" / "tmp").is_dir()
    assert tmp_entries(store) == []


def test_reopen_existing_store(tmp_path: Path, store: BlobStore) -> None:
    d = store.put_bytes(b"x")
    assert BlobStore(tmp_path / "store").get_bytes(d) == b"x"


def test_root_that_is_a_file_is_storage_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(StorageError):
        BlobStore(tmp_path / "f")


def test_bad_digest_length_is_refused(store: BlobStore) -> None:
    with pytest.raises(CodecError):
        store.path(b"short")
    with pytest.raises(CodecError):
        store.put_bytes(b"x", b"\0" * 31)


def test_put_bytes_verifies_given_digest(store: BlobStore) -> None:
    with pytest.raises(HashMismatchError):
        store.put_bytes(b"evil", sha(b"good"))
    assert blob_names(store) == []
    assert tmp_entries(store) == []
    assert store.put_bytes(b"good", sha(b"good")) == sha(b"good")


def test_put_bytes_is_idempotent(store: BlobStore) -> None:
    d = store.put_bytes(b"same")
    ino = store.path(d).stat().st_ino
    assert store.put_bytes(b"same") == d
    assert store.path(d).stat().st_ino == ino  # not rewritten
    assert blob_names(store) == [d.hex()]


def test_empty_blob(store: BlobStore) -> None:
    d = store.put_bytes(b"")
    assert store.size(d) == 0
    assert store.get_bytes(d) == b""


def test_lookup_of_missing_blob(store: BlobStore) -> None:
    d = sha(b"absent")
    assert not store.has(d)
    for call in (store.size, store.open, store.get_bytes):
        with pytest.raises(NotFoundError, match=d.hex()):
            call(d)


def test_open_and_size(store: BlobStore) -> None:
    data = os.urandom(5000)
    d = store.put_bytes(data)
    assert store.has(d)
    assert store.size(d) == 5000
    with store.open(d) as f:
        assert f.read() == data


def test_get_bytes_detects_corruption(store: BlobStore) -> None:
    d = store.put_bytes(b"original")
    p = store.path(d)
    os.chmod(p, 0o644)
    p.write_bytes(b"bit rot!")
    with pytest.raises(CorruptStoreError, match=d.hex()):
        store.get_bytes(d)
    assert store.get_bytes(d, verify=False) == b"bit rot!"


# --- put_stream ---------------------------------------------------------------


def test_put_stream_round_trip_with_progress(store: BlobStore) -> None:
    data = os.urandom(2 * MiB + 123)
    seen: list[int] = []
    n = store.put_stream(io.BytesIO(data), sha(data), max_bytes=4 * MiB, progress=seen.append)
    assert n == len(data)
    assert sum(seen) == len(data)
    assert max(seen) <= fsutil.BLOCK_BYTES
    assert store.get_bytes(sha(data)) == data
    assert tmp_entries(store) == []


def test_put_stream_short_reads(store: BlobStore) -> None:
    data = os.urandom(1000)
    assert store.put_stream(Trickle(data), sha(data), max_bytes=1000) == 1000
    assert store.get_bytes(sha(data)) == data


def test_put_stream_exactly_at_limit_and_over(store: BlobStore) -> None:
    data = os.urandom(4096)
    with pytest.raises(FrameTooLargeError):
        store.put_stream(io.BytesIO(data), sha(data), max_bytes=4095)
    assert not store.has(sha(data))
    assert tmp_entries(store) == []
    assert store.put_stream(io.BytesIO(data), sha(data), max_bytes=4096) == 4096


def test_put_stream_reads_at_most_one_byte_past_limit(store: BlobStore) -> None:
    src = io.BytesIO(os.urandom(3 * MiB))
    with pytest.raises(FrameTooLargeError):
        store.put_stream(src, sha(b"whatever"), max_bytes=1000)
    assert src.tell() == 1001


def test_put_stream_hash_mismatch_stores_nothing(store: BlobStore) -> None:
    with pytest.raises(HashMismatchError):
        store.put_stream(io.BytesIO(b"evil"), sha(b"good"), max_bytes=100)
    assert blob_names(store) == []
    assert tmp_entries(store) == []


def test_put_stream_reader_error_propagates_and_cleans_up(store: BlobStore) -> None:
    data = os.urandom(100)
    with pytest.raises(ConnectionResetError):
        store.put_stream(Trickle(data, step=10, fail_at=50), sha(data), max_bytes=100)
    assert blob_names(store) == []
    assert tmp_entries(store) == []


def test_put_stream_when_present_reads_nothing(store: BlobStore) -> None:
    d = store.put_bytes(b"have it")
    src = io.BytesIO(b"have it")
    assert store.put_stream(src, d, max_bytes=100) == 0
    assert src.tell() == 0


# --- put_file -----------------------------------------------------------------


def test_put_file(tmp_path: Path, store: BlobStore) -> None:
    src = tmp_path / "src"
    data = os.urandom(3 * MiB + 5)
    src.write_bytes(data)
    d = store.put_file(src)
    assert d == sha(data)
    assert store.get_bytes(d) == data
    assert store.path(d).stat().st_ino != src.stat().st_ino  # never a hard link
    assert stat.S_IMODE(store.path(d).stat().st_mode) == BLOB_MODE
    assert store.put_file(src, d) == d
    assert tmp_entries(store) == []


def test_put_file_mismatch_and_bad_sources(tmp_path: Path, store: BlobStore) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"evil")
    with pytest.raises(HashMismatchError):
        store.put_file(src, sha(b"good"))
    (tmp_path / "link").symlink_to(src)
    with pytest.raises(StorageError):
        store.put_file(tmp_path / "link")
    with pytest.raises(StorageError):
        store.put_file(tmp_path)
    with pytest.raises(StorageError):
        store.put_file(tmp_path / "missing")
    assert blob_names(store) == []
    assert tmp_entries(store) == []


# --- listing, fsck, gc -----------------------------------------------------------


def test_iter_digests_and_total_bytes(store: BlobStore) -> None:
    blobs = [os.urandom(n) for n in (1, 10, 100)]
    digests = {store.put_bytes(b) for b in blobs}
    (store.blob_dir / "README").write_text("not a blob")
    assert set(store.iter_digests()) == digests
    assert store.total_bytes() == 111


def test_fsck_clean(store: BlobStore) -> None:
    for i in range(5):
        store.put_bytes(bytes([i]) * 100)
    report = store.fsck()
    assert report.clean
    assert report.checked == 5


def test_fsck_finds_and_repairs(store: BlobStore) -> None:
    good = store.put_bytes(b"good")
    bad = store.put_bytes(b"will rot")
    os.chmod(store.path(bad), 0o644)
    store.path(bad).write_bytes(b"rotten")
    # A directory or a symlink under a digest name is corrupt too.
    odd_dir = sha(b"dir")
    store.path(odd_dir).mkdir()
    odd_link = sha(b"link")
    store.path(odd_link).symlink_to(store.path(good))
    (store.blob_dir / "stray.txt").write_text("?")
    (store.tmp_dir / ".crashed.tmp").write_bytes(b"partial")

    report = store.fsck()
    assert report.checked == 4
    assert set(report.corrupt) == {bad, odd_dir, odd_link}
    assert report.stray == ["stray.txt"]
    assert report.temp_files == [".crashed.tmp"]
    assert not report.clean
    assert store.path(bad).exists()  # no repair asked

    report = store.fsck(repair=True)
    assert report.repaired
    assert set(os.listdir(store.blob_dir)) == {good.hex(), "stray.txt"}
    assert tmp_entries(store) == []
    again = store.fsck()
    assert again.corrupt == [] and again.temp_files == [] and again.stray == ["stray.txt"]


def test_gc_keeps_exactly_keep_set(store: BlobStore) -> None:
    blobs = {store.put_bytes(os.urandom(n)): n for n in range(1, 11)}
    keep = set(list(blobs)[:4])
    report = store.gc(keep)
    assert report.removed == 6
    assert report.bytes_freed == sum(n for d, n in blobs.items() if d not in keep)
    assert set(store.iter_digests()) == keep
    assert store.gc(keep).removed == 0


def test_clean_tmp(store: BlobStore) -> None:
    (store.tmp_dir / "a.tmp").write_bytes(b"x")
    (store.tmp_dir / "d").mkdir()
    assert store.clean_tmp() == 2
    assert tmp_entries(store) == []


# --- injected failures: the store stays as it was --------------------------------


def enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["write_all", "fsync", "replace"])
def test_no_space_anywhere_leaves_store_unchanged(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    before = store.put_bytes(b"earlier")
    target = {
        "write_all": (fsutil, "write_all"),
        "fsync": (os, "fsync"),
        "replace": (os, "replace"),
    }
    monkeypatch.setattr(*target[where], enospc)
    data = os.urandom(10_000)
    with pytest.raises(NoSpaceError):
        store.put_bytes(data)
    with pytest.raises(NoSpaceError):
        store.put_stream(io.BytesIO(data), sha(data), max_bytes=MiB)
    monkeypatch.undo()
    assert blob_names(store) == [before.hex()]
    assert tmp_entries(store) == []
    assert store.fsck().clean


def test_put_file_no_space_leaves_store_unchanged(
    tmp_path: Path, store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(10_000))
    monkeypatch.setattr(fsutil, "reflink_fd", lambda s, d: False)
    monkeypatch.setattr(fsutil, "copy_fd", enospc)
    with pytest.raises(NoSpaceError):
        store.put_file(src)
    assert blob_names(store) == []
    assert tmp_entries(store) == []


def test_failed_directory_sync_withdraws_the_blob(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def eio(path: object) -> None:
        raise StorageError("cannot sync directory: Input/output error")

    monkeypatch.setattr(fsutil, "fsync_dir", eio)
    with pytest.raises(StorageError):
        store.put_bytes(b"not durable")
    assert blob_names(store) == []
    assert tmp_entries(store) == []
