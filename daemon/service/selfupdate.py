"""p2pupd updating itself: the daemon's side of a self-update (docs/self-update.md).

Theory of operation
-------------------
A release of the component marked ``self_update`` (p2pupd over
/opt/p2pupd/current) is staged like any other; then the journal takes a
``trial`` record and the Applier raises ``HandOver`` with the old version
still live (apply/transaction.py). The new version is tried *before* it goes
live, as A/B systems boot a new slot once before they mark it good:

1. The old daemon writes into the ``trial`` record what the trial run must
   prove and by when (``trial_record``): a deadline on CLOCK_BOOTTIME (it
   holds across ``exec``) and how many peers it had.
2. It stops its services (Bye to every peer), keeps the node lock's file
   descriptor open across ``exec`` -- so no other process can take the lock,
   and so none can judge the trial while it runs --, starts a **watchdog**
   (selfwatch.py, the *old* code) and ``exec``s the staged version's launcher
   with its own arguments (``exec_restart``): same pid, so systemd sees the
   same main process.
3. The new daemon adopts the lock and claims the trial (``adopted``), starts
   as usual -- recovery, scan, listener, discovery -- and then ``prove``s
   itself: at least one peer connected again if the old daemon had any, and
   the component's health command, if any. Then ``finish_trial`` swaps
   ``current`` to it and commits, and only now is the release announced to
   peers (lifecycle.py: a self-update spreads from nodes that run it).
4. If it cannot prove itself by the deadline, it records why (``fail_trial``)
   and ``exec``s the old version (``current`` still names it), handing the
   lock back; the old daemon's recovery marks the release bad.
5. If it dies, hangs or never even starts, the watchdog acts: past the
   deadline it kills it; once it is gone the watchdog takes the lock, recovers
   (a trial without ``healthy`` is the verdict: marked bad, old version stays)
   and starts the old daemon again -- unless systemd supervises the daemon,
   whose restart runs ``current``, the old version, whose recovery does the same.

So the old daemon never judges the new one: the new one must prove itself,
and a trial run that ended without that proof is the verdict, found by
whoever holds the lock next.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from p2pupd.daemon.apply.checks import run_health_command
from p2pupd.daemon.apply.engine import Applier
from p2pupd.daemon.apply.transaction import HandOver, claim_trial
from p2pupd.daemon.errors import DaemonError
from p2pupd.daemon.events import log
from p2pupd.daemon.state import stateformat
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.state.statedir import ComponentConfig
from p2pupd.daemon.state.stateformat import STATE_FORMAT
from p2pupd.protocol.errors import P2pupdError

TRIAL_ENV = "P2PUPD_TRIAL"  # "COMPONENT:TX": this process is that transaction's trial run
LOCK_FD_ENV = "P2PUPD_LOCK_FD"  # the node lock, held across exec
WATCHDOG_ENV = "P2PUPD_WATCHDOG_PID"  # a watchdog child this process must reap
# How often the trial run looks for its peers.
POLL_SECONDS = 0.2
_WATCHDOGS: list[int] = []  # a watchdog child this process inherited through exec


def boottime() -> float:
    """Seconds on CLOCK_BOOTTIME: monotonic, counts suspend, the same across ``exec``."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def running_version() -> str:
    """The p2pupd version this process runs (``status`` shows it)."""
    return stateformat.installed_version() or "unknown"


def launcher(cfg: ComponentConfig, version_dir: Path | None = None) -> Path:
    """The launcher of a version directory (default: the live one, via ``current``)."""
    return (version_dir or cfg.target) / "bin" / "p2pupd"


def trial_record(cfg: ComponentConfig, peers: int) -> dict[str, Any]:
    """The ``trial`` journal record's fields: what the trial run must prove, and by when."""
    return {
        "deadline_ms": int((boottime() + cfg.health_seconds) * 1000),
        "seconds": int(cfg.health_seconds),
        "peers": peers,
        "from_version": running_version(),
        "state_format": STATE_FORMAT,  # what the old version reads (stateformat rule 3)
    }


@dataclass(frozen=True)
class Restart:
    """What ``main`` does once the services have stopped: become another version."""

    launcher: Path
    reason: str
    keep_lock: bool = True  # hand the node lock over
    trial: str | None = None  # "COMPONENT:TX" for the new process
    watch: dict[str, Any] | None = None  # start the watchdog with these settings


@dataclass(frozen=True)
class Hooks:
    """What the lifecycle needs for self-updates in a daemon that owns its process."""

    state_dir: Path
    peers: Callable[[], int]  # connected peers now
    restart: Callable[[Restart], None]  # stop the services, then ``exec_restart``

    def record(self, cfg: ComponentConfig) -> dict[str, Any] | None:
        """The trial record for an apply of ``cfg`` (None: not a self-update)."""
        return trial_record(cfg, self.peers()) if cfg.self_update else None


def restart_for(handover: HandOver, cfg: ComponentConfig, state_dir: Path) -> Restart:
    """The restart into the staged version a ``HandOver`` asks for, watched."""
    tx = handover.tx
    watch = {"state_dir": str(state_dir), "component": cfg.name, "tx": tx.tx,
             "launcher": str(launcher(cfg))}  # fmt: skip
    return Restart(
        launcher(cfg, tx.src),
        f"trying {cfg.name} serial {tx.to} before it goes live",
        trial=f"{cfg.name}:{tx.tx}",
        watch=watch,
    )


@dataclass(frozen=True)
class TrialRun:
    """This process is the trial run of a self-update (from the environment)."""

    component: str
    tx: str
    lock_fd: int | None
    watchdog: int | None


