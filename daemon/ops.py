"""Node operations: what ``p2pupd`` commands do to a node, under its state lock.

Theory of operation. Each function here takes an open ``Node`` whose state
lock the caller holds -- ``api`` takes it for a command run without a daemon;
the daemon holds it for its whole life and serialises its own writers with
its state mutex -- and does one operation: import (and apply), apply,
rollback, recover, status, history, gc, fsck, mark-good, make a request,
show or set the configuration. ``init`` and ``config_repair`` take the lock
themselves: they work on a state directory whose configuration is absent or
damaged, which ``Node`` cannot open. The
same code thus serves the command line and the daemon's control socket, so a
command gives the same answer, and the same errors, either way.

Read-only operations (``status``, ``history``) never need to write: they
recover an interrupted apply only when the lock is free and they may, and
otherwise report the open transaction.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from p2pupd.daemon.apply import gc as maint
from p2pupd.daemon.apply.engine import Applier, ApplyResult
from p2pupd.daemon.bundles.importer import ImportReport, import_bundle
from p2pupd.daemon.bundles.siterequest import build_request, identity_for, node_key, node_public_key
from p2pupd.daemon.errors import (
    ConfigError,
    DaemonError,
    LockedError,
    NotFoundError,
    StorageError,
)
from p2pupd.daemon.fsutil import FileLock
from p2pupd.daemon.state import components, nodeconfig
from p2pupd.daemon.state.membership import MembershipStore
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.state.nodeconfig import check_health_cmd
from p2pupd.daemon.state.statedir import (
    TARGET_KINDS,
    ComponentConfig,
    HookLimits,
    NodeConfig,
    StateDir,
    default_platform,
    new_node_id,
    now_seconds,
)
from p2pupd.daemon.state.trusted import TrustStore
from p2pupd.daemon.store.packstore import PackStore
from p2pupd.protocol import ids
from p2pupd.protocol.errors import CodecError, MixAndMatchError, VerificationError
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.site.membership import (
    SITE_TYPE,
    EnrolRequest,
    TrustedSite,
    membership_context,
)
from p2pupd.protocol.site.sealed import open_sealed, x25519_public
from p2pupd.protocol.trust import TrustedRoot


@contextlib.contextmanager
def locked(state_dir: Path) -> Iterator[Node]:
    """Open the node at ``state_dir`` and hold its state lock (``LockedError`` if taken).

    An older state directory is migrated to this code's format first
    (state/stateformat.py); one it does not understand was refused on opening.
    """
    node = Node(state_dir)
    with node.lock:
        node.state.migrate()
        yield node


@dataclass(frozen=True)
class ComponentOptions:
    """Settings ``init`` gives the components it names; ``None`` keeps what the
    node has (or the default, for a component new to it)."""

    kind: str | None = None
    health_cmd: tuple[str, ...] | None = None
    health_seconds: float | None = None
    retain: int | None = None
    immutable: bool | None = None
    auto_apply: bool | None = None
    # Set-id files others can write, world-writable dirs without the sticky
    # bit (``protocol.manifest.check_modes``): refused unless allowed here.
    allow_hazardous_modes: bool | None = None

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in TARGET_KINDS:
            raise ConfigError(f"unknown target kind {self.kind!r}")
        if self.retain is not None and not 0 <= self.retain <= nodeconfig.MAX_RETAIN:
            raise ConfigError(f"retain wants 0..{nodeconfig.MAX_RETAIN}, got {self.retain}")
        if self.health_seconds is not None and not 0 < self.health_seconds <= 86400:
            raise ConfigError(
                f"health timeout wants 0 < seconds <= 86400, got {self.health_seconds:g}"
            )

    def applied_to(self, old: ComponentConfig) -> ComponentConfig:
        given = {k: v for k, v in vars(self).items() if v is not None}
        return replace(old, **given)


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
    """Create or update a node's state directory and pin its trust root.

    ``self_update`` (a prefix such as /opt/p2pupd, as the offline installer
    made it) configures p2pupd itself as the component ``SELF_COMPONENT``
    (``self_component``).

    Re-running adds or re-targets the components it names; the others, and
    every setting not given again (``options`` fields left ``None``, platform,
    cluster, hook limits), stay as they were. The pinned root is only
    replaced by ``init`` when none is installed yet (rotation happens through
    signed imports). Everything is checked -- the root, the target kinds, the
    health command -- and the state lock taken before anything is written, so
    a refused ``init``, or one while a daemon runs (``LockedError``), changes
    nothing. ``site_file`` pins the site document the node belongs to (see
    daemon/state/membership.py), checked before anything is written.
    """
    options = options or ComponentOptions()
    site_data = None if site_file is None else _read_site_file(site_file)
    try:
        data = trust_file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read trust root {trust_file}: {exc.strerror}") from None
    try:
        TrustedRoot.load(data, now_seconds())  # refuse a bad root before creating anything
    except CodecError as exc:
        raise CodecError(f"{trust_file} is not a p2pupd root file ({exc})") from None
    sd = StateDir(state_dir)
    names = [_component_name(n) for n in components]
    if self_update is not None and SELF_COMPONENT in names:
        raise ConfigError(f"--self-update configures {SELF_COMPONENT}: do not also name it")
    own = None if self_update is None else self_component(self_update, options)
    if platform is not None:
        try:
            ids.check_platform(platform)
        except CodecError as exc:
            raise ConfigError(str(exc)) from None
    if options.health_cmd:  # before anything exists, even the state directory
        known = sd.read_config().components.values() if sd.exists() else []
        targets = [t.resolve() for t in components.values()] + [c.target for c in known]
        check_health_cmd(options.health_cmd, targets)
    try:
        sd.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # to hold the lock file
    except OSError as exc:
        raise StorageError(f"cannot create state directory {sd.root}: {exc.strerror}") from None
    lock = FileLock(sd.lock_path)
    try:
        lock.acquire()
    except LockedError as exc:
        raise LockedError(
            f"{exc} (the daemon, or another command): init changed nothing; stop the daemon "
            "to re-run init, or change settings live with `p2pupd config set`"
        ) from None
    try:
        old = sd.read_config() if sd.exists() else None  # damaged: `p2pupd config repair`
        comps = dict(old.components) if old else {}
        for name, target in zip(names, components.values(), strict=True):
            base = comps.get(name) or ComponentConfig(name=name, target=target)
            made = options.applied_to(replace(base, target=target))
            # A symlink-kind target is the link itself (re-running init must not
            # follow it to the version it points at): resolve only its directory.
            path = target.parent.resolve() / target.name if made.kind == "symlink" else None
            comps[name] = replace(made, target=path or target.resolve())
        if own is not None:
            base = comps.get(SELF_COMPONENT) or own
            comps[SELF_COMPONENT] = replace(base, target=own.target, kind="symlink",
                                            self_update=True, platform=own.platform)  # fmt: skip
        cfg = NodeConfig(
            node_id=old.node_id if old else new_node_id(),
            platform=platform or (old.platform if old else default_platform()),
            components=comps,
            cluster=cluster or (old.cluster if old else "default"),
            hooks=hook_limits or (old.hooks if old else HookLimits()),
        )
        sd.create(cfg)
        PackStore(sd.root)  # the store's directories, so the skeleton is whole from the start
        trust = TrustStore(sd)
        if not trust.current_path.exists():
            trust.install(data, now_seconds())
        if site_data is not None:
            MembershipStore(sd).pin(site_data)
        # The node id is the hash of the node key (made now), so peers can
        # demand proof of it; a node made before that migrates here or at its
        # daemon's next start.
        _, cfg = identity_for(sd, cfg, fresh=old is None)
    finally:
        lock.release()
    return cfg


SELF_COMPONENT = "p2pupd"
# p2pupd's own restart must start, read its state and rejoin its peers: more
# than a typical health command, on a slow ARM box with mDNS to wait for.
SELF_HEALTH_SECONDS = 120.0


def self_platform(node_platform: str | None = None) -> str:
    """The variant of p2pupd's own releases this installation takes: CPU and
    CPython minor version (``linux-x86_64-cp311``), since its trees carry
    native wheels built per minor version."""
    base = node_platform or default_platform()
    return f"{base}-cp{sys.version_info[0]}{sys.version_info[1]}"


def self_component(prefix: Path, options: ComponentOptions) -> ComponentConfig:
    """The component that is p2pupd itself, installed under ``prefix`` by the
    offline installer (``prefix/current`` a link to a version directory).

    Raises ``ConfigError`` if ``prefix`` does not hold such an installation.
    """
    prefix = prefix.resolve()
    current = prefix / "current"
    if not current.is_symlink() or not (current / "bin" / "p2pupd").is_file():
        raise ConfigError(
            f"--self-update {prefix}: no p2pupd installed there ({current} is not a link to a "
            "version directory with bin/p2pupd); install p2pupd from the offline artifact first"
        )
    health = options.health_seconds or SELF_HEALTH_SECONDS
    return ComponentConfig(
        name=SELF_COMPONENT, target=current, kind="symlink", health_seconds=health,
        self_update=True, platform=self_platform(),
    )  # fmt: skip


def _read_site_file(path: Path) -> bytes:
    """The bytes of a site document file, checked to be one (``CodecError`` names the file)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read site file {path}: {exc.strerror}") from None
    try:
        TrustedSite.load(data)
    except CodecError as exc:
        raise CodecError(f"{path} is not a p2pupd site file ({exc})") from None
    return data


