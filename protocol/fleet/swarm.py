"""Swarming one release between neighbours: who offers what, what to ask whom.

Theory of operation
-------------------
One ``ReleaseSwarm`` per release a node fetches or serves. It sees only the
node's links (the partial view, protocol/fleet/view.py), so everything it keeps is
per neighbour -- O(view size x blobs/8) bytes, whatever the site's size.
Blobs are numbered in digest order and sets of them are bitfields
(protocol/fleet/bitfield.py), the same ones ``HaveBits`` carries.

Knowledge runs ahead of data: a node starts a swarm as soon as it verified
the manifest (it may hold none of the blobs yet), and tells every
swarm-capable neighbour what it offers -- an empty ``HaveBits`` still says
"I am fetching this". From then on each side keeps the other told of new
blobs, in batches (``have_interval``). A neighbour's offers are what we may
ask it for; anything it offers is fair game, complete holder or not.

Asking (``next_requests``): for each neighbour with a free slot, the rarest
blob it offers that we still want and nobody is fetching for us -- rarity
counted over our neighbours' offers, ties broken from a random point -- so
different nodes start from different blobs and scarce blobs spread first. A
neighbour gets at most ``per_source`` requests in flight, and all
neighbours together at most ``max_in_flight`` -- but while one neighbour is
the only one offering anything we lack, it alone bounds the pipeline:
``sole_source`` requests and ``sole_bytes`` in flight, deep enough that a
single fast link stays full while the answers before are hash-checked. And a neighbour
with nothing of ours in flight always gets one request, so none sits idle
(a first holder least of all) while our other requests wait in busier
neighbours' queues. Short queues everywhere, so a blob is asked of the
neighbour that can send it now and never sits queued behind others at a
busy node while another neighbour has it idle. When every blob still wanted
is in flight and few remain (``endgame_blobs``), an idle neighbour that
offers one is asked for it too (BitTorrent's end game). A request
not answered in ``request_timeout`` is re-planned to another holder (the
slot stays taken until the peer answers: it still counts the request); a
slow peer's cap halves per timeout. ``ChunkMissing`` steers elsewhere (that
peer is asked again for what it had offered after ``lack_seconds``); bad
data (``ok=False``) is punished by the caller (ban) and re-planned.

An answer ends its request twice: when its bytes arrive (``on_arrived``:
the slot is free, so the wire never waits for the hash check; the blob is
*landing* and asked of nobody) and when they were checked and stored
(``on_blobs``, or ``on_blob(ok=False)``, which puts it back in the pool).
What is landing is the caller's to bound (it holds those bytes).

Offering: a node offers every blob it holds, except the *first holder* of a
release (``first_holder``: it got the release from a bundle, not from
peers), which super-seeds in the spirit of BitTorrent's BEP 16: it offers
each interested neighbour only a few blobs at a time, first blobs it has
offered to nobody yet, and offers the next only when the neighbour got one
(from it or anyone). Each blob thus leaves the first holder about once; its
neighbours relay to theirs. The few offers per neighbour
(``seed_pipeline`` spread over the interested neighbours, at least
``seed_offers``) keep its uplink busy: the next goes out as soon as one was
served, not batched like other offers (held back for ``have_interval``, they
capped a first holder at ``seed_pipeline`` blobs per interval: 200 MiB to
one neighbour took 4.3 s instead of 0.8 s). A first holder with a single
neighbour offers it everything at once: nobody could relay to it, and it
takes the whole release from us anyway. When every blob has been offered
once, a neighbour that made no progress for ``starve_after`` seconds is
offered the blobs rarest among the first holder's neighbours, so nothing
can stall on it.

Peers of older versions: one that speaks "have" gets and sends ``Have``
digest lists instead of bitfields (``Source.HAVE``), one that speaks neither
is taken to hold all of a release it announced (``Source.ANNOUNCE``). Neither
is super-seeded.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from p2pupd.protocol.fleet.bitfield import BlobIndex, iter_bits, pick_bit

P = TypeVar("P", bound=Hashable)


class Source(enum.Enum):
    SWARM = "swarm"  # HaveBits both ways
    HAVE = "have"  # an older peer: Have digest lists
    ANNOUNCE = "announce"  # an older peer without Have: holds all it announced


@dataclass(frozen=True)
class SwarmConfig:
    per_source: int = 2
    unique_bonus: int = 2  # more in flight to a peer that alone offers some blob
    # A sole source's window covers the wire's round trip only (answers free
    # their slots when they arrive, see on_arrived): measured on loopback,
    # 32 requests / 4 MiB left one peer at 0.83-0.87 s for 200 MiB, 128 /
    # 12 MiB at 0.66-0.78 s (tools/bench/transfer_bench.py).
    sole_source: int = 128
    sole_bytes: int = 12 * 1024 * 1024  # and at most this much in flight from it
    max_in_flight: int = 8
    request_timeout: float = 30.0
    have_interval: float = 0.05
    seed_offers: int = 2
    seed_pipeline: int = 32
    starve_after: float = 2.0
    endgame_blobs: int = 8  # when this few remain (all in flight), ask idle holders too
    # How long a ChunkMissing stands: then what the peer had offered is asked
    # of it again. Its store may have failed a read, or the blob was between
    # its spool and its store; for good, a fetch whose only holder once said
    # "missing" waited until the link broke.
    lack_seconds: float = 60.0

    def for_rate(self, rate: float | None) -> SwarmConfig:
        """These rules for a node whose download is capped at ``rate`` bytes/s:
        a sole source's window is at most what the cap lets through in a
        quarter of ``request_timeout``, so a deep window never times itself out."""
        if not rate:
            return self
        drain = int(rate * self.request_timeout / 4)
        return replace(self, sole_bytes=min(self.sole_bytes, max(drain, 1)))


@dataclass(frozen=True)
class Fetch(Generic[P]):
    """Ask ``peer`` for these blobs (indices), in this order."""

    peer: P
    blobs: tuple[int, ...]


@dataclass(frozen=True)
class Offer(Generic[P]):
    """Tell ``peer`` we (also) offer ``bits``; ``complete``: we hold the whole release.

    The first Offer to a peer may be empty: "I am in on this release".
    """

    peer: P
    bits: int
    complete: bool


@dataclass(frozen=True)
class Punish(Generic[P]):
    """``peer`` sent bad data: ban it (the swarm already stopped using it)."""

    peer: P
    reason: str


Action = Fetch[P] | Offer[P] | Punish[P]


@dataclass
class _Peer:
    source: Source
    offers: int = 0  # what it offers us
    lacks: int = 0  # said ChunkMissing for these
    lacks_at: float = 0.0  # the first of them: all are forgiven lack_seconds after it
    withdrawn: int = 0  # of those, what it had offered: offered again when they expire
    told: int = 0  # what we offered it
    told_any: bool = False
    heard: bool = False  # it said something about this release
    interested: bool = False  # it is fetching this release (it told us so)
    got: int = 0  # blobs we served it
    slots: dict[int, float] = field(default_factory=dict)  # blob -> deadline
    penalty: float = 0.0
    banned: bool = False
    progress_at: float = 0.0  # when it last got a blob (first holder's view)
    starved: bool = False  # no progress for starve_after: offer it more


class ReleaseSwarm(Generic[P]):
    """One release on one node; see the module docstring."""

    def __init__(
        self,
        sizes: Mapping[bytes, int],
        rng: random.Random,
        *,
        held: Iterable[bytes] = (),
        wanted: Iterable[bytes] | None = None,
        first_holder: bool = False,
        config: SwarmConfig | None = None,
    ) -> None:
        self.index = BlobIndex(sizes)
        self.config = config or SwarmConfig()
        self._rng = rng
        n = self.index.count
        self.held = self.index.bits_of(held)
        want = self.index.all if wanted is None else self.index.bits_of(wanted)
        self.wanted = want & ~self.held  # still to fetch
        self._wanted_at_start = self.wanted
        self.first_holder = first_holder
        self._peers: dict[P, _Peer] = {}
        self._avail = [0] * n  # neighbours offering each blob
        self._buckets: list[int] = [self.wanted]  # by availability: wanted, not in flight
        self._active: dict[int, P] = {}  # blob -> peer of its live request (deadline order)
        self._active_bytes = 0  # their sizes (kept, not summed: asked at every turn)
        self._landing: dict[int, P] = {}  # blob -> peer whose bytes are being checked
        self._doubled: set[int] = set()  # blobs also asked of a second peer (end game)
        self._unoffered = self.index.all  # first holder: offered to nobody yet
        self._next_flush: float | None = None
        self._lacks_due = math.inf  # the first ChunkMissing to expire
        # Peers with something new to be told, in the order they became so (a
        # dict, not a set: the same events give the same actions in the same order).
        self._dirty: dict[P, None] = {}
        self.uploads = 0  # blobs served
        self.bytes_done = 0

    def want(self, wanted: Iterable[bytes], held: Iterable[bytes], now: float) -> None:
        """Plan afresh: these blobs are wanted, these held (a fetch restarted, e.g.
        after an import brought blobs). What neighbours offered and were told stays."""
        self.add_held(self.index.bits_of(held), now)
        self.wanted = self.index.bits_of(wanted) & ~self.held
        self._active.clear()
        self._active_bytes = 0
        self._landing.clear()
        self._buckets = [0]
        for blob in iter_bits(self.wanted):
            self._pool_add(blob)

    def seed(self, now: float) -> None:
        """Become the first holder (hold it all, got none of it from peers): super-seed."""
        if not self.first_holder:
            self.first_holder = True
            for p, state in self._peers.items():
                self._unoffered &= ~(state.offers | state.told)
                if state.interested:
                    self._mark(p, now)

    # ----- queries ------------------------------------------------------------

    @property
    def done(self) -> bool:
        return not self.wanted

    @property
    def complete(self) -> bool:
        return self.held == self.index.all

    @property
    def peers(self) -> list[P]:
        return list(self._peers)

    def offered_by(self, peer: P) -> int:
        state = self._peers.get(peer)
        return state.offers if state is not None else 0

    def in_flight(self, peer: P) -> int:
        state = self._peers.get(peer)
        return len(state.slots) if state is not None else 0

    def unavailable(self) -> int:
        """Wanted blobs no usable neighbour offers (a bitfield)."""
        offered = 0
        for state in self._peers.values():
            if not state.banned:
                offered |= state.offers
        return self.wanted & ~offered

    def next_deadline(self) -> float | None:
        times = []
        for blob, peer in self._active.items():  # the oldest live request
            times.append(self._peers[peer].slots[blob])
            break
        if self._dirty and self._next_flush is not None:
            times.append(self._next_flush)
        if self.first_holder and self.complete:
            waits = [s.progress_at for s in self._peers.values() if s.interested and not s.starved]
            if waits:
                times.append(min(waits) + self.config.starve_after)
        if self.wanted and self._lacks_due < math.inf:
            times.append(self._lacks_due)
        return min(times, default=None)

    # ----- neighbours -----------------------------------------------------------

    def peer_joined(self, peer: P, source: Source, now: float) -> list[Action[P]]:
        """A link came up: tell it what we offer (swarm and Have peers)."""
        if peer in self._peers:
            return []
        self._peers[peer] = _Peer(source, progress_at=now)
        if source is Source.ANNOUNCE:
            return []
        return self._tell(peer, now, first=True)

    def peer_left(self, peer: P) -> None:
        state = self._peers.pop(peer, None)
        if state is None:
            return
        self._dirty.pop(peer, None)
        self._forget_offers(state)
        self._requeue(peer)
        if self.first_holder:  # offers it never took go back to the pool
            self._unoffered |= state.told & ~state.got & ~state.offers

    def on_offer(
        self, peer: P, bits: int, now: float, *, interested: bool = True
    ) -> list[Action[P]]:
        """``peer`` offers ``bits`` (HaveBits, Have, or all for an announcer).

        ``interested``: it is fetching the release (a swarm peer that sends
        HaveBits is, until it offers every blob). Returns our answer if this
        was the first we heard from it.
        """
        state = self._peers.get(peer)
        if state is None or state.banned:
            return []
        bits &= self.index.all & ~state.lacks
        new = bits & ~state.offers
        if new:
            state.offers |= new
            state.progress_at = now
            state.starved = False
            self._add_offers(new)
        state.interested = interested and state.offers != self.index.all
        if not state.heard:
            # Its first word on this release. What we told it before may have
            # arrived while it did not know the release yet (and been dropped
            # as a mere hint): answer with our whole offer, once.
            state.heard = True
            return self._tell(peer, now, again=True)
        if self.first_holder and new:
            self._mark(peer, now, prompt=True)  # a super-seeded peer got something: offer more
        return []

    # ----- transfers -------------------------------------------------------------

    def next_requests(self, now: float) -> list[Fetch[P]]:
        """Blobs to ask for now (see the module docstring); expires timed-out requests."""
        if self._active:
            self._expire(now)
        if now >= self._lacks_due:
            self._forgive(now)
        cfg = self.config
        budget = cfg.max_in_flight - len(self._active)
        wanted = self.wanted
        if not wanted:
            return []
        pool = 0
        for bucket in self._buckets[1:]:
            pool |= bucket
        if not pool:
            return self._endgame(now)
        useful = [(p, s) for p, s in self._peers.items() if s.offers & wanted and not s.banned]
        sole = len(useful) == 1
        byte_room = math.inf
        if sole:
            # One neighbour: its own cap bounds it, in blobs and in bytes. A
            # deep pipeline keeps one fast link full while the answers before
            # are hash-checked; the bytes keep what a receiver holds small
            # when the blobs are large (patches).
            budget += max(cfg.sole_source - cfg.max_in_flight, 0)
            byte_room = cfg.sole_bytes - self._active_bytes
        only = self._buckets[1] if len(self._buckets) > 1 and not sole else 0  # one offers
        free = {}
        for p, state in useful:
            if sole:
                cap = cfg.sole_source
            else:
                cap = cfg.per_source + cfg.unique_bonus if state.offers & only else cfg.per_source
            room = (cap >> int(state.penalty) if state.penalty else cap) or 1
            room -= len(state.slots)
            if room > 0 and state.offers & pool:
                free[p] = room
        if not free:
            return []
        picked: dict[P, list[int]] = {}
        order = list(free)
        self._rng.shuffle(order)
        width = self.index.count
        # Blobs only one neighbour offers go first, outside the total budget
        # (its own cap bounds them): a first holder's uplink must never wait
        # because our other requests are slow.
        for p in order:
            state = self._peers[p]
            if not state.slots and (mine := state.offers & pool):
                # Every neighbour with something for us gets one request even
                # when the total is reached: none idles while our requests
                # wait in busier neighbours' queues (a first holder would).
                blob = self._rarest(mine, width)
                self._take(blob, p, now)
                picked.setdefault(p, []).append(blob)
                free[p] -= 1
                budget -= 1
                byte_room -= self.index.sizes[blob]
                pool &= ~(1 << blob)
        order = [p for p in order if free[p] > 0]
        if byte_room <= 0:
            budget = 0
        while order and budget > 0:
            still = []
            for p in order:
                state = self._peers[p]
                blob = self._rarest(state.offers, width)
                if blob < 0:
                    continue
                self._take(blob, p, now)
                picked.setdefault(p, []).append(blob)
                budget -= 1
                free[p] -= 1
                byte_room -= self.index.sizes[blob]
                if byte_room <= 0:
                    budget = 0
                if free[p] > 0:
                    still.append(p)
                if budget <= 0:
                    break
            order = still
        return [Fetch(p, tuple(blobs)) for p, blobs in picked.items()]

    def _endgame(self, now: float) -> list[Fetch[P]]:
        """Everything still wanted is in flight: ask an idle neighbour that offers one
        of the last few blobs for it too (once per blob); the first copy wins, the
        other is discarded when it comes (BitTorrent's end game)."""
        cfg = self.config
        if not self._active or len(self._active) > cfg.endgame_blobs:
            return []
        out: list[Fetch[P]] = []
        for p, state in self._peers.items():
            if state.slots or state.banned:
                continue
            for blob, holder in self._active.items():
                if holder != p and blob not in self._doubled and state.offers >> blob & 1:
                    self._doubled.add(blob)
                    state.slots[blob] = now + cfg.request_timeout
                    out.append(Fetch(p, (blob,)))
                    break
        return out

    def on_arrived(self, peer: P, blobs: Iterable[int]) -> None:
        """``peer``'s answers with these blobs' bytes came; they are being checked.

        Their requests are over (the peer's slots are free for the next ones),
        and the blobs are asked of nobody until ``on_blobs`` or ``on_blob``
        says how the check went.
        """
        state = self._peers.get(peer)
        for blob in blobs:
            if state is not None:
                state.slots.pop(blob, None)
            if not self.wanted >> blob & 1:
                continue  # held already: a late duplicate
            if self._active.get(blob) == peer:
                self._drop_active(blob)
            self._pool_remove(blob)  # re-planned after a timeout, not yet asked again
            self._landing[blob] = peer

    def on_blob(self, peer: P, blob: int, ok: bool, now: float) -> list[Action[P]]:
        """``peer`` sent ``blob``; ``ok``: it passed the hash check (and was stored)."""
        if ok:
            self.on_blobs(peer, (blob,), now)
            return []
        state = self._peers.get(peer)
        if state is not None:
            state.slots.pop(blob, None)
        if self._active.get(blob) == peer:
            self._drop_active(blob)
            self._pool_add(blob)
        elif self._landing.get(blob) == peer:
            del self._landing[blob]
            if blob not in self._active:  # nobody else is sending it
                self._pool_add(blob)
        if state is None:
            return []
        state.banned = True
        self._forget_offers(state)
        self._requeue(peer)
        return [Punish(peer, f"blob {self.index.digests[blob].hex()[:16]} failed its hash check")]

    def on_blobs(self, peer: P, blobs: Iterable[int], now: float) -> None:
        """``peer`` sent these blobs and each passed its hash check (and was stored):
        ``on_blob(..., ok=True)`` for each, with one update of what is held.

        Held means servable: they are offered to the neighbours next, and one
        that asks and hears "missing" never asks us for that blob again.
        """
        state = self._peers.get(peer)
        bits = 0
        for blob in blobs:
            if state is not None:
                state.slots.pop(blob, None)
            if self._active.get(blob) == peer:
                self._drop_active(blob)
            bits |= 1 << blob
        if state is not None and bits:
            state.penalty = max(0.0, state.penalty - 0.25 * bits.bit_count())
        self.add_held(bits, now)

    def on_missing(self, peer: P, blob: int, now: float) -> None:
        """``peer`` does not have ``blob`` after all: ask someone else, and it
        only once ``lack_seconds`` have passed (``_forgive``)."""
        state = self._peers.get(peer)
        if state is None:
            return
        state.slots.pop(blob, None)
        bit = 1 << blob
        if not state.lacks:
            state.lacks_at = now
            self._lacks_due = min(self._lacks_due, now + self.config.lack_seconds)
        state.lacks |= bit
        if state.offers & bit:
            state.offers &= ~bit
            state.withdrawn |= bit
            self._bump(blob, -1)
        state.penalty += 0.25
        if self._active.get(blob) == peer:
            self._drop_active(blob)
            self._pool_add(blob)

    def on_served(self, peer: P, blob: int, now: float) -> None:
        """We sent ``blob`` to ``peer`` (counts toward what it got from us)."""
        self.uploads += 1
        state = self._peers.get(peer)
        if state is not None:
            state.got |= 1 << blob
            if self.first_holder:
                state.progress_at = now
                state.starved = False
                self._mark(peer, now, prompt=True)

    def add_held(self, bits: int, now: float) -> None:
        """These blobs are now here and servable (fetched, imported, built)."""
        bits &= self.index.all & ~self.held
        if not bits:
            return
        self.held |= bits
        got = bits & self.wanted
        if got:
            self.wanted &= ~got
            self.bytes_done += self.index.size_of(got)
            for blob in iter_bits(got):
                self._pool_remove(blob)
                if blob in self._active:  # a late duplicate or another route
                    self._drop_active(blob)
                self._landing.pop(blob, None)
        for p, state in self._peers.items():  # tell those still fetching
            if state.interested and not state.banned and state.source is not Source.ANNOUNCE:
                self._mark(p, now)

    # ----- time -----------------------------------------------------------------

    def tick(self, now: float) -> list[Action[P]]:
        """Send the batched offers that are due; starving peers of a first holder."""
        out: list[Action[P]] = []
        if self.first_holder and self.complete:
            for p, state in self._peers.items():
                if (
                    state.interested
                    and not state.starved
                    and now - state.progress_at >= self.config.starve_after
                ):
                    state.starved = True
                    self._mark(p, now)
        if self._dirty and (self._next_flush is None or now >= self._next_flush):
            dirty, self._dirty = self._dirty, {}
            self._next_flush = None
            for p in dirty:
                out += self._tell(p, now)
        return out

    # ----- internals: offers -------------------------------------------------------

    def _mark(self, peer: P, now: float, prompt: bool = False) -> None:
        """``peer`` has something new to be told: at the next flush, or at once
        (``prompt``: a super-seeded neighbour's allowance has room again; held
        back for ``have_interval``, its few offers would cap what the first
        holder sends at ``seed_pipeline`` blobs per interval, all neighbours
        together)."""
        self._dirty[peer] = None
        if prompt:
            self._next_flush = now
        elif self._next_flush is None:
            self._next_flush = now + self.config.have_interval

    def _tell(
        self, peer: P, now: float, first: bool = False, again: bool = False
    ) -> list[Action[P]]:
        """Our offer to ``peer``: what is new to it; ``first``: even if empty (once);
        ``again``: all of it, even if told before or empty."""
        state = self._peers.get(peer)
        if state is None or state.banned or state.source is Source.ANNOUNCE:
            return []
        offer = self._offer_for(peer, state, now)
        new = offer & ~state.told
        if first and state.told_any:
            return []
        if not (new or first or again):
            return []
        state.told |= new
        state.told_any = True
        sent = state.told if again else new
        return [Offer(peer, sent, self.complete and state.told == self.index.all)]

    def _offer_for(self, peer: P, state: _Peer, now: float) -> int:
        if not (self.first_holder and self.complete) or state.source is not Source.SWARM:
            return self.held
        if not state.interested:
            return 0
        cfg = self.config
        # Spread over every neighbour that may soon ask, not only those that
        # already did: the first to ask must not be handed the whole release.
        sharing = sum(1 for s in self._peers.values() if s.source is Source.SWARM and not s.banned)
        if sharing <= 1:
            # Its only neighbour: nobody could relay to it, and it takes the
            # whole release from us anyway, so a few offers at a time would
            # only add a round trip of offer and request to its pipeline.
            # (With prompt offers alone, 200 MiB on loopback took 0.77-0.80 s,
            # with this 0.77 s: no gain beyond the noise, but no cost.)
            self._unoffered = 0
            return self.held
        allowance = max(cfg.seed_offers, -(-cfg.seed_pipeline // max(sharing, 1)))
        pending = state.told & ~state.got & ~state.offers
        room = allowance - pending.bit_count()
        lacking = self.index.all & ~state.offers & ~state.told
        extra = 0
        width = self.index.count
        scarce = -1  # blobs no neighbour offers yet, computed on first need
        while room > 0 and lacking:
            fresh = self._unoffered & lacking
            if fresh:
                blob = pick_bit(fresh, self._rng, width)
                self._unoffered &= ~(1 << blob)
            elif state.starved:
                # Every blob went out once, and this neighbour made no progress
                # for a while: unstick it with what the neighbours lack most.
                if scarce < 0:
                    held_around = 0
                    for other in self._peers.values():
                        held_around |= other.offers
                    scarce = self.index.all & ~held_around
                pick = lacking & scarce or lacking
                blob = pick_bit(pick, self._rng, width)
            else:
                break
            extra |= 1 << blob
            lacking &= ~(1 << blob)
            room -= 1
        return state.told | extra

    # ----- internals: requests -----------------------------------------------------

    def _rarest(self, offers: int, width: int) -> int:
        for bucket in self._buckets[1:]:
            mine = bucket & offers
            if mine:
                return pick_bit(mine, self._rng, width)
        return -1

    def _take(self, blob: int, peer: P, now: float) -> None:
        self._pool_remove(blob)  # the pool never holds a blob in flight
        self._active[blob] = peer
        self._active_bytes += self.index.sizes[blob]
        self._peers[peer].slots[blob] = now + self.config.request_timeout

    def _drop_active(self, blob: int) -> None:
        del self._active[blob]
        self._active_bytes -= self.index.sizes[blob]

    def _expire(self, now: float) -> None:
        late = []
        for blob, peer in self._active.items():
            if self._peers[peer].slots.get(blob, math.inf) > now:
                break  # in assignment order = deadline order
            late.append((blob, peer))
        for blob, peer in late:
            self._drop_active(blob)
            self._peers[peer].penalty += 1.0
            self._pool_add(blob)

    def _requeue(self, peer: P) -> None:
        for blob in [b for b, p in self._active.items() if p == peer]:
            self._drop_active(blob)
            self._pool_add(blob)

    def _forget_offers(self, state: _Peer) -> None:
        for blob in iter_bits(state.offers):
            self._bump(blob, -1)
        state.offers = 0

    def _forgive(self, now: float) -> None:
        """End the ChunkMissing answers older than ``lack_seconds``: what those
        peers had offered counts as offered again."""
        due = math.inf
        for state in self._peers.values():
            if not state.lacks:
                continue
            if now < state.lacks_at + self.config.lack_seconds:
                due = min(due, state.lacks_at + self.config.lack_seconds)
                continue
            back = state.withdrawn & ~state.offers
            state.lacks = state.withdrawn = 0
            if back and not state.banned:
                state.offers |= back
                self._add_offers(back)
        self._lacks_due = due

    def _add_offers(self, bits: int) -> None:
        for blob in iter_bits(bits):
            self._bump(blob, 1)

    def _bump(self, blob: int, delta: int) -> None:
        old = self._avail[blob]
        new = old + delta
        self._avail[blob] = new
        bit = 1 << blob
        buckets = self._buckets
        while len(buckets) <= max(old, new):
            buckets.append(0)
        if buckets[old] & bit:
            buckets[old] &= ~bit
            buckets[new] |= bit

    def _pool_add(self, blob: int) -> None:
        bit = 1 << blob
        if self.wanted & bit:
            count = self._avail[blob]
            while len(self._buckets) <= count:
                self._buckets.append(0)
            self._buckets[count] |= bit

    def _pool_remove(self, blob: int) -> None:
        self._buckets[self._avail[blob]] &= ~(1 << blob)
