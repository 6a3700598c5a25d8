"""Hazardous modes: what a signed release may not install unless the node allows it.

A valid signature says who published a tree, not that every mode in it is
safe to put on a node. Two kinds of entry are refused by default, because on
a multi-user or networked node they hand the node to whoever can write them:

* a **set-id file that others can write**: setuid or setgid (``0o6000``) with
  group or world write (``0o022``): anyone in that group (or anyone) can swap
  the program that then runs with the owner's or group's rights;
* a **world-writable directory without the sticky bit** (``0o002`` without
  ``0o1000``): anyone can delete or replace any file in it, including files
  the release put there.

A component may allow them (``p2pupd init --allow-hazardous-modes``), e.g. for
a tree that is only ever unpacked into a container image. The check is pure
and runs when a release is verified for the node -- on import and when a peer
offers it -- so a refused release is never stored, staged or applied.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from p2pupd.protocol.errors import HazardousModeError
from p2pupd.protocol.manifest import Manifest

SET_ID_BITS = stat.S_ISUID | stat.S_ISGID
OTHERS_WRITE_BITS = stat.S_IWGRP | stat.S_IWOTH


@dataclass(frozen=True)
class Hazard:
    path: str
    shown: str  # ls-style mode, e.g. "-rwsrwsrwx"
    why: str


def hazards(man: Manifest) -> list[Hazard]:
    """Every entry of ``man`` whose mode is hazardous (see the module docstring), by path."""
    out: list[Hazard] = []
    for f in man.files:
        if f.mode & SET_ID_BITS and f.mode & OTHERS_WRITE_BITS:
            shown = stat.filemode(stat.S_IFREG | f.mode)
            out.append(Hazard(f.path, shown, "a set-id file others can write"))
    for d in man.dirs:
        if d.mode & stat.S_IWOTH and not d.mode & stat.S_ISVTX:
            shown = stat.filemode(stat.S_IFDIR | d.mode)
            out.append(Hazard(d.path, shown, "a world-writable directory without the sticky bit"))
    out.sort(key=lambda h: h.path)
    return out


def check_modes(man: Manifest, allowed: bool) -> None:
    """Raise ``HazardousModeError`` if ``man`` holds a hazardous mode and ``allowed`` is False."""
    if allowed:
        return
    found = hazards(man)
    if not found:
        return
    first = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    raise HazardousModeError(
        f"release {man.component} {man.version} would install {first.path!r:.120} as "
        f"{first.shown}, {first.why}{more}; component {man.component} does not allow "
        "hazardous modes (p2pupd init --allow-hazardous-modes to permit them)"
    )
