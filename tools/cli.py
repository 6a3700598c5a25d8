"""The ``p2pupd`` command line: parser assembly and error mapping.

Exit codes (documented in README and ``p2pupd --help``):
  0  success
  1  operational error (I/O, missing data, apply failed and rolled back);
     for apply, import --apply and rollback: the old version is live
  2  usage or configuration error; a bundle or state directory of a format
     newer than this p2pupd reads
  3  refused by verification (signature, threshold, hash, rollback, expiry,
     malformed or hostile input)
  4  an apply or rollback failed after its swap and the new version is live,
     its transaction still open (the next command or `p2pupd recover` settles it)
Every error is one line on stderr; a traceback appears only with P2PUPD_DEBUG=1.

Commands live in ``cmd_*`` modules, each with ``register(add)``; a new group of
commands is one module and one entry in ``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib import metadata

from p2pupd.daemon import api
from p2pupd.protocol.errors import (
    NewerFormatError,
    P2pupdError,
    RemoteProtocolError,
    UnsafePathError,
    VerificationError,
)
from p2pupd.tools import demo
from p2pupd.tools.commands import config as cmd_config
from p2pupd.tools.commands import daemon as cmd_daemon
from p2pupd.tools.commands import fleet as cmd_fleet
from p2pupd.tools.commands import inspect as cmd_inspect
from p2pupd.tools.commands import maint as cmd_maint
from p2pupd.tools.commands import node as cmd_node
from p2pupd.tools.commands import publisher as cmd_publisher
from p2pupd.tools.commands import site as cmd_site
from p2pupd.tools.commands.base import (
    EPILOG,
    EXIT_ERROR,
    EXIT_REFUSED,
    EXIT_UNFINISHED,
    EXIT_USAGE,
    Adder,
    UsageError,
)
from p2pupd.tools.publisher import keys
from p2pupd.tools.site.authority import SiteError

COMMAND_MODULES = [
    cmd_publisher, cmd_inspect, cmd_node, cmd_site, cmd_config, cmd_maint, cmd_daemon, cmd_fleet,
    demo,
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="p2pupd",
        description="Peer-to-peer and offline update distribution for air-gapped fleets.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"p2pupd {version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add = Adder(sub)
    for mod in COMMAND_MODULES:
        mod.register(add)
    return p


def version() -> str:
    """The installed distribution's version (pyproject.toml's), or "unknown"
    when run from a source tree that was never installed."""
    try:
        return metadata.version("p2pupd")
    except metadata.PackageNotFoundError:
        return "unknown"


def exit_code_for(exc: BaseException) -> int:
    """Map an error to its documented exit code."""
    if isinstance(exc, (VerificationError, RemoteProtocolError, UnsafePathError)):
        return EXIT_REFUSED
    if isinstance(
        exc, (UsageError, keys.KeyFileError, api.ConfigError, SiteError, NewerFormatError)
    ):
        return EXIT_USAGE
    if isinstance(exc, api.UnfinishedTransactionError):
        return EXIT_UNFINISHED
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.fn(args)
    except P2pupdError as exc:
        if os.environ.get("P2PUPD_DEBUG"):
            raise
        code = exit_code_for(exc)
        kind = "refused" if code == EXIT_REFUSED else "error"
        print(f"p2pupd: {kind}: {exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("p2pupd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_ERROR
    return code


if __name__ == "__main__":
    sys.exit(main())
