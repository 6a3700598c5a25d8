"""The pure fetch planner: rarest first, caps, timeouts, reassignment, bans."""

from __future__ import annotations

import random
from collections import Counter

from p2pupd.protocol.planner import FetchPlanner


def digest(i: int) -> bytes:
    return i.to_bytes(32, "big")


def planner(n: int = 10, **kw: object) -> FetchPlanner[str]:
    return FetchPlanner(
        {digest(i): 100 * (i + 1) for i in range(n)},
        random.Random(3),
        **kw,  # type: ignore[arg-type]
    )


def test_rarest_chunk_goes_first() -> None:
    p = planner(3, per_peer_cap=1)
    p.peer_has_all("a")
    p.peer_has("b", [digest(0), digest(1)])
    p.peer_has("c", [digest(0)])
    # digest(2): 1 holder, digest(1): 2, digest(0): 3
    assert p.next_requests(0.0) == [("a", digest(2)), ("b", digest(1)), ("c", digest(0))]


def test_per_peer_cap_is_respected() -> None:
    p = planner(10, per_peer_cap=2)
    p.peer_has_all("a")
    first = p.next_requests(0.0)
    assert len(first) == 2 and p.in_flight("a") == 2
    assert p.next_requests(0.0) == []
    p.on_chunk_received("a", first[0][1], True, 1.0)
    assert len(p.next_requests(1.0)) == 1


def test_load_spreads_over_peers() -> None:
    p = planner(10, per_peer_cap=4)
    for peer in "abc":
        p.peer_has_all(peer)
    out = p.next_requests(0.0)
    assert sorted(Counter(peer for peer, _ in out).values()) == [3, 3, 4]
    assert len({d for _, d in out}) == 10  # no chunk asked twice


def test_only_holders_are_asked() -> None:
    p = planner(4)
    p.peer_has("a", [digest(0), b"\xff" * 32])  # an unneeded digest is ignored
    assert p.next_requests(0.0) == [("a", digest(0))]
    assert p.unavailable(0.0) == {digest(1), digest(2), digest(3)}


def test_timeout_reassigns_but_keeps_the_slot() -> None:
    p = planner(1, request_timeout=5.0, per_peer_cap=4)
    p.peer_has_all("slow")
    assert p.next_requests(0.0) == [("slow", digest(0))]
    p.peer_has_all("fast")
    assert p.next_requests(4.9) == []
    assert p.next_requests(5.0) == [("fast", digest(0))]
    assert p.in_flight("slow") == 1  # the slow peer still counts the request
    p.on_chunk_received("fast", digest(0), True, 6.0)
    assert p.done and p.progress == 1.0
    p.on_chunk_received("slow", digest(0), True, 7.0)  # late duplicate: harmless
    assert p.in_flight("slow") == 0 and p.bytes_done == 100


def test_sole_holder_is_not_asked_twice_for_the_same_chunk() -> None:
    p = planner(1, request_timeout=5.0)
    p.peer_has_all("a")
    p.next_requests(0.0)
    assert p.next_requests(10.0) == []  # timed out, but a's slot for it is still taken
    p.on_chunk_missing("a", digest(0), 11.0)
    assert p.next_requests(11.0) == []
    assert p.unavailable(11.0) == {digest(0)}


def test_late_answer_from_timed_out_peer_completes_the_chunk() -> None:
    p = planner(1, request_timeout=5.0)
    p.peer_has_all("a")
    p.peer_has_all("b")
    [(first, _)] = p.next_requests(0.0)
    [(second, _)] = p.next_requests(5.0)
    assert second != first
    p.on_chunk_received(first, digest(0), True, 6.0)
    assert p.done
    assert p.assigned_to(digest(0)) is None
    assert p.in_flight(second) == 1  # freed only when it answers
    p.on_chunk_received(second, digest(0), True, 7.0)
    assert p.in_flight(second) == 0


def test_missing_chunk_goes_elsewhere_and_never_back() -> None:
    p = planner(1)
    p.peer_has_all("a")
    [(_, d)] = p.next_requests(0.0)
    p.peer_has_all("b")
    p.on_chunk_missing("a", d, 1.0)
    assert p.next_requests(1.0) == [("b", d)]
    p.on_chunk_missing("b", d, 2.0)
    assert p.next_requests(2.0) == []
    p.peer_has("a", [d])  # it says it has it now
    assert p.next_requests(3.0) == [("a", d)]


