"""p2pupd as the field gets it, for the self-update tests.

``source_copy`` copies this checkout's files (tracked ones, and new ones git
does not ignore) with another version number. ``_dist.build_artifact(...,
source=copy, offline=True)`` then builds that version's artifact with the
builder ``make dist`` runs, from the wheels build/dist-cache already holds,
and ``install`` runs the artifact's own install.sh into a scratch root:
``ROOT/opt/p2pupd/VERSION`` is a version directory exactly as a node gets
one, and that tree is what a release of p2pupd carries (docs/self-update.md).

``broken_tree`` makes a release that must fail from such a tree: one module
changed so that the daemon exits at start-up (a one-module regression, the
kind a release really brings; --version still works, so an installer's smoke
test would pass), its bytecode compiled again as pip compiled the rest.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from _dist import ROOT, base_interpreter

# Appended to daemon/service/app.py of a broken build: the daemon command
# exits with status 1 once its modules are imported (--version still works,
# so the installer's smoke test passes, as it would for a real regression).
BROKEN_DAEMON = '''

def main(options: DaemonOptions) -> int:  # noqa: F811 -- broken on purpose
    """This build's daemon exits at start-up (tests/integration/test_self_update.py)."""
    print("p2pupd: error: this build of the daemon is broken on purpose", file=sys.stderr)
    return 1
'''


def source_files() -> list[str]:
    """This checkout's files as a release would be cut from them (uncommitted work too)."""
    r = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    return [f for f in r.stdout.decode().split("\0") if f and (ROOT / f).is_file()]


def source_copy(dest: Path, version: str) -> Path:
    """A copy of this checkout whose pyproject says ``version``."""
    for rel in source_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    pyproject = dest / "pyproject.toml"
    text, n = re.subn(r'(?m)^version = "[^"]*"$', f'version = "{version}"', pyproject.read_text())
    assert n == 1, "pyproject.toml has no version line"
    pyproject.write_text(text)
    return dest


def broken_tree(tree: Path, dest: Path) -> Path:
    """A copy of the version directory ``tree`` whose daemon exits at start-up."""
    subprocess.run(["cp", "-a", str(tree), str(dest)], check=True, timeout=300)
    (app,) = dest.glob("lib/python*/site-packages/p2pupd/daemon/service/app.py")
    app.write_text(app.read_text() + BROKEN_DAEMON)
    subprocess.run(
        [str(base_interpreter()), "-I", "-m", "py_compile", str(app)], check=True, timeout=60
    )
    return dest


def project_version() -> str:
    m = re.search(r'(?m)^version = "([^"]*)"$', (ROOT / "pyproject.toml").read_text())
    assert m is not None
    return m[1]


def install(artifact: Path, root: Path) -> Path:
    """Run ``artifact``'s install.sh into ``root`` (no unit, no udev, no PATH link);
    returns the prefix directory (``root/opt/p2pupd``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    r = subprocess.run(
        [str(artifact / "install.sh"), "--root", str(root), "--python", str(base_interpreter()),
         "--no-systemd", "--no-udev", "--no-path-link"],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return root / "opt" / "p2pupd"


def build_requirements() -> Path:
    """The cached setuptools and wheel ``make dist`` builds p2pupd with (build/dist-cache)."""
    found = sorted((ROOT / "build" / "dist-cache").glob("build-requires-*"))
    assert found, "build/dist-cache has no build requirements: build the artifact first"
    return found[-1]


def has_commit(commit: str) -> bool:
    r = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"],
                       capture_output=True, timeout=60, check=False)  # fmt: skip
    return r.returncode == 0


def old_p2pupd(commit: str, dest: Path, wheels: Path) -> Path:
    """p2pupd as it was at ``commit`` of this repository's history, installed into a
    venv of its own with no index (its dependencies from ``wheels``, an artifact's
    wheel folder, and setuptools from build/dist-cache); returns its command."""
    src = dest / "src"
    src.mkdir(parents=True)
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit],
                         capture_output=True, timeout=120, check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(src)], input=tar, check=True, timeout=120)
    venv = dest / "venv"
    subprocess.run([str(base_interpreter()), "-m", "venv", "--without-pip", str(venv)],
                   check=True, timeout=120)  # fmt: skip
    (pip,) = wheels.glob("pip-*.whl")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env["PIP_CONFIG_FILE"] = os.devnull
    r = subprocess.run(
        [str(venv / "bin" / "python"), str(pip / "pip"), "install", "--quiet", "--no-index",
         "--no-cache-dir", "--disable-pip-version-check", "--find-links", str(wheels),
         "--find-links", str(build_requirements()), str(src)],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return venv / "bin" / "p2pupd"