def pin_site(node: Node, site_file: Path) -> str:
    """Pin the site named in the config file, if the node has none yet; returns its name.

    Raises ``ConfigError`` if the node is pinned to another site.
    """
    return node.membership.pin(_read_site_file(site_file)).name


def enrol_request(node: Node) -> bytes:
    """This node's signed enrolment request (makes the node key and box key on first use)."""
    key = node_key(node.state)
    box = node.membership.box_key(create=True)
    assert box is not None
    site = node.membership.site()
    return EnrolRequest(
        node.config.node_id,
        key.public_key().public_bytes_raw(),
        x25519_public(box),
        node.config.platform,
        now_seconds(),
        site.current.key_id if site is not None else "",
    ).sign(key)


def site_join(node: Node, data: bytes) -> dict[str, Any]:
    """Install the membership document the site operator made for this node.

    Verified first (protocol/membership.py): the node must have pinned the
    site, and the credential must be for this node's id and key and valid
    now. Returns the ``site`` status part.
    """
    site = node.membership.site()
    if site is None:
        raise ConfigError(
            "this node has no site pinned: run `p2pupd init --site SITE.pub` first"
        )
    pub = node_public_key(node.state)
    if pub is None:
        raise ConfigError("this node never made an enrolment request (`p2pupd site request`)")
    now = now_seconds()
    m = site.verify_membership(data, node.config.node_id, pub, now)
    box = node.membership.box_key()
    if box is None or open_sealed(
        m.epk, m.sealed, box, membership_context(node.config.node_id)
    ) is None:
        raise MixAndMatchError(
            "membership document's seal key is not sealed to this node's box key "
            "(made for another enrolment request of this node?)"
        )
    node.membership.install(m)
    return node.membership.status_doc(node.config.node_id, pub, now)


