"""Reports on the wire: ReportNews/ReportDigest encoding, feature negotiation, and the
pure spreading rules (push fan-out, pull on digest, rate limit)."""

from __future__ import annotations

import random
from collections import Counter, deque

import pytest

from p2pupd.protocol.errors import LocalProtocolError, RemoteProtocolError, SchemaError
from p2pupd.protocol.rollout.spread import MAX_DOCS_PER_NEWS, SendDigest, SendNews, Spread
from p2pupd.protocol.session import Session
from p2pupd.protocol.wire import (
    FEATURE_REPORT,
    MAX_NEWS_DOCS,
    MAX_NEWS_REPORT_BYTES,
    ReportDigest,
    ReportNews,
    decode_body,
    encode_message,
)


def roundtrip(msg: ReportNews | ReportDigest) -> object:
    return decode_body(encode_message(msg)[4:])


def test_site_messages_round_trip() -> None:
    news = ReportNews((b"r" * 100, b"s" * 7), (b"a" * 3,))
    assert roundtrip(news) == news
    answer = ReportNews((b"r",), (), relay=False)
    assert roundtrip(answer) == answer
    digest = ReportDigest(((b"\x01" * 16, 5), (b"\x02" * 16, 1 << 40)), (b"\x03" * 32,))
    assert roundtrip(digest) == digest
    assert roundtrip(ReportDigest()) == ReportDigest()


@pytest.mark.parametrize(
    "build",
    [
        lambda: ReportNews(tuple(b"x" for _ in range(MAX_NEWS_DOCS + 1))),
        lambda: ReportNews((b"x" * (MAX_NEWS_REPORT_BYTES + 1),)),
        lambda: ReportNews(("text",)),  # type: ignore[arg-type]
        lambda: ReportDigest(((b"\x02" * 16, 1), (b"\x01" * 16, 1))),  # not sorted
        lambda: ReportDigest(((b"\x01" * 15, 1),)),
        lambda: ReportDigest(((b"\x01" * 16, 0),)),
        lambda: ReportDigest((), (b"\x02" * 32, b"\x01" * 32)),
    ],
)
def test_out_of_bounds_site_messages_cannot_be_built(build: object) -> None:
    with pytest.raises(LocalProtocolError):
        build()  # type: ignore[operator]


def test_a_malformed_site_message_is_a_schema_error() -> None:
    from p2pupd.protocol import encoding

    for body in ([50, "x", [], True], [51, [[b"\x01" * 16]], []], [51, [], "x"],
                 [50, [], [], 1], [50, [], []]):  # fmt: skip
        with pytest.raises(SchemaError):
            decode_body(encoding.encode(body))


def session_pair(a_feats: frozenset[str], b_feats: frozenset[str]) -> tuple[Session, Session]:
    a = Session(b"\x01" * 16, "c", 0, a_feats)
    b = Session(b"\x02" * 16, "c", 0, b_feats)
    b.receive_data(a.send(a.hello))
    a.receive_data(b.send(b.hello))
    assert b.next_event() == a.hello and a.next_event() == b.hello
    return a, b


def test_only_peers_that_offered_report_get_site_news() -> None:
    a, b = session_pair(frozenset({FEATURE_REPORT}), frozenset({FEATURE_REPORT}))
    assert a.supports(FEATURE_REPORT)
    b.receive_data(a.send(ReportNews((b"r",))))
    assert b.next_event() == ReportNews((b"r",))
    old_a, old_b = session_pair(frozenset({FEATURE_REPORT}), frozenset())  # an older peer
    assert not old_a.supports(FEATURE_REPORT)
    with pytest.raises(LocalProtocolError):
        old_a.send(ReportDigest())
    with pytest.raises(RemoteProtocolError):  # and it may not push news at us unasked
        old_b.receive_data(encode_message(ReportNews()))
        old_b.next_event()


# ----- the spreading rules -------------------------------------------------------------


def spread(**kw: float) -> Spread[str]:
    return Spread(random.Random(1), **kw)  # type: ignore[arg-type]


def test_a_peer_that_joins_gets_our_digest() -> None:
    s = spread()
    assert s.peer_joined("p", 0) == [SendDigest("p")]


def test_own_documents_go_to_every_peer_others_to_a_fanout() -> None:
    s = spread(fanout=2)
    for p in "abcdef":
        s.peer_joined(p, 0)
    own = s.learned([b"mine"], [], None)
    assert sorted(a.peer for a in own) == list("abcdef")
    forwarded = s.learned([b"theirs"], [], "a")
    targets = [a.peer for a in forwarded]
    assert len(targets) == 2 and "a" not in targets
    assert s.learned([], [], "a") == []


def test_news_is_batched_within_a_frame() -> None:
    s = spread()
    s.peer_joined("p", 0)
    docs = [bytes([i]) for i in range(70)]
    sent = s.learned(docs, [b"act"], None)
    assert [len(a.reports) for a in sent if isinstance(a, SendNews)] == [32, 32, 6]
    assert all(len(a.reports) <= MAX_DOCS_PER_NEWS for a in sent if isinstance(a, SendNews))
    assert sum(len(a.actions) for a in sent if isinstance(a, SendNews)) == 1


