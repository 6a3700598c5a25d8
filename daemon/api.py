"""The daemon package's public entry points for the command line.

``p2pupd.tools`` reaches the daemon only through this module (a test walks the
imports to keep it so): node operations run here inline under the state lock
when no daemon is running, and the same functions back the daemon's control
socket. The blob store and atomic write are public too: the publisher's
repository uses the same on-disk blob layout as a node.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from p2pupd.daemon import ctl as ctlclient
from p2pupd.daemon.apply.engine import Applier, ApplyResult
from p2pupd.daemon.apply.transaction import UnfinishedTransactionError
from p2pupd.daemon.bundles.importer import (
    ImportedRelease,
    ImportInterruptedError,
    ImportReport,
    import_bundle,
)
from p2pupd.daemon.bundles.siterequest import build_request
from p2pupd.daemon.bundles.sitesource import StateSource
from p2pupd.daemon.bundles.watch import WatchEvent, watch
from p2pupd.daemon.config import DEFAULT_CONFIG_PATH, FileConfig, load_config
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
from p2pupd.daemon.options import DaemonOptions, parse_endpoint, parse_rate
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.state.statedir import (
    ComponentConfig,
    HookLimits,
    NodeConfig,
    StateDir,
    default_platform,
    new_node_id,
    now_seconds,
)
from p2pupd.daemon.store.blobs import BlobStore
from p2pupd.protocol.errors import CodecError, P2pupdError, RemoteProtocolError, VerificationError
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.request import SiteRequest, verify_any_request

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ApplyError",
    "ApplyResult",
    "BlobStore",
    "BundleError",
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
    "StateSource",
    "StorageError",
    "UnfinishedTransactionError",
    "WatchEvent",
    "apply",
    "atomic_write",
    "component_status",
    "fsck",
    "gc",
    "history",
    "import_dir",
    "init_node",
    "load_config",
    "make_request",
    "open_node",
    "open_state_source",
    "parse_endpoint",
    "parse_rate",
    "peers",
    "recover",
    "rollback",
    "run_daemon",
    "status",
    "watch_imports",
]


def init_node(
    state_dir: Path,
    trust_file: Path,
    components: dict[str, Path],
    *,
    kind: str = "dir",
    platform: str | None = None,
    health_cmd: tuple[str, ...] = (),
    health_seconds: float = 30.0,
    retain: int = 2,
    immutable: bool = False,
    cluster: str = "default",
    hook_limits: HookLimits | None = None,
) -> NodeConfig:
    """Create or update a node's state directory and pin its trust root.

    Re-running adds components; the pinned root is only replaced by ``init``
    when none is installed yet (rotation happens through signed imports).
    ``hook_limits`` ``None`` keeps the node's limits (defaults on a new node).
    """
    sd = StateDir(state_dir)
    old = sd.read_config() if sd.exists() else None
    comps = dict(old.components) if old else {}
    for name, target in components.items():
        # A symlink-kind target is the link itself (re-running init must not
        # follow it to the version it points at): resolve only its directory.
        path = target.parent.resolve() / target.name if kind == "symlink" else target.resolve()
        comps[name] = ComponentConfig(
            name=name,
            target=path,
            kind=kind,
            retain=retain,
            immutable=immutable,
            health_cmd=health_cmd,
            health_seconds=health_seconds,
        )
    cfg = NodeConfig(
        node_id=old.node_id if old else new_node_id(),
        platform=platform or (old.platform if old else default_platform()),
        components=comps,
        cluster=cluster if old is None else old.cluster,
        hooks=hook_limits or (old.hooks if old else HookLimits()),
    )
    try:
        data = trust_file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read trust root {trust_file}: {exc.strerror}") from None
    from p2pupd.protocol.trust import TrustedRoot

    try:
        TrustedRoot.load(data, now_seconds())  # refuse a bad root before creating anything
    except CodecError as exc:
        raise CodecError(f"{trust_file} is not a p2pupd root file ({exc})") from None
    sd.create(cfg)
    node = Node(state_dir)
    with node.lock:
        if not node.trust_store.current_path.exists():
            node.trust_store.install(data, now_seconds())
    return cfg


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
    node = Node(state_dir)
    with node.lock:
        applier = Applier(node)
        applier.recover()
        report = import_bundle(
            node,
            src,
            now_seconds(),
            progress,
            on_total,
            cancel=cancel,
            allow_other_node=allow_other_node,
        )
        # Keep the verified, decoded manifests (daemon/state/mancache.py): a later
        # apply then starts from them instead of decoding thousands of entries.
        for r in report.releases:
            if r.new:
                with contextlib.suppress(DaemonError):
                    applier.manifest(r.component, r.serial)
        results = []
        if apply_after:
            for comp in sorted({r.component for r in report.releases}):
                results.append(applier.apply(comp))
        return report, results


def apply(
    state_dir: Path,
    component: str,
    serial: int | None = None,
    version: str | None = None,
    force: bool = False,
) -> ApplyResult:
    running, doc = _daemon(
        state_dir, "apply", component=component, serial=serial, version=version, force=force
    )
    if running:
        return ctlclient.result_from_doc(doc)
    node = Node(state_dir)
    with node.lock:
        applier = Applier(node)
        if version is not None:
            try:
                serial = applier.serial_of(component, version)
            except NotFoundError as exc:
                raise _no_variant_error(node, component, version) or exc from None
        return applier.apply(component, serial, force)


def _no_variant_error(node: Node, component: str, version: str) -> NotFoundError | None:
    """Explain why no release labelled ``version`` is stored, if an import said why.

    The importer records a ``no-variant`` history event for a release that had
    no variant for this node's platform; returns the error naming the
    variants it had, or ``None``.
    """
    for h in reversed(node.state.read_state(component).history):
        if h.event == "no-variant" and h.version == version:
            return NotFoundError(h.detail)
    return None


def rollback(state_dir: Path, component: str) -> ApplyResult:
    running, doc = _daemon(state_dir, "rollback", component=component)
    if running:
        return ctlclient.result_from_doc(doc)
    node = Node(state_dir)
    with node.lock:
        return Applier(node).rollback(component)


def recover(state_dir: Path) -> list[str]:
    node = Node(state_dir)
    with node.lock:
        return Applier(node).recover()


def _serial_of(node: Node, component: str, version: str) -> int:
    root = node.trusted_root()
    for s in reversed(node.releases.serials(component)):
        man, _ = node.releases.get(root, component, s)
        if man.version == version:
            return s
    raise NotFoundError(f"no stored release of {component} has version {version!r}")


def component_status(node: Node, name: str) -> dict[str, Any]:
    cfg = node.config.components[name]
    st = node.state.read_state(name)
    root = node.trusted_root()

    def label(serial: int | None) -> str | None:
        if serial is None:
            return None
        try:
            man: Manifest = node.releases.get(root, name, serial)[0]
        except (NotFoundError, StorageError):
            return None
        return man.version

    stored = node.releases.serials(name)
    newest = stored[-1] if stored else None
    return {
        "version": label(st.installed),
        "serial": st.installed,
        "target": str(cfg.target),
        "kind": cfg.kind,
        "kept": [{"serial": s, "version": label(s)} for s in st.kept],
        "available": {"serial": newest, "version": label(newest)} if newest else None,
        "high_water": st.high_water,
        "bad": {str(s): r for s, r in st.bad.items()},
        "interrupted": {str(s): n for s, n in st.interrupted.items()},
        "last_error": st.last_error,
    }


def _recover_if_free(node: Node) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Recover open transactions if the state lock is free; return (actions, still open).

    A read-only command must not wait for a running apply (or a daemon), nor
    fail when it may not write: then it only reports what is open.
    """
    applier = Applier(node)
    try:
        node.lock.acquire(blocking=False)
    except (LockedError, StorageError):
        return [], applier.pending()
    try:
        return applier.recover(), applier.pending()
    except StorageError:
        # Recovery must write (a full disk, a read-only target): it runs
        # again with the next command that can; report what is open.
        return [], applier.pending()
    finally:
        node.lock.release()


