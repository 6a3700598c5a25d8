"""gc and fsck of a pack store: drop, punch out or repack what is not kept; verify the rest.

Theory of operation
-------------------
Both run under the state lock, at most beside writers of other packs (a pack
whose ``flock`` is held is skipped), and change the store only in ways that
leave every blob readable and every index consistent after a crash at any
instruction (tests/integration/test_crash_packs.py kills them to check).

``collect`` (gc), in order:

1. *Salvage*: records a dead writer left past an index are re-hashed and
   committed (``PackWriter.salvage``), so an interrupted import's blobs are
   judged like any others.
2. *Migrate*: small blobs kept as loose files (a state directory from before
   packs) are re-hashed and appended to a new pack; their files go once the
   pack is committed.
3. *Per pack*, with ``live`` the entries kept (a second copy of a blob that
   another pack serves counts as dead):

   - nothing live: the data file is unlinked, then the index;
   - at least ``REPACK_DEAD_FRACTION`` of the file dead: the live records are
     copied (in the kernel) into a new pack, which is committed -- from then on
     both packs name them, harmlessly -- and the old pack is unlinked;
   - some dead: the index is rewritten without them (temp file, fsync,
     rename, directory fsync), and only then are their bytes freed by punching
     holes (``fallocate``), so no index entry ever names punched bytes.

``fsck_packs`` reads every pack sequentially in large blocks, on up to two
threads, and checks each entry against its record's header and its checksum
(``full``: its sha256); with ``repair`` the damaged entries are dropped the
same way gc drops dead ones, so the blobs are fetched or imported again.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor

from p2pupd.daemon import fsutil
from p2pupd.daemon.errors import StorageError
from p2pupd.daemon.store import packfile
from p2pupd.daemon.store.blobs import BlobStore, FsckReport, GcReport
from p2pupd.daemon.store.packfile import RECORD, Entry
from p2pupd.daemon.store.packs import Pack, PackIndex, PackWriter, crash_point, salvage_all
from p2pupd.protocol import limits

REPACK_DEAD_FRACTION = 0.5
VERIFY_BLOCK_BYTES = 16 * limits.MiB
CHECK_THREADS = min(2, os.cpu_count() or 1)


def _file_size(p: Pack) -> int:
    try:
        return os.fstat(p.fd).st_size
    except OSError:
        return 0


class _Output:
    """New packs that gc fills with migrated and repacked blobs (rolled over when full)."""

    def __init__(self, index: PackIndex) -> None:
        self.index = index
        self.writers: list[PackWriter] = []

    def writer(self) -> PackWriter:
        if not self.writers or self.writers[-1].size >= packfile.PACK_TARGET_BYTES:
            self.writers.append(PackWriter.create(self.index))
        return self.writers[-1]

    def commit(self) -> None:
        for w in self.writers:
            w.commit()

    def close(self) -> None:
        for w in self.writers:
            w.close()


def collect(store: BlobStore, index: PackIndex, keep: Collection[bytes]) -> GcReport:
    """Keep exactly the blobs in ``keep`` (see the module docstring); report what went.

    Raises ``StorageError``; what was done until then stays consistent.
    """
    store.check_layout()
    salvage_all(index)
    for name in _orphan_indexes(index) + _cut_off_rewrites(index):
        fsutil.unlink_quietly(index.dir / name)
    keep_set = set(keep)
    report = GcReport()
    out = _Output(index)
    taken: list[PackWriter] = []
    try:
        moved = _migrate(store, index, keep_set, out)
        trims: list[tuple[Pack, PackWriter, list[Entry], list[Entry]]] = []
        drops: list[tuple[Pack, list[Entry], list[Entry]]] = []
        for p in index.packs():
            w = PackWriter.take(index, p.name)
            if w is None:
                continue  # a live writer holds it
            taken.append(w)
            live, dead = _split(p, index, keep_set)
            size = _file_size(p)
            if not dead and size <= p.data_end:
                continue
            live_bytes = sum(e.size + RECORD.size for e in live)
            if live and size - live_bytes < REPACK_DEAD_FRACTION * size:
                trims.append((p, w, live, dead))
                continue
            if live:
                out.writer().copy_records(w.fd, live)
            drops.append((p, live, dead))
        crash_point("repack-copied")
        out.commit()  # migrated and repacked blobs are durable in their new packs
        crash_point("repack-committed")
        report.packed = store.remove_files(moved).removed
        for p, _, live, _ in trims:
            _rewrite_index(index, p, live)
        if trims:
            fsutil.fsync_dir(index.dir)  # no index names a record before it is punched out
            crash_point("gc-index-rewritten")
        dropped: set[bytes] = set()
        for _, w, live, dead in trims:
            _free(w.fd, dead, max(e.record_end for e in live))
            dropped.update(e.digest for e in dead)
            report.bytes_freed += sum(e.size for e in dead)
        for p, live, dead in drops:
            _delete(index, p)
            dropped.update(e.digest for e in dead)
            report.bytes_freed += sum(e.size for e in dead)
            report.repacked += bool(live)
        if drops:
            fsutil.fsync_dir(index.dir)
        files = store.remove_files([d for d in store.iter_files() if d not in keep_set])
        report.bytes_freed += files.bytes_freed
        report.removed = files.removed + sum(1 for d in dropped if d not in index)
    finally:
        out.close()
        for w in taken:
            w.close()
    return report


def _split(p: Pack, index: PackIndex, keep: set[bytes]) -> tuple[list[Entry], list[Entry]]:
    """(live, dead) entries of ``p``: live if kept and this pack is the copy reads use."""
    live: list[Entry] = []
    dead: list[Entry] = []
    seen: set[bytes] = set()
    for e in sorted(p.entries(), key=lambda e: e.offset):
        if e.digest in keep and e.digest not in seen and index.owner(e.digest) is p:
            seen.add(e.digest)
            live.append(e)
        else:
            dead.append(e)
    return live, dead


def _migrate(store: BlobStore, index: PackIndex, keep: set[bytes], out: _Output) -> list[bytes]:
    """Append the small loose blobs in ``keep`` to a new pack; return their digests."""
    moved: list[bytes] = []
    for digest in list(store.iter_files()):
        if digest not in keep:
            continue
        if digest in index:
            moved.append(digest)  # already packed: the file is a spare copy
            continue
        try:
            if os.lstat(store.path(digest)).st_size > packfile.PACKED_MAX_BYTES:
                continue
            data = BlobStore.get_bytes(store, digest, verify=True)
        except (OSError, StorageError):
            continue  # unreadable or rotted: left for fsck to report
        out.writer().append(digest, data, packfile.checksum(data))
        moved.append(digest)
    return moved


def _rewrite_index(index: PackIndex, p: Pack, live: list[Entry]) -> None:
    """Replace ``p``'s index file by one naming only ``live`` (durable once the dir is synced)."""
    final = index.dir / (p.name + packfile.IDX_SUFFIX)
    fd, tmp = fsutil.create_temp(index.dir, p.name, 0o444)
    try:
        try:
            data = packfile.IDX_MAGIC + b"".join(packfile.encode_entry(e) for e in live)
            fsutil.write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except OSError as exc:
        fsutil.unlink_quietly(tmp)
        raise fsutil.storage_error(exc, "rewrite index", final) from None
    index.replace(p.name, live)


