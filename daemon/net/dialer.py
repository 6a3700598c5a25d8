"""Keeping connections to known peers: static ``--peer`` entries and mDNS finds.

Theory of operation. Candidates live in the peer table (``peers.PeerTable``);
this service dials every one that is due -- not connected, not banned, not
backing off -- and runs the connection to its end. A failed dial backs off
exponentially (1 s .. 60 s); so does a connection that ended within
``SHORT_LIVED`` seconds (refused as a duplicate, banned, handshake mismatch),
while one that lived longer is retried after ``RECONNECT_SECONDS``. Once a
candidate's node id is known, it is not dialled while that node is connected
the other way round. Static candidates are never forgotten; mDNS ones go when
their service disappears.
"""

from __future__ import annotations

from typing import Protocol

import trio

from p2pupd.daemon.events import log
from p2pupd.daemon.net.peers import Candidate, PeerTable
from p2pupd.daemon.net.transport import TransferError, dial

RECONNECT_SECONDS = 2.0
SHORT_LIVED = 5.0
MAX_WAIT = 5.0


class Connector(Protocol):
    """Who runs the connections the dialer opens (the node service)."""

    peers: PeerTable
    stopping: bool  # no new dials once set

    async def run_stream(
        self, stream: trio.abc.Stream, *, outbound: bool, address: str, source: str
    ) -> bytes | None:
        """Run one connection to its end; the peer's node id once known."""
        ...


class Dialer:
    """See the module docstring."""

    def __init__(self, core: Connector) -> None:
        self.core = core
        self._wake = trio.Event()

    def add_static(self, host: str, port: int) -> None:
        """Keep a connection to ``host:port`` (``--peer``)."""
        self.core.peers.add_candidate(host, port, "static")
        self.wake()

    def wake(self) -> None:
        """Look for due candidates now (new candidate, ended connection)."""
        self._wake.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dial due candidates until cancelled."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                now = trio.current_time()
                for cand in [] if self.core.stopping else self.core.peers.due(now):
                    cand.connected = True  # claimed: not due again until this dial ends
                    nursery.start_soon(self._dial, cand)
                nxt = self.core.peers.next_dial_time()
                wait = MAX_WAIT if nxt is None else min(MAX_WAIT, max(nxt - now, 0.05))
                with trio.move_on_after(wait):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def _dial(self, cand: Candidate) -> None:
        try:
            try:
                stream = await dial(cand.host, cand.port)
            except TransferError as exc:
                delay = self.core.peers.dial_failed(cand, trio.current_time())
                log("dial-failed", addr=cand.endpoint, reason=str(exc), retry_in=delay)
                return
            started = trio.current_time()
            node_id = await self.core.run_stream(
                stream, outbound=True, address=cand.endpoint, source=",".join(sorted(cand.sources))
            )
            if node_id:
                cand.node_id = node_id
            now = trio.current_time()
            if now - started < SHORT_LIVED:
                self.core.peers.dial_failed(cand, now)
            else:
                cand.failures = 0
                cand.next_try = now + RECONNECT_SECONDS
        finally:
            cand.connected = False
            if not cand.sources:
                self.core.peers.candidates.pop(cand.endpoint, None)
            self.wake()
