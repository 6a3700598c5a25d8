"""Revocations spread between site members like releases: in-process nodes, TLS over memory
streams, MockClock. The real SiteGate, TLSStream, Session and SiteNews path.

a - b - c in a line, d (to be revoked) linked to c. The operator hands the
revocation list to a only: c, two hops away, cuts d off; a member e that
links to c afterwards learns the list on joining; an older list offered by a
lagging peer moves nothing.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from _daemonkit import Site, link, make_service, wait_until
from _kit import cli

from p2pupd.daemon.service import control
from p2pupd.daemon.service.nodeservice import NodeService


def member(site: Site, site_dir: Path, name: str) -> Path:
    state, target = site.node(name)
    cli("init", "--state-dir", state, "--trust", site.root_file, "--site", site_dir / "site.pub",
        "--component", f"app={target}")  # fmt: skip
    req, mem = state.parent / "enrol.msgpack", state.parent / "member.msgpack"
    cli("site", "request", "--state-dir", state, "--out", req)
    cli("site", "enroll", req, "--site-dir", site_dir, "--out", mem)
    cli("site", "join", mem, "--state-dir", state)
    return state


def sequence(svc: NodeService) -> int | None:
    rl = svc.gate.revocations
    return None if rl is None else rl.sequence


async def test_revocation_floods_and_catches_up(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    site = Site(tmp_path)
    site_dir = tmp_path / "sitedir"
    cli("site", "init", site_dir, "--name", "plant-3")
    states = {n: member(site, site_dir, n) for n in "abcde"}
    svc = {n: make_service(s, seed=i) for i, (n, s) in enumerate(states.items())}
    ids = {n: s.node.config.node_id for n, s in svc.items()}
    rl1 = tmp_path / "rl1.msgpack"
    rl2 = tmp_path / "rl2.msgpack"
    # Two lists: the first revokes nobody that is linked here (an old enrolment), the
    # second revokes d as well. The first is what a lagging node still offers.
    spare = member(site, site_dir, "spare")
    cli("site", "revoke", make_service(spare, seed=9).node.config.node_id.hex()[:8],
        "--site-dir", site_dir, "--out", rl1)  # fmt: skip
    cli("site", "revoke", ids["d"].hex()[:8], "--site-dir", site_dir, "--out", rl2)
    cli("site", "update", rl1, "--state-dir", states["e"])  # e lags: it holds list 1 only
    svc["e"].gate.reload()

    async with trio.open_nursery() as nursery:
        for s in svc.values():
            await nursery.start(s.serve)
        link(nursery, svc["a"], svc["b"])
        link(nursery, svc["b"], svc["c"])
        link(nursery, svc["d"], svc["c"])
        await wait_until(lambda: ids["d"] in svc["c"].conns and ids["b"] in svc["a"].conns, 30)

        await control.dispatch(svc["a"], "site-update", {"data": rl2.read_bytes()})
        await wait_until(lambda: ids["d"] not in svc["c"].conns, 10, step=0.1)
        assert [sequence(svc[n]) for n in "abc"] == [2, 2, 2]
        assert any("revoked" in r.reason for r in svc["c"].gate.recent)

        # e holds the older list 1; linked to c it offers it (moves nothing) and is
        # sent list 2 on joining.
        link(nursery, svc["e"], svc["c"])
        await wait_until(lambda: sequence(svc["e"]) == 2, 10, step=0.1)
        assert sequence(svc["c"]) == 2
        # d, revoked, cannot get back in through anyone.
        link(nursery, svc["d"], svc["e"])
        link(nursery, svc["d"], svc["a"])
        await trio.sleep(5)
        assert all(ids["d"] not in svc[n].conns for n in "abce")
        nursery.cancel_scope.cancel()