def adopted() -> TrialRun | None:
    """Read and clear what a predecessor that ``exec``ed into us handed over.

    Returns the trial this process runs, if any (a hand-back to the old
    version carries the lock but no trial). Cleared from the environment so
    no child process inherits it.
    """
    trial = os.environ.pop(TRIAL_ENV, None)
    fd_text = os.environ.pop(LOCK_FD_ENV, None)
    wd_text = os.environ.pop(WATCHDOG_ENV, None)
    fd = int(fd_text) if fd_text and fd_text.isdigit() else None
    wd = int(wd_text) if wd_text and wd_text.isdigit() else None
    if wd:
        _WATCHDOGS.append(wd)  # passed on if this process execs again before it is reaped
    comp, _, tx = (trial or "").partition(":")
    return TrialRun(comp, tx, fd, wd) if (comp and tx) or fd is not None or wd else None


def trial_fields(node: Node, run: TrialRun) -> dict[str, Any]:
    """The ``trial`` record of ``run``'s transaction (empty if the journal lost it)."""
    applier = Applier(node)
    recs = applier.tx.journal(run.component).open_transaction() or []
    if not recs or recs[0].get("tx") != run.tx:
        return {}
    return next((r for r in recs if r.get("step") == "trial"), {})


async def reap(pid: int) -> None:
    """Collect a watchdog child once it exits (it watches until the trial settles)."""
    with contextlib.suppress(ChildProcessError, OSError):
        await trio.to_thread.run_sync(os.waitpid, pid, 0, abandon_on_cancel=True)


async def prove(
    core: Any, run: TrialRun, fields: dict[str, Any], restart: Callable[[Restart], None]
) -> None:
    """Step 3/4: prove this trial run healthy by its deadline, then go live; else hand back.

    ``core`` is the ``NodeService``; called once it is ready (every service
    started: recovery and scan read the state, the listener is bound).
    """
    node: Node = core.node
    cfg = node.config.component(run.component)
    deadline = fields.get("deadline_ms", 0) / 1000 or boottime() + cfg.health_seconds
    peers = int(fields.get("peers", 0))
    reason = None
    with trio.move_on_after(max(0.0, deadline - boottime())) as scope:
        while peers and not core.conns:
            await trio.sleep(POLL_SECONDS)
        if cfg.health_cmd:
            try:
                man = await core.offload(lambda: node.manifest(cfg.name, _serial(node, run)))
                await core.offload(lambda: run_health_command(cfg, man))
            except P2pupdError as exc:
                reason = f"health command: {exc}"
    if scope.cancelled_caught:
        seconds = fields.get("seconds", round(cfg.health_seconds))
        reason = f"no peer connected again within {seconds} s (it had {peers} before the restart)"
    if reason is None:
        try:
            async with core.mutex:
                result = await core.offload(lambda: Applier(node).finish_trial(cfg.name, run.tx))
        except (DaemonError, P2pupdError) as exc:  # the swap or commit failed: journal decides
            log("self-update-failed", level=logging.ERROR, component=cfg.name, reason=str(exc))
            restart(Restart(launcher(cfg), f"self-update not committed: {exc}"))
            return
        claim_trial(None)
        migrated = await core.offload(node.state.migrate)  # what waited for the commit
        log(
            "self-update-committed",
            component=cfg.name,
            version=result.version,
            serial=result.serial,
            migrated=";".join(migrated) or None,
        )
        digest, man = await core.lifecycle.self_update_committed(cfg.name, result.serial)
        core.offers.holding(cfg.name, result.serial, digest, man)  # and serve it to peers
        return
    log("self-update-failed", level=logging.ERROR, component=cfg.name, reason=reason)
    with contextlib.suppress(DaemonError, P2pupdError):
        await core.offload(lambda: Applier(node).fail_trial(cfg.name, run.tx, reason))
    restart(Restart(launcher(cfg), f"handing back: {reason}"))


def _serial(node: Node, run: TrialRun) -> int:
    recs = Applier(node).tx.journal(run.component).open_transaction() or [{}]
    return int(recs[0].get("to", 0))


def exec_restart(restart: Restart, lock_fd: int | None, argv: list[str]) -> int:
    """Become ``restart.launcher`` with ``argv``: start the watchdog first if asked,
    pass the lock, ``exec``. Returns an exit code only if ``exec`` failed."""
    env = {
        k: v for k, v in os.environ.items() if k not in (TRIAL_ENV, LOCK_FD_ENV, WATCHDOG_ENV)
    }
    if restart.watch is not None:
        watch = dict(restart.watch)
        watch.update(pid=os.getpid(), argv=argv)
        try:
            # The old code watches the new: this interpreter runs the version
            # that is live now. close_fds: the watchdog must not hold the lock.
            child = subprocess.Popen(
                [sys.executable, "-I", "-m", "p2pupd.daemon.service.selfwatch", json.dumps(watch)],
                close_fds=True,
                stdin=subprocess.DEVNULL,
            )
            env[WATCHDOG_ENV] = str(child.pid)
        except OSError as exc:
            log("self-update-watchdog-failed", level=logging.ERROR, reason=str(exc))
    elif _WATCHDOGS:
        env[WATCHDOG_ENV] = str(_WATCHDOGS[-1])  # still our child: the next program reaps it
    if lock_fd is not None:
        env[LOCK_FD_ENV] = str(lock_fd)
    if restart.trial is not None:
        env[TRIAL_ENV] = restart.trial
    log("self-update-exec", launcher=str(restart.launcher), reason=restart.reason)
    for handler in logging.getLogger().handlers + logging.getLogger("p2pupd").handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    try:
        os.execve(restart.launcher, [str(restart.launcher), *argv], env)
    except OSError as exc:
        print(
            f"p2pupd: error: cannot start {restart.launcher}: {exc.strerror or exc}",
            file=sys.stderr,
        )
    return 1
