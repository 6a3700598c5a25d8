"""Signed node reports and the report table: newest wins, replays, forgeries, bounds."""

from __future__ import annotations

import dataclasses

import pytest
from _rollout_kit import COMP, Members, SimNode, committed, failed, rules
from hypothesis import given
from hypothesis import strategies as st

from p2pupd.protocol import encoding
from p2pupd.protocol.errors import BadSignatureError, CodecError, FrameTooLargeError, SchemaError
from p2pupd.protocol.rollout.report import (
    MAX_REASON_BYTES,
    MAX_REPORT_BYTES,
    REPORT_TYPE,
    ComponentReport,
    CompState,
    NodeReport,
    next_seq,
    one_line,
    sign_report,
    verify_report,
)
from p2pupd.protocol.rollout.table import Offer, ReportTable, Screened, Verdict
from p2pupd.protocol.trust import Envelope, sign

ME = SimNode(0)


def table(**kw: object) -> ReportTable:
    return ReportTable(rules(ME), live_seconds=60, gone_seconds=600, **kw)  # type: ignore[arg-type]


def test_report_round_trips_and_names_its_signer() -> None:
    a = SimNode(1)
    raw = a.report(failed(4, 3, "health: exit 1"))
    rep = verify_report(raw)
    assert rep.node_id == a.node_id and rep.seq == 1
    comp = rep.component(COMP)
    assert comp is not None and comp.state is CompState.FAILED and comp.failed(4)
    assert not comp.failed(3)


def test_a_report_signed_by_another_key_than_it_names_is_refused() -> None:
    a, b = SimNode(1), SimNode(2)
    rep = verify_report(a.report())
    with pytest.raises(SchemaError):
        sign_report(rep, b.key)  # refused at the source
    forged = sign(REPORT_TYPE, encoding.encode(rep.to_value()), [b.key]).encode()
    with pytest.raises(Exception) as info:
        verify_report(forged)
    assert info.type.__name__ in ("UnknownKeyError", "BadSignatureError")
    env = Envelope.decode(a.report(), MAX_REPORT_BYTES)
    flipped = Envelope(env.payload.replace(b"linux-x86_64", b"linux-aarch64"), env.signatures)
    with pytest.raises((BadSignatureError, CodecError)):
        verify_report(flipped.encode())


def test_report_bounds() -> None:
    a = SimNode(1)
    with pytest.raises(FrameTooLargeError):
        verify_report(b"\x00" * (MAX_REPORT_BYTES + 1))
    long = ComponentReport(COMP, reason="x" * (MAX_REASON_BYTES + 1), state=CompState.FAILED)
    with pytest.raises(SchemaError):
        NodeReport.from_value(encoding.decode(encoding.encode(
            {**verify_report(a.report()).to_value(), "components": [long.to_value()]})))  # fmt: skip
    many = [ComponentReport(f"c{i:02d}").to_value() for i in range(17)]
    with pytest.raises(SchemaError, match="at most 16"):
        NodeReport.from_value({**verify_report(a.report()).to_value(), "components": many})
    assert len(one_line("boom\n" * 100)) <= MAX_REASON_BYTES and "\n" not in one_line("a\nb")


def test_newest_report_per_node_wins() -> None:
    t, a = table(), SimNode(1)
    first = t.offer(a.report(committed(3)), now=0, wall=0)
    assert first.verdict is Verdict.NEW
    second = t.offer(a.report(committed(4)), now=1, wall=0)
    assert second.verdict is Verdict.NEWER and second.previous == first.report
    entry = t.get(a.node_id)
    assert entry is not None and entry.report.seq == 2 and len(t) == 1


def test_an_older_or_replayed_report_moves_nothing() -> None:
    t, a = table(), SimNode(1)
    old = a.report(committed(3))
    new = a.report(failed(4, 3))
    assert t.offer(new, 0, 0).accepted
    assert t.offer(old, 1, 0).verdict is Verdict.OLDER
    assert t.offer(new, 2, 0).verdict is Verdict.OLDER  # the same one again
    entry = t.get(a.node_id)
    assert entry is not None and entry.raw == new and entry.received == 0


