"""The virtual clock and the links: when a frame sent now arrives, and what it cost.

Each node has an uplink and a downlink (bytes/s) and the segment a one-way
``latency``. A frame of L bytes becomes ``ceil(L / MSS)`` TCP segments with
``HEADER`` bytes of Ethernet/IP/TCP headers each, and the receiver sends one
pure ACK per two segments (delayed ACKs). Frames leave a node's uplink one
after another (one FIFO per node: with small per-connection queues, TCP's
sharing between connections gives about the same waiting time), then occupy
the receiver's downlink; a frame arrives when both are through and the
latency has passed. ACKs, SYNs, FINs and keepalive probes are counted in
bytes but not queued (they are small and the kernel sends them at once).

Every node's bytes out are counted, and the multicast bytes every node
receives (``multicast``): the figures the bench reports as idle cost.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from typing import Any

HEADER = 66  # Ethernet 14 + IPv4 20 + TCP 20 + timestamps 12
MSS = 1448
UDP_HEADER = 42  # Ethernet 14 + IPv4 20 + UDP 8


def segments(size: int) -> int:
    return max(1, math.ceil(size / MSS))


def tcp_bytes(size: int) -> int:
    """Bytes on the wire for ``size`` bytes of TCP payload (without the ACKs)."""
    return size + HEADER * segments(size)


def ack_bytes(size: int) -> int:
    """The receiver's pure ACKs for ``size`` bytes of payload."""
    return HEADER * max(1, segments(size) // 2)


class Loop:
    """A heap of (time, sequence, callback, args): the virtual clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self.events = 0

    def at(self, when: float, fn: Callable[..., Any], *args: Any) -> None:
        heapq.heappush(self._queue, (max(when, self.now), next(self._seq), fn, args))

    def after(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        self.at(self.now + delay, fn, *args)

    def run(
        self, until: float, stop: Callable[[], bool] | None = None, check: float = 0.05
    ) -> None:
        """Process events up to ``until`` (or until ``stop()``, checked every ``check`` s)."""
        queue = self._queue
        pop = heapq.heappop
        next_check = self.now + check
        while queue and queue[0][0] <= until:
            when, _, fn, args = pop(queue)
            self.now = when
            fn(*args)
            self.events += 1
            if stop is not None and when >= next_check:
                next_check = when + check
                if stop():
                    return
        self.now = max(self.now, until)


class Net:
    """Link timing and byte accounting for ``n`` nodes; see the module docstring."""

    def __init__(self, loop: Loop, up: float, down: float, latency: float) -> None:
        self.loop = loop
        self.up = up  # bytes/s
        self.down = down
        self.latency = latency
        self.up_free: list[float] = []
        self.down_free: list[float] = []
        self.bytes_out: list[int] = []  # everything each node sent (frames, headers, ACKs)
        self.data_out: list[int] = []  # blob payload bytes each node sent
        self.multicast_total = 0  # multicast bytes sent by anyone: every node receives them

    def add_node(self) -> int:
        self.up_free.append(0.0)
        self.down_free.append(0.0)
        self.bytes_out.append(0)
        self.data_out.append(0)
        return len(self.up_free) - 1

    def frame(self, src: int, dst: int, size: int) -> float:
        """Send a TCP frame of ``size`` bytes from ``src`` to ``dst``; returns its arrival time."""
        wire = tcp_bytes(size)
        now = self.loop.now
        start = max(now, self.up_free[src])
        sent = start + wire / self.up
        self.up_free[src] = sent
        arrive = max(sent + self.latency, self.down_free[dst] + wire / self.down)
        self.down_free[dst] = arrive
        self.bytes_out[src] += wire
        self.bytes_out[dst] += ack_bytes(size)
        return arrive

    def packets(self, src: int, count: int, size: int = HEADER) -> None:
        """Count ``count`` small TCP packets (SYN, FIN, ACK, keepalive) sent by ``src``."""
        self.bytes_out[src] += count * size

    def multicast(self, src: int, payload: int) -> None:
        """A multicast datagram of ``payload`` bytes from ``src``: every node receives it."""
        size = payload + UDP_HEADER
        self.bytes_out[src] += size
        self.multicast_total += size

    def unicast_datagram(self, src: int, payload: int) -> None:
        self.bytes_out[src] += payload + UDP_HEADER
