"""Inspection commands: ``p2pupd show`` and ``p2pupd verify`` (repository or bundle)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from p2pupd.protocol.errors import CodecError
from p2pupd.protocol.trust import TrustedRoot
from p2pupd.tools.commands.base import EXIT_OK, Adder, UsageError, now, out
from p2pupd.tools.publisher import inspect


def cmd_show(args: argparse.Namespace) -> int:
    doc = inspect.describe(inspect.load(Path(args.path)))

    def human() -> None:
        print(f"{doc['kind']} {args.path}")
        for r in doc["roots"]:
            roles = ", ".join(
                f"{n} {v['threshold']}-of-{len(v['keyids'])}" for n, v in sorted(r["roles"].items())
            )
            print(f"  root v{r['version']} ({r['name']}): {roles}")
        print(f"  {'COMPONENT':<14} {'VERSION':<12} {'SERIAL':>6} {'PLATFORM':<14} {'FILES':>6} "
              f"{'BYTES':>12} {'DELTAS':>6}  EXPIRES")  # fmt: skip
        for r in doc["releases"]:
            exp = time.strftime("%Y-%m-%d", time.gmtime(r["expires"])) if r["expires"] else "-"
            print(f"  {r['component']:<14} {r['version']:<12} {r['serial']:>6} "
                  f"{r['platform'] or 'any':<14} {r['files']:>6} {r['bytes']:>12} "
                  f"{r['deltas']:>6}  {exp}")  # fmt: skip
            if r.get("rollout"):
                print(f"  {'':<14} rollout: {r['rollout']}")

    out(args, doc, human)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    contents = inspect.load(Path(args.path))
    trust = None
    if args.trust:
        try:
            trust = Path(args.trust).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read trust root {args.trust}: {exc.strerror}") from None
        try:
            TrustedRoot.load(trust)
        except CodecError as exc:
            raise CodecError(f"{args.trust} is not a p2pupd root file ({exc})") from None
    doc = inspect.verify(contents, trust, now())
    out(args, doc, lambda: print(
        f"{contents.kind} {args.path} verifies against {doc['basis']}: root v{doc['root_version']}, "
        f"{doc['releases']} release(s), {doc['blobs_checked']} blob(s) checked"
    ))  # fmt: skip
    return EXIT_OK


def register(add: Adder) -> None:
    sp = add(
        "show", cmd_show, "list the roots and releases of a repository or bundle", json_opt=True
    )
    sp.add_argument("path", help="repository or bundle directory")
    sp = add(
        "verify",
        cmd_verify,
        "check a repository or bundle as a node would: signatures, root chain, every blob",
        json_opt=True,
    )
    sp.add_argument("path", help="repository or bundle directory")
    sp.add_argument("--trust", help="root.msgpack to verify against (default: its own root v1)")
