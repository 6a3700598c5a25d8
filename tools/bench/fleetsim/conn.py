"""One simulated TCP connection: two ``End``s, each with the project's real ``Session``.

Every message is turned into bytes by the sender's ``Session.send`` and fed
to the receiver's ``Session.receive_data`` when ``Net`` says it arrives, so
the wire format, the handshake (and proof), request correlation and the
in-flight caps are the real ones. ``End.requests`` mirrors the transport's
``send_request``: requests beyond the session's free slots wait in a backlog.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from p2pupd.protocol.fleet.view import Kind
from p2pupd.protocol.session import Session
from p2pupd.protocol.wire import PeerAddr, Request, Response

HANDSHAKE_PACKETS = 3  # SYN, SYN-ACK, ACK
CLOSE_PACKETS = 2  # each side: FIN and the ACK of the other's FIN

AnswerFn = Callable[[Response], None]


@dataclass(eq=False)
class End:
    """One side of a connection, as its node sees it."""

    node: Any  # the SimNode it belongs to (node.py; typed loosely to keep imports one-way)
    session: Session
    outbound: bool
    conn: Conn
    kind: Kind | None = None  # what we dialled for (outbound)
    addr: PeerAddr | None = None  # where the peer listens, once known
    peer_id: bytes = b""
    joined: bool = False
    closed: bool = False
    handshaking: bool = False  # counted by admission's handshake gate
    referrals: tuple[PeerAddr, ...] = ()  # from the peer's ViewFull
    full: bool = False  # the peer said ViewFull
    last_arrival: float = 0.0  # when the last frame we sent arrives
    waiters: dict[int, AnswerFn] = field(default_factory=dict)
    backlog: deque[tuple[Callable[[Session], Request], AnswerFn]] = field(default_factory=deque)

    @property
    def other(self) -> End:
        return self.conn.b if self is self.conn.a else self.conn.a


@dataclass(eq=False)
class Conn:
    """Both ends, and the time of the last byte either way (for TCP keepalives)."""

    a: End = field(init=False)
    b: End = field(init=False)
    last: float = 0.0
    open: bool = True

    def touch(self, now: float, keepidle: float, count: Callable[[int, int], None]) -> None:
        """Account the keepalive probes an idle stretch up to ``now`` cost; mark activity."""
        gap = now - self.last
        if gap >= keepidle:
            probes = int(gap // keepidle)
            count(self.a.node.index, probes)  # probe + its ACK, either side sends one
            count(self.b.node.index, probes)
        self.last = now

    def idle_until(self, now: float, keepidle: float, count: Callable[[int, int], None]) -> None:
        """Like ``touch`` at the end of a measurement, without inventing traffic at ``now``."""
        gap = now - self.last
        if gap >= keepidle:
            probes = int(gap // keepidle)
            count(self.a.node.index, probes)
            count(self.b.node.index, probes)
            self.last += probes * keepidle