def _free(fd: int, dead: list[Entry], data_end: int) -> None:
    """Punch out the records of ``dead`` and cut a tail past ``data_end`` (best effort)."""
    for start, end in _runs(dead):
        if not fsutil.punch_hole(fd, start, end - start):
            break  # this filesystem cannot: the space returns at the next repack
        crash_point("gc-punched")
    with contextlib.suppress(OSError):
        if os.fstat(fd).st_size > data_end:
            os.ftruncate(fd, data_end)


def _runs(entries: list[Entry]) -> Iterator[tuple[int, int]]:
    """Coalesced ``[start, end)`` byte ranges of the records of ``entries``."""
    start = end = -1
    for e in sorted(entries, key=lambda e: e.offset):
        if e.record_start == end:
            end = e.record_end
            continue
        if end > start >= 0:
            yield start, end
        start, end = e.record_start, e.record_end
    if end > start >= 0:
        yield start, end


def _delete(index: PackIndex, p: Pack) -> None:
    """Unlink a pack, its data file first: a crash in between leaves an index without
    its pack, which loading ignores and ``fsck --repair`` removes; the other order
    would leave records no index names, which a writer would re-hash and revive."""
    base = index.dir / p.name
    for suffix in (packfile.PACK_SUFFIX, packfile.IDX_SUFFIX):
        try:
            os.unlink(f"{base}{suffix}")
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise fsutil.storage_error(exc, "remove", f"{base}{suffix}") from None
        crash_point(f"gc-{'data' if suffix == packfile.PACK_SUFFIX else 'index'}-unlinked")
    index.forget(p.name)


# --- fsck ------------------------------------------------------------------------


