"""Staging: build a release's tree beside its target, verified, before any swap.

Theory of operation: the stage directory is created fresh by us (any leftover
from a crashed run is removed first), on the target's filesystem so the swap is
one rename. Entries are created in a safe order — directories, then files, then
symlinks last — and the manifest check guarantees no entry lies beneath a file
or symlink, so no write can be redirected by a link. Each file comes from the
cheapest source that can be proven right:

1. *reuse*: a file with the same sha256 in a version already on disk (cloned:
   reflink, or hard link for immutable components, else copy),
2. *delta*: rebuilt from a base the node holds plus a patch blob (delta.py),
3. *chunks*: concatenated from the blob store.

Every file's sha256 is computed as it is written (or checked after cloning) and
compared with the manifest before the stage counts as complete; a mismatch
raises ``HashMismatchError`` and the caller discards the stage. Directory modes
and mtimes are set last, since adding children changes a directory's mtime.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from p2pupd.protocol.errors import HashMismatchError
from p2pupd.protocol.manifest import FileEntry, Manifest

from .errors import StorageError
from .fsutil import clone_file, ensure_free, fsync_dir, hash_file, storage_error
from .store import BlobStore

FREE_MARGIN_BYTES = 16 * 1024 * 1024

# A builder returns the bytes source for a file from deltas (see delta.py); it
# writes into the open fd and returns nothing, or returns False if it cannot.
DeltaBuilder = Callable[[FileEntry, int], bool]


@dataclass
class StageReport:
    files: int = 0
    reused: int = 0
    from_chunks: int = 0
    from_delta: int = 0
    bytes_written: int = 0
    methods: dict[str, int] = field(default_factory=dict)


def remove_tree(path: Path) -> None:
    """Remove ``path`` (file, link or tree) if it exists; ``StorageError`` otherwise."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
    except OSError as exc:
        raise storage_error(exc, "remove", path) from None


def plan_bytes(man: Manifest, reusable: Mapping[bytes, Path], store: BlobStore) -> int:
    """Return how many bytes staging must write (files not reusable by clone)."""
    return sum(f.size for f in man.files if f.sha256 not in reusable)


def missing_blobs(man: Manifest, reusable: Mapping[bytes, Path], store: BlobStore) -> set[bytes]:
    """Return the chunk digests needed for files that cannot be reused."""
    need: set[bytes] = set()
    for f in man.files:
        if f.sha256 in reusable:
            continue
        need.update(c.digest for c in f.chunks if not store.has(c.digest))
    return need


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


def stage_tree(
    man: Manifest,
    stage: Path,
    store: BlobStore,
    reusable: Mapping[bytes, Path],
    *,
    allow_hardlink: bool = False,
    delta_builder: DeltaBuilder | None = None,
) -> StageReport:
    """Build ``man``'s tree at ``stage`` (which must not exist). See module doc.

    ``reusable`` maps a file sha256 to a path on disk holding those bytes
    (from an installed or kept version). Raises ``HashMismatchError``,
    ``NoSpaceError``, ``StorageError`` or ``NotFoundError``; the caller removes
    the stage on failure.
    """
    report = StageReport()
    ensure_free(stage.parent, plan_bytes(man, reusable, store), FREE_MARGIN_BYTES)
    try:
        stage.mkdir(mode=0o700)
        dir_paths = sorted(
            {d.path for d in man.dirs} | _implicit_dirs(man), key=lambda p: p.count("/")
        )
        for rel in dir_paths:
            (stage / rel).mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, "create stage directory", stage) from None

    for f in man.files:
        dst = stage / f.path
        report.files += 1
        src = reusable.get(f.sha256)
        if src is not None:
            # A hard link shares mode and mtime with the kept version, so only
            # link when they already agree.
            link_ok = allow_hardlink and _meta_matches(src, f.mode, f.mtime)
            how = clone_file(src, dst, allow_hardlink=link_ok)
            if how != "hardlink":
                digest, size = hash_file(dst)
                if digest != f.sha256 or size != f.size:
                    raise HashMismatchError(f"installed copy of {f.path} was modified locally")
                _set_meta(dst, f.mode, f.mtime)
            report.reused += 1
            report.methods[how] = report.methods.get(how, 0) + 1
            continue
        try:
            fd = os.open(
                dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise storage_error(exc, "create", dst) from None
        try:
            if delta_builder is not None and delta_builder(f, fd):
                report.from_delta += 1
            else:
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)
                write_file_from_chunks(f, fd, store)
                report.from_chunks += 1
            os.fsync(fd)
        except OSError as exc:
            raise storage_error(exc, "write", dst) from None
        finally:
            os.close(fd)
        report.bytes_written += f.size
        _set_meta(dst, f.mode, f.mtime)

    try:
        for s in man.symlinks:
            os.symlink(s.target, stage / s.path)
        modes = {d.path: (d.mode, d.mtime) for d in man.dirs}
        for rel in sorted(dir_paths, key=lambda p: -p.count("/")):
            mode, mtime = modes.get(rel, (0o755, man.created))
            _set_meta(stage / rel, mode, mtime)
            fsync_dir(stage / rel)
        os.chmod(stage, 0o755)
        fsync_dir(stage)
        fsync_dir(stage.parent)
    except OSError as exc:
        raise storage_error(exc, "finish stage", stage) from None
    return report


def _implicit_dirs(man: Manifest) -> set[str]:
    out: set[str] = set()
    for p in (
        [f.path for f in man.files] + [s.path for s in man.symlinks] + [d.path for d in man.dirs]
    ):
        parts = p.split("/")
        for i in range(1, len(parts)):
            out.add("/".join(parts[:i]))
    return out


def _set_meta(path: Path, mode: int, mtime: int) -> None:
    try:
        os.chmod(path, mode, follow_symlinks=False)
        os.utime(path, (mtime, mtime), follow_symlinks=False)
    except OSError as exc:
        raise StorageError(f"cannot set mode/mtime of {path}: {exc.strerror}") from None


def _meta_matches(path: Path, mode: int, mtime: int) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (st.st_mode & 0o7777) == mode and int(st.st_mtime) == mtime
