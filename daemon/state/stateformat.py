"""The state directory's format version: the marker, the refusal, the migrations.

Theory of operation. ``STATE/format`` is a small JSON document, written
atomically (temp, fsync, rename)::

    {"format": 2, "oldest_reader": 1, "written_by": "p2pupd 0.2.0"}

A state directory without it is format 1: every one made before the marker
existed. Three rules:

1. **Refuse what we do not understand.** This code reads every format up to
   ``STATE_FORMAT``. A newer one it reads only if the version that wrote it
   declared that readers of our format stay correct on it (``oldest_reader``
   <= ``STATE_FORMAT``: purely additive changes, which older code ignores);
   otherwise every command refuses, before reading anything else, with one
   line naming both formats and the p2pupd that wrote it
   (``StateFormatError``, exit code 2). Misreading a state directory -- a
   journal step it does not know, a state field it drops when it rewrites the
   document -- could lose the node's record of what is installed.
2. **Migrate forward under the lock.** ``migrate`` runs the steps of
   ``MIGRATIONS`` from the directory's format up to ``STATE_FORMAT``, each
   idempotent and atomic, the marker written after each, so a crash between
   steps resumes where it stopped. Only commands that hold the node lock (and
   the daemon) migrate; read-only commands read older formats as they are.
3. **Never strand a rollback.** A self-update's trial run (docs/self-update.md)
   may end with the old version running again on this state directory, so
   while a trial runs only migrations whose result the old version still
   reads are made (``migrate(upto_reader=...)``); the rest wait for the commit.

Format history:

* 1 -- no marker (p2pupd 0.1.0).
* 2 -- the marker itself; components may carry ``self_update`` and
  ``platform`` (older code ignores both), journals may hold a self-update's
  ``trial``/``healthy`` steps. Readers of format 1 stay correct on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from p2pupd.daemon.errors import ConfigError, StorageError
from p2pupd.daemon.fsutil import atomic_write

FORMAT_FILE = "format"
STATE_FORMAT = 2
MAX_MARKER_BYTES = 4096


class StateFormatError(ConfigError):
    """The state directory is of a format this p2pupd does not understand (exit code 2)."""


@dataclass(frozen=True)
class Marker:
    format: int
    oldest_reader: int
    written_by: str = ""

    def to_bytes(self) -> bytes:
        doc = {"format": self.format, "oldest_reader": self.oldest_reader,
               "written_by": self.written_by}  # fmt: skip
        return (json.dumps(doc, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class Migration:
    """Turns format ``to - 1`` into ``to``; ``oldest_reader`` of the result."""

    to: int
    oldest_reader: int
    step: Callable[[Path], None]


def _to_2(root: Path) -> None:
    """Format 2 adds only the marker and fields older code ignores: nothing to rewrite."""


MIGRATIONS: tuple[Migration, ...] = (Migration(2, 1, _to_2),)


def this_version() -> str:
    try:
        return f"p2pupd {metadata.version('p2pupd')}"
    except metadata.PackageNotFoundError:
        return "p2pupd (source tree)"


def read_marker(root: Path) -> Marker:
    """The marker of the state directory at ``root`` (format 1 when there is none).

    Raises ``StateFormatError`` for a marker that is not one and
    ``StorageError`` when it cannot be read.
    """
    path = root / FORMAT_FILE
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MARKER_BYTES + 1)
    except FileNotFoundError:
        return Marker(1, 1)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if len(data) > MAX_MARKER_BYTES:
            raise ValueError("too long")
        doc = json.loads(data)
        fmt, oldest = doc["format"], doc["oldest_reader"]
        by = doc.get("written_by", "")
        if not (isinstance(fmt, int) and isinstance(oldest, int) and isinstance(by, str)):
            raise ValueError("wrong types")
        if not 1 <= oldest <= fmt:
            raise ValueError("oldest_reader out of range")
    except (ValueError, KeyError, TypeError) as exc:
        raise StateFormatError(
            f"{path} is not a p2pupd state format marker ({exc}); if the file was damaged, "
            f"restore it: {Marker(STATE_FORMAT, 1, this_version()).to_bytes().decode().strip()}"
        ) from None
    return Marker(fmt, oldest, by[:200])


def check(root: Path) -> Marker:
    """Rule 1: the marker, if this code may read the directory; else ``StateFormatError``."""
    m = read_marker(root)
    if m.format > STATE_FORMAT and m.oldest_reader > STATE_FORMAT:
        by = f" by {m.written_by}" if m.written_by else ""
        raise StateFormatError(
            f"state directory {root} is of format {m.format} (written{by}), which this "
            f"{this_version()} does not understand (it reads formats up to {STATE_FORMAT}): "
            "run a p2pupd at least as new as the one that wrote it"
        )
    return m


def migrate(root: Path, upto_reader: int | None = None) -> list[str]:
    """Rule 2 (the caller holds the node lock): bring the directory to ``STATE_FORMAT``.

    With ``upto_reader`` (rule 3), stop before a migration whose result a
    reader of format ``upto_reader`` could not read. Returns one line per
    migration made. Raises ``StateFormatError`` (rule 1) or ``StorageError``.
    """
    m = check(root)
    done: list[str] = []
    for mig in MIGRATIONS:
        if mig.to <= m.format:
            continue
        if upto_reader is not None and mig.oldest_reader > upto_reader:
            break
        mig.step(root)
        oldest = max(m.oldest_reader, mig.oldest_reader)
        m = Marker(mig.to, oldest, this_version())
        atomic_write(root / FORMAT_FILE, m.to_bytes(), mode=0o600)
        done.append(f"state directory migrated to format {mig.to}")
    return done
