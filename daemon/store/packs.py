"""The packs of a node's store: one in-memory index of them all, and a pack's writer.

Theory of operation
-------------------
``PackIndex`` knows, for every blob named by an index file in
``blobs/packs/``, which pack holds it, where and with which checksum
(``packfile`` describes the files). It is loaded once per process and
directory (``index_for``: every ``PackStore`` of one state directory in a
process shares it, so a blob one of them commits is seen by all) and kept
current by the writers of this process; ``refresh`` picks up what other
processes changed (new packs, grown or rewritten index files, removed packs).
Each pack stays open for reading, so a read is one ``pread`` and a pack
deleted by a ``gc`` elsewhere stays readable until it is dropped here.
Memory: the raw 56-byte entries plus one dict slot per blob (about 150 bytes
a blob: 15 MB for 100,000 chunks, 6 GB of content).

``PackWriter`` is the one writer of one pack: it holds an exclusive ``flock``
on the data file for as long as it is open, so two writers (threads,
processes) never append to the same pack, and a pack whose writer died is
recognised by its lock being free. ``append`` reserves a range under a lock
and writes the record outside it, so threads that hashed different blobs
write them in parallel; ``append_many`` writes a batch's records under the lock in
``pwritev`` calls of at most ``fsutil.WRITE_BYTES`` (one wait for the lock
per batch, not two per blob; why the calls are small: see there). ``commit`` is the one way a blob enters the
store:

1. ``fdatasync`` the data file: every record appended so far is durable;
2. append their entries to the index file and ``fdatasync`` it;
3. publish them in ``PackIndex``.

A crash before 2 completes leaves records that no entry names: the next
writer to take the pack re-reads that tail, re-hashes every record against
its digest, commits the intact ones, steps over torn ones (each header is
written with its reservation or ahead of its bytes in the same write, so a
torn record's size is known) and cuts a record the file ends inside
(``salvage``). So
a blob is either absent or complete and verified, and an interrupted import
resumes from what it wrote without a journal. Writeback of appended data is
started every ``WRITEBACK_BYTES`` (``sync_file_range``), so the flush of step
1 finds little left to write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import signal
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from p2pupd.daemon import fsutil
from p2pupd.daemon.errors import StorageError
from p2pupd.daemon.store import packfile
from p2pupd.daemon.store.packfile import ENTRY, Entry
from p2pupd.protocol import ids, limits

# What a writer leaves unwritten for its commit's flush, at most (and one
# batch): the flush that ends a transfer waits for it, a tenth of a second
# per 8 MiB on a disk that writes 80 MB/s. The kernel merges adjacent ranges.
WRITEBACK_BYTES = 2 * limits.MiB

# ``P2PUPD_CRASH_AT=<point>`` makes the process SIGKILL itself at that point,
# after passing it ``P2PUPD_CRASH_SKIP`` times (tests/integration/test_crash_packs.py).
CRASH_POINTS = (
    "pack-append",  # a record half written
    "pack-appended",  # records written, nothing synced
    "pack-synced",  # records durable, no index entry written
    "pack-indexed",  # index entries written, not synced
    "repack-copied",  # live records copied into a new pack, not committed
    "repack-committed",  # new pack committed, old pack not yet removed
    "gc-data-unlinked",  # a pack's data file removed, its index not yet
    "gc-index-unlinked",  # a whole pack removed, the others not yet
    "gc-index-rewritten",  # an index without dead entries in place, holes not punched
    "gc-punched",  # a hole punched, more to go
)
_CRASH_AT = os.environ.get("P2PUPD_CRASH_AT")
_crash_skip = [int(os.environ.get("P2PUPD_CRASH_SKIP", "0") or 0)]


def crash_point(point: str) -> None:
    """SIGKILL this process at ``point`` if ``P2PUPD_CRASH_AT`` names it (crash tests)."""
    if point == _CRASH_AT:
        if _crash_skip[0] > 0:
            _crash_skip[0] -= 1
            return
        os.kill(os.getpid(), signal.SIGKILL)


_RW = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
_RO = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_IDX_HEAD = len(packfile.IDX_MAGIC)


@dataclass(eq=False)
class Pack:
    """One pack as the index knows it."""

    name: str
    no: int
    fd: int  # read-only, for lookups
    raw: bytearray = field(default_factory=bytearray)  # its valid index entries
    idx_ino: int = 0
    idx_len: int = _IDX_HEAD  # bytes of the index file read so far
    data_end: int = packfile.PACK_HEADER.size  # end of the last indexed record

    def entries(self) -> list[Entry]:
        return [Entry(*t[:4]) for t in ENTRY.iter_unpack(self.raw)]


_registry: weakref.WeakValueDictionary[tuple[int, int], PackIndex] = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()


def index_for(directory: Path) -> PackIndex:
    """The process's ``PackIndex`` of ``directory`` (created and loaded on first use)."""
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise fsutil.storage_error(exc, "open", directory) from None
    key = (st.st_dev, st.st_ino)
    with _registry_lock:
        index = _registry.get(key)
        if index is None or not _same_dir(index.dir, key):
            # None yet, or the index of a directory since deleted whose inode
            # the file system gave to this one: its path names nothing now.
            index = PackIndex(directory)
            _registry[key] = index
            return index
    index.refresh()  # also right if the directory was replaced by one with its inode
    return index