def fsck_packs(index: PackIndex, report: FsckReport, repair: bool, full: bool) -> None:
    """Verify every pack into ``report`` (see the module docstring).

    ``report.checked`` counts entries, ``corrupt`` their digests; debris (a
    tail no entry names, an index without its pack, the temp file of an index
    rewrite that was cut off) goes in ``temp_files``
    and names that are no part of a pack in ``stray``. Raises ``StorageError``.
    """
    index.refresh()
    try:
        names = os.listdir(index.dir)
    except OSError as exc:
        raise fsutil.storage_error(exc, "list", index.dir) from None
    orphans = _orphan_indexes(index, names)
    for n in sorted(names):
        if n.startswith(".") and n.endswith(".tmp"):  # an index rewrite cut off (SIGKILL)
            report.temp_files.append(f"packs/{n}")
            if repair:
                fsutil.unlink_quietly(index.dir / n)
            continue
        _, dot, suffix = n.rpartition(".")
        if not dot or f".{suffix}" not in (packfile.PACK_SUFFIX, packfile.IDX_SUFFIX):
            report.stray.append(f"packs/{n}")
        elif n in orphans:
            report.temp_files.append(f"packs/{n}")
            if repair:
                fsutil.unlink_quietly(index.dir / n)
    for p in index.packs():
        tail = _file_size(p) - p.data_end
        if tail > 0:
            report.temp_files.append(
                f"packs/{p.name}{packfile.PACK_SUFFIX}: {tail} bytes past its index"
            )
    if repair:
        salvage_all(index)
    maps = {p.name: _mapped(p) for p in index.packs()}
    work = [(p, block) for p in index.packs() for block in _blocks(p)]

    def check(pb: tuple[Pack, list[Entry]]) -> list[bytes]:
        m = maps[pb[0].name]
        if m is None:
            return [e.digest for e in pb[1]]
        with memoryview(m) as view:
            return _check_block(pb[0], view, pb[1], full)

    try:
        with ThreadPoolExecutor(CHECK_THREADS) as pool:
            results = list(pool.map(check, work))
    finally:
        for m in maps.values():
            if m is not None:
                m.close()
    bad: dict[str, list[bytes]] = {}
    for (p, block), corrupt in zip(work, results, strict=True):
        report.checked += len(block)
        report.corrupt.extend(corrupt)
        if corrupt:
            bad.setdefault(p.name, []).extend(corrupt)
    if repair and bad:
        for name, digests in bad.items():
            damaged = index.pack(name)
            w = PackWriter.take(index, name) if damaged is not None else None
            if damaged is None or w is None:
                continue
            try:
                dropped = set(digests)
                entries = damaged.entries()
                _rewrite_index(index, damaged, [e for e in entries if e.digest not in dropped])
                fsutil.fsync_dir(index.dir)
                rest = [e.record_end for e in entries if e.digest not in dropped]
                _free(
                    w.fd,
                    [e for e in entries if e.digest in dropped],
                    max(rest, default=packfile.PACK_HEADER.size),
                )
            finally:
                w.close()


def _cut_off_rewrites(index: PackIndex) -> list[str]:
    """Temp files of index rewrites a killed gc or repair left (``_rewrite_index``)."""
    try:
        return [n for n in os.listdir(index.dir) if n.startswith(".") and n.endswith(".tmp")]
    except OSError as exc:
        raise fsutil.storage_error(exc, "list", index.dir) from None


def _orphan_indexes(index: PackIndex, names: list[str] | None = None) -> list[str]:
    """Index files whose data file is gone (a crash between gc's two unlinks)."""
    if names is None:
        try:
            names = os.listdir(index.dir)
        except OSError as exc:
            raise fsutil.storage_error(exc, "list", index.dir) from None
    packs = {n[: -len(packfile.PACK_SUFFIX)] for n in names if n.endswith(packfile.PACK_SUFFIX)}
    return [
        n
        for n in names
        if n.endswith(packfile.IDX_SUFFIX) and n[: -len(packfile.IDX_SUFFIX)] not in packs
    ]


def _blocks(p: Pack) -> Iterator[list[Entry]]:
    """The pack's entries in offset order, cut into runs of about ``VERIFY_BLOCK_BYTES``."""
    block: list[Entry] = []
    start = 0
    for e in sorted(p.entries(), key=lambda e: e.offset):
        if block and e.record_end - start > VERIFY_BLOCK_BYTES:
            yield block
            block = []
        if not block:
            start = e.record_start
        block.append(e)
    if block:
        yield block


def _check_block(p: Pack, view: memoryview, block: list[Entry], full: bool) -> list[bytes]:
    """Digests of the entries of ``block`` whose record or bytes are not as indexed.

    ``view`` maps the whole pack: the bytes are checked where the page cache
    holds them, not copied out first.
    """
    bad: list[bytes] = []
    for e in block:
        head = e.record_start
        body = view[head + RECORD.size : head + RECORD.size + e.size]
        ok = len(body) == e.size and RECORD.unpack_from(view, head) == (e.size, e.digest)
        if ok:
            ok = (
                hashlib.sha256(body).digest() == e.digest
                if full
                else packfile.checksum(body) == e.xxh
            )
        if not ok:
            bad.append(e.digest)
    return bad


def _mapped(p: Pack) -> mmap.mmap | None:
    try:
        m = mmap.mmap(p.fd, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # empty, or the filesystem cannot map it
        return None
    with contextlib.suppress(OSError, AttributeError):
        m.madvise(mmap.MADV_SEQUENTIAL)
    return m
