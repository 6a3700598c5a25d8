"""Test helpers with no pytest dependency: trees, the in-process CLI, a publisher.

Shared by ``conftest.py``, ``_daemonkit.py`` and ``integration/_cluster.py``;
``tools/bench/swarm_bench.py`` loads ``_cluster`` (and so this module) from the
checkout, where pytest may not be installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
from pathlib import Path

from p2pupd.tools.cli import main as cli_main

TREE_MTIME = 1_790_000_000
TreeSnapshot = dict[str, tuple[str, int, str]]


class CommandError(AssertionError):
    """A CLI command run by a helper failed (the message has its stderr)."""


def cli(*args: str | Path) -> str:
    """Run the CLI in-process; returns stdout, raises ``CommandError`` on failure."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main([str(a) for a in args])
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
    if code != 0:
        raise CommandError(f"p2pupd {' '.join(map(str, args))} -> {code}: {err.getvalue()}")
    return out.getvalue()


def make_tree(
    root: Path,
    files: dict[str, bytes],
    links: dict[str, str] | None = None,
    empty_dirs: tuple[str, ...] = (),
) -> Path:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        # A fixed mtime: trees written in different seconds must still agree
        # on unchanged files (publishing records mtimes; hard links need them equal).
        os.utime(p, (TREE_MTIME, TREE_MTIME))
    for rel, target in (links or {}).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, p)
    for d in empty_dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    return root


def tree_snapshot(root: Path) -> TreeSnapshot:
    """Return {relpath: (kind, mode, content-hash or link target)} of a tree."""
    out: TreeSnapshot = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", 0, os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777, "")
            else:
                out[rel] = ("file", st.st_mode & 0o7777, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


class Site:
    """A publisher repository (1-of-1 root and release keys) and helpers around it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        keys = base / "keys"
        keys.mkdir(parents=True)
        cli("keygen", keys / "root.key")
        cli("keygen", keys / "rel.key")
        self.repo = base / "repo"
        cli("repo", "init", self.repo, "--root-key", keys / "root.key",
            "--release-key", keys / "rel.key")  # fmt: skip
        self.root_file = self.repo / "root.msgpack"
        self.sources: dict[str, Path] = {}

    def publish(self, version: str, files: dict[str, bytes], component: str = "app") -> Path:
        """Sign ``files`` as the next serial of ``component``; returns the source tree."""
        src = make_tree(self.base / "src" / f"{component}-{version}", files)
        cli("publish", self.repo, component, version, src)
        self.sources[version] = src
        return src

    def bundle(self, name: str) -> Path:
        """Export the repository's newest releases as bundle ``name``."""
        dest = self.base / "bundles" / name
        cli("export", self.repo, dest)
        return dest

    def node(
        self, name: str, component: str = "app", platform: str | None = None
    ) -> tuple[Path, Path]:
        """Initialise a node (of ``platform``, if given); returns (state dir, target dir)."""
        state = self.base / "nodes" / name / "state"
        target = self.base / "nodes" / name / "target" / component
        target.parent.mkdir(parents=True)
        extra = ("--platform", platform) if platform is not None else ()
        cli("init", "--state-dir", state, "--trust", self.root_file,
            "--component", f"{component}={target}", *extra)  # fmt: skip
        return state, target