def _same_dir(path: Path, key: tuple[int, int]) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == key


class PackIndex:
    """Where every packed blob of one ``blobs/packs`` directory is (see module doc)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.lock = threading.RLock()
        self._packs: dict[int, Pack] = {}
        self._by_name: dict[str, Pack] = {}
        self._where: dict[bytes, int] = {}  # digest -> pack number << 32 | entry number
        self._next_no = 0
        self.refresh()

    def __del__(self) -> None:
        for p in list(self._packs.values()):
            with contextlib.suppress(OSError):
                os.close(p.fd)

    # --- lookups (lock-free: dict reads are atomic) -------------------------------

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._where

    def __len__(self) -> int:
        return len(self._where)

    def lookup(self, digest: bytes) -> tuple[Pack, Entry] | None:
        v = self._where.get(digest)
        if v is None:
            return None
        p = self._packs.get(v >> 32)
        if p is None:
            return None
        t = ENTRY.unpack_from(p.raw, (v & 0xFFFFFFFF) * ENTRY.size)
        return p, Entry(t[0], t[1], t[2], t[3])

    def read(self, digest: bytes) -> tuple[bytes, int] | None:
        """The blob's bytes and recorded checksum, or None if it is not packed here.

        Raises ``StorageError`` when the pack cannot be read or is shorter
        than its index says.
        """
        found = self.lookup(digest)
        if found is None:
            return None
        p, e = found
        try:
            data = os.pread(p.fd, e.size, e.offset)
        except OSError as exc:
            raise fsutil.storage_error(exc, "read pack", self.dir / p.name) from None
        if len(data) != e.size:
            raise StorageError(f"pack {p.name} is shorter than its index says; run fsck")
        return data, e.xxh

    def digests(self) -> list[bytes]:
        with self.lock:
            return list(self._where)

    def packs(self) -> list[Pack]:
        with self.lock:
            return list(self._packs.values())

    def pack(self, name: str) -> Pack | None:
        return self._by_name.get(name)

    def owner(self, digest: bytes) -> Pack | None:
        """The pack whose entry for ``digest`` is the one reads use."""
        v = self._where.get(digest)
        return None if v is None else self._packs.get(v >> 32)

    # --- keeping it current -----------------------------------------------------

    def refresh(self) -> None:
        """Catch up with index files written, replaced or removed by other processes."""
        with self.lock:
            try:
                names = os.listdir(self.dir)
            except FileNotFoundError:
                names = []
            except OSError as exc:
                raise fsutil.storage_error(exc, "list", self.dir) from None
            seen: set[str] = set()
            for n in names:
                if not n.endswith(packfile.IDX_SUFFIX):
                    continue
                name = n[: -len(packfile.IDX_SUFFIX)]
                seen.add(name)
                p = self._by_name.get(name)
                try:
                    st = os.stat(self.dir / n, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise fsutil.storage_error(exc, "inspect", self.dir / n) from None
                if p is not None and st.st_ino != p.idx_ino:
                    self._drop(p)  # rewritten by a gc: read it afresh
                    p = None
                if p is None:
                    self.attach(name)
                elif st.st_size > p.idx_len:
                    self._read_more(p)
            for name in set(self._by_name) - seen:
                self._drop(self._by_name[name])

    def attach(self, name: str) -> Pack | None:
        """Load the pack ``name`` (index and data file); None if it is not (yet) whole."""
        with self.lock:
            if name in self._by_name:
                return self._by_name[name]
            try:
                fd = os.open(self.dir / (name + packfile.PACK_SUFFIX), _RO)
            except FileNotFoundError:
                return None  # index made, data file not yet (or already removed)
            except OSError as exc:
                raise fsutil.storage_error(exc, "open pack", self.dir / name) from None
            p = Pack(name, self._next_no, fd)
            self._next_no += 1
            self._packs[p.no] = p
            self._by_name[name] = p
            self._read_more(p)
            return p

    def _read_more(self, p: Pack) -> None:
        path = self.dir / (p.name + packfile.IDX_SUFFIX)
        try:
            with open(path, "rb", buffering=0, opener=_ro_opener) as f:
                st = os.fstat(f.fileno())
                if p.idx_len == _IDX_HEAD:
                    if f.read(_IDX_HEAD) != packfile.IDX_MAGIC:
                        return  # not an index of ours: fsck reports it
                    p.idx_ino = st.st_ino
                f.seek(p.idx_len)
                data = f.read()
            pack_size = os.fstat(p.fd).st_size
        except FileNotFoundError:
            return
        except OSError as exc:
            raise fsutil.storage_error(exc, "read index", path) from None
        entries, _ = packfile.decode_entries(data)
        good: list[tuple[Entry, bytes]] = []
        for i, e in enumerate(entries):
            if e.record_end > pack_size or e.size > packfile.PACKED_MAX_BYTES:
                break  # cannot be: bytes are durable before their entry. Torn, like a bad crc
            good.append((e, data[i * ENTRY.size : (i + 1) * ENTRY.size]))
        p.idx_len += len(good) * ENTRY.size
        self._publish(p, good)

    def add(self, name: str, entries: list[Entry]) -> None:
        """Publish entries a writer of this process just committed to pack ``name``."""
        with self.lock:
            p = self._by_name.get(name) or self.attach(name)
            if p is None:
                raise StorageError(f"pack {name} vanished while it was written")
            blobs = [(e, packfile.encode_entry(e)) for e in entries]
            p.idx_len += len(blobs) * ENTRY.size
            self._publish(p, blobs)

    def _publish(self, p: Pack, entries: list[tuple[Entry, bytes]]) -> None:
        n = len(p.raw) // ENTRY.size
        for e, raw in entries:
            p.raw += raw
            p.data_end = max(p.data_end, e.record_end)
            self._where.setdefault(e.digest, p.no << 32 | n)
            n += 1

    def replace(self, name: str, entries: list[Entry]) -> None:
        """Make ``entries`` the whole index of pack ``name`` (after gc rewrote its file)."""
        with self.lock:
            p = self._by_name.get(name)
            if p is None:
                return
            self._drop(p, close=False)
            q = Pack(name, self._next_no, p.fd)
            self._next_no += 1
            try:
                st = os.stat(self.dir / (name + packfile.IDX_SUFFIX), follow_symlinks=False)
                q.idx_ino = st.st_ino
            except OSError:
                pass
            q.idx_len = _IDX_HEAD + len(entries) * ENTRY.size
            self._packs[q.no], self._by_name[name] = q, q
            self._publish(q, [(e, packfile.encode_entry(e)) for e in entries])

    def forget(self, name: str) -> None:
        """Drop pack ``name`` from the index (gc removed it)."""
        with self.lock:
            p = self._by_name.get(name)
            if p is not None:
                self._drop(p)

    def _drop(self, p: Pack, close: bool = True) -> None:
        del self._packs[p.no]
        del self._by_name[p.name]
        lost = [d for d, v in self._where.items() if v >> 32 == p.no]
        for d in lost:
            del self._where[d]
        if close:
            with contextlib.suppress(OSError):
                os.close(p.fd)
        if lost:  # another pack may hold a copy (a repack that was cut short)
            want = set(lost)
            for q in self._packs.values():
                for i, t in enumerate(ENTRY.iter_unpack(q.raw)):
                    if t[0] in want:
                        self._where.setdefault(t[0], q.no << 32 | i)


def salvage_all(index: PackIndex) -> list[bytes]:
    """Commit what dead writers left past the indexes; return those blobs' digests.

    A pack whose writer is alive (its lock is held) is left alone.
    """
    index.refresh()
    out: list[bytes] = []
    for p in index.packs():
        try:
            size = os.fstat(p.fd).st_size
        except OSError:
            continue
        if size <= p.data_end:
            continue
        w = PackWriter.take(index, p.name)
        if w is None:
            continue
        try:
            out += w.salvage()
        finally:
            w.close()
    return out


def _copy_range(src_fd: int, dst_fd: int, src: int, dst: int, length: int) -> None:
    """Copy ``length`` bytes between two files at the given offsets (raises ``OSError``)."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src_fd, dst_fd, length - done, src + done, dst + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = 0
        if n == 0:  # unsupported here, or the source ended early
            block = os.pread(src_fd, min(length - done, fsutil.BLOCK_BYTES), src + done)
            if not block:
                raise OSError(errno.EIO, "pack ended before its index says")
            n = os.pwrite(dst_fd, block, dst + done)
        done += n


