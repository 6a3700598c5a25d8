"""The life of a release on a node: accepted, fetched, complete, applied.

Theory of operation
-------------------
Every release takes the same path whatever brought it::

    accepted  verified and persisted (``accept``): from a peer
              (``accept_from_peer``) or a bundle (``import_dir``)
    fetching  its missing blobs come from peers (``fetch``)
    complete  every blob is here: gossip announces it (``release_complete``)
    gated     an ``auto_apply`` release waits at the site's rollout gate
              (``rollout.service.RolloutService``) until its wave may go: at once when
              the release has no rollout policy
    applied   by the CLI's ``Applier`` in a worker thread: automatically once
              the gate allows, or on ``p2pupd apply`` (refused while the
              site's brake or a halt holds the release, unless forced)

All steps that write the state directory (accept, import, apply, rollback,
root rotation) take the state ``mutex``: they read-modify-write
``state.msgpack`` from worker threads and must not interleave.

At start ``scan`` recovers interrupted applies, finds what the node holds (the
newest complete release per component), resumes the fetch of a newer
incomplete one, and offers the gate a complete release never applied here. A release
the operator rolled back from (it has an ``applied`` history entry) is not
re-applied automatically, at start or later.

Other platforms' variants of a release the node holds take the same path
under their own key (``app@linux-aarch64``; protocol/fleet/variants.py,
state/carried.py) but stop at *complete*: carried, served, never applied.
They are announced with the node's own release and, for p2pupd's own
component, only with the one it runs and proved.

p2pupd's own component (``self_update``) differs in two ways (selfupdate.py,
docs/self-update.md). Its apply stops before the swap (``HandOver``) and the
daemon restarts into the new version for a trial run. And a node announces
only the release of it that it *runs* and proved healthy, never one it merely
holds: a self-update spreads from nodes that proved it, so a release that
fails on the first node to try it goes no further (each hop is a canary).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from p2pupd.daemon import heap, ops
from p2pupd.daemon.apply.engine import Applier, ApplyResult, HandOver
from p2pupd.daemon.bundles.importer import ImportReport
from p2pupd.daemon.errors import ApplyError, DaemonError
from p2pupd.daemon.events import log, short
from p2pupd.daemon.offload import Offload
from p2pupd.daemon.service.fetch import FetchManager
from p2pupd.daemon.service.gossip import GossipService
from p2pupd.daemon.service.rollout.service import RolloutHeldError, RolloutService
from p2pupd.daemon.service.selfupdate import Hooks, Restart, launcher, restart_for
from p2pupd.daemon.service.serving import Content
from p2pupd.daemon.state import carried
from p2pupd.daemon.state.gate import needed_for, persist_release, verify_offer
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.state.statedir import ComponentConfig, ComponentState, now_seconds
from p2pupd.protocol.errors import (
    MixAndMatchError,
    P2pupdError,
    RemoteProtocolError,
    VerificationError,
)
from p2pupd.protocol.gossip import RequestManifest
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.trust import TrustChain


@dataclass
class Scan:
    holdings: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    read: dict[str, Manifest] = field(default_factory=dict)  # each holding's, as read here
    resume: list[tuple[Manifest, bytes]] = field(default_factory=list)
    apply: list[Manifest] = field(default_factory=list)
    held: list[Manifest] = field(default_factory=list)  # newest complete per component
    recovered: list[str] = field(default_factory=list)


def should_auto_apply(cfg: ComponentConfig, st: ComponentState, serial: int) -> bool:
    """Apply ``serial`` on arrival? Only newer releases never applied (or failed) here."""
    if not cfg.auto_apply or serial in st.bad:
        return False
    if st.installed is not None and serial <= st.installed:
        return False
    return not any(h.event == "applied" and h.serial == serial for h in st.history)


class Lifecycle:
    """See the module docstring; one per ``NodeService``, the coordinator above
    its ``FetchManager`` and ``GossipService``."""

    def __init__(
        self,
        node: Node,
        *,
        offload: Offload,
        mutex: trio.Lock,
        content: Content,
        fetch: FetchManager,
        gossip: GossipService,
        rollout: RolloutService,
        spawn: Callable[..., None],
        forget_servable: Callable[[], None],
        holdings_changed: Callable[[], None],
    ) -> None:
        """``mutex`` serialises every writer of the state directory; ``spawn(fn, *args)``
        runs a background task; ``forget_servable()`` drops cached servable sets;
        ``holdings_changed()`` is called when a release becomes complete."""
        self.node = node
        self.offload = offload
        self.mutex = mutex
        self.content = content
        self.fetch = fetch
        self.gossip = gossip
        self.rollout = rollout
        self.spawn = spawn
        self.forget_servable = forget_servable
        self.holdings_changed = holdings_changed
        self.origin: dict[str, tuple[int, str]] = {}  # component -> (serial, where from)
        self._high: dict[str, int] = {}  # high-water marks, cached for gossip
        # Set by a daemon that owns its process: p2pupd's own component is then
        # tried by restarting into it (None: applied like any other, e.g. in tests).
        self.self_update: Hooks | None = None
        self.complete: dict[str, tuple[int, bytes]] = {}  # newest release held in full
        self.rules = carried.rules_of(node)

    def scan(self) -> Scan:
        """Recover, then find holdings, fetches to resume and releases to apply (blocking)."""
        node, out = self.node, Scan()
        applier = Applier(node)
        out.recovered = applier.recover()
        trying = applier.pending()  # open after recovery: only a trial this process runs
        self.content.refresh()
        chain = node.trust_chain()
        newest: set[str] = set()
        for name, cfg in node.config.components.items():
            st = node.state.read_state(name)
            self._high[name] = st.high_water
            serials = node.releases.serials(name)
            for serial in reversed(serials):
                try:
                    man, env = node.releases.get(chain, name, serial)
                except DaemonError as exc:
                    log(
                        "release-unreadable",
                        level=logging.WARNING,
                        component=name,
                        serial=serial,
                        reason=str(exc),
                    )
                    continue
                digest = env.payload_digest()
                if not needed_for(node, man):
                    if name not in newest:  # newest complete one
                        newest.add(name)
                        self.complete[name] = (serial, digest)
                        out.held.append(man)
                    if (
                        serial == serials[-1]
                        and name not in trying
                        and should_auto_apply(cfg, st, serial)
                    ):
                        out.apply.append(man)
                    if cfg.self_update and (st.installed is None or serial > st.installed):
                        continue  # held, not proven here: not announced (see above)
                    out.holdings[name] = (serial, digest)
                    out.read[name] = man
                    break
                if serial == serials[-1] and serial not in st.bad:
                    out.resume.append((man, digest))
            if serials:
                self._scan_carried(name, serials[-1], out)
        return out

    def _scan_carried(self, name: str, serial: int, out: Scan) -> None:
        """The variants carried of our newest release: hold them, or resume their fetch."""
        node, chain = self.node, self.node.trust_chain()
        cfg, st = node.config.components[name], node.state.read_state(name)
        proven = not cfg.self_update or st.installed == serial  # see the module docstring
        for platform in node.carried.platforms(name, serial):
            try:
                man, env = node.carried.get(chain, name, serial, platform)
            except DaemonError as exc:
                log("release-unreadable", level=logging.WARNING, component=name, serial=serial,
                    platform=platform, reason=str(exc))  # fmt: skip
                continue
            key, digest = self.carry_key(man), env.payload_digest()
            if proven:  # announced at once, complete or not (news runs ahead of data)
                out.holdings[key] = (serial, digest)
                out.read[key] = man
            if needed_for(node, man):
                out.resume.append((man, digest))

    def carry_key(self, man: Manifest) -> str:
        """Our key for ``man``: its component, or ``component@platform`` when carried."""
        return self.rules.key_of(man)

    def high_water(self, component: str) -> int:
        """The component's rollback high-water mark as last accepted here."""
        return self._high.get(component, 0)

    async def accept_from_peer(self, data: bytes, action: RequestManifest[bytes]) -> None:
        """Verify and persist a manifest a peer sent, then fetch its blobs.

        Raises what ``gate.verify_offer`` raises, and ``MixAndMatchError`` if
        it is not the release the peer announced.
        """
        c, s, peer = action.component, action.serial, action.peer
        other = self.rules.carried(c)
        if other is not None:
            await self._carry_from_peer(data, action, *other)
            return
        async with self.mutex:
            if s < self.high_water(c):
                # Overtaken while it travelled (a newer serial was accepted from
                # another peer meanwhile): stale, and not the sender's fault.
                return
            man, env, new = await self.offload(
                lambda: verify_offer(self.node, data, c, s, now_seconds())
            )
            digest = env.payload_digest()
            if digest != action.manifest_digest:
                raise MixAndMatchError(f"{c} serial {s} differs from the manifest announced")
            if new:
                detail = f"from peer {peer.hex()}"
                await self.offload(
                    lambda: persist_release(self.node, man, env, digest, "received", detail)
                )
            self._high[c] = max(self._high.get(c, 0), s)
        if new:
            self.origin[c] = (s, short(peer))
            log("manifest-accepted", component=c, version=man.version, serial=s, from_=short(peer))
            await self.news(c, s, digest)  # news runs ahead of the blobs
            self.fetch.start(man, digest)

    async def _carry_from_peer(
        self, data: bytes, action: RequestManifest[bytes], component: str, platform: str
    ) -> None:
        """Verify and store another platform's variant a peer sent, then fetch what a
        node of that platform needs of it. Raises what ``carried.verify_carried``
        raises, and ``MixAndMatchError`` if it is not the variant announced."""
        s, peer = action.serial, action.peer
        async with self.mutex:
            man, env, new = await self.offload(
                lambda: carried.verify_carried(
                    self.node, data, component, s, platform, now_seconds()
                )
            )
            digest = env.payload_digest()
            if digest != action.manifest_digest:
                raise MixAndMatchError(
                    f"{component} serial {s} for {platform} differs from the manifest announced"
                )
            if new:
                await self.offload(lambda: carried.persist_carried(self.node, man, env))
        if new:
            log("variant-accepted", component=component, version=man.version, serial=s,
                platform=platform, from_=short(peer))  # fmt: skip
            await self.news(action.component, s, digest)
            self.fetch.start(man, digest)

    async def advance_root(self, version: int, data: bytes) -> None:
        """Accept root ``version`` (rotation rules of ``TrustStore.advance``)."""
        async with self.mutex:
            await self.offload(
                lambda: self.node.trust_store.advance({version: data}, now_seconds())
            )
        self.forget_servable()
        log("root-advanced", version=version)

    async def release_complete(self, man: Manifest, digest: bytes) -> None:
        """Every blob of ``man`` is here: announce it, apply it if the policy says so
        (a variant carried for another platform: just say so, it is served already)."""
        c, s = man.component, man.serial
        if man.platform is not None and not self.rules.installs(c, man.platform):
            self.forget_servable()
            log("variant-carried", component=c, version=man.version, serial=s,
                platform=man.platform, from_=self.sources(self.carry_key(man), s))  # fmt: skip
            return
        cfg = self.node.config.components[c]
        self.forget_servable()
        await self.news(c, s, digest)  # known already unless found at start
        if self.complete.get(c, (0, b""))[0] < s:
            self.complete[c] = (s, digest)
        self.holdings_changed()
        rec = self.fetch.received.get(c)
        log(
            "release-complete",
            component=c,
            version=man.version,
            serial=s,
            bytes=rec.bytes if rec and rec.serial == s else 0,
            from_=self.sources(c, s),
        )
        st = await self.offload(lambda: self.node.state.read_state(c))
        self.rollout.know(man)
        if should_auto_apply(cfg, st, s):
            self.rollout.offer(man)

    async def announceable(self, component: str, serial: int) -> bool:
        """Whether this node tells its peers of release ``serial`` (announces or
        offers it): any verified release, but of p2pupd's own component only the
        one it runs and proved (module docstring); the variants carried of a release
        (``component`` a key ``app@platform``) as that release."""
        found = self.rules.carried(component)
        if found is not None:
            component = found[0]
        if not self.node.config.components[component].self_update:
            return True
        st = await self.offload(lambda: self.node.state.read_state(component))
        return st.installed == serial

    async def news(self, component: str, serial: int, digest: bytes) -> None:
        """Announce a verified release to the peers behind, if it is ``announceable``.

        A release of our own also ends the fetches of variants carried of an older
        one: nobody will ask for those any more (the rules carry the release held).
        """
        if self.rules.carried(component) is None:
            self.fetch.stop_carried(component, below=serial)
        if await self.announceable(component, serial):
            self.gossip.verified(component, serial, digest)

    async def self_update_committed(
        self, component: str, serial: int
    ) -> tuple[bytes, Manifest]:
        """p2pupd's own release ``serial`` runs here and proved healthy: announce it.
        Returns its manifest digest and manifest (the caller offers its blobs)."""
        chain = await self.offload(self.node.trust_chain)
        man, env = await self.offload(lambda: self.node.releases.get(chain, component, serial))
        await self.offload(self.content.refresh)
        self.forget_servable()
        digest = env.payload_digest()
        self.gossip.verified(component, serial, digest)
        self.holdings_changed()
        return digest, man

    def sources(self, component: str, serial: int) -> str:
        """Who a release came from, for log lines: peers by bytes, ``import`` or ``local``."""
        rec = self.fetch.received.get(component)
        if rec is not None and rec.serial == serial and rec.by_peer:
            ranked = sorted(rec.by_peer, key=lambda p: -rec.by_peer[p])
            return ",".join(p[:12] for p in ranked)
        origin = self.origin.get(component)
        return origin[1] if origin is not None and origin[0] == serial else "local"

    async def auto_apply(self, component: str, serial: int) -> None:
        """Apply per policy; failures are logged (the Applier already rolled back)."""
        try:
            await self.apply_release(component, serial)
        except RolloutHeldError as exc:  # a halt or the brake came in meanwhile
            log("rollout-wait", component=component, serial=serial, reason=str(exc))
            self.rollout.held_back(component, serial)
        except P2pupdError as exc:
            log(
                "apply-failed",
                level=logging.WARNING,
                component=component,
                serial=serial,
                reason=str(exc),
            )

    async def apply_release(
        self,
        component: str,
        serial: int | None = None,
        *,
        version: str | None = None,
        force: bool = False,
    ) -> ApplyResult:
        """Apply a stored release with the CLI's ``Applier``, in a worker thread.

        Unless ``force``, raises ``RolloutHeldError`` when the site's brake or a
        halt holds the release.
        """
        async with self.mutex:
            await self._not_in_trial(component)
            if version is not None:
                serial = await self.offload(lambda: ops.serial_of(self.node, component, version))
            man = await self.offload(lambda: self._target(component, serial))
            if man is not None:
                if not force:
                    self.rollout.check_manual(man)
                self.rollout.apply_started(component, man.serial)
            started = trio.current_time()
            hooks = self.self_update
            try:
                result = await self.offload(
                    lambda: Applier(self.node, trial=hooks.record if hooks else None).apply(
                        component, serial, force
                    )
                )
            except HandOver as handover:
                assert hooks is not None  # only a trial record makes a HandOver
                return self._hand_over(hooks, handover)
            finally:
                self.rollout.apply_ended(component)
            await self.offload(self.content.refresh)
            await self.offload(heap.trim)  # what building the tree took, back
        self.forget_servable()
        if result.changed:
            log(
                "applied",
                component=component,
                version=result.version,
                serial=result.serial,
                from_=self.sources(component, result.serial),
                seconds=trio.current_time() - started,
            )
        return result

    def _target(self, component: str, serial: int | None) -> Manifest | None:
        """The release ``apply`` would make live (blocking), or None when there is none."""
        if serial is None:
            st = self.node.state.read_state(component)
            serials = [s for s in self.node.releases.serials(component) if s not in st.bad]
            if not serials:
                return None
            serial = serials[-1]
        try:
            return self.node.manifest(component, serial)
        except DaemonError:
            return None

    async def _not_in_trial(self, component: str) -> None:
        """Refuse to change ``component`` while this daemon is its trial run.

        Under the state mutex an open transaction can only be that trial (any
        other is recovered first), and a second one would bury it in the journal.
        """
        pending = await self.offload(lambda: Applier(self.node).pending())
        if component in pending:
            raise ApplyError(
                f"{component}: this daemon is the trial run of serial {pending[component]['to']}; "
                "try again once it has settled"
            )

    def _hand_over(self, hooks: Hooks, handover: HandOver) -> ApplyResult:
        """Restart into a staged self-update for its trial run (selfupdate.py)."""
        tx = handover.tx
        cfg = self.node.config.component(tx.component)
        version = self.node.manifest(tx.component, tx.to).version
        log("self-update-trial", component=tx.component, version=version, serial=tx.to,
            seconds=cfg.health_seconds)  # fmt: skip
        hooks.restart(restart_for(handover, cfg, self.node.root))
        note = (
            f"restarting into it: it goes live once it proves itself healthy within "
            f"{cfg.health_seconds:g} s, else the node stays on this version"
        )
        return ApplyResult(tx.component, tx.to, version, tx.frm, False, message=note)

    async def rollback(self, component: str) -> ApplyResult:
        """Make the previous version live again (an operator act)."""
        async with self.mutex:
            await self._not_in_trial(component)
            try:
                result = await self.offload(lambda: Applier(self.node).rollback(component))
            finally:
                self.rollout.apply_ended(component)
            await self.offload(self.content.refresh)
            await self.offload(heap.trim)  # what building the tree took, back
        self.forget_servable()
        log("rolled-back", component=component, version=result.version, serial=result.serial)
        cfg = self.node.config.component(component)
        if cfg.self_update and self.self_update is not None and result.changed:
            # p2pupd itself went back: run the version now live (no trial: an operator's act).
            why = f"rolled back to {component} {result.version}"
            self.self_update.restart(Restart(launcher(cfg), why, keep_lock=False))
        return result

    async def import_dir(
        self, src: Path, apply_after: bool, allow_other_node: bool = False
    ) -> tuple[ImportReport, list[ApplyResult]]:
        """``p2pupd import`` routed to the daemon: import, then spread (and apply).

        Logs ``imported``, ``import-refused`` (the bundle failed verification)
        or ``import-failed`` once per bundle (metrics count them).
        """
        try:
            async with self.mutex:
                report = await self.offload(
                    lambda: ops.import_releases(self.node, src, allow_other_node=allow_other_node)
                )
                for r in report.releases:
                    self._high[r.component] = max(self._high.get(r.component, 0), r.serial)
        except (VerificationError, RemoteProtocolError) as exc:
            log("import-refused", path=str(src), reason=str(exc))
            raise
        except P2pupdError as exc:
            log("import-failed", path=str(src), reason=str(exc))
            raise
        log(
            "imported",
            path=str(src),
            releases=",".join(f"{r.component}:{r.version}" for r in report.releases) or "-",
            bytes=report.bytes_copied,
        )
        chain = await self.offload(self.node.trust_chain)
        for r in sorted(report.releases, key=lambda r: r.serial):
            if r.new:
                man, env = await self.offload(
                    lambda r=r: self.node.releases.get(chain, r.component, r.serial)  # type: ignore[misc]
                )
                self.origin[r.component] = (r.serial, "import")
                log(
                    "manifest-accepted",
                    component=r.component,
                    version=r.version,
                    serial=r.serial,
                    from_="import",
                )
                await self.news(r.component, r.serial, env.payload_digest())
                self.fetch.start(man, env.payload_digest())
            elif self.fetch.restart(r.component, r.serial):
                # Accepted earlier from a peer and still being fetched: the bundle
                # brought the blobs, so that fetch finds them and completes.
                self.origin[r.component] = (r.serial, "import")
        for c, _version, serial, platform in report.carried:
            await self._carry_imported(c, serial, platform, chain)
        results = []
        if apply_after:
            for comp in ops.imported_components(report):
                results.append(await self.apply_release(comp))
        return report, results

    async def _carry_imported(
        self, component: str, serial: int, platform: str, chain: TrustChain
    ) -> None:
        """A variant a bundle brought for another platform: announce it and serve it
        (its fetch finds the blobs stored, or fetches what the bundle lacked)."""
        try:
            man, env = await self.offload(
                lambda: self.node.carried.get(chain, component, serial, platform)
            )
        except (DaemonError, VerificationError) as exc:
            log("release-unreadable", level=logging.WARNING, component=component, serial=serial,
                platform=platform, reason=str(exc))  # fmt: skip
            return
        key, digest = self.carry_key(man), env.payload_digest()
        self.origin[key] = (serial, "import")
        log("variant-accepted", component=component, version=man.version, serial=serial,
            platform=platform, from_="import")  # fmt: skip
        await self.news(key, serial, digest)
        if not self.fetch.restart(key, serial):
            self.fetch.start(man, digest)

    def component_doc(self, component: str) -> dict[str, Any]:
        """The daemon's additions to one component of ``status --json``."""
        rec = self.fetch.received.get(component)
        held = self.complete.get(component)
        origin = self.origin.get(component)
        return {
            "received": rec.to_doc() if rec is not None else None,
            "fetch": self.fetch.status(component),
            "holding": {"serial": held[0], "digest": held[1].hex()} if held else None,
            "origin": {"serial": origin[0], "from": origin[1]} if origin else None,
            "rollout": self.rollout.component_doc(component),
        }
