"""Report gossip under load (node services over memory streams, MockClock): a node
that joins a site hears every report held there, and checks their signatures in a
worker thread, not on the event loop that carries its transfers."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import trio
import trio.testing
from _daemonkit import link, wait_until
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_rollout_daemon import make_site, services

from p2pupd.protocol.fleet.identity import node_id_of
from p2pupd.protocol.rollout.report import sign_report, verify_report
from p2pupd.protocol.rollout.table import Screened

OTHERS = 300  # reports of nodes the joining node never met


async def test_a_joining_node_checks_the_reports_it_catches_up_on_off_the_event_loop(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, states = make_site(tmp_path, nodes=2)
    a, b = services(states)
    checked_in: list[threading.Thread] = []
    check = Screened.check

    def recording(self: Screened) -> str | None:
        checked_in.append(threading.current_thread())
        return check(self)

    monkeypatch.setattr(Screened, "check", recording)
    loop_thread = threading.current_thread()
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve)
        await nursery.start(b.serve)
        ta = a.rollout.table
        assert ta is not None
        own = verify_report(ta.get(a.node_id).raw)  # type: ignore[union-attr]
        for _ in range(OTHERS):
            key = Ed25519PrivateKey.generate()
            pub = key.public_key().public_bytes_raw()
            rep = dataclasses.replace(own, node_id=node_id_of(pub), node_key=pub, seq=1)
            assert a.rollout.offer_report(sign_report(rep, key), trio.current_time()).accepted
        checked_in.clear()

        link(nursery, a, b)
        tb = b.rollout.table
        assert tb is not None
        await wait_until(lambda: len(tb) == OTHERS + 2, 120)
        assert tb.get(a.node_id) is not None
        nursery.cancel_scope.cancel()
    assert len(checked_in) >= OTHERS
    assert loop_thread not in checked_in
    assert b.report_gossip.queue_dropped == 0
