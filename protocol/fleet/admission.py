"""Admission: which connections a node lets in, and bans keyed to what cannot be claimed.

Theory of operation
-------------------
A connection passes two gates before the partial view (protocol/fleet/view.py)
decides whether to keep it as a link:

1. ``inbound(host)``, as soon as TCP accepts, before a byte is read: at most
   ``max_handshakes`` inbound connections may be in their handshake at once,
   and at most ``per_host`` inbound connections (handshaking or admitted) may
   come from one IP address. So one host -- however many sockets it opens --
   holds a bounded share of the node, and the handshake itself is bounded in
   time (``handshake_timeout``, enforced by the caller).
2. ``admit(peer, ...)``, once the Hello (and, with feature "proof", the
   Proof) is through:

   * banned: refused (see below);
   * one connection per node id: a *proven* id (protocol/fleet/identity.py) wins
     over an unproven claim of the same id, whichever came first; between
     two connections of equal standing, a silent one (``existing_stale``)
     yields, else both ends keep the one dialled by the smaller node id, so
     two nodes dialling each other at once agree without talking;
   * slots: at most ``max_peers`` links in all, of which inbound links may
     take all but ``outbound_reserve`` -- a node flooded from outside can
     still dial out to the peers its view chose. Static peers (configured
     by the operator) always get in.

Bans. A ban is keyed to what the offender cannot have faked: a proven node
id, or else the IP address the connection came from. An unproven peer (an
older version, or a relay of someone else's proof) is banned by address
only, so claiming an honest node's id and misbehaving bans the claimant's
address, never the honest node. A proven peer is checked against its id
only: an attacker that shares an address with honest nodes (NAT, one host)
cannot get them refused. An unproven connection claiming a banned id is
refused as well (it can only be that offender or someone posing as it).
The ban table holds at most ``max_bans`` entries; beyond that the ones that
end soonest are dropped first.

Times are the caller's monotonic clock; nothing here does I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from p2pupd.protocol.fleet.identity import normal_host


@dataclass(frozen=True)
class AdmissionConfig:
    max_peers: int = 24
    outbound_reserve: int = 4
    max_handshakes: int = 16
    per_host: int = 8
    handshake_timeout: float = 10.0
    # An admitted peer must say something (older versions announce at once)
    # within this long, or it is holding a slot for nothing.
    first_message_timeout: float = 20.0
    max_bans: int = 4096

    def __post_init__(self) -> None:
        if self.max_peers < 1 or not 0 <= self.outbound_reserve < self.max_peers:
            raise ValueError("max_peers must be positive and above outbound_reserve")
        if self.per_host < 1 or self.max_handshakes < 1:
            raise ValueError("per_host and max_handshakes must be positive")


@dataclass(frozen=True)
class BanEntry:
    until: float
    reason: str


@dataclass(frozen=True)
class Admit:
    """Let the peer in; first close the peer's older connection if ``replaces``."""

    replaces: bool = False


@dataclass(frozen=True)
class Refuse:
    reason: str
    full: bool = False  # for lack of room (say "full", with referrals), not for who it is


Verdict = Admit | Refuse


@dataclass
class _Link:
    host: str
    outbound: bool
    proven: bool
    static: bool


