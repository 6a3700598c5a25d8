"""The apply gate: waves and soak on a virtual clock, the brake, operator actions,
forged, replayed and out-of-site input, partial views."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

from _rollout_kit import COMP, Members, SimNode, committed, failed, rules, running
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pupd.protocol.rollout.actions import ActionKind, OperatorAction, sign_action
from p2pupd.protocol.rollout.decide import Decision, Go, Release, decide
from p2pupd.protocol.rollout.ledger import ActionVerdict, Ledger
from p2pupd.protocol.rollout.policy import RolloutPolicy
from p2pupd.protocol.rollout.report import sign_report, verify_report
from p2pupd.protocol.rollout.table import ReportTable
from p2pupd.protocol.rollout.waves import place

POLICY = RolloutPolicy.parse("waves=1,25%,50% soak=60s halt-after=1")
NEW = 5  # the serial being rolled out; every node runs 4


@dataclass
class View:
    """One node's view: its table and ledger."""

    me: SimNode
    operators: tuple[SimNode, ...] = ()
    members: Members | None = None
    table: ReportTable = field(init=False)
    ledger: Ledger = field(init=False)

    def __post_init__(self) -> None:
        r = rules(self.me, operators=self.operators, members=self.members)
        self.table = ReportTable(r, live_seconds=120, gone_seconds=3600)
        self.ledger = Ledger(r)

    def hear(self, raw: bytes, now: float = 0) -> bool:
        offer = self.table.offer(raw, now, 0)
        if offer.accepted and offer.report is not None:
            self.ledger.observe(offer.report)
        return offer.accepted

    def act(self, raw: bytes) -> ActionVerdict:
        return self.ledger.act(raw, 0)[0]

    def decide(
        self, now: float = 0, policy: RolloutPolicy | None = POLICY, settled: bool = True
    ) -> Decision:
        return decide(Release(COMP, NEW, policy), self.me.node_id, self.me.platform, self.table,
                      self.ledger, now, settled=settled)  # fmt: skip


def site(n: int, **kw: object) -> tuple[list[SimNode], list[View]]:
    nodes = [SimNode(i) for i in range(n)]
    views = [View(node, **kw) for node in nodes]  # type: ignore[arg-type]
    for node in nodes:
        raw = node.report(running(4))
        for v in views:
            v.hear(raw)
    return nodes, views


def order(nodes: list[SimNode]) -> list[SimNode]:
    by_id = {n.node_id: n for n in nodes}
    return [by_id[i] for i in place(POLICY, COMP, NEW, by_id).order]


# ----- waves and soak on a virtual clock ---------------------------------------------


