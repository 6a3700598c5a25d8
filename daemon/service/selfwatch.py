"""The self-update watchdog: the old version watching the new one's trial run.

Theory of operation. ``selfupdate.exec_restart`` starts this program -- with
the interpreter, and so the code, of the version that is live -- just before
the daemon ``exec``s into the staged new version; it is that daemon's child.
It never judges the new version's health (the new daemon must prove it and
journal ``healthy``); it only acts when the trial run cannot have done so:

* the transaction is settled (``done``): nothing to do, exit;
* the daemon is gone (we were re-parented) before that: it died;
* the deadline passed without ``healthy`` or ``unhealthy`` in the journal:
  it hangs, so kill it (SIGKILL) and wait for it to go.

Then, holding the node lock (free now: the daemon held it through ``exec``),
it records why (``unhealthy``: a verdict) and recovers: the release is marked
bad and the old version, never swapped out, stays (recovery.py). Without a
supervisor it then becomes the old daemon (``exec`` of ``current`` with the
daemon's arguments); under systemd (``INVOCATION_ID`` set) the unit's restart
does that.

A stop is not a verdict. ``systemctl stop`` (or a supervisor's SIGTERM to the
process group) reaches this process while the daemon still lives; a daemon
that died on its own has already made us an orphan when systemd, seeing its
main process gone, sends SIGTERM here. So SIGTERM only notes whether the
daemon was still our parent: if it was, nothing is recorded -- the next start
finds a trial cut off before its verdict, an interruption (retried) -- and
this process exits once the daemon is gone, without starting anything.

Once ``healthy`` or ``unhealthy`` is journalled the trial run has decided and
only the swap and commit (or the hand-back to the old version) remain: the
deadline stops counting, and a generous one for that last step applies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from p2pupd.daemon.apply.engine import Applier
from p2pupd.daemon.apply.transaction import Journal
from p2pupd.daemon.errors import DaemonError
from p2pupd.daemon.events import log, setup_logging
from p2pupd.daemon.service.selfupdate import boottime
from p2pupd.daemon.state.node import Node
from p2pupd.protocol.errors import P2pupdError

POLL_SECONDS = 0.25
GRACE_SECONDS = 20.0  # past the trial deadline, for a run that is about to decide
SETTLE_SECONDS = 120.0  # after it decided: swap and commit, or the hand-back
GONE_SECONDS = 15.0  # for a killed daemon to disappear
LOCK_SECONDS = 60.0


def records(state_dir: Path, component: str, tx: str) -> list[dict[str, Any]] | None:
    """The records of transaction ``tx`` so far; None once it is not the open one."""
    recs = Journal(state_dir / "journal" / f"{component}.log").open_transaction() or []
    return recs if recs and recs[0].get("tx") == tx else None


def steps(state_dir: Path, component: str, tx: str) -> list[str] | None:
    """The steps of transaction ``tx`` so far; None once it is no longer the open one."""
    recs = records(state_dir, component, tx)
    return None if recs is None else [str(r.get("step")) for r in recs]


STOPPED: list[bool] = []  # SIGTERM came while the daemon lived: a stop, not a verdict


def on_sigterm(daemon: int) -> None:
    def handler(_signum: int, _frame: object) -> None:
        if os.getppid() == daemon:
            STOPPED.append(True)

    signal.signal(signal.SIGTERM, handler)


def watch(cfg: dict[str, Any]) -> str | None:
    """Wait for the trial run to settle; returns why it did not (None: it settled)."""
    state_dir = Path(cfg["state_dir"])
    daemon = int(cfg["pid"])
    deadline = cfg.get("deadline_ms", 0) / 1000 or boottime() + 120.0
    while True:
        done = steps(state_dir, cfg["component"], cfg["tx"])
        if done is None:
            return None
        if "healthy" in done or "unhealthy" in done:
            deadline = max(deadline, boottime() + SETTLE_SECONDS)
        if os.getppid() != daemon:
            return "the daemon exited during its trial run"
        if boottime() > deadline + GRACE_SECONDS:
            with contextlib.suppress(OSError):
                os.kill(daemon, signal.SIGKILL)
            gone = boottime() + GONE_SECONDS
            while os.getppid() == daemon and boottime() < gone:
                time.sleep(POLL_SECONDS)
            return f"not healthy by its deadline ({cfg.get('seconds', '?')} s): stopped"
        time.sleep(POLL_SECONDS)


def recover(cfg: dict[str, Any], why: str) -> list[str]:
    """Take the lock (waiting for the dead daemon's to go), record ``why``, recover."""
    node = Node(Path(cfg["state_dir"]))
    until = time.monotonic() + LOCK_SECONDS
    while True:
        try:
            node.lock.acquire(blocking=False)
            break
        except DaemonError:
            if time.monotonic() > until:
                raise
            time.sleep(POLL_SECONDS)
    try:
        applier = Applier(node)
        done = steps(node.root, cfg["component"], cfg["tx"])
        if done is not None and "healthy" not in done and "unhealthy" not in done:
            applier.fail_trial(cfg["component"], cfg["tx"], why)
        return applier.recover()
    finally:
        node.lock.release()


def main(argv: list[str]) -> int:
    setup_logging("info")
    cfg = json.loads(argv[0])
    on_sigterm(int(cfg["pid"]))
    cfg.update(_trial_deadline(cfg))
    why = watch(cfg)
    if why is None:
        return 0
    if STOPPED:
        return 0  # stopped, not failed: the next start counts an interruption
    log("self-update-watchdog", level=logging.WARNING, component=cfg["component"], reason=why)
    try:
        for line in recover(cfg, why):
            log("recovered", detail=line)
    except (DaemonError, P2pupdError) as exc:
        log("self-update-watchdog-failed", level=logging.ERROR, reason=str(exc))
    if os.environ.get("INVOCATION_ID"):
        return 0  # systemd restarts the unit: `current`, the old version, recovers too
    exe = cfg["launcher"]
    log("self-update-exec", launcher=exe, reason="the old version takes over again")
    for h in logging.getLogger().handlers + logging.getLogger("p2pupd").handlers:
        h.flush()
    try:
        os.execv(exe, [exe, *cfg["argv"]])
    except OSError as exc:
        log("self-update-watchdog-failed", level=logging.ERROR, reason=f"{exe}: {exc.strerror}")
    return 1


def _trial_deadline(cfg: dict[str, Any]) -> dict[str, Any]:
    """The deadline and seconds of the trial record (the journal is the one source)."""
    try:
        recs = records(Path(cfg["state_dir"]), cfg["component"], cfg["tx"]) or []
    except (DaemonError, P2pupdError):
        return {}
    trial = next((r for r in recs if r.get("step") == "trial"), {})
    return {k: trial[k] for k in ("deadline_ms", "seconds") if k in trial}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
