"""Opening the connections the partial view asks for; no policy of its own.

Theory of operation. Whom to dial, and when, is decided by the partial view
(protocol/fleet/view.py, driven by ``service/overlay.py``): it dials only
while it is short of links, a few at a time, each address from its passive
view, with backoff after failures and refusals. This service carries one
dial out: ``dial(addr, kind)`` opens TCP (bounded by ``CONNECT_SECONDS``),
runs the connection through the connector until it ends, and reports a
dial that never connected (``on_failed``). The number of dials in flight is
bounded by ``MAX_DIALS`` whatever is asked (a dial counts until its TCP
connection is up; then admission bounds it like any link), so the sockets a
daemon holds stay bounded: admitted links, inbound handshakes and these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import trio

from p2pupd.daemon.events import log
from p2pupd.daemon.net.peers import format_endpoint
from p2pupd.daemon.net.transport import TransferError
from p2pupd.daemon.net.transport import dial as open_tcp
from p2pupd.protocol.wire import PeerAddr

CONNECT_SECONDS = 5.0
MAX_DIALS = 8


class Connector(Protocol):
    """Who runs the connections the dialer opens (the node service)."""

    stopping: bool  # no new dials once set

    async def run_stream(
        self,
        stream: trio.abc.Stream,
        *,
        outbound: bool,
        address: str,
        source: str,
        kind: Any = None,
        dialled: PeerAddr | None = None,
    ) -> bytes | None:
        """Run one connection to its end; the peer's node id once known."""
        ...


class Dialer:
    """See the module docstring."""

    def __init__(self, core: Connector, on_failed: Callable[[PeerAddr], None]) -> None:
        self.core = core
        self.on_failed = on_failed
        self._nursery: trio.Nursery | None = None
        self._dialing: set[PeerAddr] = set()

    def dial(self, addr: PeerAddr, kind: Any, source: str = "view") -> None:
        """Open a link to ``addr`` (``kind``: why, said in ``Neighbor`` after the handshake;
        ``source``: where the address came from, for ``p2pupd peers``)."""
        if (
            self._nursery is None
            or self.core.stopping
            or addr in self._dialing
            or len(self._dialing) >= MAX_DIALS
        ):
            self.on_failed(addr)
            return
        self._dialing.add(addr)
        self._nursery.start_soon(self._dial, addr, kind, source)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run dials until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def _dial(self, addr: PeerAddr, kind: Any, source: str) -> None:
        endpoint = format_endpoint(addr.host, addr.port)
        try:
            stream = await open_tcp(addr.host, addr.port, timeout=CONNECT_SECONDS)
        except TransferError as exc:
            log("dial-failed", addr=endpoint, reason=str(exc))
            self.on_failed(addr)
            return
        finally:
            # Counted only while connecting: once connected, the link is the
            # admission's to bound (or refuse), like an inbound one.
            self._dialing.discard(addr)
        await self.core.run_stream(
            stream, outbound=True, address=endpoint, source=source, kind=kind, dialled=addr
        )