def site_update(node: Node, data: bytes) -> dict[str, Any]:
    """Accept a newer revocation list, or the next site document, of this node's site."""
    site = node.membership.site()
    if site is None:
        raise ConfigError("this node has no site pinned: it has nothing to update")
    if site.classify(data) == SITE_TYPE:
        new = node.membership.advance(data)
        return {"site_version": new.version, "changed": True}
    rl = site.verify_revocations(data)
    changed = node.membership.update_revocations(site, rl, data)
    return {"sequence": rl.sequence, "revoked": len(rl.entries), "changed": changed}


def _component_name(name: str) -> str:
    try:
        return ids.check_component(name)
    except CodecError as exc:
        raise ConfigError(str(exc)) from None


# -- the node configuration: show, set, repair (see state/nodeconfig.py) ----------------


def config_doc(node: Node) -> dict[str, Any]:
    """The ``config show --json`` document."""
    return nodeconfig.as_doc(node.config)


def config_set(node: Node, key: str, value: str, *, daemon_running: bool = False) -> dict[str, Any]:
    """Set ``key`` to ``value`` (checked first), write it, and return the new document.

    The caller holds the lock (or the daemon its state mutex); ``node.config``
    is replaced, so a daemon uses the new value from its next decision on.
    """
    cfg = nodeconfig.set_value(node.config, key, value, daemon_running=daemon_running)
    node.state.write_config(cfg)
    node.config = cfg
    return nodeconfig.as_doc(cfg)


