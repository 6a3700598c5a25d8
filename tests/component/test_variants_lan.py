"""Mixed-platform sites over the LAN, with real NodeServices under MockClock.

A stick with both variants of a release is imported on one x86-64 node; an
aarch64 node two hops away, behind another x86-64 node, installs its own
variant. The node between carries it -- stores and serves what an aarch64 node
one release behind needs, never installs it -- and nobody counts a fetch error
or bans anyone. A node that does not speak "variants" is spoken to as before:
it hears only the other node's own release, skips it without fault, and is
never told of a carried one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from _daemonkit import link, make_service, wait_until
from _kit import Site, cli, make_tree, tree_snapshot

from p2pupd.daemon.events import observe
from p2pupd.daemon.service.metrics import MetricsFeed
from p2pupd.daemon.service.nodeservice import FEATURES
from p2pupd.daemon.state.node import Node
from p2pupd.protocol.wire import FEATURE_VARIANTS

X86, ARM = "linux-x86_64", "linux-aarch64"
ARM_KEY = f"app@{ARM}"
SHARED = random.Random(3).randbytes(200_000)  # the same in both builds
V1 = {"bin/tool": random.Random(1).randbytes(150_000), "share/data": SHARED, "etc/conf": b"a=1\n"}


def build(platform: str, seed: int) -> dict[str, bytes]:
    """Version 2.0 as built for ``platform``: its binary changed a little from 1.0."""
    tool = bytearray(V1["bin/tool"])
    tool[5_000:5_040] = random.Random(seed).randbytes(40)
    return {"bin/tool": bytes(tool) + platform.encode(), "share/data": SHARED, "etc/conf": b"a=2\n"}


def publish(site: Site, version: str, files: dict[str, bytes], *extra: str) -> Path:
    src = make_tree(site.base / "src" / f"{version}-{'-'.join(extra) or 'all'}", files)
    cli("publish", site.repo, "app", version, src, *extra)
    return src


@pytest.fixture
def mixed(tmp_path: Path) -> dict[str, Any]:
    """1.0 (universal) on three nodes; 2.0 published for both platforms, on a stick."""
    site = Site(tmp_path)
    publish(site, "1.0", V1)
    v1 = site.bundle("v1")
    src = {X86: publish(site, "2.0", build(X86, 1), "--platform", X86),
           ARM: publish(site, "2.0", build(ARM, 2), "--platform", ARM)}  # fmt: skip
    stick = site.bundle("v2")  # every variant
    nodes = {
        "x0": site.node("x0", platform=X86),
        "x1": site.node("x1", platform=X86),
        "a": site.node("a", platform=ARM),
    }
    for state, _ in nodes.values():
        cli("import", v1, "--apply", "--state-dir", state)
    return {"site": site, "src": src, "stick": stick, "nodes": nodes}


class Events:
    """Every event line, and a metrics feed per service."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, object]]] = []
        self.feeds: list[MetricsFeed] = []

    def __call__(self, event: str, fields: dict[str, object]) -> None:
        self.seen.append((event, fields))
        for feed in self.feeds:
            feed.on_event(event, fields)

    def named(self, event: str) -> list[dict[str, object]]:
        return [f for e, f in self.seen if e == event]


def counter(feed: MetricsFeed, name: str) -> dict[tuple[str, ...], float]:
    feed.metrics.registry.render()
    return dict(feed.metrics.registry.metrics[name].values)


async def test_a_stick_imported_on_x86_reaches_the_aarch64_node_through_a_carrier(
    mixed: dict[str, Any], autojump_clock: trio.testing.MockClock
) -> None:
    (s0, t0), (s1, t1), (sa, ta) = mixed["nodes"].values()
    x0, x1, a = (make_service(s, seed=i, gossip_interval=10.0) for i, s in enumerate((s0, s1, sa)))
    events = Events()
    events.feeds = [MetricsFeed(svc) for svc in (x0, x1, a)]
    unobserve = observe(events)
    try:
        async with trio.open_nursery() as nursery:
            for svc in (x0, x1, a):
                await nursery.start(svc.serve)
            link(nursery, x0, x1)  # a chain: the aarch64 node never meets x0
            link(nursery, x1, a)
            await wait_until(lambda: len(x1.conns) == 2 and len(a.conns) == 1, 30)
            report, _ = await x0.lifecycle.import_dir(mixed["stick"], apply_after=True)
            assert report.carried == [("app", "2.0", 2, ARM)]
            await wait_until(lambda: Node(sa).state.read_state("app").installed == 2, 600)
            await wait_until(lambda: Node(s1).state.read_state("app").installed == 2, 600)
            # The carrier holds the aarch64 variant in full before it says so.
            await wait_until(lambda: bool(events.named("variant-carried")), 60)
            received = x1.fetch.received[ARM_KEY]
            nursery.cancel_scope.cancel()
    finally:
        unobserve()

    src = mixed["src"]
    assert tree_snapshot(ta) == tree_snapshot(src[ARM])  # its own variant, over two hops
    assert tree_snapshot(t1) == tree_snapshot(src[X86]) == tree_snapshot(t0)
    # The carrier stored the aarch64 variant and installed nothing of it.
    n1 = Node(s1)
    assert n1.carried.carried("app") == [(2, ARM)]
    assert [h.event for h in n1.state.read_state("app").history].count("applied") == 2  # 1.0, 2.0
    assert Node(sa).carried.carried("app") == [(2, X86)]  # and the aarch64 node carries x86's
    # What it carried is what an aarch64 node at 1.0 needs: less than the variant.
    arm = n1.carried.get(n1.trust_chain(), "app", 2, ARM)[0]
    assert 0 < received.bytes < sum(arm.blob_sizes().values()) // 2
    # Carried in full: arm by x0 (from the stick) and x1, x86 by the aarch64 node.
    assert sorted(str(e["platform"]) for e in events.named("variant-carried")) == [ARM, ARM, X86]
    # Nothing was anybody's fault, and between peers that speak "variants" no node
    # even fetched another platform's manifest as if it were its own.
    assert not events.named("manifest-refused") and not events.named("peer-banned")
    assert not events.named("manifest-skipped")
    for feed in events.feeds:
        assert all(v == 0 for v in counter(feed, "p2pupd_fetch_errors").values())
        assert all(v == 0 for v in counter(feed, "p2pupd_peer_bans").values())
    # (Events are process-wide here: each feed saw the whole site's.)
    assert counter(events.feeds[1], "p2pupd_variants_carried") == {("app",): 3.0}


