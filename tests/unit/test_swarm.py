"""The per-release swarm: offers, rarest first with short queues, super-seeding."""

from __future__ import annotations

import random
from dataclasses import replace

from p2pupd.protocol.fleet import bitfield
from p2pupd.protocol.fleet.swarm import Fetch, Offer, Punish, ReleaseSwarm, Source, SwarmConfig

SIZES = {bytes([i]) * 32: 100 + i for i in range(16)}
ALL = (1 << 16) - 1
CFG = SwarmConfig(per_source=2, unique_bonus=1, sole_source=6, max_in_flight=8,
                  request_timeout=10.0, have_interval=0.5, seed_offers=2, seed_pipeline=4,
                  starve_after=3.0)  # fmt: skip


def fetcher(seed: int = 1, **kw: object) -> ReleaseSwarm[str]:
    return ReleaseSwarm(SIZES, random.Random(seed), config=CFG, **kw)  # type: ignore[arg-type]


def fetched(actions: list[object]) -> dict[str, tuple[int, ...]]:
    return {a.peer: a.blobs for a in actions if isinstance(a, Fetch)}


def bits(*blobs: int) -> int:
    return sum(1 << b for b in blobs)


def test_a_fetching_node_says_it_is_in_then_tells_what_it_gets() -> None:
    s = fetcher()
    assert s.peer_joined("a", Source.SWARM, 0.0) == [Offer("a", 0, False)]
    assert s.peer_joined("old", Source.ANNOUNCE, 0.0) == []
    s.on_offer("a", bits(1, 2), 0.0)  # a is fetching too, and has 1 and 2
    s.add_held(bits(5), 0.1)
    assert s.tick(0.2) == []  # batched
    assert s.tick(0.6) == [Offer("a", bits(5), False)]


def test_rarest_first_and_at_most_per_source_in_flight() -> None:
    s = fetcher()
    for p in "abc":
        s.peer_joined(p, Source.SWARM, 0.0)
    s.on_offer("a", ALL, 0.0, interested=False)  # a complete holder
    s.on_offer("b", bits(3, 4), 0.0)
    s.on_offer("c", bits(3, 4), 0.0)
    got = fetched(s.next_requests(0.0))
    # a alone has 0-2 and 5-15: it gets those (rarer than 3 and 4), and one
    # more than the others for being the only source of some.
    assert len(got["a"]) == CFG.per_source + CFG.unique_bonus
    assert not set(got["a"]) & {3, 4}
    assert set(got.get("b", ())) | set(got.get("c", ())) == {3, 4}
    assert all(len(blobs) <= CFG.per_source for p, blobs in got.items() if p != "a")
    assert s.next_requests(0.1) == []  # everyone is at its cap


def test_a_peer_that_alone_offers_something_gets_a_little_more() -> None:
    s = fetcher()
    s.peer_joined("a", Source.SWARM, 0.0)
    s.peer_joined("b", Source.SWARM, 0.0)
    s.on_offer("a", bits(0, 1, 2, 3, 4), 0.0)
    s.on_offer("b", bits(0, 1), 0.0)
    got = fetched(s.next_requests(0.0))
    assert len(got["a"]) == CFG.per_source + CFG.unique_bonus
    assert len(got["b"]) <= CFG.per_source


def test_a_sole_source_may_take_more_and_the_total_is_capped() -> None:
    s = fetcher()
    s.peer_joined("a", Source.SWARM, 0.0)
    s.on_offer("a", ALL, 0.0, interested=False)
    (blobs,) = fetched(s.next_requests(0.0)).values()
    assert len(blobs) == CFG.sole_source
    s.peer_joined("b", Source.SWARM, 0.0)
    s.on_offer("b", ALL, 0.0, interested=False)
    more = fetched(s.next_requests(0.0))
    assert sum(map(len, more.values())) == CFG.max_in_flight - CFG.sole_source


def test_answers_complete_the_release_and_late_duplicates_are_harmless() -> None:
    s = fetcher()
    s.peer_joined("a", Source.SWARM, 0.0)
    s.on_offer("a", ALL, 0.0, interested=False)
    now = 0.0
    while not s.done:
        for act in s.next_requests(now):
            assert isinstance(act, Fetch)
            for blob in act.blobs:
                s.on_blob("a", blob, True, now)
        now += 0.01
    assert s.complete and s.bytes_done == sum(SIZES.values())
    assert s.on_blob("a", 3, True, now) == [] and s.done


