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

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from p2pupd.protocol.manifest import Manifest

from .delta import DeltaBuilder
from .errors import NotFoundError, StorageError
from .node import ComponentConfig, ComponentState
from .node_ctx import Node
from .patch import PATCH_MIN_BYTES, PatchPlan, plan_patch
from .recycle import Recycled
from .stage import missing_blobs
from .statcache import Reuse, Source, StatCache, Version, find_sources
from .targets import Target, lstat_or_none, target_for


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
        except (NotFoundError, StorageError):
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
    reusable: PathMap
    reuse: Reuse
    patches: dict[str, PatchPlan]
    held: list[Manifest]
    live_root: Path | None


class Planner:
    """Plans applies of one node's components (reads only; see module doc)."""

    def __init__(self, node: Node, manifest: Callable[[str, int], Manifest]) -> None:
        self.node = node
        self.manifest = manifest

    def recyclable(
        self, cfg: ComponentConfig, target: Target, cache: StatCache, st: ComponentState, to: int
    ) -> Recycled | None:
        """The kept version this commit would drop, to reshape into the stage (recycle.py)."""
        after = ([st.installed] if st.installed is not None else []) + [
            s for s in st.kept if s != to
        ]
        for s in reversed(after[cfg.retain :]):
            if s == st.installed or lstat_or_none(target.version_path(s)) is None:
                continue
            try:
                return Recycled(s, self.manifest(cfg.name, s), cache)
            except (NotFoundError, StorageError):
                continue
        return None

    def intact(self, cache: StatCache, target: Target, man: Manifest, root: Path) -> bool:
        """Whether a kept version still matches its manifest, by the stat cache (no reading)."""
        if lstat_or_none(root) is None:
            return False
        at = str(root)
        for f in man.files:
            if cache.trusted(man.serial, f.path, target.file_at(at, f.path), f.sha256) is None:
                return False
        return True

    def versions(self, cfg: ComponentConfig, target: Target, st: ComponentState) -> list[Version]:
        """The versions on disk whose files may be reused: live first, then kept, newest first."""
        out = []
        serials = ([st.installed] if st.installed is not None else []) + list(st.kept)
        for s in serials:
            root = target.version_root(s, st.installed)
            try:
                man = self.manifest(cfg.name, s)
            except (NotFoundError, StorageError):
                continue  # its envelope is gone: its files are simply not reused
            if lstat_or_none(root) is not None:
                out.append(Version(s, root, man, live=s == st.installed))
        return out

    def plan(
        self,
        cfg: ComponentConfig,
        target: Target,
        cache: StatCache,
        man: Manifest,
        st: ComponentState,
    ) -> StagePlan:
        """Find trusted sources and patch bases; refuse if some content is nowhere.

        Raises ``NotFoundError`` naming the missing count and any locally
        modified live files that made it so.
        """
        versions = self.versions(cfg, target, st)
        reuse = find_sources(man, versions, cache, target.file_at)
        live = versions[0] if versions and versions[0].live else None
        # Every file on disk may serve deltas as a base (delta.py checks what it
        # reads); contents this release needs count only where trusted.
        needed = {f.sha256 for f in man.files}
        reusable = PathMap()
        for v in reversed(versions):
            at = str(v.root)
            for f in v.man.files:
                if f.sha256 not in needed:
                    reusable.paths[f.sha256] = target.file_at(at, f.path)
        reusable.paths.update({sha: s.path for sha, s in reuse.sources.items()})
        patches = self.patches(target, cache, man, live, reuse) if live else {}
        need = missing_blobs(man, reusable, self.node.store, [v.man for v in versions])
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
        return StagePlan(
            reusable, reuse, patches, [v.man for v in versions], live.root if live else None
        )

    def patches(
        self, target: Target, cache: StatCache, man: Manifest, live: Version, reuse: Reuse
    ) -> dict[str, PatchPlan]:
        """Plans for big changed files whose live predecessor is trusted (see patch.py)."""
        out: dict[str, PatchPlan] = {}
        old = live.man.file_map()
        single = target.kind == "file"
        for f in man.files:
            if f.sha256 in reuse.sources or f.size < PATCH_MIN_BYTES:
                continue
            base = live.man.files[0] if single and live.man.files else old.get(f.path)
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
        for f in man.files:
            if f.sha256 in plan.reuse.sources or f.path in plan.patches:
                continue
            if not all(has(c.digest) for c in f.chunks):
                return DeltaBuilder(man, plan.held, plan.reusable, self.node.store)
        return None
