"""The partial view: bounded links, joins that always get in, refusals with referrals."""

from __future__ import annotations

import random

from p2pupd.protocol.fleet.view import Close, Dial, Kind, PeerView, Send, ViewConfig
from p2pupd.protocol.wire import ForwardJoin, PeerAddr, Ping, Shuffle

CFG = ViewConfig(target=4, max_active=6, max_passive=8, join_budget=2, keepalive=10.0,
                 idle_timeout=30.0, shuffle_interval=20.0)  # fmt: skip


def addr(i: int) -> PeerAddr:
    return PeerAddr(f"10.0.0.{i}", 7707)


def view(cfg: ViewConfig = CFG, seed: int = 1) -> PeerView[str]:
    return PeerView(addr(0), random.Random(seed), cfg)


def fill(v: PeerView[str], n: int, now: float = 0.0, first: int = 1) -> None:
    """``n`` inbound LOW links from peers p<first>.. (accepted while there is room)."""
    for i in range(first, first + n):
        v.connected(f"p{i}", addr(i), outbound=False, capable=True, now=now)
        assert v.on_neighbor(f"p{i}", Kind.FORWARD, now) == []


def test_a_join_to_a_full_node_evicts_one_peer_and_starts_walks() -> None:
    v = view()
    fill(v, CFG.max_active)
    v.connected("new", addr(50), outbound=False, capable=True, now=1.0)
    acts = v.on_neighbor("new", Kind.JOIN, 1.0)
    closes = [a for a in acts if isinstance(a, Close)]
    assert len(closes) == 1 and closes[0].peer.startswith("p") and closes[0].referrals
    walks = [a for a in acts if isinstance(a, Send) and isinstance(a.msg, ForwardJoin)]
    assert walks and all(a.msg == ForwardJoin("10.0.0.50", 7707, CFG.join_ttl) for a in walks)
    assert any(isinstance(a, Send) and a.peer == "new" and isinstance(a.msg, Shuffle)
               for a in acts)  # fmt: skip
    assert "new" in v.active
    v.disconnected(closes[0].peer, 1.0)
    assert v.degree == CFG.max_active


def test_evicting_joins_are_rate_limited() -> None:
    v = view()
    fill(v, CFG.max_active)
    evicted = 0
    for i in range(5):
        peer = f"j{i}"
        v.connected(peer, addr(60 + i), outbound=False, capable=True, now=1.0)
        acts = v.on_neighbor(peer, Kind.JOIN, 1.0)
        refused = [a for a in acts if isinstance(a, Close) and a.peer == peer]
        if not refused:
            evicted += 1
            victim = next(a.peer for a in acts if isinstance(a, Close))
            v.disconnected(victim, 1.0)
        else:
            v.disconnected(peer, 1.0)
    assert evicted == CFG.join_budget  # the rest were told "full"
    assert v.degree == CFG.max_active


def test_low_requests_stop_at_the_middle_of_target_and_max() -> None:
    v = view()
    fill(v, CFG.low_limit)
    v.connected("late", addr(70), outbound=False, capable=True, now=0.0)
    (close,) = v.on_neighbor("late", Kind.LOW, 0.0)
    assert isinstance(close, Close) and close.reason == "view full"
    assert len(close.referrals) > 0 and addr(70) not in close.referrals
    # A forwarded join still fits: the room above low_limit is kept for joiners.
    v.disconnected("late", 0.0)
    v.connected("walk", addr(71), outbound=False, capable=True, now=0.0)
    assert v.on_neighbor("walk", Kind.FORWARD, 0.0) == []


def test_a_refused_address_is_not_redialled_before_its_backoff() -> None:
    v = view()
    v.add_known([addr(1)], 0.0)
    (dial,) = v.tick(0.0)
    assert dial == Dial(addr(1), Kind.JOIN)
    assert v.refused(addr(1), 0.5, [addr(2), addr(3)]) != []  # dials a referral instead
    for t in (1.0, 50.0, CFG.refused_backoff - 1):
        assert all(not (isinstance(a, Dial) and a.addr == addr(1)) for a in v.tick(t))
    assert set(v.passive) >= {addr(1)}


def test_failed_dials_back_off_and_are_forgotten() -> None:
    v = view()
    v.add_known([addr(1)], 0.0)
    now = 0.0
    for _ in range(4):
        acts = v.tick(now)
        assert Dial(addr(1), Kind.JOIN) in acts
        v.dial_failed(addr(1), now)
        assert v.tick(now + 0.1) == []  # backing off
        now += CFG.dial_backoff_max
    assert addr(1) not in v.passive


def test_dials_only_while_below_target_and_at_most_max_dialing() -> None:
    v = view()
    v.add_known([addr(i) for i in range(1, 9)], 0.0)
    dials = [a for a in v.tick(0.0) if isinstance(a, Dial)]
    assert len(dials) == CFG.max_dialing
    assert [d.kind for d in dials] == [Kind.JOIN, Kind.HIGH]
    for i, d in enumerate(dials):
        v.connected(f"o{i}", d.addr, outbound=True, capable=True, now=0.0, kind=d.kind)
    fill(v, CFG.target - 2, first=20)
    assert v.degree == CFG.target
    assert [a for a in v.tick(1.0) if isinstance(a, Dial)] == []
    assert not v.bootstrap_wanted(1.0)


