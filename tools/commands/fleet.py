"""Site commands: ``p2pupd fleet`` (the site at a glance) and ``p2pupd rollout`` (steer it).

Both ask the running daemon: the site view is the signed reports it gathered
from its peers, and an operator action is signed with its node key and
spread by it (docs/rollouts.md says who may do what).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from p2pupd.daemon import api
from p2pupd.tools.commands.base import EXIT_OK, Adder, UsageError, out, state_dir

STATE_STYLE = {
    "committed": "green",
    "applying": "yellow",
    "failed": "bold red",
    "rolled-back": "red",
    "idle": "dim",
}
MAX_WATCH_SECONDS = 7 * 24 * 3600
PIPE_WIDTH = 200


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def node_table(doc: dict[str, Any]) -> Table:
    """One row per node and component: version, state, wait, last heard."""
    t = Table(title=f"site {doc['site']} ({len(doc['nodes'])} nodes)", title_justify="left")
    for col in ("NODE", "PLATFORM", "COMPONENT", "VERSION", "STATE", "DETAIL", "HEARD"):
        t.add_column(col, no_wrap=col != "DETAIL")
    for row in doc["nodes"]:
        name = row["node_id"][:12] + (" *" if row["self"] else "")
        heard = _ago(row["heard_seconds_ago"]) + ("" if row["live"] else " (silent)")
        for comp, c in sorted(row["components"].items()):
            state = c["state"]
            detail = c["reason"] if state in ("failed", "rolled-back") else ""
            if c["holds"] is not None and c["wait"]:
                detail = f"holds #{c['holds']}, waits: {c['wait']}"
            version = f"{c['version'] or '-'} (#{c['installed']})" if c["installed"] else "-"
            t.add_row(
                name, row["platform"], comp, version,
                Text(f"{state} #{c['serial']}" if c["serial"] else state,
                     style=STATE_STYLE.get(state, "")),
                detail, heard,
            )  # fmt: skip
    return t


def release_table(doc: dict[str, Any]) -> Table:
    """Per release: how far it got, and whether the brake or a halt holds it."""
    t = Table(title="releases", title_justify="left")
    for col in ("RELEASE", "ON IT", "APPLYING", "FAILED", "WAITING", "ROLLOUT"):
        t.add_column(col, no_wrap=col != "ROLLOUT")
    for r in doc["releases"]:
        name = f"{r['component']} #{r['serial']}" + (f" ({r['version']})" if r["version"] else "")
        rollout = "braked" if r["braked"] else "halted" if r["halted"] else ""
        waits = ", ".join(f"{n} {w}" for w, n in sorted(r["waits"].items()))
        here = r.get("here")
        notes = [x for x in (rollout, waits) if x]
        if here is not None:
            notes.append(f"here: {here['reason']}")
        if r["failures"]:
            f = r["failures"][0]
            notes.append(f"{f['node_id'][:12]}: {f['reason']}")
        t.add_row(
            name, f"{r['on_it'] + r['beyond']}/{r['nodes']}", str(r["applying"]),
            Text(str(r["failed"]), style="bold red" if r["failed"] else ""),
            str(r["waiting"]), "; ".join(notes),
        )  # fmt: skip
    return t


def render(doc: dict[str, Any]) -> Group:
    return Group(node_table(doc), release_table(doc))


def console() -> Console:
    """A console for the table: the terminal's width, or wide when piped (a script or
    a log reads whole node ids and reasons, not an 80-column cut)."""
    return Console() if sys.stdout.isatty() else Console(width=PIPE_WIDTH)


def cmd_fleet(args: argparse.Namespace) -> int:
    state = state_dir(args)
    if not args.watch:
        doc = api.fleet(state)
        out(args, doc, lambda: console().print(render(doc)))
        return EXIT_OK
    if args.json:
        raise UsageError("--watch shows a live table; use --json without it")
    with Live(render(api.fleet(state)), console=console(), refresh_per_second=4) as live:
        deadline = time.monotonic() + MAX_WATCH_SECONDS
        while time.monotonic() < deadline:
            time.sleep(args.interval)
            live.update(render(api.fleet(state)))
    return EXIT_OK


def cmd_rollout(args: argparse.Namespace) -> int:
    if args.action != "skip-wave" and args.wave is not None:
        raise UsageError("--wave goes with skip-wave only")
    doc = api.rollout_action(
        state_dir(args), args.action, args.component, serial=args.serial,
        version=args.version, reason=args.reason or "", wave=args.wave,
    )  # fmt: skip

    def human() -> None:
        what = f"{doc['component']} #{doc['serial']}"
        if doc["action"] == "halt":
            print(f"halted {what} on this node; the halt spreads to the site")
        elif doc["action"] == "resume":
            print(
                f"resumed {what}: lifts {doc['ack_halts']} halt(s), accepts "
                f"{doc['ack_failures']} failure(s)"
            )
        else:
            print(f"skipped wave {doc['wave']} of {what}")
        if doc["action"] != "halt" and not doc["operator"]:
            print(
                "note: this node's key is not a rollout operator key: other nodes will refuse "
                "it (see `[rollout] operators` in docs/rollouts.md)"
            )

    out(args, doc, human)
    return EXIT_OK


def register(add: Adder) -> None:
    sp = add(
        "fleet",
        cmd_fleet,
        "the site at a glance, from the reports the running daemon gathered",
        json_opt=True,
        state=True,
    )
    sp.add_argument("--watch", action="store_true", help="refresh the table live")
    sp.add_argument(
        "--interval", type=float, default=2.0, metavar="SECONDS", help="--watch refresh period"
    )
    sp = add(
        "rollout",
        cmd_rollout,
        "halt, resume or skip a wave of a release's rollout, site-wide",
        json_opt=True,
        state=True,
    )
    sp.add_argument("action", choices=["halt", "resume", "skip-wave"])
    sp.add_argument("component")
    which = sp.add_mutually_exclusive_group()
    which.add_argument("--version", help="the release by version (default: newest stored)")
    which.add_argument("--serial", type=int, help="the release by serial")
    sp.add_argument("--reason", help="one line saying why (shown on every node)")
    sp.add_argument(
        "--wave", type=int, help="skip-wave: the last wave to waive (default: the one waited on)"
    )
