"""Anti-entropy gossip of verified manifests: ``now`` and events in, actions out.

Theory of operation
-------------------
Each node holds, per component, the highest manifest serial it has *verified*
(``holdings``: component -> (serial, manifest digest)) and tells peers about it
with ``Announce``. A ``Gossip`` object keeps the last Announce of every
connected peer and turns events into actions for the daemon to carry out:

* ``SendAnnounce(peer)``: to a random fan-out of peers every
  ``announce_interval`` (jittered by the injected ``random.Random`` so nodes
  do not fall into lock-step), to a peer that just joined, to peers an Announce
  shows are behind us, and to peers behind on a component we just verified.
* ``RequestManifest(peer, component, serial, digest)``: when a peer announces a
  higher serial than ours for a component we track. Only the highest serial on
  offer is fetched, from one randomly chosen announcer, and a (component,
  serial) is never pending with two peers at once. When a request times out
  (``tick``) or the peer says it lacks the manifest, that peer is skipped for
  that serial for ``retry_after`` seconds and another announcer is tried.
* ``Ban(peer, until, reason)``: when the caller reports that a peer's manifest
  failed verification. The peer's claims are forgotten and it is ignored until
  the ban ends.

Trust rule: an announced serial is only a *hint* about where to look.
``holdings`` change only in ``on_manifest_verified``, which the caller invokes
after the manifest passed signature, threshold and rollback checks, so a node
never holds, or announces onward, what it has not verified itself.

Platform variants (protocol/fleet/variants.py): with ``variants`` rules, a
key ``component@platform`` another platform's variant of a tracked component
is gossiped like a component of its own, with one more rule: it is asked
for only at the serial this node holds of the component itself (it carries
variants of the release it holds, never of one it does not), and dropped
from the holdings when the node's own release moves on. ``announcement``
lists only the node's own releases (what an older peer may hear);
``carrying`` the variants it carries.

Peers are any hashable ids the caller chooses (node ids, addresses).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from p2pupd.protocol.fleet.variants import SEP, VariantRules
from p2pupd.protocol.wire import Announce

P = TypeVar("P", bound=Hashable)


@dataclass(frozen=True)
class SendAnnounce(Generic[P]):
    """Send ``Gossip.announcement()`` to ``peer``."""

    peer: P


@dataclass(frozen=True)
class RequestManifest(Generic[P]):
    """Ask ``peer`` for this manifest; ``manifest_digest`` is the peer's unverified claim
    (empty when the peer only hinted at the release: see ``Gossip.on_hint``)."""

    peer: P
    component: str
    serial: int
    manifest_digest: bytes


@dataclass(frozen=True)
class Ban(Generic[P]):
    """Disconnect ``peer`` and refuse it until ``until`` (caller's clock)."""

    peer: P
    until: float
    reason: str


Action = SendAnnounce[P] | RequestManifest[P] | Ban[P]


@dataclass
class _Pending(Generic[P]):
    peer: P
    deadline: float


class Gossip(Generic[P]):
    """Gossip state of one node; see the module docstring."""

    def __init__(
        self,
        rng: random.Random,
        *,
        holdings: Mapping[str, tuple[int, bytes]] | None = None,
        tracked: Iterable[str] = (),
        fanout: int = 3,
        announce_interval: float = 30.0,
        request_timeout: float = 15.0,
        retry_after: float = 60.0,
        ban_seconds: float = 3600.0,
        variants: VariantRules | None = None,
    ) -> None:
        self._rng = rng
        self._variants = variants
        self._holdings: dict[str, tuple[int, bytes]] = dict(holdings or {})
        self._tracked = {k for k in (*tracked, *self._holdings) if SEP not in k}
        self._fanout = fanout
        self._interval = announce_interval
        self._timeout = request_timeout
        self._retry_after = retry_after
        self._ban_seconds = ban_seconds
        self._peers: dict[P, dict[str, tuple[int, bytes]]] = {}  # last Announce of each
        self._banned: dict[P, float] = {}
        self._pending: dict[tuple[str, int], _Pending[P]] = {}
        self._skip: dict[tuple[P, str, int], float] = {}  # failed attempt -> retry time
        self._generation = 0  # bumped when holdings change
        self._told: dict[P, int] = {}  # generation last announced to each peer
        self._next_announce: float | None = None

    # ----- queries --------------------------------------------------------

    @property
    def holdings(self) -> dict[str, tuple[int, bytes]]:
        """A copy of what this node has verified: component -> (serial, digest)."""
        return dict(self._holdings)

    @property
    def peers(self) -> list[P]:
        """Connected, not banned peers."""
        return list(self._peers)

    @property
    def pending(self) -> dict[tuple[str, int], P]:
        """Manifest requests in flight: (component, serial) -> peer."""
        return {key: p.peer for key, p in self._pending.items()}

    def announcement(self) -> Announce:
        """Return the Announce message describing our own verified holdings (without
        the variants we carry: see ``carrying``)."""
        return Announce.from_holdings({k: v for k, v in self._holdings.items() if SEP not in k})

    @property
    def carrying(self) -> dict[str, tuple[int, bytes]]:
        """The other platforms' variants we hold: key -> (serial, digest)."""
        return {k: v for k, v in self._holdings.items() if SEP in k}

    def is_banned(self, peer: P, now: float) -> bool:
        """True while ``peer`` is banned."""
        return self._banned.get(peer, -math.inf) > now

    def next_deadline(self) -> float | None:
        """Return the earliest time ``tick`` has work to do, or None."""
        times = [p.deadline for p in self._pending.values()]
        times += [*self._skip.values(), *self._banned.values()]
        if self._next_announce is not None and self._peers:
            times.append(self._next_announce)
        return min(times, default=None)

    # ----- events ---------------------------------------------------------

    def track(self, component: str, now: float) -> list[Action[P]]:
        """Start caring about ``component``; returns requests for it if peers offer it."""
        self._tracked.add(component)
        return self._plan(component, now)

    def peer_joined(self, peer: P, now: float) -> list[Action[P]]:
        """A connection finished its handshake. Returns our Announce to it, or a Ban."""
        if self.is_banned(peer, now):
            return [Ban(peer, self._banned[peer], "peer is banned")]
        self._peers.setdefault(peer, {})
        return [self._announce_to(peer)]

    def peer_left(self, peer: P, now: float) -> list[Action[P]]:
        """Forget ``peer``; returns requests re-sent elsewhere for what it owed us."""
        self._peers.pop(peer, None)
        self._told.pop(peer, None)
        return self._drop_pending_of(peer, now)

    def on_announce(
        self, peer: P, entries: Iterable[tuple[str, int, bytes]], now: float
    ) -> list[Action[P]]:
        """Record a peer's Announce; returns manifest requests and announces."""
        if self.is_banned(peer, now):
            return []
        announced = {c: (serial, digest) for c, serial, digest in entries}
        self._peers[peer] = announced
        actions: list[Action[P]] = []
        # Push-pull: a peer that is behind us hears from us at once, but only
        # once per change of our holdings, so two nodes cannot ping-pong.
        behind = any(announced.get(c, (0, b""))[0] < s for c, (s, _) in self._holdings.items())
        if behind and self._told.get(peer) != self._generation:
            actions.append(self._announce_to(peer))
        for key in sorted(k for k in announced if self._wants(k)):
            actions += self._plan(key, now)
        return actions

    def on_hint(self, peer: P, component: str, serial: int, now: float) -> list[Action[P]]:
        """``peer`` showed it knows (component, serial) without announcing it (a ``Have``
        or ``HaveBits`` for a release we do not know): take it as an announcement
        with an unknown digest, so the manifest is asked for at once.

        Returns manifest requests, like ``on_announce``.
        """
        if self.is_banned(peer, now) or not self._wants(component):
            return []
        announced = self._peers.setdefault(peer, {})
        if announced.get(component, (0, b""))[0] >= serial:
            return []
        announced[component] = (serial, b"")
        return self._plan(component, now)

    def on_manifest_verified(
        self, component: str, serial: int, digest: bytes, now: float
    ) -> list[Action[P]]:
        """The caller verified this manifest and stored it: hold it and spread it.

        Returns announces to peers that are behind and any further requests.
        An older serial than the one held changes nothing (rollback protection
        is the verifier's job; this only keeps the highest).
        """
        own = SEP not in component
        if own:
            self._tracked.add(component)
        for key in [k for k in self._pending if k[0] == component and k[1] <= serial]:
            del self._pending[key]
        actions: list[Action[P]] = []
        if serial > self._holdings.get(component, (0, b""))[0]:
            self._holdings[component] = (serial, digest)
            if own:  # variants carried of an older release of ours are no longer news
                prefix = component + SEP
                stale = [k for k, (s, _) in self._holdings.items() if k.startswith(prefix)]
                for variant in stale:
                    if self._holdings[variant][0] < serial:
                        del self._holdings[variant]
            self._generation += 1
            behind = [
                p for p, ann in self._peers.items() if ann.get(component, (0, b""))[0] < serial
            ]
            # Every peer behind hears of it now (the module doc's rule), not a
            # fan-out sample: the others would wait until the first ones finished.
            actions += [self._announce_to(p) for p in behind]
        actions += self._plan(component, now)
        if own:  # the variants of the release we now hold may be carried
            for variant in sorted(self._carried_on_offer(component)):
                actions += self._plan(variant, now)
        return actions

    def on_manifest_rejected(
        self, peer: P, component: str, serial: int, now: float, reason: str = ""
    ) -> list[Action[P]]:
        """The manifest ``peer`` sent failed verification.

        Returns ``Ban(peer, ...)`` first, then requests to other peers.
        """
        until = now + self._ban_seconds
        self._banned[peer] = until
        self._peers.pop(peer, None)
        self._told.pop(peer, None)
        why = reason or f"manifest {component} #{serial} failed verification"
        actions: list[Action[P]] = [Ban(peer, until, why)]
        return actions + self._drop_pending_of(peer, now, also=component)

    def on_manifest_unavailable(
        self, peer: P, component: str, serial: int, now: float, retry_after: float | None = None
    ) -> list[Action[P]]:
        """``peer`` answered ManifestMissing, or sent a valid manifest this node does not
        take (another platform's, say: no fault, so no ban); it is not asked for
        that serial again for ``retry_after`` seconds (default: the configured
        retry). Returns a request to another peer."""
        wait = self._retry_after if retry_after is None else retry_after
        self._skip[(peer, component, serial)] = now + wait
        pending = self._pending.get((component, serial))
        if pending is not None and pending.peer == peer:
            del self._pending[(component, serial)]
        return self._plan(component, now)

    def tick(self, now: float) -> list[Action[P]]:
        """Expire timeouts and bans, announce periodically; returns the actions due."""
        for peer in [p for p, until in self._banned.items() if until <= now]:
            del self._banned[peer]
        for key in [k for k, until in self._skip.items() if until <= now]:
            del self._skip[key]
        actions: list[Action[P]] = []
        for (component, serial), pending in list(self._pending.items()):
            if pending.deadline <= now:
                del self._pending[(component, serial)]
                self._skip[(pending.peer, component, serial)] = now + self._retry_after
        if self._next_announce is None or now >= self._next_announce:
            actions += [self._announce_to(p) for p in self._sample(list(self._peers))]
            self._next_announce = now + self._interval * self._rng.uniform(0.5, 1.5)
        for name in sorted(self._tracked | self._carried_on_offer()):
            actions += self._plan(name, now)
        return actions

    # ----- internals ------------------------------------------------------

    def _announce_to(self, peer: P) -> SendAnnounce[P]:
        self._told[peer] = self._generation
        return SendAnnounce(peer)

    def _sample(self, peers: list[P]) -> list[P]:
        return self._rng.sample(peers, min(self._fanout, len(peers)))

    def _drop_pending_of(self, peer: P, now: float, also: str | None = None) -> list[Action[P]]:
        components = {also} if also is not None else set()
        for key in [k for k, p in self._pending.items() if p.peer == peer]:
            del self._pending[key]
            components.add(key[0])
        actions: list[Action[P]] = []
        for component in sorted(components):
            actions += self._plan(component, now)
        return actions

    def _wants(self, key: str) -> bool:
        """A component we track, or another platform's variant of one (to carry)."""
        if key in self._tracked:
            return True
        found = self._variants.carried(key) if self._variants is not None else None
        return found is not None and found[0] in self._tracked

    def _carried_on_offer(self, component: str | None = None) -> set[str]:
        """Keys of variants to carry that peers announce (of ``component``, or any)."""
        out = set()
        for announced in self._peers.values():
            for key in announced:
                if SEP in key and (component is None or key.startswith(component + SEP)):
                    out.add(key)
        return {k for k in out if self._wants(k)}

    def _may_carry(self, key: str) -> Callable[[int], bool] | None:
        """For another platform's variant: which serials of it we may carry (the
        rules' ``carry_serial``); None for our own keys."""
        found = self._variants.carried(key) if self._variants is not None else None
        if found is None or self._variants is None:
            return None
        rules, prefix = self._variants, found[0] + SEP
        held = self._holdings.get(found[0], (0, b""))[0]
        busy = set(self._holdings) | {k for k, _ in self._pending}  # held or being fetched
        carried_now = sum(1 for k in busy if k.startswith(prefix) and k != key)
        already = key in self._holdings
        return lambda serial: rules.carry_serial(serial, held, carried_now, already)

    def _plan(self, component: str, now: float) -> list[Action[P]]:
        """Request the highest serial on offer above what we hold and what is pending
        (for a carried variant: the serial we hold of its component, if on offer)."""
        if not self._wants(component):
            return []
        may_carry = self._may_carry(component)
        floor = max(
            [self._holdings.get(component, (0, b""))[0]]
            + [serial for c, serial in self._pending if c == component]
        )
        offers: dict[int, list[P]] = {}
        for peer, announced in self._peers.items():
            serial = announced.get(component, (0, b""))[0]
            if may_carry is not None and not may_carry(serial):
                continue
            if serial > floor and self._skip.get((peer, component, serial), -math.inf) <= now:
                offers.setdefault(serial, []).append(peer)
        if not offers:
            return []
        serial = max(offers)
        peer = self._rng.choice(offers[serial])
        self._pending[(component, serial)] = _Pending(peer, now + self._timeout)
        return [RequestManifest(peer, component, serial, self._peers[peer][component][1])]
