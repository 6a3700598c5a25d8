"""The spool: blobs on their way into the store, from peers (fetch) or a medium (import).

Theory of operation
-------------------
Making each blob durable on its own (sync the file, rename, sync the
directory) caps a fetch at a few hundred chunks a second, and an import that
a bundle may still refuse must not touch the store until every blob checked
out. Both therefore go through one spool and one commit path:

1. ``put``/``put_batch``/``put_many`` (fetch) and ``copy``/``copy_batch``
   (import) check each blob against its sha256 (a mismatch raises
   ``HashMismatchError`` or is reported, and nothing of that blob is kept)
   and write it without flushing: a small blob is appended to a pack
   (``packs.PackWriter``: its record is not part of the store until its
   index entry is; a batch goes down in one write), a large one (over
   ``PACKED_MAX_BYTES``) goes to its own file in ``STATE/spool/``.
2. ``commit`` makes them durable and visible at once: one ``fdatasync`` of
   each pack, then its index entries (synced); an fsync of each large file,
   then its rename into ``blobs/sha256/`` and one sync of that directory.
   The fetch commits every ``COMMIT_SECONDS`` and before a release counts as
   complete; the import once, after the last blob.
3. ``discard`` (a refused bundle) forgets the uncommitted appends and removes
   the large files of this run: the store is as it was.

*Resume without a journal.* An import killed half-way (SIGKILL, power cut,
a stick pulled out) leaves records past a pack's index and large files in
``STATE/spool/``. ``resume`` re-hashes them: intact records are committed
(``packs.salvage_all``: they are verified blobs a verified manifest named),
intact files of blobs still needed are kept for this run's commit, and torn
ones are dropped and copied again. A fetch calls it at start too, so a
daemon killed mid-fetch keeps what it had received.

*Hashing off the event loop, on every core.* The fetch's landers (one per
core, ``HASH_THREADS``) each hand a batch of received chunks to
``put_batch`` in a worker thread; ``put_many`` splits a large batch over two
threads itself. hashlib and the pack writes release the GIL on large
buffers. ``copy``/``copy_batch`` are called from several import threads at
once. A single append reserves its place under the writer's lock and writes
outside it; a batch writes its records with ``pwritev`` under the lock
(the kernel serialises writes to one file anyway), so the threads meet at
the pack once per batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from p2pupd.daemon import fsutil
from p2pupd.daemon.errors import BundleError, DaemonError, StorageError
from p2pupd.daemon.store import members, packfile
from p2pupd.daemon.store.blobs import BLOB_MODE
from p2pupd.daemon.store.packfile import Entry
from p2pupd.daemon.store.packs import PackWriter, salvage_all
from p2pupd.daemon.store.packstore import PackStore
from p2pupd.protocol import ids, limits
from p2pupd.protocol.errors import HashMismatchError

HASH_THREADS = min(2, os.cpu_count() or 1)
PARALLEL_MIN_BYTES = 512 * limits.KiB  # smaller batches are hashed on one thread
READ_BYTES = 1 * limits.MiB
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_pool: list[ThreadPoolExecutor] = []  # made on first use: most processes never need it
_pool_lock = threading.Lock()


def _hash_pool() -> ThreadPoolExecutor:
    with _pool_lock:
        if not _pool:
            _pool.append(
                ThreadPoolExecutor(max(1, HASH_THREADS - 1), thread_name_prefix="p2pupd-hash")
            )
        return _pool[0]


# What became of one blob of ``put_many``: stored (True), bad bytes (False),
# or the store's own failure.
Landed = bool | DaemonError


class Spool:
    """Blobs checked and written, not yet committed (see the module docstring)."""

    def __init__(self, state_root: Path, store: PackStore) -> None:
        self.dir = state_root / "spool"
        self.store = store
        self._lock = threading.Lock()
        self._open_lock = threading.Lock()
        self._writers: list[PackWriter] = []
        self._appended: dict[bytes, int] = {}  # digest -> size, in a pack, not committed
        # Where put_batch's blobs lie until committed, so they can be served
        # at once (``read``): a swarm relays a blob the moment it landed.
        self._landed: dict[bytes, tuple[PackWriter, Entry]] = {}
        self._files: dict[bytes, int] = {}  # digest -> size, in STATE/spool, not committed
        self._dirfd: int | None = None

    # --- opening and resuming ----------------------------------------------------

    def open(self) -> None:
        """Create ``STATE/spool`` if needed; ``StorageError``/``StateLayoutError`` if unusable."""
        if self._dirfd is not None:
            return
        if not members.check(self.dir.parent, self.dir.name, members.DIR):
            try:
                self.dir.mkdir(mode=0o700)
            except FileExistsError:
                members.check(self.dir.parent, self.dir.name, members.DIR)
            except OSError as exc:
                raise fsutil.storage_error(exc, "create", self.dir) from None
        try:
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise fsutil.storage_error(exc, "open", self.dir) from None
        if os.fstat(fd).st_dev != os.stat(self.store.blob_dir).st_dev:
            os.close(fd)
            raise StorageError(f"{self.dir} and {self.store.blob_dir} are on different filesystems")
        self._dirfd = fd

    def resume(self, need: Mapping[bytes, int] | None = None) -> set[bytes]:
        """Keep what an interrupted run left (re-hashed); return the blobs of ``need`` it gave.

        Records past a pack's index are committed at once; large files of
        blobs in ``need`` are kept for this run's ``commit``, other files and
        names that are not digests are removed.
        """
        self.open()
        need = need or {}
        got = {d for d in salvage_all(self.store.index) if d in need}
        try:
            names = os.listdir(self._fd())
        except OSError as exc:
            raise fsutil.storage_error(exc, "list", self.dir) from None
        for name in names:
            digest = bytes.fromhex(name) if ids.HEX_RE.fullmatch(name) else None
            if digest is not None and digest in need and self._intact(name, digest, need[digest]):
                with self._lock:
                    self._files[digest] = need[digest]
                got.add(digest)
            elif digest is None or digest not in need:
                self._unlink(name)
        return got

    def _intact(self, name: str, digest: bytes, size: int) -> bool:
        actual, n = b"", -1
        with contextlib.suppress(StorageError):
            actual, n = fsutil.hash_file(self.dir / name)
        if actual == digest and n == size:
            return True
        self._unlink(name)
        return False

    def _fd(self) -> int:
        self.open()
        assert self._dirfd is not None
        return self._dirfd

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=self._fd())

    # --- writing -------------------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        with self._lock:
            return sum(self._appended.values()) + sum(self._files.values())

    def _writer(self) -> PackWriter:
        with self._open_lock:  # threads that find no pack with room open one, not one each
            with self._lock:
                if self._writers and self._writers[-1].size < packfile.PACK_TARGET_BYTES:
                    return self._writers[-1]
            w = PackWriter.open(self.store.index)
            with self._lock:
                self._writers.append(w)
            return w

    def _claim(self, digest: bytes, size: int) -> bool:
        """Whether this blob still needs writing (not stored, not spooled already)."""
        if digest in self.store.index:
            return False
        with self._lock:
            if digest in self._appended or digest in self._files:
                return False
            self._appended[digest] = size
        return True

    def put(self, data: bytes, digest: bytes) -> None:
        """Spool ``data`` as blob ``digest`` after checking its hash (not yet durable).

        Raises ``HashMismatchError`` (nothing written) or ``StorageError``.
        """
        if ids.sha256(data) != digest:
            raise HashMismatchError(f"blob does not match its sha256 {digest.hex()[:16]}…")
        if len(data) > packfile.PACKED_MAX_BYTES:
            self._put_file(data, digest)
            return
        if not self._claim(digest, len(data)):
            return
        try:
            self._writer().append(digest, data, packfile.checksum(data))
        except BaseException:
            with self._lock:
                self._appended.pop(digest, None)
            raise

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> list[Landed]:
        """``put`` each ``(digest, data)``; return what became of each, in order.

        A large batch is hashed and written on ``HASH_THREADS`` threads.
        """
        total = sum(len(data) for _, data in items)
        if HASH_THREADS < 2 or len(items) < 2 or total < PARALLEL_MIN_BYTES:
            return self.put_batch(items)
        half, k = 0, 0
        while k < len(items) - 1 and half < total // 2:
            half += len(items[k][1])
            k += 1
        other = _hash_pool().submit(self.put_batch, items[:k])
        mine = self.put_batch(items[k:])
        return other.result() + mine

    def put_batch(self, items: Sequence[tuple[bytes, bytes | memoryview]]) -> list[Landed]:
        """``put_many`` on this thread alone: each blob hash-checked, then the packed
        ones appended with one write (``PackWriter.append_many``)."""
        out: list[Landed] = []
        packed: list[tuple[bytes, bytes | memoryview, int]] = []
        at: list[int] = []  # where each packed blob's outcome goes in ``out``
        for digest, data in items:
            if hashlib.sha256(data).digest() != digest:
                out.append(False)
                continue
            try:
                if len(data) > packfile.PACKED_MAX_BYTES:
                    self._put_file(bytes(data), digest)
                elif self._claim(digest, len(data)):
                    packed.append((digest, data, packfile.checksum(data)))
                    at.append(len(out))
            except DaemonError as exc:
                out.append(exc)
                continue
            out.append(True)
        if packed:
            try:
                writer = self._writer()
                entries = writer.append_many(packed)
            except DaemonError as exc:
                with self._lock:
                    for digest, _, _ in packed:
                        self._appended.pop(digest, None)
                for i in at:
                    out[i] = exc
            else:
                with self._lock:
                    for e in entries:
                        if e.digest in self._appended:  # not committed meanwhile
                            self._landed[e.digest] = (writer, e)
        return out

    def read(self, digest: bytes, max_bytes: int) -> bytes | None:
        """A blob ``put_batch`` wrote and no commit has taken yet, or None.

        Its sha256 was checked when it landed; its checksum is checked again
        here, as the store does. Not durable yet: serving it is safe (every
        receiver checks what it gets), keeping it is the commit's business.
        """
        with self._lock:
            hit = self._landed.get(digest)
        if hit is None or hit[1].size > max_bytes:
            return None
        writer, e = hit
        try:
            data = os.pread(writer.fd, e.size, e.offset)
        except OSError:  # the writer failed and was closed meanwhile
            return None
        if len(data) != e.size or packfile.checksum(data) != e.xxh:
            return None
        return data

    def _put_file(self, data: bytes, digest: bytes) -> None:
        name = digest.hex()
        with self._lock:
            if digest in self._files:
                return
        if self.store.has(digest):
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self._fd())
            fd = os.open(name, _CREATE, BLOB_MODE, dir_fd=self._fd())
            try:
                fsutil.write_all(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            self._unlink(name)
            raise fsutil.storage_error(exc, "write", self.dir / name) from None
        with self._lock:
            self._files[digest] = len(data)

    def copy(
        self, src_fd: int, digest: bytes, size: int, progress: Callable[[int], None] | None = None
    ) -> int:
        """Copy exactly ``size`` bytes from ``src_fd`` into the blob ``digest``; return ``size``.

        Raises ``HashMismatchError`` if the bytes do not match (or the source
        grows or shrinks), ``BundleError`` if the source cannot be read and
        ``StorageError``/``NoSpaceError`` for our own writes; nothing of the
        blob is kept in any of these cases.
        """
        if size > packfile.PACKED_MAX_BYTES:
            return self._copy_file(src_fd, digest, size, progress)
        data = _read_exactly(src_fd, digest, size)
        try:
            self.put(data, digest)
        except HashMismatchError:
            raise HashMismatchError(_mismatch(digest.hex(), size, size)) from None
        if progress is not None:
            progress(size)
        return size

    def copy_batch(
        self,
        sources: Sequence[tuple[int, bytes, int]],
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """``copy`` several small blobs: each ``(src_fd, digest, size)`` (``size`` at
        most ``PACKED_MAX_BYTES``) is read whole, then the batch is hash-checked
        and appended with one write (``put_batch``). Returns the bytes copied.

        Raises as ``copy`` does for the first blob that fails; nothing of that
        blob is kept (the ones before it in the batch may be spooled).
        """
        items = [(digest, _read_exactly(fd, digest, size)) for fd, digest, size in sources]
        for (digest, data), outcome in zip(items, self.put_batch(items), strict=True):
            if outcome is False:
                raise HashMismatchError(_mismatch(digest.hex(), len(data), len(data)))
            if isinstance(outcome, DaemonError):
                raise outcome
        if progress is not None:
            for _, data in items:
                progress(len(data))
        return sum(len(data) for _, data in items)

    def _copy_file(
        self, src_fd: int, digest: bytes, size: int, progress: Callable[[int], None] | None
    ) -> int:
        """Stream a large blob into its own spool file, hashing as it goes."""
        name = digest.hex()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self._fd())  # a torn leftover
        try:
            out = os.open(name, _CREATE, BLOB_MODE, dir_fd=self._fd())
        except OSError as exc:
            raise fsutil.storage_error(exc, "create", self.dir / name) from None
        h = hashlib.sha256()
        got = 0
        try:
            try:
                while block := _read(src_fd, min(READ_BYTES, size + 1 - got), name):
                    got += len(block)
                    if got > size:
                        break
                    h.update(block)
                    try:
                        fsutil.write_all(out, block)
                    except OSError as exc:
                        raise fsutil.storage_error(exc, "write", self.dir / name) from None
                    if progress is not None:
                        progress(len(block))
                if got == size:
                    fsutil.start_writeback(out)
            finally:
                os.close(out)
            if got != size or h.digest() != digest:
                raise HashMismatchError(_mismatch(name, got, size))
        except BaseException:
            self._unlink(name)
            raise
        with self._lock:
            self._files[digest] = size
        return size

    # --- committing ------------------------------------------------------------------

    def commit(self) -> list[bytes]:
        """Make every spooled blob durable and part of the store; return their digests.

        Raises ``StorageError``; blobs not committed stay spooled (files) or
        are absent (pack appends of a writer that failed) for a later run.
        """
        with self._lock:
            writers = list(self._writers)
            files = dict(self._files)
        done: list[bytes] = []
        try:
            for w in writers:
                done += w.commit()
        except DaemonError:
            # That writer lost what it had not committed: those blobs are absent
            # and may be spooled again, into another pack.
            with self._lock:
                self._appended.clear()
                self._landed.clear()
                self._writers = [x for x in self._writers if x not in writers]
            for w in writers:
                w.close()
            raise
        finally:
            with self._lock:
                for d in done:
                    self._appended.pop(d, None)
                    self._landed.pop(d, None)
        if files:
            done += self._commit_files(files)
        self._retire()
        return done

    def _commit_files(self, files: dict[bytes, int]) -> list[bytes]:
        dirfd = self._fd()
        for d in files:  # large and few: one fsync each
            try:
                fd = os.open(d.hex(), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise fsutil.storage_error(exc, "sync", self.dir / d.hex()) from None
        moved: list[bytes] = []
        try:
            for d in files:
                try:
                    os.rename(d.hex(), self.store.path(d), src_dir_fd=dirfd)
                except FileNotFoundError:
                    if not self.store.has(d):
                        raise StorageError(f"spooled blob {d.hex()[:16]} vanished") from None
                except OSError as exc:
                    raise fsutil.storage_error(exc, "store blob", self.store.path(d)) from None
                moved.append(d)
        finally:
            with self._lock:
                for d in moved:
                    self._files.pop(d, None)
            if moved:
                fsutil.fsync_dir(self.store.blob_dir)
        return moved

    def _retire(self) -> None:
        """Close full writers with nothing pending (the pack is done)."""
        with self._lock:
            done = [w for w in self._writers[:-1] if not w.pending]
            self._writers = [w for w in self._writers if w not in done]
        for w in done:
            w.close()

    def discard(self) -> None:
        """Forget every blob spooled and not committed (a refused bundle's). No append
        may be running. Never raises."""
        with self._lock:
            writers, files = list(self._writers), list(self._files)
            self._appended.clear()
            self._landed.clear()
            self._files.clear()
        for w in writers:
            w.abort()
        if self._dirfd is not None:
            for d in files:
                self._unlink(d.hex())

    def close(self, clear: bool = False) -> None:
        """Release the packs (uncommitted appends stay for a later ``resume``);
        with ``clear``, also remove what is left in ``STATE/spool``. The
        directory goes when it is empty."""
        with self._lock:
            writers, self._writers = self._writers, []
            self._landed.clear()
        for w in writers:
            w.close()
        if clear and self._dirfd is not None:
            members.clear_fd(self._dirfd, self.dir)
        if self._dirfd is not None:
            os.close(self._dirfd)
            self._dirfd = None
        with contextlib.suppress(OSError):
            self.dir.rmdir()  # gone when empty: a finished import leaves nothing


def _mismatch(name: str, got: int, size: int) -> str:
    return f"bundle blob {name[:16]} does not match its sha256" + (
        "" if got == size else f" (read {got} bytes, expected {size})"
    )


def _read(fd: int, n: int, name: str) -> bytes:
    try:
        return os.read(fd, n)
    except OSError as exc:
        raise BundleError(f"cannot read bundle blob {name[:16]}: {exc.strerror or exc}") from None


def _read_exactly(fd: int, digest: bytes, size: int) -> bytes:
    """Read a small blob whole: exactly ``size`` bytes, then the end of the source."""
    name = digest.hex()
    parts: list[bytes] = []
    got = 0
    while block := _read(fd, size + 1 - got, name):
        parts.append(block)
        got += len(block)
        if got > size:
            break
    if got != size:
        raise HashMismatchError(_mismatch(name, got, size))
    return parts[0] if len(parts) == 1 else b"".join(parts)
