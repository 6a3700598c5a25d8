"""Planning an apply: what on disk can be trusted, reused, recycled or patched.

Theory of operation. Before a transaction begins, the planner looks at the
versions on disk (the live one first, then the kept ones) and decides, for
the release to apply, without changing anything:

* which files the stat cache (statcache.py) trusts to hold contents the
  release needs — the reuse sources — and which live files were modified
  locally;
* which large changed files can be patched from their live predecessor
  (patch.py);
* which kept version this commit would drop anyway, to be recycled as the
  stage (recycle.py), and whether a kept version is intact enough to be
  switched back in without staging;
* whether everything the release needs is on disk or in the store: if not,
  it refuses with a clear error before anything is touched.
"""

from __future__ import annotations

import functools
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from p2pupd.daemon.apply.targets import Target, lstat_or_none, target_for
from p2pupd.daemon.errors import NotFoundError, StorageError
from p2pupd.daemon.fsutil import hash_file
from p2pupd.daemon.stage.delta import DeltaBuilder
from p2pupd.daemon.stage.recycle import Recycled, trusted_in
from p2pupd.daemon.stage.rewrite import PATCH_MIN_BYTES, PatchPlan, plan_patch
from p2pupd.daemon.stage.stager import missing_blobs
from p2pupd.daemon.stage.statcache import (
    Entry,
    Reuse,
    Source,
    StatCache,
    Version,
    find_sources,
    stat_key,
)
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.state.statedir import ComponentConfig, ComponentState
from p2pupd.protocol.errors import RevokedKeyError
from p2pupd.protocol.manifest import FileEntry, Manifest


def kept_path(cfg: ComponentConfig, serial: int) -> Path:
    """Where a kept (not live) version of ``cfg`` lives beside its target."""
    return target_for(cfg).version_path(serial)


def reusable_files(node: Node, cfg: ComponentConfig, st: ComponentState) -> dict[bytes, Path]:
    """Map file sha256 -> a path on disk said to hold it, from live and kept versions.

    Not verified (a file may have been edited locally): whoever reads one must
    hash-check what it reads. The live version wins over kept ones.
    """
    target = target_for(cfg)
    out: dict[bytes, Path] = {}
    serials = list(st.kept)[::-1] + ([st.installed] if st.installed is not None else [])
    for s in serials:
        try:
            man = node.manifest(cfg.name, s)
        except (NotFoundError, StorageError, RevokedKeyError):  # revoked: never a source
            continue
        root = target.version_root(s, st.installed)
        for f in man.files:
            out[f.sha256] = target.file_in(root, f.path)
    return out


class PathMap(Mapping[bytes, Path]):
    """sha256 -> path, kept as strings: a ``Path`` is made only for what is looked up."""

    def __init__(self) -> None:
        self.paths: dict[bytes, str] = {}

    def __getitem__(self, key: bytes) -> Path:
        return Path(self.paths[key])

    def __contains__(self, key: object) -> bool:
        return key in self.paths

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class StagePlan:
    """What ``Planner.plan`` decided; ``held`` and ``reusable`` (all files on disk, for
    deltas) are computed on first use, since most applies never need them."""

    reuse: Reuse
    patches: dict[str, PatchPlan]
    live_root: Path | None
    versions: list[Version]
    cache: StatCache
    file_at: Callable[[str, str], str]
    man: Manifest
    # The files the stage must make: all but those a recycled stage keeps in place.
    rest: list[FileEntry] = field(default_factory=list)
    _full: tuple[list[Manifest], PathMap] | None = None

    @property
    def sources(self) -> PathMap:
        """The trusted files by sha256 (what the stage reuses)."""
        out = PathMap()
        out.paths.update({sha: s.path for sha, s in self.reuse.sources.items()})
        return out

    def held(self) -> tuple[list[Manifest], PathMap]:
        """Manifests of the versions on disk, and every file on them by sha256.

        Every file may serve a delta as its base (delta.py checks what it
        reads); contents this release needs count only where trusted
        (untrusted copies of them never count).
        Raises ``NotFoundError``/``StorageError`` if a manifest cannot be read.
        """
        if self._full is None:
            needed = {f.sha256 for f in self.man.files}
            mans = [v.man() for v in self.versions]
            reusable = PathMap()
            for v in reversed(self.versions):
                at = str(v.root)
                for rel, sha in v.files(self.cache):
                    if sha not in needed:
                        reusable.paths[sha] = self.file_at(at, rel)
            reusable.paths.update(self.sources.paths)
            self._full = (mans, reusable)
        return self._full


