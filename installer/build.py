"""Build the offline installer artifacts (``make dist``); refresh the pins (``make dist-lock``).

One artifact per CPU, ``dist/p2pupd-VERSION-linux-ARCH.tar.gz``::

    p2pupd-VERSION-linux-ARCH/
      install.sh       finds a CPython, runs installer/ (see install.sh's header)
      installer/       the installer (standard library only), from installer/onbox/
      wheels/          p2pupd, every dependency for each supported CPython minor
                       version on this CPU (manylinux), and pip itself
      systemd/         p2pupd.service, 99-p2pupd-usb.rules, config.toml
      manifest.json    version, arch, CPython versions, glibc floor, wheel names
      SHA256SUMS       every file above, checked before anything is installed

Why a wheelhouse and pip, not a PEX or shiv zipapp: the box builds an ordinary
virtualenv with the pip that ships in the artifact (no pip, venv package or
index needed on the box), the result is a directory p2pupd can later swap as
its own ``symlink`` component, and nothing unpacks itself into a cache under
$HOME at run time (which the hardened unit forbids). A multi-platform PEX
would carry the same wheels and add a tool to the build and a runtime to trust.

Building uses the package index (``pip download --platform ...
--only-binary=:all:``, so no foreign-CPU compiler is needed); installing does
not. Wheels are cached per (CPU, CPython) under ``--cache`` keyed by
pyproject.toml, constraints.txt and the platform tags, so a second build
fetches nothing; the p2pupd wheel is built fresh each time, offline, from
setuptools kept in the same cache. Every artifact is checked to resolve
completely offline for each of its CPython versions before it is written.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "installer"
CONSTRAINTS = HERE / "constraints.txt"
ARCHES = ("x86_64", "aarch64")
PYTHONS = ("3.11", "3.12", "3.13")
# manylinux tags a wheel may carry: glibc 2.17 (CentOS 7, manylinux2014) up to
# 2.28 (RHEL 8, Debian 10). A dependency that ships only for a newer glibc
# fails the build, so raising the floor is a decision, not an accident.
GLIBC_MAX = 28
LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
BUILD_REQUIRES = ("setuptools>=77", "wheel")
# Bump when the cache layout or what goes into a cached wheelhouse changes.
CACHE_FORMAT = "2"


class BuildError(Exception):
    """A build step failed; the message says which and why."""


def pip(*args: str, quiet: bool = True) -> None:
    argv = [sys.executable, "-m", "pip", *(("--quiet",) if quiet else ()), *args]
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        tail = [ln for ln in r.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
        raise BuildError(f"pip {args[0]} failed: " + " | ".join(tail[-4:]))


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def platform_tags(arch: str) -> list[str]:
    tags = [f"manylinux_2_{m}_{arch}" for m in range(17, GLIBC_MAX + 1)]
    tags.append(f"manylinux2014_{arch}")
    if arch == "x86_64":
        tags += ["manylinux2010_x86_64", "manylinux1_x86_64"]
    return tags


def glibc_floor(wheel_names: list[str]) -> tuple[int, int]:
    """The newest glibc any of these wheels needs (a wheel needs the oldest of
    its manylinux tags); (2, 17) if none is native."""
    floor = (2, 17)
    for name in wheel_names:
        plat = name[: -len(".whl")].split("-")[-1]
        needs: list[tuple[int, int]] = []
        for tag in plat.split("."):
            m = re.match(r"manylinux_(\d+)_(\d+)_", tag)
            if m:
                needs.append((int(m[1]), int(m[2])))
            elif (legacy := tag.split("_")[0]) in LEGACY_MANYLINUX:
                needs.append(LEGACY_MANYLINUX[legacy])
            elif tag != "any":
                raise BuildError(f"{name}: platform tag {tag} is neither manylinux nor any")
        if needs:
            floor = max(floor, min(needs))
    return floor


def cache_key(*parts: str) -> str:
    """What a cached wheelhouse depends on: the dependencies and build
    requirements pyproject.toml declares and the pins -- not p2pupd's own
    version, so a new release (or a test's build of one) refetches nothing."""
    h = hashlib.sha256(CACHE_FORMAT.encode())
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = doc.get("project", {})
    declared = [project.get("dependencies", []), project.get("requires-python", ""),
                doc.get("build-system", {}).get("requires", [])]  # fmt: skip
    h.update(json.dumps(declared, sort_keys=True).encode())
    h.update(CONSTRAINTS.read_bytes() if CONSTRAINTS.exists() else b"")
    for part in parts:
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def cached(cache: Path, name: str, fill: Callable[[Path], None], offline: bool) -> Path:
    """``cache/name``, filled by ``fill(tmpdir)`` if absent; renamed into place
    whole, so a cut-off fetch never looks complete."""
    dest = cache / name
    if dest.is_dir():
        return dest
    if offline:
        raise BuildError(f"--offline and {dest} is not cached: build once with the index")
    tmp = cache / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        os.rename(tmp, dest)
    except OSError:
        if not dest.is_dir():  # else another build filled it first: use theirs
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def build_requirements(cache: Path, offline: bool) -> Path:
    key = cache_key("build", *BUILD_REQUIRES)
    return cached(
        cache,
        f"build-requires-{key}",
        lambda d: pip("download", "--only-binary=:all:", "-d", str(d), *BUILD_REQUIRES),
        offline,
    )


def project_wheel(build_reqs: Path, out: Path, epoch: int) -> Path:
    """The p2pupd wheel from the working tree, built offline with the cached
    setuptools; zip timestamps from ``epoch`` so equal sources give equal bytes."""
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch), "PIP_CONFIG_FILE": os.devnull}
    argv = [sys.executable, "-m", "pip", "wheel", "--quiet", "--isolated", "--no-deps",
            "--no-index", "--find-links", str(build_reqs), "-w", str(out), str(ROOT)]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        raise BuildError("building the p2pupd wheel failed: " + r.stderr.strip()[-400:])
    found = list(out.glob(f"p2pupd-{project_version()}-*.whl"))
    if len(found) != 1:
        raise BuildError(f"expected one p2pupd wheel in {out}, found {found}")
    return found[0]


