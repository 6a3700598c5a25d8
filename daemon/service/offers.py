"""Who offers which blobs: one ``ReleaseSwarm`` per release key, and the messages that feed it.

Theory of operation
-------------------
The pure ``protocol.fleet.swarm.ReleaseSwarm`` decides; this service keeps
one per release key -- a component's release being fetched, or once
complete the newest held one, which it goes on serving; and likewise for
each other platform's variant the node carries (key ``app@platform``,
protocol/fleet/variants.py), offered only to peers that speak "variants"
-- and carries its actions out:

* ``Offer``: ``HaveBits`` slices to a peer that speaks "swarm", a ``Have``
  digest list (or ``Have(complete)``) to an older peer that speaks "have";
* ``Punish``: ban the peer (it sent a blob that failed its hash check);
* ``Fetch`` actions are the fetch's (``FetchManager`` asks the swarm for
  them and sends the requests).

It routes what peers say to the right swarm: ``HaveBits`` and ``Have`` for
a release it knows; an ``Announce`` by an older peer without "have" counts
as an offer of everything. A Have of either kind for a release this node
does not know is returned as unknown, so the node service can let gossip
fetch its manifest (knowledge runs ahead of data). A swarm for a held
release is made on first need, so a node that restarts serves its releases
without building anything at start; from the manifest its start-up scan
read (``holding``), else from the stored one.

Each swarm's timers (batched offers, a first holder's starving neighbours)
run in ``serve``'s loop; the fetch is woken (``on_change``) whenever what
its swarm may ask for changes.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import trio

from p2pupd.daemon.errors import DaemonError
from p2pupd.daemon.net.transport import PeerConnection
from p2pupd.daemon.service.links import Links
from p2pupd.protocol.fleet import bitfield
from p2pupd.protocol.fleet.swarm import (
    Action,
    Fetch,
    Offer,
    Punish,
    ReleaseSwarm,
    Source,
    SwarmConfig,
)
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.wire import (
    FEATURE_HAVE,
    FEATURE_SWARM,
    MAX_HAVE_DIGESTS,
    Have,
    HaveBits,
)

MAX_TICK_SECONDS = 5.0


@dataclass
class Held:
    """A component's release as swarmed: its manifest, digest and swarm (once made)."""

    serial: int
    digest: bytes
    man: Manifest | None = None
    swarm: ReleaseSwarm[bytes] | None = None
    fetching: bool = False


def source_of(conn: PeerConnection) -> Source:
    """How a peer tells us what it offers, by the features it speaks."""
    if conn.session.supports(FEATURE_SWARM):
        return Source.SWARM
    if conn.session.supports(FEATURE_HAVE):
        return Source.HAVE
    return Source.ANNOUNCE


