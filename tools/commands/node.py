"""Node commands: init, import, apply, rollback, status, history."""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from p2pupd.daemon import api
from p2pupd.protocol.limits import (
    HOOK_DEFAULT_FUEL,
    HOOK_DEFAULT_MEMORY_BYTES,
    HOOK_DEFAULT_SECONDS,
    MiB,
)
from p2pupd.tools.commands import bundle as cmd_bundle
from p2pupd.tools.commands.base import EXIT_OK, Adder, UsageError, out, state_dir


def _state(args: argparse.Namespace) -> Path:
    return state_dir(args)


def cmd_init(args: argparse.Namespace) -> int:
    comps: dict[str, Path] = {}
    for c in args.component:
        name, _, target = c.partition("=")
        if not target:
            raise UsageError(f"--component wants NAME=TARGET, got {c!r}")
        comps[name] = Path(target)
    health: tuple[str, ...] | None = None
    if args.health_cmd is not None:
        try:
            health = tuple(shlex.split(args.health_cmd))
        except ValueError as exc:
            raise UsageError(
                f"--health-cmd {args.health_cmd!r}: {exc} (quote it as for a shell)"
            ) from None
    options = api.ComponentOptions(
        kind=args.kind,
        health_cmd=health,
        health_seconds=args.health_timeout,
        retain=args.retain,
        immutable=args.immutable,
        auto_apply=args.auto_apply,
        allow_hazardous_modes=args.allow_hazardous_modes,
    )
    if not comps and args.self_update is None:
        raise UsageError("init needs --component NAME=TARGET or --self-update PREFIX")
    cfg = api.init_node(
        _state(args),
        Path(args.trust),
        comps,
        options=options,
        platform=args.platform,
        hook_limits=_hook_limits(args),
        self_update=None if args.self_update is None else Path(args.self_update),
        site_file=Path(args.site) if args.site else None,
    )
    print(f"initialised {_state(args)}: components {', '.join(sorted(cfg.components))}")
    return EXIT_OK


def _hook_limits(args: argparse.Namespace) -> api.HookLimits | None:
    """The ``--hook-*`` options as limits (unset ones default), or ``None`` if none given."""
    given = (args.hook_fuel, args.hook_memory_mib, args.hook_seconds)
    if all(v is None for v in given):
        return None
    d = api.HookLimits()
    try:
        return api.HookLimits(
            d.fuel if args.hook_fuel is None else args.hook_fuel,
            d.memory_bytes if args.hook_memory_mib is None else args.hook_memory_mib * MiB,
            d.seconds if args.hook_seconds is None else args.hook_seconds,
        )
    except api.ConfigError as exc:
        raise UsageError(str(exc)) from None


def cmd_import(args: argparse.Namespace) -> int:
    """``import`` lives with the other sneakernet commands in cmd_bundle."""
    return cmd_bundle.cmd_import(args)


def cmd_apply(args: argparse.Namespace) -> int:
    r = api.apply(_state(args), args.component, version=args.version, force=args.force)
    skipped = None if r.changed or args.version else _newest_marked_bad(args, r.serial)
    doc = {
        "component": r.component,
        "version": r.version,
        "serial": r.serial,
        "changed": r.changed,
        "previous": r.previous,
        "newest_marked_bad": skipped,
    }

    def human() -> None:
        print(f"{r.component} {r.version} is live" + ("" if r.changed else " (no change)"))
        if skipped is not None:
            c, v, s = r.component, str(skipped["version"] or "?"), skipped["serial"]
            print(
                f"note: the newest release, {c} {v} (serial {s}), is marked bad here: "
                f"{skipped['reason']}; retry it with `p2pupd apply {c} --version {shlex.quote(v)} "
                f"--force`, or clear the mark with `p2pupd mark-good {c} {s}`"
            )

    out(args, doc, human)
    return EXIT_OK


def _newest_marked_bad(args: argparse.Namespace, live: int) -> dict[str, object] | None:
    """The newest stored release, if it is newer than ``live`` and marked bad here."""
    comp = api.status(_state(args))["components"].get(args.component) or {}
    newest = comp.get("available")
    if not newest or newest["serial"] <= live or str(newest["serial"]) not in comp["bad"]:
        return None
    return {**newest, "reason": comp["bad"][str(newest["serial"])]}


