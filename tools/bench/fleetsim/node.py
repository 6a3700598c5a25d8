"""A simulated node: the daemon's glue around the protocol objects, on the virtual clock.

``SimNode`` does what daemon/service and daemon/net do with the same objects:
admission before and after the handshake, the partial view deciding which
links to keep, ``Gossip`` for manifests (announced as soon as verified), one
``ReleaseSwarm`` per release, requests and answers through each link's
``Session``. Each policy object's ``next_deadline`` is honoured with a timer,
as the daemon's service loops do.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from p2pupd.protocol.fleet import bitfield
from p2pupd.protocol.fleet.admission import Admission, AdmissionConfig, Admit
from p2pupd.protocol.fleet.swarm import Fetch, Offer, Punish, ReleaseSwarm, Source, SwarmConfig
from p2pupd.protocol.fleet.view import Close, Dial, Kind, PeerView, Send, ViewConfig
from p2pupd.protocol.gossip import Ban, Gossip, RequestManifest, SendAnnounce
from p2pupd.protocol.session import NEED_DATA, Session, Signal, State
from p2pupd.protocol.wire import (
    FEATURE_BATCH,
    FEATURE_HAVE,
    FEATURE_SWARM,
    FEATURE_VIEW,
    Announce,
    Bye,
    ChunkBatchRequest,
    ChunkData,
    ChunkMissing,
    ChunkRequest,
    Error,
    ForwardJoin,
    HaveBits,
    ManifestData,
    ManifestMissing,
    ManifestRequest,
    Message,
    Neighbor,
    PeerAddr,
    Ping,
    Request,
    Response,
    Shuffle,
    ViewFull,
)
from p2pupd.tools.bench.fleetsim.conn import CLOSE_PACKETS, Conn, End
from p2pupd.tools.bench.fleetsim.mdns import Mdns
from p2pupd.tools.bench.fleetsim.net import Loop, Net

FEATURES = frozenset({FEATURE_VIEW, FEATURE_SWARM, FEATURE_BATCH, FEATURE_HAVE})
CLUSTER = "fleet"
COMPONENT = "app"
PORT = 7707
CONNECT_TIMEOUT = 3.0


@dataclass
class Release:
    serial: int
    digest: bytes
    sizes: dict[bytes, int]
    manifest_bytes: int
    payload: dict[int, bytes] = field(default_factory=dict)  # size -> shared bytes

    def data(self, size: int) -> bytes:
        blob = self.payload.get(size)
        if blob is None:
            blob = self.payload[size] = bytes(size)
        return blob


@dataclass
class World:
    """What all nodes share: the clock, the links, mDNS, the address book, settings."""

    loop: Loop
    net: Net
    mdns: Mdns
    view: ViewConfig
    admission: AdmissionConfig
    swarm: SwarmConfig
    gossip_interval: float = 30.0
    verify_seconds: float = 0.005
    tcp_keepidle: float = 120.0
    by_addr: dict[PeerAddr, SimNode] = field(default_factory=dict)
    releases: dict[int, Release] = field(default_factory=dict)
    conns: set[Conn] = field(default_factory=set)

    def keepalive_count(self, node: int, probes: int) -> None:
        self.net.packets(node, probes)


class SimNode:
    """One node; see the module docstring."""

    def __init__(self, world: World, index: int, seed: int) -> None:
        self.world = world
        self.index = world.net.add_node()
        assert self.index == index
        self.rng = random.Random(seed)
        self.node_id = index.to_bytes(16, "big")
        self.host = f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}"
        self.addr = PeerAddr(self.host, PORT)
        self.view: PeerView[bytes] = PeerView(self.addr, self.rng, world.view)
        self.admission = Admission(self.node_id, world.admission)
        self.gossip: Gossip[bytes] = Gossip(
            self.rng, tracked=[COMPONENT], announce_interval=world.gossip_interval
        )
        self.swarms: dict[int, ReleaseSwarm[bytes]] = {}
        self.links: dict[bytes, End] = {}
        self.alive = False
        self.informed_at: dict[int, float] = {}
        self.complete_at: dict[int, float] = {}
        self.joined_at = 0.0
        self.degree_log: list[tuple[float, int]] = []
        self._timers: dict[str, float] = {}
        self._stale: set[str] = {"view", "gossip", "swarm"}
        world.by_addr[self.addr] = self

    # ----- life -----------------------------------------------------------------

    def start(self, known: list[PeerAddr] = ()) -> None:  # type: ignore[assignment]
        self.alive = True
        self.joined_at = self.world.loop.now
        self.view.add_known(known, self.world.loop.now)
        self._bootstrap(first=True)
        self._view_actions(self.view.tick(self.world.loop.now))
        self._schedule()

    def _bootstrap(self, first: bool = False) -> None:
        now = self.world.loop.now
        if not self.view.bootstrap_wanted(now) and not first:
            return
        if getattr(self, "_browsing", False):
            return
        self._browsing = True

        def wanted() -> bool:
            on = self.alive and self.view.bootstrap_wanted(self.world.loop.now)
            if not on:
                self._browsing = False
            return on

        def found(addrs: list[Any]) -> None:
            if self.alive:
                self.view.add_known(addrs, self.world.loop.now)
                self._view_actions(self.view.tick(self.world.loop.now))

        self.world.mdns.browse(self.index, self.addr, wanted, found, first)

    # ----- timers -----------------------------------------------------------------

    def _schedule(self) -> None:
        """Set timers for the objects that were called since the last time.

        (Their deadlines change only when they are called: ``heard``/``sent``
        only push keepalive deadlines later, and an early timer is harmless.)
        """
        stale, self._stale = self._stale, set()
        now = self.world.loop.now
        for name in ("view", "gossip", "swarm"):  # a fixed order: runs repeat exactly
            if name not in stale:
                continue
            if name == "view":
                deadline = self.view.next_deadline()
            elif name == "gossip":
                deadline = self.gossip.next_deadline()
            else:
                deadline = self._swarm_deadline()
            if deadline is None:
                continue
            deadline = max(deadline, now + 1e-4)
            current = self._timers.get(name)
            if current is None or deadline < current - 1e-9:
                self._timers[name] = deadline
                self.world.loop.at(deadline, self._fire, name, deadline)

    def _swarm_deadline(self) -> float | None:
        times = [d for s in self.swarms.values() if (d := s.next_deadline()) is not None]
        return min(times, default=None)

    def _fire(self, name: str, deadline: float) -> None:
        if self._timers.get(name) != deadline or not self.alive:
            return  # superseded by an earlier timer
        del self._timers[name]
        now = self.world.loop.now
        if name == "view":
            self._view_actions(self.view.tick(now))
            self._bootstrap()
        elif name == "gossip":
            self._gossip_actions(self.gossip.tick(now))
        else:
            for serial in list(self.swarms):
                self._swarm_actions(serial, self.swarms[serial].tick(now))
                self._pump(serial)
        self._schedule()

    # ----- connections ---------------------------------------------------------------

    def dial(self, addr: PeerAddr, kind: Kind) -> None:
        world, now = self.world, self.world.loop.now
        target = world.by_addr.get(addr)
        world.net.packets(self.index, 2)  # SYN, ACK
        if target is None or not target.alive:
            world.loop.after(CONNECT_TIMEOUT, self._dial_failed, addr)
            return
        world.net.packets(target.index, 1)  # SYN-ACK
        world.loop.after(world.net.latency * 1.5, target._accept, self, addr, kind)
        del now

    def _dial_failed(self, addr: PeerAddr) -> None:
        if self.alive:
            self._view_actions(self.view.dial_failed(addr, self.world.loop.now))
            self._schedule()

    def _accept(self, dialler: SimNode, addr: PeerAddr, kind: Kind) -> None:
        world = self.world
        if not self.alive or not dialler.alive:
            dialler._dial_failed(addr)
            return
        refusal = self.admission.inbound(dialler.host)
        if refusal is not None:  # closed before the handshake: an RST
            world.net.packets(self.index, 1)
            world.loop.after(world.net.latency, dialler._dial_failed, addr)
            return
        conn = Conn(last=world.loop.now)
        conn.a = End(dialler, dialler._session(self.host), True, conn, kind, addr)
        conn.b = End(self, self._session(dialler.host), False, conn)
        conn.b.handshaking = True
        world.conns.add(conn)
        for end in (conn.a, conn.b):
            end.node._send(end, end.session.hello)
        world.loop.after(world.admission.handshake_timeout, self._handshake_timer, conn.b)

    def _session(self, remote: str) -> Session:
        return Session(
            self.node_id, CLUSTER, PORT, FEATURES, local_host=self.host, remote_host=remote
        )

    def _handshake_timer(self, end: End) -> None:
        if not end.joined and not end.closed:
            self._close(end, "handshake timed out", Error(409, "handshake timed out"))

    # ----- bytes -------------------------------------------------------------------------

    def _send(self, end: End, msg: Message) -> None:
        if end.closed:
            return
        world = self.world
        data = end.session.send(msg)
        other = end.other
        end.conn.touch(world.loop.now, world.tcp_keepidle, world.keepalive_count)
        arrive = world.net.frame(self.index, other.node.index, len(data))
        if isinstance(msg, ChunkData):
            world.net.data_out[self.index] += len(msg.data)
        if end.joined:
            self.view.sent(end.peer_id, world.loop.now)
        end.last_arrival = arrive
        world.loop.at(arrive, other.node._receive, other, data)

    def _receive(self, end: End, data: bytes) -> None:
        if end.closed or not self.alive:
            return
        session = end.session
        session.receive_data(data)
        now = self.world.loop.now
        while not end.closed:
            event = session.next_event()  # the sim's peers never break the protocol
            if isinstance(event, Signal):
                if event is not NEED_DATA:
                    self._ended(end)
                return
            if session.proof_due:
                self._send_raw(end, session.send_proof())
            if not end.joined and session.state is State.OPEN and not self._admit(end):
                return
            if end.joined:
                self.view.heard(end.peer_id, now)
                self._dispatch(end, event)

    def _send_raw(self, end: End, data: bytes) -> None:
        other = end.other
        arrive = self.world.net.frame(self.index, other.node.index, len(data))
        self.world.loop.at(arrive, other.node._receive, other, data)

    def _close(self, end: End, reason: str, final: Message | None = None) -> None:
        """Say ``final`` (Bye/Error), then FIN; both ends learn it when it arrives."""
        if end.closed:
            return
        if final is None:
            final = Bye(reason[:200])
        if end.session.state in (State.CLOSED, State.ERROR):
            final = None
        if final is not None:
            self._send(end, final)
        self.world.net.packets(self.index, CLOSE_PACKETS)
        self.world.net.packets(end.other.node.index, CLOSE_PACKETS)
        # The FIN follows whatever was queued on the connection.
        arrive = max(self.world.loop.now, end.last_arrival) + self.world.net.latency * 2
        self._ended(end)
        self.world.loop.at(arrive, end.other.node._ended, end.other)

    def _ended(self, end: End) -> None:
        if end.closed:
            return
        end.closed = True
        end.conn.open = False
        self.world.conns.discard(end.conn)
        now = self.world.loop.now
        if end.handshaking:
            end.handshaking = False
            self.admission.handshake_ended(end.other.node.host)
        for answer in list(end.waiters.values()):
            answer(None)  # type: ignore[arg-type]
        end.waiters.clear()
        if not self.alive:
            return
        if end.joined:
            if self.links.get(end.peer_id) is end:
                del self.links[end.peer_id]
                self.admission.left(end.peer_id)
                self._gossip_actions(self.gossip.peer_left(end.peer_id, now))
                for serial, swarm in self.swarms.items():
                    swarm.peer_left(end.peer_id)
                    self._pump(serial)
                acts = self.view.disconnected(
                    end.peer_id, now, full=end.full, referrals=end.referrals
                )
                self._view_actions(acts)
                self._log_degree()
        elif end.outbound and end.addr is not None:
            if end.full or end.referrals:
                self._view_actions(self.view.refused(end.addr, now, end.referrals))
            else:
                self._view_actions(self.view.dial_failed(end.addr, now))
        self._bootstrap()
        self._schedule()

    # ----- admission ------------------------------------------------------------------

    def _admit(self, end: End) -> bool:
        world, now = self.world, self.world.loop.now
        hello = end.session.peer_hello
        assert hello is not None
        peer = hello.node_id
        end.peer_id = peer
        if end.addr is None and hello.listen_port:
            end.addr = PeerAddr(end.other.node.host, hello.listen_port)
        if end.handshaking:
            end.handshaking = False
            self.admission.handshake_ended(end.other.node.host)
        verdict = self.admission.admit(
            peer, end.other.node.host, proven=end.session.proven, outbound=end.outbound, now=now
        )
        if not isinstance(verdict, Admit):
            if verdict.full and end.session.supports(FEATURE_VIEW):
                self._send(end, ViewFull(self.view.referrals()))
            self._close(end, verdict.reason, Error(403, verdict.reason))
            return False
        if verdict.replaces:
            old = self.links.pop(peer, None)
            if old is not None:
                old.joined = False
                self._close(old, "replaced by a new connection")
        end.joined = True
        self.links[peer] = end
        capable = end.session.supports(FEATURE_VIEW)
        acts = self.view.connected(
            peer, end.addr, outbound=end.outbound, capable=capable, now=now, kind=end.kind,
            trusted=end.session.proven,
        )  # fmt: skip
        if end.outbound and capable:
            self._send(end, Neighbor(int(end.kind or Kind.LOW)))
        self._view_actions(acts)
        if end.closed:
            return False
        self._gossip_actions(self.gossip.peer_joined(peer, now))
        source = Source.SWARM if end.session.supports(FEATURE_SWARM) else Source.HAVE
        for serial, swarm in self.swarms.items():
            self._swarm_actions(serial, swarm.peer_joined(peer, source, now))
        self._log_degree()
        self._schedule()
        del world
        return True

    def _log_degree(self) -> None:
        self.degree_log.append((self.world.loop.now, self.view.degree))

    # ----- dispatch ---------------------------------------------------------------------

    def _dispatch(self, end: End, msg: Message) -> None:
        now, peer = self.world.loop.now, end.peer_id
        kind = type(msg)
        if kind is ChunkData or kind is ChunkMissing:
            answer = end.waiters.get(msg.request_id)  # type: ignore[union-attr]
            if answer is not None:
                if not end.session.in_flight(msg.request_id):  # type: ignore[union-attr]
                    del end.waiters[msg.request_id]  # type: ignore[union-attr]
                answer(msg)  # type: ignore[arg-type]
            self._drain(end)
        elif kind is ChunkRequest or kind is ChunkBatchRequest:
            self._answer(end, msg)  # type: ignore[arg-type]
        elif kind is HaveBits:
            assert isinstance(msg, HaveBits)
            swarm = self.swarms.get(msg.serial)
            if swarm is None:
                self._gossip_actions(self.gossip.on_hint(peer, msg.component, msg.serial, now))
            else:
                bits = bitfield.from_wire(msg.offset, msg.bits, swarm.index.count)
                self._swarm_actions(msg.serial, swarm.on_offer(peer, bits, now))
                self._pump(msg.serial)
        elif isinstance(msg, Request):
            self._answer(end, msg)
        elif isinstance(msg, Response):
            answer = end.waiters.get(msg.request_id)
            if answer is not None:
                if not end.session.in_flight(msg.request_id):
                    del end.waiters[msg.request_id]
                answer(msg)
            self._drain(end)
        elif isinstance(msg, Announce):
            self._gossip_actions(self.gossip.on_announce(peer, msg.entries, now))
        elif isinstance(msg, Neighbor):
            self._view_actions(self.view.on_neighbor(peer, msg.kind, now))
        elif isinstance(msg, ForwardJoin):
            self._view_actions(self.view.on_forward_join(peer, msg, now))
        elif isinstance(msg, Shuffle):
            self._view_actions(self.view.on_shuffle(peer, msg, now))
        elif isinstance(msg, ViewFull):
            end.full, end.referrals = True, msg.peers
        elif isinstance(msg, Bye | Error):
            self._ended(end)
            return
        elif isinstance(msg, Ping):
            pass
        self._schedule()

    def _answer(self, end: End, req: Request) -> None:
        rid = req.request_id
        if isinstance(req, ManifestRequest):
            rel = self.world.releases.get(req.serial)
            if rel is None or req.serial not in self.informed_at:
                self._send(end, ManifestMissing(rid))
            else:
                self._send(end, ManifestData(rid, bytes(rel.manifest_bytes)))
            return
        digests = req.batch if isinstance(req, ChunkBatchRequest) else (req.digest,)  # type: ignore[union-attr]
        for digest in digests:
            self._serve(end, rid, digest)

    def _serve(self, end: End, rid: int, digest: bytes) -> None:
        for serial, swarm in self.swarms.items():
            blob = swarm.index.position.get(digest)
            if blob is None:
                continue
            if swarm.held >> blob & 1:
                rel = self.world.releases[serial]
                self._send(end, ChunkData(rid, digest, rel.data(rel.sizes[digest])))
                swarm.on_served(end.peer_id, blob, self.world.loop.now)
                return
        self._send(end, ChunkMissing(rid, digest))

    # ----- requests -----------------------------------------------------------------------

    def _request(
        self, end: End, build: Callable[[Session], Request], answer: Callable[[Any], None]
    ) -> None:
        if end.backlog or not end.session.can_request:
            end.backlog.append((build, answer))
            return
        req = build(end.session)
        end.waiters[req.request_id] = answer
        self._send(end, req)

    def _drain(self, end: End) -> None:
        while end.backlog and end.session.can_request and not end.closed:
            build, answer = end.backlog.popleft()
            req = build(end.session)
            end.waiters[req.request_id] = answer
            self._send(end, req)

    # ----- gossip -----------------------------------------------------------------------------

    def _gossip_actions(self, actions: list[Any]) -> None:
        self._stale.add("gossip")
        for action in actions:
            if isinstance(action, SendAnnounce):
                end = self.links.get(action.peer)
                if end is not None:
                    self._send(end, self.gossip.announcement())
            elif isinstance(action, RequestManifest):
                end = self.links.get(action.peer)
                if end is None or action.serial in self.informed_at:
                    continue
                serial, peer = action.serial, action.peer

                def got(resp: Any, serial: int = serial, peer: bytes = peer) -> None:
                    self._manifest_answer(peer, serial, resp)

                build = partial(
                    Session.request_manifest, component=action.component, serial=action.serial
                )
                self._request(end, build, got)
            elif isinstance(action, Ban):
                end = self.links.get(action.peer)
                if end is not None:
                    self._close(end, action.reason, Error(403, action.reason))

    def _manifest_answer(self, peer: bytes, serial: int, resp: Any) -> None:
        now = self.world.loop.now
        if isinstance(resp, ManifestData):
            self.world.loop.after(self.world.verify_seconds, self.learn, serial)
        elif resp is not None:
            self._gossip_actions(self.gossip.on_manifest_unavailable(peer, COMPONENT, serial, now))

    def learn(self, serial: int, first_holder: bool = False) -> None:
        """The manifest of release ``serial`` verified here (or was imported)."""
        if serial in self.informed_at or not self.alive:
            return
        now = self.world.loop.now
        rel = self.world.releases[serial]
        self.informed_at[serial] = now
        held = rel.sizes if first_holder else ()
        swarm: ReleaseSwarm[bytes] = ReleaseSwarm(
            rel.sizes, self.rng, held=held, first_holder=first_holder, config=self.world.swarm
        )
        self.swarms[serial] = swarm
        if swarm.done:
            self.complete_at[serial] = now
        self._gossip_actions(self.gossip.on_manifest_verified(COMPONENT, serial, rel.digest, now))
        for peer, end in self.links.items():
            source = Source.SWARM if end.session.supports(FEATURE_SWARM) else Source.HAVE
            self._swarm_actions(serial, swarm.peer_joined(peer, source, now))
        self._pump(serial)
        self._schedule()

    # ----- swarm -------------------------------------------------------------------------

    def _pump(self, serial: int) -> None:
        swarm = self.swarms[serial]
        self._stale.add("swarm")
        if not swarm.done:
            self._swarm_actions(serial, swarm.next_requests(self.world.loop.now))

    def _swarm_actions(self, serial: int, actions: list[Any]) -> None:
        self._stale.add("swarm")
        swarm = self.swarms[serial]
        for action in actions:
            end = self.links.get(action.peer)
            if end is None:
                continue
            if isinstance(action, Offer):
                for offset, bits in bitfield.to_wire(action.bits, swarm.index.count):
                    self._send(end, HaveBits(COMPONENT, serial, offset, bits))
            elif isinstance(action, Fetch):
                digests = tuple(swarm.index.digests[b] for b in action.blobs)
                for i in range(0, len(digests), 16):
                    part = digests[i : i + 16]
                    answers = list(part)

                    def got(resp: Any, end: End = end, answers: list[bytes] = answers) -> None:
                        self._blob_answer(serial, end, answers, resp)

                    if len(part) == 1:
                        self._request(end, partial(Session.request_chunk, digest=part[0]), got)
                    else:
                        self._request(end, partial(Session.request_chunk_batch, digests=part), got)
            elif isinstance(action, Punish):
                self._close(end, action.reason, Error(403, action.reason))

    def _blob_answer(self, serial: int, end: End, due: list[bytes], resp: Any) -> None:
        swarm, now = self.swarms[serial], self.world.loop.now
        if resp is None:
            return  # the connection ended: peer_left re-plans
        digest = due.pop(0)
        blob = swarm.index.position[digest]
        if isinstance(resp, ChunkData):
            swarm.on_blob(end.peer_id, blob, True, now)
            if swarm.done and serial not in self.complete_at:
                self.complete_at[serial] = now
        else:
            swarm.on_missing(end.peer_id, blob, now)
        self._pump(serial)
        self._schedule()

    # ----- view -------------------------------------------------------------------------

    def _view_actions(self, actions: list[Any]) -> None:
        self._stale.add("view")
        for action in actions:
            if isinstance(action, Dial):
                self.dial(action.addr, action.kind)
            elif isinstance(action, Send):
                end = self.links.get(action.peer)
                if end is not None:
                    self._send(end, action.msg)
            elif isinstance(action, Close):
                end = self.links.get(action.peer)
                if end is not None:
                    if action.referrals:
                        self._send(end, ViewFull(action.referrals))
                    self._close(end, action.reason)
