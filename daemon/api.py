"""The daemon package's public entry points for the command line.

``p2pupd.tools`` reaches the daemon only through this module (a test walks the
imports to keep it so): node operations run here inline under the state lock
when no daemon is running, and the same functions back the daemon's control
socket. The blob store and atomic write are public too: the publisher's
repository uses the same on-disk blob layout as a node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from p2pupd.protocol.manifest import Manifest

from .apply import Applier, ApplyResult
from .errors import (
    ApplyError,
    BundleError,
    ConfigError,
    DaemonError,
    HealthCheckFailedError,
    LockedError,
    NotFoundError,
    StorageError,
)
from .fsutil import atomic_write
from .importer import ImportReport, import_bundle
from .node import ComponentConfig, NodeConfig, StateDir, default_platform, new_node_id, now_seconds
from .node_ctx import Node
from .store import BlobStore

__all__ = [
    "ApplyError",
    "ApplyResult",
    "BlobStore",
    "BundleError",
    "ConfigError",
    "DaemonError",
    "HealthCheckFailedError",
    "ImportReport",
    "LockedError",
    "NotFoundError",
    "StorageError",
    "apply",
    "atomic_write",
    "component_status",
    "history",
    "import_dir",
    "init_node",
    "open_node",
    "rollback",
    "status",
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
) -> NodeConfig:
    """Create or update a node's state directory and pin its trust root.

    Re-running adds components; the pinned root is only replaced by ``init``
    when none is installed yet (rotation happens through signed imports).
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
    )
    try:
        data = trust_file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read trust root {trust_file}: {exc.strerror}") from None
    from p2pupd.protocol.trust import TrustedRoot

    TrustedRoot.load(data, now_seconds())  # refuse a bad root before creating anything
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
) -> tuple[ImportReport, list[ApplyResult]]:
    """Import the bundle at ``src``; with ``apply_after`` apply each new release."""
    node = Node(state_dir)
    with node.lock:
        applier = Applier(node)
        applier.recover()
        report = import_bundle(node, src, now_seconds(), progress, on_total)
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
    node = Node(state_dir)
    with node.lock:
        if version is not None:
            serial = _serial_of(node, component, version)
        return Applier(node).apply(component, serial, force)


def rollback(state_dir: Path, component: str) -> ApplyResult:
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
        "last_error": st.last_error,
    }


def status(state_dir: Path) -> dict[str, Any]:
    """Return the node's state as plain data (the ``status --json`` document)."""
    node = Node(state_dir)
    root = node.trusted_root()
    return {
        "node_id": node.config.node_id.hex(),
        "platform": node.config.platform,
        "root_version": root.version,
        "store": {"blobs": sum(1 for _ in node.store.iter_digests())},
        "components": {n: component_status(node, n) for n in sorted(node.config.components)},
    }


def history(state_dir: Path, component: str) -> list[dict[str, Any]]:
    node = Node(state_dir)
    node.config.component(component)
    return [h.to_value() for h in node.state.read_state(component).history]


def mark_good(state_dir: Path, component: str, serial: int) -> None:
    """Forget that ``serial`` failed here, so it may be applied automatically again."""
    node = Node(state_dir)
    with node.lock:
        st = node.state.read_state(component)
        bad = dict(st.bad)
        bad.pop(serial, None)
        node.state.update_state(component, replace(st, bad=bad))
