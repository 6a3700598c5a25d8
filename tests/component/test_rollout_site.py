"""Rollouts in a site (members over TLS, in-process, MockClock): only members' reports
and actions count, each checked by the credential it carries, also two hops from its
author; a member cannot speak for an invented node; a revoked member leaves every view."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trio
import trio.testing
from _daemonkit import Site, link, make_service, wait_until
from _kit import cli
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_site_gossip import member

from p2pupd.daemon.bundles.siterequest import node_key
from p2pupd.daemon.service import control
from p2pupd.daemon.service.nodeservice import NodeService
from p2pupd.daemon.service.rollout.service import RolloutOptions
from p2pupd.protocol.rollout.actions import ActionKind, OperatorAction, sign_action
from p2pupd.protocol.rollout.ledger import ActionVerdict
from p2pupd.protocol.rollout.report import sign_report, verify_report
from p2pupd.protocol.rollout.table import Verdict


def seen(svc: NodeService) -> set[bytes]:
    table = svc.rollout.table
    return {e.report.node_id for e in table} if table is not None else set()


async def test_only_members_count_in_the_site_view(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    site = Site(tmp_path)
    site_dir = tmp_path / "sitedir"
    cli("site", "init", site_dir, "--name", "plant-9")
    states = {n: member(site, site_dir, n) for n in "abcd"}
    opts = RolloutOptions(settle=5.0, report_interval=60.0)
    svc = {n: make_service(s, seed=i, rollout=opts) for i, (n, s) in enumerate(states.items())}
    ids = {n: s.node.config.node_id for n, s in svc.items()}
    async with trio.open_nursery() as nursery:
        for s in svc.values():
            await nursery.start(s.serve)
        link(nursery, svc["a"], svc["b"])  # a line: a's report reaches d two hops away
        link(nursery, svc["b"], svc["c"])
        link(nursery, svc["c"], svc["d"])
        await wait_until(lambda: all(seen(s) == set(ids.values()) for s in svc.values()), 60)
        a = svc["a"].rollout
        assert a.table is not None and not a.table.rules.open
        assert a.table.rules.site == "plant-9"
        entry = svc["d"].rollout.table.get(ids["a"])  # type: ignore[union-attr]
        assert entry is not None and entry.report.credential is not None

        # A member's key speaking for an invented node: its credential names c, not that id.
        c_key = node_key(svc["c"].node.state)
        c_report = verify_report(svc["c"].rollout.table.get(ids["c"]).raw)  # type: ignore[union-attr]
        sybil = dataclasses.replace(c_report, node_id=bytes(16), seq=c_report.seq + 1)
        offer = a.offer_report(sign_report(sybil, c_key), trio.current_time())
        assert offer.verdict is Verdict.REFUSED and "not a member" in offer.reason
        # An outsider: no credential at all.
        outsider = Ed25519PrivateKey.generate()
        stranger = dataclasses.replace(
            c_report, node_id=b"\x07" * 16, node_key=outsider.public_key().public_bytes_raw(),
            credential=None,
        )  # fmt: skip
        assert a.offer_report(sign_report(stranger, outsider), 0).verdict is Verdict.REFUSED
        halt = OperatorAction(
            ActionKind.HALT, "app", 2, b"\x07" * 16, outsider.public_key().public_bytes_raw(),
            a.rules().repository, "plant-9", 0,
        )  # fmt: skip
        assert a.offer_action(sign_action(halt, outsider)) is ActionVerdict.REFUSED
        # A member's halt, made on d, travels to a with d's credential and counts there.
        await svc["d"].rollout.act(ActionKind.HALT, "app", 2, "test", None)
        await wait_until(
            lambda: bool(a.ledger and (led := a.ledger.get("app", 2)) and led.halted), 30
        )

        # d is revoked: it is cut off, and its report leaves every member's view.
        rl = tmp_path / "rl.msgpack"
        cli("site", "revoke", ids["d"].hex()[:8], "--site-dir", site_dir, "--out", rl)
        await control.dispatch(svc["a"], "site-update", {"data": rl.read_bytes()})
        await wait_until(lambda: all(ids["d"] not in seen(svc[n]) for n in "abc"), 30)
        assert a.table.seq_of(ids["d"]) > 0  # its mark stays: its old reports stay refused
        nursery.cancel_scope.cancel()