def test_a_dial_that_completes_into_a_view_filled_meanwhile_is_closed() -> None:
    v = view()
    v.add_known([addr(1)], 0.0)
    (dial,) = [a for a in v.tick(0.0) if isinstance(a, Dial)]
    fill(v, CFG.max_active, first=20)  # inbound links arrive while the dial runs
    acts = v.connected("late", dial.addr, outbound=True, capable=True, now=1.0, kind=dial.kind)
    assert [a.peer for a in acts if isinstance(a, Close)] == ["late"]
    assert v.degree == CFG.max_active and "late" not in v.active
    v.disconnected("late", 1.0)
    assert v.degree == CFG.max_active


def test_links_are_pinged_when_quiet_and_closed_when_silent() -> None:
    v = view()
    fill(v, 1)
    v.connected("old", addr(9), outbound=False, capable=False, now=0.0)  # older version
    assert Send("p1", Ping()) in v.tick(CFG.keepalive)
    v.sent("p1", CFG.keepalive)
    assert Send("p1", Ping()) not in v.tick(CFG.keepalive + 1)
    acts = v.tick(CFG.idle_timeout)
    assert any(isinstance(a, Close) and a.peer == "p1" for a in acts)
    assert not any(getattr(a, "peer", None) == "old" for a in acts)  # never timed out


def test_an_inbound_link_that_never_says_why_is_closed() -> None:
    v = view()
    v.connected("mute", addr(5), outbound=False, capable=True, now=0.0)
    assert v.degree == 0
    acts = v.tick(CFG.neighbor_timeout)
    assert any(isinstance(a, Close) and a.peer == "mute" for a in acts)


def test_forward_join_ends_where_there_is_room_else_walks_on() -> None:
    v = view()
    fill(v, 2)  # below target: takes the joiner
    assert v.on_forward_join("p1", ForwardJoin("10.0.0.40", 7707, 3), 0.0) == [
        Dial(addr(40), Kind.FORWARD)
    ]
    full = view(seed=2)
    fill(full, CFG.target)
    (act,) = full.on_forward_join("p1", ForwardJoin("10.0.0.41", 7707, 3), 0.0)
    assert (
        isinstance(act, Send) and act.peer != "p1" and act.msg == ForwardJoin("10.0.0.41", 7707, 2)
    )
    full.on_forward_join("p1", ForwardJoin("10.0.0.42", 7707, CFG.passive_ttl), 0.0)
    assert addr(42) in full.passive  # left in the passive view on its way


def test_shuffle_answers_with_a_sample_and_learns_addresses() -> None:
    v = view()
    fill(v, 3)
    v.add_known([addr(30), addr(31)], 0.0)
    (reply,) = v.on_shuffle("p1", Shuffle(False, (addr(80), addr(81))), 0.0)
    assert isinstance(reply, Send) and reply.peer == "p1" and reply.msg.reply  # type: ignore[attr-defined]
    sample = reply.msg.peers  # type: ignore[attr-defined]
    assert sample[0] == addr(0) and addr(1) not in sample
    assert {addr(80), addr(81)} <= set(v.passive)
    # Periodically, a shuffle goes to one neighbour.
    sends = [a for a in v.tick(CFG.shuffle_interval * 2) if isinstance(a, Send)]
    assert any(isinstance(a.msg, Shuffle) and not a.msg.reply for a in sends)


def test_the_passive_view_is_bounded_but_keeps_static_peers() -> None:
    v = view()
    v.add_static(addr(200))
    v.add_known([addr(i) for i in range(1, 100)], 0.0)
    assert len(v.passive) == CFG.max_passive + 1
    assert addr(200) in v.passive


def test_static_peers_are_dialled_whatever_the_size_and_never_evicted() -> None:
    v = view()
    v.add_static(addr(200))
    fill(v, CFG.max_active)
    assert Dial(addr(200), Kind.LOW) in v.tick(0.0)
    v.connected("s", addr(200), outbound=True, capable=True, now=0.0, kind=Kind.LOW)
    assert "s" in v.active
    for i in range(CFG.join_budget):
        v.connected(f"j{i}", addr(90 + i), outbound=False, capable=True, now=1.0)
        acts = v.on_neighbor(f"j{i}", Kind.JOIN, 1.0)
        assert all(not (isinstance(a, Close) and a.peer == "s") for a in acts)
        for a in acts:
            if isinstance(a, Close):
                v.disconnected(a.peer, 1.0)
    v.disconnected("s", 2.0)
    assert addr(200) in v.passive  # never forgotten


def test_unproven_links_make_room_first() -> None:
    v = view()
    fill(v, CFG.max_active - 1)
    v.connected("sus", addr(77), outbound=False, capable=True, now=0.0, trusted=False)
    assert v.on_neighbor("sus", Kind.FORWARD, 0.0) == []
    v.connected("new", addr(78), outbound=False, capable=True, now=1.0)
    acts = v.on_neighbor("new", Kind.JOIN, 1.0)
    assert [a.peer for a in acts if isinstance(a, Close)] == ["sus"]


def test_bootstrap_is_wanted_only_while_the_view_is_low_and_passive_is_empty() -> None:
    v = view()
    assert v.bootstrap_wanted(0.0)
    v.add_known([addr(1)], 0.0)
    assert not v.bootstrap_wanted(0.0)  # something to dial
    v.tick(0.0)
    v.dial_failed(addr(1), 0.0)
    assert v.bootstrap_wanted(0.5)
    fill(v, CFG.target // 2)
    assert not v.bootstrap_wanted(0.5)
