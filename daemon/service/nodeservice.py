"""The node service: one node's shared daemon state and the glue between its parts.

Theory of operation
-------------------
``NodeService`` owns the open ``Node`` (the daemon holds its lock), the peer
table and live connections, the gossip and fetch services and the release
``Lifecycle``, and it is the ``transport.Handler`` every connection reports
to. It has no sockets of its own: ``app`` feeds it TCP streams (listener,
dialer) and tests feed it memory streams, so a swarm of nodes runs in one
process under ``MockClock``.

Connections: ``Admission`` (protocol/fleet/admission.py) lets them in --
per-address caps and a bounded number of handshakes before a byte is read
(``inbound``), then after the Hello and the node-id proof: bans keyed to a
proven id or else the address, one connection per id, slots kept for
outbound and static peers. ``Overlay`` (the partial view) then decides
which links to keep; ``Offers``/``FetchManager`` swarm releases over them
and ``GossipService`` spreads manifests. Requests are answered from
``Content`` (store, landed blobs and held files) without blocking: reads
are one chunk or one range piece.

Blocking work (store writes, apply, state files) goes through ``offload``:
a trio worker thread in production, or ``inline`` in tests under
``MockClock``, where a thread would let virtual time jump while it runs.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from p2pupd.daemon import ops
from p2pupd.daemon.bundles.siterequest import node_identity
from p2pupd.daemon.config import DEFAULT_PEER_TIMEOUT
from p2pupd.daemon.errors import ConfigError, DaemonError
from p2pupd.daemon.events import LOGGER, log, short
from p2pupd.daemon.net.peers import PeerInfo, PeerTable
from p2pupd.daemon.net.ratelimit import Limits
from p2pupd.daemon.net.transport import ERR_PROTOCOL, ERR_REFUSED, STALE_SECONDS, PeerConnection
from p2pupd.daemon.offload import Offload, in_thread
from p2pupd.daemon.service.fetch import SINGLE_FRAME_BYTES, FetchManager
from p2pupd.daemon.service.gossip import GossipService
from p2pupd.daemon.service.lifecycle import Lifecycle
from p2pupd.daemon.service.links import Spelling
from p2pupd.daemon.service.offers import Offers
from p2pupd.daemon.service.overlay import Overlay
from p2pupd.daemon.service.rollout.gossip import ReportGossip
from p2pupd.daemon.service.rollout.service import RolloutOptions, RolloutService
from p2pupd.daemon.service.selfupdate import running_version
from p2pupd.daemon.service.serving import Content
from p2pupd.daemon.service.sitecollect import SiteRequests
from p2pupd.daemon.service.sitegate import SiteGate
from p2pupd.daemon.state.carried import rules_of
from p2pupd.daemon.state.node import Node
from p2pupd.protocol.errors import CodecError, RemoteProtocolError, RollbackError, VerificationError
from p2pupd.protocol.fleet.admission import Admission, AdmissionConfig, Admit
from p2pupd.protocol.fleet.identity import CHALLENGE_BYTES, NodeKey
from p2pupd.protocol.fleet.swarm import SwarmConfig
from p2pupd.protocol.fleet.view import Kind, ViewConfig
from p2pupd.protocol.gossip import RequestManifest
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.session import Session
from p2pupd.protocol.wire import (
    FEATURE_BATCH,
    FEATURE_HAVE,
    FEATURE_PROOF,
    FEATURE_RANGE,
    FEATURE_REPORT,
    FEATURE_REQUEST,
    FEATURE_SITE,
    FEATURE_SWARM,
    FEATURE_VARIANTS,
    FEATURE_VIEW,
    Announce,
    BlobRangeData,
    BlobRangeRequest,
    ChunkData,
    ChunkMissing,
    ChunkRequest,
    Have,
    HaveBits,
    ManifestData,
    ManifestMissing,
    ManifestRangeData,
    ManifestRangeRequest,
    ManifestRequest,
    Message,
    NodeRequestQuery,
    PeerAddr,
    ReportDigest,
    ReportNews,
    Request,
    Response,
    RootData,
    RootMissing,
    RootRequest,
    SiteNews,
    ViewFull,
)

FEATURES = frozenset(
    {
        FEATURE_RANGE, FEATURE_HAVE, FEATURE_REQUEST, FEATURE_BATCH, FEATURE_PROOF,
        FEATURE_VIEW, FEATURE_SWARM, FEATURE_SITE, FEATURE_REPORT, FEATURE_VARIANTS,
    }
)  # fmt: skip
MEMBERSHIP_RECHECK_SECONDS = 60.0  # how late an expired credential may still be connected
MAX_QUEUED_SITE_NEWS = 66  # a whole site chain (64 documents) and a revocation list


@dataclass(frozen=True)
class ServiceOptions:
    listen_port: int = 0  # advertised in Hello
    bandwidth_limit: int | None = None  # bytes/s each way, None = unlimited
    gossip_interval: float = 30.0
    manifest_timeout: float = 15.0
    request_timeout: float = 30.0  # swarm: re-plan a blob not answered after this
    hard_timeout: float = (
        DEFAULT_PEER_TIMEOUT  # no answer at all: drop the peer ([network] peer_timeout)
    )
    ban_seconds: float = 600.0
    max_peers: int = 24  # admitted links, whatever the site's size (sockets bounded)
    per_host: int = 8  # inbound connections from one IP address
    view: ViewConfig = field(default_factory=ViewConfig)
    features: frozenset[str] | None = None  # None: all of this version's (tests play older)
    seed: int | None = None
    rollout: RolloutOptions = field(default_factory=RolloutOptions)


class NodeService:
    """See the module docstring."""

    def __init__(
        self,
        node: Node,
        options: ServiceOptions | None = None,
        *,
        offload: Offload = in_thread,
        rng: random.Random | None = None,
        identity: NodeKey | None = None,
    ) -> None:
        """``identity``: the node key (made, and the node id migrated to it, if None)."""
        self.node = node
        self.options = opts = options or ServiceOptions()
        self.offload = offload
        self._rng = rng or random.Random(opts.seed)
        self.identity = identity or node_identity(node)
        self.peers = PeerTable()
        self.conns: dict[bytes, PeerConnection] = {}
        # How releases are named to each peer: ours, and variants carried for others.
        self.spelling = Spelling(rules_of(node), node.manifest)
        self.content = Content(node, self.spelling)
        self.limits = Limits.symmetric(opts.bandwidth_limit)
        self.mutex = trio.Lock()
        self.admission = Admission(
            node.config.node_id,
            AdmissionConfig(
                max_peers=opts.max_peers,
                outbound_reserve=min(4, opts.max_peers // 4),
                per_host=opts.per_host,
            ),
        )
        self.overlay = Overlay(self, self._rng, opts.view)
        self.overlay.listen_port = opts.listen_port
        # Gossip and fetch report to the lifecycle, which is built after them
        # (it coordinates both): the ``_to_lifecycle_*`` callbacks look it up
        # when they fire.
        self.gossip = GossipService(
            self,
            self._rng,
            announcement=self.announcement_for,
            high_water=self.high_water,
            on_offer=self._to_lifecycle_offer,
            on_root=self._to_lifecycle_root,
            interval=opts.gossip_interval,
            request_timeout=opts.manifest_timeout,
            ban_seconds=opts.ban_seconds,
        )
        self.offers = Offers(
            self,
            self._rng,
            config=SwarmConfig(request_timeout=opts.request_timeout).for_rate(opts.bandwidth_limit),
            servable=lambda man: self.content.servable(man)[1],
            on_change=self._wake_fetch,
            manifest=self.content.release_manifest,
        )
        self.fetch = FetchManager(
            self,
            self.offers,
            content=self.content,
            on_complete=self._to_lifecycle_complete,
            hard_timeout=opts.hard_timeout,
        )
        self.on_holdings: list[Callable[[], None]] = []
        self.gate = SiteGate(node)
        self.rollout = RolloutService(
            node,
            offload=offload,
            options=opts.rollout,
            auto_apply=self._rollout_go,
            spread=self._rollout_spread,
            gate=self.gate,
        )
        self.report_gossip = ReportGossip(self, self.rollout, self._rng)
        self.lifecycle = Lifecycle(
            node,
            offload=offload,
            mutex=self.mutex,
            content=self.content,
            fetch=self.fetch,
            gossip=self.gossip,
            rollout=self.rollout,
            spawn=self.spawn,
            forget_servable=self.forget_servable,
            holdings_changed=self._holdings_changed,
        )
        self.site_requests = SiteRequests(self)
        # after a credential or list changed
        self.on_membership: list[Callable[[], None]] = [self.rollout.membership_changed]
        self._news: dict[bytes, list[bytes]] = {}  # SiteNews waiting per peer
        self.listen_endpoint: str | None = None
        self.stopping = False  # set by close_all: refuse new connections
        self.started_at = 0.0
        self._servable: dict[tuple[str, int], tuple[bool, list[bytes]] | None] = {}
        self._nursery: trio.Nursery | None = None

    # ----- running -------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Recover, resume, and run gossip and fetch until cancelled."""
        self.started_at = trio.current_time()
        scan = await self.offload(self.lifecycle.scan)
        for line in scan.recovered:
            log("recovered", detail=line)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            known = dict(scan.holdings)  # announce what we fetch as well as what we hold
            for man in (*scan.held, *(m for m, _ in scan.resume)):
                self.spelling.note(man)  # read already: no disk read on the loop later
            for man, digest in scan.resume:  # ours first, then the variants carried
                key = self.spelling.rules.key_of(man)
                if key != man.component and known.get(man.component, (0, b""))[0] != man.serial:
                    continue  # a variant of a release we do not announce (yet)
                if man.serial > known.get(key, (0, b""))[0]:
                    known[key] = (man.serial, digest)
            self.gossip.load(known)
            for key, (serial, digest) in scan.holdings.items():
                self.offers.holding(key, serial, digest, scan.read.get(key))
            await nursery.start(self.rollout.serve)
            await nursery.start(self.report_gossip.serve)
            await nursery.start(self.gossip.serve)
            await nursery.start(self.offers.serve)
            await nursery.start(self.overlay.serve)
            await nursery.start(self.fetch.serve)
            nursery.start_soon(self._recheck_loop)
            for man, digest in scan.resume:
                self.fetch.start(man, digest)
            for man in scan.held:
                self.rollout.know(man)
            for man in scan.apply:
                self.rollout.offer(man)
            task_status.started()

    def inbound(self, host: str) -> str | None:
        """A TCP connection from ``host`` arrived: None to run it, else why it is dropped
        before a byte is read (``Admission.inbound``)."""
        if self.stopping:
            return "shutting down"
        return self.admission.inbound(host)

    async def run_stream(
        self,
        stream: trio.abc.Stream,
        *,
        outbound: bool,
        address: str,
        source: str,
        kind: Kind | None = None,
        dialled: PeerAddr | None = None,
    ) -> bytes | None:
        """Run one peer connection to its end; never raises for anything the peer did.

        An inbound one must have passed ``inbound`` (its handshake slot is
        given back here). Returns the peer's node id once known (after its
        Hello), else None. On a site member's node the stream is first
        secured (TLS 1.3, both site credentials checked: ``SiteGate``); a
        peer that fails gets nothing.
        """
        secured = await self.gate.secure(stream, inbound=not outbound, address=address)
        if secured is None:  # refused at the TLS handshake: give back what it held
            if not outbound:
                self.admission.handshake_ended(_hosts(stream)[1] or address.rsplit(":", 1)[0])
            elif dialled is not None:
                self.overlay.dial_ended(dialled, None)
            return None
        stream, credential = secured
        cfg = self.node.config
        local, remote = _hosts(stream)
        features = FEATURES if self.options.features is None else self.options.features
        if credential is not None or self.identity.node_id != cfg.node_id:
            # TLS with site credentials already proved the node key and bound it
            # to the id (and an enrolled node keeps an id its credential names).
            features = features - {FEATURE_PROOF}
        session = Session(
            cfg.node_id, cfg.cluster, self.options.listen_port, features,
            key=self.identity, challenge=os.urandom(CHALLENGE_BYTES),
            local_host=local, remote_host=remote,
        )  # fmt: skip
        conn = PeerConnection(
            stream, session, address=address, outbound=outbound, source=source,
            limits_=self.limits, kind=kind, dialled=dialled, local_host=local, remote_host=remote,
        )  # fmt: skip
        conn.handshake_host = None if outbound else _host_of(conn)
        conn.credential = credential
        reason = "cancelled"
        try:
            reason = await conn.run(self)
        except Exception as exc:  # a bug this peer triggered must not take the node down
            reason = f"internal error: {exc!r}"
            log(
                "peer-crash",
                level=logging.ERROR,
                peer=short(conn.node_id),
                addr=address,
                error=repr(exc),
            )
            LOGGER.debug("peer task crashed", exc_info=True)
        finally:
            self._handshake_over(conn)
            self._left(conn, reason)
            if outbound and dialled is not None and not conn.joined:
                self.overlay.dial_ended(dialled, conn)
        return conn.node_id or None

    def _handshake_over(self, conn: PeerConnection) -> None:
        host, conn.handshake_host = conn.handshake_host, None
        if host is not None:
            self.admission.handshake_ended(host)

    async def close_all(self, reason: str, timeout: float = 2.0) -> None:
        """Say Bye to every peer and wait (bounded) for the connections to end."""
        self.stopping = True
        for conn in list(self.conns.values()):
            conn.close(reason)
        with trio.move_on_after(timeout):
            while self.conns:
                await trio.sleep(0.05)

    # ----- transport.Handler ---------------------------------------------------

    def admit(self, conn: PeerConnection) -> str | None:
        """Accept a peer after its Hello and proof (None) or say why not.

        ``Admission.admit`` decides (bans, one connection per id, slots); a
        refusal for lack of room tells a peer that speaks "view" where else
        to go (``ViewFull``).
        """
        self._handshake_over(conn)
        peer, now = conn.node_id, _now()
        if self.stopping:
            return "shutting down"
        if self.gate.enabled and (conn.credential is None or conn.credential.node_id != peer):
            # The Hello must name the node the TLS credential proved, nothing else.
            self.gate.refuse(conn.address, "Hello names another node than its credential")
            return "node id is not the one its credential names"
        existing = self.conns.get(peer)
        # Ended but not yet unregistered, or silent: the peer redialled after a
        # restart or a partition, and the old connection is likely half-open.
        stale = existing is not None and (
            existing.closed or now - existing.last_seen > STALE_SECONDS
        )
        verdict = self.admission.admit(
            peer, _host_of(conn), proven=conn.proven,
            outbound=conn.outbound, now=now, static=self._is_static(conn), existing_stale=stale,
        )  # fmt: skip
        if not isinstance(verdict, Admit):
            if verdict.full and conn.session.supports(FEATURE_VIEW):
                conn.post(ViewFull(self.overlay.referrals()))
            return verdict.reason
        if existing is not None:  # the newer connection won (Admission's rules)
            self._leave(peer, existing.reason or "replaced by a newer connection", admitted=False)
            existing.close("replaced by a newer connection")
        self.conns[peer] = conn
        return None

    def _is_static(self, conn: PeerConnection) -> bool:
        addr = conn.dialled if conn.outbound else None
        return addr is not None and self.overlay.is_static(addr)

    def joined(self, conn: PeerConnection) -> None:
        """Register an admitted peer and let gossip and fetch greet it."""
        now = _now()
        self.peers.add(
            PeerInfo(
                conn.node_id,
                conn.address,
                self._endpoint_of(conn),
                "out" if conn.outbound else "in",
                conn.source,
                now,
                now,
                conn.session.peer_features,
            )
        )
        log(
            "peer-connected",
            peer=short(conn.node_id),
            addr=conn.address,
            direction="out" if conn.outbound else "in",
        )
        self.overlay.joined(conn)
        if conn.closed:
            return  # the view refused it ("full", with referrals)
        self.gossip.peer_joined(conn.node_id)
        self.offers.peer_joined(conn)
        self.report_gossip.peer_joined(conn)
        if conn.credential is not None and conn.session.supports(FEATURE_SITE):
            for doc in self.gate.news():  # a peer that missed a revocation learns it here
                conn.post(SiteNews(doc))

    def message(self, conn: PeerConnection, msg: Message) -> None:
        """Route an Announce to gossip (and offers), Have(Bits) to offers, site news to
        the gate, view messages to the overlay, reports and rollout actions to the
        report gossip."""
        if isinstance(msg, ReportNews | ReportDigest):
            self.report_gossip.message(conn, msg)
        elif isinstance(msg, SiteNews):
            # One worker per peer, a bounded queue: a member pushing a stream of
            # documents costs one verification at a time, never a task per frame.
            if not self.gate.enabled:
                return
            queue = self._news.get(conn.node_id)
            if queue is None:
                self._news[conn.node_id] = [msg.data]
                self.spawn(self._site_news, conn.node_id)
            elif len(queue) < MAX_QUEUED_SITE_NEWS:
                queue.append(msg.data)
        elif isinstance(msg, Announce):
            info = self.peers.get(conn.node_id)
            if info is not None:  # as the peer named them (``peers`` shows it)
                info.announced = {e.component: (e.serial, e.manifest_digest) for e in msg.entries}
            entries = self.spelling.read_announce(conn, msg.entries)
            self.gossip.on_announce(conn.node_id, entries)
            self.offers.on_announce(conn, entries)
        elif isinstance(msg, HaveBits | Have):
            key = self.spelling.read(conn, msg.component)
            if key is None:
                return  # a variant of a component this node does not run
            known = (
                self.offers.on_have_bits(conn, msg, key)
                if isinstance(msg, HaveBits)
                else self.offers.on_have(conn, msg, key)
            )
            if not known:
                self.gossip.on_hint(conn.node_id, key, msg.serial)
        else:
            self.overlay.message(conn, msg)

    async def answer(self, conn: PeerConnection, req: Request) -> Response:
        """Answer one request of the peer (see ``respond``; a site query reads the state)."""
        if isinstance(req, NodeRequestQuery):
            return await self.site_requests.answer(req)
        resp = self.respond(req)
        if isinstance(resp, ChunkData):
            self.offers.served(conn.node_id, resp.digest)
        return resp

    def broke_protocol(self, conn: PeerConnection, exc: RemoteProtocolError) -> None:
        """The peer sent malformed or illegal frames: ban it."""
        self.ban(conn.node_id, f"protocol error: {exc}", code=ERR_PROTOCOL, conn=conn)

    def _left(self, conn: PeerConnection, reason: str) -> None:
        if conn.joined and self.conns.get(conn.node_id) is conn:
            self._leave(conn.node_id, reason)

    def _leave(self, peer: bytes, reason: str, admitted: bool = True) -> None:
        """Forget a joined link; ``admitted`` False: Admission already let a newer one
        of the same id replace it."""
        conn = self.conns.pop(peer, None)
        info = self.peers.remove(peer)
        if admitted:
            self.admission.left(peer)
        if conn is not None:
            self.overlay.left(conn)
        self.gossip.peer_left(peer)
        self.offers.peer_left(peer)
        self.report_gossip.peer_left(peer)
        log(
            "peer-closed",
            peer=short(peer),
            addr=info.address if info else None,
            reason=reason,
            bytes_in=conn.bytes_in if conn else None,
            bytes_out=conn.bytes_out if conn else None,
        )

    def _endpoint_of(self, conn: PeerConnection) -> str | None:
        hello = conn.peer_hello
        if hello is None or not hello.listen_port:
            return None
        host = conn.address.rsplit(":", 1)[0]
        return f"{host}:{hello.listen_port}"

    # ----- serving -------------------------------------------------------------

    def respond(self, req: Request) -> Response:
        """Answer one peer request from what this node holds (never raises for it)."""
        rid = req.request_id
        if isinstance(req, ChunkRequest):
            data = self.content.read_blob(req.digest, SINGLE_FRAME_BYTES)
            if data is None:
                return ChunkMissing(rid, req.digest)
            return ChunkData(rid, req.digest, data)
        if isinstance(req, BlobRangeRequest):
            piece = self.content.read_range(req.digest, req.offset, req.length)
            if piece is None:
                return ChunkMissing(rid, req.digest)
            return BlobRangeData(rid, req.digest, req.offset, piece)
        if isinstance(req, ManifestRequest | ManifestRangeRequest):
            doc = self.content.manifest_for(req.component, req.serial)
            if isinstance(req, ManifestRequest):
                if doc is None or len(doc) > ManifestData.DATA_LIMIT:
                    return ManifestMissing(rid)  # too big for one frame: ask for ranges
                return ManifestData(rid, doc)
            if doc is None or req.offset > len(doc):
                return ManifestMissing(rid)
            piece = doc[req.offset : req.offset + req.length]
            return ManifestRangeData(rid, req.offset, len(doc), piece)
        assert isinstance(req, RootRequest)
        root = self.content.root_bytes(req.version)
        return RootMissing(rid) if root is None else RootData(rid, req.version, root)

    def announcement(self) -> Announce:
        """Our Announce of our own releases (a seam for tests that play a lying node)."""
        return self.gossip.announcement()

    def announcement_for(self, conn: PeerConnection) -> Announce:
        """What ``conn``'s peer hears: ``announcement``, and to a peer that speaks
        "variants" our variants named with their platform and the ones we carry."""
        return self.spelling.announce(conn, self.announcement(), self.gossip.carrying)

    async def _to_lifecycle_offer(self, data: bytes, action: RequestManifest[bytes]) -> None:
        await self.lifecycle.accept_from_peer(data, action)

    async def _to_lifecycle_root(self, version: int, data: bytes) -> None:
        await self.lifecycle.advance_root(version, data)

    async def _to_lifecycle_complete(self, man: Manifest, digest: bytes, first: bool) -> None:
        # Not offered to peers when it is p2pupd's own, not yet proven here
        # (lifecycle.py): offers carry news of a release as announces do.
        if await self.lifecycle.announceable(man.component, man.serial):
            self.offers.complete(man, digest, first_holder=first)
        await self.lifecycle.release_complete(man, digest)

    def _rollout_go(self, component: str, serial: int) -> None:
        self.spawn(self.lifecycle.auto_apply, component, serial)

    def _rollout_spread(self, reports: list[bytes], actions: list[bytes]) -> None:
        self.report_gossip.send_own(reports, actions)

    def _wake_fetch(self, component: str) -> None:
        self.fetch.wake(component)

    # ----- for the dialer and discovery ---------------------------------------------

    def dial_failed(self, addr: PeerAddr) -> None:
        """A dial never connected."""
        self.overlay.dial_ended(addr, None)

    def bootstrap_wanted(self) -> bool:
        return self.overlay.bootstrap_wanted()

    def bootstrap_changed(self) -> trio.Event:
        event = self.overlay.changed
        if event.is_set():
            event = self.overlay.changed = trio.Event()
        return event

    def add_known(self, addrs: list[PeerAddr]) -> None:
        self.overlay.add_known(addrs)

    def _holding(self, component: str) -> int:
        return self.gossip.holdings.get(component, (0, b""))[0]

    @property
    def node_id(self) -> bytes:
        return self.node.config.node_id

    @property
    def cluster(self) -> str:
        return self.node.config.cluster

    def _holdings_changed(self) -> None:
        for callback in self.on_holdings:
            callback()

    def forget_servable(self) -> None:
        """Drop cached servable sets (after an apply, rollback or completed fetch)."""
        self._servable.clear()

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run ``fn(*args)`` as a background task of the service."""
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    def high_water(self, component: str) -> int:
        """The component's rollback high-water mark (cached; gossip asks often)."""
        return self.lifecycle.high_water(component)

    def servable(self, component: str, serial: int) -> tuple[bool, list[bytes]] | None:
        """(all blobs, which blobs) of a stored release this node can serve; cached."""
        key = (component, serial)
        if key not in self._servable:
            try:
                man = self.node.manifest(component, serial)
            except DaemonError:
                self._servable[key] = None
            else:
                self._servable[key] = self.content.servable(man)
        return self._servable[key]

    # ----- the release lifecycle -------------------------------------------------

    # ----- reporting -------------------------------------------------------------

    def recheck_members(self) -> int:
        """Cut off every connected peer whose credential no longer admits it (revoked,
        expired, or this node's own membership lapsed); returns how many."""
        cut = 0
        for conn in list(self.conns.values()):
            why = self.gate.still_valid(conn.credential)
            if why is not None:
                self.gate.refuse(conn.address, f"membership ended: {why}")
                conn.close(f"membership: {why}", ERR_REFUSED)
                cut += 1
        return cut

    async def _site_news(self, peer: bytes) -> None:
        """Take the revocation lists or site documents a peer pushed, if news; pass them on.

        Verified like ``site update`` (protocol/site/membership.py, rule 9):
        an older or the same list moves nothing -- peers that have not heard
        of the newest list yet keep offering theirs -- and is dropped quietly.
        News is forwarded to every other member once, when it first arrives,
        so a revocation floods the connected site within a few hops.
        """
        try:
            while queue := self._news.get(peer):
                data = queue.pop(0)
                async with self.mutex:
                    try:
                        doc = await self.offload(partial(ops.site_update, self.node, data))
                    except RollbackError:
                        continue  # not newer than what we hold
                    except (VerificationError, CodecError, ConfigError) as exc:
                        log("site-news-refused", level=logging.WARNING, peer=short(peer),
                            reason=str(exc))  # fmt: skip
                        continue
                    if not doc.get("changed"):
                        continue
                    await self.offload(self.gate.reload)
                log(
                    "site-news",
                    peer=short(peer),
                    **{k: v for k, v in doc.items() if k != "changed"},
                )
                self.membership_changed()
                self.spread_site_news(data, exclude=peer)
        finally:
            self._news.pop(peer, None)

    def spread_site_news(self, data: bytes, exclude: bytes | None = None) -> None:
        """Push a site document this node just accepted to every other member connected."""
        for other, conn in list(self.conns.items()):
            if (
                other != exclude
                and conn.credential is not None
                and conn.session.supports(FEATURE_SITE)
            ):
                conn.post(SiteNews(data))

    def membership_changed(self) -> None:
        """A credential, site key or revocation list changed: cut off who it ends, and
        dial everyone again at once (a rejoined node should not wait out old backoffs)."""
        self.recheck_members()
        self.overlay.retry_all()
        for callback in self.on_membership:
            callback()

    async def _recheck_loop(self) -> None:
        """Expiry has no event: look at every credential once a ``MEMBERSHIP_RECHECK`` interval."""
        while True:
            await trio.sleep(MEMBERSHIP_RECHECK_SECONDS)
            if self.gate.enabled:
                await self.offload(self.gate.reload)
                self.recheck_members()

    def ban(
        self,
        peer: bytes,
        reason: str,
        until: float | None = None,
        code: int = ERR_REFUSED,
        conn: PeerConnection | None = None,
    ) -> None:
        """Refuse ``peer`` for a while and disconnect it (``conn``: the offending
        connection, if not the one registered for ``peer``)."""
        now = _now()
        until = until if until is not None else now + self.options.ban_seconds
        conn = conn or self.conns.get(peer)
        proven = conn is not None and conn.proven
        host = _host_of(conn) if conn is not None else None
        # A proven peer by its id; anyone else by its address, never by the id
        # it claims (it may be an honest node's).
        who = self.admission.ban(peer, host, proven, until, reason)
        log(
            "peer-banned",
            level=logging.WARNING,
            peer=short(peer),
            addr=conn.address if conn else None,
            key=who,
            seconds=round(until - now),
            reason=reason,
        )
        if conn is not None:
            conn.close(f"banned: {reason}", code)

    def daemon_doc(self) -> dict[str, Any]:
        """The ``daemon`` part of ``status --json``."""
        return {
            "running": True,
            "pid": os.getpid(),
            "version": running_version(),
            "listen": self.listen_endpoint,
            "peers": len(self.conns),
            "uptime_seconds": round(_now() - self.started_at, 1),
        }

    def peers_doc(self) -> dict[str, Any]:
        """The ``p2pupd peers --json`` document, with live byte counters."""
        now = _now()
        for peer, conn in self.conns.items():
            info = self.peers.get(peer)
            if info is not None:
                info.bytes_in, info.bytes_out, info.last_seen = (
                    conn.bytes_in,
                    conn.bytes_out,
                    conn.last_seen,
                )
        doc = self.peers.snapshot(now)
        doc["banned"] = self.admission.bans(now)
        doc["view"] = self.overlay.snapshot()
        doc["site"] = self.gate.doc(now)
        doc["node_id"] = self.node.config.node_id.hex()
        doc["listen"] = self.listen_endpoint
        return doc


def _host_of(conn: PeerConnection) -> str:
    """The peer's IP, or for a stream without one (tests) its address without the port."""
    return conn.remote_host or conn.address.rsplit(":", 1)[0]


def _hosts(stream: trio.abc.Stream) -> tuple[str, str]:
    """(our IP, the peer's IP) of a TCP stream; empty for anything else (memory streams)."""
    if not isinstance(stream, trio.SocketStream):
        return "", ""
    try:
        return str(stream.socket.getsockname()[0]), str(stream.socket.getpeername()[0])
    except OSError:
        return "", ""


def _now() -> float:
    """The daemon clock (``trio.current_time``: monotonic, and mockable in tests)."""
    return trio.current_time()
