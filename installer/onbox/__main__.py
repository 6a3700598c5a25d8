"""Install p2pupd on this machine from an offline artifact: no network, no index.

install.sh picks a CPython and runs this folder with it
(``python -I installer``). Only the standard library is used: nothing else
is on the box yet. The steps, in order:

1. preflight.py: the artifact is whole (SHA256SUMS) and fits this machine
   (platform, CPython minor version, glibc); nothing it would clobber is in
   the way. A refusal here has written nothing.
2. versiondir.py: ``PREFIX/VERSION`` is built (or kept, if this artifact
   already built it and it runs) and ``PREFIX/current`` is pointed at it.
3. systemfiles.py: unit, udev rule, config, state dir, PATH link.

Exit codes: 0 installed (or already), 1 the install failed (``current`` and
the system files are as they were, unless the message names them), 2 refused
before anything was installed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import sysconfig
from pathlib import Path

from layout import DEFAULT_PREFIX, PATH_LINK, Layout, check_conflicts, locked, point_link
from preflight import (
    InstallError,
    RefusedError,
    check_libc,
    check_platform,
    check_python,
    glibc_of_this_machine,
    load_manifest,
    read_sums,
    verify_files,
)
from systemfiles import UNIT_NAME, install_system_files, reload_services, render_unit
from versiondir import Interpreter, build_version, interpreter_link, record_of, reusable

ARTIFACT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="install.sh",
        description="Install p2pupd from this artifact, with no network.",
    )
    p.add_argument("--root", type=Path, default=Path("/"),
                   help="write everything below this directory (tests, image staging); "
                        "systemd and udev are not told")  # fmt: skip
    p.add_argument("--prefix", default=DEFAULT_PREFIX,
                   help=f"where version directories and `current` live (default {DEFAULT_PREFIX})")  # fmt: skip
    p.add_argument("--force", action="store_true",
                   help="rebuild this version's directory even if one is there")  # fmt: skip
    p.add_argument("--no-systemd", action="store_true", help="do not install the systemd unit")
    p.add_argument("--no-udev", action="store_true", help="do not install the USB-stick udev rule")
    p.add_argument("--no-path-link", action="store_true",
                   help=f"do not link {PATH_LINK} to the current version")  # fmt: skip
    args = p.parse_args(argv)
    if not args.prefix.startswith("/") or ".." in Path(args.prefix).parts:
        p.error(f"--prefix must be an absolute path: {args.prefix}")
    args.prefix = args.prefix.rstrip("/") or "/"
    return args


def install(args: argparse.Namespace, artifact: Path) -> list[str]:
    """The whole install; returns the lines to print."""
    man = load_manifest(artifact)
    check_platform(man, sysconfig.get_platform())
    check_python(man, sys.implementation.name, sys.version_info[:2])
    check_libc(man, glibc_of_this_machine())
    verify_files(artifact, read_sums(artifact))
    lay = Layout(args.root.resolve(), args.prefix, man.version)
    check_conflicts(lay, path_link=not args.no_path_link)
    unit = (
        None
        if args.no_systemd
        else render_unit((artifact / "systemd" / UNIT_NAME).read_text(), lay)
    )
    py = Interpreter.running()
    sums_digest = hashlib.sha256((artifact / "SHA256SUMS").read_bytes()).hexdigest()
    record = record_of(lay, sums_digest, py)

    os.umask(0o022)
    # Messages name paths as the running system will see them.
    vdir, current = f"{lay.prefix}/{lay.version}", f"{lay.prefix}/current"
    out = [] if lay.root == Path("/") else [f"installing below {lay.root}"]
    try:
        lay.prefix_dir.mkdir(parents=True, exist_ok=True)
        with locked(lay.prefix_dir):
            interpreter_link(lay.prefix_dir, py)  # what every version's bin/python leads to
            why = reusable(lay, record) if lay.version_dir.exists() else None
            if lay.version_dir.exists() and why is None and not args.force:
                out.append(f"{vdir} is already installed from this artifact")
            elif why is not None and not args.force:
                raise RefusedError(f"{vdir} exists but {why}: --force rebuilds it")
            else:
                build_version(lay, man, artifact, py, record)
                out.append(f"built {vdir} (CPython {py.version}, {py.path})")
            previous = None
            with contextlib.suppress(OSError):
                previous = os.readlink(lay.current)
            if point_link(lay.current, lay.version):
                kept = f" ({previous} is kept: its install.sh points current back)"
                out.append(f"{current} -> {lay.version}" + (kept if previous else ""))
            changed = install_system_files(lay, artifact, unit, udev=not args.no_udev)
            if not args.no_path_link and point_link(lay.at(PATH_LINK), lay.command):
                changed.append(f"linked {PATH_LINK} -> {lay.command}")
    except OSError as exc:
        raise InstallError(f"{exc.filename or ''}: {exc.strerror}") from None
    return out + changed + reload_services(lay, changed)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        lines = install(args, ARTIFACT)
    except RefusedError as exc:
        print(f"p2pupd install: refused: {exc}", file=sys.stderr)
        return 2
    except InstallError as exc:
        print(f"p2pupd install: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("p2pupd install: interrupted", file=sys.stderr)
        return 130
    for line in lines:
        print(f"p2pupd install: {line}")
    print("p2pupd install: done. Next, once per node: p2pupd init --trust root.msgpack "
          "--component NAME=TARGET; then: systemctl enable --now p2pupd")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
