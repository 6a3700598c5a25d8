"""Publishing: a source tree becomes a signed release in the repository.

tree -> walk (lstat only, hostile names refused) -> chunks into the repo's blob
store -> deltas against the previous N releases of the same component and
platform (N = ``--delta-depth``, default the repository's setting, 2; see
delta.py) -> manifest with serial = previous + 1 -> signed by the release keys
-> written atomically.

Variants: publishing the newest release's version again with another
``--platform`` adds a variant to that release (same serial, its own signed
manifest); see ``next_serial`` for what is refused. Any other re-use of a
version label is refused unless ``--force``.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from p2pupd.daemon.api import BlobStore
from p2pupd.protocol import chunking, ids
from p2pupd.protocol.errors import RevokedKeyError, UnsafePathError
from p2pupd.protocol.manifest import (
    ChunkRef,
    DirEntry,
    FileEntry,
    HookRef,
    Manifest,
    SymlinkEntry,
    sort_entries,
)
from p2pupd.protocol.patchcodec import PATCH_FORMATS
from p2pupd.protocol.rollout.policy import RolloutPolicy
from p2pupd.protocol.trust import RELEASE_TYPE, Envelope, sign
from p2pupd.tools.publisher.deltas import DeltaMaker
from p2pupd.tools.publisher.repo import Repo, RepoError

CHUNK_WORKERS = 2


@dataclass(frozen=True)
class Tree:
    files: list[tuple[str, Path, os.stat_result]]
    symlinks: list[SymlinkEntry]
    dirs: list[DirEntry]


def walk_tree(src: Path) -> Tree:
    """Return the entries of ``src`` without following symlinks.

    Raises ``UnsafePathError`` for a name that is not safe (control characters,
    backslash, undecodable bytes) and ``RepoError`` for special files.
    """
    try:
        if not stat.S_ISDIR(os.lstat(src).st_mode):
            raise RepoError(f"{src} is not a directory")
    except OSError as exc:
        raise RepoError(f"cannot read {src}: {exc.strerror}") from None
    files: list[tuple[str, Path, os.stat_result]] = []
    symlinks: list[SymlinkEntry] = []
    dirs: list[DirEntry] = []

    def visit(d: Path, rel: str) -> None:
        try:
            names = sorted(os.listdir(d))
        except OSError as exc:
            raise RepoError(f"cannot list {d}: {exc.strerror}") from None
        for name in names:
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise UnsafePathError(
                    f"name under {rel or '.'} is not valid UTF-8: {name!r:.80}"
                ) from None
            r = ids.check_relpath(f"{rel}/{name}" if rel else name)
            p = d / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                symlinks.append(SymlinkEntry(r, ids.check_symlink_target(os.readlink(p))))
            elif stat.S_ISDIR(st.st_mode):
                dirs.append(DirEntry(r, stat.S_IMODE(st.st_mode), int(st.st_mtime)))
                visit(p, r)
            elif stat.S_ISREG(st.st_mode):
                files.append((r, p, st))
            else:
                raise RepoError(f"{p}: special files (devices, fifos, sockets) cannot be published")

    visit(src, "")
    return Tree(files, symlinks, dirs)


def chunk_file(path: Path, store: BlobStore) -> tuple[bytes, int, tuple[ChunkRef, ...]]:
    """Cut ``path`` into chunks stored in ``store``; return (sha256, size, chunks)."""
    h = hashlib.sha256()
    refs: list[ChunkRef] = []
    size = 0
    try:
        with open(path, "rb") as f:
            for _off, data in chunking.cut_stream(f):
                b = bytes(data)
                h.update(b)
                size += len(b)
                refs.append(ChunkRef(store.put_bytes(b), len(b)))
    except OSError as exc:
        raise RepoError(f"cannot read {path}: {exc.strerror}") from None
    return h.digest(), size, tuple(refs)


def build_manifest(
    repo: Repo,
    component: str,
    version: str,
    src: Path,
    now: int,
    *,
    expires: int | None = None,
    platform: str | None = None,
    hooks: dict[str, Path] | None = None,
    progress: Callable[[str], None] | None = None,
    delta_depth: int | None = None,
    delta_workers: int | None = None,
    force: bool = False,
    rollout: RolloutPolicy | None = None,
    patch_format: int | None = None,
) -> Manifest:
    """Return the (unsigned) manifest for ``src`` as the next serial of ``component``.

    ``delta_depth`` (default: the repository's setting) is how many previous
    releases get deltas; 0 publishes chunks only. ``force`` allows a version
    label already published (``next_serial``). ``rollout`` is how the release
    spreads through a site (protocol/rollout; None: everywhere at once).
    ``patch_format`` (default: the repository's setting) limits the deltas to
    what nodes of that patch format apply (protocol/patchcodec.py). Raises
    ``RepoError``, ``UnsafePathError``.
    """
    ids.check_component(component)
    ids.check_version_label(version)
    if platform is not None:
        ids.check_platform(platform)
    serial = next_serial(repo, component, version, platform, force)  # refuse before any work
    tree = walk_tree(src)
    store = repo.store
    depth = repo.settings().delta_depth if delta_depth is None else delta_depth
    if depth < 0:
        raise RepoError(f"delta depth must be 0 or more, got {depth}")
    previous = previous_releases(repo, component, platform, depth)
    hook_refs: dict[str, HookRef] = {}
    for point, hp in (hooks or {}).items():
        try:
            data = hp.read_bytes()
        except OSError as exc:
            raise RepoError(f"cannot read hook {hp}: {exc.strerror}") from None
        hook_refs[point] = HookRef(store.put_bytes(data), len(data))
    files: list[FileEntry] = []

    def chunked() -> Iterator[FileEntry]:
        # Largest first, each handed to the delta maker as soon as it is
        # stored: the longest diff starts while the rest of the tree is cut.
        # Two files at a time: storing a chunk waits on fsync, which releases
        # the GIL, so the other thread cuts and hashes meanwhile.
        order = sorted(tree.files, key=lambda item: -item[2].st_size)
        with ThreadPoolExecutor(CHUNK_WORKERS, thread_name_prefix="chunk") as pool:
            cut = pool.map(lambda item: chunk_file(item[1], store), order)
            for (rel, _path, st), (digest, size, refs) in zip(order, cut, strict=True):
                if progress:
                    progress(rel)
                mode, mtime = stat.S_IMODE(st.st_mode), int(st.st_mtime)
                files.append(FileEntry(rel, mode, size, digest, mtime, refs))
                yield files[-1]

    fmt = repo.settings().patch_format if patch_format is None else patch_format
    if fmt not in PATCH_FORMATS:
        raise RepoError(f"patch format {fmt} is not one of {', '.join(map(str, PATCH_FORMATS))}")
    maker = DeltaMaker(store, previous, delta_workers, progress, patch_format=fmt)
    deltas = maker.compute(chunked(), {rel for rel, _path, _st in tree.files})
    f, s, d = sort_entries(files, tree.symlinks, tree.dirs)
    return Manifest(
        component=component,
        version=version,
        serial=serial,
        created=now,
        files=f,
        symlinks=s,
        dirs=d,
        expires=expires,
        platform=platform,
        hooks=hook_refs,
        deltas=deltas,
        rollout=rollout,
    )


def previous_releases(
    repo: Repo, component: str, platform: str | None, depth: int
) -> list[Manifest]:
    """Return up to ``depth`` newest releases of ``component`` for ``platform``, newest first.

    Each is verified with the repository's root chain, like any release a node
    holds; one signed by a key a root revokes is skipped: nodes refuse it, so a
    delta from it would be useless.
    """
    out: list[Manifest] = []
    for serial in reversed(repo.serials(component)):
        if len(out) >= depth:
            break
        if platform in repo.platforms(component, serial):
            try:
                out.append(repo.release(component, serial, platform)[0])
            except RevokedKeyError:
                continue
    return out


def next_serial(
    repo: Repo,
    component: str,
    version: str | None = None,
    platform: str | None = None,
    force: bool = False,
) -> int:
    """Serial for a new release of ``version`` for ``platform`` (``None``: universal).

    The newest serial plus one, except that a platform variant of the newest
    release's version joins that release (same serial). Raises ``RepoError``
    when that would mix a universal release and variants under one serial,
    when the newest release already has a variant for ``platform``, and --
    unless ``force`` -- when ``version`` already labels a release: operators,
    ``apply --version`` and ``export --from-version`` name releases by label,
    and two releases under one label are two things by one name.
    """
    serials = repo.serials(component)
    if not serials:
        return 1
    newest = serials[-1]
    held = repo.platforms(component, newest)
    try:
        man = repo.release(component, newest, held[0])[0]
    except RevokedKeyError:
        return newest + 1  # signed by a revoked key: a new serial replaces it
    if version is not None and version == man.version:
        if platform is None and None in held:  # a universal tree again under its label
            if not force:
                raise _label_used(component, version, newest)
            return newest + 1
        if platform is None or None in held:
            kind = "universal" if None in held else "variants for " + ", ".join(map(str, held))
            raise RepoError(
                f"{component} {version} (serial {newest}) is already published ({kind}); "
                "a serial is either universal or per-platform: publish it with --platform for "
                "every variant, or as a new version"
            )
        if platform in held:
            raise RepoError(f"{component} {version} already has a variant for {platform}")
        return newest  # a variant joins the newest release
    if version is not None and not force:
        used = next((s for s in reversed(serials) if repo.label(component, s) == version), None)
        if used is not None:
            raise _label_used(component, version, used)
    return newest + 1


def _label_used(component: str, version: str, serial: int) -> RepoError:
    return RepoError(
        f"{component} {version} is already published (serial {serial}); publish the new build "
        "under a new version, or use --force for a second release with the same label "
        "(a new serial)"
    )


def sign_and_write(repo: Repo, man: Manifest, key_paths: list[Path] | None = None) -> Envelope:
    """Sign ``man`` with the release keys and write it; return the envelope.

    The envelope is verified with the node's own rules before it is written,
    so the repository never holds a release nodes would refuse.
    """
    env = sign(RELEASE_TYPE, man.encode(), repo.release_signers(key_paths))
    repo.trusted().verify_release(env.encode(), None, man.component)
    repo.write_release(man, env)
    return env
