"""The offline installer's pure parts: every refusal of preflight.py with its
message, the unit rendering, the glibc floor make dist computes from wheel
names, and the reproducible tarball."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "installer" / "onbox"))

import preflight  # noqa: E402
import systemfiles  # noqa: E402
from layout import Layout  # noqa: E402


def load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dist_build", ROOT / "installer" / "build.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


build = load_build()

MAN = preflight.Manifest(
    version="0.1.0",
    arch="aarch64",
    pythons=("3.11", "3.12", "3.13"),
    glibc=(2, 17),
    project_wheel="p2pupd-0.1.0-py3-none-any.whl",
    pip_wheel="pip-26.3-py3-none-any.whl",
)


def refused(fn: object, *args: object) -> str:
    with pytest.raises(preflight.RefusedError) as info:
        fn(*args)  # type: ignore[operator]
    return str(info.value)


def test_platform_is_the_interpreters_not_the_kernels() -> None:
    preflight.check_platform(MAN, "linux-aarch64")
    # A 32-bit ARM userland on a 64-bit kernel: uname says aarch64, wheels must not.
    msg = refused(preflight.check_platform, MAN, "linux-armv7l")
    assert msg == (
        "this artifact is for linux-aarch64; this Python is linux-armv7l: "
        "use the p2pupd-0.1.0-linux-armv7l artifact"
    )


def test_python_must_be_cpython_of_a_shipped_minor_version() -> None:
    preflight.check_python(MAN, "cpython", (3, 12))
    assert refused(preflight.check_python, MAN, "cpython", (3, 10)) == (
        "this artifact has wheels for CPython 3.11, 3.12, 3.13; this Python is 3.10"
    )
    assert "3.14" in refused(preflight.check_python, MAN, "cpython", (3, 14))
    assert refused(preflight.check_python, MAN, "pypy", (3, 11)) == (
        "p2pupd needs CPython; this is pypy 3.11"
    )


def test_glibc_floor_and_musl() -> None:
    preflight.check_libc(MAN, "glibc 2.17")
    preflight.check_libc(MAN, "glibc 2.36")
    assert refused(preflight.check_libc, MAN, "glibc 2.12") == (
        "this artifact needs glibc 2.17 or newer; this machine has glibc 2.12"
    )
    assert "not glibc (musl or unknown)" in refused(preflight.check_libc, MAN, None)


def test_sums_are_checked_file_by_file(tmp_path: Path) -> None:
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "a.whl").write_bytes(b"wheel")
    good = hashlib.sha256(b"wheel").hexdigest()
    (tmp_path / "SHA256SUMS").write_text(f"{good}  wheels/a.whl\n")
    preflight.verify_files(tmp_path, preflight.read_sums(tmp_path))
    (tmp_path / "wheels" / "a.whl").write_bytes(b"wheeL")
    assert refused(preflight.verify_files, tmp_path, preflight.read_sums(tmp_path)) == (
        "artifact file damaged: wheels/a.whl does not match SHA256SUMS"
    )
    (tmp_path / "SHA256SUMS").write_text(f"{good}  ../etc/passwd\n")
    assert "malformed line" in refused(preflight.read_sums, tmp_path)


def test_manifest_missing_is_a_refusal(tmp_path: Path) -> None:
    assert "is not a whole p2pupd artifact" in refused(preflight.load_manifest, tmp_path)


def test_unit_names_the_prefixs_current_launcher() -> None:
    text = (ROOT / "tools" / "systemd" / "p2pupd.service").read_text()
    lay = Layout(Path("/"), "/srv/p2pupd", "0.1.0")
    unit = systemfiles.render_unit(text, lay)
    assert (
        "ExecStart=/srv/p2pupd/current/bin/p2pupd daemon --config /etc/p2pupd/config.toml"
        in unit.splitlines()
    )
    assert not [ln for ln in unit.splitlines() if "/opt/p2pupd" in ln and not ln.startswith("#")]
    # The daemon may write its own prefix: it updates itself there.
    assert "ReadWritePaths=/var/lib/p2pupd /srv/p2pupd" in unit.splitlines()
    assert "does not start" in refused(systemfiles.render_unit, "[Service]\n", lay)


def test_glibc_floor_is_the_newest_any_wheel_needs() -> None:
    floor = build.glibc_floor
    assert floor(["idna-3.20-py3-none-any.whl"]) == (2, 17)
    assert floor(["wasmtime-50.0.1-py3-none-manylinux1_x86_64.whl"]) == (2, 17)
    assert floor(
        [
            "zstandard-0.25.0-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
            "x-1.0-cp311-cp311-manylinux_2_28_x86_64.whl",
        ]
    ) == (2, 28)
    # A wheel with several tags runs where the oldest of them does.
    assert floor(["m-1-cp311-cp311-manylinux2014_aarch64.manylinux_2_28_aarch64.whl"]) == (2, 17)
    with pytest.raises(build.BuildError):
        floor(["m-1-cp311-cp311-musllinux_1_2_x86_64.whl"])


def test_tarball_bytes_depend_only_on_the_files(tmp_path: Path) -> None:
    top = tmp_path / "src" / "p2pupd-0.1.0-linux-x86_64"
    (top / "wheels").mkdir(parents=True)
    (top / "install.sh").write_text("#!/bin/sh\n")
    (top / "install.sh").chmod(0o755)
    (top / "wheels" / "a.whl").write_bytes(b"a" * 1000)
    build.write_tar(top, tmp_path / "one.tar.gz", 1_700_000_000)
    (top / "wheels" / "a.whl").touch()  # a new mtime, same bytes
    build.write_tar(top, tmp_path / "two.tar.gz", 1_700_000_000)
    assert (tmp_path / "one.tar.gz").read_bytes() == (tmp_path / "two.tar.gz").read_bytes()
    with tarfile.open(tmp_path / "one.tar.gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert list(members) == sorted(members)
    script = members["p2pupd-0.1.0-linux-x86_64/install.sh"]
    assert script.mode == 0o755 and script.uid == 0 and script.mtime == 1_700_000_000
    assert members["p2pupd-0.1.0-linux-x86_64/wheels/a.whl"].mode == 0o644
