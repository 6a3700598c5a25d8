"""The offline installer artifact, installed where there is no network.

The artifact for this machine's CPU and CPython is built once per session
(tests/conftest.py, _dist.py: wheels cached under build/dist-cache). Inside a network namespace
with loopback only and no route, its install.sh installs into a scratch root
(``--root``) with pip ``--no-index``; then the installed copy runs
``--version``, ``init``, ``import`` of a stick and ``status``. The environment
is laced with PYTHONPATH and PIP_* settings that would derail an installer or
launcher that was not isolated from the box. A second run changes nothing;
each refusal (another CPU, another CPython, a damaged wheel) is one line and
writes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from _dist import ROOT, base_interpreter, this_arch, this_python
from _kit import Site, tree_snapshot
from _netns import Host, netns_unavailable, offline_host

pytestmark = [pytest.mark.netns, pytest.mark.slow]

UNIT_EXEC = "ExecStart=/opt/p2pupd/current/bin/p2pupd daemon --config /etc/p2pupd/config.toml"
# Connect to an address of the test range: with no route, the kernel answers
# ENETUNREACH at once and no packet is sent.
CONNECT_PROBE = """
import errno, socket
try:
    socket.create_connection(("169.254.77.250", 9), timeout=5)
except OSError as exc:
    print(errno.errorcode.get(exc.errno or 0, exc))
else:
    print("connected")
