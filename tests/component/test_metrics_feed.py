"""The daemon's metrics feed on a real NodeService: counters with known labels exist
at 0 from the first scrape, and imports through the daemon are counted by outcome
(``p2pupd_imports_total`` had no sample at all: it listened for a field that the
event never carried)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio
import trio.testing
from _daemonkit import Site, make_service, random_tree
from prometheus_client.parser import text_string_to_metric_families

from p2pupd.daemon.events import observe
from p2pupd.daemon.service.metrics import MetricsFeed
from p2pupd.protocol.errors import P2pupdError


def samples(feed: MetricsFeed, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = feed.metrics.registry.render()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    return {
        tuple(sorted(s.labels.items())): s.value
        for s in fams[family].samples
        if not s.name.endswith("_created")
    }


async def test_known_counters_start_at_zero_and_imports_are_counted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    site = Site(tmp_path)
    site.publish("1.0", random_tree(1))
    good = site.bundle("v1")
    bad = tmp_path / "bundles" / "tampered"
    shutil.copytree(good, bad)
    victim = max((bad / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[100] ^= 1
    victim.write_bytes(bytes(data))
    state, _ = site.node("a")
    svc = make_service(state, seed=1)
    feed = MetricsFeed(svc)
    unobserve = observe(feed.on_event)
    try:
        assert samples(feed, "p2pupd_imports") == {
            (("result", r),): 0.0 for r in ("imported", "refused", "failed")
        }
        assert samples(feed, "p2pupd_applies") == {(("component", "app"),): 0.0}
        assert samples(feed, "p2pupd_rollbacks") == {
            (("component", "app"), ("reason", r)): 0.0 for r in ("apply-failed", "operator")
        }
        assert samples(feed, "p2pupd_peer_bans")[(("reason", "signature"),)] == 0.0
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.serve)
            with pytest.raises(P2pupdError):  # first: once stored, the blob is not read again
                await svc.lifecycle.import_dir(bad, apply_after=False)
            await svc.lifecycle.import_dir(good, apply_after=True)
            with pytest.raises(P2pupdError):
                await svc.lifecycle.import_dir(tmp_path / "no-such-stick", apply_after=False)
            nursery.cancel_scope.cancel()
    finally:
        unobserve()
    assert samples(feed, "p2pupd_imports") == {
        (("result", "imported"),): 1.0,
        (("result", "refused"),): 1.0,
        (("result", "failed"),): 1.0,
    }
    assert samples(feed, "p2pupd_applies") == {(("component", "app"),): 1.0}