def test_a_digest_is_answered_with_what_the_peer_lacks() -> None:
    s = spread(max_answer=3)
    s.peer_joined("p", 0)
    sent = s.on_digest("p", {}, [b"d1"], [b"r1", b"r2", b"r3", b"r4"],
                       {b"d1": b"act1", b"d2": b"act2"})  # fmt: skip
    assert len(sent) == 1 and isinstance(sent[0], SendNews)
    assert sent[0].reports == (b"r1", b"r2", b"r3")  # bounded per digest
    assert sent[0].actions == (b"act2",)  # the one the peer does not know
    assert not sent[0].relay  # a catch-up, mostly old news to everyone else
    assert all(a.relay for a in s.learned([b"x"], [], None) if isinstance(a, SendNews))
    assert s.on_digest("stranger", {}, [], [b"r1"], {}) == []


def test_each_peer_is_rate_limited() -> None:
    s = spread(rate=10, burst=20)
    s.peer_joined("p", 0)
    assert s.admit("p", 50, 0) == 20  # the burst
    assert s.admit("p", 50, 1) == 10  # then the rate
    assert s.admit("p", 5, 1) == 0
    assert s.dropped == 30 + 40 + 5
    assert s.admit("unknown", 5, 1) == 0


def test_periodic_pull_stretches_with_the_site() -> None:
    s = spread(sync_interval=10, seconds_per_node=1)
    s.peer_joined("p", 0)
    assert s.tick(0, 5) == []
    first = s.next_deadline()
    assert first is not None and 5 <= first <= 10
    assert s.tick(first, 5) == [SendDigest("p")]
    big = spread(sync_interval=10, seconds_per_node=1)
    big.peer_joined("p", 0)
    big.tick(0, 1000)
    assert (big.next_deadline() or 0) >= 500  # 1,000 nodes: every ~1,000 s, not every 10 s


# ----- over a partial view -------------------------------------------------------------


def partial_view(n: int, degree: int, seed: int) -> dict[int, set[int]]:
    """A random graph like the swarm's active views: every node links to degree/2
    random others and accepts links from more, so degrees spread around ``degree``."""
    rng = random.Random(seed)
    links: dict[int, set[int]] = {i: set() for i in range(n)}
    for i in range(n):
        while len(links[i]) < degree // 2:
            j = rng.randrange(n)
            if j != i:
                links[i].add(j)
                links[j].add(i)
    return links


def push(spreads: dict[int, Spread[int]], origin: int, doc: bytes) -> tuple[set[int], Counter[int]]:
    """Run the push of ``doc`` made at ``origin`` to quiet; returns who holds it and
    how many copies each node received."""
    holders, copies = {origin}, Counter[int]()
    queue = deque((origin, a) for a in spreads[origin].learned([doc], [], None))
    while queue:
        sender, action = queue.popleft()
        assert isinstance(action, SendNews) and action.reports == (doc,)
        copies[action.peer] += 1
        if action.peer not in holders:  # accepted for the first time: relayed on
            holders.add(action.peer)
            queue.extend((action.peer, a) for a in spreads[action.peer].learned([doc], [], sender))
    return holders, copies


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_news_reaches_every_node_of_a_site_over_partial_views(seed: int) -> None:
    """1,000 nodes, ~12 links each: most nodes are no neighbour of a report's author
    and hear of it only through relays; each node receives a handful of copies,
    whatever the site's size."""
    n = 1000
    links = partial_view(n, 12, seed)
    spreads = {i: Spread[int](random.Random(seed * n + i)) for i in range(n)}
    for i, peers in links.items():
        for p in peers:
            spreads[i].peer_joined(p, 0)
    assert max(len(p) for p in links.values()) < 40
    holders, copies = push(spreads, 0, b"report of node 0")
    assert holders == set(range(n))
    assert sum(copies.values()) / n < 7  # ~FANOUT copies per node, not ~degree
    assert max(copies.values()) <= max(len(p) for p in links.values())


def test_a_node_cut_off_during_the_push_catches_up_by_digest_when_it_reconnects() -> None:
    n = 200
    links = partial_view(n, 12, 7)
    spreads = {i: Spread[int](random.Random(i)) for i in range(n)}
    away = 5
    for i, peers in links.items():
        for p in peers:
            if away not in (i, p):
                spreads[i].peer_joined(p, 0)
    holders, _ = push(spreads, 0, b"r0")
    assert holders == set(range(n)) - {away}
    # Back: its first link's peer answers its digest (a summary without r0).
    peer = min(links[away])
    assert spreads[peer].peer_joined(away, 1) == [SendDigest(away)]
    answer = spreads[peer].on_digest(away, {}, [], [b"r0"], {})
    assert answer == [SendNews(away, (b"r0",), (), relay=False)]