def test_bad_data_bans_and_requeues_everything_of_that_peer() -> None:
    p = planner(4, per_peer_cap=4, ban_seconds=100.0)
    p.peer_has_all("evil")
    out = p.next_requests(0.0)
    assert {peer for peer, _ in out} == {"evil"} and len(out) == 4
    p.peer_has_all("good")
    p.on_chunk_received("evil", out[0][1], False, 1.0)
    assert p.is_banned("evil", 50.0)
    again = p.next_requests(1.0)
    assert {peer for peer, _ in again} == {"good"}
    assert {d for _, d in again} == {d for _, d in out}
    assert p.progress == 0.0
    # After the ban the peer is usable again.
    for peer, d in again:
        p.on_chunk_missing(peer, d, 2.0)
    assert p.next_requests(50.0) == []
    # Usable again, but not for the three chunks it still owes answers for.
    assert p.next_requests(101.0) == [("evil", out[0][1])]


def test_explicit_ban_with_until() -> None:
    p = planner(2)
    p.peer_has_all("a")
    p.ban("a", 10.0)
    assert p.next_requests(5.0) == []
    assert len(p.next_requests(10.0)) == 2


def test_timeouts_shrink_a_peers_share() -> None:
    p = planner(40, per_peer_cap=8, request_timeout=1.0)
    p.peer_has_all("flaky")
    first = p.next_requests(0.0)
    assert len(first) == 8
    p.peer_has_all("steady")
    out = p.next_requests(1.0)  # all 8 timed out and were requeued
    assert Counter(peer for peer, _ in out) == {"steady": 8}
    for _, d in first:
        p.on_chunk_received("flaky", d, True, 1.5)  # late, but good
    # Penalty 8 - 8 * 0.25 = 6 whole points: its share is down to one request.
    assert Counter(peer for peer, _ in p.next_requests(1.5)) == {"flaky": 1}


def test_penalised_peer_is_asked_last() -> None:
    p = planner(5, per_peer_cap=8)
    p.peer_has_all("a")
    p.peer_has_all("b")
    p.on_chunk_missing("a", digest(4), 0.0)
    assert Counter(peer for peer, _ in p.next_requests(0.0)) == {"b": 5}


def test_remove_peer_requeues() -> None:
    p = planner(2)
    p.peer_has_all("a")
    p.peer_has_all("b")
    out = p.next_requests(0.0)
    gone = out[0][0]
    p.remove_peer(gone)
    again = p.next_requests(0.0)
    assert again and all(peer != gone for peer, _ in again)
    assert p.in_flight(gone) == 0


def test_progress_counts_bytes() -> None:
    p = planner(2)  # sizes 100 and 200
    p.peer_has_all("a")
    p.next_requests(0.0)
    p.on_chunk_received("a", digest(1), True, 1.0)
    assert p.progress == 200 / 300
    assert not p.done
    assert FetchPlanner({}, random.Random(0)).done


def test_random_run_respects_invariants_and_finishes() -> None:
    rng = random.Random(11)
    p = FetchPlanner({digest(i): 1 for i in range(200)}, random.Random(5), per_peer_cap=3)
    holders = {f"p{k}": {digest(i) for i in range(200) if rng.random() < 0.5} for k in range(6)}
    for peer, held in holders.items():
        p.peer_has(peer, held)
    p.peer_has_all("seed")
    holders["seed"] = {digest(i) for i in range(200)}
    inflight: list[tuple[str, bytes]] = []
    now = 0.0
    while not p.done:
        now += 1.0
        assert now < 2000, "planner stalled"
        for peer, d in p.next_requests(now):
            assert d in holders[peer]
            assert (peer, d) not in inflight
            inflight.append((peer, d))
        for peer in holders:
            assert p.in_flight(peer) <= 3
        rng.shuffle(inflight)
        for _ in range(min(len(inflight), rng.randrange(1, 6))):
            peer, d = inflight.pop()
            roll = rng.random()
            if roll < 0.1:
                p.on_chunk_missing(peer, d, now)
                holders[peer].discard(d)
            elif roll < 0.12 and peer != "seed":
                p.on_chunk_received(peer, d, False, now)  # bad data: banned
            else:
                p.on_chunk_received(peer, d, True, now)
    assert p.progress == 1.0
