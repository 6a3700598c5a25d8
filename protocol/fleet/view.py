"""The partial view: which few peers a node keeps connections to (HyParView style).

Theory of operation
-------------------
A site may hold 10,000 nodes; a node keeps open links to a handful of them
(the *active view*, ``target`` to ``max_active``, 8-16) and remembers a few
dozen more addresses (the *passive view*, up to ``max_passive``) to replace
lost links with. Both views are samples of the site, refreshed by *shuffles*,
so the links form a random graph of bounded degree -- an expander: gossip
over it reaches everyone in O(log N) hops, and no node's cost grows with N.

Events come in (a link came up or went down, a view message arrived, time
passed); ``Action`` values go out for the caller to carry out: ``Dial``,
``Send`` (a wire message on a link) and ``Close`` (say ``ViewFull`` with a
few addresses to try, then close). The view never touches a socket or clock.

Why each link exists is said once, by the dialler, in ``Neighbor(kind)``:

* ``JOIN``: "I am new here" (the first dial of a node with an empty view).
  Always accepted: a full node *evicts a random peer* to make room, so a
  node that joins a saturated site always gets in. The contact then sends
  ``ForwardJoin`` random walks (``ttl`` = ``join_ttl``) through its other
  links; a walk ends at a node with room below ``target`` (or at ttl 0),
  which dials the joiner with kind ``FORWARD``, so the joiner quickly gets
  several random links, not just the contact's. Walks also drop the joiner's
  address in passive views on their way (at ttl ``passive_ttl``). The
  contact also answers with a ``Shuffle`` sample, the joiner's first passive
  view. Joins that evict are rate-limited (``join_budget`` per minute; more
  count as ``LOW``), so a flood of joins cannot churn a node's links.
* ``HIGH``: "my view is empty" -- accepted like a join, without the walks.
* ``LOW``: "I would like one more link" -- accepted only below ``max_active``.
* ``FORWARD``: a join walk ended here -- accepted only below ``max_active``.

A refusal or an eviction is ``Close`` with ``ViewFull``: "full", plus up to
``referrals`` addresses to try instead. The refused node puts those in its
passive view and does *not* redial the refuser before ``refused_backoff``;
nothing here dials anyone blindly or on a fixed timer: a node dials only
while its active view is below ``target``, at most ``max_dialing`` at once,
each address from the passive view, and a failed address backs off.

Every ``shuffle_interval`` (jittered) a node sends one random view-capable
neighbour a ``Shuffle``: its own address and a few of its active and passive
addresses; the neighbour answers with as many of its own, and both add what
they got to their passive views (dropping random entries beyond the bound).

Liveness: a link on which we sent nothing for ``keepalive`` seconds gets a
``Ping``; a view-capable link on which we heard nothing for ``idle_timeout``
seconds is closed (older peers without "view" never ping, and are only
evicted, never timed out). An inbound view-capable link that does not say
its ``Neighbor`` kind within ``neighbor_timeout`` is closed.

Static peers (``add_static``) are dialled whatever the view's size, never
evicted and never forgotten. ``bootstrap_wanted`` tells discovery (mDNS)
when to look for addresses: only while the view is below target and the
passive view cannot fill it.

Bounds: the active view is at most ``max_active`` (plus static peers), the
passive view at most ``max_passive`` plus static entries, the join budget a
fixed window; everything here is O(view size), whatever the site's size.
"""

from __future__ import annotations

import enum
import math
import random
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from p2pupd.protocol.wire import (
    MAX_PEER_ADDRS,
    MAX_TTL,
    ForwardJoin,
    Message,
    PeerAddr,
    Ping,
    Shuffle,
    is_host,
)

P = TypeVar("P", bound=Hashable)


class Kind(enum.IntEnum):
    """Why a dialler opened a link (``Neighbor.kind``)."""

    JOIN = 0
    HIGH = 1
    LOW = 2
    FORWARD = 3


