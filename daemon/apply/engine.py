"""The apply engine: plan, stage, swap, health-check, commit or roll back — crash-safe.

Theory of operation. ``Applier`` decides *what* to make live and prepares it;
``transaction.Transactions`` makes it live under the journal (read its
docstring for the state machine and recovery). One apply is:

1. recover any open transaction (a crash earlier must not be built upon);
2. choose the release (newest stored and not marked bad here, unless forced);
3. refuse early what cannot work: a target kind's preconditions (targets.py),
   content that is neither on disk nor in the store (a clear error naming
   locally modified files), too little free space (stage.py);
4. if that version is still kept on disk and intact, switch to it (no staging);
   otherwise stage it beside the target (plan.py decides how): in the
   kept version this commit would drop, reshaped in place (recycle.py), or
   fresh, from the cheapest proven sources — files the stat cache trusts,
   patches of big files, deltas, chunks;
5. run the ``pre-apply`` hook on the stage, then swap, then the checks
   (``post-apply`` and ``health`` hooks, the health command) decide between
   commit and undo. A failed check marks the release bad here, so it is never
   retried automatically (``--force`` retries).

The caller holds the node lock.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pupd.daemon.apply.checks import HealthCheck, Hooks, run_health_command
from p2pupd.daemon.apply.plan import Planner, StagePlan, kept_path, reusable_files
from p2pupd.daemon.apply.targets import Target, lstat_or_none, target_for
from p2pupd.daemon.apply.transaction import CRASH_POINTS, HandOver, Transactions, Tx
from p2pupd.daemon.errors import (
    ApplyError,
    HealthCheckFailedError,
    HookError,
    NotFoundError,
    StorageError,
)
from p2pupd.daemon.stage.recycle import Recycled
from p2pupd.daemon.stage.stager import StageReport, stage_file, stage_tree
from p2pupd.daemon.stage.statcache import Shape, StatCache, record_tree
from p2pupd.daemon.state import components
from p2pupd.daemon.state.mancache import ManifestCache
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.state.statedir import ComponentConfig, ComponentState
from p2pupd.protocol.errors import RevokedKeyError, VerificationError
from p2pupd.protocol.manifest import Manifest

__all__ = [
    "CRASH_POINTS",
    "Applier",
    "ApplyResult",
    "HandOver",
    "kept_path",
    "reusable_files",
    "run_health_command",
]

CHECK_ERRORS = (HealthCheckFailedError, HookError, VerificationError, NotFoundError)
# A self-update's trial record for a component, or None (see ``Applier``).
Trial = Callable[[ComponentConfig], "dict[str, Any] | None"]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Suspend Python's automatic cycle collection for the block.

    An apply allocates a few objects per file of the tree (manifest entries,
    stat cache records, ``lstat`` results), none of them in cycles; with 20,000
    files the collector would otherwise run full passes over all of them
    many times, a large share of the apply's CPU time. Collection resumes
    afterwards (if it was on). What the block allocated and still holds is
    moved to the oldest generation without a scan (``freeze`` then ``unfreeze``,
    when nothing else is frozen), else the first young collection after the
    block would walk all of it; cycles among it are found by the next full
    collection, as for any long-lived object.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if gc.get_freeze_count() == 0:
            gc.freeze()
            gc.unfreeze()
        if was:
            gc.enable()


@dataclass(frozen=True)
class ApplyResult:
    component: str
    serial: int
    version: str
    previous: int | None
    changed: bool
    stage: StageReport | None = None
    message: str = ""
    modified: tuple[str, ...] = ()  # live files found modified locally (rebuilt)
    stage_seconds: float = 0.0  # planning and staging
    live_seconds: float = 0.0  # from the start of the transaction until the swap returned
    swap_ns: int = 0  # duration of the swap's one system call


class Applier:
    """Applies, rolls back and recovers the components of one node.

    ``health`` replaces the health command (tests, other policies); ``hooks``
    runs the releases' WebAssembly hooks (default: ``health.Hooks``).
    """

    def __init__(
        self, node: Node, health: HealthCheck | None = None, hooks: Hooks | None = None,
        trial: Trial | None = None,
    ) -> None:  # fmt: skip
        """``trial(cfg)`` returns the ``trial`` record of a self-update of ``cfg``
        (then a checked apply raises ``HandOver`` before its swap), or None."""
        self.node = node
        self.health = health or run_health_command
        self.hooks = hooks if hooks is not None else Hooks(node)
        self.trial = trial
        self._manifests = ManifestCache(node)
        self.tx = Transactions(node, self.manifest)
        self.planner = Planner(node, self.manifest)

    def manifest(self, component: str, serial: int) -> Manifest:
        """Return a stored, verified release (cached: see mancache.py).

        Raises ``NotFoundError``, ``CorruptStoreError`` or ``StorageError``.
        """
        return self._manifests.get(component, serial)

    def serial_of(self, component: str, version: str) -> int:
        """Return the serial of the newest stored release labelled ``version``.

        Raises ``NotFoundError`` if there is none.
        """
        for s in reversed(self.node.releases.serials(component)):
            if self.manifest(component, s).version == version:
                return s
        raise NotFoundError(f"no stored release of {component} has version {version!r}")

    # -- public operations ------------------------------------------------------

    def apply(self, component: str, serial: int | None = None, force: bool = False) -> ApplyResult:
        """Make release ``serial`` (default: newest stored, not bad) live for ``component``.

        Raises ``NotFoundError`` (unknown release, missing blobs),
        ``HealthCheckFailedError`` (rolled back, reason recorded), ``HookError``
        (pre-apply hook refused it), ``ApplyError`` (the target cannot take it),
        ``StorageError``/``NoSpaceError`` (nothing changed).
        """
        with gc_paused():
            return self._apply(component, serial, force)

    def _apply(self, component: str, serial: int | None, force: bool) -> ApplyResult:
        cfg = self.node.config.component(component)
        self.recover()
        st = self.node.state.read_state(component)
        if serial is None:
            serials = [s for s in self.node.releases.serials(component) if s not in st.bad or force]
            if not serials:
                raise NotFoundError(f"no release of {component} is stored on this node")
            serial = serials[-1]
        man = self.manifest(component, serial)
        if st.installed == serial:
            return ApplyResult(
                component, serial, man.version, st.installed, False, message="already live"
            )
        if serial in st.bad and not force:
            raise ApplyError(
                f"{component} {man.version} failed here before ({st.bad[serial]}); "
                "use --force to retry"
            )
        return self._transact(cfg, serial, st, checked=True, event="applied")

    def rollback(self, component: str) -> ApplyResult:
        """Make the previous (older) version live again; no health check: an operator act.

        Uses the newest older version kept on disk (one rename), else re-stages
        the newest older release still stored. The rollback high-water mark is
        unchanged, so this never re-opens the door to a replayed old release.
        Raises ``NotFoundError`` when there is none.
        """
        with gc_paused():
            return self._rollback(component)

    def _rollback(self, component: str) -> ApplyResult:
        cfg = self.node.config.component(component)
        self.recover()
        st = self.node.state.read_state(component)
        older = [s for s in st.kept if st.installed is None or s < st.installed]
        if not older:
            older = [
                s
                for s in self.node.releases.serials(component)
                if st.installed is not None and s < st.installed
            ]
        if not older:
            raise NotFoundError(f"{component} has no previous version on this node")
        return self._transact(cfg, max(older), st, checked=False, event="rolled-back")

    def recover(self) -> list[str]:
        """Finish or undo every open transaction; return one line per action."""
        return self.tx.recover()

    def finish_trial(self, component: str, tx_id: str) -> ApplyResult:
        """A self-update's trial run proved itself: make it live and commit.

        Raises ``NotFoundError`` if ``tx_id`` is not open at its trial, and
        what ``Transactions.finish_trial`` raises.
        """
        cfg = self.node.config.component(component)
        tx = self.tx.open_trial(cfg, tx_id)
        man = self.manifest(component, tx.to)
        self.tx.finish_trial(cfg, man, tx)
        return ApplyResult(
            component, tx.to, man.version, tx.frm, True, live_seconds=0.0, swap_ns=tx.swap_ns
        )

    def fail_trial(self, component: str, tx_id: str, reason: str) -> None:
        """Record why a self-update's trial run did not prove itself (recovery marks it bad)."""
        cfg = self.node.config.component(component)
        self.tx.fail_trial(self.tx.open_trial(cfg, tx_id), reason)

    def pending(self) -> dict[str, dict[str, Any]]:
        """Open transactions by component (for ``status`` when recovery cannot run)."""
        return self.tx.pending()

    # -- one transaction ---------------------------------------------------------

    def _transact(
        self, cfg: ComponentConfig, serial: int, st: ComponentState, checked: bool, event: str
    ) -> ApplyResult:
        target = target_for(cfg)
        man = self.manifest(cfg.name, serial)
        platform = self.node.config.platform_of(cfg.name)
        if man.platform is not None and man.platform != platform:
            # Never reached through the node's own stores (they hold only its own
            # variants): a last line against a state directory altered by hand.
            raise ApplyError(
                f"{cfg.name} {man.version} is the variant for {man.platform}; "
                f"this node installs {platform} (nothing changed)"
            )
        target.check(man)
        cache = self.tx.cache(cfg.name)
        report, plan, t0 = None, None, time.monotonic()
        kept = target.version_path(serial)
        if serial in st.kept and self.planner.intact(cache, target, man, kept):
            tx = self.tx.begin(cfg, serial, st.installed, kept, "switch", checked, event)
        else:
            rec, plan = self._plan(cfg, target, cache, man, st)
            tx, report = self._stage_tx(cfg, target, cache, man, st, plan, rec, checked, event)
        stage_seconds = time.monotonic() - t0
        try:
            trial = self.trial(cfg) if self.trial is not None else None
            self.tx.swap_and_commit(cfg, man, tx, self._checks, trial)
        except CHECK_ERRORS as exc:
            raise HealthCheckFailedError(f"{cfg.name} {man.version} rolled back: {exc}") from None
        modified = tuple(plan.reuse.modified) if plan else ()
        note = f"rebuilt {len(modified)} locally modified file(s)" if modified else ""
        return ApplyResult(
            cfg.name, serial, man.version, st.installed, True, report, note, modified,
            stage_seconds, tx.live_at - t0, tx.swap_ns,
        )  # fmt: skip

    def _plan(
        self, cfg: ComponentConfig, target: Target, cache: StatCache, man: Manifest,
        st: ComponentState,
    ) -> tuple[Recycled | None, StagePlan]:  # fmt: skip
        """Choose the version to reshape into the stage (if any) and plan the stage.

        Everything is decided before anything is dropped: the version to be
        reshaped is no source of the plan (its files move and go while the
        stage is built), only what it keeps in place counts. A kept version
        staged in its own place (the symlink kind, when it is no longer
        intact) is reshaped there. If some content is then found nowhere but in
        the version that would be recycled, it is not recycled: the stage is
        built fresh and that version is dropped after the commit, as usual.
        Raises ``NotFoundError`` (nothing has changed).
        """
        serial = man.serial
        src = target.stage_path(serial)
        if serial in st.kept and src == target.version_path(serial) and lstat_or_none(src):
            own = self.planner.in_place(cfg, target, cache, serial, man)
            return own, self.planner.plan(cfg, target, cache, man, st, own)
        rec = self.planner.recyclable(cfg, target, cache, st, serial, man)
        try:
            return rec, self.planner.plan(cfg, target, cache, man, st, rec)
        except NotFoundError:
            if rec is None:
                raise
        return None, self.planner.plan(cfg, target, cache, man, st, None)

    def _stage_tx(
        self,
        cfg: ComponentConfig,
        target: Target,
        cache: StatCache,
        man: Manifest,
        st: ComponentState,
        plan: StagePlan,
        rec: Recycled | None,
        checked: bool,
        event: str,
    ) -> tuple[Tx, StageReport]:
        """Begin a transaction and build its stage (recycling a dropped version if any)."""
        serial = man.serial
        src = target.stage_path(serial)
        # A kept version reshaped where it is (op ``reshape``) stays a kept
        # version: if the transaction ends before the swap it is left as far as
        # the reshape got, a kept version no longer intact, reshaped again by
        # the next attempt (its stat cache records trust only what is intact).
        in_place = rec is not None and target.version_path(rec.serial) == src
        drop = set()
        if not in_place:
            drop = {s for s in st.kept if (s == serial and src == target.version_path(s))}
            if rec is not None:
                drop.add(rec.serial)
        if drop:
            # A kept version re-staged in its own place, or recycled as the
            # stage, stops being a kept version first (so a crash cannot leave
            # the state pointing at a half-built tree).
            st = components.keep_dropped(self.node, cfg.name, drop)
        if not in_place:
            target.discard(src, "apply", st.installed)  # debris of an earlier crash
        op = "reshape" if in_place else "apply"
        tx = self.tx.begin(cfg, serial, st.installed, src, op, checked, event)
        try:
            if rec is not None and not in_place:
                target.take(target.version_path(rec.serial), src)
                self.tx.follow(cfg, target)
            report = self._stage(cfg, target, man, src, plan, rec)
            for old, new in report.rekeys:
                cache.rekey(old, new)  # other names of inodes the reshape unlinked
            carried = None
            if rec is not None:
                # Its files are now the new version's: the records of those kept
                # unchanged carry over as they are.
                carried = cache.take(rec.serial)
                for rel in carried.keys() - report.kept:
                    del carried[rel]
            records = record_tree(man, src, target.file_at, report.records, carried)
            shape = None
            if target.kind != "file":
                shape = Shape(report.dirs, tuple(s.path for s in man.symlinks), len(records))
            cache.replace_version(serial, records, shape)
            if report.methods.get("hardlink"):
                cache.adopt_links(serial)  # linking changed the other names' ctime
            cache.save()
            self._pre_apply(cfg, target, man, tx, st)
        except BaseException:
            self.tx.abort_quietly(cfg, tx)
            raise
        return tx, report

    def _stage(
        self,
        cfg: ComponentConfig,
        target: Target,
        man: Manifest,
        src: Path,
        plan: StagePlan,
        recycled: Recycled | None,
    ) -> StageReport:
        if target.kind == "file":
            return stage_file(
                man,
                src,
                self.node.store,
                plan.sources,
                delta_builder=self.planner.delta_builder(man, plan),
                sources=plan.reuse.sources,
                patches=plan.patches,
                live_root=plan.live_root,
                reflink=target.reflink_supported(),
                recycled=recycled,
            )
        return stage_tree(
            man,
            src,
            self.node.store,
            plan.sources,
            allow_hardlink=cfg.immutable,
            delta_builder=self.planner.delta_builder(man, plan),
            sources=plan.reuse.sources,
            patches=plan.patches,
            live_root=plan.live_root,
            reflink=target.reflink_supported(),
            recycled=recycled,
            rest=plan.rest,
        )

    def _pre_apply(
        self, cfg: ComponentConfig, target: Target, man: Manifest, tx: Tx, st: ComponentState
    ) -> None:
        """Run the release's pre-apply hook on the stage; on failure mark it bad and raise."""
        if "pre-apply" not in man.hooks:
            return
        self.tx.step(tx, "pre-apply")
        try:
            self.hooks.run(
                "pre-apply", cfg, man, tx.src, self._label(cfg, st.installed),
                target.scratch_path("hookview"),
            )  # fmt: skip
        except (HookError, NotFoundError, StorageError) as exc:
            reason = str(exc)
            components.refused(self.node, cfg.name, man, reason)
            raise HookError(f"{cfg.name} {man.version} not applied: {reason}") from None

    def _checks(self, cfg: ComponentConfig, target: Target, man: Manifest, tx: Tx) -> None:
        """After the swap: post-apply hook, health hook, health command; raise on failure."""
        if man.hooks.keys() & {"post-apply", "health"}:
            live = target.version_root(man.serial, man.serial)
            old = self._label(cfg, tx.frm)  # reads the old manifest: only when a hook runs
            view = target.scratch_path("hookview")
            self.hooks.run("post-apply", cfg, man, live, old, view)
            self.hooks.run("health", cfg, man, live, old, view)
        self.health(cfg, man)

    def _label(self, cfg: ComponentConfig, serial: int | None) -> str | None:
        if serial is None:
            return None
        try:
            return self.manifest(cfg.name, serial).version
        except (NotFoundError, StorageError, RevokedKeyError):
            return None
