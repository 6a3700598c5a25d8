"""Node configuration commands: ``config show``, ``config set``, ``config repair``.

The configuration lives in ``STATE/config.msgpack`` (see
daemon/state/nodeconfig.py for why it is not a hand-edited file); these
commands are how an operator reads and changes it. With a daemon running they
go through it, so a change is live at once.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from p2pupd.daemon import api
from p2pupd.tools.commands.base import EPILOG, EXIT_OK, Adder, out, state_dir


def cmd_show(args: argparse.Namespace) -> int:
    doc = api.config_show(state_dir(args))
    out(args, doc, lambda: print(_toml(doc), end=""))
    return EXIT_OK


def cmd_set(args: argparse.Namespace) -> int:
    doc = api.config_set(state_dir(args), args.key, args.value)
    value = _lookup(doc, args.key)
    out(args, doc, lambda: print(f"{args.key} = {json.dumps(value)}"))
    return EXIT_OK


def cmd_repair(args: argparse.Namespace) -> int:
    doc = api.config_repair(state_dir(args), platform=args.platform)

    def human() -> None:
        for note in doc["notes"]:
            print(f"note: {note}")
        cfg = doc["config"]
        comps = ", ".join(cfg["components"]) or "none"
        verb = "repaired" if doc["repaired"] else "left"
        print(f"{verb} the configuration of node {cfg['node_id'][:12]}: components {comps}")

    out(args, doc, human)
    return EXIT_OK


def _lookup(doc: dict[str, object], key: str) -> object:
    """The value at dotted ``key`` (component names may hold dots)."""
    if key.startswith("components."):
        name, _, field = key.removeprefix("components.").rpartition(".")
        return doc["components"][name][field]  # type: ignore[index]
    value: object = doc
    for part in key.split("."):
        value = value[part]  # type: ignore[index]
    return value


def _toml(doc: dict[str, Any]) -> str:
    """The ``config show --json`` document as TOML, with a word on how to change it."""
    lines = [
        "# this node's configuration (STATE/config.msgpack, binary: this is a rendering)",
        "# change a value with `p2pupd config set KEY VALUE`, KEY as below, e.g.",
        "#   p2pupd config set components.app.auto_apply false",
        "# node_id and cluster are fixed; a component's target and kind change with",
        "#   p2pupd init --component NAME=TARGET [--kind KIND]",
        f"node_id = {_value(doc['node_id'])}",
        f"platform = {_value(doc['platform'])}",
        f"cluster = {_value(doc['cluster'])}",
        "",
        "[hooks]",
        *(f"{k} = {_value(v)}" for k, v in doc["hooks"].items()),
    ]
    for name, comp in doc["components"].items():
        lines += ["", f'[components."{name}"]' if "." in name else f"[components.{name}]"]
        lines += [f"{k} = {_value(v)}" for k, v in comp.items()]
    return "\n".join(lines) + "\n"


def _value(v: Any) -> str:
    """One TOML value (JSON's string escapes are TOML's basic-string escapes)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(str(v)).replace("\x7f", "\\u007f")


def register(add: Adder) -> None:
    cp = add.sub.add_parser(
        "config",
        help="show, change or repair this node's configuration",
        description="show, change or repair this node's configuration (STATE/config.msgpack)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    csub = cp.add_subparsers(dest="config_command", metavar="ACTION", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--json", action="store_true", help="print a JSON document for scripts")
        sp.add_argument(
            "--state-dir",
            help="node state directory (default: $P2PUPD_STATE_DIR or /var/lib/p2pupd)",
        )

    sp = csub.add_parser("show", help="print the configuration (TOML-shaped; keys as `set` takes them)")
    sp.set_defaults(fn=cmd_show)
    common(sp)
    sp = csub.add_parser(
        "set",
        help="change one value, checked first; live at once when a daemon runs",
        description="change one value, e.g. `config set components.app.auto_apply false` or "
        "`config set components.app.health_cmd 'sh -c \"curl -fs localhost:8080/health\"'`. "
        "Keys: platform, hooks.fuel, hooks.memory_mib, hooks.seconds, and per component "
        "components.NAME.auto_apply, .retain, .immutable, .health_cmd, .health_timeout. "
        "Targets and kinds are changed with `p2pupd init --component NAME=TARGET`.",
    )
    sp.set_defaults(fn=cmd_set)
    sp.add_argument("key")
    sp.add_argument("value")
    common(sp)
    sp = csub.add_parser(
        "repair",
        help="rebuild a damaged configuration, keeping the node id and the high-water marks",
        description="rebuild a damaged STATE/config.msgpack from its backup copy, or from "
        "what of it survives; the node id is kept whenever any copy of it is readable, and "
        "installed versions, rollback high-water marks, releases and the trust root are not "
        "touched. Components that could not be kept are named: add them again with "
        "`p2pupd init --component NAME=TARGET`.",
    )
    sp.set_defaults(fn=cmd_repair)
    sp.add_argument("--platform", help="platform to record if none survives (default: detected)")
    common(sp)
