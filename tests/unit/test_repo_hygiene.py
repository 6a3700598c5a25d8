"""The tree itself: no half-resolved merge is ever committed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^(<{7}|>{7})( |$)", re.M)
FOLDERS = ("protocol", "daemon", "tools", "tests", "docs", "installer")


def test_no_merge_conflict_markers() -> None:
    found = []
    paths = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    for folder in FOLDERS:
        paths += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".toml", ".sh")]
    for p in paths:
        if p.is_file() and MARKER.search(p.read_text(errors="replace")):
            found.append(str(p.relative_to(ROOT)))
    assert not found, f"merge conflict markers in {found}"


def test_every_package_folder_is_packaged() -> None:
    """A folder with an __init__.py that pyproject.toml does not list would be
    missing from the wheel (and from the offline installer) though editable
    installs find it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    names = {"protocol": "p2pupd.protocol", "daemon": "p2pupd.daemon", "tools": "p2pupd.tools"}
    found = set()
    for top, name in names.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join([name, *rel]))
    assert found <= listed, sorted(found - listed)