def status(state_dir: Path, *, route: bool = True) -> dict[str, Any]:
    """Return the node's state as plain data (the ``status --json`` document).

    Recovers an interrupted apply first when it can (``recovered``); a
    transaction still open (another process is applying) is shown per
    component as ``transaction``. With a daemon running (and ``route``), the
    daemon answers and adds ``daemon`` and, per component, ``received``
    (bytes, blobs and ``from``: bytes per peer node id), ``fetch``,
    ``holding`` and ``origin``.
    """
    if route:
        running, doc = _daemon(state_dir, "status")
        if running:
            return doc  # type: ignore[no-any-return]
    node = Node(state_dir)
    recovered, pending = _recover_if_free(node)
    root = node.trusted_root()
    comps = {n: component_status(node, n) for n in sorted(node.config.components)}
    for name, c in comps.items():
        c["transaction"] = pending.get(name)
    return {
        "node_id": node.config.node_id.hex(),
        "platform": node.config.platform,
        "hook_limits": node.config.hooks.to_value(),
        "root_version": root.version,
        "store": {"blobs": sum(1 for _ in node.store.iter_digests())},
        "recovered": recovered,
        "components": comps,
    }


def history(state_dir: Path, component: str) -> list[dict[str, Any]]:
    """Return ``component``'s history (oldest first), after recovering when possible."""
    node = Node(state_dir)
    node.config.component(component)
    _recover_if_free(node)
    return [h.to_value() for h in node.state.read_state(component).history]


def gc(state_dir: Path, dry_run: bool = False) -> dict[str, Any]:
    """Delete blobs no installed, kept, pending or newest release needs (see gc.py)."""
    from p2pupd.daemon.apply import gc as maint

    node = Node(state_dir)
    with node.lock:
        res = maint.collect(node, dry_run=dry_run)
    return {
        "dry_run": res.dry_run,
        "blobs_removed": res.blobs_removed,
        "bytes_freed": res.bytes_freed,
        "blobs_kept": res.blobs_kept,
        "temp_files_removed": res.temp_files_removed,
        "recovered": res.recovered,
    }


def fsck(state_dir: Path, repair: bool = False, full: bool = False) -> dict[str, Any]:
    """Check the store and every live target against its release (see gc.py)."""
    from p2pupd.daemon.apply import gc as maint

    node = Node(state_dir)
    with node.lock:
        return maint.fsck(node, repair=repair, full=full)


def mark_good(state_dir: Path, component: str, serial: int) -> None:
    """Forget that ``serial`` failed here, so it may be applied automatically again."""
    node = Node(state_dir)
    with node.lock:
        st = node.state.read_state(component)
        bad = dict(st.bad)
        bad.pop(serial, None)
        node.state.update_state(component, replace(st, bad=bad))


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
    node = Node(state_dir)
    with node.lock:
        data = build_request(node, now_seconds())[0]
    return MadeRequest(data, verify_any_request(data), [])


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


def run_daemon(options: DaemonOptions) -> int:
    """Run ``p2pupd daemon`` in this process until SIGTERM/SIGINT; returns the exit code."""
    from p2pupd.daemon.service import app  # trio, zeroconf: loaded only for the daemon itself

    return app.main(options)