@dataclass
class Sim:
    """A site of nodes that apply when ``decide`` says so and report every step."""

    n: int
    failing: set[int] = field(default_factory=set)  # node numbers whose health check fails
    nodes: list[SimNode] = field(init=False)
    views: list[View] = field(init=False)
    applied_at: dict[int, int] = field(default_factory=dict)
    state: dict[int, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.nodes, self.views = site(self.n)

    def run(self, until: int, step: int = 10, refresh: int = 30) -> None:
        """Every ``step`` s each node decides; it reports on a change and every ``refresh`` s."""
        for now in range(0, until, step):
            for node, view in zip(self.nodes, self.views, strict=True):
                changed = False
                if node.n not in self.applied_at and view.decide(now).allowed:
                    self.applied_at[node.n] = now
                    self.state[node.n] = (
                        failed(NEW, 4) if node.n in self.failing else committed(NEW, since=now)
                    )
                    changed = True
                if changed or now % refresh == 0:
                    comp = self.state.get(node.n, running(4))
                    raw = node.report(comp, created=now)  # type: ignore[arg-type]
                    for v in self.views:
                        v.hear(raw, now)


def test_waves_proceed_in_order_each_after_the_previous_soaked() -> None:
    sim = Sim(12)
    sim.run(until=600)
    assert len(sim.applied_at) == 12  # everyone, in the end
    ranked = order(sim.nodes)
    bounds = place(POLICY, COMP, NEW, [n.node_id for n in ranked]).bounds
    assert bounds == (1, 3, 6, 12)
    waves = [[sim.applied_at[n.n] for n in ranked[lo:hi]] for lo, hi in
             zip((0, *bounds), bounds, strict=False)]  # fmt: skip
    assert waves[0] == [0]  # the canary goes at once
    for earlier, later in itertools.pairwise(waves):
        assert min(later) >= max(earlier) + 60  # never before the whole earlier wave soaked
        assert min(later) <= max(earlier) + 60 + 40  # and promptly (next report, next step)


def test_a_failing_canary_stops_the_release_everywhere() -> None:
    probe = Sim(12)
    canary = order(probe.nodes)[0].n
    sim = Sim(12, failing={canary})
    sim.run(until=600)
    assert sim.applied_at == {canary: 0}  # nobody else, ever
    for view in sim.views:
        d = view.decide(600)
        assert d.go is Go.BRAKE and "health check failed" in d.reason


def test_a_silent_earlier_wave_holds_the_next_one_back() -> None:
    nodes, views = site(8)
    ranked = order(nodes)
    canary, second = ranked[0], views[nodes.index(ranked[1])]
    second.hear(canary.report(committed(NEW, since=0), created=100), now=100)
    assert second.decide(now=100).allowed  # committed, soaked 100 s >= 60 s, live
    assert second.decide(now=221).go is Go.WAIT  # the canary's report is no longer live
    assert "silent" in second.decide(now=221).reason


def test_soak_is_measured_on_the_reporting_node_clock() -> None:
    nodes, views = site(8)
    ranked = order(nodes)
    canary, second = ranked[0], views[nodes.index(ranked[1])]
    # The canary's clock is far ahead of everyone's: only its own difference counts.
    second.hear(canary.report(committed(NEW, since=10_000_000), created=10_000_030), now=5)
    d = second.decide(now=5)
    assert d.go is Go.WAIT and "soaking, 30 s left" in d.reason
    second.hear(canary.report(committed(NEW, since=10_000_000), created=10_000_061), now=6)
    assert second.decide(now=6).allowed


def test_a_node_that_moved_past_the_release_does_not_hold_waves_back() -> None:
    nodes, views = site(8)
    ranked = order(nodes)
    second = views[nodes.index(ranked[1])]
    second.hear(ranked[0].report(committed(NEW + 1, since=0), created=1), now=1)
    assert second.decide(now=1).allowed


# ----- partial views --------------------------------------------------------------------


def test_a_fresh_node_does_not_place_itself_before_it_settled() -> None:
    alone = View(SimNode(0))
    assert alone.decide(settled=False).go is Go.SETTLING
    assert alone.decide(settled=True).allowed  # a site of one is its own canary


def test_a_partitioned_node_waits_for_the_nodes_it_knows() -> None:
    nodes, views = site(12)
    last = views[nodes.index(order(nodes)[-1])]
    d = last.decide(now=0)
    assert d.go is Go.WAIT and d.wave == 3 and len(d.waiting) == 6
    # Cut off for long: the others' reports stay known (ranking) but are not live.
    assert last.decide(now=3000).go is Go.WAIT


# ----- the brake ------------------------------------------------------------------------


def test_failures_anywhere_in_the_site_brake_every_wave() -> None:
    nodes, views = site(12)
    ranked = order(nodes)
    arm = SimNode(99, platform="linux-aarch64")
    for v in views:
        v.hear(arm.report(failed(NEW, 4, "pre-apply hook: exit 3")))
    for node, v in zip(nodes, views, strict=True):
        d = v.decide()
        assert d.go is Go.BRAKE and "pre-apply hook: exit 3" in d.reason, node
    assert not views[nodes.index(ranked[0])].decide().allowed  # not even the canary


def test_forged_and_out_of_site_failures_move_nothing() -> None:
    nodes, views = site(6)
    canary_view = views[nodes.index(order(nodes)[0])]
    liar, stranger = SimNode(50), SimNode(51, site="elsewhere")
    raw = bytearray(liar.report(failed(NEW, 4)))
    raw[-5] ^= 1  # a failure report whose signature does not hold
    assert not canary_view.hear(bytes(raw))
    assert not canary_view.hear(stranger.report(failed(NEW, 4)))
    assert canary_view.decide().allowed


def test_a_key_speaks_only_for_its_own_node_id() -> None:
    """Open site: an id is the hash of its key (the swarm's node-id binding). A
    failure pinned on the canary by another key, a halt or an operator's resume
    naming an id that is not the signer's: all refused, nothing moves."""
    op, liar = SimNode(40), SimNode(50)
    nodes, views = site(6, operators=(op,))
    ranked = order(nodes)
    v = views[nodes.index(ranked[0])]
    framed = replace(verify_report(liar.report(failed(NEW, 4))), node_id=ranked[1].node_id)
    assert not v.hear(sign_report(framed, liar.key))
    assert v.table.get(ranked[1].node_id).report.node_key == ranked[1].public  # type: ignore[union-attr]
    assert v.decide().allowed
    for signer, kind in ((liar, ActionKind.HALT), (op, ActionKind.RESUME)):
        act = OperatorAction(kind, COMP, NEW, ranked[2].node_id, signer.public, "p2pupd",
                             "default", 1000)  # fmt: skip
        verdict, reason, _ = v.ledger.act(sign_action(act, signer.key), 0)
        assert verdict is ActionVerdict.REFUSED and "not the node id of the key" in reason
    assert v.decide().allowed


def test_a_replayed_report_cannot_hide_a_failure() -> None:
    nodes, views = site(6)
    ranked = order(nodes)
    canary, second = ranked[0], views[nodes.index(ranked[1])]
    before = canary.report(committed(NEW, since=0), created=500)  # true, then
    second.hear(canary.report(failed(NEW, 4), created=510), now=10)
    assert second.decide(now=10).go is Go.BRAKE
    assert not second.hear(before, now=11)  # older: refused
    assert second.decide(now=11).go is Go.BRAKE
    second.table.expire(now=10_000)  # the failing node falls silent and is forgotten
    assert second.table.get(canary.node_id) is None
    assert second.decide(now=10_000).go is Go.BRAKE  # the ledger is sticky


def test_a_budget_above_one_lets_waves_pass_a_single_failure() -> None:
    policy = RolloutPolicy.parse("waves=1,50% soak=0 halt-after=2")
    nodes, views = site(4)
    ids = [n.node_id for n in nodes]
    ranked = [nodes[ids.index(i)] for i in place(policy, COMP, NEW, ids).order]
    v = views[nodes.index(ranked[1])]
    v.hear(ranked[0].report(failed(NEW, 4), created=1), now=1)
    assert v.decide(now=1, policy=policy).allowed  # the failed canary is within budget
    v.hear(ranked[2].report(failed(NEW, 4), created=1), now=1)
    assert v.decide(now=1, policy=policy).go is Go.BRAKE


# ----- operator actions ------------------------------------------------------------------


def test_halt_and_resume() -> None:
    op = SimNode(40)
    nodes, views = site(6, operators=(op,))
    v = views[nodes.index(order(nodes)[0])]
    halt = nodes[3].action(ActionKind.HALT, NEW, reason="smoke in rack 4")
    assert v.act(halt) is ActionVerdict.ACCEPTED
    d = v.decide()
    assert d.go is Go.HALTED and "smoke in rack 4" in d.reason
    assert v.decide(policy=None).go is Go.HALTED  # a halt stops policy-less releases too
    led = v.ledger.get(COMP, NEW)
    assert led is not None
    resume = op.action(ActionKind.RESUME, NEW, ack_halts=tuple(led.halts))
    assert v.act(resume) is ActionVerdict.ACCEPTED
    assert v.decide().allowed
    assert v.act(halt) is ActionVerdict.DUPLICATE  # a replayed halt stays lifted
    assert v.act(resume) is ActionVerdict.DUPLICATE
    assert v.decide().allowed
    later = nodes[2].action(ActionKind.HALT, NEW, reason="again")
    assert v.act(later) is ActionVerdict.ACCEPTED
    assert v.decide().go is Go.HALTED  # the resume did not know this halt


def test_a_forged_resume_is_refused() -> None:
    op, intruder = SimNode(40), SimNode(41)
    nodes, views = site(6, operators=(op,))
    v = views[0]
    v.hear(nodes[1].report(failed(NEW, 4)))
    assert v.decide().go is Go.BRAKE
    for bad in (
        nodes[2].action(ActionKind.RESUME, NEW, ack_failures=1),  # a member, not an operator
        intruder.action(ActionKind.RESUME, NEW, ack_failures=1),  # not even a member
        SimNode(40, site="elsewhere").action(ActionKind.RESUME, NEW, ack_failures=1),
    ):
        assert v.act(bad) is ActionVerdict.REFUSED
    tampered = bytearray(op.action(ActionKind.RESUME, NEW, ack_failures=1))
    tampered[-3] ^= 1
    assert v.act(bytes(tampered)) is ActionVerdict.REFUSED
    assert v.decide().go is Go.BRAKE


def test_membership_decides_who_may_halt_and_resume() -> None:
    op, outsider = SimNode(40), SimNode(41)
    nodes = [SimNode(i) for i in range(4)]
    members = Members(*nodes)  # the operator's node is not enrolled
    v = View(nodes[0], operators=(op,), members=members)
    assert v.act(outsider.action(ActionKind.HALT, NEW)) is ActionVerdict.REFUSED
    assert v.act(nodes[1].action(ActionKind.HALT, NEW)) is ActionVerdict.ACCEPTED
    assert v.act(op.action(ActionKind.RESUME, NEW)) is ActionVerdict.REFUSED


def test_a_resume_acknowledges_only_the_failures_it_saw() -> None:
    op = SimNode(40)
    nodes, views = site(6, operators=(op,))
    v = views[0]
    v.hear(nodes[1].report(failed(NEW, 4)))
    assert v.decide().go is Go.BRAKE
    assert v.act(op.action(ActionKind.RESUME, NEW, ack_failures=1)) is ActionVerdict.ACCEPTED
    assert v.decide().go is not Go.BRAKE
    v.hear(nodes[2].report(failed(NEW, 4)))
    assert v.decide().go is Go.BRAKE  # a second failure: the brake pulls again


def test_skip_wave_waives_a_dead_canary() -> None:
    op = SimNode(40)
    nodes, views = site(8, operators=(op,))
    ranked = order(nodes)
    second = views[nodes.index(ranked[1])]
    assert second.decide().go is Go.WAIT
    member = ranked[5]  # a member, not an operator, and not this node: may not skip
    assert second.act(member.action(ActionKind.SKIP_WAVE, NEW, wave=0)) is ActionVerdict.REFUSED
    assert second.decide().go is Go.WAIT
    assert second.act(op.action(ActionKind.SKIP_WAVE, NEW, wave=0)) is ActionVerdict.ACCEPTED
    assert second.decide().allowed
    # Waves of 8 nodes are (1, 2, 4, 8): the third node is in wave 2 and still
    # waits for wave 1, which the skip did not waive.
    third = views[nodes.index(ranked[2])]
    third.act(op.action(ActionKind.SKIP_WAVE, NEW, wave=0))
    d = third.decide()
    assert d.go is Go.WAIT and d.waiting == (ranked[1].node_id,) and "not applied" in d.reason


def test_a_node_honours_its_own_actions() -> None:
    nodes, views = site(4)
    v = views[2]
    v.hear(nodes[1].report(failed(NEW, 4)))
    assert v.act(nodes[2].action(ActionKind.RESUME, NEW, ack_failures=1)) is ActionVerdict.ACCEPTED
    assert v.decide().go is not Go.BRAKE
    assert views[3].act(nodes[2].action(ActionKind.RESUME, NEW, ack_failures=1)) is (
        ActionVerdict.REFUSED
    )


def test_no_policy_applies_on_arrival() -> None:
    nodes, views = site(5)
    for v in views:
        v.hear(nodes[0].report(failed(NEW, 4)))
        assert v.decide(policy=None).allowed  # no budget: no brake (as before rollouts)


# ----- properties -------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_facts_in_any_order_give_the_same_gate(data: st.DataObject) -> None:
    """Reports and actions commute: two nodes that saw the same things, in any
    order and with replays, agree on halt and brake."""
    op = SimNode(40)
    nodes = [SimNode(i) for i in range(5)]
    facts: list[tuple[str, bytes]] = [("r", n.report(running(4))) for n in nodes]
    facts += [("r", nodes[1].report(failed(NEW, 4)))]
    facts += [("a", nodes[2].action(ActionKind.HALT, NEW))]
    h = nodes[3].action(ActionKind.HALT, NEW)
    facts += [("a", h)]
    from p2pupd.protocol.rollout.actions import verify_action

    facts += [("a", op.action(ActionKind.RESUME, NEW, ack_failures=1,
                               ack_halts=(verify_action(h)[1],)))]  # fmt: skip
    if data.draw(st.booleans()):
        facts += [("r", nodes[4].report(failed(NEW, 4)))]
    outcomes = set()
    for _ in range(3):
        seq = data.draw(
            st.permutations(facts + data.draw(st.lists(st.sampled_from(facts), max_size=4)))
        )
        v = View(SimNode(0), operators=(op,))
        for kind, raw in seq:
            v.hear(raw) if kind == "r" else v.act(raw)
        d = v.decide()
        outcomes.add((d.go, d.reason))
    assert len(outcomes) == 1
    assert next(iter(outcomes))[0] is Go.HALTED  # one halt was never lifted


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 14), st.data())
def test_no_node_applies_while_the_brake_holds(n: int, data: st.DataObject) -> None:
    budget = data.draw(st.integers(1, min(3, n)))
    policy = RolloutPolicy.parse(f"waves=1,10%,50% soak=0 halt-after={budget}")
    nodes, views = site(n)
    fails = data.draw(st.sets(st.integers(0, n - 1), min_size=budget, max_size=n))
    for i in fails:
        raw = nodes[i].report(failed(NEW, 4))
        for v in views:
            v.hear(raw)
    for v in views:
        assert v.decide(policy=policy).go is Go.BRAKE
