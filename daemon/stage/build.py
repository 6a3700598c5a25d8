"""Making one staged file from the cheapest source that can be proven right.

Theory of operation: ``FileBuilder.build`` is called once per file of a
release, in a stage directory stage.py made. In order of preference the file
is: *reused* — a file with the same sha256 that the stat cache trusts, hard-
linked (immutable components, when mode, mtime and owner already agree),
reflinked, or copied in the kernel; *patched* — a large changed file cloned
from the live file at its path with only the differing chunks rewritten
(patch.py); rebuilt from a *delta* (delta.py); or concatenated from *chunks*.
``keep_in_place`` accounts for the files left in place in a recycled stage
(recycle.py), fixing the mode and mtime of those that need it.

What is written is hash-checked as it is written (chunks and deltas whole,
patches chunk by chunk); a cloned file is checked by identity: the source's
``fstat`` while open must still be the one the stat cache trusted. Nothing is
fsynced here: the stage is made durable by one ``syncfs`` (stagefs.py).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from p2pupd.daemon.fsutil import hash_file, storage_error
from p2pupd.daemon.stage.rewrite import PatchPlan, build_from_base
from p2pupd.daemon.stage.stagefs import (
    Owners,
    ReflinkState,
    clone_data,
    hardlink,
    remove_tree,
    set_fd_meta,
)
from p2pupd.daemon.stage.statcache import DirKey, Entry, Source, StatKey, stat_key
from p2pupd.daemon.store.blobs import BlobStore
from p2pupd.protocol.errors import HashMismatchError
from p2pupd.protocol.manifest import FileEntry, Manifest

# A builder returns the bytes source for a file from deltas (see delta.py); it
# writes into the open fd and returns nothing, or returns False if it cannot.
DeltaBuilder = Callable[[FileEntry, int], bool]


@dataclass
class StageReport:
    files: int = 0
    reused: int = 0
    from_chunks: int = 0
    from_delta: int = 0
    from_base: int = 0
    bytes_written: int = 0
    methods: dict[str, int] = field(default_factory=dict)
    # For the stat cache: the records of the files made or fixed (identities
    # from fstat), and the paths of those a recycled stage kept unchanged.
    records: dict[str, Entry] = field(default_factory=dict)
    kept: Collection[str] = ()
    rekeys: list[tuple[StatKey, StatKey]] = field(default_factory=list)  # ctimes we changed
    dirs: dict[str, DirKey] = field(default_factory=dict)  # identities of the finished dirs

    def count(self, how: str) -> None:
        self.methods[how] = self.methods.get(how, 0) + 1


def write_file_from_chunks(f: FileEntry, fd: int, store: BlobStore) -> None:
    """Write ``f``'s chunks from the store into ``fd``, checking its sha256."""
    h = hashlib.sha256()
    for c in f.chunks:
        data = store.get_bytes(c.digest, verify=False)
        h.update(data)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    if h.digest() != f.sha256:
        raise HashMismatchError(f"rebuilt {f.path} does not match its sha256 in the manifest")


def verify_reusable(man: Manifest, reusable: Mapping[bytes, Path]) -> dict[bytes, Source]:
    """Hash each reusable file ``man`` needs; return those that hold the right bytes.

    The slow path, for callers without a stat cache: it reads every reused file.
    """
    out: dict[bytes, Source] = {}
    for f in man.files:
        p = reusable.get(f.sha256)
        if p is None or f.sha256 in out:
            continue
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and hash_file(p)[0] == f.sha256:
            out[f.sha256] = Source(str(p), st, f)
    return out


