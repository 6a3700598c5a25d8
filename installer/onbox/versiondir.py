"""The version directory: a virtualenv built from the artifact's wheels, offline.

Theory of operation. Each version lives in its own directory; the symlink
``current`` names the live one::

    /opt/p2pupd/0.1.0/        a virtualenv (PEP 405): bin/p2pupd (launcher),
                              bin/pythonX.Y -> ../../pythonX.Y, pyvenv.cfg,
                              lib/pythonX.Y/site-packages (p2pupd and every dependency)
    /opt/p2pupd/pythonX.Y -> /usr/bin/pythonX.Y   this box's CPython (the one
                              entry tied to the box, outside every version)
    /opt/p2pupd/current -> 0.1.0

A version directory is built under a scratch name beside its final one
(``.0.1.0.partial``) by pip from the artifact's wheels (``--no-index``), must
then run ``bin/p2pupd --version``, is flushed to disk and renamed into place:
a version directory that exists is whole and runs. ``current`` is then replaced
by renaming a new symlink over it, so at every instant it names one whole
version, the old or the new. That is the swap of p2pupd's own ``symlink``
target kind, so p2pupd can later update itself as a component whose target is
``/opt/p2pupd/current``. The launcher finds its version directory from its own
path, and a version directory names no path of this box: its interpreter
link is relative (``bin/python3.11 -> ../../python3.11``), resolved through
the one link beside the versions that names the box's CPython, and
pyvenv.cfg has no ``home`` (CPython then finds its standard library from the
interpreter the links lead to). So the tree is the same bytes on every box of
one CPU and CPython minor version: a release of p2pupd is such a tree,
published as is and swapped in by p2pupd itself (docs/self-update.md).

Running again is safe: a version directory whose install record matches this
artifact and interpreter, and which runs, is kept as it is. Older version
directories are kept too (going back is pointing ``current`` at one); nothing
here deletes them.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from layout import Layout, fsync_dir, point_link
from preflight import InstallError, Manifest

RECORD = "p2pupd-install.json"
# Seconds pip and the smoke test may take on a slow ARM box before we give up.
PIP_TIMEOUT = 900
SMOKE_TIMEOUT = 120

LAUNCHER = """\
#!/bin/sh
# p2pupd {version}, written by the offline installer. It finds its version
# directory from its own path (through /opt/p2pupd/current and any PATH link),
# so the tree works wherever it is kept. -I: no PYTHON* variables, no user
# site; the venv has no system site-packages: only this tree's libraries.
# exec: under systemd the Python process is the unit's main process.
bin=$(dirname -- "$(readlink -f -- "$0")") || exit 1
exec "$bin/python" -I -m p2pupd.tools.cli "$@"
"""


@dataclass(frozen=True)
class Interpreter:
    """The real binary of the CPython the venv binds to, never a shim or a
    ``python3`` link that a distribution upgrade may repoint to another minor
    version (the native wheels are built per minor version)."""

    path: str
    version: str  # "3.11.2"

    @property
    def minor(self) -> str:
        return ".".join(self.version.split(".")[:2])

    @classmethod
    def running(cls) -> Interpreter:
        exe = getattr(sys, "_base_executable", "") or sys.executable
        return cls(os.path.realpath(exe), platform.python_version())


def record_of(lay: Layout, sums_digest: str, py: Interpreter) -> dict[str, str]:
    return {
        "version": lay.version,
        "artifact": sums_digest,
        "python": py.path,
        "python_version": py.minor,
    }


def make_venv(dest: Path, py: Interpreter) -> None:
    """A virtualenv as PEP 405 defines it, portable between boxes. Not
    ``python -m venv``: that binds to the path the installer was started by
    (a shim, or a link a distribution may repoint), writes ``home`` and
    activate scripts with absolute paths, and on Debian needs the
    python3-venv package for ensurepip even when pip is not wanted.

    ``dest`` lies directly in the prefix, beside the link ``interpreter_link``
    makes (``../../pythonX.Y`` from its bin/)."""
    bindir = dest / "bin"
    site = dest / "lib" / f"python{py.minor}" / "site-packages"
    site.mkdir(parents=True)
    bindir.mkdir()
    os.symlink(f"../../python{py.minor}", bindir / f"python{py.minor}")
    os.symlink(f"python{py.minor}", bindir / "python3")
    os.symlink(f"python{py.minor}", bindir / "python")
    # No home/executable: CPython takes its base from the interpreter the
    # links resolve to, so nothing here names this box.
    (dest / "pyvenv.cfg").write_text(
        f"include-system-site-packages = false\nversion = {py.minor}\n"
    )


def interpreter_link(prefix: Path, py: Interpreter) -> None:
    """``PREFIX/pythonX.Y`` -> this box's CPython binary: the one name every
    version directory's bin/pythonX.Y leads to (replaced atomically)."""
    point_link(prefix / f"python{py.minor}", py.path)


