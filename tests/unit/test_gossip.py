"""Anti-entropy gossip: unit behaviour and a 50-node simulation."""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from p2pupd.protocol.gossip import Action, Ban, Gossip, RequestManifest, SendAnnounce

D3 = b"\x03" * 32
D5 = b"\x05" * 32
D7 = b"\x07" * 32


def make(**kw: object) -> Gossip[str]:
    options: dict[str, object] = {
        "tracked": ["app"],
        "request_timeout": 10.0,
        "retry_after": 60.0,
        "ban_seconds": 100.0,
    }
    options.update(kw)
    return Gossip(random.Random(1), **options)  # type: ignore[arg-type]


def requests(actions: list[Action[str]]) -> list[RequestManifest[str]]:
    return [a for a in actions if isinstance(a, RequestManifest)]


def test_join_sends_announce() -> None:
    g = make()
    assert g.peer_joined("p", 0.0) == [SendAnnounce("p")]
    assert g.peers == ["p"]


def test_higher_serial_is_requested_with_its_digest() -> None:
    g = make(holdings={"app": (3, D3)})
    actions = g.on_announce("p", [("app", 5, D5)], 0.0)
    assert requests(actions) == [RequestManifest("p", "app", 5, D5)]
    assert g.pending == {("app", 5): "p"}
    # The announce is only a hint: nothing is held until verified.
    assert g.holdings == {"app": (3, D3)}
    assert g.announcement().entries == (("app", 3, D3),)


def test_a_have_for_an_unknown_release_asks_for_its_manifest() -> None:
    g = make(holdings={"app": (3, D3)})
    g.peer_joined("p", 0.0)
    # Knowledge runs ahead of data: a Have hints at serial 5 before any Announce.
    assert requests(g.on_hint("p", "app", 5, 0.0)) == [RequestManifest("p", "app", 5, b"")]
    assert g.on_hint("p", "app", 5, 0.1) == []  # already asked
    assert g.on_hint("q", "app", 3, 0.1) == []  # not newer
    assert g.on_hint("q", "other", 9, 0.1) == []  # not tracked
    # A later Announce with the digest does not ask twice.
    assert requests(g.on_announce("p", [("app", 5, D5)], 0.2)) == []


def test_equal_lower_or_untracked_serials_are_not_requested() -> None:
    g = make(holdings={"app": (5, D5)})
    assert requests(g.on_announce("p", [("app", 5, D5)], 0.0)) == []
    assert requests(g.on_announce("q", [("app", 3, D3)], 0.0)) == []
    assert requests(g.on_announce("r", [("other", 9, D7)], 0.0)) == []
    assert requests(g.track("other", 1.0)) == [RequestManifest("r", "other", 9, D7)]


def test_only_the_highest_offer_is_requested_once() -> None:
    g = make()
    first = requests(g.on_announce("p", [("app", 5, D5)], 0.0))
    second = requests(g.on_announce("q", [("app", 7, D7)], 0.0))
    third = requests(g.on_announce("r", [("app", 7, D7)], 0.0))
    assert [r.serial for r in first + second] == [5, 7]
    assert third == []  # (app, 7) is already pending with q
    assert g.pending[("app", 7)] == "q"


def test_timeout_retries_another_peer_and_skips_the_slow_one() -> None:
    g = make()
    g.on_announce("p", [("app", 5, D5)], 0.0)
    g.on_announce("q", [("app", 5, D5)], 0.0)
    first = g.pending[("app", 5)]
    assert requests(g.tick(5.0)) == []  # not yet timed out
    retry = requests(g.tick(10.0))
    assert len(retry) == 1 and retry[0].peer != first
    second = retry[0].peer
    # Both failed: wait for retry_after before asking the first again.
    assert requests(g.tick(20.0)) == []
    assert ("app", 5) not in g.pending
    again = requests(g.tick(70.0))
    assert [r.peer for r in again] == [first]
    assert second != first


def test_verified_manifest_updates_holdings_and_spreads_to_peers_behind() -> None:
    g = make(fanout=10)
    g.on_announce("behind", [("app", 3, D3)], 0.0)
    g.on_announce("source", [("app", 5, D5)], 0.0)
    g.on_announce("silent", [], 0.0)
    actions = g.on_manifest_verified("app", 5, D5, 1.0)
    assert g.holdings == {"app": (5, D5)}
    assert g.pending == {}
    assert {a.peer for a in actions if isinstance(a, SendAnnounce)} == {"behind", "silent"}


def test_older_verified_serial_never_lowers_holdings() -> None:
    g = make(holdings={"app": (5, D5)})
    assert g.on_manifest_verified("app", 3, D3, 0.0) == []
    assert g.holdings == {"app": (5, D5)}