class Planner:
    """Plans applies of one node's components (reads only; see module doc)."""

    def __init__(self, node: Node, manifest: Callable[[str, int], Manifest]) -> None:
        self.node = node
        self.manifest = manifest

    def recyclable(
        self,
        cfg: ComponentConfig,
        target: Target,
        cache: StatCache,
        st: ComponentState,
        to: int,
        man: Manifest,
    ) -> Recycled | None:
        """The kept version this commit would drop, to reshape into the stage (recycle.py).

        For a tree, the files it can keep are found (and trusted) now.
        """
        after = ([st.installed] if st.installed is not None else []) + [
            s for s in st.kept if s != to
        ]
        for s in reversed(after[cfg.retain :]):
            if s == st.installed or lstat_or_none(target.version_path(s)) is None:
                continue
            rec = Recycled(s, cache, functools.partial(self.manifest, cfg.name, s))
            if target.kind != "file":
                trusted_in(rec, man, target.version_path(s))
            return rec
        return None

    def in_place(
        self, cfg: ComponentConfig, target: Target, cache: StatCache, serial: int, man: Manifest
    ) -> Recycled:
        """A kept version no longer intact, to be reshaped where it is into release ``man``
        (its own): what the stat cache still trusts stays, the rest is rebuilt."""
        rec = Recycled(serial, cache, functools.partial(self.manifest, cfg.name, serial))
        if target.kind != "file":
            trusted_in(rec, man, target.version_path(serial))
        return rec

    def intact(self, cache: StatCache, target: Target, man: Manifest, root: Path) -> bool:
        """Whether a kept version still matches its manifest, by the stat cache (no reading).

        A version the cache has no records of (its file was lost in a power
        cut: it is not fsynced) is read and hashed instead, and recorded
        again if it matches: a lost cache costs a re-hash, never the version.
        """
        if lstat_or_none(root) is None:
            return False
        at = str(root)
        if man.files and not cache.entries(man.serial):
            return _rehash_version(cache, target, man, at)
        for f in man.files:
            if cache.trusted(man.serial, f.path, target.file_at(at, f.path), f.sha256) is None:
                return False
        return True

    def versions(
        self, cfg: ComponentConfig, target: Target, st: ComponentState, exclude: int | None = None
    ) -> list[Version]:
        """The versions on disk whose files may be reused: live first, then kept, newest
        first; not ``exclude`` (the version reshaped into the stage: its files move)."""
        out = []
        serials = ([st.installed] if st.installed is not None else []) + list(st.kept)
        for s in serials:
            if s == exclude:
                continue
            root = target.version_root(s, st.installed)
            if lstat_or_none(root) is not None and self.node.releases.has(cfg.name, s):
                load = functools.partial(self.manifest, cfg.name, s)
                out.append(Version(s, root, s == st.installed, load))
        return out

    def plan(
        self,
        cfg: ComponentConfig,
        target: Target,
        cache: StatCache,
        man: Manifest,
        st: ComponentState,
        rec: Recycled | None = None,
    ) -> StagePlan:
        """Find trusted sources and patch bases; refuse if some content is nowhere.

        Files the recycled version ``rec`` keeps in place need no source; no
        other file of it is a source (it is reshaped while the stage is built).
        Raises ``NotFoundError`` naming the missing count and any locally
        modified live files that made it so.
        """
        versions = self.versions(cfg, target, st, rec.serial if rec is not None else None)
        kept = rec.keep if rec is not None else {}
        if rec is not None and rec.rest is not None:
            rest = rec.rest  # found while trusting what it keeps
        else:
            rest = [f for f in man.files if f.path not in kept] if kept else list(man.files)
        reuse = find_sources(rest, versions, cache, target.file_at)
        live = versions[0] if versions and versions[0].live else None
        patches = self.patches(target, cache, rest, live, reuse) if live else {}
        plan = StagePlan(
            reuse, patches, live.root if live else None, versions, cache, target.file_at, man,
            rest,
        )  # fmt: skip
        # First the cheap question: is everything to build stored? Only if not,
        # ask the delta planner, reading the other versions' manifests: their
        # files may hold chunks, or be the bases of deltas, that a minimal
        # bundle did not carry.
        has = self.node.store.has
        need: set[bytes] = set()
        for f in rest:
            if f.sha256 in reuse.sources or f.path in patches:
                continue
            if not all(has(c.digest) for c in f.chunks):
                need = missing_blobs(man, plan.held()[1], self.node.store, plan.held()[0])
                break
        need |= {h.sha256 for h in man.hooks.values() if not self.node.store.has(h.sha256)}
        if need:
            why = ""
            if reuse.modified:
                shown = ", ".join(reuse.modified[:3]) + (", ..." if len(reuse.modified) > 3 else "")
                why = f"; {len(reuse.modified)} live file(s) were modified locally ({shown})"
            raise NotFoundError(
                f"{len(need)} blob(s) of {cfg.name} {man.version} are not stored here{why}; "
                "import the release again"
            )
        return plan

    def patches(
        self,
        target: Target,
        cache: StatCache,
        files: list[FileEntry],
        live: Version,
        reuse: Reuse,
    ) -> dict[str, PatchPlan]:
        """Plans for those big ``files`` whose live predecessor is trusted (see patch.py)."""
        out: dict[str, PatchPlan] = {}
        big = [f for f in files if f.sha256 not in reuse.sources and f.size >= PATCH_MIN_BYTES]
        if not big:
            return out  # the live manifest is not even read
        old = live.man().file_map()
        first = live.man().files[0] if live.man().files else None
        for f in big:
            base = first if target.kind == "file" else old.get(f.path)
            if base is None or base.size < PATCH_MIN_BYTES:
                continue
            path = target.file_at(str(live.root), base.path)
            bst = cache.trusted(live.serial, base.path, path, base.sha256)
            if bst is None:
                continue
            plan = plan_patch(f, Source(path, bst, base), self.node.store.has)
            if plan is not None:
                out[f.path] = plan
        return out

    def delta_builder(self, man: Manifest, plan: StagePlan) -> DeltaBuilder | None:
        """A delta builder, only if some file to build has chunks the store lacks.

        With every chunk stored, a file's cheapest path is its chunks, so the
        builder (whose set-up indexes every file held on disk) is not needed.
        """
        has = self.node.store.has
        for f in plan.rest:
            if f.sha256 in plan.reuse.sources or f.path in plan.patches:
                continue
            if not all(has(c.digest) for c in f.chunks):
                held, reusable = plan.held()
                return DeltaBuilder(man, held, reusable, self.node.store)
        return None


def _rehash_version(cache: StatCache, target: Target, man: Manifest, root: str) -> bool:
    """Whether every file of ``man`` at ``root`` has its size, mode and sha256; if so,
    record them in ``cache`` (the caller saves it)."""
    records: dict[str, Entry] = {}
    for f in man.files:
        path = target.file_at(root, f.path)
        st = lstat_or_none(Path(path))
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != f.size:
            return False
        if stat.S_IMODE(st.st_mode) != f.mode:
            return False
        try:
            sha, _ = hash_file(path)
        except StorageError:
            return False
        now = lstat_or_none(Path(path))
        if sha != f.sha256 or now is None or stat_key(now) != stat_key(st):
            return False  # different bytes, or changed while it was read
        records[f.path] = (*stat_key(st), sha)
    cache.replace_version(man.serial, records)
    return True