def dependency_wheels(cache: Path, arch: str, py: str, wheel: Path, offline: bool) -> Path:
    """Every dependency of ``wheel`` as a wheel for (arch, CPython py), and pip."""
    tags = platform_tags(arch)

    def fill(d: Path) -> None:
        plat = [a for t in tags for a in ("--platform", t)]
        common = ["--only-binary=:all:", "--implementation", "cp", "--python-version", py,
                  *plat, "-c", str(CONSTRAINTS), "-d", str(d)]  # fmt: skip
        pip("download", *common, str(wheel))
        pip("download", *common, "--no-deps", "pip")
        for stray in d.glob("p2pupd-*.whl"):
            stray.unlink()

    return cached(cache, f"wheels-{arch}-cp{py.replace('.', '')}-{cache_key(arch, py, *tags)}",
                  fill, offline)  # fmt: skip


def check_offline_resolution(find_links: list[Path], arch: str, py: str, version: str) -> None:
    """Resolve p2pupd from these wheel folders alone, as the box will, for (arch, py)."""
    links = [a for d in find_links for a in ("--find-links", str(d))]
    plat = [a for t in platform_tags(arch) for a in ("--platform", t)]
    with tempfile.TemporaryDirectory() as tmp:
        pip("install", "--isolated", "--dry-run", "--ignore-installed", "--no-index", *links,
            "--only-binary=:all:", "--implementation", "cp", "--python-version", py, *plat,
            "--target", tmp, f"p2pupd=={version}")  # fmt: skip


def write_tar(src: Path, dest: Path, epoch: int) -> None:
    """A gzip'd tar of ``src`` whose bytes depend only on the files: sorted
    members, fixed owner and times, normalised modes."""
    tmp = dest.with_name(f".{dest.name}.partial")
    with (
        open(tmp, "wb") as raw,
        gzip.GzipFile("", "wb", 6, raw, mtime=0) as gz,  # no name, no time in the header
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in [src, *sorted(src.rglob("*"))]:
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(src.parent)))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = epoch
            info.mode = 0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644
            if info.isfile():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    os.replace(tmp, dest)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def source_epoch() -> int:
    """SOURCE_DATE_EPOCH, else the last commit's time, else now."""
    if "SOURCE_DATE_EPOCH" in os.environ:
        return int(os.environ["SOURCE_DATE_EPOCH"])
    r = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%ct"],
                       capture_output=True, text=True, check=False)  # fmt: skip
    return int(r.stdout) if r.returncode == 0 and r.stdout.strip() else int(time.time())


