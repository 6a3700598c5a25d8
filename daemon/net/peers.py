"""The peer table: who is connected, with what, and how much it sent.

``connected``: node id -> ``PeerInfo`` for every connection past its
handshake and admission (address, direction, features, last Announce, byte
counters), for ``p2pupd peers`` and the metrics. Exactly one connection per
node id (``protocol.fleet.admission``). Whom to dial is the partial view's
business (protocol/fleet/view.py, driven by ``service/overlay.py``), and
bans are the admission's (keyed to what a peer cannot fake), so this table
is pure bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from p2pupd.daemon.events import short


@dataclass
class PeerInfo:
    node_id: bytes
    address: str  # the remote end of the connection
    endpoint: str | None  # where the peer listens (host:listen_port), if it does
    direction: str  # "in" or "out"
    source: str  # "static", "mdns", "incoming", "memory"
    connected_at: float
    last_seen: float
    features: frozenset[str] = frozenset()
    bytes_in: int = 0
    bytes_out: int = 0
    blobs_in: int = 0
    blobs_out: int = 0
    announced: dict[str, tuple[int, bytes]] = field(default_factory=dict)

    def to_doc(self, now: float) -> dict[str, Any]:
        return {
            "node_id": self.node_id.hex(),
            "address": self.address,
            "endpoint": self.endpoint,
            "direction": self.direction,
            "source": self.source,
            "connected_seconds": round(now - self.connected_at, 3),
            "last_seen_seconds_ago": round(now - self.last_seen, 3),
            "features": sorted(self.features),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "blobs_in": self.blobs_in,
            "blobs_out": self.blobs_out,
            "announced": {
                c: {"serial": s, "digest": d.hex()} for c, (s, d) in self.announced.items()
            },
        }


def format_endpoint(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class PeerTable:
    """See the module docstring."""

    def __init__(self) -> None:
        self.connected: dict[bytes, PeerInfo] = {}

    # ----- connections -------------------------------------------------------

    def add(self, info: PeerInfo) -> None:
        self.connected[info.node_id] = info

    def remove(self, node_id: bytes) -> PeerInfo | None:
        return self.connected.pop(node_id, None)

    def get(self, node_id: bytes) -> PeerInfo | None:
        return self.connected.get(node_id)

    def count(self, node_id: bytes, now: float, bytes_in: int = 0, bytes_out: int = 0) -> None:
        """Add traffic to a connected peer's counters and mark it seen."""
        info = self.connected.get(node_id)
        if info is not None:
            info.bytes_in += bytes_in
            info.bytes_out += bytes_out
            info.last_seen = now

    # ----- reporting ---------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        """The ``connected`` part of the ``p2pupd peers --json`` document."""
        return {"connected": [self.connected[k].to_doc(now) for k in sorted(self.connected)]}

    def describe(self, node_id: bytes) -> str:
        """``<short id>@<address>`` for log lines."""
        info = self.connected.get(node_id)
        return f"{short(node_id)}@{info.address}" if info else short(node_id)
