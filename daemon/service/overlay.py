"""The overlay: which peers a node keeps links to, driving the partial view (``protocol.fleet.view``).

Theory of operation
-------------------
The pure ``PeerView`` decides; this service carries its actions out and
feeds it what happens:

* ``Dial(addr, kind)``: hands the address to the dialer (``dial``, set by
  the app), which opens TCP and runs the connection; after the handshake
  ``NodeService`` calls ``joined`` and we send ``Neighbor(kind)`` if the
  peer speaks "view". A dial that never reached a handshake is reported
  with ``dial_ended``: refused with "full" (``ViewFull`` and a 403) goes to
  ``PeerView.refused`` -- referrals kept, the address not redialled before
  its backoff -- anything else to ``dial_failed``.
* ``Send(peer, msg)``: posts ``msg`` on that link (``ForwardJoin``,
  ``Shuffle``, ``Ping``).
* ``Close(peer, reason, referrals)``: ``ViewFull(referrals)`` first, then Bye.

Addresses come from static peers (``add_static``), mDNS (``add_known``)
and from peers (shuffles, referrals, join walks). Discovery asks
``bootstrap_wanted`` and waits on ``changed`` to start and stop browsing:
mDNS only while the view is low and has nobody left to dial.

The link identity is the peer's node id (one link per id, ``admission``);
its address is where it listens: the connection's remote IP and the Hello's
listen port. Our own addresses are learnt from our sockets, so a shuffle
that hands us our own address does not make us dial ourselves.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import trio

from p2pupd.daemon.events import log
from p2pupd.daemon.net.transport import PeerConnection
from p2pupd.daemon.service.links import Links
from p2pupd.protocol.fleet.view import Action, Close, Dial, Kind, PeerView, Send, ViewConfig
from p2pupd.protocol.wire import (
    FEATURE_VIEW,
    ForwardJoin,
    Neighbor,
    PeerAddr,
    Shuffle,
    ViewFull,
)

MAX_TICK_SECONDS = 30.0


def address_of(conn: PeerConnection) -> PeerAddr | None:
    """Where the peer of ``conn`` listens (remote IP, Hello listen port), if it does."""
    hello = conn.peer_hello
    host = conn.remote_host
    if hello is None or not hello.listen_port or not host:
        return conn.dialled
    try:
        return PeerAddr(host, hello.listen_port)
    except Exception:  # not an IP literal (a memory stream's label): no address
        return conn.dialled


class Overlay:
    """See the module docstring."""

    def __init__(self, links: Links, rng: random.Random, config: ViewConfig) -> None:
        self._links = links
        self.view: PeerView[bytes] = PeerView(None, rng, config)
        # Set by the app: dial(addr, kind, source), source saying where we heard of addr.
        self.dial: Callable[[PeerAddr, Kind, str], None] | None = None
        self._sources: dict[PeerAddr, str] = {}  # bounded: 4x the passive view
        self.changed = trio.Event()  # set when bootstrap_wanted may have changed
        self._wake = trio.Event()
        self._own: set[PeerAddr] = set()
        self.listen_port = 0

    # ----- addresses ------------------------------------------------------------

    def add_static(self, host: str, port: int) -> None:
        self._note(PeerAddr(host, port), "static")
        self.view.add_static(PeerAddr(host, port))
        self._kick()

    def add_known(self, addrs: list[PeerAddr], source: str = "mdns") -> None:
        fresh = [a for a in addrs if a not in self._own]
        for addr in fresh:
            self._note(addr, source)
        self.view.add_known(fresh, trio.current_time())
        self._kick()

    def _note(self, addr: PeerAddr, source: str) -> None:
        if addr not in self._sources:
            self._sources[addr] = source
            while len(self._sources) > 4 * self.view.config.max_passive:
                del self._sources[next(iter(self._sources))]

    def retry_all(self) -> None:
        """Forget every backoff (the site's membership changed: a rejoined node
        should not wait out refusals from before)."""
        self.view.retry_all(trio.current_time())
        self._kick()

    def is_static(self, addr: PeerAddr) -> bool:
        return self.view.is_static(addr)

    def bootstrap_wanted(self) -> bool:
        return self.view.bootstrap_wanted(trio.current_time())

    def _own_address(self, conn: PeerConnection) -> None:
        if conn.local_host and self.listen_port:
            try:
                me = PeerAddr(conn.local_host, self.listen_port)
            except Exception:  # not an IP literal
                return
            if me not in self._own and len(self._own) < 16:
                self._own.add(me)
                self.view.forget(me)

    # ----- links --------------------------------------------------------------------

    def joined(self, conn: PeerConnection) -> None:
        """A link passed admission: the view accepts it, waits for its kind, or refuses it."""
        self._own_address(conn)
        capable = conn.session.supports(FEATURE_VIEW)
        now = trio.current_time()
        acts = self.view.connected(
            conn.node_id, address_of(conn), outbound=conn.outbound, capable=capable, now=now,
            kind=conn.kind, trusted=conn.proven,
        )  # fmt: skip
        if conn.outbound and capable:
            conn.post(Neighbor(int(conn.kind or Kind.LOW)))
        self._run(acts)

    def left(self, conn: PeerConnection) -> None:
        """A joined link ended."""
        acts = self.view.disconnected(
            conn.node_id, trio.current_time(), full=conn.full, referrals=conn.referrals
        )
        self._run(acts)

    def dial_ended(self, addr: PeerAddr, conn: PeerConnection | None) -> None:
        """A dial ended before its link joined (``conn`` None: TCP never connected)."""
        now = trio.current_time()
        if conn is not None:
            log(
                "dial-refused",
                level=logging.DEBUG,
                addr=f"{addr.host}:{addr.port}",
                reason=conn.reason,
            )
        if conn is not None and (conn.full or conn.referrals):
            self._run(self.view.refused(addr, now, conn.referrals))
        else:
            self._run(self.view.dial_failed(addr, now))

    def message(self, conn: PeerConnection, msg: Any) -> None:
        """A view message on a joined link."""
        now, peer = trio.current_time(), conn.node_id
        if isinstance(msg, Neighbor):
            self._run(self.view.on_neighbor(peer, msg.kind, now))
        elif isinstance(msg, ForwardJoin):
            self._run(self.view.on_forward_join(peer, msg, now))
        elif isinstance(msg, Shuffle):
            msg = Shuffle(msg.reply, tuple(a for a in msg.peers if a not in self._own))
            self._run(self.view.on_shuffle(peer, msg, now))
        elif isinstance(msg, ViewFull):
            conn.full, conn.referrals = True, msg.peers  # used when the link ends

    def referrals(self) -> tuple[PeerAddr, ...]:
        return self.view.referrals()

    # ----- carrying out actions -----------------------------------------------------

    def _run(self, actions: list[Action[bytes]]) -> None:
        for action in actions:
            if isinstance(action, Dial):
                if self.dial is not None and action.addr not in self._own:
                    self.dial(action.addr, action.kind, self._sources.get(action.addr, "peers"))
                else:
                    self.view.dial_failed(action.addr, trio.current_time())
            elif isinstance(action, Send):
                conn = self._links.conns.get(action.peer)
                if conn is not None:
                    conn.post(action.msg)
            elif isinstance(action, Close):
                conn = self._links.conns.get(action.peer)
                if conn is not None:
                    if action.referrals and conn.session.supports(FEATURE_VIEW):
                        conn.post(ViewFull(action.referrals))
                    conn.close(action.reason)
        self._kick()

    def _kick(self) -> None:
        self._wake.set()
        self.changed.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the view's timers (pings, idle links, shuffles, refills) until cancelled."""
        task_status.started()
        while True:
            now = trio.current_time()
            for peer, conn in list(self._links.conns.items()):  # traffic of every kind counts
                self.view.heard(peer, conn.last_seen)
                self.view.sent(peer, conn.last_sent)
            self._run(self.view.tick(now))
            deadline = self.view.next_deadline()
            wait = MAX_TICK_SECONDS if deadline is None else min(MAX_TICK_SECONDS, deadline - now)
            self._wake = trio.Event()
            with trio.move_on_after(max(wait, 0.01)):
                await self._wake.wait()

    def snapshot(self) -> dict[str, Any]:
        """The view for ``p2pupd peers --json``."""
        return {
            "degree": self.view.degree,
            "target": self.view.config.target,
            "max": self.view.config.max_active,
            "passive": sorted(f"{a.host}:{a.port}" for a in self.view.passive),
            "dialing": sorted(f"{a.host}:{a.port}" for a in self.view.dialing),
        }