def test_rejected_manifest_bans_and_falls_back() -> None:
    g = make()
    g.on_announce("liar", [("app", 7, D7)], 0.0)
    g.on_announce("honest", [("app", 5, D5)], 0.0)
    assert g.pending == {("app", 7): "liar"}
    actions = g.on_manifest_rejected("liar", "app", 7, 1.0)
    assert actions[0] == Ban("liar", 101.0, "manifest app #7 failed verification")
    assert requests(actions) == [RequestManifest("honest", "app", 5, D5)]
    assert g.is_banned("liar", 50.0)
    assert "liar" not in g.peers
    assert g.on_announce("liar", [("app", 8, D7)], 2.0) == []  # ignored while banned
    assert g.peer_joined("liar", 3.0) == [Ban("liar", 101.0, "peer is banned")]
    g.tick(101.0)
    assert not g.is_banned("liar", 101.0)
    assert g.peer_joined("liar", 102.0) == [SendAnnounce("liar")]


def test_unavailable_manifest_moves_on() -> None:
    g = make()
    g.on_announce("p", [("app", 5, D5)], 0.0)
    g.on_announce("q", [("app", 5, D5)], 0.0)
    first = g.pending[("app", 5)]
    other = "q" if first == "p" else "p"
    assert requests(g.on_manifest_unavailable(first, "app", 5, 1.0)) == [
        RequestManifest(other, "app", 5, D5)
    ]


def test_peer_leaving_reroutes_its_request() -> None:
    g = make()
    g.on_announce("p", [("app", 5, D5)], 0.0)
    g.on_announce("q", [("app", 5, D5)], 0.0)
    first = g.pending[("app", 5)]
    rerouted = requests(g.peer_left(first, 1.0))
    assert len(rerouted) == 1 and rerouted[0].peer != first
    assert first not in g.peers


def test_periodic_announce_to_random_fanout() -> None:
    g = make(fanout=2, announce_interval=10.0)
    for name in "abcde":
        g.peer_joined(name, 0.0)
    first = [a.peer for a in g.tick(0.0) if isinstance(a, SendAnnounce)]
    assert len(first) == 2 and len(set(first)) == 2
    assert not [a for a in g.tick(4.9) if isinstance(a, SendAnnounce)]  # jitter >= 0.5x
    assert len([a for a in g.tick(15.0) if isinstance(a, SendAnnounce)]) == 2  # <= 1.5x
    deadline = g.next_deadline()
    assert deadline is not None and 20.0 <= deadline <= 30.0


def test_same_seed_same_choices() -> None:
    def run() -> list[Action[str]]:
        g = make(fanout=3)
        for name in "abcdefgh":
            g.on_announce(name, [("app", 5, D5)], 0.0)
        return g.tick(0.0)

    assert run() == run()


def test_push_pull_answers_a_peer_behind_once() -> None:
    g = make(holdings={"app": (5, D5)})
    assert SendAnnounce("p") in g.on_announce("p", [("app", 3, D3)], 0.0)
    assert SendAnnounce("p") not in g.on_announce("p", [("app", 3, D3)], 1.0)
    # A change of holdings is pushed to peers behind, and counts as telling them.
    assert SendAnnounce("p") in g.on_manifest_verified("app", 6, D7, 2.0)
    assert SendAnnounce("p") not in g.on_announce("p", [("app", 3, D3)], 3.0)
    g.on_manifest_verified("app", 7, D7, 4.0)  # fan-out 3 of 1 peer: p hears of it
    g.peer_left("p", 5.0)
    assert SendAnnounce("p") in g.on_announce("p", [("app", 3, D3)], 6.0)  # new connection


# ----- simulation ---------------------------------------------------------

VALID = {serial: bytes([serial]) * 32 for serial in range(1, 6)}  # signed releases 1..5


@dataclass(frozen=True)
class SimManifest:
    component: str
    serial: int
    digest: bytes
    signed: bool  # what the simulated verifier checks


@dataclass
class SimNode:
    name: int
    gossip: Gossip[int]
    malicious: bool = False
    store: dict[int, SimManifest] = field(default_factory=dict)