def assemble(
    out: Path, arch: str, pythons: list[str], wheelhouses: list[Path], wheel: Path, epoch: int
) -> Path:
    """Lay out and pack the artifact for ``arch``; returns the tar.gz."""
    version = project_version()
    name = f"p2pupd-{version}-linux-{arch}"
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        top = Path(tmp) / name
        (top / "wheels").mkdir(parents=True)
        for house in wheelhouses:
            for whl in house.glob("*.whl"):
                shutil.copyfile(whl, top / "wheels" / whl.name)
        shutil.copyfile(wheel, top / "wheels" / wheel.name)
        names = sorted(p.name for p in (top / "wheels").iterdir())
        pip_wheels = [n for n in names if n.startswith("pip-")]
        if len(pip_wheels) != 1:
            raise BuildError(f"expected one pip wheel for {arch}, found {pip_wheels}")
        floor = glibc_floor(names)
        (top / "installer").mkdir()
        for module in sorted((HERE / "onbox").glob("*.py")):
            shutil.copyfile(module, top / "installer" / module.name)
        (top / "systemd").mkdir()
        for unit in ("p2pupd.service", "99-p2pupd-usb.rules", "config.toml"):
            shutil.copyfile(ROOT / "tools" / "systemd" / unit, top / "systemd" / unit)
        script = (HERE / "install.sh").read_text()
        for key, value in {
            "@VERSION@": version,
            "@ARCH@": arch,
            "@PYTHONS@": " ".join(pythons),
            "@PYTHONS_COMMA@": ", ".join(pythons),
            "@GLIBC@": f"{floor[0]}.{floor[1]}",
            "@PREFIX@": "/opt/p2pupd",
        }.items():
            script = script.replace(key, value)
        (top / "install.sh").write_text(script)
        (top / "install.sh").chmod(0o755)
        manifest = {
            "format": 1,
            "name": "p2pupd",
            "version": version,
            "arch": arch,
            "platform": f"linux-{arch}",
            "pythons": pythons,
            "glibc": f"{floor[0]}.{floor[1]}",
            "project_wheel": wheel.name,
            "pip_wheel": pip_wheels[0],
            "wheels": names,
        }
        (top / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        files = sorted(p for p in top.rglob("*") if p.is_file())
        sums = "".join(f"{sha256_of(p)}  {p.relative_to(top)}\n" for p in files)
        (top / "SHA256SUMS").write_text(sums)
        dest = out / f"{name}.tar.gz"
        write_tar(top, dest, epoch)
    return dest


def build(
    out: Path, cache: Path, arches: list[str], pythons: list[str], offline: bool
) -> list[Path]:
    """Every artifact; returns their paths (each checked to install offline)."""
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    epoch = source_epoch()
    version = project_version()
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        wheel = project_wheel(build_requirements(cache, offline), Path(tmp), epoch)
        made = []
        for arch in arches:
            houses = [dependency_wheels(cache, arch, py, wheel, offline) for py in pythons]
            for py, house in zip(pythons, houses, strict=True):
                check_offline_resolution([house, wheel.parent], arch, py, version)
            made.append(assemble(out, arch, pythons, houses, wheel, epoch))
    return made


def lock(cache: Path) -> None:
    """Rewrite constraints.txt: the versions pip resolves today for p2pupd's
    dependencies and pip itself (on this machine's CPython; the same pins then
    serve every CPU and CPython version, and the build checks that they exist)."""
    with tempfile.TemporaryDirectory() as tmp:
        wheel = project_wheel(build_requirements(cache, False), Path(tmp), source_epoch())
        report = Path(tmp) / "report.json"
        pip("install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
            "--report", str(report), str(wheel), "pip")  # fmt: skip
        items = json.loads(report.read_text())["install"]
    pins = sorted(
        f"{i['metadata']['name'].lower()}=={i['metadata']['version']}"
        for i in items
        if i["metadata"]["name"].lower() != "p2pupd"
    )
    header = (
        "# The exact versions `make dist` puts into the offline artifacts: p2pupd's\n"
        "# runtime dependencies (pyproject.toml) and pip. Refresh with `make dist-lock`.\n"
    )
    CONSTRAINTS.write_text(header + "".join(f"{p}\n" for p in pins))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="build.py", description=__doc__.split("\n")[0])
    p.add_argument("command", nargs="?", choices=("dist", "lock"), default="dist")
    p.add_argument("--out", type=Path, default=ROOT / "dist")
    p.add_argument("--cache", type=Path, default=ROOT / "build" / "dist-cache")
    p.add_argument("--arch", action="append", choices=ARCHES, help="default: all")
    p.add_argument("--python", action="append", choices=PYTHONS, help="default: all")
    p.add_argument("--offline", action="store_true", help="use only cached wheels")
    args = p.parse_args(argv)
    started = time.monotonic()
    try:
        if args.command == "lock":
            lock(args.cache)
            print(f"wrote {CONSTRAINTS.relative_to(ROOT)}")
            return 0
        made = build(args.out, args.cache, args.arch or list(ARCHES),
                     args.python or list(PYTHONS), args.offline)  # fmt: skip
    except BuildError as exc:
        print(f"make dist: error: {exc}", file=sys.stderr)
        return 1
    sums = "".join(f"{sha256_of(a)}  {a.name}\n" for a in made)
    (args.out / "SHA256SUMS").write_text(sums)
    print(f"{'artifact':<44} {'MB':>6} {'wheels':>6} {'glibc':>6}  CPython")
    for a in made:
        with tarfile.open(a) as tar:
            top = a.name[: -len(".tar.gz")]
            doc = json.load(tar.extractfile(f"{top}/manifest.json"))  # type: ignore[arg-type]
        size = a.stat().st_size / 1e6
        print(f"{a.name:<44} {size:>6.1f} {len(doc['wheels']):>6} {doc['glibc']:>6}  "
              f"{', '.join(doc['pythons'])}")  # fmt: skip
    print(f"built in {time.monotonic() - started:.0f} s; checksums in {args.out / 'SHA256SUMS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
