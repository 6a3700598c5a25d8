"""The state directory's format version: the marker, the refusal, the migrations.

Theory of operation. ``STATE/format`` is a short text file, written
atomically (temp, fsync, rename): the format number on its first line, then
``key value`` lines this code writes and older code of the same format may
ignore::

    2
    oldest-reader 2
    written-by p2pupd 0.2.0

A state directory without it is format 1: every one made before the marker
existed. Three rules:

1. **Refuse what we do not understand.** This code reads every format up to
   ``STATE_FORMAT``. A newer one it reads only if the version that wrote it
   declared that readers of our format stay correct on it (``oldest-reader``
   <= ``STATE_FORMAT``: purely additive changes, which older code ignores);
   otherwise every command refuses, before reading anything else, with one
   line naming both formats and the p2pupd that wrote it
   (``StateFormatError``, exit code 2). Misreading a state directory -- blobs
   it cannot see, a journal step it does not know, a state field it drops
   when it rewrites the document -- could lose the node's record of what is
   installed, or its store.
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

* 1 -- no marker (p2pupd 0.1.0): blobs only as files in ``blobs/sha256``,
  spools in ``fetching/`` and ``incoming/``.
* 2 -- the marker; small blobs in packs (store/packstore.py; ``gc`` moves
  old small files into packs), so a reader of format 1 would not see them:
  its oldest reader is 2. Additive in it, ignored by any reader of 2:
  components' ``self_update`` and ``platform``, a self-update's
  ``trial``/``healthy``/``unhealthy`` journal steps, the variants a node
  carries for other platforms (``releases/<c>/<serial>.<platform>.msgpack``:
  a reader of 2 lists only bare serials there; its gc drops their blobs,
  which the daemon fetches again).

(A marker holding only the number, as development builds of format 2 wrote
it, is read with the oldest reader this code knows for that format.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
        text = f"{self.format}\noldest-reader {self.oldest_reader}\n"
        if self.written_by:
            text += f"written-by {self.written_by}\n"
        return text.encode()


@dataclass(frozen=True)
class Migration:
    """Turns format ``to - 1`` into ``to``; ``oldest_reader`` of the result."""

    to: int
    oldest_reader: int
    step: Callable[[Path], None]


def _to_2(root: Path) -> None:
    """Packs need nothing rewritten: new small blobs go into them from now on,
    and ``gc`` moves the small files it keeps (store/packstore.py)."""


MIGRATIONS: tuple[Migration, ...] = (Migration(2, 2, _to_2),)


def _oldest_known(fmt: int) -> int | None:
    """The oldest reader of format ``fmt`` as this code knows it (None: a newer format)."""
    if fmt == 1:
        return 1
    return next((m.oldest_reader for m in MIGRATIONS if m.to == fmt), None)


def installed_version() -> str | None:
    """The installed distribution's version (pyproject.toml's), or None when run
    from a source tree that was never installed."""
    from importlib import metadata  # email, zipfile, csv...: 1.5 MB, not at start-up

    try:
        return metadata.version("p2pupd")
    except metadata.PackageNotFoundError:
        return None


def this_version() -> str:
    version = installed_version()
    return f"p2pupd {version}" if version else "p2pupd (source tree)"


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
        first, *rest = data.decode("utf-8").splitlines() or [""]
        if not (first.isascii() and first.isdigit() and 0 < len(first) <= 9):
            raise ValueError(f"the first line is not a format number: {first[:20]!r}")
        fmt = int(first)
        fields = dict(line.partition(" ")[::2] for line in rest if line.strip())
        oldest_text = fields.get("oldest-reader")
        if oldest_text is None:
            oldest = _oldest_known(fmt) or fmt  # a newer format that declared nothing
        elif oldest_text.isascii() and oldest_text.isdigit() and len(oldest_text) <= 9:
            oldest = int(oldest_text)
        else:
            raise ValueError(f"oldest-reader {oldest_text[:20]!r} is not a number")
        if not 1 <= oldest <= fmt:
            raise ValueError("oldest-reader out of range")
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateFormatError(
            f"{path} is not a p2pupd state format marker ({exc}); if the file was damaged "
            f"and this p2pupd made the directory, write the number {STATE_FORMAT} into it"
        ) from None
    return Marker(fmt, oldest, fields.get("written-by", "")[:200])


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
