"""The offline installer artifact for this machine's CPU and CPython, as tests use it.

Built by installer/build.py (what ``make dist`` runs), narrowed to one CPU and
one CPython version. Producing it needs the package index once: dependency
wheels are cached under build/dist-cache, keyed by pyproject.toml and
installer/constraints.txt and shared with ``make dist``. The p2pupd wheel is
rebuilt from the working tree each time, offline (setuptools is in the same
cache), so the artifact under test always carries the code under test.
Installing from it never needs the index.

There is no fallback that fakes the wheelhouse from the test venv's installed
packages: those are not the wheels the artifact ships, so a pass would prove
nothing about the artifact. Without the index and without a cache the build
fails and says so.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCHES = {"x86_64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64", "amd64": "x86_64"}


class ArtifactBuildError(Exception):
    """The artifact could not be built (the message carries build.py's words)."""


def this_arch() -> str | None:
    return ARCHES.get(platform.machine().lower())


def this_python() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def base_interpreter() -> Path:
    """The CPython binary under the test venv: what an operator's box would have."""
    minor = this_python()
    return Path(sys.base_prefix) / "bin" / f"python{minor}"


def build_artifact(
    out: Path, timeout: float = 900, source: Path = ROOT, offline: bool = False
) -> Path:
    """Build and unpack the artifact of the tree ``source`` into ``out``; returns its
    top directory. Dependency wheels come from this checkout's build/dist-cache
    (``offline``: only from there)."""
    arch = this_arch()
    argv = [sys.executable, str(source / "installer" / "build.py"), "dist",
            "--out", str(out / "dist"), "--cache", str(ROOT / "build" / "dist-cache"),
            "--arch", str(arch), "--python", this_python(),
            *(["--offline"] if offline else [])]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise ArtifactBuildError(
            f"building the artifact failed (the first build needs the package index; later "
            f"ones use build/dist-cache): {r.stderr.strip() or r.stdout.strip()}"
        )
    tars = sorted((out / "dist").glob(f"p2pupd-*-linux-{arch}.tar.gz"))
    if len(tars) != 1:
        raise ArtifactBuildError(f"expected one artifact, found {tars}")
    (out / "unpacked").mkdir()
    # As an operator unpacks it.
    subprocess.run(["tar", "-xzf", str(tars[0]), "-C", str(out / "unpacked")], check=True)
    return out / "unpacked" / tars[0].name[: -len(".tar.gz")]