class Admission:
    """The gates of one node; see the module docstring. Peers are node ids."""

    def __init__(self, me: bytes, config: AdmissionConfig | None = None) -> None:
        self.me = me
        self.config = config or AdmissionConfig()
        self._links: dict[bytes, _Link] = {}
        self._pending: dict[str, int] = {}  # host -> inbound connections in handshake
        self._inbound: dict[str, int] = {}  # host -> admitted inbound links
        self._bans: dict[str, BanEntry] = {}

    # ----- gate 1: before the handshake ---------------------------------------

    def inbound(self, host: str) -> str | None:
        """A TCP connection arrived from ``host``: None to start its handshake, else why not.

        On None the caller must call ``handshake_ended(host)`` exactly once,
        when the handshake finished or failed.
        """
        host = normal_host(host)
        if sum(self._pending.values()) >= self.config.max_handshakes:
            return "too many handshakes in progress"
        if self._pending.get(host, 0) + self._inbound.get(host, 0) >= self.config.per_host:
            return f"too many connections from {host}"
        self._pending[host] = self._pending.get(host, 0) + 1
        return None

    def handshake_ended(self, host: str) -> None:
        """An inbound handshake that ``inbound`` let start is over (either way)."""
        host = normal_host(host)
        left = self._pending.get(host, 0) - 1
        if left > 0:
            self._pending[host] = left
        else:
            self._pending.pop(host, None)

    # ----- gate 2: after the handshake ------------------------------------------

    def admit(
        self,
        peer: bytes,
        host: str,
        *,
        proven: bool,
        outbound: bool,
        now: float,
        static: bool = False,
        existing_stale: bool = False,
    ) -> Verdict:
        """Decide on a connection whose handshake is done; see the module docstring.

        On ``Admit`` the caller must call ``left`` when the link ends (and,
        with ``replaces``, the older link of the same id counts as gone).
        """
        host = normal_host(host)
        ban = self.banned(now, peer, host, proven)
        if ban is not None:
            return Refuse(f"banned: {ban.reason}")
        replaces = False
        old = self._links.get(peer)
        if old is not None:
            if old.proven and not proven:
                return Refuse("node id already connected with proof")
            keep_new = (proven and not old.proven) or existing_stale
            if not keep_new:
                smaller_dialled = min(self.me, peer) == (self.me if outbound else peer)
                keep_new = old.outbound != outbound and smaller_dialled
            if not keep_new:
                return Refuse("duplicate connection")
            replaces = True
        if not static and not self._room(outbound, replacing=old):
            return Refuse("too many peers", full=True)
        if replaces:
            self.left(peer)
        self._links[peer] = _Link(host, outbound, proven, static)
        if not outbound:
            self._inbound[host] = self._inbound.get(host, 0) + 1
        return Admit(replaces)

    def left(self, peer: bytes) -> None:
        """An admitted link ended."""
        link = self._links.pop(peer, None)
        if link is not None and not link.outbound:
            left = self._inbound.get(link.host, 0) - 1
            if left > 0:
                self._inbound[link.host] = left
            else:
                self._inbound.pop(link.host, None)

    def _room(self, outbound: bool, replacing: _Link | None) -> bool:
        links = list(self._links.values())
        if replacing is not None:
            links.remove(replacing)
        counted = [link for link in links if not link.static]
        if len(counted) >= self.config.max_peers:
            return False
        inbound = sum(1 for link in counted if not link.outbound)
        return outbound or inbound < self.config.max_peers - self.config.outbound_reserve

    @property
    def count(self) -> int:
        """Admitted links."""
        return len(self._links)

    def is_proven(self, peer: bytes) -> bool:
        link = self._links.get(peer)
        return link is not None and link.proven

    # ----- bans ---------------------------------------------------------------

    def ban(
        self, peer: bytes | None, host: str | None, proven: bool, until: float, reason: str
    ) -> str:
        """Refuse the offender until ``until``; returns the key banned (``id:..``/``host:..``).

        Keyed to the proven node id, or else to the address (module docstring).
        """
        if proven and peer is not None:
            key = "id:" + peer.hex()
        elif host is not None:
            key = "host:" + normal_host(host)
        else:
            return ""
        old = self._bans.get(key)
        if old is None or old.until < until:
            self._bans[key] = BanEntry(until, reason)
        self._trim()
        return key

    def banned(
        self, now: float, peer: bytes | None, host: str | None, proven: bool
    ) -> BanEntry | None:
        """The ban that applies to this connection, if one is in force."""
        keys = ["id:" + peer.hex()] if peer is not None else []
        if not proven and host is not None:
            keys.append("host:" + normal_host(host))
        for key in keys:
            entry = self._bans.get(key)
            if entry is None:
                continue
            if entry.until > now:
                return entry
            del self._bans[key]
        return None

    def bans(self, now: float) -> list[dict[str, Any]]:
        """Bans in force, for ``p2pupd peers --json``."""
        return [
            {"who": key, "seconds_left": round(b.until - now, 1), "reason": b.reason}
            for key, b in sorted(self._bans.items())
            if b.until > now
        ]

    def _trim(self) -> None:
        extra = len(self._bans) - self.config.max_bans
        if extra > 0:
            soonest = sorted(self._bans, key=lambda k: self._bans[k].until)[:extra]
            for key in soonest:
                del self._bans[key]

    def next_expiry(self) -> float:
        """When the next ban ends (math.inf if none)."""
        return min((b.until for b in self._bans.values()), default=math.inf)
