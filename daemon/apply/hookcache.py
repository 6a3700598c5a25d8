"""On-disk cache of compiled hook modules.

Theory of operation
-------------------
Compiling a hook with Cranelift costs tens of milliseconds to seconds; loading
the machine code wasmtime produced for it last time costs well under one. So the
first run of a hook serialises the compiled module here and later runs map it
back with ``Module.deserialize_file``.

Deserialising is *not* safe for untrusted bytes: a serialised module is native
code that wasmtime maps executable without validating it again. It is safe here
because every byte of an entry was written by this process and nobody else can
change it:

* the cache directory is ours: created ``0700``, and refused (``StorageError``)
  if it is a symlink, is owned by another user or cannot be narrowed to ``0700``;
* an entry is named by the sha256 of the *WebAssembly* module, which the caller
  has checked against a verified manifest before asking, so an entry can only
  ever be looked up for a module we were entitled to compile;
* the name also carries a fingerprint of the wasmtime version and engine
  settings (fuel, epoch interruption, CPU), so an upgrade never maps code built
  for another engine (wasmtime would refuse it too; this avoids even trying);
* the name ends with the sha256 of the entry's own bytes, checked before every
  load, so a torn write, a bit flip or a file truncated by a full disk is
  detected, deleted and rebuilt instead of being mapped;
* entries are written with ``fsutil.atomic_write`` (temp file, fsync,
  ``os.replace``, fsync of the directory), so a reader sees a whole entry or
  none.

Entry name: ``<module sha256 hex>-<engine fingerprint>-<entry sha256 hex>.cwasm``.
A failure to read or write the cache is logged and the hook is compiled in
memory instead: the cache can make hooks faster, never make them fail.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import platform
import stat
from pathlib import Path

import wasmtime

from p2pupd.daemon import fsutil
from p2pupd.daemon.errors import StorageError
from p2pupd.protocol.limits import MAX_HOOK_BYTES

log = logging.getLogger(__name__)

SUFFIX = ".cwasm"
# Compiled code is a few times larger than the WebAssembly it came from; an entry
# far beyond that is not something we wrote and is not worth hashing.
MAX_ENTRY_BYTES = 16 * MAX_HOOK_BYTES


def wasmtime_version() -> str:
    """Return the version of the installed wasmtime-py package (e.g. ``"50.0.1"``)."""
    return importlib.metadata.version("wasmtime")


def engine_fingerprint(settings: str) -> str:
    """Return 16 hex characters naming the wasmtime build plus engine ``settings``.

    ``settings`` is a stable text description of every ``wasmtime.Config`` option
    the caller changed; two engines with equal fingerprints accept each other's
    serialised modules.
    """
    text = f"wasmtime {wasmtime_version()}; {platform.machine()}; {settings}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ModuleCache:
    """Compiled modules for one ``wasmtime.Engine``, keyed by the module's sha256."""

    def __init__(self, directory: Path, engine: wasmtime.Engine, fingerprint: str) -> None:
        """Open (creating if needed) the cache in ``directory``.

        Raises ``StorageError`` if the directory cannot be created or is not
        private to this user (see the module docstring for why that matters).
        """
        self.directory = directory
        self._engine = engine
        self._fingerprint = fingerprint
        _make_private_dir(directory)
        # Temp files left by a crash mid-write are never looked up; remove them.
        for entry in _scandir(directory):
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                fsutil.unlink_quietly(entry.path)

    def load(self, module_sha256: bytes) -> wasmtime.Module | None:
        """Return the cached compiled module for ``module_sha256``, or ``None``.

        Entries whose bytes do not match their name, or that wasmtime refuses,
        are deleted so the next ``store`` rebuilds them. Never raises.
        """
        prefix = f"{module_sha256.hex()}-{self._fingerprint}-"
        for entry in _scandir(self.directory):
            if not (entry.name.startswith(prefix) and entry.name.endswith(SUFFIX)):
                continue
            expected = entry.name[len(prefix) : -len(SUFFIX)]
            path = Path(entry.path)
            try:
                size = entry.stat(follow_symlinks=False).st_size
                if not entry.is_file(follow_symlinks=False) or size > MAX_ENTRY_BYTES:
                    raise StorageError(f"{path} is not a regular file of sane size")
                digest, _ = fsutil.hash_file(path)
                if digest.hex() != expected:
                    raise StorageError(f"{path} does not match its name")
                return wasmtime.Module.deserialize_file(self._engine, str(path))
            except (OSError, StorageError, wasmtime.WasmtimeError) as exc:
                log.warning("dropping corrupt hook cache entry %s: %s", path.name, exc)
                fsutil.unlink_quietly(path)
        return None

    def store(self, module_sha256: bytes, module: wasmtime.Module) -> None:
        """Write ``module``'s compiled form for ``module_sha256``; never raises.

        Entries for the same module under another fingerprint (another wasmtime
        version or engine setting, which this engine can never load) are removed.
        """
        try:
            data = bytes(module.serialize())
        except wasmtime.WasmtimeError as exc:
            log.warning("cannot serialise hook %s: %s", module_sha256.hex()[:16], exc)
            return
        key = f"{module_sha256.hex()}-{self._fingerprint}-"
        path = self.directory / f"{key}{hashlib.sha256(data).hexdigest()}{SUFFIX}"
        try:
            fsutil.atomic_write(path, data, mode=0o600)
        except StorageError as exc:
            log.warning("cannot cache hook %s: %s", module_sha256.hex()[:16], exc)
            return
        # Only other fingerprints: deleting same-key entries could race with a
        # thread that just stored the same module and leave none at all.
        for entry in _scandir(self.directory):
            if entry.name.startswith(module_sha256.hex()) and not entry.name.startswith(key):
                fsutil.unlink_quietly(entry.path)


def _scandir(directory: Path) -> list[os.DirEntry[str]]:
    """Return the entries of ``directory``, or none if it cannot be listed."""
    try:
        with os.scandir(directory) as it:
            return list(it)
    except OSError as exc:
        log.warning("cannot list hook cache %s: %s", directory, exc)
        return []


def _make_private_dir(directory: Path) -> None:
    """Create ``directory`` (mode 0700) or check an existing one is ours and private.

    Raises ``StorageError``.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode):
            raise StorageError(f"hook cache {directory} is not a directory (symlink?)")
        if st.st_uid != os.geteuid():
            raise StorageError(f"hook cache {directory} is owned by uid {st.st_uid}, not us")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(directory, 0o700)
    except OSError as exc:
        raise fsutil.storage_error(exc, "prepare hook cache", directory) from None
