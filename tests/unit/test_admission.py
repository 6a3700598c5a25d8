"""Admission: per-address caps, slots kept for outbound and static peers, bans by proof."""

from __future__ import annotations

from p2pupd.protocol.fleet.admission import Admission, AdmissionConfig, Admit, Refuse

ME = b"\x50" * 16
CFG = AdmissionConfig(max_peers=6, outbound_reserve=2, max_handshakes=4, per_host=3, max_bans=3)


def nid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def gate() -> Admission:
    return Admission(ME, CFG)


def test_one_address_gets_at_most_per_host_connections() -> None:
    g = gate()
    for _ in range(CFG.per_host):
        assert g.inbound("10.0.0.66") is None
    assert g.inbound("10.0.0.66") == "too many connections from 10.0.0.66"
    assert g.inbound("10.0.0.7") is None  # honest hosts still get in
    # Admitted links count too, until they leave.
    g.handshake_ended("10.0.0.66")
    assert isinstance(g.admit(nid(1), "10.0.0.66", proven=True, outbound=False, now=0), Admit)
    assert g.inbound("::ffff:10.0.0.66") is not None  # one host, however spelled
    g.left(nid(1))
    assert g.inbound("10.0.0.66") is None


def test_handshakes_in_progress_are_bounded() -> None:
    g = gate()
    hosts = [f"10.0.1.{i}" for i in range(CFG.max_handshakes)]
    for h in hosts:
        assert g.inbound(h) is None
    assert g.inbound("10.0.2.1") == "too many handshakes in progress"
    g.handshake_ended(hosts[0])
    assert g.inbound("10.0.2.1") is None


def test_inbound_leaves_room_for_outbound_and_static_peers() -> None:
    g = gate()
    inbound = CFG.max_peers - CFG.outbound_reserve
    for i in range(inbound):
        assert isinstance(g.admit(nid(i), f"10.0.0.{i}", proven=True, outbound=False, now=0), Admit)
    refusal = g.admit(nid(50), "10.0.0.50", proven=True, outbound=False, now=0)
    assert isinstance(refusal, Refuse) and refusal.full
    for i in range(CFG.outbound_reserve):
        assert isinstance(
            g.admit(nid(60 + i), "10.9.0.1", proven=True, outbound=True, now=0), Admit
        )
    assert isinstance(g.admit(nid(70), "10.9.0.2", proven=True, outbound=True, now=0), Refuse)
    static = g.admit(nid(80), "10.9.0.3", proven=True, outbound=True, now=0, static=True)
    assert isinstance(static, Admit)
    assert g.count == CFG.max_peers + 1


def test_an_unproven_offender_is_banned_by_address_not_by_the_id_it_claimed() -> None:
    g = gate()
    honest = nid(7)
    key = g.ban(honest, "10.0.0.66", proven=False, until=100.0, reason="protocol error")
    assert key == "host:10.0.0.66"
    # The honest node, proven, from its own address or even a shared one: in.
    assert isinstance(g.admit(honest, "10.0.0.7", proven=True, outbound=False, now=1), Admit)
    g.left(honest)
    assert isinstance(g.admit(honest, "10.0.0.66", proven=True, outbound=False, now=1), Admit)
    g.left(honest)
    # Anyone unproven from the offender's address: out, until the ban ends.
    refused = g.admit(nid(9), "10.0.0.66", proven=False, outbound=False, now=1)
    assert isinstance(refused, Refuse) and refused.reason == "banned: protocol error"
    assert isinstance(g.admit(nid(9), "10.0.0.66", proven=False, outbound=False, now=100), Admit)


def test_a_proven_offender_is_banned_by_id_and_its_address_stays_usable() -> None:
    g = gate()
    assert (
        g.ban(nid(3), "10.0.0.3", proven=True, until=50.0, reason="bad blob")
        == "id:" + nid(3).hex()
    )
    assert isinstance(g.admit(nid(3), "10.0.0.99", proven=True, outbound=False, now=1), Refuse)
    # Someone unproven claiming the banned id is refused as well.
    assert isinstance(g.admit(nid(3), "10.0.0.98", proven=False, outbound=False, now=1), Refuse)
    assert isinstance(g.admit(nid(4), "10.0.0.3", proven=False, outbound=False, now=1), Admit)
    assert [b["who"] for b in g.bans(1)] == ["id:" + nid(3).hex()]


def test_a_proven_id_wins_over_an_unproven_claim() -> None:
    g = gate()
    assert isinstance(g.admit(nid(5), "10.0.0.66", proven=False, outbound=False, now=0), Admit)
    verdict = g.admit(nid(5), "10.0.0.5", proven=True, outbound=False, now=1)
    assert verdict == Admit(replaces=True)
    again = g.admit(nid(5), "10.0.0.66", proven=False, outbound=False, now=2)
    assert isinstance(again, Refuse) and "with proof" in again.reason


def test_duplicates_keep_the_connection_the_smaller_id_dialled() -> None:
    small, big = gate(), Admission(b"\xff" * 16, CFG)
    # Both dial each other at once; both must keep the same connection.
    peer_small, peer_big = b"\x01" * 16, b"\xff" * 16
    assert isinstance(small.admit(peer_big, "h", proven=True, outbound=True, now=0), Admit)
    assert isinstance(small.admit(peer_big, "h", proven=True, outbound=False, now=0), Refuse)
    assert isinstance(big.admit(ME, "h", proven=True, outbound=False, now=0), Admit)
    assert big.admit(ME, "h", proven=True, outbound=True, now=0) == Refuse("duplicate connection")
    del peer_small
    # A silent old connection yields to a new one whatever the direction.
    assert small.admit(
        peer_big, "h", proven=True, outbound=True, now=5, existing_stale=True
    ) == Admit(replaces=True)


def test_the_ban_table_is_bounded() -> None:
    g = gate()
    for i in range(10):
        g.ban(nid(i), None, proven=True, until=float(i + 10), reason="x")
    bans = g.bans(0)
    assert len(bans) == CFG.max_bans
    assert {b["who"] for b in bans} == {"id:" + nid(i).hex() for i in (7, 8, 9)}
