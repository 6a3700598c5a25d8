"""Which chunk to ask which peer for: a pure fetch planner (``now`` in, requests out).

Theory of operation
-------------------
The planner is given the chunks a release still needs (digest -> size) and
learns who holds what: ``peer_has(peer, digests)`` for explicit have-sets, or
``peer_has_all(peer)`` for a peer that announced the manifest (a node only
announces what it holds completely). ``next_requests(now)`` returns
(peer, digest) pairs for the caller to send as ChunkRequests, and the caller
reports every answer with ``on_chunk_received`` (``ok`` = the data passed the
hash check) or ``on_chunk_missing``.

* Rarest first: waiting chunks are taken in order of how few usable peers hold
  them (ties broken by a per-chunk random key from the injected ``Random``),
  so scarce chunks are fetched while their holders are still around and
  different nodes pull different chunks from the same source.
* A slot is the planner's mirror of a ``Session`` request: it is taken when a
  pair is returned and freed only when that peer answers or is removed --
  never on timeout, because the peer still counts the request against its
  cap. A peer has at most ``per_peer_cap`` slots (or what the optional
  ``peer_cap(peer)`` says: peers differ in how much they take in flight),
  fewer while penalised.
* A request past ``request_timeout`` is reassigned to another holder (its slot
  stays taken), and the slow peer is penalised: more timeouts shrink its
  share; answers earn the penalty back. ChunkMissing means "does not hold it":
  that peer is never asked for that chunk again (unless it says it has it).
* Bad data (``ok=False``) bans the peer for ``ban_seconds``; everything it was
  assigned goes back to the queue at once.

Cost: the rarest-first order is rebuilt only when who-holds-what changes
(join, leave, ban, ChunkMissing, a Have or Announce that says something
new); ``next_requests`` then walks that order from a cursor that skips
finished work and stops as soon as every peer is busy.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from p2pupd.protocol import limits

P = TypeVar("P", bound=Hashable)

TIMEOUT_PENALTY = 1.0
MISSING_PENALTY = 0.25
SUCCESS_CREDIT = 0.25


@dataclass
class _Peer:
    has: set[bytes] = field(default_factory=set)
    has_all: bool = False
    lacks: set[bytes] = field(default_factory=set)  # said ChunkMissing
    slots: dict[bytes, float] = field(default_factory=dict)  # digest -> deadline
    penalty: float = 0.0
    banned_until: float = -math.inf

    def holds(self, digest: bytes) -> bool:
        return (self.has_all or digest in self.has) and digest not in self.lacks


class FetchPlanner(Generic[P]):
    """Plans chunk requests for one release; see the module docstring."""

    def __init__(
        self,
        needed: Mapping[bytes, int],
        rng: random.Random,
        *,
        per_peer_cap: int = limits.MAX_IN_FLIGHT_PER_PEER,
        request_timeout: float = 30.0,
        ban_seconds: float = 600.0,
        peer_cap: Callable[[P], int] | None = None,
    ) -> None:
        self._size = dict(needed)
        self._total = sum(self._size.values())
        self._cap = per_peer_cap
        self._peer_cap = peer_cap
        self._timeout = request_timeout
        self._ban_seconds = ban_seconds
        self._key = {d: rng.random() for d in sorted(self._size)}  # tie-break, reproducible
        self._by_key = sorted(self._key, key=self._key.__getitem__)
        self._rng = rng
        self._peers: dict[P, _Peer] = {}
        self._done: set[bytes] = set()
        self._bytes_done = 0
        self._active: dict[bytes, P] = {}  # digest -> peer with the live (not timed-out) slot
        self._order: list[bytes] | None = None  # rarest first; None = rebuild
        self._cursor = 0  # _order[:_cursor] is all done or active
        self._banned_now: set[P] = set()

    # ----- what peers hold -------------------------------------------------

    def peer_has(self, peer: P, digests: Iterable[bytes]) -> None:
        """Record that ``peer`` holds ``digests`` (others than needed are ignored)."""
        state = self._peers.get(peer)
        if state is None:
            state = self._peers[peer] = _Peer()
            self._order = None
        wanted = {d for d in digests if d in self._size}
        if any(not state.holds(d) for d in wanted):  # else the order stands: no rebuild
            self._order = None
        state.has |= wanted
        state.lacks -= wanted

    def peer_has_all(self, peer: P) -> None:
        """Record that ``peer`` holds every needed chunk (it announced the manifest)."""
        state = self._peers.setdefault(peer, _Peer())
        if not state.has_all:  # peers repeat themselves (Announce, Have): no rebuild then
            state.has_all = True
            self._order = None

    def remove_peer(self, peer: P) -> None:
        """Forget ``peer`` (disconnected): its slots are freed, its work requeued."""
        state = self._peers.pop(peer, None)
        if state is not None:
            self._release(peer)
            self._order = None

    def ban(self, peer: P, until: float) -> None:
        """Use ``peer`` for nothing before ``until``; its assigned chunks are requeued."""
        state = self._peers.setdefault(peer, _Peer())
        state.banned_until = max(state.banned_until, until)
        self._release(peer)
        self._order = None

    def is_banned(self, peer: P, now: float) -> bool:
        """True while ``peer`` is banned."""
        state = self._peers.get(peer)
        return state is not None and state.banned_until > now

    # ----- answers -----------------------------------------------------------

    def on_chunk_received(self, peer: P, digest: bytes, ok: bool, now: float) -> None:
        """``peer`` sent ``digest``; ``ok`` says whether it passed the hash check.

        A good chunk is done, even if it came late or from another peer than
        the one now assigned. A bad one bans the peer for ``ban_seconds``.
        """
        # A good chunk becomes done, so the cursor need not go back for it;
        # rescanning the order from the start on every answer is O(n^2).
        state = self._free_slot(peer, digest, requeue=not ok)
        if not ok:
            self.ban(peer, now + self._ban_seconds)
            return
        if state is not None:
            state.penalty = max(0.0, state.penalty - SUCCESS_CREDIT)
        if digest in self._size and digest not in self._done:
            self._done.add(digest)
            self._bytes_done += self._size[digest]
            # Another peer may hold a reassigned request: its slot stays taken
            # until it answers, but the chunk is no longer waited for.
            self._active.pop(digest, None)

    def on_chunk_missing(self, peer: P, digest: bytes, now: float) -> None:
        """``peer`` says it lacks ``digest``: ask someone else, never it again."""
        state = self._free_slot(peer, digest)
        if state is not None:
            state.lacks.add(digest)
            state.has.discard(digest)
            state.penalty += MISSING_PENALTY
            self._order = None

    # ----- planning ----------------------------------------------------------

    def next_requests(self, now: float) -> list[tuple[P, bytes]]:
        """Return new (peer, digest) assignments, rarest chunks first.

        Expires timed-out assignments (penalising their peers) and lifts
        ended bans first. Each returned pair takes one slot of that peer.
        ``now`` must not go back between calls (a monotonic clock).
        """
        self._expire(now)
        usable = {p: s for p, s in self._peers.items() if s.banned_until <= now}
        free = {p: self._capacity(p, s) - len(s.slots) for p, s in usable.items()}
        if sum(max(0, n) for n in free.values()) <= 0:
            return []
        order = self._rarest_first(usable)
        out: list[tuple[P, bytes]] = []
        advancing = True  # the cursor moves while everything before it is settled
        for index in range(self._cursor, len(order)):
            digest = order[index]
            if digest not in self._done and digest not in self._active:
                holders = [
                    p
                    for p, s in usable.items()
                    if free[p] > 0 and digest not in s.slots and s.holds(digest)
                ]
                if not holders:
                    advancing = False
                    continue
                peer = min(holders, key=lambda p: (usable[p].penalty, -free[p], self._rng.random()))
                usable[peer].slots[digest] = now + self._timeout
                self._active[digest] = peer
                free[peer] -= 1
                out.append((peer, digest))
            if advancing:
                self._cursor = index + 1
            if not any(n > 0 for n in free.values()):
                break
        return out

    def _expire(self, now: float) -> None:
        banned = {p for p, s in self._peers.items() if s.banned_until > now}
        if banned != self._banned_now:  # a ban began or ended: availability changed
            self._banned_now = banned
            self._order = None
        # _active is in assignment order, which is deadline order (one timeout,
        # ``now`` never goes back): only its expired head needs looking at.
        for digest, peer in list(self._active.items()):
            state = self._peers[peer]
            if state.slots[digest] > now:
                break
            del self._active[digest]  # requeue; the slot waits for the answer
            state.penalty += TIMEOUT_PENALTY
            self._cursor = 0

    def _rarest_first(self, usable: Mapping[P, _Peer]) -> list[bytes]:
        if self._order is None:
            count = dict.fromkeys(self._size.keys() - self._done, 0)
            for state in usable.values():
                held = count.keys() if state.has_all else state.has & count.keys()
                for digest in held - state.lacks:
                    count[digest] += 1
            # By count, ties by the random key: a stable sort of the key order
            # (C-level keys: this runs for thousands of chunks at a time).
            available = [d for d in self._by_key if count.get(d, 0) > 0]
            self._order = sorted(available, key=count.__getitem__)
            self._cursor = 0
        return self._order

    def _capacity(self, peer: P, state: _Peer) -> int:
        # Each whole penalty point halves a peer's share, never below one.
        cap = self._cap if self._peer_cap is None else self._peer_cap(peer)
        return max(1, cap >> min(int(state.penalty), 16))

    def _free_slot(self, peer: P, digest: bytes, requeue: bool = True) -> _Peer | None:
        state = self._peers.get(peer)
        if state is not None:
            state.slots.pop(digest, None)
        if self._active.get(digest) == peer:
            del self._active[digest]
            if requeue:
                self._cursor = 0
        return state

    def _release(self, peer: P) -> None:
        for digest in [d for d, p in self._active.items() if p == peer]:
            del self._active[digest]
        self._cursor = 0

    # ----- progress ----------------------------------------------------------

    @property
    def done(self) -> bool:
        """True when every needed chunk was received and verified."""
        return len(self._done) == len(self._size)

    @property
    def progress(self) -> float:
        """Fraction of needed bytes received, 0.0 to 1.0 (1.0 if nothing is needed)."""
        return self._bytes_done / self._total if self._total else 1.0

    @property
    def bytes_done(self) -> int:
        """Bytes of needed chunks received and verified."""
        return self._bytes_done

    def in_flight(self, peer: P) -> int:
        """Slots ``peer`` holds (live and timed-out requests awaiting an answer)."""
        state = self._peers.get(peer)
        return len(state.slots) if state is not None else 0

    def assigned_to(self, digest: bytes) -> P | None:
        """The peer with the live assignment for ``digest``, if any."""
        return self._active.get(digest)

    def unavailable(self, now: float) -> set[bytes]:
        """Needed chunks that no usable peer is known to hold."""
        usable = [s for s in self._peers.values() if s.banned_until <= now]
        return {d for d in self._size.keys() - self._done if not any(s.holds(d) for s in usable)}

    def next_deadline(self) -> float | None:
        """The earliest live assignment deadline (when to call ``next_requests``)."""
        for digest, peer in self._active.items():  # the oldest one (see _expire)
            return self._peers[peer].slots[digest]
        return None