def test_a_timed_out_request_is_replanned_but_keeps_its_slot() -> None:
    s = ReleaseSwarm(SIZES, random.Random(1), config=replace(CFG, endgame_blobs=0))
    for p in "ab":
        s.peer_joined(p, Source.SWARM, 0.0)
    s.on_offer("a", bits(7), 0.0, interested=False)
    assert fetched(s.next_requests(0.0)) == {"a": (7,)}
    s.on_offer("b", bits(7), 1.0, interested=False)
    assert s.next_requests(1.0) == []  # in flight with a
    assert fetched(s.next_requests(CFG.request_timeout)) == {"b": (7,)}
    assert s.in_flight("a") == 1  # a still counts it until it answers
    s.on_blob("b", 7, True, 11.0)
    s.on_blob("a", 7, True, 12.0)  # late: frees a's slot, changes nothing else
    assert s.in_flight("a") == 0 and s.done is False and s.held == bits(7)


def test_missing_steers_elsewhere_and_bad_data_is_punished() -> None:
    s = fetcher()
    for p in "ab":
        s.peer_joined(p, Source.SWARM, 0.0)
    s.on_offer("a", bits(1), 0.0)
    s.on_offer("b", bits(1, 2), 0.0)
    got = fetched(s.next_requests(0.0))
    holder = next(p for p, blobs in got.items() if 1 in blobs)
    s.on_missing(holder, 1, 0.1)
    s.on_offer(holder, bits(1), 0.2)  # said it lacks it: its offer is not believed (yet)
    assert s.offered_by(holder) & bits(1) == 0
    acts = s.on_blob("b", 2, False, 0.3)
    assert acts and isinstance(acts[0], Punish) and acts[0].peer == "b"
    assert s.unavailable() & bits(2)  # nobody else offers it


def test_a_sole_holder_that_said_missing_is_asked_again_after_a_while() -> None:
    # Its store failed a read, or the blob was between its spool and its
    # store: the one peer that has it must not be written off for good.
    s = fetcher(wanted=[bytes([1]) * 32, bytes([2]) * 32])
    s.peer_joined("a", Source.SWARM, 0.0)
    s.on_offer("a", bits(1, 2), 0.0)
    assert sorted(fetched(s.next_requests(0.0))["a"]) == [1, 2]
    s.on_missing("a", 1, 0.1)
    s.on_blobs("a", [2], 0.1)
    assert s.next_requests(1.0) == [] and s.unavailable() == bits(1)
    s.tick(1.0)  # our own offer of blob 2 goes out
    due = 0.1 + CFG.lack_seconds
    assert s.next_deadline() == due  # the fetch loop wakes for it
    assert s.next_requests(due - 0.01) == []
    assert fetched(s.next_requests(due)) == {"a": (1,)}
    s.on_missing("a", 1, due + 0.1)  # still missing: not asked again for a while
    assert s.next_requests(due + 1.0) == [] and s.unavailable() == bits(1)


def test_a_banned_peers_missing_blobs_are_not_offered_again() -> None:
    s = fetcher()
    s.peer_joined("a", Source.SWARM, 0.0)
    s.on_offer("a", bits(1, 2), 0.0)
    s.next_requests(0.0)
    s.on_missing("a", 1, 0.1)
    assert s.on_blob("a", 2, False, 0.2)  # bad bytes: punished (banned by the caller)
    assert s.next_requests(CFG.lack_seconds + 1.0) == []
    assert s.offered_by("a") & bits(1) == 0


def test_a_first_word_is_answered_with_the_whole_offer_once() -> None:
    # b learnt of the release after our first (empty) offer reached it and was
    # dropped as a hint; its own first HaveBits brings everything we hold.
    s = fetcher(held=[bytes([2]) * 32])
    s.peer_joined("b", Source.SWARM, 0.0)
    s.add_held(bits(3), 0.1)
    s.tick(1.0)
    assert s.on_offer("b", 0, 2.0) == [Offer("b", bits(2, 3), False)]
    assert s.on_offer("b", bits(9), 2.1) == []


