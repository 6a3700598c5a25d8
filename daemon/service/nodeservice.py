"""The node service: one node's shared daemon state and the glue between its parts.

Theory of operation
-------------------
``NodeService`` owns the open ``Node`` (the daemon holds its lock), the peer
table and live connections, the gossip and fetch services and the release
``Lifecycle``, and it is the ``transport.Handler`` every connection reports
to. It has no sockets of its own: ``app`` feeds it TCP streams (listener,
dialer) and tests feed it memory streams, so a swarm of nodes runs in one
process under ``MockClock``.

Connections: exactly one per peer node id. When two nodes dial each other at
once, both keep the connection dialled by the smaller node id (``admit``), so
they agree without talking. A banned peer (by node id or advertised endpoint)
is refused after its Hello. Requests are answered from ``Content`` (store and
held files) without blocking: reads are one chunk or one range piece.

Blocking work (store writes, apply, state files) goes through ``offload``:
a trio worker thread in production, or ``inline`` in tests under
``MockClock``, where a thread would let virtual time jump while it runs.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from p2pupd.daemon import ops
from p2pupd.daemon.errors import ConfigError, DaemonError
from p2pupd.daemon.events import LOGGER, log, short
from p2pupd.daemon.net.peers import PeerInfo, PeerTable
from p2pupd.daemon.net.ratelimit import Limits
from p2pupd.daemon.net.transport import ERR_PROTOCOL, ERR_REFUSED, STALE_SECONDS, PeerConnection
from p2pupd.daemon.offload import Offload, in_thread
from p2pupd.daemon.service.fetch import SINGLE_FRAME_BYTES, FetchManager
from p2pupd.daemon.service.gossip import GossipService
from p2pupd.daemon.service.lifecycle import Lifecycle
from p2pupd.daemon.service.serving import Content
from p2pupd.daemon.service.sitecollect import SiteRequests
from p2pupd.daemon.service.sitegate import SiteGate
from p2pupd.daemon.state.node import Node
from p2pupd.protocol import encoding, ids
from p2pupd.protocol.errors import CodecError, RemoteProtocolError, RollbackError, VerificationError
from p2pupd.protocol.gossip import RequestManifest
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.session import Session
from p2pupd.protocol.wire import (
    FEATURE_BATCH,
    FEATURE_HAVE,
    FEATURE_RANGE,
    FEATURE_REQUEST,
    FEATURE_SITE,
    Announce,
    BlobRangeData,
    BlobRangeRequest,
    ChunkData,
    ChunkMissing,
    ChunkRequest,
    Have,
    ManifestData,
    ManifestMissing,
    ManifestRangeData,
    ManifestRangeRequest,
    ManifestRequest,
    NodeRequestQuery,
    Request,
    Response,
    RootData,
    RootMissing,
    RootRequest,
    SiteNews,
)

FEATURES = frozenset({FEATURE_RANGE, FEATURE_HAVE, FEATURE_REQUEST, FEATURE_BATCH, FEATURE_SITE})
MEMBERSHIP_RECHECK_SECONDS = 60.0
MAX_QUEUED_SITE_NEWS = 66  # a whole site chain (64 documents) and a revocation list  # how late an expired credential may still be connected


@dataclass(frozen=True)
class ServiceOptions:
    listen_port: int = 0  # advertised in Hello
    bandwidth_limit: int | None = None  # bytes/s each way, None = unlimited
    gossip_interval: float = 30.0
    manifest_timeout: float = 15.0
    request_timeout: float = 30.0  # planner: reassign a chunk after this
    hard_timeout: float = 120.0  # no answer at all: drop the peer
    ban_seconds: float = 600.0
    max_peers: int = 64
    seed: int | None = None


class NodeService:
    """See the module docstring."""

    def __init__(
        self,
        node: Node,
        options: ServiceOptions | None = None,
        *,
        offload: Offload = in_thread,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        self.options = opts = options or ServiceOptions()
        self.offload = offload
        self._rng = rng or random.Random(opts.seed)
        self.peers = PeerTable()
        self.conns: dict[bytes, PeerConnection] = {}
        self.content = Content(node)
        self.limits = Limits.symmetric(opts.bandwidth_limit)
        self.mutex = trio.Lock()
        # Gossip and fetch report to the lifecycle, which is built after them
        # (it coordinates both): the ``_to_lifecycle_*`` callbacks look it up
        # when they fire.
        self.gossip = GossipService(
            self,
            self._rng,
            announcement=self.announcement,
            high_water=self.high_water,
            on_offer=self._to_lifecycle_offer,
            on_root=self._to_lifecycle_root,
            interval=opts.gossip_interval,
            request_timeout=opts.manifest_timeout,
            ban_seconds=opts.ban_seconds,
        )
        self.fetch = FetchManager(
            self,
            self._rng,
            content=self.content,
            servable=self.servable,
            holding=self._holding,
            on_complete=self._to_lifecycle_complete,
            request_timeout=opts.request_timeout,
            hard_timeout=opts.hard_timeout,
            ban_seconds=opts.ban_seconds,
        )
        self.on_holdings: list[Callable[[], None]] = []
        self.lifecycle = Lifecycle(
            node,
            offload=offload,
            mutex=self.mutex,
            content=self.content,
            fetch=self.fetch,
            gossip=self.gossip,
            spawn=self.spawn,
            forget_servable=self.forget_servable,
            holdings_changed=self._holdings_changed,
        )
        self.site_requests = SiteRequests(self)
        self.gate = SiteGate(node)
        self.on_membership: list[Callable[[], None]] = []  # after a credential or list changed
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
            self.gossip.load(scan.holdings)
            await nursery.start(self.gossip.serve)
            await nursery.start(self.fetch.serve)
            nursery.start_soon(self._recheck_loop)
            for man, digest in scan.resume:
                self.fetch.start(man, digest)
            for component, serial in scan.apply:
                nursery.start_soon(self.lifecycle.auto_apply, component, serial)
            task_status.started()

    async def run_stream(
        self, stream: trio.abc.Stream, *, outbound: bool, address: str, source: str
    ) -> bytes | None:
        """Run one peer connection to its end; never raises for anything the peer did.

        Returns the peer's node id once known (after its Hello), else None. On
        a site member's node the stream is first secured (TLS 1.3, both site
        credentials checked: ``SiteGate``); a peer that fails gets nothing.
        """
        secured = await self.gate.secure(stream, inbound=not outbound, address=address)
        if secured is None:
            return None
        stream, credential = secured
        cfg = self.node.config
        session = Session(cfg.node_id, cfg.cluster, self.options.listen_port, FEATURES)
        conn = PeerConnection(
            stream, session, address=address, outbound=outbound, source=source, limits_=self.limits
        )
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
            self._left(conn, reason)
        return conn.node_id or None

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
        """Accept a peer after its Hello (None) or say why not (banned, duplicate, full)."""
        peer, now = conn.node_id, _now()
        if self.stopping:
            return "shutting down"
        if self.gate.enabled and (conn.credential is None or conn.credential.node_id != peer):
            # The Hello must name the node the TLS credential proved, nothing else.
            self.gate.refuse(conn.address, "Hello names another node than its credential")
            return "node id is not the one its credential names"
        ban = self.peers.banned(now, peer, self._endpoint_of(conn))
        if ban is not None:
            return f"banned: {ban.reason}"
        existing = self.conns.get(peer)
        if existing is not None and (
            existing.closed or now - existing.last_seen > STALE_SECONDS
        ):  # ended but not yet unregistered, or silent: the peer redialled after a
            # restart or a partition, and the old connection is likely half-open.
            self._leave(peer, existing.reason or "replaced a silent connection")
            existing.close("replaced by a new connection")
            existing = None
        if existing is not None:
            # Both sides keep the connection dialled by the smaller node id, so
            # two nodes dialling each other at once agree on which one stays.
            ours = self.node.config.node_id
            if existing.outbound == conn.outbound or min(ours, peer) != (
                ours if conn.outbound else peer
            ):
                return "duplicate connection"
            self._leave(peer, "replaced by a duplicate connection")
            existing.close("duplicate connection")
        if len(self.conns) >= self.options.max_peers:
            return "too many peers"
        self.conns[peer] = conn
        return None

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
        self.gossip.peer_joined(conn.node_id)
        self.fetch.peer_joined(conn)
        if conn.credential is not None and conn.session.supports(FEATURE_SITE):
            for doc in self.gate.news():  # a peer that missed a revocation learns it here
                conn.post(SiteNews(doc))

    def message(self, conn: PeerConnection, msg: Announce | Have | SiteNews) -> None:
        """Route an Announce to gossip (and fetch), a Have to fetch, site news to the gate."""
        if isinstance(msg, SiteNews):
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
            if info is not None:
                info.announced = {e.component: (e.serial, e.manifest_digest) for e in msg.entries}
            self.gossip.on_announce(conn.node_id, msg)
            self.fetch.on_announce(conn, msg)
        else:
            self.fetch.on_have(conn, msg)

    async def answer(self, conn: PeerConnection, req: Request) -> Response:
        """Answer one request of the peer (see ``respond``; a site query reads the state)."""
        if isinstance(req, NodeRequestQuery):
            return await self.site_requests.answer(req)
        return self.respond(req)

    def broke_protocol(self, conn: PeerConnection, exc: RemoteProtocolError) -> None:
        """The peer sent malformed or illegal frames: ban it."""
        self.ban(conn.node_id, f"protocol error: {exc}", code=ERR_PROTOCOL)

    def _left(self, conn: PeerConnection, reason: str) -> None:
        if conn.joined and self.conns.get(conn.node_id) is conn:
            self._leave(conn.node_id, reason)

    def _leave(self, peer: bytes, reason: str) -> None:
        conn = self.conns.pop(peer, None)
        info = self.peers.remove(peer)
        self.gossip.peer_left(peer)
        self.fetch.peer_left(peer)
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
            doc = self.content.manifest_bytes(req.component, req.serial)
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
        """Our Announce (a seam for tests that play a lying node)."""
        return self.gossip.announcement()

    def holdings_digest(self) -> str:
        """A short digest of our holdings, published in the mDNS TXT record."""
        return ids.sha256(encoding.encode(self.gossip.holdings_value())).hex()[:16]

    async def _to_lifecycle_offer(self, data: bytes, action: RequestManifest[bytes]) -> None:
        await self.lifecycle.accept_from_peer(data, action)

    async def _to_lifecycle_root(self, version: int, data: bytes) -> None:
        await self.lifecycle.advance_root(version, data)

    async def _to_lifecycle_complete(self, man: Manifest, digest: bytes) -> None:
        await self.lifecycle.release_complete(man, digest)

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
                log("site-news", peer=short(peer), **{k: v for k, v in doc.items() if k != "changed"})
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
        for cand in self.peers.candidates.values():
            cand.failures = 0
            cand.next_try = -math.inf
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
        self, peer: bytes, reason: str, until: float | None = None, code: int = ERR_REFUSED
    ) -> None:
        """Refuse ``peer`` (node id and endpoint) for a while and disconnect it."""
        now = _now()
        until = until if until is not None else now + self.options.ban_seconds
        conn = self.conns.get(peer)
        endpoint = self._endpoint_of(conn) if conn is not None else None
        self.peers.ban(peer, endpoint, until, reason)
        log(
            "peer-banned",
            level=logging.WARNING,
            peer=short(peer),
            addr=conn.address if conn else None,
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
        doc["site"] = self.gate.doc(now)
        doc["node_id"] = self.node.config.node_id.hex()
        doc["listen"] = self.listen_endpoint
        return doc


def _now() -> float:
    """The daemon clock (``trio.current_time``: monotonic, and mockable in tests)."""
    return trio.current_time()
