"""What must hold before anything is written: the artifact is whole, and it
fits this machine's platform, interpreter and C library.

The checks are pure functions of values the caller reads from the machine,
so tests drive every refusal without another machine. Each refusal is one
``RefusedError`` whose message says what is needed and what was found.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path


class RefusedError(Exception):
    """This machine, interpreter or artifact cannot be installed from (exit 2)."""


class InstallError(Exception):
    """The install failed part-way (exit 1)."""


@dataclass(frozen=True)
class Manifest:
    """What ``make dist`` wrote into manifest.json."""

    version: str
    arch: str
    pythons: tuple[str, ...]
    glibc: tuple[int, int]
    project_wheel: str
    pip_wheel: str

    @property
    def platform(self) -> str:
        return f"linux-{self.arch}"


def load_manifest(artifact: Path) -> Manifest:
    try:
        doc = json.loads((artifact / "manifest.json").read_text())
        major, minor = (int(x) for x in str(doc["glibc"]).split("."))
        return Manifest(
            version=str(doc["version"]),
            arch=str(doc["arch"]),
            pythons=tuple(str(v) for v in doc["pythons"]),
            glibc=(major, minor),
            project_wheel=str(doc["project_wheel"]),
            pip_wheel=str(doc["pip_wheel"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RefusedError(
            f"{artifact} is not a whole p2pupd artifact: manifest.json: {exc}"
        ) from None


# -- checks: pure, so tests can drive every refusal ----------------------------


def check_platform(man: Manifest, interpreter_platform: str) -> None:
    """The interpreter's platform (``sysconfig.get_platform()``), not the
    kernel's: a 32-bit userland on a 64-bit kernel must not get 64-bit wheels."""
    if interpreter_platform != man.platform:
        raise RefusedError(
            f"this artifact is for {man.platform}; this Python is {interpreter_platform}: "
            f"use the p2pupd-{man.version}-{interpreter_platform} artifact"
        )


def check_python(man: Manifest, implementation: str, version: tuple[int, int]) -> None:
    have = f"{version[0]}.{version[1]}"
    if implementation != "cpython":
        raise RefusedError(f"p2pupd needs CPython; this is {implementation} {have}")
    if have not in man.pythons:
        raise RefusedError(
            f"this artifact has wheels for CPython {', '.join(man.pythons)}; this Python is {have}"
        )


def check_libc(man: Manifest, libc: str | None) -> None:
    """``libc`` is ``os.confstr("CS_GNU_LIBC_VERSION")``: "glibc 2.36", or None on musl."""
    need = f"{man.glibc[0]}.{man.glibc[1]}"
    m = re.fullmatch(r"glibc (\d+)\.(\d+)(?:\.\d+)?", libc or "")
    if m is None:
        raise RefusedError(
            f"this artifact's wheels are manylinux: they need glibc {need} or newer, "
            f"and this machine's C library is not glibc ({libc or 'musl or unknown'})"
        )
    if (int(m[1]), int(m[2])) < man.glibc:
        raise RefusedError(f"this artifact needs glibc {need} or newer; this machine has {libc}")


def glibc_of_this_machine() -> str | None:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        return None


def read_sums(artifact: Path) -> dict[str, str]:
    """SHA256SUMS as written by ``sha256sum``: {relative path: hex digest}."""
    sums: dict[str, str] = {}
    try:
        lines = (artifact / "SHA256SUMS").read_text().splitlines()
    except OSError as exc:
        raise RefusedError(f"{artifact} is not a whole p2pupd artifact: {exc}") from None
    for line in lines:
        digest, _, name = line.partition("  ")
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or not name or ".." in Path(name).parts:
            raise RefusedError(f"{artifact}/SHA256SUMS: malformed line {line!r}")
        sums[name] = digest
    return sums


def verify_files(artifact: Path, sums: dict[str, str]) -> None:
    """Every listed file is there with its digest: a stick copy cut short or a
    flipped bit is found here, before anything is written."""
    for name, digest in sorted(sums.items()):
        h = hashlib.sha256()
        try:
            with open(artifact / name, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        except OSError as exc:
            raise RefusedError(
                f"artifact file missing or unreadable: {name}: {exc.strerror}"
            ) from None
        if h.hexdigest() != digest:
            raise RefusedError(f"artifact file damaged: {name} does not match SHA256SUMS")
