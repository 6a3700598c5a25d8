"""The seam between the node service and the services it runs (gossip, fetch, site collection).

``NodeService`` owns the open node, the peer table and the live connections;
the services below it need a narrow slice of that and nothing else, so they
take it as this ``typing.Protocol`` instead of importing ``NodeService``
(which imports them). What a service must *tell* the rest of the node -- a
release is complete, a peer offered a manifest -- goes through constructor
callbacks, wired by ``NodeService`` to ``Lifecycle``, the one coordinator above
gossip and fetch.
"""

from __future__ import annotations

from typing import Protocol

from p2pupd.daemon.net.peers import PeerTable
from p2pupd.daemon.net.transport import PeerConnection
from p2pupd.daemon.offload import Offload
from p2pupd.daemon.state.node import Node


class Links(Protocol):
    """What a service may use of the node service: the node, its peers, blocking work."""

    node: Node
    offload: Offload
    peers: PeerTable
    conns: dict[bytes, PeerConnection]  # joined peers by node id (read only)

    def ban(self, peer: bytes, reason: str, until: float | None = None, code: int = ...) -> None:
        """Refuse ``peer`` for a while and disconnect it."""
        ...
