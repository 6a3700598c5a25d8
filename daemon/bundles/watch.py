"""Auto-import: notice bundles appearing under a mount directory and import each once.

Theory of operation. ``watch`` polls (inotify is not in the standard library,
and polling a handful of directories every few seconds costs nothing) for
bundle directories -- a directory holding regular files ``oci-layout`` and
``index.json`` -- at ``root`` or up to ``MAX_DEPTH`` levels below it, which
covers ``/media/usb``, ``/media/<stick>`` and ``/media/<user>/<stick>``. Links
are never followed while looking.

* A bundle is imported once it has looked the same for two consecutive polls
  (its identity: the device, inode, size and mtime of ``index.json``), so a
  stick still being mounted or a directory still being copied is left alone.
* Each identity is handled once: a refused bundle is not retried until it
  changes; one that failed for an operational reason (I/O, the state lock was
  held) is retried after ``retry_seconds``, at most ``MAX_RETRIES`` times.
* A bundle that disappears is forgotten, so the same stick inserted again is
  imported again -- which resumes an import it was pulled out of.
* ``stop`` (a ``threading.Event``: set it from a signal handler, or from the
  daemon's shutdown) ends the loop at the next poll; ``once`` returns after
  the first bundle handled; ``timeout`` bounds the whole watch.

The loop is synchronous: the daemon runs it in a worker thread
(``trio.to_thread.run_sync``) and sets ``stop`` on shutdown.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from p2pupd.daemon.errors import BundleError

MAX_DEPTH = 2
MAX_ENTRIES_PER_DIR = 256
MAX_RETRIES = 3
LAYOUT_FILES = ("oci-layout", "index.json")

Identity = tuple[int, int, int, int]


@dataclass(frozen=True)
class WatchEvent:
    """What happened to one bundle: ``outcome`` is "imported", "refused" or "error"."""

    path: Path
    outcome: str
    detail: object = None  # the handler's result or the error raised


def _is_bundle(d: Path) -> Identity | None:
    try:
        for name in LAYOUT_FILES:
            st = os.lstat(d / name)
            if not stat.S_ISREG(st.st_mode):
                return None
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def find_bundles(root: Path, depth: int = MAX_DEPTH) -> dict[Path, Identity]:
    """Return {bundle directory: identity} under ``root`` (links not followed)."""
    out: dict[Path, Identity] = {}
    ident = _is_bundle(root)
    if ident is not None:
        out[root] = ident
        return out
    if depth == 0:
        return out
    try:
        with os.scandir(root) as it:
            subdirs = []
            for i, entry in enumerate(it):
                if i >= MAX_ENTRIES_PER_DIR:
                    break
                if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                    subdirs.append(Path(entry.path))
    except OSError:
        return out
    for d in sorted(subdirs):
        out.update(find_bundles(d, depth - 1))
    return out


def watch(
    root: Path,
    handle: Callable[[Path], WatchEvent],
    *,
    stop: threading.Event | None = None,
    interval: float = 2.0,
    once: bool = False,
    timeout: float | None = None,
    retry_seconds: float = 60.0,
    on_event: Callable[[WatchEvent], None] | None = None,
) -> list[WatchEvent]:
    """Watch ``root`` and call ``handle`` for each bundle that appears (module doc).

    ``handle`` returns the event for a bundle (it must not raise for a bad
    bundle: it reports it). Returns every event, in order. Raises
    ``BundleError`` if ``root`` is not a directory at the start.
    """
    if not root.is_dir():
        raise BundleError(f"cannot watch {root}: not a directory")
    stop = stop or threading.Event()
    deadline = None if timeout is None else time.monotonic() + timeout
    events: list[WatchEvent] = []
    handled: dict[Path, Identity] = {}
    seen: dict[Path, Identity] = {}
    retry: dict[Path, tuple[Identity, float, int]] = {}  # identity, not before, tries
    while not stop.is_set():
        found = find_bundles(root)
        for path in list(handled) + list(seen) + list(retry):
            if path not in found:  # removed: forget it, so a reinsertion imports again
                handled.pop(path, None)
                seen.pop(path, None)
                retry.pop(path, None)
        for path, ident in sorted(found.items()):
            if stop.is_set() or handled.get(path) == ident:
                continue
            if seen.get(path) != ident:
                seen[path] = ident  # first sight or changed: wait one poll to settle
                continue
            r = retry.get(path)
            if r is not None and r[0] == ident and time.monotonic() < r[1]:
                continue
            ev = handle(path)
            events.append(ev)
            if on_event is not None:
                on_event(ev)
            tries = (r[2] if r is not None and r[0] == ident else 0) + 1
            if ev.outcome == "error" and tries < MAX_RETRIES:
                retry[path] = (ident, time.monotonic() + retry_seconds, tries)
            else:
                handled[path] = ident
                retry.pop(path, None)
            if once:
                return events
        if deadline is not None and time.monotonic() >= deadline:
            break
        wait = (
            interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic()))
        )
        stop.wait(wait)
    return events
