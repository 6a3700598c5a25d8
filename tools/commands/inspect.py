"""Inspection commands: ``p2pupd show`` and ``p2pupd verify`` (repository or bundle)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from p2pupd.protocol.errors import CodecError
from p2pupd.protocol.trust import TrustedRoot
from p2pupd.tools.commands.base import EXIT_OK, Adder, UsageError, now, out
from p2pupd.tools.publisher import inspect


def _load(args: argparse.Namespace) -> tuple[inspect.Contents, inspect.Basis | None]:
    """Read PATH; with --state-dir or --repo, rebuild the releases carried as patches."""
    contents = inspect.load(Path(args.path))
    if args.state_dir and args.repo:
        raise UsageError("give --state-dir or --repo, not both")
    held = None
    if args.state_dir:
        held = inspect.node_basis(Path(args.state_dir))
    elif args.repo:
        held = inspect.repo_basis(Path(args.repo))
    if held is not None:
        inspect.resolve(contents, held)
    return contents, held


def cmd_show(args: argparse.Namespace) -> int:
    contents, _ = _load(args)
    doc = inspect.describe(contents)

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
            patched = f"  (patch against {r['patch_against']})" if r["patch_against"] else ""
            print(f"  {r['component']:<14} {r['version']:<12} {r['serial']:>6} "
                  f"{r['platform'] or 'any':<14} {r['files']:>6} {r['bytes']:>12} "
                  f"{r['deltas']:>6}  {exp}{patched}")  # fmt: skip
        for p in doc["patched_releases"]:
            print(f"  {p['component']:<14} {p['version']:<12} {'?':>6} {'?':<14} {'?':>6} "
                  f"{'?':>12} {'?':>6}  ?  (patch against {p['patch_against']}: "
                  "not read; --state-dir of a node that holds it, or --repo REPO)")  # fmt: skip

    out(args, doc, human)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    contents, held = _load(args)
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
    doc = inspect.verify(contents, trust, now(), held)
    patched = f" ({doc['patched_releases']} rebuilt from patches)" if doc["patched_releases"] else ""
    out(args, doc, lambda: print(
        f"{contents.kind} {args.path} verifies against {doc['basis']}: root v{doc['root_version']}, "
        f"{doc['releases']} release(s){patched}, {doc['blobs_checked']} blob(s) checked"
    ))  # fmt: skip
    return EXIT_OK


def _basis_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--state-dir",
        help="a node's state directory: rebuilds releases carried as patches against what it "
        "holds (and, for verify, starts from its pinned root)",
    )
    sp.add_argument(
        "--repo",
        help="the publisher's repository: rebuilds releases carried as patches against its "
        "releases",
    )


def register(add: Adder) -> None:
    sp = add(
        "show", cmd_show, "list the roots and releases of a repository or bundle", json_opt=True
    )
    sp.add_argument("path", help="repository or bundle directory")
    _basis_options(sp)
    sp = add(
        "verify",
        cmd_verify,
        "check a repository or bundle as a node would: signatures, root chain, every blob",
        json_opt=True,
    )
    sp.add_argument("path", help="repository or bundle directory")
    sp.add_argument(
        "--trust",
        help="root.msgpack to verify against (default: the node's pinned root with "
        "--state-dir, else its own root v1)",
    )
    _basis_options(sp)
