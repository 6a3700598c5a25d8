"""Errors of the I/O layer. Foreign exceptions (OSError, wasmtime, zeroconf) are
wrapped into these at the boundary so the CLI can map each to one line and an
exit code."""

from __future__ import annotations

from p2pupd.protocol.errors import P2pupdError


class DaemonError(P2pupdError):
    """Base of operational errors (exit code 1 at the CLI)."""


class StorageError(DaemonError):
    """The store or the state directory cannot be read or written."""


class CorruptStoreError(StorageError):
    """A stored blob or document does not match what names it."""


class NoSpaceError(StorageError):
    """Not enough free space; nothing was changed."""


class LockedError(DaemonError):
    """Another p2pupd process holds the state lock."""


class ConfigError(DaemonError):
    """The node's configuration is missing or invalid (exit code 2 at the CLI)."""


class StateLayoutError(ConfigError):
    """A member of the state directory is not what p2pupd made it (a symlink, a
    file where a directory belongs...): refused before anything is read or
    deleted through it (exit code 2 at the CLI)."""


class ApplyError(DaemonError):
    """An update could not be staged or swapped in; the old version stays."""


class HealthCheckFailedError(ApplyError):
    """The health check failed or timed out; the update was rolled back."""


class HookError(ApplyError):
    """An update hook failed, trapped or ran out of a limit."""


class BundleError(DaemonError):
    """A bundle directory is unreadable or not a p2pupd OCI layout (I/O side)."""


class MissingBaseError(BundleError):
    """A bundle carries a release envelope as a patch against one this node
    does not hold: cut for another node's state, not tampered (exit 1)."""


class NotFoundError(DaemonError):
    """A named component, version or blob is not known here."""