def cmd_mark_good(args: argparse.Namespace) -> int:
    serial = api.mark_good(_state(args), args.component, args.serial, args.version)
    doc = {"component": args.component, "serial": serial}
    out(
        args,
        doc,
        lambda: print(
            f"{args.component} serial {serial} is no longer marked bad here "
            f"(`p2pupd apply {args.component}` applies the newest release)"
        ),
    )
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    r = api.rollback(_state(args), args.component)
    doc = {"component": r.component, "version": r.version, "serial": r.serial}
    out(args, doc, lambda: print(f"rolled {r.component} back to {r.version}"))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    doc = api.status(_state(args))

    def human() -> None:
        print(
            f"node {doc['node_id'][:12]}  platform {doc['platform']}  root v{doc['root_version']}"
        )
        site = doc.get("site") or {}
        if not site.get("configured"):
            print(f"warning: {site.get('problem', 'no site configured')}")
        elif site.get("member"):
            print(f"site {site['name']}: member")
        else:
            print(f"site {site.get('name', '?')}: NOT a member: {site.get('problem')}")
        print(
            f"{'COMPONENT':<16} {'VERSION':<14} {'SERIAL':>6}  {'AVAILABLE':<14} {'KEPT':<14} NOTE"
        )
        for name, c in doc["components"].items():
            avail = (c["available"]["version"] or "?") if c["available"] else "-"
            kept = ",".join(k["version"] or "?" for k in c["kept"]) or "-"
            note = c["last_error"] or ""
            if c.get("transaction"):
                t = c["transaction"]
                note = f"open transaction: {t['op']} of serial {t['to']} at step {t['step']}"
            print(
                f"{name:<16} {c['version'] or '-':<14} {c['serial'] or '-':>6}  {avail:<14} {kept:<14} {note}"
            )

    out(args, doc, human)
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    entries = api.history(_state(args), args.component)

    def human() -> None:
        for e in entries:
            t = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["time"]))
            line = f"{t}  {e['event']:<13} {e['version'] or '-':<14} "
            # A hook's output spans lines: keep them under the detail column.
            print(line + str(e["detail"]).replace("\n", "\n" + " " * len(line)))

    out(args, {"component": args.component, "history": entries}, human)
    return EXIT_OK


def register(add: Adder) -> None:
    sp = add(
        "init",
        cmd_init,
        "initialise a node: pin its trust root and configure components; re-run it to add "
        "or re-target components (settings not given again stay as they are)",
        state=True,
    )
    sp.add_argument("--trust", required=True, help="root.msgpack from the publisher")
    sp.add_argument(
        "--site", metavar="SITE.pub", help="the site this node belongs to (from `site init`)"
    )
    sp.add_argument(
        "--component", action="append", default=[], help="NAME=TARGET_DIR (repeatable)"
    )
    sp.add_argument(
        "--self-update",
        metavar="PREFIX",
        help="update p2pupd itself like a release: component p2pupd over PREFIX/current, "
        "where the offline installer put it (e.g. /opt/p2pupd; docs/self-update.md)",
    )
    sp.add_argument(
        "--kind", choices=["dir", "symlink", "file"], help="target kind (default: dir)"
    )
    sp.add_argument("--platform", help="this node's platform (default: detected)")
    sp.add_argument(
        "--health-cmd",
        help="command run after a swap, quoted as for a shell (e.g. 'sh -c \"exit 0\"'); "
        "non-zero exit rolls back; '' for none. It must resolve now (a path inside the "
        "target may appear with the first release)",
    )
    sp.add_argument("--health-timeout", type=float, help="seconds (default 30)")
    sp.add_argument("--retain", type=int, help="previous versions kept (default 2)")
    sp.add_argument(
        "--immutable",
        action=argparse.BooleanOptionalAction,
        help="targets are never modified in place: hard-link unchanged files (default: no)",
    )
    sp.add_argument(
        "--auto-apply",
        action=argparse.BooleanOptionalAction,
        help="apply a release as soon as it is complete here (default: yes)",
    )
    sp.add_argument(
        "--allow-hazardous-modes",
        action=argparse.BooleanOptionalAction,
        help="let releases install set-id files others can write and world-writable "
        "directories without the sticky bit (default: no, refused)",
    )
    sp.add_argument(
        "--hook-fuel", type=int, help=f"fuel per WebAssembly hook (default {HOOK_DEFAULT_FUEL:,})"
    )
    sp.add_argument(
        "--hook-memory-mib",
        type=int,
        help=f"hook memory limit in MiB (default {HOOK_DEFAULT_MEMORY_BYTES // MiB})",
    )
    sp.add_argument(
        "--hook-seconds",
        type=float,
        help=f"hook wall-clock deadline (default {HOOK_DEFAULT_SECONDS:g})",
    )

    cmd_bundle.register_import(add)

    sp = add(
        "apply",
        cmd_apply,
        "make a stored release of COMPONENT live (default: the newest)",
        json_opt=True,
        state=True,
    )
    sp.add_argument("component")
    sp.add_argument("--version", help="version label to apply")
    sp.add_argument("--force", action="store_true", help="retry a release that failed here before")

    sp = add(
        "mark-good",
        cmd_mark_good,
        "forget that a release of COMPONENT failed here (default: the newest marked bad), "
        "so it is applied again",
        json_opt=True,
        state=True,
    )
    sp.add_argument("component")
    sp.add_argument("serial", nargs="?", type=int, help="release serial (see `status --json`)")
    sp.add_argument("--version", help="the newest release with this version label")

    sp = add(
        "rollback",
        cmd_rollback,
        "make the previous kept version of COMPONENT live again",
        json_opt=True,
        state=True,
    )
    sp.add_argument("component")

    add(
        "status",
        cmd_status,
        "show installed, available and kept versions",
        json_opt=True,
        state=True,
    )
    sp = add(
        "history",
        cmd_history,
        "show what happened to COMPONENT on this node",
        json_opt=True,
        state=True,
    )
    sp.add_argument("component")