@dataclass(frozen=True)
class ViewConfig:
    target: int = 12  # links a node works to keep
    max_active: int = 16  # links it accepts at most (static peers come on top)
    max_passive: int = 64
    max_dialing: int = 2
    join_ttl: int = 4  # ForwardJoin walk length (HyParView's ARWL)
    passive_ttl: int = 2  # a walk leaves the joiner in a passive view here (PRWL)
    join_walks: int = 6  # walks a contact starts per join
    join_budget: int = 6  # joins/highs per minute that may evict a peer
    referrals: int = 8  # addresses in a ViewFull
    shuffle_interval: float = 120.0
    shuffle_active: int = 3
    shuffle_passive: int = 4
    keepalive: float = 60.0
    idle_timeout: float = 200.0
    neighbor_timeout: float = 10.0
    dial_backoff: float = 5.0  # first retry of a failed address; doubles
    dial_backoff_max: float = 600.0
    refused_backoff: float = 300.0
    low_dial_gap: float = 2.0  # between LOW dials after a refusal; doubles per refusal

    @property
    def low_limit(self) -> int:
        """Links up to which a LOW request is accepted (the middle of target..max)."""
        return self.target + (self.max_active - self.target + 1) // 2

    def __post_init__(self) -> None:
        if not 1 <= self.target <= self.max_active:
            raise ValueError("view target must be between 1 and max_active")
        if self.max_passive < 1 or self.max_dialing < 1:
            raise ValueError("passive view and dial concurrency must be positive")
        if not 0 <= self.passive_ttl <= self.join_ttl <= MAX_TTL:
            raise ValueError(f"walk lengths must satisfy 0 <= passive_ttl <= join_ttl <= {MAX_TTL}")


@dataclass(frozen=True)
class Dial:
    """Open a link to ``addr`` and send ``Neighbor(kind)`` once the handshake is done."""

    addr: PeerAddr
    kind: Kind


@dataclass(frozen=True)
class Send(Generic[P]):
    """Send ``msg`` on the link to ``peer``."""

    peer: P
    msg: Message


@dataclass(frozen=True)
class Close(Generic[P]):
    """Close the link to ``peer``; with ``referrals``, say ``ViewFull(referrals)`` first."""

    peer: P
    reason: str
    referrals: tuple[PeerAddr, ...] = ()


Action = Dial | Send[P] | Close[P]


@dataclass
class _Link:
    addr: PeerAddr | None  # where the peer listens (None: it does not)
    outbound: bool
    capable: bool  # speaks "view"
    kind: Kind | None  # None: an inbound view-capable link not yet classified
    since: float
    heard: float
    sent: float
    static: bool = False
    trusted: bool = True


@dataclass
class _Known:
    """A passive-view entry."""

    retry_at: float = -math.inf
    failures: int = 0
    static: bool = False