def config_repair(state_dir: Path, platform: str | None = None) -> dict[str, Any]:
    """Rebuild a damaged configuration, keeping the node id when any copy of it survives.

    Needs no readable configuration (``Node`` does), only the state lock.
    Returns ``{"repaired": bool, "notes": [...], "config": doc}``; a sound
    configuration is left alone. ``state.msgpack`` (installed versions and
    the rollback high-water marks) and the trust root are never touched.
    """
    sd = StateDir(state_dir)
    if not sd.root.is_dir():
        raise ConfigError(f"{sd.root} is not a p2pupd state directory")
    with FileLock(sd.lock_path):
        try:
            cfg = sd.read_config()
        except (ConfigError, StorageError):
            pass
        else:
            if not sd.config_backup_path.exists():
                sd.write_config(cfg)  # a node from before the backup copy gets one
            return {"repaired": False, "notes": ["the configuration is sound"],
                    "config": nodeconfig.as_doc(cfg)}  # fmt: skip
        if not (sd.config_path.exists() or sd.config_backup_path.exists()):
            raise ConfigError(f"{sd.root} has no configuration to repair (run `p2pupd init`)")
        found = nodeconfig.salvage(sd, platform)
        sd.create(found.config)
    return {"repaired": True, "notes": found.notes, "config": nodeconfig.as_doc(found.config)}


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


def newest_serial(node: Node, component: str) -> int:
    """The newest release of ``component`` stored here; ``NotFoundError`` if none is."""
    node.config.component(component)
    serials = node.releases.serials(component)
    if not serials:
        raise NotFoundError(f"no release of {component} is stored on this node")
    return serials[-1]


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
        **({"self_update": True} if cfg.self_update else {}),
        "platform": node.config.platform_of(name),
        "kept": [{"serial": s, "version": label(s)} for s in st.kept],
        "available": {"serial": newest, "version": label(newest)} if newest else None,
        # Other platforms' variants carried for the LAN (never installed here).
        "carried": [{"serial": s, "platform": p} for s, p in node.carried.carried(name)],
        "high_water": st.high_water,
        "bad": {str(s): r for s, r in st.bad.items()},
        "interrupted": {str(s): n for s, n in st.interrupted.items()},
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
    except StorageError:
        # Recovery must write (a full disk, a read-only target): it runs
        # again with the next command that can; report what is open.
        return [], applier.pending()
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
        "site": node.membership.status_doc(
            node.config.node_id, node_public_key(node.state), now_seconds()
        ),
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
        "blobs_packed": res.blobs_packed,
        "packs_rewritten": res.packs_rewritten,
        "variants_dropped": res.variants_dropped,
        "recovered": res.recovered,
    }


def fsck(node: Node, repair: bool = False, full: bool = False) -> dict[str, Any]:
    """Check the store and every live target against its release (see gc.py)."""
    return maint.fsck(node, repair=repair, full=full)


def mark_good(
    node: Node, component: str, serial: int | None = None, version: str | None = None
) -> int:
    """Forget that a release failed here, so it may be applied automatically again.

    Takes ``serial``, else the newest stored release labelled ``version``,
    else the newest release marked bad; returns its serial. Raises
    ``NotFoundError`` when that release is not marked bad here.
    """
    node.config.component(component)
    st = node.state.read_state(component)
    if serial is None and version is not None:
        serial = serial_of(node, component, version)
    if serial is None:
        if not st.bad:
            raise NotFoundError(f"no release of {component} is marked bad on this node")
        serial = max(st.bad)
    if serial not in st.bad:
        raise NotFoundError(f"{component} serial {serial} is not marked bad on this node")
    components.marked_good(node, component, serial)
    return serial


def node_request(node: Node) -> bytes:
    """This node's signed request file (creates the node key on first use)."""
    return build_request(node, now_seconds())[0]