def pip_env() -> dict[str, str]:
    """The environment pip runs in: no PIP_* (a box's find-links, index or
    constraints must not leak in) and no configuration file."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def pip_install(dest: Path, man: Manifest, artifact: Path) -> None:
    wheels = artifact / "wheels"
    argv = [
        str(dest / "bin" / "python"), "-I", str(wheels / man.pip_wheel / "pip"), "install",
        "--isolated", "--no-index", "--find-links", str(wheels), "--only-binary=:all:",
        "--no-cache-dir", "--disable-pip-version-check", "--no-warn-script-location",
        "--root-user-action=ignore", "--progress-bar=off", "--quiet",
        f"p2pupd=={man.version}",
    ]  # fmt: skip
    try:
        r = subprocess.run(
            argv, env=pip_env(), capture_output=True, text=True, timeout=PIP_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise InstallError(f"pip did not finish within {PIP_TIMEOUT} s") from None
    if r.returncode != 0:
        tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-3:]
        raise InstallError("pip install from the artifact's wheels failed: " + " | ".join(tail))


def write_launcher(dest: Path, version: str) -> None:
    """Replace pip's console scripts (absolute shebangs naming the scratch
    directory) with the one relocatable launcher."""
    bindir = dest / "bin"
    for entry in bindir.iterdir():
        if not entry.name.startswith("python"):
            entry.unlink()
    launcher = bindir / "p2pupd"
    launcher.write_text(LAUNCHER.format(version=version))
    launcher.chmod(0o755)


def smoke(dest: Path, version: str) -> str | None:
    """Run ``bin/p2pupd --version``; None if it printed this version, else why not."""
    try:
        r = subprocess.run(
            [str(dest / "bin" / "p2pupd"), "--version"],
            env=pip_env(), capture_output=True, text=True, timeout=SMOKE_TIMEOUT, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if r.returncode != 0 or r.stdout.strip() != f"p2pupd {version}":
        lines = (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}").splitlines()
        return lines[-1]
    return None


def reusable(lay: Layout, record: dict[str, str]) -> str | None:
    """None if the version directory is this build for this interpreter and
    runs; else why it cannot be kept."""
    try:
        have = json.loads((lay.version_dir / RECORD).read_text())
    except (OSError, ValueError):
        return "it has no install record"
    if have != record:
        return f"it was installed from another build or interpreter ({have.get('python', '?')})"
    why = smoke(lay.version_dir, lay.version)
    return None if why is None else f"it does not run: {why}"


def build_version(
    lay: Layout, man: Manifest, artifact: Path, py: Interpreter, record: dict[str, str]
) -> None:
    """Build the version directory under a scratch name, prove it runs, flush
    it and rename it into place (over an existing one only when forced)."""
    partial = lay.prefix_dir / f".{lay.version}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        interpreter_link(lay.prefix_dir, py)
        make_venv(partial, py)
        pip_install(partial, man, artifact)
        write_launcher(partial, lay.version)
        why = smoke(partial, lay.version)
        if why is not None:
            raise InstallError(f"the new {lay.version} does not run: {why}")
        (partial / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        os.sync()  # the whole tree is on disk before any name points at it
        old = lay.prefix_dir / f".{lay.version}.replaced"
        if lay.version_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(lay.version_dir, old)
        os.rename(partial, lay.version_dir)
        fsync_dir(lay.prefix_dir)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise InstallError(f"cannot build {lay.version_dir}: {exc}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