class FileBuilder:
    """Makes one staged file from the cheapest proven source (see module doc)."""

    def __init__(
        self,
        store: BlobStore,
        sources: Mapping[bytes, Source],
        patches: Mapping[str, PatchPlan],
        delta_builder: DeltaBuilder | None,
        allow_hardlink: bool,
        owners: Owners,
        reflink: ReflinkState,
        report: StageReport,
    ) -> None:
        self.store = store
        self.sources = sources
        self.patches = patches
        self.delta_builder = delta_builder
        self.allow_hardlink = allow_hardlink
        self.owners = owners
        self.reflink = reflink
        self.report = report
        self.linked: list[tuple[FileEntry, str]] = []

    def build(self, f: FileEntry, dst: str) -> None:
        self.report.files += 1
        src = self.sources.get(f.sha256)
        if src is not None:
            self._reuse(f, src, dst)
            return
        plan = self.patches.get(f.path)
        if plan is not None:
            how, fd, written = build_from_base(plan, f, dst, self.store, self.reflink)
            self._finish(f, fd, dst, self.owners.for_file(f.path))
            self.report.from_base += 1
            self.report.bytes_written += written
            self.report.count(f"patch-{how}")
            return
        try:
            fd = os.open(
                dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise storage_error(exc, "create", dst) from None
        try:
            if self.delta_builder is not None and self.delta_builder(f, fd):
                self.report.from_delta += 1
            else:
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)
                write_file_from_chunks(f, fd, self.store)
                self.report.from_chunks += 1
        except OSError as exc:
            os.close(fd)
            raise storage_error(exc, "write", dst) from None
        except BaseException:
            os.close(fd)
            raise
        self.report.bytes_written += f.size
        self._finish(f, fd, dst, self.owners.for_file(f.path))

    def keep_in_place(
        self,
        kept: Collection[str],
        stale: Mapping[str, tuple[FileEntry, os.stat_result]],
        root: str,
    ) -> list[FileEntry]:
        """Account for the files a recycled stage at ``root`` keeps in place; fix those of
        them in ``stale`` (mode or mtime differs: with the ``lstat`` that trusted
        each). Returns the ones that could not stay after all, for ``build``.

        The usual update changes no metadata: then this is a count, not a loop
        over every file of the tree.
        """
        rebuild: list[FileEntry] = []
        fixed = 0
        for rel, (f, st) in stale.items():
            if rel not in kept:
                continue  # not kept: the caller builds it anyway
            fixed += 1
            if not self.keep(f, f"{root}/{rel}", st):
                rebuild.append(f)
        n = len(kept) - fixed
        self.report.kept = kept if not fixed else [r for r in kept if r not in stale]
        if n:
            self.report.files += n
            self.report.reused += n
            self.report.methods["kept"] = self.report.methods.get("kept", 0) + n
        return rebuild

    def keep(self, f: FileEntry, dst: str, st: os.stat_result) -> bool:
        """Keep the recycled file at ``dst`` (trusted, same content); fix mode and mtime.

        Returns False, with ``dst`` removed, when its metadata differs and
        another name shares its inode (then ``build`` must make a new one).
        """
        if stat.S_IMODE(st.st_mode) == f.mode and st.st_mtime_ns == f.mtime * 1_000_000_000:
            self.report.records[f.path] = (*stat_key(st), f.sha256)
        elif st.st_nlink == 1:
            try:
                fd = os.open(dst, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                raise storage_error(exc, "open", dst) from None
            if stat_key(os.fstat(fd)) != stat_key(st):
                os.close(fd)
                raise HashMismatchError(f"{dst} changed while it was being staged")
            self._finish(f, fd, dst, None)
        else:
            try:
                os.unlink(dst)
            except OSError as exc:
                raise storage_error(exc, "remove", dst) from None
            return False
        self.report.files += 1
        self.report.reused += 1
        self.report.count("kept")
        return True

    def _reuse(self, f: FileEntry, src: Source, dst: str) -> None:
        st = src.st
        # The live file at the same path keeps its owner without another lstat.
        same = self.owners.live_path(f.path) == src.path
        owner = (st.st_uid, st.st_gid) if same or not self.owners.enabled else None
        if owner is None:
            owner = self.owners.for_file(f.path)
        # A hard link shares mode, mtime and owner with the other version, so
        # only link when they already agree.
        if (
            self.allow_hardlink
            and stat.S_IMODE(st.st_mode) == f.mode
            and st.st_mtime_ns == f.mtime * 1_000_000_000
            and owner == (st.st_uid, st.st_gid)
            and hardlink(src.path, dst)
        ):
            self.linked.append((f, dst))
            self.report.reused += 1
            self.report.count("hardlink")
            return
        how, fd, sst = clone_data(src.path, dst, self.reflink)
        if stat_key(sst) != src.key:
            os.close(fd)
            remove_tree(Path(dst))
            raise HashMismatchError(f"{src.path} changed while {f.path} was being staged")
        self._finish(f, fd, dst, owner if self.owners.enabled else None)
        self.report.reused += 1
        if how == "copy":
            self.report.bytes_written += f.size
        self.report.count(how)

    def _finish(self, f: FileEntry, fd: int, dst: str, owner: tuple[int, int] | None) -> None:
        try:
            key = stat_key(set_fd_meta(fd, f.mode, f.mtime, owner))
            self.report.records[f.path] = (*key, f.sha256)
        except OSError as exc:
            raise storage_error(exc, "set owner, mode and mtime of", dst) from None
        finally:
            os.close(fd)

    def record_links(self) -> None:
        """Take the identities of hard-linked files once all links exist (links change ctime)."""
        for f, dst in self.linked:
            try:
                self.report.records[f.path] = (*stat_key(os.lstat(dst)), f.sha256)
            except OSError as exc:
                raise storage_error(exc, "stat", dst) from None