async def test_a_peer_without_variants_hears_only_releases_and_skips_without_fault(
    mixed: dict[str, Any], autojump_clock: trio.testing.MockClock
) -> None:
    """The aarch64 node plays the previous version (no "variants"): the x86 node
    announces its own 2.0 by bare name, as it always did; the old node fetches that
    manifest, finds another platform's, and leaves it -- no ban, no fetch error --
    and it is never offered the variant the x86 node carries for it."""
    (s0, _), _, (sa, ta) = mixed["nodes"].values()
    cli("import", mixed["stick"], "--apply", "--state-dir", s0)
    before = tree_snapshot(ta)
    x0 = make_service(s0, seed=1, gossip_interval=10.0)
    old = make_service(sa, seed=2, gossip_interval=10.0, features=FEATURES - {FEATURE_VARIANTS})
    events = Events()
    events.feeds = [MetricsFeed(old)]
    unobserve = observe(events)
    try:
        async with trio.open_nursery() as nursery:
            for svc in (x0, old):
                await nursery.start(svc.serve)
            link(nursery, x0, old)
            await wait_until(lambda: bool(events.named("manifest-skipped")), 120)
            await trio.sleep(3 * 600)  # long past gossip's retries of an unavailable manifest
            conns = len(old.conns)
            nursery.cancel_scope.cancel()
    finally:
        unobserve()
    skipped = events.named("manifest-skipped")
    assert [s["why"] for s in skipped] == ["platform"] * len(skipped)
    assert len(skipped) <= 4  # once per FOREIGN_RETRY_SECONDS, not every gossip round
    assert conns == 1 and not events.named("peer-banned")
    assert not events.named("manifest-refused") and not events.named("variant-accepted")
    feed = events.feeds[0]
    assert counter(feed, "p2pupd_manifest_skips")[("platform",)] == len(skipped)
    assert all(v == 0 for v in counter(feed, "p2pupd_fetch_errors").values())
    assert Node(sa).state.read_state("app").installed == 1 and tree_snapshot(ta) == before
    assert Node(sa).carried.carried("app") == []


async def test_a_restarted_node_serves_the_variants_it_carries(
    mixed: dict[str, Any], autojump_clock: trio.testing.MockClock
) -> None:
    """Imported without a daemon, then started: the node finds the aarch64 variant
    among what it holds (its scan) and serves it to an aarch64 node."""
    (s0, _), _, (sa, ta) = mixed["nodes"].values()
    cli("import", mixed["stick"], "--apply", "--state-dir", s0)
    x0 = make_service(s0, seed=1, gossip_interval=10.0)
    a = make_service(sa, seed=2, gossip_interval=10.0)
    reads: list[tuple[str, int]] = []  # manifests the offers read again (the scan has them)
    stored = x0.offers._manifest
    x0.offers._manifest = lambda key, serial: (reads.append((key, serial)), stored(key, serial))[1]
    async with trio.open_nursery() as nursery:
        for svc in (x0, a):
            await nursery.start(svc.serve)
        assert [(k, s) for k, (s, _) in x0.gossip.carrying.items()] == [(ARM_KEY, 2)]
        link(nursery, x0, a)
        await wait_until(lambda: Node(sa).state.read_state("app").installed == 2, 600)
        nursery.cancel_scope.cancel()
    assert tree_snapshot(ta) == tree_snapshot(mixed["src"][ARM])
    assert x0.offers.releases[ARM_KEY].swarm is not None and reads == []


def test_an_offer_this_node_would_not_carry_is_refused_before_its_signature(
    mixed: dict[str, Any],
) -> None:
    """What the offer claims is checked first: bytes that are no manifest at all,
    offered as a variant of a component the node does not run, of its own
    platform or of a release it does not hold, are turned away as not carried,
    never parsed or verified; the same bytes offered as a variant it does carry
    are refused as bad."""
    from p2pupd.daemon.state import carried
    from p2pupd.protocol.errors import P2pupdError

    (s0, _), _, _ = mixed["nodes"].values()
    cli("import", mixed["stick"], "--apply", "--state-dir", s0)
    node, junk = Node(s0), b"\xff" * 64
    for component, platform in (("other", ARM), ("app", X86)):
        with pytest.raises(carried.NotCarriedError, match="not carried here"):
            carried.verify_carried(node, junk, component, 2, platform, None)
    with pytest.raises(carried.NotCarriedError, match="does not hold that release"):
        carried.verify_carried(node, junk, "app", 9, ARM, None)
    with pytest.raises(P2pupdError) as bad:
        carried.verify_carried(node, junk, "app", 2, ARM, None)
    assert not isinstance(bad.value, carried.NotCarriedError)
