"""The daemon package's public entry points for the command line.

``p2pupd.tools`` reaches the daemon only through this module (a test walks the
imports to keep it so): node operations run here inline under the state lock
when no daemon is running, and the same functions back the daemon's control
socket. The blob store and atomic write are public too: the publisher's
repository uses the same on-disk blob layout as a node.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pupd.daemon import ctl as ctlclient
from p2pupd.daemon import ops
from p2pupd.daemon.apply.engine import ApplyResult
from p2pupd.daemon.apply.transaction import UnfinishedTransactionError
from p2pupd.daemon.bundles.importer import (
    ImportedRelease,
    ImportInterruptedError,
    ImportReport,
)
from p2pupd.daemon.bundles.sitesource import StateSource
from p2pupd.daemon.bundles.verify import rebuild_envelope
from p2pupd.daemon.bundles.watch import WatchEvent, watch
from p2pupd.daemon.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_PEER_TIMEOUT,
    DaemonOptions,
    FileConfig,
    RolloutConfig,
    load_config,
    network_sizes,
    parse_endpoint,
    parse_node_key,
    parse_rate,
)
from p2pupd.daemon.errors import (
    ApplyError,
    BundleError,
    ConfigError,
    DaemonError,
    HealthCheckFailedError,
    LockedError,
    NotFoundError,
    StorageError,
)
from p2pupd.daemon.fsutil import atomic_write
from p2pupd.daemon.ops import ComponentOptions
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.state.statedir import (
    HookLimits,
    NodeConfig,
    now_seconds,
)
from p2pupd.daemon.state.stateformat import installed_version
from p2pupd.daemon.store.blobs import BlobStore
from p2pupd.protocol.errors import P2pupdError, RemoteProtocolError, VerificationError
from p2pupd.protocol.request import SiteRequest, verify_any_request

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_PEER_TIMEOUT",
    "ApplyError",
    "ApplyResult",
    "BlobStore",
    "BundleError",
    "ComponentOptions",
    "ConfigError",
    "DaemonError",
    "DaemonOptions",
    "FileConfig",
    "HealthCheckFailedError",
    "HookLimits",
    "ImportInterruptedError",
    "ImportReport",
    "ImportedRelease",
    "LockedError",
    "MadeRequest",
    "NotFoundError",
    "RolloutConfig",
    "StateSource",
    "StorageError",
    "UnfinishedTransactionError",
    "WatchEvent",
    "apply",
    "atomic_write",
    "component_status",
    "config_repair",
    "config_set",
    "config_show",
    "enrol_request",
    "fleet",
    "fsck",
    "gc",
    "history",
    "import_dir",
    "init_node",
    "installed_version",
    "load_config",
    "make_request",
    "mark_good",
    "network_sizes",
    "now_seconds",
    "open_node",
    "open_state_source",
    "parse_endpoint",
    "parse_node_key",
    "parse_rate",
    "peers",
    "rebuild_envelope",
    "recover",
    "rollback",
    "rollout_action",
    "run_daemon",
    "site_join",
    "site_update",
    "status",
    "watch_imports",
]


def init_node(
    state_dir: Path,
    trust_file: Path,
    components: dict[str, Path],
    *,
    options: ComponentOptions | None = None,
    platform: str | None = None,
    cluster: str | None = None,
    hook_limits: HookLimits | None = None,
    site_file: Path | None = None,
    self_update: Path | None = None,
) -> NodeConfig:
    """Create or update a node's state directory and pin its trust root (see ``ops``).

    Never through a daemon: with one running, it fails (``LockedError``) and
    changes nothing.
    """
    return ops.init_node(
        state_dir, trust_file, components, options=options, platform=platform,
        cluster=cluster, hook_limits=hook_limits, site_file=site_file,
        self_update=self_update,
    )  # fmt: skip


def config_show(state_dir: Path) -> dict[str, Any]:
    """The node configuration as ``config show --json`` prints it (the daemon's, if one runs)."""
    running, doc = _daemon(state_dir, "config-show")
    if running:
        return doc  # type: ignore[no-any-return]
    return ops.config_doc(Node(state_dir))


def config_set(state_dir: Path, key: str, value: str) -> dict[str, Any]:
    """Set one configuration value (checked first); live at once when a daemon runs.

    Raises ``ConfigError`` (exit 2) for an unknown key or a bad value, with
    nothing changed; ``NotFoundError`` for a component not configured here.
    """
    running, doc = _daemon(state_dir, "config-set", key=key, value=value)
    if running:
        return doc  # type: ignore[no-any-return]
    with ops.locked(state_dir) as node:
        return ops.config_set(node, key, value)


def config_repair(state_dir: Path, platform: str | None = None) -> dict[str, Any]:
    """Rebuild a damaged node configuration, keeping the node id and high-water marks.

    With a daemon running (its configuration, read at start, is sound), the
    daemon writes it back.
    """
    running, doc = _daemon(state_dir, "config-repair")
    if running:
        return doc  # type: ignore[no-any-return]
    return ops.config_repair(state_dir, platform)


def open_node(state_dir: Path) -> Node:
    return Node(state_dir)


def import_dir(
    state_dir: Path,
    src: Path,
    *,
    apply_after: bool = False,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    allow_other_node: bool = False,
) -> tuple[ImportReport, list[ApplyResult]]:
    """Import the bundle at ``src``; with ``apply_after`` apply each new release.

    ``cancel`` is polled between blobs (``ImportInterruptedError``);
    ``allow_other_node`` accepts a minimal bundle cut for another node.
    With a daemon running, it does the import (no progress callbacks).
    """
    running, doc = _daemon(
        state_dir, "import", src=str(Path(src).resolve()), apply=apply_after,
        allow_other_node=allow_other_node,
    )  # fmt: skip
    if running:
        applied = [ctlclient.result_from_doc(r) for r in doc["applied"]]
        return ctlclient.report_from_doc(doc["report"]), applied
    with ops.locked(state_dir) as node:
        report = ops.import_releases(
            node, src, progress=progress, on_total=on_total, cancel=cancel,
            allow_other_node=allow_other_node,
        )  # fmt: skip
        results = []
        if apply_after:
            results = [ops.apply(node, c) for c in ops.imported_components(report)]
        return report, results


def apply(
    state_dir: Path,
    component: str,
    serial: int | None = None,
    version: str | None = None,
    force: bool = False,
) -> ApplyResult:
    """Apply a stored release (see ``ops.apply``), through the daemon when one runs."""
    running, doc = _daemon(
        state_dir, "apply", component=component, serial=serial, version=version, force=force
    )
    if running:
        return ctlclient.result_from_doc(doc)
    with ops.locked(state_dir) as node:
        return ops.apply(node, component, serial, version, force)


def rollback(state_dir: Path, component: str) -> ApplyResult:
    """Make the previous kept version live again, through the daemon when one runs."""
    running, doc = _daemon(state_dir, "rollback", component=component)
    if running:
        return ctlclient.result_from_doc(doc)
    with ops.locked(state_dir) as node:
        return ops.rollback(node, component)


def recover(state_dir: Path) -> list[str]:
    with ops.locked(state_dir) as node:
        return ops.recover(node)


def component_status(node: Node, name: str) -> dict[str, Any]:
    return ops.component_status(node, name)


def status(state_dir: Path) -> dict[str, Any]:
    """Return the node's state as plain data (the ``status --json`` document).

    Recovers an interrupted apply first when it can (``recovered``); a
    transaction still open (another process is applying) is shown per
    component as ``transaction``. With a daemon running, the daemon answers
    and adds ``daemon`` and, per component, ``received`` (bytes, blobs and
    ``from``: bytes per peer node id), ``fetch``, ``holding`` and ``origin``.
    """
    running, doc = _daemon(state_dir, "status")
    if running:
        return doc  # type: ignore[no-any-return]
    node = Node(state_dir)
    recovered, pending = ops.recover_if_free(node)
    return ops.status(node, recovered=recovered, pending=pending)


def history(state_dir: Path, component: str) -> list[dict[str, Any]]:
    """Return ``component``'s history (oldest first), after recovering when possible."""
    node = Node(state_dir)
    node.config.component(component)
    ops.recover_if_free(node)
    return ops.history(node, component)


def gc(state_dir: Path, dry_run: bool = False) -> dict[str, Any]:
    """Delete blobs no installed, kept, pending or newest release needs (see gc.py)."""
    with ops.locked(state_dir) as node:
        return ops.gc(node, dry_run)


def fsck(state_dir: Path, repair: bool = False, full: bool = False) -> dict[str, Any]:
    """Check the store and every live target against its release (see gc.py)."""
    with ops.locked(state_dir) as node:
        return ops.fsck(node, repair=repair, full=full)


def mark_good(
    state_dir: Path, component: str, serial: int | None = None, version: str | None = None
) -> int:
    """Forget that a release failed here, so it may be applied automatically again.

    ``serial``, or the newest release labelled ``version``, or the newest
    release marked bad. Returns the serial; ``NotFoundError`` if none is marked.
    """
    running, doc = _daemon(state_dir, "mark-good", component=component, serial=serial,
                           version=version)  # fmt: skip
    if running:
        return int(doc["serial"])
    with ops.locked(state_dir) as node:
        return ops.mark_good(node, component, serial, version)


# -- sneakernet: request files, export from a node, auto-import ------------------


@dataclass(frozen=True)
class MadeRequest:
    """A request file and what it speaks for."""

    data: bytes
    site: SiteRequest
    unanswered: list[str]  # peers (node id hex) the daemon asked that did not answer


def make_request(state_dir: Path, *, site: bool = True) -> MadeRequest:
    """Return the signed request file describing this node or, with a daemon, its site.

    With a daemon running (and ``site``), the daemon asks every connected
    peer for its own signed request and wraps them with this node's in a site
    request (see siterequest.py); otherwise the file speaks for this node
    alone. Creates the node key on first use, under the state lock.
    """
    running, doc = _daemon(state_dir, "request", site=site)
    if running:
        data = doc["data"]
        return MadeRequest(data, verify_any_request(data), list(doc["unanswered"]))
    with ops.locked(state_dir) as node:
        data = ops.node_request(node)
    return MadeRequest(data, verify_any_request(data), [])


# -- site membership (daemon/state/membership.py) ----------------------------------


def enrol_request(state_dir: Path) -> bytes:
    """This node's signed enrolment request (``p2pupd site request``), through the daemon if one runs."""
    running, doc = _daemon(state_dir, "enrol-request")
    if running:
        return bytes(doc["data"])
    with ops.locked(state_dir) as node:
        return ops.enrol_request(node)


def site_join(state_dir: Path, data: bytes) -> dict[str, Any]:
    """Install a membership document made by ``site enroll`` for this node (see ``ops.site_join``)."""
    running, doc = _daemon(state_dir, "site-join", data=data)
    if running:
        return doc  # type: ignore[no-any-return]
    with ops.locked(state_dir) as node:
        return ops.site_join(node, data)


def site_update(state_dir: Path, data: bytes) -> dict[str, Any]:
    """Accept a newer revocation list or site document of this node's site (``site update``)."""
    running, doc = _daemon(state_dir, "site-update", data=data)
    if running:
        return doc  # type: ignore[no-any-return]
    with ops.locked(state_dir) as node:
        return ops.site_update(node, data)


def open_state_source(state_dir: Path) -> StateSource:
    """Return this node's releases and blobs as a bundle source (read-only use)."""
    return StateSource(Node(state_dir))


def watch_imports(
    state_dir: Path,
    root: Path,
    *,
    apply_after: bool = False,
    stop: threading.Event | None = None,
    interval: float = 2.0,
    once: bool = False,
    timeout: float | None = None,
    on_event: Callable[[WatchEvent], None] | None = None,
) -> list[WatchEvent]:
    """Import every bundle that appears under ``root`` until ``stop`` (see watch.py).

    Each import holds the state lock only while it runs; a refused bundle is
    reported as a "refused" event, an operational failure as "error"; neither
    ends the watch. Raises ``BundleError`` if ``root`` is not a directory.
    """
    halt = stop or threading.Event()

    def handle(path: Path) -> WatchEvent:
        try:
            result = import_dir(state_dir, path, apply_after=apply_after, cancel=halt.is_set)
        except (VerificationError, RemoteProtocolError) as exc:
            return WatchEvent(path, "refused", exc)
        except P2pupdError as exc:
            return WatchEvent(path, "error", exc)
        return WatchEvent(path, "imported", result)

    return watch(
        root, handle, stop=halt, interval=interval, once=once, timeout=timeout, on_event=on_event
    )


# -- the daemon: running it, and routing commands to it -----------------------------


def _daemon(state_dir: Path, op: str, **args: Any) -> tuple[bool, Any]:
    """Send ``op`` to the daemon running on ``state_dir``: (False, None) when none is.

    While a daemon runs it holds the state lock, so node commands go to it
    over ``STATE/control.sock`` instead of failing with ``LockedError``.
    """
    return ctlclient.call(state_dir, op, args)


def peers(state_dir: Path) -> dict[str, Any]:
    """The running daemon's peer table (``p2pupd peers --json``).

    Raises ``DaemonError`` when no daemon runs on ``state_dir``.
    """
    running, doc = _daemon(state_dir, "peers")
    if not running:
        raise DaemonError(f"no p2pupd daemon is running for {state_dir}")
    return doc  # type: ignore[no-any-return]


def fleet(state_dir: Path) -> dict[str, Any]:
    """The running daemon's view of the site (``p2pupd fleet --json``).

    Raises ``DaemonError`` when no daemon runs on ``state_dir``: the view is
    the reports the daemon gathered from its peers.
    """
    running, doc = _daemon(state_dir, "fleet")
    if not running:
        raise DaemonError(
            f"no p2pupd daemon is running for {state_dir}: the site view is what a running "
            "daemon gathers from its peers"
        )
    return doc  # type: ignore[no-any-return]


def rollout_action(
    state_dir: Path,
    action: str,
    component: str,
    *,
    serial: int | None = None,
    version: str | None = None,
    reason: str = "",
    wave: int | None = None,
) -> dict[str, Any]:
    """Make a signed rollout action (halt, resume, skip-wave) on the running daemon.

    The release defaults to the newest one stored here. Raises ``DaemonError``
    when no daemon runs (an action is spread by the daemon to its peers).
    """
    running, doc = _daemon(
        state_dir, "rollout", action=action, component=component, serial=serial,
        version=version, reason=reason, wave=wave,
    )  # fmt: skip
    if not running:
        raise DaemonError(
            f"no p2pupd daemon is running for {state_dir}: a rollout action is made and "
            "spread by the daemon"
        )
    return doc  # type: ignore[no-any-return]


def run_daemon(options: DaemonOptions) -> int:
    """Run ``p2pupd daemon`` in this process until SIGTERM/SIGINT; returns the exit code."""
    from p2pupd.daemon.service import app  # trio, zeroconf: loaded only for the daemon itself

    return app.main(options)
