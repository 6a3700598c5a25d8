"""Shared pieces of the command line: exit codes, output helpers, the parser adder."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2pupd.daemon import api
from p2pupd.protocol.errors import P2pupdError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_UNFINISHED = 4

# An apply, import --apply or rollback that fails exits 1 only when the old
# version is live (nothing changed, or it was put back); 4 when it failed
# after the swap with the new version live: its transaction is still open and
# the next command (or `p2pupd recover`) settles it.

EPILOG = """exit codes: 0 ok, 1 operational error (an apply or rollback that fails with 1
left the old version live), 2 usage/configuration error, 3 refused by verification
(signature, threshold, hash, rollback, expiry, hostile input), 4 an apply or rollback
failed after its swap with the new version live (`p2pupd recover` settles it).
The state directory defaults to $P2PUPD_STATE_DIR, else /var/lib/p2pupd."""

Command = Callable[[argparse.Namespace], int]


class UsageError(P2pupdError):
    """Bad arguments (exit code 2)."""


def default_state_dir() -> Path:
    return Path(os.environ.get("P2PUPD_STATE_DIR", "/var/lib/p2pupd"))


def state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir) if getattr(args, "state_dir", None) else default_state_dir()


def now() -> int:
    """The clock trusted for expiry; ``P2PUPD_NOW`` overrides it (seconds since the
    epoch, or ISO-8601 UTC: see ``api.now_seconds``; a bad value is exit 2)."""
    return api.now_seconds()


def out(args: argparse.Namespace, doc: Any, human: Callable[[], None]) -> None:
    """Print ``doc`` as JSON under ``--json``, else call ``human``."""
    if getattr(args, "json", False):
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        human()


class Adder:
    """Adds subcommands with the common options (``--json``, ``--state-dir``)."""

    def __init__(self, sub: Any) -> None:
        self.sub = sub

    def __call__(
        self,
        name: str,
        fn: Command,
        help: str,
        json_opt: bool = False,
        state: bool = False,
    ) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = self.sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sp.set_defaults(fn=fn)
        if json_opt:
            sp.add_argument("--json", action="store_true", help="print a JSON document for scripts")
        if state:
            sp.add_argument(
                "--state-dir",
                help="node state directory (default: $P2PUPD_STATE_DIR or /var/lib/p2pupd)",
            )
        return sp
