"""The apply engine: stage, swap, health-check, commit or roll back — crash-safe.

Theory of operation. Every change of the live version of a component is one
*transaction* in its journal, whatever caused it (a new release, an operator
rollback). A transaction makes version ``to`` live at the target, taking it
from ``src`` (a fresh stage, or a kept previous version), and leaves the
version it replaced at ``src`` until commit moves it to its kept place.

    begin ─► (stage) ─► staged ─► swap ─► swapped ─► health ─┬─► commit ─► done
                                                            └─► undo ───► done

Each record is fsynced before its step acts. The swap is one system call
(``renameat2(RENAME_EXCHANGE)`` for a directory, so the target path never
disappears), and both inodes are recorded before it, so recovery can always
tell which version is live by looking. Recovery (run at the start of every
command and of the daemon) finishes a transaction that reached ``commit`` and
undoes any other: a crash between swap and commit counts as a failed health
check (as boot counting does in A/B updaters) and marks that release bad here.
The target is therefore always exactly the old or the new version.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from p2pupd.protocol.errors import VerificationError
from p2pupd.protocol.manifest import Manifest

from .errors import ApplyError, HealthCheckFailedError, NotFoundError, StorageError
from .fsutil import fsync_dir, rename_exchange, storage_error
from .journal import Journal
from .node import ComponentConfig, ComponentState, HistoryEntry, now_seconds
from .node_ctx import Node
from .stage import StageReport, missing_blobs, remove_tree, stage_tree

# Fault injection for crash tests: P2PUPD_CRASH_AT=<step> SIGKILLs this process
# right after the journal record of that step is durable.
_CRASH_AT = os.environ.get("P2PUPD_CRASH_AT")


@dataclass(frozen=True)
class ApplyResult:
    component: str
    serial: int
    version: str
    previous: int | None
    changed: bool
    stage: StageReport | None = None
    message: str = ""


def _crash_point(step: str) -> None:
    if step == _CRASH_AT:
        os.kill(os.getpid(), 9)


def stage_path(cfg: ComponentConfig) -> Path:
    return cfg.target.parent / f".{cfg.target.name}.p2pupd-stage"


def kept_path(cfg: ComponentConfig, serial: int) -> Path:
    return cfg.target.parent / f".{cfg.target.name}.p2pupd-v{serial}"


def _ino(path: Path) -> int | None:
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise storage_error(exc, "stat", path) from None


def reusable_files(node: Node, cfg: ComponentConfig, st: ComponentState) -> dict[bytes, Path]:
    """Map file sha256 -> a path on disk with those bytes, from live and kept versions."""
    out: dict[bytes, Path] = {}
    versions: list[tuple[int, Path]] = []
    if st.installed is not None:
        versions.append((st.installed, cfg.target))
    versions += [(s, kept_path(cfg, s)) for s in st.kept]
    for serial, root in reversed(versions):  # live version wins
        try:
            man = node.manifest(cfg.name, serial)
        except (NotFoundError, StorageError):
            continue
        for f in man.files:
            out[f.sha256] = root / f.path
    return out


class Applier:
    """Applies, rolls back and recovers the components of one node.

    The caller holds the node lock. ``health`` may be replaced (tests, hooks).
    """

    def __init__(
        self, node: Node, health: Callable[[ComponentConfig, Manifest], None] | None = None
    ):
        self.node = node
        self.health = health or run_health_command

    # -- public operations --------------------------------------------------

    def apply(self, component: str, serial: int | None = None, force: bool = False) -> ApplyResult:
        """Make release ``serial`` (default: newest stored) live for ``component``.

        Raises ``NotFoundError`` (unknown release, missing blobs),
        ``ApplyError``/``HealthCheckFailedError`` (rolled back, reason recorded),
        ``StorageError``/``NoSpaceError`` (nothing changed).
        """
        cfg = self.node.config.component(component)
        self.recover()
        st = self.node.state.read_state(component)
        if serial is None:
            serials = [s for s in self.node.releases.serials(component) if s not in st.bad or force]
            if not serials:
                raise NotFoundError(f"no release of {component} is stored on this node")
            serial = serials[-1]
        man = self.node.manifest(component, serial)
        if st.installed == serial:
            return ApplyResult(
                component, serial, man.version, st.installed, False, message="already live"
            )
        if serial in st.bad and not force:
            raise ApplyError(
                f"{component} {man.version} failed here before ({st.bad[serial]}); use --force to retry"
            )
        return self._apply_serial(cfg, serial, st)

    def _apply_serial(
        self,
        cfg: ComponentConfig,
        serial: int,
        st: ComponentState,
        run_health: bool = True,
        event: str = "applied",
    ) -> ApplyResult:
        """Stage ``serial`` (or take its kept copy) and run the transaction."""
        component = cfg.name
        man = self.node.manifest(component, serial)
        if cfg.kind != "dir":
            raise ApplyError(f"target kind {cfg.kind!r} is not supported yet")
        j = self._journal(component)
        tx = secrets.token_hex(8)
        kept = kept_path(cfg, serial)
        if serial in st.kept and (kept.exists() or kept.is_symlink()):
            # The version is still on disk from before: swapping it back in is
            # one rename, no staging.
            j.append(
                self._rec("begin", tx, component, serial, st.installed, kept, "switch", run_health)
            )
            return self._swap_and_check(cfg, man, tx, kept, st, None, run_health, event)
        reusable = reusable_files(self.node, cfg, st)
        need = missing_blobs(man, reusable, self.node.store)
        if need:
            raise NotFoundError(
                f"{len(need)} chunk(s) of {component} {man.version} are not stored here; import them first"
            )
        src = stage_path(cfg)
        remove_tree(src)
        j.append(self._rec("begin", tx, component, serial, st.installed, src, "apply", run_health))
        _crash_point("begin")
        try:
            report = stage_tree(man, src, self.node.store, reusable, allow_hardlink=cfg.immutable)
        except BaseException:
            remove_tree(src)
            j.append({"step": "done", "tx": tx, "outcome": "aborted"})
            raise
        return self._swap_and_check(cfg, man, tx, src, st, report, run_health, event)

    def rollback(self, component: str) -> ApplyResult:
        """Make the previous version live again (no health check: an operator act).

        Uses the newest kept version on disk (one rename), else re-stages the
        newest older release whose content is still in the store. The rollback
        high-water mark is unchanged: this never re-opens the door to a
        replayed old release arriving from outside.
        """
        cfg = self.node.config.component(component)
        self.recover()
        st = self.node.state.read_state(component)
        if st.kept:
            prev = st.kept[0]
        else:
            below = [
                s
                for s in self.node.releases.serials(component)
                if st.installed is None or s < st.installed
            ]
            if not below:
                raise NotFoundError(f"{component} has no previous version on this node")
            prev = below[-1]
        return self._apply_serial(cfg, prev, st, run_health=False, event="rolled-back")

    def recover(self) -> list[str]:
        """Finish or undo every open transaction; return one line per action."""
        out = []
        for name in self.node.config.components:
            j = self._journal(name)
            tx = j.open_transaction()
            if tx:
                out.append(self._recover_one(self.node.config.components[name], j, tx))
        return out

    # -- the transaction ------------------------------------------------------

    def _swap_and_check(
        self,
        cfg: ComponentConfig,
        man: Manifest,
        tx: str,
        src: Path,
        st: ComponentState,
        report: StageReport | None,
        run_health: bool = True,
        event: str = "rolled-back",
    ) -> ApplyResult:
        j = self._journal(cfg.name)
        new_ino = _ino(src)
        old_ino = _ino(cfg.target)
        j.append({"step": "staged", "tx": tx, "new_ino": new_ino, "old_ino": old_ino})
        _crash_point("staged")
        self._swap_in(cfg, src)
        j.append({"step": "swapped", "tx": tx})
        _crash_point("swapped")
        if run_health:
            try:
                self.health(cfg, man)
            except (HealthCheckFailedError, VerificationError) as exc:
                reason = str(exc)
                j.append({"step": "undo", "tx": tx, "reason": reason})
                _crash_point("undo")
                self._undo(
                    cfg,
                    j,
                    {
                        "src": str(src),
                        "new_ino": new_ino,
                        "op": "apply",
                        "to": man.serial,
                        "from": st.installed,
                    },
                    reason,
                )
                raise HealthCheckFailedError(
                    f"{cfg.name} {man.version} rolled back: {reason}"
                ) from None
        j.append({"step": "commit", "tx": tx})
        _crash_point("commit")
        self._commit(cfg, src, man.serial, st.installed, event)
        j.append({"step": "done", "tx": tx, "outcome": "committed"})
        j.compact()
        return ApplyResult(cfg.name, man.serial, man.version, st.installed, True, report)

    def _swap_in(self, cfg: ComponentConfig, src: Path) -> None:
        if cfg.target.exists() or cfg.target.is_symlink():
            rename_exchange(src, cfg.target)
        else:
            try:
                os.rename(src, cfg.target)
            except OSError as exc:
                raise storage_error(exc, "move into place", cfg.target) from None
        fsync_dir(cfg.target.parent)

    def _commit(
        self, cfg: ComponentConfig, src: Path, to: int, frm: int | None, event: str
    ) -> None:
        """Record ``to`` as live and move the replaced version (at ``src``) to its kept place.

        Idempotent, so recovery can run it again after a crash half-way.
        """
        st = self.node.state.read_state(cfg.name)
        if st.installed != to:
            kept = [s for s in st.kept if s not in (to, frm)]
            if frm is not None:
                kept.insert(0, frm)
            drop = kept[cfg.retain :]
            kept = kept[: cfg.retain]
            man = self.node.manifest(cfg.name, to)
            st = replace(st, installed=to, kept=tuple(kept), last_error=None).with_event(
                HistoryEntry(now_seconds(), event, to, man.version)
            )
            self.node.state.update_state(cfg.name, st)
            for s in drop:
                remove_tree(kept_path(cfg, s))
        stale = kept_path(cfg, to)
        if stale != src and (stale.exists() or stale.is_symlink()):
            remove_tree(stale)
        if frm is not None and (src.exists() or src.is_symlink()):
            dst = kept_path(cfg, frm)
            remove_tree(dst)
            try:
                os.rename(src, dst)
            except OSError as exc:
                raise storage_error(exc, "keep previous version at", dst) from None
        elif src.exists():
            remove_tree(src)
        fsync_dir(cfg.target.parent)

    def _undo(self, cfg: ComponentConfig, j: Journal, begin: dict[str, Any], reason: str) -> None:
        """Put the old version back at the target and mark ``to`` bad here."""
        src = Path(begin["src"])
        new_ino = begin.get("new_ino")
        if new_ino is not None and _ino(cfg.target) == new_ino:
            if src.exists():
                rename_exchange(src, cfg.target)
            else:  # first install: there is no old version to swap back
                os.rename(cfg.target, src)
            fsync_dir(cfg.target.parent)
        if begin.get("op") == "apply":
            remove_tree(src)
        st = self.node.state.read_state(cfg.name)
        to = begin["to"]
        version = None
        with contextlib.suppress(NotFoundError, StorageError):
            version = self.node.manifest(cfg.name, to).version
        bad = dict(st.bad)
        if begin.get("checked"):
            bad[to] = reason
        st = replace(st, bad=bad, last_error=reason).with_event(
            HistoryEntry(now_seconds(), "health-failed", to, version, reason)
        )
        self.node.state.update_state(cfg.name, st)
        j.append({"step": "done", "tx": begin["tx"], "outcome": "undone"})

    def _recover_one(self, cfg: ComponentConfig, j: Journal, tx: list[dict[str, Any]]) -> str:
        begin = dict(tx[0])
        steps = {r.get("step") for r in tx}
        for r in tx:
            begin.update({k: v for k, v in r.items() if k in ("new_ino", "old_ino")})
        src = Path(begin["src"])
        if "commit" in steps:
            self._commit(cfg, src, begin["to"], begin["from"], "recovered")
            j.append({"step": "done", "tx": begin["tx"], "outcome": "committed"})
            return f"{cfg.name}: finished interrupted commit of serial {begin['to']}"
        if "staged" not in steps:
            if begin.get("op") == "apply":
                remove_tree(src)
            j.append({"step": "done", "tx": begin["tx"], "outcome": "aborted"})
            return f"{cfg.name}: discarded an interrupted stage of serial {begin['to']}"
        swapped = _ino(cfg.target) == begin.get("new_ino")
        if not swapped and "undo" not in steps:
            if begin.get("op") == "apply":
                remove_tree(src)
            j.append({"step": "done", "tx": begin["tx"], "outcome": "aborted"})
            return f"{cfg.name}: interrupted before the swap; old version kept"
        reason = next(
            (r["reason"] for r in tx if r.get("step") == "undo"),
            "interrupted between swap and commit",
        )
        self._undo(cfg, j, begin, reason)
        return f"{cfg.name}: rolled back serial {begin['to']} ({reason})"

    # -- helpers -----------------------------------------------------------

    def _journal(self, component: str) -> Journal:
        return Journal(self.node.state.journal_dir / f"{component}.log")

    @staticmethod
    def _rec(
        step: str,
        tx: str,
        component: str,
        to: int,
        frm: int | None,
        src: Path,
        op: str,
        checked: bool,
    ) -> dict[str, Any]:
        return {
            "checked": checked,
            "step": step,
            "tx": tx,
            "component": component,
            "to": to,
            "from": frm,
            "src": str(src),
            "op": op,
        }


def run_health_command(cfg: ComponentConfig, man: Manifest) -> None:
    """Run the component's health command with its deadline.

    Raises ``HealthCheckFailedError`` on a non-zero exit, a time-out, or a
    command that cannot be started. No command configured: passes.
    """
    if not cfg.health_cmd:
        return
    env = dict(os.environ)
    env.update(
        P2PUPD_COMPONENT=cfg.name,
        P2PUPD_VERSION=man.version,
        P2PUPD_SERIAL=str(man.serial),
        P2PUPD_TARGET=str(cfg.target),
    )
    try:
        proc = subprocess.run(
            list(cfg.health_cmd),
            env=env,
            capture_output=True,
            timeout=cfg.health_seconds,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise HealthCheckFailedError(
            f"health check timed out after {cfg.health_seconds:g}s"
        ) from None
    except OSError as exc:
        raise HealthCheckFailedError(f"health check could not start: {exc.strerror}") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
        detail = f": {tail[-1][:200]}" if tail else ""
        raise HealthCheckFailedError(f"health check exited with {proc.returncode}{detail}")