@dataclass
class PeerView(Generic[P]):
    """One node's active and passive views; see the module docstring.

    ``P`` is the caller's link identity (a proven node id, a connection);
    addresses are ``PeerAddr`` (host, listen port).
    """

    me: PeerAddr | None
    rng: random.Random
    config: ViewConfig = field(default_factory=ViewConfig)

    def __post_init__(self) -> None:
        self._links: dict[P, _Link] = {}
        self._by_addr: dict[PeerAddr, P] = {}
        self._passive: dict[PeerAddr, _Known] = {}
        self._dialing: dict[PeerAddr, Kind] = {}
        self._joins: deque[float] = deque()  # times of accepted evicting joins
        self._degree = 0  # links with a kind (accepted); kept in step by _set_kind/_drop
        self._next_low = -math.inf  # no LOW dial before this (paced after refusals)
        self._low_refusals = 0
        self._next_shuffle: float | None = None

    # ----- queries ----------------------------------------------------------

    @property
    def active(self) -> list[P]:
        """Peers with an accepted link (inbound links not yet classified excluded)."""
        return [p for p, link in self._links.items() if link.kind is not None]

    @property
    def degree(self) -> int:
        """Accepted links (the active view's size)."""
        return self._degree

    @property
    def passive(self) -> list[PeerAddr]:
        return list(self._passive)

    @property
    def dialing(self) -> list[PeerAddr]:
        """Addresses dialled that have not reported back yet."""
        return list(self._dialing)

    def address_of(self, peer: P) -> PeerAddr | None:
        link = self._links.get(peer)
        return link.addr if link is not None else None

    def bootstrap_wanted(self, now: float) -> bool:
        """True while discovery should look for addresses (mDNS browse).

        That is while the view is below half its target and no address of the
        passive view can be dialled now: a view that is merely short of its
        target fills itself from referrals and shuffles, without multicast.
        """
        low = self.degree + len(self._dialing) < max(1, self.config.target // 2)
        return low and self._dialable(now) == 0

    def next_deadline(self) -> float | None:
        """The earliest time ``tick`` has something to do, or None."""
        times = [self._next_shuffle] if self._next_shuffle is not None and self._links else []
        cfg = self.config
        for link in self._links.values():
            if link.capable:
                times.append(link.sent + cfg.keepalive)
                times.append(link.heard + cfg.idle_timeout)
                if link.kind is None:
                    times.append(link.since + cfg.neighbor_timeout)
        if self.degree + len(self._dialing) < cfg.target:
            retry = [k.retry_at for a, k in self._passive.items() if a not in self._dialing]
            soonest = min(retry, default=math.inf)
            urgent = self.degree < cfg.target // 2
            times.append(soonest if urgent else max(soonest, self._next_low))
        times = [t for t in times if t is not None and t < math.inf]
        return min(times, default=None)

    # ----- addresses ----------------------------------------------------------

    def add_static(self, addr: PeerAddr) -> None:
        """An operator-given peer: always dialled, never evicted or forgotten."""
        self._passive.setdefault(addr, _Known()).static = True

    def add_known(self, addrs: Iterable[PeerAddr], now: float) -> None:
        """Addresses heard of (discovery, referrals, shuffles) go to the passive view."""
        for addr in addrs:
            if addr == self.me or addr in self._by_addr or addr in self._passive:
                continue
            self._passive[addr] = _Known()
        self._trim_passive()

    def is_static(self, addr: PeerAddr) -> bool:
        """True for an operator-given peer (``add_static``)."""
        known = self._passive.get(addr)
        if known is not None:
            return known.static
        peer = self._by_addr.get(addr)
        return peer is not None and self._links[peer].static

    def retry_all(self, now: float) -> None:
        """Every known address may be dialled again at once; refusal pacing reset."""
        for addr, known in self._passive.items():
            if addr not in self._dialing:
                known.retry_at, known.failures = -math.inf, 0
        self._next_low, self._low_refusals = -math.inf, 0

    def forget(self, addr: PeerAddr) -> None:
        """Drop ``addr`` from the passive view (it is our own, or gone for good)."""
        known = self._passive.get(addr)
        if known is not None and not known.static and addr not in self._dialing:
            del self._passive[addr]

    def dial_failed(self, addr: PeerAddr, now: float) -> list[Action[P]]:
        """A dial to ``addr`` did not reach a handshake: back off, forget after a few.

        Returns dials to try instead.
        """
        self._dialing.pop(addr, None)
        known = self._passive.get(addr)
        if known is not None:
            known.failures += 1
            if known.failures >= 4 and not known.static:
                del self._passive[addr]
            else:
                delay = self.config.dial_backoff * 2.0 ** (known.failures - 1)
                known.retry_at = now + min(self.config.dial_backoff_max, delay)
        return self._refill(now)

    def refused(
        self, addr: PeerAddr, now: float, referrals: Iterable[PeerAddr] = ()
    ) -> list[Action[P]]:
        """A dial to ``addr`` was refused before it became a link ("full", or the
        peer's admission said no): not again before ``refused_backoff``; the
        referrals go to the passive view. Returns dials to try instead."""
        self._dialing.pop(addr, None)
        known = self._passive.get(addr)
        if known is not None:
            known.retry_at = now + self.config.refused_backoff
        self._refused_once(now)
        self.add_known(referrals, now)
        return self._refill(now)

    def _refused_once(self, now: float) -> None:
        """Space out LOW dials after refusals: ``low_dial_gap`` doubling, at most
        ``refused_backoff``; a link that sticks resets it."""
        cfg = self.config
        self._low_refusals += 1
        gap = cfg.low_dial_gap * 2.0 ** min(self._low_refusals - 1, 16)
        self._next_low = now + min(cfg.refused_backoff, gap) * self.rng.uniform(0.5, 1.5)

    # ----- links ------------------------------------------------------------

    def connected(
        self,
        peer: P,
        addr: PeerAddr | None,
        *,
        outbound: bool,
        capable: bool,
        now: float,
        kind: Kind | None = None,
        trusted: bool = True,
    ) -> list[Action[P]]:
        """A link passed the handshake and admission.

        ``trusted``: the peer proved its node id (protocol/fleet/identity.py);
        untrusted links are the first to make room for a joiner.

        ``outbound``: we dialled it (``kind`` is what we will send, taken from
        the ``Dial``; the caller sends ``Neighbor(kind)`` if ``capable``).
        Inbound from a view-capable peer: wait for its ``Neighbor``. Inbound
        from an older peer: judged at once as ``LOW``.
        """
        if addr is not None:
            self._dialing.pop(addr, None)
        known = self._passive.pop(addr, None) if addr is not None else None
        static = known is not None and known.static
        # Inbound links may fill the view while one of our dials is under way:
        # that dial then ends here instead of holding the view above its maximum.
        full = outbound and not static and self.degree >= self.config.max_active
        first = (kind or Kind.LOW) if outbound and not full else None
        link = _Link(addr, outbound, capable, first, now, now, now, static, trusted)
        old = self._links.pop(peer, None)
        if old is not None:
            self._degree -= old.kind is not None
            if old.addr is not None:
                self._by_addr.pop(old.addr, None)
        self._links[peer] = link
        self._degree += first is not None
        if addr is not None:
            self._by_addr[addr] = peer
        if self._next_shuffle is None:
            self._next_shuffle = now + self._jitter(self.config.shuffle_interval)
        if full:
            return [Close(peer, "view full: filled while this dial was under way")]
        if not outbound and not capable:
            return self._classify(peer, link, Kind.LOW, now)
        return []

    def on_neighbor(self, peer: P, kind: int, now: float) -> list[Action[P]]:
        """An inbound link said why it was opened: accept it, or refuse with referrals."""
        link = self._links.get(peer)
        if link is None or link.outbound or link.kind is not None:
            return []  # said twice, or on our own dial: ignore
        return self._classify(peer, link, Kind(kind), now)

    def disconnected(
        self, peer: P, now: float, *, full: bool = False, referrals: Iterable[PeerAddr] = ()
    ) -> list[Action[P]]:
        """A link ended (``full``: the peer sent ``ViewFull``). Returns dials to refill."""
        link = self._links.pop(peer, None)
        if link is None:
            return []
        self._degree -= link.kind is not None
        if link.addr is not None:
            self._by_addr.pop(link.addr, None)
            known = self._passive.setdefault(link.addr, _Known(static=link.static))
            if full:
                known.retry_at = now + self.config.refused_backoff
                if link.outbound and now - link.since < self.config.neighbor_timeout:
                    self._refused_once(now)  # our dial, refused once it said why
            else:  # a link that worked: worth retrying soon, but not at once
                known.retry_at = now + self.config.dial_backoff
        self.add_known(referrals, now)
        return self._refill(now)

    def heard(self, peer: P, now: float) -> None:
        """Something arrived on ``peer``'s link."""
        link = self._links.get(peer)
        if link is not None:
            link.heard = now

    def sent(self, peer: P, now: float) -> None:
        """Something was sent on ``peer``'s link."""
        link = self._links.get(peer)
        if link is not None:
            link.sent = now

    # ----- view messages ------------------------------------------------------

    def on_forward_join(self, peer: P, msg: ForwardJoin, now: float) -> list[Action[P]]:
        """A join walk reached us: take the joiner, pass the walk on, or remember it."""
        joiner = PeerAddr(msg.host, msg.port)
        if joiner == self.me or joiner in self._by_addr or joiner in self._dialing:
            return []
        cfg = self.config
        room = self.degree + len(self._dialing) < cfg.max_active
        if (msg.ttl == 0 or self.degree < cfg.target) and room:
            self._passive.pop(joiner, None)
            self._dialing[joiner] = Kind.FORWARD
            return [Dial(joiner, Kind.FORWARD)]
        if msg.ttl <= cfg.passive_ttl:
            self.add_known([joiner], now)
        nxt = self._pick([p for p in self._capable() if p != peer], 1)
        if msg.ttl == 0 or not nxt:
            return []
        return [Send(nxt[0], ForwardJoin(msg.host, msg.port, msg.ttl - 1))]

    def on_shuffle(self, peer: P, msg: Shuffle, now: float) -> list[Action[P]]:
        """Take a neighbour's sample into the passive view; answer a request with ours."""
        out: list[Action[P]] = []
        if not msg.reply and peer in self._links:
            out.append(Send(peer, Shuffle(True, self._sample(len(msg.peers), exclude=peer))))
        self.add_known(msg.peers, now)
        return out

    # ----- time -------------------------------------------------------------

    def tick(self, now: float) -> list[Action[P]]:
        """Pings, idle and unclassified links, the periodic shuffle, refills."""
        cfg = self.config
        out: list[Action[P]] = []
        for peer, link in list(self._links.items()):
            if link.outbound and self._low_refusals and now - link.since >= cfg.neighbor_timeout:
                self._low_refusals = 0  # a dial of ours stuck: the site has room again
            if link.capable and now - link.heard >= cfg.idle_timeout:
                out.append(Close(peer, f"silent for {cfg.idle_timeout:.0f}s"))
            elif link.capable and link.kind is None and now - link.since >= cfg.neighbor_timeout:
                out.append(Close(peer, "did not say why it connected"))
            elif link.capable and now - link.sent >= cfg.keepalive:
                link.sent = now
                out.append(Send(peer, Ping()))
        if self._next_shuffle is not None and now >= self._next_shuffle:
            self._next_shuffle = now + self._jitter(cfg.shuffle_interval)
            partner = self._pick(self._capable(), 1)
            if partner:
                sample = self._sample(cfg.shuffle_active + cfg.shuffle_passive, partner[0])
                out.append(Send(partner[0], Shuffle(False, sample)))
        return out + self._refill(now)

    # ----- internals ------------------------------------------------------------

    def _classify(self, peer: P, link: _Link, kind: Kind, now: float) -> list[Action[P]]:
        cfg = self.config
        others = self.degree  # accepted links, not counting this one
        evicting = kind in (Kind.JOIN, Kind.HIGH) and self._join_allowed(now)
        # A LOW link is taken only up to the middle of target..max: the rest is
        # kept for joins, walks and nodes with few links, so a node short of
        # links always finds someone with room.
        limit = cfg.low_limit if kind is Kind.LOW else cfg.max_active
        if others < limit or link.static:
            link.kind = kind
            self._degree += 1
        elif evicting and (victim := self._victim(peer)) is not None:
            self._joins.append(now)
            link.kind = kind
            self._degree += 1
            out: list[Action[P]] = [Close(victim, "view full: made room for a joiner",
                                          self._referrals(victim))]  # fmt: skip
            return out + self._welcome(peer, link, kind)
        else:
            return [Close(peer, "view full", self._referrals(peer))]
        return self._welcome(peer, link, kind)

    def _welcome(self, peer: P, link: _Link, kind: Kind) -> list[Action[P]]:
        if kind is not Kind.JOIN or link.addr is None or not is_host(link.addr.host):
            return []
        cfg = self.config
        out: list[Action[P]] = []
        walkers = self._pick([p for p in self._capable() if p != peer], cfg.join_walks)
        for walker in walkers:
            out.append(Send(walker, ForwardJoin(link.addr.host, link.addr.port, cfg.join_ttl)))
        if link.capable:
            size = cfg.shuffle_active + cfg.shuffle_passive
            out.append(Send(peer, Shuffle(True, self._sample(size, exclude=peer))))
        return out

    def _join_allowed(self, now: float) -> bool:
        while self._joins and self._joins[0] <= now - 60.0:
            self._joins.popleft()
        return len(self._joins) < self.config.join_budget

    def _victim(self, newcomer: P) -> P | None:
        pool = [
            p
            for p, link in self._links.items()
            if p != newcomer and link.kind is not None and not link.static
        ]
        # Peers that did not prove their id go first (older versions, or
        # someone holding slots with unproven claims), else anyone at random.
        untrusted = [p for p in pool if not self._links[p].trusted]
        pool = untrusted or pool
        return self.rng.choice(pool) if pool else None

    def _refill(self, now: float) -> list[Action[P]]:
        cfg = self.config
        out: list[Action[P]] = []
        for addr, known in self._passive.items():  # static peers first, whatever the size
            if known.static and addr not in self._dialing and known.retry_at <= now:
                out.append(self._dial(addr, Kind.HIGH if self.degree == 0 else Kind.LOW))
        want = min(
            cfg.target - self.degree - len(self._dialing), cfg.max_dialing - len(self._dialing)
        )
        if want <= 0:
            return out
        urgent = self.degree < cfg.target // 2
        if not urgent:  # merely short of target: one dial at a time, paced
            if self._dialing or now < self._next_low:
                return out
            want = 1
        ready = [
            a for a, k in self._passive.items() if a not in self._dialing and k.retry_at <= now
        ]
        for addr in self.rng.sample(ready, min(want, len(ready))):
            if self.degree == 0 and not self._dialing:
                kind = Kind.JOIN if not self._links else Kind.HIGH
            else:
                kind = Kind.HIGH if urgent else Kind.LOW
            out.append(self._dial(addr, kind))
        return out

    def _dial(self, addr: PeerAddr, kind: Kind) -> Dial:
        self._dialing[addr] = kind
        # Not retried before the dial reports back (connected or dial_failed).
        self._passive[addr].retry_at = math.inf
        return Dial(addr, kind)

    def _dialable(self, now: float) -> int:
        return sum(
            1 for a, k in self._passive.items() if k.retry_at <= now and a not in self._dialing
        )

    def _capable(self) -> list[P]:
        return [p for p, link in self._links.items() if link.capable and link.kind is not None]

    def _pick(self, peers: list[P], n: int) -> list[P]:
        return self.rng.sample(peers, min(n, len(peers)))

    def _sample(self, size: int, exclude: P) -> tuple[PeerAddr, ...]:
        """Our address plus up to ``size`` known ones (active first), never ``exclude``'s."""
        cfg = self.config
        skip = self._links[exclude].addr if exclude in self._links else None
        act = [
            link.addr
            for p, link in self._links.items()
            if link.addr is not None
            and link.kind is not None
            and link.addr != skip
            and is_host(link.addr.host)
        ]
        pas = [a for a in self._passive if a != skip and is_host(a.host)]
        picked = self.rng.sample(act, min(cfg.shuffle_active, len(act)))
        picked += self.rng.sample(pas, min(size - len(picked), len(pas)))
        out = ([self.me] if self.me is not None else []) + picked
        return tuple(out[:MAX_PEER_ADDRS])

    def referrals(self, exclude: PeerAddr | None = None) -> tuple[PeerAddr, ...]:
        """Up to ``referrals`` known addresses (active and passive) to offer a refused node."""
        pool = [a for a in self._by_addr if a != exclude and is_host(a.host)]
        pool += [a for a in self._passive if a != exclude and is_host(a.host)]
        return tuple(self.rng.sample(pool, min(self.config.referrals, len(pool))))

    def _referrals(self, peer: P) -> tuple[PeerAddr, ...]:
        return self.referrals(self._links[peer].addr if peer in self._links else None)

    def _trim_passive(self) -> None:
        extra = sum(1 for k in self._passive.values() if not k.static) - self.config.max_passive
        if extra <= 0:
            return
        droppable = [a for a, k in self._passive.items() if not k.static and a not in self._dialing]
        for addr in self.rng.sample(droppable, min(extra, len(droppable))):
            del self._passive[addr]

    def _jitter(self, interval: float) -> float:
        return interval * self.rng.uniform(0.5, 1.5)
