"""A process the crash tests can kill at any moment: drives the apply engine over a pipe.

``serve`` runs in a child the test forks from itself (everything is imported
already, so a kill is never wasted on interpreter start-up and a child costs
milliseconds); ``python _apply_driver.py STATE COMPONENT`` runs it on
stdin/stdout. It prints ``ready``, then runs one command per input line and
answers with one JSON line:

    recover                 finish or undo what a killed predecessor left
    apply SERIAL ok|fail    apply (forced) with a health check that passes or fails
    rollback                make the previous version live again
    crash POINT             SIGKILL at this transaction point from now on
    fault KIND POINT MNT    once, at POINT: fill the ext4 at MNT (``full``), remount it
                            read-only (``ro``), or cut its power and die (``shutdown``)
    forget                  clear the releases marked bad or interrupted (between cases)

A failed command answers ``ok`` false with the error and the CLI's exit code for it
(``exit``); every answer says whether an armed fault has fired (``fired``).

Each command takes the state lock for its duration, as the CLI does.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from p2pupd.daemon.apply import transaction
from p2pupd.daemon.apply.engine import Applier
from p2pupd.daemon.errors import HealthCheckFailedError
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.state.statedir import ComponentConfig
from p2pupd.protocol.errors import P2pupdError
from p2pupd.protocol.manifest import Manifest
from p2pupd.tools.cli import exit_code_for

FIRED: list[str] = []  # the fault that fired, if any


def passes(cfg: ComponentConfig, man: Manifest) -> None:
    return None


def fails(cfg: ComponentConfig, man: Manifest) -> None:
    raise HealthCheckFailedError("injected health failure")


def run(state: Path, component: str, cmd: str, args: list[str]) -> dict[str, Any]:
    node = Node(state)
    node.lock.acquire(blocking=True)
    try:
        if cmd == "recover":
            return {"recovered": Applier(node).recover()}
        if cmd == "apply":
            health = passes if args[1] == "ok" else fails
            r = Applier(node, health=health).apply(component, int(args[0]), force=True)
            return {"serial": r.serial}
        if cmd == "rollback":
            return {"serial": Applier(node).rollback(component).serial}
        if cmd == "crash":
            transaction._CRASH_AT = args[0]
            return {}
        if cmd == "fault":
            arm(*args)
            return {}
        if cmd == "forget":
            st = node.state.read_state(component)
            node.state.update_state(component, replace(st, bad={}, interrupted={}))
            return {}
        raise SystemExit(f"unknown command {cmd!r}")
    finally:
        node.lock.release()


def arm(kind: str, point: str, mnt: str) -> None:
    """Make the fault ``kind`` happen once, when the transaction reaches ``point``."""
    from _mounts import Ext4  # only the fault campaign needs it (and pytest)

    fs = Ext4(Path(), Path(mnt))
    FIRED.clear()

    def fault(at: str) -> None:
        if at != point or FIRED:
            return
        if kind == "full":
            fs.fill()
        elif kind == "ro":
            if not fs.set_readonly(True):
                return
        elif kind == "shutdown":
            fs.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)  # the power is off: nothing more runs
        FIRED.append(kind)

    transaction.FAULT = fault


def serve(state: Path, component: str, commands: TextIO, replies: TextIO) -> None:
    """Answer ``commands`` until end of input (see module doc)."""
    print("ready", file=replies, flush=True)
    for line in commands:
        cmd, *args = line.split()
        t0 = time.monotonic()
        try:
            reply = {"ok": True, **run(state, component, cmd, args)}
        except P2pupdError as exc:
            reply = {
                "ok": False,
                "error": type(exc).__name__,
                "message": str(exc),
                "exit": exit_code_for(exc),
            }
        reply["seconds"] = time.monotonic() - t0
        reply["fired"] = bool(FIRED)
        print(json.dumps(reply), file=replies, flush=True)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), sys.argv[2], sys.stdin, sys.stdout)
