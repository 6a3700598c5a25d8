"""A release published again under a label already used, carried by a delta stick.

The bug: ``export --from-version 2.0`` took the newest release labelled 2.0 as the
node's version -- after ``publish --force`` of a rebuilt 2.0 that is the release
being exported, so the stick carried no blobs at all. The node importing it
held an "incomplete" release nobody could complete, and it never spread. Now the
stick carries what a node at any release of that label needs; here it is
imported into one daemon and every node converges over the (in-memory) LAN:
one at the first 2.0, and one at 1.0 that only its neighbour can serve.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from _daemonkit import Site, installed, link, make_service, random_tree, wait_until
from _kit import cli, make_tree
from conftest import tree_snapshot

from p2pupd.daemon import api


async def test_stick_of_a_republished_label_completes_and_spreads(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    site = Site(tmp_path)
    site.publish("1.0", random_tree(1))
    v1 = site.bundle("v1")
    site.publish("2.0", random_tree(2))
    v2 = site.bundle("v2")
    (a, _), (b, _), (c, target_c) = site.node("a"), site.node("b"), site.node("c")
    for state in (a, b):
        api.import_dir(state, v2, apply_after=True)
    api.import_dir(c, v1, apply_after=True)
    rebuilt = make_tree(tmp_path / "src" / "2.0-rebuilt", random_tree(3))
    cli("publish", site.repo, "app", "2.0", rebuilt, "--force")  # serial 3
    stick = tmp_path / "bundles" / "delta"
    out = cli("export", site.repo, stick, "--from-version", "2.0")
    assert "names 2 releases (serials 2, 3)" in out

    services = [make_service(s, seed=i, gossip_interval=10.0) for i, s in enumerate((a, b, c))]
    async with trio.open_nursery() as nursery:
        for svc in services:
            await nursery.start(svc.serve)
        link(nursery, services[0], services[1])
        link(nursery, services[1], services[2])  # c hears of it only through b
        report, _ = await services[0].lifecycle.import_dir(stick, apply_after=False)
        assert [(r.serial, r.complete) for r in report.releases] == [(3, True)]
        await wait_until(lambda: all(installed(s) == 3 for s in (a, b, c)), timeout=600)
        nursery.cancel_scope.cancel()
    assert tree_snapshot(target_c) == tree_snapshot(rebuilt)