def _ro_opener(path: str, flags: int) -> int:
    return os.open(path, _RO)


class PackWriter:
    """The one writer of one pack (see module doc); not for use after ``close``."""

    def __init__(self, index: PackIndex, name: str, fd: int, idx_fd: int, created: bool) -> None:
        self.index = index
        self.name = name
        self._fd = fd
        self._idx_fd = idx_fd
        self._created = created
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._pending: list[Entry] = []
        self._end = os.fstat(fd).st_size
        self._writeback = self._end
        self._broken: str | None = None
        p = index.pack(name)
        self._idx_end = p.idx_len if p is not None else _IDX_HEAD
        self.committed_end = p.data_end if p is not None else packfile.PACK_HEADER.size

    # --- opening ---------------------------------------------------------------

    @classmethod
    def open(cls, index: PackIndex) -> PackWriter:
        """Take a pack with room whose writer is gone (salvaging its tail), else make one.

        Raises ``StorageError``/``NoSpaceError``.
        """
        index.refresh()
        for p in sorted(index.packs(), key=lambda p: p.data_end):
            if p.data_end >= packfile.PACK_TARGET_BYTES:
                continue
            w = cls.take(index, p.name)
            if w is not None:
                w.salvage()
                return w
        return cls.create(index)

    @classmethod
    def take(cls, index: PackIndex, name: str) -> PackWriter | None:
        """Become the writer of pack ``name``; None if it has a live writer or is gone."""
        try:
            fd = os.open(index.dir / (name + packfile.PACK_SUFFIX), _RW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise fsutil.storage_error(exc, "open pack", index.dir / name) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            idx_fd = os.open(index.dir / (name + packfile.IDX_SUFFIX), _RW)
        except OSError:
            os.close(fd)
            return None
        index.refresh()  # what its last writer committed, now that it is ours
        if index.pack(name) is None or not packfile.check_pack_header(os.pread(fd, 12, 0)):
            os.close(idx_fd)
            os.close(fd)
            return None
        w = cls(index, name, fd, idx_fd, created=False)
        try:
            os.ftruncate(idx_fd, w._idx_end)  # a torn last entry goes
        except OSError as exc:
            w.close()
            raise fsutil.storage_error(exc, "truncate index of", index.dir / name) from None
        return w

    @classmethod
    def create(cls, index: PackIndex) -> PackWriter:
        """Make a new, empty pack and become its writer."""
        for _ in range(8):
            name = secrets.token_hex(8)
            base = index.dir / name
            try:
                idx_fd = os.open(f"{base}{packfile.IDX_SUFFIX}", _NEW, 0o444)
            except FileExistsError:
                continue
            except OSError as exc:
                raise fsutil.storage_error(exc, "create index in", index.dir) from None
            try:
                fd = os.open(f"{base}{packfile.PACK_SUFFIX}", _NEW, 0o444)
            except OSError as exc:
                os.close(idx_fd)
                fsutil.unlink_quietly(f"{base}{packfile.IDX_SUFFIX}")
                raise fsutil.storage_error(exc, "create pack in", index.dir) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fsutil.write_all(idx_fd, packfile.IDX_MAGIC)
                fsutil.write_all(fd, packfile.pack_header())
                fsutil.fsync_dir(index.dir)  # the names are durable before any entry is
            except BaseException as exc:
                os.close(fd)
                os.close(idx_fd)
                fsutil.unlink_quietly(f"{base}{packfile.PACK_SUFFIX}")
                fsutil.unlink_quietly(f"{base}{packfile.IDX_SUFFIX}")
                if isinstance(exc, OSError):
                    raise fsutil.storage_error(exc, "create pack in", index.dir) from None
                raise
            index.attach(name)
            return cls(index, name, fd, idx_fd, created=True)
        raise StorageError(f"cannot find a free pack name in {index.dir}")

    # --- writing -----------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes the pack holds or has reserved (the writer rolls over past the target)."""
        return self._end

    @property
    def pending(self) -> int:
        return len(self._pending)

    def append(self, digest: bytes, data: bytes | memoryview, xxh: int) -> None:
        """Write one verified blob (its sha256 is ``digest``); visible after ``commit``.

        Thread-safe. Raises ``StorageError``/``NoSpaceError``.
        """
        size = len(data)
        head = packfile.record_header(digest, size)
        with self._lock:
            if self._broken is not None:
                raise StorageError(self._broken)
            at = self._end
            self._end += packfile.RECORD.size + size
            if self._end - self._writeback >= WRITEBACK_BYTES:
                start, self._writeback = self._writeback, self._end
            else:
                start = -1
            # The header goes down with the reservation: a writer killed while
            # another thread's bytes were still to come leaves a record whose
            # size is known, so a salvage steps over it to the records after.
            try:
                os.pwrite(self._fd, head, at)
            except OSError as exc:
                raise fsutil.storage_error(exc, "write pack", self.index.dir / self.name) from None
        if _CRASH_AT == "pack-append":
            os.pwrite(self._fd, bytes(data[: size // 2]), at + packfile.RECORD.size)
            crash_point("pack-append")
        try:
            n = os.pwrite(self._fd, data, at + packfile.RECORD.size)
            if n != size:
                raise OSError(5, "short write")
        except OSError as exc:
            raise fsutil.storage_error(exc, "write pack", self.index.dir / self.name) from None
        if start >= 0:  # through this record (the next range starts after it)
            fsutil.start_writeback(self._fd, start, at + packfile.RECORD.size + size - start)
        entry = Entry(digest, at + packfile.RECORD.size, size, xxh)
        with self._lock:
            self._pending.append(entry)

    def append_many(self, blobs: Sequence[tuple[bytes, bytes | memoryview, int]]) -> list[Entry]:
        """``append`` each verified ``(digest, data, xxh)``, as one contiguous write.

        A batch of received chunks goes down in one ``pwritev`` under the lock:
        the kernel serialises writes to one file anyway, and one system call
        (and one wait for the interpreter lock) per batch instead of two per
        blob is what lets two landing threads keep up with the wire. Records
        are written whole, header first, so a kill mid-write leaves one torn
        record at the end, which a salvage drops. Visible after ``commit``.
        Returns where each record's bytes went. Raises ``StorageError``/``NoSpaceError``.
        """
        entries: list[Entry] = []
        iov: list[bytes | memoryview] = []
        with self._lock:
            if self._broken is not None:
                raise StorageError(self._broken)
            start = at = self._end
            for digest, data, xxh in blobs:
                iov += (packfile.record_header(digest, len(data)), data)
                entries.append(Entry(digest, at + packfile.RECORD.size, len(data), xxh))
                at += packfile.RECORD.size + len(data)
            try:
                if _CRASH_AT == "pack-append":
                    _torn_batch(self._fd, iov, start)
                _pwritev_all(self._fd, iov, start)
            except OSError as exc:
                # Nothing of it counts; the space is the next batch's (or a
                # salvage steps over what reached the file).
                raise fsutil.storage_error(exc, "write pack", self.index.dir / self.name) from None
            self._end = at
            if self._end - self._writeback >= WRITEBACK_BYTES:
                flush, self._writeback = self._writeback, self._end
            else:
                flush = -1
            self._pending.extend(entries)
        if flush >= 0:  # through this batch (the next range starts after it)
            fsutil.start_writeback(self._fd, flush, at - flush)
        return entries

    @property
    def fd(self) -> int:
        """The data file, open for reading and writing (gc punches holes through it)."""
        return self._fd

    def copy_records(self, src_fd: int, entries: list[Entry]) -> None:
        """Copy the records of ``entries`` (sorted by offset) from another pack, in the
        kernel (``copy_file_range``) one contiguous run at a time; visible after ``commit``.

        The bytes are not re-read: a repack moves them as they are, and the
        checksums that come with them still tell if they rotted. Raises
        ``StorageError``.
        """
        i = 0
        while i < len(entries):
            j = i + 1
            while j < len(entries) and entries[j].record_start == entries[j - 1].record_end:
                j += 1
            run = entries[i:j]
            src, length = run[0].record_start, run[-1].record_end - run[0].record_start
            with self._lock:
                if self._broken is not None:
                    raise StorageError(self._broken)
                at = self._end
                self._end += length
            try:
                _copy_range(src_fd, self._fd, src, at, length)
            except OSError as exc:
                raise fsutil.storage_error(
                    exc, "copy into pack", self.index.dir / self.name
                ) from None
            moved = [Entry(e.digest, e.offset - src + at, e.size, e.xxh) for e in run]
            with self._lock:
                self._pending.extend(moved)
            i = j

    def commit(self) -> list[bytes]:
        """Make every appended blob durable and part of the store; return their digests.

        Raises ``StorageError`` (``NoSpaceError``); then the blobs not committed
        are absent and this writer takes no more (open another).
        """
        with self._commit_lock:
            with self._lock:
                todo, self._pending = self._pending, []
                if self._broken is not None and todo:
                    raise StorageError(self._broken)
            if not todo:
                return []
            try:
                crash_point("pack-appended")
                os.fdatasync(self._fd)
                crash_point("pack-synced")
                blob = b"".join(packfile.encode_entry(e) for e in todo)
                n = os.pwrite(self._idx_fd, blob, self._idx_end)
                if n != len(blob):
                    raise OSError(28, "short write to the index")
                crash_point("pack-indexed")
                os.fdatasync(self._idx_fd)
            except OSError as exc:
                with self._lock:
                    self._broken = f"pack {self.name} failed earlier: {exc.strerror or exc}"
                with contextlib.suppress(OSError):
                    os.ftruncate(self._idx_fd, self._idx_end)
                raise fsutil.storage_error(exc, "commit pack", self.index.dir / self.name) from None
            self._idx_end += len(blob)
            self.committed_end = max(self.committed_end, *(e.record_end for e in todo))
            self.index.add(self.name, todo)
            return [e.digest for e in todo]

    def abort(self) -> None:
        """Forget what was appended since the last commit (no append may be running)."""
        with self._lock:
            self._pending = []
            self._end = self.committed_end
            self._writeback = min(self._writeback, self._end)
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self.committed_end)

    def salvage(self) -> list[bytes]:
        """Commit the intact records a dead writer left past the index; drop the rest.

        Each record is re-hashed against its digest: one that does not match
        (its bytes never fully written) is stepped over and stays dead space;
        the file is cut after the last record whose header is whole and whose
        bytes are all there. Returns the digests committed.
        """
        end = self._end
        if end <= self.committed_end:
            return []
        pos = self.committed_end
        try:
            for digest, offset, data in packfile.read_records(self._fd, pos, end):
                pos = offset + len(data)
                if ids.sha256(data) != digest:
                    continue
                # A copy of a blob already stored is indexed too (reads keep
                # using the first); otherwise this tail would be re-hashed at
                # every opening. gc drops the spare copy.
                self._pending.append(Entry(digest, offset, len(data), packfile.checksum(data)))
            os.ftruncate(self._fd, pos)
        except OSError as exc:
            raise fsutil.storage_error(exc, "salvage pack", self.index.dir / self.name) from None
        self._end = self._writeback = pos
        if not self._pending:
            self.committed_end = pos
            return []
        return self.commit()

    def close(self) -> None:
        """Release the pack (uncommitted appends stay for a later writer to salvage).

        A pack this writer made and never committed to is removed again.
        """
        if self._fd < 0:
            return
        empty = self._created and self.committed_end <= packfile.PACK_HEADER.size
        if empty and self._end <= packfile.PACK_HEADER.size:
            base = self.index.dir / self.name
            self.index.forget(self.name)
            fsutil.unlink_quietly(f"{base}{packfile.PACK_SUFFIX}")
            fsutil.unlink_quietly(f"{base}{packfile.IDX_SUFFIX}")
        os.close(self._idx_fd)
        os.close(self._fd)
        self._fd = self._idx_fd = -1


_IOV_MAX = 1024  # Linux's limit on the pieces of one pwritev


def _pwritev_all(fd: int, iov: list[bytes | memoryview], offset: int) -> None:
    """Write every piece of ``iov`` at ``offset`` on, retrying short writes.

    At most ``fsutil.WRITE_BYTES`` per system call: see there why.
    """
    views = [memoryview(p) for p in iov if len(p)]
    i = 0
    while i < len(views):
        group: list[memoryview] = []
        room = fsutil.WRITE_BYTES
        j = i
        while j < len(views) and room > 0 and len(group) < _IOV_MAX:
            piece = views[j][:room]
            group.append(piece)
            room -= len(piece)
            j += 1
        n = os.pwritev(fd, group, offset)
        if n <= 0:
            raise OSError(5, "short write")
        offset += n
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]


def _torn_batch(fd: int, iov: list[bytes | memoryview], offset: int) -> None:
    """Crash tests (``pack-append``): a kill inside the batch's write. Each record
    counts as one pass of the crash point, as an ``append`` does; at the one that
    fires, the records before it are written whole and it half, as a ``pwritev``
    cut off there leaves them, and the process dies."""
    for r in range(0, len(iov), 2):
        if _crash_skip[0] > 0:
            _crash_skip[0] -= 1
            continue
        data = memoryview(iov[r + 1])
        _pwritev_all(fd, [*iov[: r + 1], data[: len(data) // 2]], offset)
        crash_point("pack-append")
