"""Where blobs received from peers land before a batched, durable move into the store.

Theory of operation. ``BlobStore.put_bytes`` makes each blob durable on its
own: fsync the file, rename, fsync the directory -- two disk flushes per
64 KiB chunk, which caps a network fetch at a few hundred chunks a second.
A fetch instead:

1. ``put``: checks the bytes against their digest (a mismatch raises
   ``HashMismatchError`` and nothing is written), then writes them to
   ``STATE/fetching/<hex>`` without flushing;
2. ``commit`` (every ``fetch.COMMIT_SECONDS`` or so, and before a release is
   declared complete): flushes the whole filesystem once (``syncfs``), renames
   every landed blob into ``blobs/sha256/`` and fsyncs that directory once.

So the store's rule holds -- a blob's name never survives a power cut its
bytes did not -- at one flush per batch. Until committed, a blob is neither
in the store nor announced to peers. Files left here by a crash may be torn,
so ``clear`` removes them at start-up and the fetch simply asks again (the
import's ``incoming`` area, by contrast, re-verifies: a USB stick may be gone).
This is a separate directory from ``incoming`` so a concurrent import and
fetch never touch each other's files.

The fetch calls ``put`` on the event loop, for the chunks that arrived since
its last turn: hashing and writing a 64 KiB chunk into the page cache costs
less than handing it to a thread and back (``trio.to_thread`` per chunk), and
a long-lived worker thread loses more to GIL hand-offs (the hash and each
file call release and retake the GIL) than it gains while both cores are busy
(measured with two daemons on two cores). ``commit`` runs in a worker thread
meanwhile: a lock guards the pending list, and a blob already pending or
stored is not written again, so a late duplicate never truncates a file that
``commit`` is moving into the store.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from p2pupd.daemon import fsutil
from p2pupd.daemon.errors import StorageError
from p2pupd.daemon.store import members
from p2pupd.daemon.store.blobs import BLOB_MODE, BlobStore
from p2pupd.protocol import ids
from p2pupd.protocol.errors import HashMismatchError

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


class Landing:
    """See the module docstring."""

    def __init__(self, state_root: Path, store: BlobStore) -> None:
        self.dir = state_root / "fetching"
        self.store = store
        self._lock = threading.Lock()
        self._pending: dict[bytes, int] = {}  # digest -> size, written but not committed
        # Prefixes for plain string joins: put and commit run per blob.
        self._dir, self._blob_dir = f"{self.dir}{os.sep}", f"{store.blob_dir}{os.sep}"

    def clear(self) -> None:
        """Remove whatever an earlier run left (possibly torn); create the directory.

        Raises ``StateLayoutError`` if ``fetching`` is a link or not a
        directory (nothing is deleted through it), ``StorageError`` otherwise.
        """
        if members.check(self.dir.parent, self.dir.name, members.DIR):
            members.clear(self.dir.parent, self.dir.name)
        else:
            try:
                self.dir.mkdir(mode=0o700)
            except OSError as exc:
                raise fsutil.storage_error(exc, "create", self.dir) from None
        if os.stat(self.dir).st_dev != os.stat(self.store.blob_dir).st_dev:
            raise StorageError(f"{self.dir} and {self.store.blob_dir} are on different filesystems")

    @property
    def pending_bytes(self) -> int:
        with self._lock:
            return sum(self._pending.values())

    def put(self, data: bytes, digest: bytes) -> None:
        """Land ``data`` as blob ``digest`` after checking its hash (not yet durable).

        Raises ``HashMismatchError`` (nothing written) or ``StorageError``.
        """
        if ids.sha256(data) != digest:
            raise HashMismatchError(f"blob does not match its sha256 {digest.hex()[:16]}…")
        name = digest.hex()
        with self._lock:
            if digest in self._pending:
                return  # landed already (a duplicate answer): same bytes, nothing to do
        if os.path.exists(self._blob_dir + name):
            return
        path = self._dir + name
        try:
            fd = os.open(path, _CREATE, BLOB_MODE)
            try:
                fsutil.write_all(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            fsutil.unlink_quietly(path)
            raise fsutil.storage_error(exc, "write", path) from None
        with self._lock:
            self._pending[digest] = len(data)

    def commit(self) -> list[bytes]:
        """Make every landed blob durable and move it into the store; returns their digests.

        Raises ``StorageError``; blobs not moved stay pending for the next commit.
        """
        with self._lock:
            todo = list(self._pending)
        if not todo:
            return []
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fsutil.syncfs_fd(fd, self.dir)
        finally:
            os.close(fd)
        done: list[bytes] = []
        try:
            for digest in todo:
                name = digest.hex()
                dest = self._blob_dir + name
                try:
                    os.rename(self._dir + name, dest)
                except FileNotFoundError:
                    if not self.store.has(digest):
                        raise StorageError(f"landed blob {name[:16]} vanished") from None
                except OSError as exc:
                    raise fsutil.storage_error(exc, "store", dest) from None
                done.append(digest)
        finally:
            with self._lock:
                for digest in done:
                    self._pending.pop(digest, None)
            if done:
                fsutil.fsync_dir(self.store.blob_dir)
        return done
