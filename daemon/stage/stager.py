"""Staging: build a release's tree beside its target, verified, before any swap.

Theory of operation: the stage directory is created fresh by us (any leftover
from a crashed run is removed first) — or is a dropped version recycled in
place (recycle.py) — on the target's filesystem, so the swap is one rename.
Entries are created in a safe order — directories, then files, then symlinks
last — and the manifest check guarantees no entry lies beneath a file or
symlink, so no write can be redirected by a link. Each file comes from the
cheapest source that can be proven right (build.py): a trusted file on disk
(reflink, hard link for immutable components, else copy), a patch of the live
file at its path, a delta, or the store's chunks.

Free space is checked first (``NoSpaceError`` before anything is written);
directory modes and mtimes are set last, since adding children changes a
directory's mtime (a directory already right is not written to), and each
finished directory's identity is reported for the stat cache (statcache.Shape).
Nothing is fsynced per file: one ``syncfs`` at the end makes the whole stage
durable before the caller journals it (stagefs.py). A failure raises and the
caller discards the stage.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from p2pupd.daemon.errors import StorageError
from p2pupd.daemon.fsutil import ensure_free, fsync_dir, storage_error
from p2pupd.daemon.stage.build import (
    DeltaBuilder,
    FileBuilder,
    StageReport,
    verify_reusable,
    write_file_from_chunks,
)
from p2pupd.daemon.stage.recycle import Kept, Recycled, prepare_tree, wanted_dirs
from p2pupd.daemon.stage.rewrite import PatchPlan, patch_in_place
from p2pupd.daemon.stage.stagefs import (
    Owners,
    ReflinkState,
    lchown_quietly,
    reflink_supported,
    remove_tree,
    set_fd_meta,
    syncfs,
)
from p2pupd.daemon.stage.statcache import Source, StatKey, dir_key, stat_key
from p2pupd.daemon.store.blobs import BlobStore
from p2pupd.protocol.deltaplan import Holdings, plan_release
from p2pupd.protocol.manifest import FileEntry, Manifest

__all__ = [
    "FREE_MARGIN_BYTES",
    "DeltaBuilder",
    "StageReport",
    "missing_blobs",
    "plan_bytes",
    "remove_tree",
    "stage_file",
    "stage_tree",
    "write_file_from_chunks",
]

FREE_MARGIN_BYTES = 16 * 1024 * 1024


def plan_bytes(
    man: Manifest, reusable: Mapping[bytes, object], store: BlobStore, *, clone_free: bool = True
) -> int:
    """Return how many bytes staging may write: new files, plus reused ones when copied."""
    return sum(f.size for f in man.files if not clone_free or f.sha256 not in reusable)


def missing_blobs(
    man: Manifest,
    reusable: Mapping[bytes, Path],
    store: BlobStore,
    held: Iterable[Manifest] = (),
) -> set[bytes]:
    """Return the blobs (chunks or patches) still needed for files that cannot be reused.

    Each file is costed by its cheapest path (``protocol.deltaplan``): with
    ``held`` (the manifests of the versions on disk) a delta-only bundle is
    enough; without it only stored chunks and patches count.
    """
    held_now = Holdings.of(held, files=reusable.keys())
    holdings = Holdings(held_now.files | frozenset(reusable), held_now.chunks)
    need: set[bytes] = set()
    for plan in plan_release(man, holdings, store.has).values():
        need.update(plan.blobs)
    return need


def stage_tree(
    man: Manifest,
    stage: Path,
    store: BlobStore,
    reusable: Mapping[bytes, Path],
    *,
    allow_hardlink: bool = False,
    delta_builder: DeltaBuilder | None = None,
    sources: Mapping[bytes, Source] | None = None,
    patches: Mapping[str, PatchPlan] | None = None,
    live_root: Path | None = None,
    reflink: bool | None = None,
    recycled: Recycled | None = None,
    rest: Sequence[FileEntry] | None = None,
) -> StageReport:
    """Build ``man``'s tree at ``stage`` (which must not exist). See module doc.

    ``reusable`` maps a file sha256 to a path on disk holding those bytes
    (from an installed or kept version); ``sources`` are the ones the stat
    cache already trusts (without it every reused file is re-hashed).
    ``patches`` maps a path to a plan for building it from a base file and
    ``live_root`` is the live version, whose owners staged entries inherit;
    ``reflink`` says whether FICLONE works there (probed when ``None``).
    With ``recycled``, ``stage`` exists and holds that dropped version, which
    is reshaped in place (recycle.py); ``rest`` may give the files of ``man``
    planning did not find kept there (they are found again otherwise).
    Raises ``HashMismatchError``, ``NoSpaceError``, ``StorageError`` or
    ``NotFoundError``; the caller removes the stage on failure.
    """
    report = StageReport()
    if sources is None:
        sources = verify_reusable(man, reusable)
    clones = ReflinkState(reflink_supported(stage.parent) if reflink is None else reflink)
    clone_free = bool(clones.supported) or allow_hardlink
    dirs = wanted_dirs(man, recycled)
    kept = prepare_tree(recycled, man, stage, dirs) if recycled is not None else Kept()
    if kept.rekeys:
        sources = _follow(sources, kept.rekeys)
        report.rekeys.extend(kept.rekeys)
    if rest is not None and recycled is not None and kept.files is recycled.keep:
        todo = list(rest)  # every file planning kept is still there
    elif kept.files:
        todo = [f for f in man.files if f.path not in kept.files]
    else:
        todo = list(man.files)
    need = sum(f.size for f in todo if not clone_free or f.sha256 not in sources)
    ensure_free(stage.parent, need, FREE_MARGIN_BYTES)
    owners = Owners(live_root)
    dir_paths = sorted(dirs, key=lambda p: p.count("/"))
    try:
        stage.mkdir(mode=0o700, exist_ok=recycled is not None)
        for rel in dir_paths:
            if rel not in kept.dirs:
                (stage / rel).mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, "create stage directory", stage) from None

    builder = FileBuilder(
        store, sources, patches or {}, delta_builder, allow_hardlink, owners, clones, report
    )
    root = str(stage)
    stale = recycled.stale if recycled is not None else {}
    for f in builder.keep_in_place(kept.files, stale, root) + todo:
        builder.build(f, f"{root}/{f.path}")
    builder.record_links()

    try:
        for s in man.symlinks:
            if s.path in kept.links:
                continue
            os.symlink(s.target, stage / s.path)
            lchown_quietly(stage / s.path, owners.for_file(s.path))
        modes = {d.path: (d.mode, d.mtime) for d in man.dirs}
        for rel in sorted(dir_paths, key=lambda p: -p.count("/")):
            mode, mtime = modes.get(rel, (0o755, man.created))
            # Complete now: its identity from here on vouches for its entries.
            report.dirs[rel] = dir_key(_finish_dir(stage / rel, mode, mtime, owners.for_dir(rel)))
        live = _lstat(live_root)
        lchown_quietly(stage, owners.for_dir(""))
        os.chmod(stage, stat.S_IMODE(live.st_mode) if live else 0o755)
    except OSError as exc:
        raise storage_error(exc, "finish stage", stage) from None
    syncfs(stage)
    fsync_dir(stage.parent)
    return report


def stage_file(
    man: Manifest,
    dst: Path,
    store: BlobStore,
    reusable: Mapping[bytes, Path],
    *,
    delta_builder: DeltaBuilder | None = None,
    sources: Mapping[bytes, Source] | None = None,
    patches: Mapping[str, PatchPlan] | None = None,
    live_root: Path | None = None,
    reflink: bool | None = None,
    recycled: Recycled | None = None,
) -> StageReport:
    """Build the single file of ``man`` at ``dst`` (a file target). Like ``stage_tree``.

    With ``recycled``, ``dst`` holds that dropped version's image, patched in
    place when possible (recycle.py), else replaced.
    """
    report = StageReport()
    if sources is None:
        sources = verify_reusable(man, reusable)
    clones = ReflinkState(reflink_supported(dst.parent) if reflink is None else reflink)
    f = man.files[0]
    plan = (patches or {}).get(f.path)
    if recycled is not None:
        if _patch_recycled(f, recycled, dst, store, plan, report, live_root):
            syncfs(dst.parent)
            fsync_dir(dst.parent)
            return report
        remove_tree(dst)
    need = 0 if (clones.supported and f.sha256 in sources) else f.size
    if plan is not None and clones.supported:
        need = f.size - plan.kept
    ensure_free(dst.parent, need, FREE_MARGIN_BYTES)
    owners = Owners(live_root, single_file=True)
    builder = FileBuilder(
        store, sources, patches or {}, delta_builder, False, owners, clones, report
    )
    builder.build(f, str(dst))
    syncfs(dst.parent)
    fsync_dir(dst.parent)
    return report


def _patch_recycled(
    f: FileEntry,
    rec: Recycled,
    dst: Path,
    store: BlobStore,
    plan: PatchPlan | None,
    report: StageReport,
    live_root: Path | None,
) -> bool:
    """Patch the recycled image at ``dst`` into ``f`` in place; False if it cannot be."""
    files = rec.load().files
    old = files[0] if len(files) == 1 else None
    st = None if old is None else rec.cache.trusted(rec.serial, old.path, dst, old.sha256)
    if old is None or st is None:
        return False
    done = patch_in_place(f, old, st, str(dst), store, plan.base if plan else None)
    if done is None:
        return False
    fd, written = done
    owner = Owners(live_root, single_file=True).for_file(f.path)
    try:
        report.records[f.path] = (*stat_key(set_fd_meta(fd, f.mode, f.mtime, owner)), f.sha256)
    except OSError as exc:
        raise storage_error(exc, "set owner, mode and mtime of", dst) from None
    finally:
        os.close(fd)
    report.files += 1
    report.from_base += 1
    report.bytes_written += written
    report.count("patch-in-place")
    return True


def _follow(
    sources: Mapping[bytes, Source], rekeys: list[tuple[StatKey, StatKey]]
) -> dict[bytes, Source]:
    """``sources`` with the new ``lstat`` of those whose identity changed as ``rekeys``
    says (a hard link to them was removed); one whose identity differs from
    that is dropped (its content is then built another way)."""
    moved = dict(rekeys)
    out = dict(sources)
    for sha, src in sources.items():
        new = moved.get(src.key)
        if new is None:
            continue
        st = _lstat(Path(src.path))
        if st is not None and stat_key(st) == new:
            out[sha] = Source(src.path, st, src.entry)
        else:
            del out[sha]
    return out


def _lstat(path: Path | None) -> os.stat_result | None:
    if path is None:
        return None
    try:
        return os.lstat(path)
    except OSError:
        return None


def _finish_dir(path: Path, mode: int, mtime: int, owner: tuple[int, int] | None) -> os.stat_result:
    """Give a staged directory its owner, mode and mtime; return its final ``lstat``.

    What is already right is left alone: a directory of a recycled stage that
    nothing changed is not even written to (no inode made dirty for the sync).
    """
    st = os.lstat(path)
    if owner is not None and (st.st_uid, st.st_gid) != owner:
        lchown_quietly(path, owner)
    elif stat.S_IMODE(st.st_mode) == mode and st.st_mtime_ns == mtime * 1_000_000_000:
        return st
    _set_meta(path, mode, mtime)
    return os.lstat(path)


def _set_meta(path: Path, mode: int, mtime: int) -> None:
    try:
        os.chmod(path, mode, follow_symlinks=False)
        os.utime(path, (mtime, mtime), follow_symlinks=False)
    except OSError as exc:
        raise StorageError(f"cannot set mode/mtime of {path}: {exc.strerror}") from None
