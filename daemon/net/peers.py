"""The peer table: who is connected, who may be dialled, who is banned.

Theory of operation
-------------------
Three small maps, all keyed so that a peer's claims cannot poison another's:

* ``connected``: node id -> ``PeerInfo`` for every connection past its
  handshake (address, direction, features, last Announce, byte counters).
  Exactly one connection per node id (the transport's duplicate rule).
* ``candidates``: endpoint ``host:port`` -> ``Candidate`` for the dialer,
  fed by static ``--peer`` entries (kept forever) and mDNS (removed when the
  service goes away). Failed dials back off exponentially.
* bans: by node id *and* by the peer's advertised endpoint, until a time on
  the daemon's clock. Whole hosts are never banned: on a shared address
  (NAT, loopback tests) that would punish honest neighbours.

Times are ``trio.current_time()`` values supplied by the caller, so the table
is pure bookkeeping and runs under ``MockClock``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from p2pupd.daemon.events import short

DIAL_BACKOFF_MIN = 1.0
DIAL_BACKOFF_MAX = 60.0


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


@dataclass
class Candidate:
    host: str
    port: int
    sources: set[str]
    node_id: bytes | None = None
    failures: int = 0
    next_try: float = -math.inf
    connected: bool = False

    @property
    def endpoint(self) -> str:
        return format_endpoint(self.host, self.port)


@dataclass(frozen=True)
class BanEntry:
    until: float
    reason: str


def format_endpoint(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class PeerTable:
    """See the module docstring."""

    def __init__(self) -> None:
        self.connected: dict[bytes, PeerInfo] = {}
        self.candidates: dict[str, Candidate] = {}
        self._bans: dict[str, BanEntry] = {}

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

    # ----- bans --------------------------------------------------------------

    def ban(self, node_id: bytes | None, endpoint: str | None, until: float, reason: str) -> None:
        """Refuse this node id and endpoint until ``until`` (an existing longer ban stays)."""
        for key in self._keys(node_id, endpoint):
            old = self._bans.get(key)
            if old is None or old.until < until:
                self._bans[key] = BanEntry(until, reason)

    def banned(
        self, now: float, node_id: bytes | None = None, endpoint: str | None = None
    ) -> BanEntry | None:
        """The ban covering this node id or endpoint, if one is in force."""
        for key in self._keys(node_id, endpoint):
            entry = self._bans.get(key)
            if entry is not None:
                if entry.until > now:
                    return entry
                del self._bans[key]
        return None

    @staticmethod
    def _keys(node_id: bytes | None, endpoint: str | None) -> list[str]:
        keys = []
        if node_id is not None:
            keys.append("id:" + node_id.hex())
        if endpoint is not None:
            keys.append("ep:" + endpoint)
        return keys

    # ----- dial candidates ---------------------------------------------------

    def add_candidate(
        self, host: str, port: int, source: str, node_id: bytes | None = None
    ) -> None:
        """Remember an address to dial, from ``source`` (static, mdns)."""
        ep = format_endpoint(host, port)
        cand = self.candidates.get(ep)
        if cand is None:
            self.candidates[ep] = Candidate(host, port, {source}, node_id)
        else:
            cand.sources.add(source)
            cand.node_id = node_id or cand.node_id

    def remove_candidate(self, endpoint: str, source: str) -> None:
        """Drop ``source``'s claim on ``endpoint``; the entry goes when no source is left."""
        cand = self.candidates.get(endpoint)
        if cand is not None:
            cand.sources.discard(source)
            if not cand.sources and not cand.connected:
                del self.candidates[endpoint]

    def due(self, now: float) -> list[Candidate]:
        """Candidates to dial now: not connected, not banned, not backing off."""
        out = []
        for cand in self.candidates.values():
            if cand.connected or cand.next_try > now:
                continue
            if cand.node_id is not None and cand.node_id in self.connected:
                continue
            if self.banned(now, cand.node_id, cand.endpoint) is not None:
                continue
            out.append(cand)
        return out

    def dial_failed(self, cand: Candidate, now: float) -> float:
        """Record a failed dial; returns the backoff before the next try."""
        cand.failures += 1
        delay = min(DIAL_BACKOFF_MAX, DIAL_BACKOFF_MIN * 2.0 ** (cand.failures - 1))
        cand.next_try = now + delay
        return delay

    def next_dial_time(self) -> float | None:
        times = [c.next_try for c in self.candidates.values() if not c.connected]
        return min(times, default=None)

    # ----- reporting ---------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        """The ``p2pupd peers --json`` document."""
        bans = [
            {"who": key, "seconds_left": round(b.until - now, 1), "reason": b.reason}
            for key, b in sorted(self._bans.items())
            if b.until > now
        ]
        return {
            "connected": [self.connected[k].to_doc(now) for k in sorted(self.connected)],
            "candidates": [
                {
                    "endpoint": c.endpoint,
                    "sources": sorted(c.sources),
                    "node_id": c.node_id.hex() if c.node_id else None,
                    "connected": c.connected,
                    "failures": c.failures,
                }
                for _, c in sorted(self.candidates.items())
            ],
            "banned": bans,
        }

    def describe(self, node_id: bytes) -> str:
        """``<short id>@<address>`` for log lines."""
        info = self.connected.get(node_id)
        return f"{short(node_id)}@{info.address}" if info else short(node_id)