class Offers:
    """See the module docstring."""

    def __init__(
        self,
        links: Links,
        rng: random.Random,
        *,
        config: SwarmConfig,
        servable: Callable[[Manifest], list[bytes]],
        on_change: Callable[[str], None],
        manifest: Callable[[str, int], Manifest],
    ) -> None:
        """``servable(man)``: the blobs of ``man`` this node can serve now (blocking is
        fine: small releases' checks are stat calls); ``on_change(key)``: wake that
        release's fetch; ``manifest(key, serial)``: a stored release, ours or carried
        (raises ``DaemonError``)."""
        self._links = links
        self._manifest = manifest
        self._key_of = links.spelling.rules.key_of
        self._rng = rng
        self._config = config
        self._servable = servable
        self._on_change = on_change
        self.releases: dict[str, Held] = {}
        self._wake = trio.Event()

    # ----- which release per component ------------------------------------------

    def fetching(
        self, man: Manifest, digest: bytes, needed: dict[bytes, int], have: list[bytes]
    ) -> ReleaseSwarm[bytes]:
        """The swarm for fetching ``needed`` of ``man``: the component's swarm of that
        release if there is one (what peers offered and were told stays), else a new
        one replacing the component's."""
        key = self._key_of(man)
        held = self.releases.get(key)
        if held is not None and held.serial == man.serial and held.swarm is not None:
            held.man, held.fetching = man, True
            held.swarm.want(needed, have, trio.current_time())
            self._wake.set()
            return held.swarm
        swarm: ReleaseSwarm[bytes] = ReleaseSwarm(
            man.blob_sizes(), self._rng, held=have, wanted=needed, config=self._config
        )
        self.releases[key] = Held(man.serial, digest, man, swarm, fetching=True)
        self._introduce(key, swarm)
        return swarm

    def complete(self, man: Manifest, digest: bytes, first_holder: bool) -> None:
        """``man`` is held in full: serve it (super-seeding if we are its first holder)."""
        key = self._key_of(man)
        held = self.releases.get(key)
        if held is not None and held.serial > man.serial:
            return
        now = trio.current_time()
        swarm = held.swarm if held is not None and held.serial == man.serial else None
        if swarm is None:
            swarm = ReleaseSwarm(
                man.blob_sizes(), self._rng, held=self._servable(man), wanted=(),
                first_holder=first_holder, config=self._config,
            )  # fmt: skip
            self.releases[key] = Held(man.serial, digest, man, swarm)
            self._introduce(key, swarm)
        else:  # the fetch's own swarm goes on serving: peers' offers and interest stay
            assert held is not None
            held.fetching = False
            swarm.add_held(swarm.index.bits_of(self._servable(man)), now)
            if first_holder:
                swarm.seed(now)
        self._wake.set()

    def holding(
        self, component: str, serial: int, digest: bytes, man: Manifest | None = None
    ) -> None:
        """A complete release found at start; its swarm is made when a peer asks.

        ``man``: its manifest if the caller read it already. Without it the
        first peer's offer reads it from disk on the event loop (decoding and
        checking the signature took 7 ms for 2,655 chunks: every connection
        waited, and that peer's first blob with it).
        """
        held = self.releases.get(component)
        if held is None or held.serial < serial:
            self.releases[component] = Held(serial, digest, man)

    def swarm(self, component: str, serial: int) -> ReleaseSwarm[bytes] | None:
        """The swarm of (component, serial) if this node fetches or holds it."""
        held = self.releases.get(component)
        if held is None or held.serial != serial:
            return None
        if held.swarm is None:
            try:
                man = held.man or self._manifest(component, serial)
            except DaemonError:
                return None
            held.man = man
            held.swarm = ReleaseSwarm(
                man.blob_sizes(), self._rng, held=self._servable(man), wanted=(),
                config=self._config,
            )  # fmt: skip
            self._introduce(component, held.swarm)
        return held.swarm

    # ----- what peers say ------------------------------------------------------------

    def on_have_bits(self, conn: PeerConnection, msg: HaveBits, key: str) -> bool:
        """A swarm peer's offer of our release ``key``; False if we do not know it."""
        swarm = self.swarm(key, msg.serial)
        if swarm is None:
            return False
        if self._other_release(conn, key, msg.serial):
            return True
        bits = bitfield.from_wire(msg.offset, msg.bits, swarm.index.count)
        self._offered(key, swarm, conn.node_id, bits, bits != swarm.index.all)
        return True

    def on_have(self, conn: PeerConnection, msg: Have, key: str) -> bool:
        """An older peer's Have of our release ``key``; False if we do not know it."""
        swarm = self.swarm(key, msg.serial)
        if swarm is None:
            return False
        if self._other_release(conn, key, msg.serial):
            return True
        bits = swarm.index.all if msg.complete else swarm.index.bits_of(msg.digests)
        self._offered(key, swarm, conn.node_id, bits, not msg.complete)
        return True

    def _other_release(self, conn: PeerConnection, key: str, serial: int) -> bool:
        """True if the peer announced another release under this name and serial: an
        older peer of another platform, whose variant shares the serial, not the blobs."""
        if self._links.spelling.speaks(conn):
            return False  # it names every variant by its platform
        held = self.releases[key]
        info = self._links.peers.get(conn.node_id)
        said = info.announced.get(key) if info is not None else None
        return said is not None and said[0] == serial and said[1] != held.digest

    def on_announce(self, conn: PeerConnection, entries: list[tuple[str, int, bytes]]) -> None:
        """An older peer without "have" is taken to hold all of a release it announces."""
        if source_of(conn) is not Source.ANNOUNCE:
            return
        for key, serial, digest in entries:
            held = self.releases.get(key)
            if held is None or (held.serial, held.digest) != (serial, digest):
                continue
            swarm = self.swarm(key, serial)
            if swarm is not None:
                self._offered(key, swarm, conn.node_id, swarm.index.all, False)

    def _offered(
        self, component: str, swarm: ReleaseSwarm[bytes], peer: bytes, bits: int, interested: bool
    ) -> None:
        self.run(component, swarm.on_offer(peer, bits, trio.current_time(), interested=interested))
        self._on_change(component)

    def peer_joined(self, conn: PeerConnection) -> None:
        """Introduce a new peer to every swarm it may hear of (our offers go out to it)."""
        for key, held in self.releases.items():
            if held.swarm is not None and self._links.spelling.write(conn, key, held.serial):
                now = trio.current_time()
                self.run(key, held.swarm.peer_joined(conn.node_id, source_of(conn), now))

    def peer_left(self, peer: bytes) -> None:
        for component, held in self.releases.items():
            if held.swarm is not None:
                held.swarm.peer_left(peer)
                self._on_change(component)

    def served(self, peer: bytes, digest: bytes) -> None:
        """We sent ``digest`` to ``peer`` (a first holder counts what each neighbour got)."""
        for held in self.releases.values():
            swarm = held.swarm
            if swarm is not None:
                blob = swarm.index.position.get(digest)
                if blob is not None:
                    swarm.on_served(peer, blob, trio.current_time())
                    if swarm.first_holder:  # it offers more as each blob goes out
                        self._wake.set()
                    return

    # ----- carrying out actions ---------------------------------------------------------

    def run(self, component: str, actions: list[Action[bytes]]) -> list[Fetch[bytes]]:
        """Send offers, ban for bad data; returns the ``Fetch`` actions (the fetch's)."""
        fetches: list[Fetch[bytes]] = []
        held = self.releases.get(component)
        swarm = held.swarm if held is not None else None
        for action in actions:
            if isinstance(action, Fetch):
                fetches.append(action)
                continue
            conn = self._links.conns.get(action.peer)
            if conn is None:
                continue
            if isinstance(action, Punish):
                self._links.ban(action.peer, action.reason)
            elif isinstance(action, Offer) and swarm is not None and held is not None:
                self._post_offer(conn, component, held.serial, swarm, action)
        if actions:
            self._wake.set()
        return fetches

    def _post_offer(
        self,
        conn: PeerConnection,
        key: str,
        serial: int,
        swarm: ReleaseSwarm[bytes],
        offer: Offer[bytes],
    ) -> None:
        component = self._links.spelling.write(conn, key, serial)
        if component is None:  # a carried variant, and the peer does not speak "variants"
            return
        if source_of(conn) is Source.SWARM:
            for offset, data in bitfield.to_wire(offer.bits, swarm.index.count):
                conn.post(HaveBits(component, serial, offset, data))
        elif offer.complete:
            conn.post(Have(component, serial, True))
        else:
            digests = swarm.index.digests_of(offer.bits)
            for i in range(0, max(len(digests), 1), MAX_HAVE_DIGESTS):
                conn.post(Have(component, serial, False, tuple(digests[i : i + MAX_HAVE_DIGESTS])))

    def _introduce(self, component: str, swarm: ReleaseSwarm[bytes]) -> None:
        now = trio.current_time()
        held = self.releases[component]
        for peer, conn in list(self._links.conns.items()):
            if not conn.joined or not self._links.spelling.write(conn, component, held.serial):
                continue
            source = source_of(conn)
            self.run(component, swarm.peer_joined(peer, source, now))
            info = self._links.peers.get(peer)
            announced = info.announced.get(component) if info is not None else None
            if source is Source.ANNOUNCE and announced == (held.serial, held.digest):
                # It announced this release before we knew it: it holds all of it.
                self.run(component, swarm.on_offer(peer, swarm.index.all, now, interested=False))
        self._wake.set()

    def poke(self) -> None:
        """A swarm changed outside these methods (blobs became servable): its
        next batched offers may be due before the timers last computed."""
        self._wake.set()

    # ----- time ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the swarms' timers (batched offers, starving neighbours) until cancelled."""
        task_status.started()
        while True:
            now = trio.current_time()
            deadlines = []
            for component, held in list(self.releases.items()):
                if held.swarm is None:
                    continue
                self.run(component, held.swarm.tick(now))
                deadline = held.swarm.next_deadline()
                if deadline is not None:
                    deadlines.append(deadline)
            wait = min([d - now for d in deadlines] + [MAX_TICK_SECONDS])
            self._wake = trio.Event()
            with trio.move_on_after(max(wait, 0.005)):
                await self._wake.wait()
