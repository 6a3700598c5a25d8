"""Node operations: what ``p2pupd`` commands do to a node, under its state lock.

Theory of operation. Each function here takes an open ``Node`` whose state
lock the caller holds -- ``api`` takes it for a command run without a daemon;
the daemon holds it for its whole life and serialises its own writers with
its state mutex -- and does one operation: init, import (and apply), apply,
rollback, recover, status, history, gc, fsck, mark-good, make a request. The
same code thus serves the command line and the daemon's control socket, so a
command gives the same answer, and the same errors, either way.

Read-only operations (``status``, ``history``) never need to write: they
recover an interrupted apply only when the lock is free and they may, and
otherwise report the open transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from p2pupd.daemon.apply import gc as maint
from p2pupd.daemon.apply.engine import Applier, ApplyResult
from p2pupd.daemon.bundles.importer import ImportReport, import_bundle
from p2pupd.daemon.bundles.siterequest import build_request, node_identity
from p2pupd.daemon.errors import (
    ConfigError,
    DaemonError,
    LockedError,
    NotFoundError,
    StorageError,
)
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
from p2pupd.protocol.errors import CodecError, VerificationError
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.trust import TrustedRoot


@contextlib.contextmanager
def locked(state_dir: Path) -> Iterator[Node]:
    """Open the node at ``state_dir`` and hold its state lock (``LockedError`` if taken)."""
    node = Node(state_dir)
    with node.lock:
        yield node


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
        comps[name] = ComponentConfig(
            name=name,
            target=target.resolve(),
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
    try:
        TrustedRoot.load(data, now_seconds())  # refuse a bad root before creating anything
    except CodecError as exc:
        raise CodecError(f"{trust_file} is not a p2pupd root file ({exc})") from None
    sd.create(cfg)
    node = Node(state_dir)
    with node.lock:
        if not node.trust_store.current_path.exists():
            node.trust_store.install(data, now_seconds())
        # The node id is the hash of the node key (made now), so peers can
        # demand proof of it; a node made before that migrates here or at its
        # daemon's next start.
        node_identity(node, fresh=old is None)
    return node.config


def import_releases(
    node: Node,
    src: Path,
    *,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    allow_other_node: bool = False,
) -> ImportReport:
    """Recover, then import the bundle at ``src`` (see importer.py); no apply.

    The verified, decoded manifests of new releases are kept
    (daemon/state/mancache.py), so a later apply starts from them instead of
    decoding thousands of entries again.
    """
    applier = Applier(node)
    applier.recover()
    report = import_bundle(
        node, src, now_seconds(), progress, on_total, cancel=cancel,
        allow_other_node=allow_other_node,
    )  # fmt: skip
    for r in report.releases:
        if r.new:
            with contextlib.suppress(DaemonError):
                applier.manifest(r.component, r.serial)
    return report


def imported_components(report: ImportReport) -> list[str]:
    """The components an ``import --apply`` applies, in order."""
    return sorted({r.component for r in report.releases})


def apply(
    node: Node,
    component: str,
    serial: int | None = None,
    version: str | None = None,
    force: bool = False,
) -> ApplyResult:
    """Apply release ``serial``, or the newest labelled ``version``, or the newest."""
    applier = Applier(node)
    if version is not None:
        serial = serial_of(node, component, version, applier)
    return applier.apply(component, serial, force)


def serial_of(node: Node, component: str, version: str, applier: Applier | None = None) -> int:
    """The serial of the newest stored release of ``component`` labelled ``version``.

    Raises ``NotFoundError``, naming the variants a release had when an import
    recorded that it had none for this node's platform.
    """
    try:
        return (applier or Applier(node)).serial_of(component, version)
    except NotFoundError as exc:
        for h in reversed(node.state.read_state(component).history):
            if h.event == "no-variant" and h.version == version:
                raise NotFoundError(h.detail) from None
        raise exc from None


def rollback(node: Node, component: str) -> ApplyResult:
    """Make the previous kept version of ``component`` live again."""
    return Applier(node).rollback(component)


def recover(node: Node) -> list[str]:
    """Finish or undo interrupted applies; returns what was done, one line each."""
    return Applier(node).recover()


def component_status(node: Node, name: str) -> dict[str, Any]:
    """One component of the ``status --json`` document."""
    cfg = node.config.components[name]
    st = node.state.read_state(name)
    chain = node.trust_chain()

    def label(serial: int | None) -> str | None:
        if serial is None:
            return None
        try:
            man: Manifest = node.releases.get(chain, name, serial)[0]
        except (NotFoundError, StorageError, VerificationError):
            return None  # absent, unreadable or revoked: shown without a label
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
        "last_error": st.last_error,
    }


def recover_if_free(node: Node) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Recover open transactions if the state lock is free; return (actions, still open).

    A read-only command must not wait for a running apply (or a daemon), nor
    fail when it may not write: then it only reports what is open. The caller
    does not hold the lock.
    """
    applier = Applier(node)
    try:
        node.lock.acquire(blocking=False)
    except (LockedError, StorageError):
        return [], applier.pending()
    try:
        return applier.recover(), applier.pending()
    finally:
        node.lock.release()


def status(
    node: Node, *, recovered: list[str], pending: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The node's state as plain data (the ``status --json`` document, without a daemon's part).

    ``recovered`` and ``pending`` come from ``recover_if_free`` (a command) or
    are empty (the daemon, which recovered at start and holds the lock).
    """
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


def history(node: Node, component: str) -> list[dict[str, Any]]:
    """``component``'s history, oldest first."""
    node.config.component(component)
    return [h.to_value() for h in node.state.read_state(component).history]


def gc(node: Node, dry_run: bool = False) -> dict[str, Any]:
    """Delete blobs no installed, kept, pending or newest release needs (see gc.py)."""
    res = maint.collect(node, dry_run=dry_run)
    return {
        "dry_run": res.dry_run,
        "blobs_removed": res.blobs_removed,
        "bytes_freed": res.bytes_freed,
        "blobs_kept": res.blobs_kept,
        "temp_files_removed": res.temp_files_removed,
        "recovered": res.recovered,
    }


def fsck(node: Node, repair: bool = False, full: bool = False) -> dict[str, Any]:
    """Check the store and every live target against its release (see gc.py)."""
    return maint.fsck(node, repair=repair, full=full)


def mark_good(node: Node, component: str, serial: int) -> None:
    """Forget that ``serial`` failed here, so it may be applied automatically again."""
    st = node.state.read_state(component)
    bad = dict(st.bad)
    bad.pop(serial, None)
    node.state.update_state(component, replace(st, bad=bad))


def node_request(node: Node) -> bytes:
    """This node's signed request file (creates the node key on first use)."""
    return build_request(node, now_seconds())[0]
