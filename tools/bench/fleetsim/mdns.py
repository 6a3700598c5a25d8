"""mDNS as the simulator models it: only to bootstrap, a few registered beacons.

What the daemon does (daemon/net/discovery.py) and this model counts:

* A node browses (PTR queries for ``_p2pupd._tcp.local.``) only while its
  view wants addresses (``PeerView.bootstrap_wanted``), with the usual
  doubling interval (1 s, 2 s, 4 s ... at most ``MAX_INTERVAL``), and stops
  as soon as it does not. Queries ask for unicast answers (the QU bit) and
  list the answers already known, so a beacon answers a node once.
* A node registers its own service (probes, then announcements) only if its
  first browse found fewer than ``beacons`` registered nodes: a site then
  has a handful of beacons, and every query is answered by a handful, not by
  N nodes. Joiners keep the number topped up as beacons go away.

Every multicast packet reaches every node (``Net.multicast``), so this is
where N appears: each node's own browse at start costs every node one query.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from p2pupd.tools.bench.fleetsim.net import Loop, Net

QUERY_BYTES = 48  # header + the PTR question
KNOWN_ANSWER_BYTES = 40  # each known answer listed in a query
ANSWER_BYTES = 260  # PTR + SRV + TXT + A of one instance
PROBE_BYTES = 90
ANNOUNCE_BYTES = 260
MAX_INTERVAL = 60.0


class Mdns:
    """The segment's multicast and its registered beacons."""

    def __init__(self, loop: Loop, net: Net, rng: random.Random, beacons: int = 8) -> None:
        self.loop = loop
        self.net = net
        self.rng = rng
        self.target = beacons
        self.registered: dict[int, object] = {}  # node -> its address
        self.queries = 0

    def browse(
        self,
        node: int,
        addr: object,
        wanted: Callable[[], bool],
        found: Callable[[list[object]], None],
        first: bool,
    ) -> None:
        """Start browsing for ``node`` until ``wanted()`` is False."""
        self.loop.after(
            self.rng.uniform(0.02, 0.12), self._query, node, addr, wanted, found, 1.0, set(), first
        )

    def unregister(self, node: int) -> None:
        if self.registered.pop(node, None) is not None:
            self.net.multicast(node, ANNOUNCE_BYTES)  # goodbye (TTL 0)

    def _query(
        self,
        node: int,
        addr: object,
        wanted: Callable[[], bool],
        found: Callable[[list[object]], None],
        interval: float,
        known: set[int],
        first: bool,
    ) -> None:
        if not wanted():
            if first:
                self._maybe_register(node, addr, known)
            return
        self.queries += 1
        self.net.multicast(node, QUERY_BYTES + KNOWN_ANSWER_BYTES * len(known))
        answering = [b for b in self.registered if b not in known and b != node]
        for beacon in answering:
            self.net.unicast_datagram(beacon, ANSWER_BYTES)
            known.add(beacon)
        if answering:
            addrs = [self.registered[b] for b in answering]
            self.loop.after(self.rng.uniform(0.02, 0.12), found, addrs)
        if first:  # decide after the first round of answers
            self.loop.after(0.2, self._maybe_register, node, addr, known)
            first = False
        nxt = min(MAX_INTERVAL, interval * 2)
        self.loop.after(interval, self._query, node, addr, wanted, found, nxt, known, False)

    def _maybe_register(self, node: int, addr: object, known: set[int]) -> None:
        if node in self.registered or len(known) >= self.target:
            return
        self.registered[node] = addr
        for _ in range(3):
            self.net.multicast(node, PROBE_BYTES)
        for _ in range(2):
            self.net.multicast(node, ANNOUNCE_BYTES)
