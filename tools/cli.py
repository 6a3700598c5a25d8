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

Commands live in modules under ``tools/commands``, each with ``register(add)``; a
new group of commands is one module and one entry in ``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from p2pupd.daemon import api
from p2pupd.protocol.errors import (
    NewerFormatError,
    P2pupdError,
    RemoteProtocolError,
    UnsafePathError,
    VerificationError,
)
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

_COMMANDS = "p2pupd.tools.commands."
COMMAND_MODULES = (
    *(
        _COMMANDS + name
        for name in ("publisher", "inspect", "node", "site", "config", "maint", "daemon", "fleet")
    ),
    "p2pupd.tools.demo",
)
# ``p2pupd daemon`` builds a parser of its own commands alone: a process that
# stays up for months need not hold the publisher, rich and hdiffpatch that
# the other commands import (measured: 61.5 MB idle RSS with them).
DAEMON_MODULES = (_COMMANDS + "daemon",)


def modules_for(argv: Sequence[str]) -> tuple[str, ...]:
    """The command modules a parser for ``argv`` needs."""
    return DAEMON_MODULES if argv[:1] == ["daemon"] else COMMAND_MODULES


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="p2pupd",
        description="Peer-to-peer and offline update distribution for air-gapped fleets.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action=_Version, nargs=0, help="show the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add = Adder(sub)
    for name in modules:
        importlib.import_module(name).register(add)
    return p


class _Version(argparse.Action):
    """``--version``, looked up when asked for, not by every command at start-up."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"p2pupd {version()}")
        parser.exit()


def version() -> str:
    """The installed distribution's version (pyproject.toml's), or "unknown"
    when run from a source tree that was never installed."""
    return api.installed_version() or "unknown"


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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(modules_for(argv))
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
