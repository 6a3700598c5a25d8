"""The node's pack store on a real directory: what is packed, when a blob becomes
visible, what a dead writer leaves and how it is salvaged, checksums against
rot, and gc's three ways of freeing space. Another process is played by a
second ``PackIndex`` of the same directory (it shares nothing in memory)."""

from __future__ import annotations

import hashlib
import itertools
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _store import rewrite_packed

from p2pupd.daemon.errors import CorruptStoreError, StorageError
from p2pupd.daemon.store import packfile
from p2pupd.daemon.store.blobs import BlobStore
from p2pupd.daemon.store.packs import WRITEBACK_BYTES, PackIndex, PackWriter
from p2pupd.daemon.store.packstore import PackStore
from p2pupd.daemon.store.spool import Spool
from p2pupd.protocol.errors import HashMismatchError

KiB = 1024


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def blobs(n: int, size: int = 20 * KiB, seed: int = 0) -> list[bytes]:
    return [hashlib.sha256(f"{seed}-{i}".encode()).digest() * (size // 32) for i in range(n)]


@pytest.fixture
def store(tmp_path: Path) -> PackStore:
    return PackStore(tmp_path / "state")


def elsewhere(store: PackStore) -> PackIndex:
    """The pack directory as another process sees it: read from disk alone."""
    return PackIndex(store.pack_dir)


def packs(store: PackStore) -> list[str]:
    return sorted(n for n in os.listdir(store.pack_dir) if n.endswith(".pack"))


def test_small_blobs_are_packed_large_ones_are_files(store: PackStore) -> None:
    small, large = b"s" * 1000, os.urandom(packfile.PACKED_MAX_BYTES + 1)
    ds, dl = store.put_bytes(small), store.put_bytes(large)
    assert os.listdir(store.blob_dir) == [dl.hex()]
    assert len(packs(store)) == 1
    assert store.get_bytes(ds) == small and store.get_bytes(dl) == large
    assert store.size(ds) == 1000 and store.has(ds) and store.has(dl)
    assert sorted(store.iter_digests()) == sorted([ds, dl])
    assert store.read_range(ds, 990, 100) == b"s" * 10 and store.read_range(ds, 1000, 1) is None
    assert store.put_bytes(small) == ds and len(elsewhere(store)) == 1  # not stored twice


def test_appended_blobs_are_invisible_until_committed(store: PackStore) -> None:
    w = store.writer()
    data = blobs(3)
    for d in data:
        w.append(sha(d), d, packfile.checksum(d))
    assert not any(store.has(sha(d)) for d in data)
    assert len(elsewhere(store)) == 0
    assert sorted(w.commit()) == sorted(sha(d) for d in data)
    assert all(store.get_bytes(sha(d)) == d for d in data)
    assert len(elsewhere(store)) == 3  # durable: on disk for any reader
    w.close()


def test_a_dead_writers_tail_is_rehashed_torn_records_skipped_a_cut_one_dropped(
    store: PackStore,
) -> None:
    w = store.writer()
    data = blobs(6)
    for d in data:
        w.append(sha(d), d, packfile.checksum(d))
    w.close()  # the writer dies: nothing committed, its lock is free again
    index = elsewhere(store)
    assert len(index) == 0
    p = index.packs()[0]
    records = list(packfile.read_records(p.fd, p.data_end, os.fstat(p.fd).st_size))
    assert [r[0] for r in records] == [sha(d) for d in data]
    pack = store.pack_dir / f"{p.name}.pack"
    os.chmod(pack, 0o644)
    with open(pack, "r+b") as f:  # the fourth record's bytes never reached the disk
        f.seek(records[3][1])
        f.write(b"\0" * 100)
    with open(pack, "r+b") as f:  # and the file ends inside the sixth
        f.truncate(records[5][1] + 10)
    w2 = store.writer()  # the next writer takes the pack with room: that one
    assert w2.name == p.name
    assert [store.has(sha(d)) for d in data] == [True] * 3 + [False] + [True] + [False]
    assert os.path.getsize(pack) == records[4][1] + len(data[4])  # the cut record goes
    w2.close()
    assert store.fsck(full=True).clean


def test_a_torn_index_entry_is_ignored_and_cut_by_the_next_writer(store: PackStore) -> None:
    data = blobs(2)
    store.put_bytes(data[0])
    idx = store.pack_dir / packs(store)[0].replace(".pack", ".idx")
    os.chmod(idx, 0o644)
    with open(idx, "ab") as f:
        f.write(b"\x01" * 30)  # half an entry: the crash came mid-write
    assert len(elsewhere(store)) == 1
    store.put_bytes(data[1])
    assert os.path.getsize(idx) == len(packfile.IDX_MAGIC) + 2 * packfile.ENTRY.size
    assert {sha(d) for d in data} == set(elsewhere(store).digests())


def test_two_writers_never_share_a_pack(store: PackStore) -> None:
    a, b = store.writer(), store.writer()
    assert a.name != b.name
    a.append(sha(b"x"), b"x", packfile.checksum(b"x"))
    a.commit()
    a.close()
    c = store.writer()
    assert c.name == a.name  # free again: the next writer fills it
    b.close()
    c.close()
    assert packs(store) == [f"{a.name}.pack"]  # b made nothing and left nothing


def test_rot_is_caught_by_the_checksum_and_fsck_repair_drops_the_blob(store: PackStore) -> None:
    data = blobs(3)
    for d in data:
        store.put_bytes(d)
    rewrite_packed(store.root, sha(data[1]), b"\xff" + data[1][1:], fix_checksum=False)
    with pytest.raises(CorruptStoreError):
        store.get_bytes(sha(data[1]), verify=False)
    assert store.read_blob(sha(data[1]), 1 << 20) is None  # never served
    assert store.read_blob(sha(data[0]), 1 << 20) == data[0]
    report = store.fsck()
    assert report.corrupt == [sha(data[1])] and report.checked == 3
    store.fsck(repair=True)
    assert not store.has(sha(data[1])) and store.has(sha(data[2]))
    assert store.fsck(full=True).clean


def test_a_forged_checksum_is_caught_by_sha256_only(store: PackStore) -> None:
    """The trade of reading without re-hashing, shown: someone who can write the
    state directory and fixes the checksum fools the cheap check, not sha256."""
    d = blobs(1)[0]
    store.put_bytes(d)
    forged = b"F" + d[1:]
    rewrite_packed(store.root, sha(d), forged, fix_checksum=True)
    store = PackStore(store.root)  # opened afresh, as the next command would
    assert store.get_bytes(sha(d), verify=False) == forged
    with pytest.raises(CorruptStoreError):
        store.get_bytes(sha(d))
    assert store.fsck().clean
    assert store.fsck(full=True).corrupt == [sha(d)]


def test_gc_trims_repacks_and_deletes_packs(store: PackStore) -> None:
    """One pack per case: a few dead (index rewritten, holes punched), most dead
    (live records copied to a new pack), all dead (pack removed)."""
    groups = [blobs(10, seed=s) for s in range(3)]
    names = []
    for g in groups:
        w = PackWriter.create(store.index)
        for d in g:
            w.append(sha(d), d, packfile.checksum(d))
        w.commit()
        names.append(w.name)
        w.close()
    keep = {sha(d) for d in groups[0][:8]} | {sha(d) for d in groups[1][:2]}
    trimmed = store.pack_dir / f"{names[0]}.pack"
    blocks_before = os.stat(trimmed).st_blocks
    report = store.gc(keep)
    assert report.removed == 20 and report.repacked == 1
    assert set(store.iter_digests()) == keep
    left = packs(store)
    assert f"{names[0]}.pack" in left and f"{names[1]}.pack" not in left
    assert f"{names[2]}.pack" not in left and len(left) == 2
    assert os.stat(trimmed).st_blocks < blocks_before  # the dead records' space is free
    assert set(elsewhere(store).digests()) == keep  # the indexes on disk agree
    assert all(store.get_bytes(d) for d in keep)
    assert store.fsck(full=True).clean


def test_gc_moves_small_loose_blobs_into_a_pack(tmp_path: Path) -> None:
    """A state directory from before packs: its files stay readable; gc packs them."""
    old = BlobStore(tmp_path / "state")
    small = [old.put_bytes(d) for d in blobs(5)]
    big = old.put_bytes(os.urandom(packfile.PACKED_MAX_BYTES + 10))
    store = PackStore(tmp_path / "state")
    assert all(store.has(d) for d in small) and len(store.index) == 0
    report = store.gc(set(small[:4]) | {big})
    assert report.packed == 4 and report.removed == 1
    assert sorted(os.listdir(store.blob_dir)) == [big.hex()]
    assert set(elsewhere(store).digests()) == set(small[:4])
    assert store.fsck(full=True).clean


def test_a_spare_copy_in_a_second_pack_is_dropped_by_gc(store: PackStore) -> None:
    d = blobs(1)[0]
    for _ in range(2):  # a repack cut short leaves a blob in two packs
        w = PackWriter.create(store.index)
        w.append(sha(d), d, packfile.checksum(d))
        w.commit()
        w.close()
    assert len(packs(store)) == 2
    store.gc({sha(d)})
    assert len(packs(store)) == 1 and store.get_bytes(sha(d)) == d


def test_spool_discard_leaves_the_store_as_it_was(tmp_path: Path, store: PackStore) -> None:
    kept = store.put_bytes(b"kept")
    before = {n: (store.pack_dir / n).read_bytes() for n in os.listdir(store.pack_dir)}
    spool = Spool(store.root, store)
    assert spool.resume({}) == set()
    big = os.urandom(packfile.PACKED_MAX_BYTES + 5)
    src = tmp_path / "big"
    src.write_bytes(big)
    for data in blobs(4):
        spool.put(data, sha(data))
    fd = os.open(src, os.O_RDONLY)
    spool.copy(fd, sha(big), len(big))
    os.close(fd)
    with pytest.raises(HashMismatchError):
        spool.put(b"evil", sha(b"good"))
    spool.discard()
    spool.close()
    assert {n: (store.pack_dir / n).read_bytes() for n in os.listdir(store.pack_dir)} == before
    assert list(store.iter_digests()) == [kept]
    assert not (store.root / "spool").exists()


def test_spool_resume_keeps_intact_large_files_and_commits_them(
    tmp_path: Path, store: PackStore
) -> None:
    big = [os.urandom(packfile.PACKED_MAX_BYTES + i) for i in (1, 2)]
    spool = Spool(store.root, store)
    for b in big:
        fd = os.open(tmp_path / "src", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        os.write(fd, b)
        os.lseek(fd, 0, os.SEEK_SET)
        spool.copy(fd, sha(b), len(b))
        os.close(fd)
    spool.close()  # killed before its commit: the files stay in STATE/spool
    torn = store.root / "spool" / sha(big[1]).hex()
    torn.chmod(0o644)
    torn.write_bytes(b"cut")
    need = {sha(b): len(b) for b in big}
    again = Spool(store.root, store)
    assert again.resume(need) == {sha(big[0])}
    assert again.commit() == [sha(big[0])]
    again.close(clear=True)
    assert store.get_bytes(sha(big[0])) == big[0] and not store.has(sha(big[1]))


def test_a_new_directory_on_a_deleted_ones_inode_gets_an_index_of_its_own(
    tmp_path: Path,
) -> None:
    """The process shares one index per packs directory, found by (device, inode).
    A directory deleted while its index lives on may hand its inode to a new one
    (a node's state dir wiped and made again): the new one must not get the old
    index, whose path names nothing now."""
    import shutil

    from p2pupd.daemon.store import packs as packs_mod

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    stale = packs_mod.index_for(old)
    st = os.stat(new)
    packs_mod._registry[(st.st_dev, st.st_ino)] = stale  # as the file system may do
    shutil.rmtree(old)
    fresh = packs_mod.index_for(new)
    assert fresh is not stale and fresh.dir == new
    assert packs_mod.index_for(new) is fresh  # and it is shared from then on


def test_the_temp_file_of_a_cut_off_index_rewrite_is_debris_not_a_stranger(
    store: PackStore,
) -> None:
    """A repack killed between writing an index's temp file and renaming it leaves
    ``.NAME.RANDOM.tmp`` in packs/: fsck calls it a temp file and repair removes it."""
    store.put_bytes(b"x" * 5000)
    left = store.pack_dir / ".0123abcd.a1b2c3d4e5f6.tmp"
    left.write_bytes(b"half an index")
    report = store.fsck()
    assert report.stray == [] and report.temp_files == [f"packs/{left.name}"]
    store.fsck(repair=True)
    assert not left.exists() and store.fsck().clean


def test_gc_removes_the_temp_file_of_a_cut_off_index_rewrite(store: PackStore) -> None:
    kept = store.put_bytes(b"y" * 5000)
    left = store.pack_dir / ".0123abcd.a1b2c3d4e5f6.tmp"
    left.write_bytes(b"half an index")
    store.gc({kept})
    assert not left.exists() and store.fsck().clean and store.has(kept)


def test_a_batch_goes_down_as_whole_records_beside_single_appends(store: PackStore) -> None:
    w = store.writer()
    data = blobs(5, size=3 * KiB, seed=7)
    w.append(sha(data[0]), data[0], packfile.checksum(data[0]))
    w.append_many([(sha(d), memoryview(d), packfile.checksum(d)) for d in data[1:4]])
    w.append(sha(data[4]), data[4], packfile.checksum(data[4]))
    assert not any(store.has(sha(d)) for d in data)  # invisible until committed
    assert sorted(w.commit()) == sorted(sha(d) for d in data)
    index = elsewhere(store)
    p = index.packs()[0]
    start = packfile.PACK_HEADER.size
    records = list(packfile.read_records(p.fd, start, os.fstat(p.fd).st_size))
    assert [r[0] for r in records] == [sha(d) for d in data]  # in order, back to back
    assert records[-1][1] + len(data[-1]) == os.fstat(p.fd).st_size
    assert all(store.get_bytes(sha(d)) == d for d in data)
    w.close()
    assert store.fsck(full=True).clean


def test_writeback_is_started_as_a_writer_goes_so_its_commit_has_little_left(
    store: PackStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(
        "p2pupd.daemon.fsutil.start_writeback",
        lambda fd, offset=0, length=0: started.append((offset, length)),
    )
    w = store.writer()
    batch = 60
    for i in range(40):  # 40 batches of 60 x 20 KiB: 47 MiB
        w.append_many([(sha(d), d, packfile.checksum(d)) for d in blobs(batch, seed=1000 + i)])
    end = os.fstat(w.fd).st_size
    # Contiguous ranges from the first record on, none left out ...
    assert started[0][0] == packfile.PACK_HEADER.size
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(started))
    # ... leaving the commit's flush at most WRITEBACK_BYTES and one batch.
    flushed = started[-1][0] + started[-1][1]
    assert end - flushed < WRITEBACK_BYTES + batch * (20 * KiB + packfile.RECORD.size)
    # Single appends (an import's large blobs) the same: through the record written.
    for d in blobs(300, seed=2000):  # 6 MiB more
        w.append(sha(d), d, packfile.checksum(d))
    end = os.fstat(w.fd).st_size
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(started))
    flushed = started[-1][0] + started[-1][1]
    assert end - flushed < WRITEBACK_BYTES + 20 * KiB + packfile.RECORD.size
    assert len(w.commit()) == 40 * batch + 300
    w.close()


def test_a_batch_cut_off_mid_write_leaves_whole_records_and_drops_the_torn_one(
    store: PackStore,
) -> None:
    w = store.writer()
    data = blobs(4, size=5 * KiB, seed=8)
    w.append_many([(sha(d), d, packfile.checksum(d)) for d in data])
    w.close()  # the writer dies before its commit
    index = elsewhere(store)
    p = index.packs()[0]
    records = list(packfile.read_records(p.fd, p.data_end, os.fstat(p.fd).st_size))
    assert [r[0] for r in records] == [sha(d) for d in data]
    pack = store.pack_dir / f"{p.name}.pack"
    os.chmod(pack, 0o644)
    with open(pack, "r+b") as f:  # the write stopped inside the third record
        f.truncate(records[2][1] + 100)
    w2 = store.writer()  # salvages the dead writer's tail
    assert [store.has(sha(d)) for d in data] == [True, True, False, False]
    w2.close()
    assert store.fsck(full=True).clean


def test_put_batch_reports_each_blob_in_order(tmp_path: Path, store: PackStore) -> None:
    spool = Spool(tmp_path / "state", store)
    spool.open()
    small = blobs(3, size=2 * KiB, seed=9)
    large = os.urandom(packfile.PACKED_MAX_BYTES + 1)
    items = [
        (sha(small[0]), small[0]),
        (sha(b"other"), small[1]),  # bytes that are not the blob asked for
        (sha(large), memoryview(large)),
        (sha(small[2]), memoryview(small[2])),
        (sha(small[0]), small[0]),  # the same blob again in the batch: stored once
    ]
    assert spool.put_batch(items) == [True, False, True, True, True]
    assert sorted(spool.commit()) == sorted({sha(small[0]), sha(small[2]), sha(large)})
    assert store.get_bytes(sha(small[2])) == small[2] and store.get_bytes(sha(large)) == large
    assert not store.has(sha(b"other")) and not store.has(sha(small[1]))
    assert len(elsewhere(store)) == 2
    spool.close()


def test_a_landed_blob_is_served_from_the_spool_until_its_commit(
    tmp_path: Path, store: PackStore
) -> None:
    # A swarm relays a blob the moment it landed: offered only after the
    # commit, every hop would wait for it; offered before and not readable,
    # the neighbour that asked would hear "missing" and never ask again.
    spool = Spool(tmp_path / "state", store)
    spool.open()
    a, b = blobs(2, size=30 * KiB, seed=11)
    assert spool.put_batch([(sha(a), a)]) == [True]
    assert not store.has(sha(a)) and spool.read(sha(a), 1 << 20) == a
    assert spool.read(sha(a), 1000) is None  # larger than the caller takes
    assert spool.read(sha(b), 1 << 20) is None  # never landed
    assert spool.commit() == [sha(a)]
    assert spool.read(sha(a), 1 << 20) is None and store.get_bytes(sha(a)) == a
    # Rot between landing and reading is caught (the record's checksum).
    assert spool.put_batch([(sha(b), b)]) == [True]
    writer, entry = spool._landed[sha(b)]
    os.pwrite(writer.fd, b"\x00" * 8, entry.offset)
    assert spool.read(sha(b), 1 << 20) is None
    spool.discard()  # a refused batch: nothing of it is served
    assert spool.read(sha(b), 1 << 20) is None and not spool._landed
    spool.close()


def test_a_pack_that_cannot_be_opened_fails_the_batch_and_releases_its_blobs(
    tmp_path: Path, store: PackStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "state", store)
    spool.open()
    (a,) = blobs(1, size=10 * KiB, seed=12)

    def no_room() -> PackWriter:
        raise StorageError("no room for a pack")

    monkeypatch.setattr(spool, "_writer", no_room)
    (outcome,) = spool.put_batch([(sha(a), a)])
    assert isinstance(outcome, StorageError)
    monkeypatch.undo()
    # Not left claimed: the next batch stores it.
    assert spool.put_batch([(sha(a), a)]) == [True]
    assert spool.commit() == [sha(a)] and store.get_bytes(sha(a)) == a
    spool.close()


def test_copy_batch_spools_a_run_and_names_the_blob_that_fails(
    tmp_path: Path, store: PackStore
) -> None:
    spool = Spool(tmp_path / "state", store)
    spool.open()
    src = tmp_path / "medium"
    src.mkdir()
    data = blobs(4, size=4 * KiB, seed=10)

    def opened(contents: list[bytes]) -> list[int]:
        fds = []
        for i, c in enumerate(contents):
            (src / str(i)).write_bytes(c)
            fds.append(os.open(src / str(i), os.O_RDONLY))
        return fds

    fds = opened(data)
    try:
        got = spool.copy_batch([(fd, sha(d), len(d)) for fd, d in zip(fds, data, strict=True)])
    finally:
        for fd in fds:
            os.close(fd)
    assert got == sum(map(len, data))
    spool.commit()
    assert all(store.get_bytes(sha(d)) == d for d in data)

    more = blobs(3, size=4 * KiB, seed=11)
    bad = [more[0], more[1][:-1] + b"?", more[2]]  # the second one rotted on the medium
    fds = opened(bad)
    try:
        with pytest.raises(HashMismatchError, match=sha(more[1]).hex()[:16]):
            spool.copy_batch([(fd, sha(d), len(d)) for fd, d in zip(fds, more, strict=True)])
        for fd in fds:
            os.lseek(fd, 0, os.SEEK_SET)
        short = [(fds[0], sha(more[0]), len(more[0]) + 1)]  # the medium lost a byte
        with pytest.raises(HashMismatchError, match="read 4096 bytes, expected 4097"):
            spool.copy_batch(short)
    finally:
        for fd in fds:
            os.close(fd)
    spool.commit()
    assert not store.has(sha(more[1]))
    spool.close()


def test_an_import_copies_small_blobs_in_runs_and_a_large_one_alone(
    tmp_path: Path, store: PackStore
) -> None:
    from p2pupd.daemon.bundles import importer

    medium = tmp_path / "medium"
    medium.mkdir()
    small = blobs(40, size=20 * KiB, seed=12)
    large = os.urandom(packfile.PACKED_MAX_BYTES + 10)
    order = [*small[:20], large, *small[20:]]  # the large one ends a run of small ones
    for d in order:
        (medium / sha(d).hex()).write_bytes(d)

    class Opener:
        def order(self, digest: bytes, inodes: dict[bytes, int]) -> tuple[int, bytes, int]:
            return (1, b"", inodes[digest])

        def open(self, digest: bytes, size: int) -> int:
            return os.open(medium / digest.hex(), os.O_RDONLY)

    need = {sha(d): len(d) for d in order}
    inodes = {sha(d): i for i, d in enumerate(order)}
    spool = Spool(tmp_path / "state", store)
    spool.open()
    report, seen = importer.ImportReport(), []
    importer._copy(Opener(), spool, need, inodes, report, seen.append, None, None)  # type: ignore[arg-type]
    assert report.blobs_copied == 41 and report.bytes_copied == sum(need.values())
    assert sum(seen) == report.bytes_copied and seen.count(20 * KiB) == 40  # blob by blob
    spool.commit()
    assert all(store.get_bytes(sha(d)) == d for d in order)
    assert os.listdir(store.blob_dir) == [sha(large).hex()]  # the large one: a file
    assert len(elsewhere(store)) == 40  # the small ones: packed
    spool.close()