def test_screen_check_admit_is_offer_in_three_steps() -> None:
    """What ``offer`` decides, ``screen`` + ``check`` (in any thread) + ``admit`` decide
    too, counters and all; only reports that may be newer reach the signature check."""
    a, b, far = SimNode(1), SimNode(2), SimNode(3, site="other")
    old, new = a.report(committed(3)), a.report(failed(4, 3))
    env = Envelope.decode(b.report(), MAX_REPORT_BYTES)
    forged = Envelope(env.payload, ((env.signatures[0][0], bytes(64)),)).encode()
    docs = [new, old, new, forged, far.report(), b"\x93garbage", b.report()]
    whole, split = table(), table()
    expect = [whole.offer(d, 0, 0) for d in docs]
    got, checked = [], 0
    for d in docs:
        s = split.screen(d)
        if isinstance(s, Screened):
            checked += 1
            s = split.admit(s, 0, 0, s.check())
        assert isinstance(s, Offer)
        got.append(s)
    assert [o.verdict for o in got] == [o.verdict for o in expect] == [
        Verdict.NEW, Verdict.OLDER, Verdict.OLDER, Verdict.REFUSED, Verdict.REFUSED,
        Verdict.REFUSED, Verdict.NEW,
    ]  # fmt: skip
    assert checked == 4  # the replays were decided before any signature check
    assert (split.refused, split.older, len(split)) == (whole.refused, whole.older, len(whole))


def test_admit_judges_newness_against_the_table_as_it_is_then() -> None:
    t, a = table(), SimNode(1)
    older, newer = a.report(committed(3)), a.report(committed(4))
    s = t.screen(older)
    assert isinstance(s, Screened)  # nothing seen yet: it may be newer
    assert t.offer(newer, 0, 0).accepted  # meanwhile, on the loop, a newer one landed
    assert t.admit(s, 1, 0, s.check()).verdict is Verdict.OLDER
    assert t.get(a.node_id).raw == newer  # type: ignore[union-attr]
    s = t.screen(a.report(committed(5)))
    assert isinstance(s, Screened)
    offer = t.admit(s, 2, 0, "no good")  # the check said the signature does not hold
    assert offer.verdict is Verdict.REFUSED and "no good" in offer.reason


def test_a_replay_after_the_node_went_silent_is_still_refused() -> None:
    t, a = table(), SimNode(1)
    old = a.report(committed(3))
    assert t.offer(a.report(failed(4, 3)), 0, 0).accepted
    assert t.expire(601) == [a.node_id] and t.get(a.node_id) is None
    assert t.offer(old, 602, 0).verdict is Verdict.OLDER  # its mark outlived the report
    assert t.get(a.node_id) is None


def test_reports_from_another_site_or_repository_move_nothing() -> None:
    t = table()
    for stranger in (SimNode(1, site="other"), SimNode(2, repository="someone-else")):
        offer = t.offer(stranger.report(failed(4, 3)), 0, 0)
        assert offer.verdict is Verdict.REFUSED and "site" in offer.reason
    assert len(t) == 0 and t.refused == 2


def test_only_members_count_where_a_membership_exists() -> None:
    a, outsider = SimNode(1), SimNode(2)
    t = ReportTable(rules(ME, members=Members(ME, a)))
    assert t.offer(a.report(), 0, 0).accepted
    offer = t.offer(outsider.report(failed(4, 3)), 0, 0)
    assert offer.verdict is Verdict.REFUSED and "not a member" in offer.reason
    # A member's id with another key (a stolen id, not a stolen key) is refused too.
    impostor = SimNode(3)
    impostor_report = dataclasses.replace(
        verify_report(impostor.report()), node_id=a.node_id, seq=99
    )
    assert t.offer(sign_report(impostor_report, impostor.key), 0, 0).verdict is Verdict.REFUSED


def test_a_report_carries_its_authors_credential_to_nodes_that_never_met_it() -> None:
    a = SimNode(1)
    t = ReportTable(rules(ME, members=Members(ME, a)))
    raw = a.report(credential=a.node_id)  # the kit's stand-in for a certificate
    assert verify_report(raw).credential == a.node_id
    assert t.offer(raw, 0, 0).accepted
    offer = t.offer(a.report(credential=b"someone else's"), 1, 0)
    assert offer.verdict is Verdict.REFUSED and "not a member" in offer.reason
    plain = verify_report(a.report())
    assert "credential" not in plain.to_value()  # encoded only when there is one