def test_the_first_holder_offers_each_blob_once_a_few_at_a_time() -> None:
    seed = ReleaseSwarm(SIZES, random.Random(3), held=SIZES, first_holder=True, config=CFG)
    peers = ["a", "b"]
    for p in peers:
        seed.peer_joined(p, Source.SWARM, 0.0)
    offers = {}
    for p in peers:  # each is fetching and has nothing: the answer is its first offers
        (answer,) = seed.on_offer(p, 0, 0.0)
        assert isinstance(answer, Offer) and answer.peer == p
        offers[p] = answer.bits
    per = max(CFG.seed_offers, CFG.seed_pipeline // 2)
    assert all(b.bit_count() == per for b in offers.values())
    assert offers["a"] & offers["b"] == 0  # different blobs to different neighbours
    # Serving one of a's blobs lets the seed offer a the next fresh one, at
    # once: held back for have_interval, a few offers per neighbour would cap
    # the first holder's upload at seed_pipeline blobs per interval.
    first = next(bitfield.iter_bits(offers["a"]))
    seed.on_served("a", first, 1.5)
    (more,) = [x for x in seed.tick(1.5) if isinstance(x, Offer)]
    assert more.peer == "a" and more.bits.bit_count() == 1
    assert more.bits & (offers["a"] | offers["b"]) == 0
    # Over the whole release each blob is offered once while there are fresh ones.
    told = offers["a"] | offers["b"] | more.bits
    assert told.bit_count() == 2 * per + 1


def test_a_first_holder_offers_its_only_neighbour_everything_at_once() -> None:
    # Nobody could relay to it, and it takes every blob from us anyway.
    seed = ReleaseSwarm(SIZES, random.Random(3), held=SIZES, first_holder=True, config=CFG)
    seed.peer_joined("a", Source.SWARM, 0.0)
    (answer,) = seed.on_offer("a", 0, 0.0)
    assert isinstance(answer, Offer) and answer.bits == ALL and answer.complete


def test_a_starving_neighbour_of_the_first_holder_is_offered_more() -> None:
    seed = ReleaseSwarm(SIZES, random.Random(3), held=SIZES, first_holder=True, config=CFG)
    seed.peer_joined("a", Source.SWARM, 0.0)
    seed.peer_joined("b", Source.SWARM, 0.0)  # a second neighbour, not (yet) fetching
    pending = seed.on_offer("a", 0, 0.0)
    told = 0
    now = 1.0
    for _ in range(20):  # a takes everything offered; the pool of fresh blobs runs out
        for act in pending + seed.tick(now):
            if isinstance(act, Offer):
                told |= act.bits
                for blob in bitfield.iter_bits(act.bits):
                    seed.on_served("a", blob, now)
        pending = []
        now += 1.0
    assert told == ALL


def test_blobs_offered_to_a_leaver_go_back_to_the_pool() -> None:
    seed = ReleaseSwarm(SIZES, random.Random(3), held=SIZES, first_holder=True, config=CFG)
    seed.peer_joined("a", Source.SWARM, 0.0)
    (offer,) = seed.on_offer("a", 0, 0.0)
    assert isinstance(offer, Offer) and offer.bits
    seed.peer_left("a")
    seed.peer_joined("b", Source.SWARM, 2.0)
    (again,) = seed.on_offer("b", 0, 2.0)
    assert isinstance(again, Offer) and again.bits & offer.bits


def test_bitfields_travel_in_slices_and_come_back_whole() -> None:
    count = 70_000
    value = (1 << 3) | (1 << 69_999) | (1 << 40_000)
    slices = bitfield.to_wire(value, count)
    assert slices[0][0] == 0 and all(len(b) <= 64 * 1024 for _, b in slices)
    back = 0
    for offset, data in slices:
        back |= bitfield.from_wire(offset, data, count)
    assert back == value
    assert bitfield.to_wire(0, count) == [(0, b"")]
    assert bitfield.from_wire(0, b"\xff\xff", 9) == (1 << 9) - 1  # cut to the release


def test_the_last_blobs_are_also_asked_of_an_idle_holder() -> None:
    s = fetcher()
    for p in "ab":
        s.peer_joined(p, Source.SWARM, 0.0)
    s.add_held(ALL & ~bits(7), 0.0)
    s.on_offer("a", bits(7), 0.0, interested=False)
    assert fetched(s.next_requests(0.0)) == {"a": (7,)}
    s.on_offer("b", bits(7), 0.1, interested=False)
    assert fetched(s.next_requests(0.1)) == {"b": (7,)}  # end game: b is idle
    assert s.next_requests(0.2) == []  # once per blob
    s.on_blob("b", 7, True, 0.3)
    assert s.done
    s.on_blob("a", 7, True, 0.4)  # the other copy, discarded
    assert s.in_flight("a") == 0


def test_every_idle_neighbour_gets_a_request_beyond_the_total() -> None:
    cfg = replace(CFG, max_in_flight=2, per_source=2, unique_bonus=0)
    s = ReleaseSwarm(SIZES, random.Random(1), config=cfg)
    for p in "abcd":
        s.peer_joined(p, Source.SWARM, 0.0)
        s.on_offer(p, ALL, 0.0, interested=False)
    got = fetched(s.next_requests(0.0))
    assert set(got) == set("abcd")  # one each, though the total is 2
    assert s.next_requests(0.1) == []  # no more while all are busy and the total is spent


def test_a_restarted_fetch_keeps_what_peers_offered_and_were_told() -> None:
    s = fetcher()
    s.peer_joined("a", Source.SWARM, 0.0)
    s.on_offer("a", bits(1, 2, 3), 0.0)  # a fetches too, and said so
    s.add_held(bits(5), 0.1)
    s.tick(1.0)
    # An import brought blobs 1 and 9: plan again for the rest, same swarm.
    s.want([d for d in SIZES if d not in (bytes([1]) * 32, bytes([9]) * 32)],
           [bytes([1]) * 32, bytes([9]) * 32], 2.0)  # fmt: skip
    assert s.offered_by("a") == bits(1, 2, 3)  # still known
    assert set(fetched(s.next_requests(2.0))["a"]) <= {2, 3}  # 1 is here now
    assert s.tick(3.0) == [Offer("a", bits(1, 9), False)]  # a still hears what is new


def test_a_holder_that_turns_out_first_super_seeds_from_then_on() -> None:
    s = ReleaseSwarm(SIZES, random.Random(2), config=CFG)  # fetching, nothing here yet
    for p in "ab":
        s.peer_joined(p, Source.SWARM, 0.0)  # told "I am in"; they do not know it yet
    s.add_held(ALL, 0.5)  # then an import brought every blob
    s.seed(1.0)  # none came from peers: its first holder
    (to_a,) = s.on_offer("a", 0, 2.0)  # a starts fetching
    assert s.first_holder and to_a.bits.bit_count() == max(CFG.seed_offers, CFG.seed_pipeline // 2)
    (to_b,) = s.on_offer("b", 0, 2.0)
    assert to_b.bits and not to_b.bits & to_a.bits


def test_a_sole_source_is_bounded_by_its_own_cap_in_blobs_and_bytes() -> None:
    # One fast neighbour gets a pipeline deeper than the total for many
    # neighbours (the receiver hash-checks earlier answers meanwhile) ...
    deep = replace(CFG, sole_source=12, max_in_flight=4, sole_bytes=10_000)
    s = ReleaseSwarm(SIZES, random.Random(1), config=deep)
    s.peer_joined("a", Source.SWARM, 0.0)
    s.on_offer("a", ALL, 0.0, interested=False)
    (blobs,) = fetched(s.next_requests(0.0)).values()
    assert len(blobs) == 12
    # ... but never more bytes in flight than sole_bytes (large blobs):
    # the request that crosses the bound is the last one.
    tight = replace(deep, sole_bytes=350)
    s = ReleaseSwarm(SIZES, random.Random(1), config=tight)
    s.peer_joined("a", Source.SWARM, 0.0)
    s.on_offer("a", ALL, 0.0, interested=False)
    (blobs,) = fetched(s.next_requests(0.0)).values()
    sizes = [SIZES[bytes([b]) * 32] for b in blobs]
    assert 3 <= len(blobs) < 12 and sum(sizes[:-1]) < 350 <= sum(sizes)
    # A second holder joins: back to the shared total.
    s.peer_joined("b", Source.SWARM, 0.0)
    s.on_offer("b", ALL, 0.0, interested=False)
    assert sum(map(len, fetched(s.next_requests(0.0)).values())) <= 1


def test_blobs_landed_together_count_as_if_they_landed_one_by_one() -> None:
    one, many = fetcher(seed=4), fetcher(seed=4)
    for s in (one, many):
        for p in "ab":
            s.peer_joined(p, Source.SWARM, 0.0)
        s.on_offer("a", ALL, 0.0, interested=False)
        s.on_offer("b", bits(0, 1, 2, 3), 0.0)  # b is fetching too: it is told
    asked_one, asked_many = fetched(one.next_requests(0.0)), fetched(many.next_requests(0.0))
    assert asked_one == asked_many
    for p, blobs in asked_one.items():
        for blob in blobs:
            one.on_blob(p, blob, True, 0.1)
        many.on_blobs(p, blobs, 0.1)
    assert (one.held, one.wanted, one.bytes_done) == (many.held, many.wanted, many.bytes_done)
    assert [one.in_flight(p) for p in "ab"] == [many.in_flight(p) for p in "ab"] == [0, 0]
    assert one.tick(1.0) == many.tick(1.0) != []  # b hears of the new blobs alike
    assert fetched(one.next_requests(1.0)) == fetched(many.next_requests(1.0))


def test_arrived_bytes_free_the_slot_and_the_blob_is_asked_of_nobody_meanwhile() -> None:
    s = fetcher()
    s.peer_joined("a", Source.SWARM, 0.0)
    s.on_offer("a", ALL, 0.0, interested=False)
    (first,) = fetched(s.next_requests(0.0)).values()
    assert s.next_requests(0.0) == []  # a's pipeline is full
    s.on_arrived("a", first[:2])  # two answers came, still to be checked
    assert s.in_flight("a") == CFG.sole_source - 2
    (more,) = fetched(s.next_requests(0.1)).values()
    assert len(more) == 2 and not set(more) & set(first)  # landing blobs are not re-asked
    assert not s.done
    # One passes its check, the other fails: only the bad one is asked again
    # (of b: a is banned for it).
    s.on_blobs("a", (first[0],), 0.2)
    (punish,) = s.on_blob("a", first[1], False, 0.2)
    assert isinstance(punish, Punish) and punish.peer == "a"
    s.peer_joined("b", Source.SWARM, 0.3)
    s.on_offer("b", bits(*first), 0.3, interested=False)  # of a's first, b has all
    # b is asked for the bad one and those a had in flight when it was banned,
    # not for the one that landed.
    assert sorted(fetched(s.next_requests(0.3))["b"]) == sorted(first[1:])


def test_a_landing_blob_outlives_its_request_timing_out() -> None:
    s = fetcher()
    s.peer_joined("a", Source.SWARM, 0.0)
    s.on_offer("a", bits(0), 0.0, interested=False)
    assert fetched(s.next_requests(0.0)) == {"a": (0,)}
    s.next_requests(CFG.request_timeout + 1)  # timed out: back in the pool ...
    s.on_arrived("a", (0,))  # ... then the answer came after all
    assert s.next_requests(CFG.request_timeout + 2) == []  # it is not asked again
    s.on_blobs("a", (0,), CFG.request_timeout + 3)
    assert s.held == bits(0)


def test_a_capped_link_gets_a_window_it_drains_well_within_the_timeout() -> None:
    base = SwarmConfig(request_timeout=20.0)
    assert base.for_rate(None) == base
    slow = base.for_rate(100_000)  # 100 kB/s: 500 kB in a quarter of 20 s
    assert slow.sole_bytes == 500_000 and slow.sole_source == base.sole_source
    assert base.for_rate(10**12).sole_bytes == base.sole_bytes


def test_the_bytes_in_flight_stay_the_sum_of_the_live_requests() -> None:
    # The sole-source window reads a kept count, not a sum: whatever happens to
    # the requests (answers, timeouts, misses, bad data, leavers, restarts),
    # the count must stay the sum of the live requests' sizes.
    for seed in range(30):
        rng = random.Random(seed)
        s = fetcher(seed)
        now, peers = 0.0, ["a", "b", "c"]
        for p in peers:
            s.peer_joined(p, Source.SWARM, now)
            s.on_offer(p, rng.randrange(1, ALL + 1), now)
        for _ in range(200):
            now += rng.choice((0.0, 0.5, 11.0))
            inflight = list(s._active.items())
            op = rng.randrange(7)
            if op == 0 or not inflight:
                s.next_requests(now)
            elif op == 1:
                blob, peer = rng.choice(inflight)
                s.on_arrived(peer, [blob])
            elif op == 2:
                blob, peer = rng.choice(inflight)
                s.on_blobs(peer, [blob], now)
            elif op == 3:
                blob, peer = rng.choice(inflight)
                s.on_missing(peer, blob, now)
            elif op == 4:
                blob, peer = rng.choice(inflight)
                s.on_blob(peer, blob, False, now)
            elif op == 5:
                p = rng.choice(peers)
                s.peer_left(p)
                s.peer_joined(p, Source.SWARM, now)
                s.on_offer(p, rng.randrange(1, ALL + 1), now)
            else:
                s.want(list(SIZES)[rng.randrange(8) :], [], now)
            assert s._active_bytes == sum(s.index.sizes[b] for b in s._active)