class Simulation:
    """50 pure nodes, a simulated clock and a seeded event queue."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.queue: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = itertools.count()
        self.bans: set[tuple[int, int]] = set()
        self.malicious = set(self.rng.sample(range(50), 5))
        self.nodes = [
            SimNode(
                i,
                Gossip(
                    random.Random(seed * 1000 + i),
                    tracked=["app"],
                    fanout=2,
                    announce_interval=5.0,
                    request_timeout=2.0,
                    retry_after=10.0,
                    ban_seconds=10_000.0,
                ),
                malicious=i in self.malicious,
            )
            for i in range(50)
        ]
        self.links: set[tuple[int, int]] = set()
        honest = [i for i in range(50) if i not in self.malicious]
        for k, node in enumerate(honest[1:], 1):  # a random tree keeps honest nodes connected
            self.link(node, honest[self.rng.randrange(k)])
        for _ in range(40):
            self.link(*self.rng.sample(range(50), 2))
        for bad in self.malicious:
            for other in self.rng.sample(honest, 4):
                self.link(bad, other)

    def link(self, a: int, b: int) -> None:
        self.links.add((min(a, b), max(a, b)))

    def neighbours(self, n: int) -> list[int]:
        return sorted({b for a, b in self.links if a == n} | {a for a, b in self.links if b == n})

    def at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.queue, (when, next(self.seq), fn))

    def later(self, fn: Callable[[], None]) -> None:
        self.at(self.now + self.rng.uniform(0.01, 0.3), fn)

    def run(self, until: float, check: Callable[[], None]) -> None:
        while self.queue and self.queue[0][0] <= until:
            self.now, _, fn = heapq.heappop(self.queue)
            fn()
            check()

    def act(self, n: int, actions: list[Action[int]]) -> None:
        node = self.nodes[n]
        for action in actions:
            if isinstance(action, SendAnnounce):
                entries = (
                    [("app", 99, b"\xee" * 32)]  # a forged, higher serial
                    if node.malicious
                    else list(node.gossip.announcement().entries)
                )
                peer = action.peer
                self.later(lambda p=peer, e=entries: self.receive_announce(p, n, e))
            elif isinstance(action, RequestManifest):
                self.later(lambda a=action: self.serve(a.peer, n, a.serial))
            else:  # Ban: the connection drops on both ends
                self.bans.add((n, action.peer))
                peer_gossip = self.nodes[action.peer].gossip
                self.act(action.peer, peer_gossip.peer_left(n, self.now))

    def receive_announce(self, n: int, sender: int, entries: list[tuple[str, int, bytes]]) -> None:
        if not self.nodes[n].malicious and (n, sender) not in self.bans:
            self.act(n, self.nodes[n].gossip.on_announce(sender, entries, self.now))

    def serve(self, server: int, client: int, serial: int) -> None:
        node = self.nodes[server]
        if node.malicious:
            reply: SimManifest | None = SimManifest("app", serial, b"\xee" * 32, signed=False)
        else:
            reply = node.store.get(serial)
        self.later(lambda: self.deliver(client, server, serial, reply))

    def deliver(self, n: int, server: int, serial: int, manifest: SimManifest | None) -> None:
        gossip = self.nodes[n].gossip
        if manifest is None:
            self.act(n, gossip.on_manifest_unavailable(server, "app", serial, self.now))
        elif manifest.signed and manifest.serial == serial:
            self.verified(n, manifest)
        else:
            self.act(n, gossip.on_manifest_rejected(server, "app", serial, self.now))

    def verified(self, n: int, manifest: SimManifest) -> None:
        self.nodes[n].store[manifest.serial] = manifest
        gossip = self.nodes[n].gossip
        self.act(n, gossip.on_manifest_verified("app", manifest.serial, manifest.digest, self.now))

    def tick(self, n: int) -> None:
        self.act(n, self.nodes[n].gossip.tick(self.now))
        self.at(self.now + 1.0, lambda: self.tick(n))


def test_fifty_nodes_converge_on_newest_valid_serial_and_never_hold_invalid() -> None:
    sim = Simulation(seed=7)
    honest = [node for node in sim.nodes if not node.malicious]

    def check() -> None:
        for node in honest:
            for serial, (held, digest) in [(s, v) for s, v in node.gossip.holdings.items()]:
                assert serial == "app"
                assert VALID.get(held) == digest, f"node {node.name} holds invalid {held}"
            assert all(m.signed for m in node.store.values())

    for a, b in sorted(sim.links):
        sim.at(0.0, lambda a=a, b=b: sim.act(a, sim.nodes[a].gossip.peer_joined(b, sim.now)))
        sim.at(0.0, lambda a=a, b=b: sim.act(b, sim.nodes[b].gossip.peer_joined(a, sim.now)))
    for node in sim.nodes:
        sim.at(sim.rng.uniform(0, 1), lambda n=node.name: sim.tick(n))
    origin, late = honest[0].name, honest[-1].name
    sim.at(1.0, lambda: sim.verified(origin, SimManifest("app", 3, VALID[3], True)))
    sim.at(30.0, lambda: sim.verified(late, SimManifest("app", 5, VALID[5], True)))

    sim.run(until=29.0, check=check)
    assert all(node.gossip.holdings == {"app": (3, VALID[3])} for node in honest)
    sim.run(until=200.0, check=check)
    assert all(node.gossip.holdings == {"app": (5, VALID[5])} for node in honest)
    # Every honest neighbour of a forger that asked it for #99 banned it.
    assert {peer for _, peer in sim.bans} == sim.malicious
