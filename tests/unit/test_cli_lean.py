"""``p2pupd daemon`` loads what the daemon runs, not what the other commands need."""

from __future__ import annotations

import subprocess
import sys

# In a fresh interpreter: the command line as ``p2pupd daemon`` starts it (its
# parser built, ``--help`` stopping it before it runs), then the daemon's own
# service module; print which of the other commands' heavy imports came along.
PROBE = """
import sys
from p2pupd.tools import cli
try:
    cli.main(["daemon", "--help"])
except SystemExit:
    pass
from p2pupd.daemon.service import app
heavy = ("rich", "pyfastcdc", "hdiffpatch", "wasmtime", "p2pupd.tools.publisher.repo",
         "p2pupd.tools.demo", "importlib.metadata")
print(" ".join(m for m in heavy if m in sys.modules) or "-")
"""


def test_the_daemon_command_leaves_the_publisher_and_table_libraries_unloaded() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[-1] == "-", out


def test_other_commands_still_find_every_command() -> None:
    parser = __import__("p2pupd.tools.cli", fromlist=["build_parser"]).build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("publish", "import", "daemon", "fleet", "demo", "site", "peers"):
        assert name in sub.choices, name


def test_version_is_printed_on_stdout() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "p2pupd.tools.cli", "--version"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.startswith("p2pupd "), (r.stdout, r.stderr)