def test_on_an_open_site_a_key_speaks_only_for_the_node_id_it_hashes_to() -> None:
    """The swarm's binding (protocol/fleet/identity.py): an id is the hash of its key.
    Whether or not the real node was heard first, a report naming its id under
    another key is refused, and so is a report under an invented id."""
    t, a, b = table(), SimNode(1), SimNode(2)
    stolen = dataclasses.replace(verify_report(b.report()), node_id=a.node_id, seq=50)
    offer = t.offer(sign_report(stolen, b.key), 0, 0)  # before a was ever heard
    assert offer.verdict is Verdict.REFUSED and "not the node id of the key" in offer.reason
    assert t.offer(a.report(), 1, 0).accepted
    later = dataclasses.replace(stolen, seq=60)
    assert t.offer(sign_report(later, b.key), 2, 0).verdict is Verdict.REFUSED
    invented = dataclasses.replace(verify_report(b.report()), node_id=b"\x07" * 16)
    assert t.offer(sign_report(invented, b.key), 3, 0).verdict is Verdict.REFUSED
    assert {e.report.node_id for e in t} == {a.node_id} and t.refused == 3
    assert t.get(a.node_id) is not None and t.get(a.node_id).report.node_key == a.public  # type: ignore[union-attr]


def test_in_a_site_the_credential_binds_an_older_random_id_to_its_key() -> None:
    """A member enrolled under an older version's random id keeps it: its credential
    names id and key, so its reports count though the id is not the key's hash."""
    legacy = SimNode(5)

    class Legacy(Members):
        def __init__(self) -> None:
            super().__init__(ME)
            self.keys[b"\x05" * 16] = legacy.public

    t = ReportTable(rules(ME, members=Legacy()))
    rep = dataclasses.replace(verify_report(legacy.report()), node_id=b"\x05" * 16, seq=9)
    assert t.offer(sign_report(rep, legacy.key), 0, 0).accepted
    # ...and its key speaks for no other id, not even the one it hashes to.
    assert t.offer(legacy.report(seq=10), 1, 0).verdict is Verdict.REFUSED


def test_garbage_is_refused_not_raised() -> None:
    t = table()
    for junk in (b"", b"\xc1", encoding.encode({"signed": b"x", "signatures": []}), b"\x00" * 9000):
        assert t.offer(junk, 0, 0).verdict is Verdict.REFUSED
    assert len(t) == 0


def test_the_table_is_bounded() -> None:
    t = ReportTable(rules(ME), capacity=5, live_seconds=60, gone_seconds=600)
    nodes = [SimNode(i) for i in range(1, 21)]
    for i, n in enumerate(nodes):
        assert t.offer(n.report(), float(i), 0).accepted
    assert len(t) == 5
    assert {e.report.node_id for e in t} == {n.node_id for n in nodes[-5:]}  # least recent out
    assert len(t._marks) <= 10


def test_liveness_and_expiry() -> None:
    t, a = table(), SimNode(1)
    t.offer(a.report(), 100, 0)
    entry = t.get(a.node_id)
    assert entry is not None and t.is_live(entry, 160) and not t.is_live(entry, 161)
    assert t.expire(700) == [] and t.expire(701) == [a.node_id]


def test_restore_keeps_marks_and_makes_reports_known_but_not_live() -> None:
    t, a, b = table(), SimNode(1), SimNode(2)
    old_a = a.report(committed(3))
    t.offer(a.report(committed(4)), 0, 0)
    t.offer(b.report(), 0, 0)
    saved = encoding.decode(encoding.encode(t.to_value()))
    u = table()
    assert u.restore(saved, now=1000, wall=0) == 2
    entry = u.get(a.node_id)
    assert entry is not None and not u.is_live(entry, 1000)
    assert u.offer(old_a, 1000, 0).verdict is Verdict.OLDER
    assert u.offer(a.report(committed(5)), 1001, 0).verdict is Verdict.NEWER


def test_summary_tells_a_peer_what_it_lacks() -> None:
    t, a, b = table(), SimNode(1), SimNode(2)
    t.offer(a.report(), 0, 0)
    t.offer(b.report(), 0, 0)
    t.offer(b.report(), 0, 0)
    assert t.newer_than({a.node_id: 1, b.node_id: 1}) == [t.get(b.node_id).raw]  # type: ignore[union-attr]
    assert len(t.newer_than({})) == 2


@given(st.lists(st.integers(0, 1 << 50), min_size=1, max_size=50))
def test_seq_only_grows_even_when_the_clock_steps_back(clock: list[int]) -> None:
    last = 0
    for wall_ms in clock:
        nxt = next_seq(last, wall_ms)
        assert nxt > last and nxt >= wall_ms
        last = nxt


@given(st.permutations(list(range(1, 9))))
def test_the_newest_report_wins_whatever_the_arrival_order(order: list[int]) -> None:
    a = SimNode(7)
    raws = {s: a.report(committed(s), seq=s) for s in range(1, 9)}
    t = table()
    for s in order:
        t.offer(raws[s], 0, 0)
    entry = t.get(a.node_id)
    assert entry is not None and entry.report.seq == 8
