"""The dependency rules of DESIGN.md, enforced by walking imports.

* protocol/ is pure: no sockets, files, clocks, threads, trio, zeroconf or
  wasmtime, and it imports neither daemon nor tools;
* daemon/ never imports tools;
* tools/ reaches the daemon only through ``p2pupd.daemon.api`` (benchmarks,
  which measure daemon parts directly, excepted).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN_IN_PROTOCOL = {
    "os",
    "io",
    "socket",
    "select",
    "selectors",
    "subprocess",
    "threading",
    "asyncio",
    "time",
    "pathlib",
    "shutil",
    "tempfile",
    "trio",
    "zeroconf",
    "wasmtime",
    "fcntl",
    "signal",
    "multiprocessing",
    "urllib",
    "http",
    "ssl",
    "datetime",
    "glob",
}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def files(folder: str) -> list[Path]:
    found = sorted((ROOT / folder).rglob("*.py"))
    assert found, folder
    return found


def test_protocol_is_pure() -> None:
    for f in files("protocol"):
        for name in imports(f):
            top = name.split(".")[0]
            assert top not in FORBIDDEN_IN_PROTOCOL, f"{f.name} imports {name}"
            assert not name.startswith(("p2pupd.daemon", "p2pupd.tools")), (
                f"{f.name} imports {name}"
            )


def test_daemon_does_not_import_tools() -> None:
    for f in files("daemon"):
        for name in imports(f):
            assert not name.startswith("p2pupd.tools"), f"{f.name} imports {name}"


def test_tools_use_only_the_daemon_api() -> None:
    for f in files("tools"):
        if "bench" in f.parts:
            continue
        for name in imports(f):
            if name.startswith("p2pupd.daemon"):
                assert name in ("p2pupd.daemon", "p2pupd.daemon.api"), f"{f.name} imports {name}"