"""


@pytest.fixture(scope="module")
def artifact(dist_artifact: Path) -> Path:
    return dist_artifact  # built once per session (tests/conftest.py)


@pytest.fixture
def offline() -> Iterator[Host]:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with offline_host() as host:
        yield host


def hostile_env(base: Path) -> dict[str, str]:
    """The caller's environment plus a decoy p2pupd on PYTHONPATH and pip
    settings under which a non-isolated pip could not install at all."""
    decoy = base / "decoy"
    (decoy / "p2pupd" / "tools").mkdir(parents=True)
    (decoy / "p2pupd" / "tools" / "__init__.py").write_text("")
    (decoy / "p2pupd" / "tools" / "cli.py").write_text("print('decoy p2pupd')\n")
    (decoy / "constraints.txt").write_text("trio==0.1.0\n")
    return {
        **os.environ,
        "PYTHONPATH": str(decoy),
        "PIP_CONSTRAINT": str(decoy / "constraints.txt"),
        "PIP_NO_BINARY": ":all:",
        "PIP_FIND_LINKS": str(decoy),
    }


def manifest_version(artifact: Path) -> str:
    return str(json.loads((artifact / "manifest.json").read_text())["version"])


def test_installs_offline_and_the_installed_copy_runs(
    artifact: Path, offline: Host, tmp_path: Path
) -> None:
    env = hostile_env(tmp_path)
    python = str(base_interpreter())
    # The namespace has no network: no route at all, and a connection fails at once.
    assert offline.run(["ip", "route", "show"]).stdout.strip() == ""
    probe = offline.run([python, "-I", "-c", CONNECT_PROBE])
    assert probe.stdout.strip() == "ENETUNREACH", probe.stdout + probe.stderr

    root = tmp_path / "root"
    r = offline.run(
        [str(artifact / "install.sh"), "--root", str(root), "--python", python],
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""

    version = manifest_version(artifact)
    prefix = root / "opt" / "p2pupd"
    vdir = prefix / version
    assert os.readlink(prefix / "current") == version
    cfg = (vdir / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg
    # Nothing in the version directory names this box (a release of p2pupd is
    # this tree): the interpreter is reached through one link beside the versions.
    assert "home" not in cfg and python not in cfg
    assert os.readlink(vdir / "bin" / f"python{this_python()}") == f"../../python{this_python()}"
    assert os.readlink(prefix / f"python{this_python()}") == os.path.realpath(python)
    assert sorted(p.name for p in (vdir / "bin").iterdir()) == sorted(
        ["p2pupd", "python", "python3", f"python{this_python()}"]
    )
    assert os.readlink(root / "usr/local/bin/p2pupd") == "/opt/p2pupd/current/bin/p2pupd"
    unit = (root / "etc/systemd/system/p2pupd.service").read_text()
    assert UNIT_EXEC in unit.splitlines()
    systemd = ROOT / "tools" / "systemd"
    rule = root / "etc/udev/rules.d/99-p2pupd-usb.rules"
    assert rule.read_bytes() == (systemd / "99-p2pupd-usb.rules").read_bytes()
    config = root / "etc/p2pupd/config.toml"
    assert config.read_bytes() == (systemd / "config.toml").read_bytes()
    assert stat.S_IMODE((root / "var/lib/p2pupd").stat().st_mode) == 0o700

    exe = str(prefix / "current" / "bin" / "p2pupd")

    def node(*args: str | Path) -> str:
        res = offline.run([exe, *map(str, args)], env=env)
        assert res.returncode == 0, res.stderr
        return res.stdout

    assert node("--version") == f"p2pupd {version}\n"

    site = Site(tmp_path / "publisher")
    src = site.publish(
        "1.0", {"bin/app": b"#!/bin/sh\necho 1.0\n", "share/data": os.urandom(300_000)}
    )
    stick = site.bundle("stick")
    state, target = tmp_path / "node" / "state", tmp_path / "node" / "srv" / "app"
    target.parent.mkdir(parents=True)
    node("init", "--state-dir", state, "--trust", site.root_file, "--component", f"app={target}")
    node("import", stick, "--state-dir", state, "--apply")
    status = json.loads(node("status", "--state-dir", state, "--json"))
    assert status["components"]["app"]["version"] == "1.0"
    assert tree_snapshot(target) == tree_snapshot(src)

    # A version directory works wherever it is kept (as a self-update keeps it).
    moved = prefix / ".current.p2pupd-v2"
    subprocess.run(["cp", "-a", str(vdir), str(moved)], check=True)
    res = offline.run([str(moved / "bin" / "python"), "-I", "-c",
                       "import p2pupd.tools.cli as c; print(c.__file__)"])  # fmt: skip
    assert res.stdout.startswith(f"{moved}/lib/"), res.stdout + res.stderr
    res = offline.run([str(moved / "bin" / "p2pupd"), "--version"], env=env)
    assert res.stdout == f"p2pupd {version}\n", res.stderr
    shutil.rmtree(moved)

    # Again: nothing changes, and the operator's config edit stays.
    config.write_text(config.read_text() + "# site edit\n")
    before = (
        vdir.stat().st_ino,
        os.readlink(prefix / "current"),
        (root / "etc/systemd/system/p2pupd.service").stat().st_mtime_ns,
    )
    r = offline.run(
        [str(artifact / "install.sh"), "--root", str(root), "--python", python], env=env
    )
    assert r.returncode == 0, r.stderr
    assert "already installed" in r.stdout
    after = (
        vdir.stat().st_ino,
        os.readlink(prefix / "current"),
        (root / "etc/systemd/system/p2pupd.service").stat().st_mtime_ns,
    )
    assert after == before
    assert config.read_text().endswith("# site edit\n")


def refuse(argv: list[str]) -> str:
    """Run an install that must be refused; returns its one line."""
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("p2pupd install: refused: "), r.stderr
    return lines[0]


def linked_copy(artifact: Path, dest: Path) -> Path:
    """A copy of the artifact sharing file data (hard links); replace a file
    only by unlinking it first."""
    shutil.copytree(artifact, dest, copy_function=os.link)
    return dest


def test_refuses_another_cpu(artifact: Path, tmp_path: Path) -> None:
    other = "aarch64" if this_arch() == "x86_64" else "x86_64"
    copy = linked_copy(artifact, tmp_path / "copy")
    script = (copy / "install.sh").read_text()
    (copy / "install.sh").unlink()
    (copy / "install.sh").write_text(script.replace(f"ARCH={this_arch()}\n", f"ARCH={other}\n"))
    (copy / "install.sh").chmod(0o755)
    line = refuse([str(copy / "install.sh"), "--root", str(tmp_path / "root")])
    assert f"this artifact is for linux-{other}; this machine is linux-{this_arch()}" in line
    assert not (tmp_path / "root").exists()


def test_refuses_a_damaged_wheel(artifact: Path, tmp_path: Path) -> None:
    copy = linked_copy(artifact, tmp_path / "copy")
    wheel = next((copy / "wheels").glob("trio-*.whl"))
    data = wheel.read_bytes()
    wheel.unlink()
    wheel.write_bytes(data[: len(data) // 2])  # a copy cut short
    line = refuse([str(copy / "install.sh"), "--root", str(tmp_path / "root"),
                   "--python", str(base_interpreter())])  # fmt: skip
    assert f"artifact file damaged: wheels/{wheel.name} does not match SHA256SUMS" in line
    assert not (tmp_path / "root").exists()


def other_python() -> str | None:
    """A CPython 3.x of another minor version than the artifact's that runs:
    on PATH, in /usr/bin, or installed by pyenv (whose shims only run the
    versions pyenv has selected)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for minor in ("3.13", "3.12", "3.10", "3.9", "3.11"):
        if minor == this_python():
            continue
        candidates = [shutil.which(f"python{minor}"), f"/usr/bin/python{minor}"]
        candidates += [str(p) for p in sorted(pyenv.glob(f"{minor}.*/bin/python{minor}"))]
        for path in candidates:
            if not path or not os.access(path, os.X_OK):
                continue
            r = subprocess.run([path, "-c", ""], capture_output=True, timeout=30, check=False)
            if r.returncode == 0:
                return path
    return None


def test_refuses_a_python_it_has_no_wheels_for(artifact: Path, tmp_path: Path) -> None:
    python = other_python()
    if python is None:
        pytest.skip("no CPython of another minor version on this machine")
    line = refuse([str(artifact / "install.sh"), "--root", str(tmp_path / "root"),
                   "--python", python])  # fmt: skip
    assert f"this artifact has wheels for CPython {this_python()}" in line
    assert not (tmp_path / "root").exists()
