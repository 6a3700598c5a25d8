"""Rebuild a large changed file from the version on disk: clone it, rewrite what changed.

Theory of operation. A file's manifest entry lists its content-defined chunks.
When the live version holds a file at the same path (or, for a file target, the
live image) that the stat cache trusts, the new file is made by cloning that
*base* (FICLONE: no data copied; else an in-kernel copy) and writing over it
only the chunks that differ at their offset: from the store, or from elsewhere
in the base when a chunk moved. Everything not rewritten was, at the same
offset, a chunk with the same digest in a file we trusted, so the result is
right by construction; each rewritten chunk is hash-checked before it is
written. On a reflink filesystem the cost is the changed bytes only.

A chunk that is neither in the store nor in the base makes the plan
infeasible; the caller then uses deltas or chunks as usual.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

from p2pupd.daemon.fsutil import storage_error
from p2pupd.daemon.stage.recycle import write_lease
from p2pupd.daemon.stage.stagefs import ReflinkState, StrPath, clone_data
from p2pupd.daemon.stage.statcache import Source, stat_key
from p2pupd.daemon.store.blobs import BlobStore
from p2pupd.protocol.errors import HashMismatchError
from p2pupd.protocol.limits import MiB
from p2pupd.protocol.manifest import ChunkRef, FileEntry

PATCH_MIN_BYTES = 1 * MiB
"""Below this a file is simply rebuilt from its chunks."""


@dataclass(frozen=True)
class PatchPlan:
    """How to turn ``base`` into a file: keep ``kept`` bytes, write the listed chunks."""

    base: Source
    kept: int
    from_store: tuple[tuple[int, ChunkRef], ...]
    from_base: tuple[tuple[int, ChunkRef, int], ...]  # (offset, chunk, offset in base)

    @property
    def needs_base_chunks(self) -> set[bytes]:
        return {c.digest for _, c, _ in self.from_base}


def plan_patch(f: FileEntry, base: Source, has: Callable[[bytes], bool]) -> PatchPlan | None:
    """Return a plan building ``f`` from ``base``, or ``None`` if not feasible or not worth it.

    Worth it: at least half of ``f`` is kept in place, or some chunk is only
    available in the base (then it is the only way short of a delta).
    """
    if f.size < PATCH_MIN_BYTES:
        return None
    at: dict[int, bytes] = {}
    anywhere: dict[bytes, int] = {}
    off = 0
    for c in base.entry.chunks:
        at[off] = c.digest
        anywhere.setdefault(c.digest, off)
        off += c.size
    kept = 0
    from_store: list[tuple[int, ChunkRef]] = []
    from_base: list[tuple[int, ChunkRef, int]] = []
    off = 0
    for c in f.chunks:
        if at.get(off) == c.digest:
            kept += c.size
        elif has(c.digest):
            from_store.append((off, c))
        elif c.digest in anywhere:
            from_base.append((off, c, anywhere[c.digest]))
        else:
            return None
        off += c.size
    if kept * 2 < f.size and not from_base:
        return None
    return PatchPlan(base, kept, tuple(from_store), tuple(from_base))


def build_from_base(
    plan: PatchPlan, f: FileEntry, dst: StrPath, store: BlobStore, reflink: ReflinkState
) -> tuple[str, int, int]:
    """Create ``dst`` per ``plan``; return ``(clone method, open fd, bytes written)``.

    The caller sets metadata on and closes the fd. Raises ``HashMismatchError``
    if the base changed since it was trusted or a chunk is wrong,
    ``StorageError``/``NoSpaceError`` on I/O errors, ``NotFoundError`` for a
    missing blob; ``dst`` is removed on failure.
    """
    how, fd, base_st = clone_data(plan.base.path, dst, reflink)
    try:
        if stat_key(base_st) != plan.base.key:
            raise HashMismatchError(f"{plan.base.path} changed while {f.path} was being staged")
        written = 0
        try:
            os.ftruncate(fd, f.size)
            for off, c in plan.from_store:
                written += _pwrite(fd, store.get_bytes(c.digest), off)
            if plan.from_base:
                bfd = os.open(plan.base.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    for off, c, boff in plan.from_base:
                        data = os.pread(bfd, c.size, boff)
                        if hashlib.sha256(data).digest() != c.digest:
                            raise HashMismatchError(f"{plan.base.path} changed while staging")
                        written += _pwrite(fd, data, off)
                finally:
                    os.close(bfd)
        except OSError as exc:
            raise storage_error(exc, "write", dst) from None
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(dst)
        raise
    return how, fd, written


def _pwrite(fd: int, data: bytes, off: int) -> int:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        view, off = view[n:], off + n
    return len(data)


def patch_in_place(
    f: FileEntry,
    old: FileEntry,
    old_st: os.stat_result,
    path: str,
    store: BlobStore,
    live: Source | None,
) -> tuple[int, int] | None:
    """Rewrite the recycled file ``path`` (trusted to hold ``old``) into ``f``, in place.

    Only the chunks that differ at their offset are written: from the store,
    else from the live file ``live``. Returns ``(open fd, bytes written)`` —
    the caller sets metadata and closes — or ``None``, with the file
    untouched, when some chunk is nowhere, the file changed since it was
    trusted, has another link, or is open elsewhere (no write lease). Raises
    ``HashMismatchError``, ``StorageError``/``NoSpaceError``; the file is then
    half-rewritten and the caller discards the stage.
    """
    at: dict[int, bytes] = {}
    off = 0
    for c in old.chunks:
        at[off] = c.digest
        off += c.size
    elsewhere: dict[bytes, int] = {}
    if live is not None:
        off = 0
        for c in live.entry.chunks:
            elsewhere.setdefault(c.digest, off)
            off += c.size
    steps: list[tuple[int, ChunkRef, int | None]] = []
    off = 0
    for c in f.chunks:
        if at.get(off) != c.digest:
            if store.has(c.digest):
                steps.append((off, c, None))
            elif c.digest in elsewhere:
                steps.append((off, c, elsewhere[c.digest]))
            else:
                return None
        off += c.size
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if stat_key(st) != stat_key(old_st) or st.st_nlink != 1:
            os.close(fd)
            return None
        with write_lease(fd) as granted:
            if not granted:
                os.close(fd)
                return None
            written = _rewrite(fd, steps, store, live, path)
            os.ftruncate(fd, f.size)
    except OSError as exc:
        os.close(fd)
        raise storage_error(exc, "patch", path) from None
    except BaseException:
        os.close(fd)
        raise
    return fd, written


def _rewrite(
    fd: int,
    steps: list[tuple[int, ChunkRef, int | None]],
    store: BlobStore,
    live: Source | None,
    path: str,
) -> int:
    written = 0
    lfd = -1
    try:
        for off, c, live_off in steps:
            if live_off is None:
                data = store.get_bytes(c.digest)
            else:
                assert live is not None
                if lfd < 0:
                    lfd = os.open(live.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                data = os.pread(lfd, c.size, live_off)
                if hashlib.sha256(data).digest() != c.digest:
                    raise HashMismatchError(f"{live.path} changed while {path} was patched")
            written += _pwrite(fd, data, off)
    finally:
        if lfd >= 0:
            os.close(lfd)
    return written
