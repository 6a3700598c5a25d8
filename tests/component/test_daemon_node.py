"""One or two in-process nodes over memory streams under MockClock: resume,
ranged transfers, bans for protocol errors, apply policy, duplicate links,
expired releases skipped without fault."""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from _daemonkit import Site, installed, link, make_service, random_tree, wait_until
from _kit import cli, make_tree

from p2pupd.daemon import api
from p2pupd.daemon.events import observe
from p2pupd.daemon.net.ranged import get_ranged
from p2pupd.daemon.net.ratelimit import TokenBucket
from p2pupd.daemon.net.transport import ERR_PROTOCOL
from p2pupd.daemon.offload import inline
from p2pupd.daemon.service.gossip import fetch_manifest
from p2pupd.daemon.service.metrics import MetricsFeed
from p2pupd.daemon.service.nodeservice import NodeService
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.state.statedir import NOW_ENV, StateDir
from p2pupd.protocol import ids
from p2pupd.protocol.fleet.swarm import SwarmConfig
from p2pupd.protocol.session import Session, Signal
from p2pupd.protocol.wire import FEATURE_HAVE, FEATURE_RANGE, Error


def two_nodes(tmp_path: Path) -> tuple[Site, tuple[Path, Path], tuple[Path, Path]]:
    site = Site(tmp_path)
    site.publish("1.0", random_tree(3, files=4))
    a, b = site.node("a"), site.node("b")
    api.import_dir(a[0], site.bundle("v1"))
    return site, a, b


async def b_gets_it_from_a(a: NodeService, b: NodeService, sb: Path) -> float:
    """Serve ``a`` and ``b``, link ``b`` to ``a`` and wait until ``b`` (state dir
    ``sb``) installed release 1; returns the virtual seconds from the link."""
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve)
        await nursery.start(b.serve)
        link(nursery, b, a)
        start = trio.current_time()
        await wait_until(lambda: installed(sb) == 1, timeout=300)
        nursery.cancel_scope.cancel()
    return trio.current_time() - start


async def test_restart_resumes_from_what_is_stored(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    _, (sa, _), (sb, tb) = two_nodes(tmp_path)
    # b already accepted 1.0 and stored two of its blobs before it "crashed".
    node_a, node_b = Node(sa), Node(sb)
    env = node_a.releases.get(node_a.trust_chain(), "app", 1)[1]
    man = node_a.manifest("app", 1)
    from p2pupd.daemon.state.gate import persist_release

    persist_release(node_b, man, env, env.payload_digest(), "received", "test")
    sizes = man.blob_sizes()
    kept = sorted(sizes)[:2]
    for d in kept:
        node_b.store.put_bytes(node_a.store.get_bytes(d), d)

    a, b = make_service(sa, 1), make_service(sb, 2)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve)
        await nursery.start(b.serve)
        assert b.fetch.active["app"].man.serial == 1  # resumed at start, before any peer
        link(nursery, b, a)
        await wait_until(lambda: installed(sb) == 1, timeout=300)
        nursery.cancel_scope.cancel()
    rec = b.fetch.received["app"]
    assert rec.bytes == sum(sizes.values()) - sum(sizes[d] for d in kept)
    assert rec.by_peer == {a.node.config.node_id.hex(): rec.bytes}
    assert sorted(p.name for p in tb.iterdir()) == sorted(f"f{i}.bin" for i in range(4))


async def test_a_held_release_is_served_without_reading_its_manifest_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The start-up scan read the held release's manifest. The first peer's
    # offer must not read, decode and check it again on the event loop (7 ms
    # for 2,655 chunks, which every connection and that peer waited out).
    _, (sa, _), (sb, _) = two_nodes(tmp_path)
    a, b = make_service(sa, 1), make_service(sb, 2)
    reads: list[tuple[str, int]] = []
    stored = a.offers._manifest
    a.offers._manifest = lambda key, serial: (reads.append((key, serial)), stored(key, serial))[1]
    await b_gets_it_from_a(a, b, sb)
    assert a.offers.releases["app"].swarm is not None  # b was served from a's swarm
    assert reads == []


async def test_a_blob_its_only_holder_once_said_was_missing_is_asked_for_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # a fails one read (a disk hiccup): b hears ChunkMissing for a blob that
    # only a has. b asks again after lack_seconds instead of waiting forever.
    _, (sa, _), (sb, _) = two_nodes(tmp_path)
    a, b = make_service(sa, 1), make_service(sb, 2)
    read = a.content.read_blob
    failed: list[bytes] = []

    def flaky(digest: bytes, max_bytes: int) -> bytes | None:
        if not failed:
            failed.append(digest)
            return None
        return read(digest, max_bytes)

    a.content.read_blob = flaky  # type: ignore[method-assign]
    took = await b_gets_it_from_a(a, b, sb)
    assert failed and b.node.store.has(failed[0])
    assert SwarmConfig().lack_seconds <= took < SwarmConfig().lack_seconds + 10


async def test_blobs_and_manifests_larger_than_a_frame_travel_in_pieces(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    _, (sa, _), (sb, _) = two_nodes(tmp_path)
    big = bytes(range(256)) * (9 * 4096 + 7)  # 9 MiB and a bit: three frames' worth
    digest = Node(sa).store.put_bytes(big)
    a, b = make_service(sa, 1), make_service(sb, 2)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve)
        await nursery.start(b.serve)
        link(nursery, b, a)
        await wait_until(lambda: bool(b.conns), timeout=10, step=0.1)
        conn = next(iter(b.conns.values()))
        assert conn.session.supports(FEATURE_RANGE)
        assert await get_ranged(conn, digest, len(big), b.node.store, b.offload, 10) is True
        # A blob the peer does not have: ChunkMissing, nothing stored.
        other = ids.sha256(b"not there")
        assert (
            await get_ranged(conn, other, 10, b.node.store, b.offload, 10) is None
        )  # peer lacks it
        envelope = await fetch_manifest(conn, "app", 1, timeout=10, piece=1000)
        nursery.cancel_scope.cancel()
    assert Node(sb).store.get_bytes(digest) == big
    assert envelope == Node(sa).releases.get_bytes("app", 1)
    assert not list(Node(sb).store.tmp_dir.iterdir())  # spool files cleaned up


async def test_a_large_blob_crosses_a_slow_link_in_pieces_queued_behind_each_other(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Four 1 MiB pieces are asked for at once; at 25 kB/s the fourth comes
    168 s after it was asked for, while the pieces before it keep arriving.
    It is waited for: only a peer that answers nothing for the timeout is
    given up on (a patch of a few MB never crossed such a link before)."""
    _, (sa, _), (sb, _) = two_nodes(tmp_path)
    big = random.Random(5).randbytes(6 * 1024 * 1024 + 99)
    digest = Node(sa).store.put_bytes(big)
    a, b = make_service(sa, 1, bandwidth_limit=25_000), make_service(sb, 2)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve)
        await nursery.start(b.serve)
        link(nursery, b, a)
        await wait_until(lambda: bool(b.conns), timeout=10, step=0.1)
        conn = next(iter(b.conns.values()))
        start = trio.current_time()
        assert await get_ranged(conn, digest, len(big), b.node.store, b.offload, 120) is True
        elapsed = trio.current_time() - start
        assert not conn.closed
        nursery.cancel_scope.cancel()
    assert Node(sb).store.get_bytes(digest) == big
    assert elapsed <= len(big) / 25_000 * 1.1


async def test_a_peer_breaking_the_protocol_is_banned_and_the_node_carries_on(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    _, (sa, _), (sb, _) = two_nodes(tmp_path)
    a, b = make_service(sa, 1), make_service(sb, 2)
    evil_id = b"E" * 16
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve)
        await nursery.start(b.serve)
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(
            lambda: a.run_stream(ours, outbound=False, address="evil:1", source="memory")
        )
        evil = Session(evil_id, "default", 9, frozenset({FEATURE_RANGE, FEATURE_HAVE}))
        await theirs.send_all(evil.send_hello())
        await wait_until(lambda: evil_id in a.conns, timeout=10, step=0.1)
        await theirs.send_all(b"\x00\x00\x00\x05garbage")
        await wait_until(lambda: evil_id not in a.conns, timeout=10, step=0.1)
        # It never proved its id: the ban is on its address, not on the id it claimed.
        assert a.admission.banned(trio.current_time(), evil_id, "evil", proven=False) is not None
        assert a.admission.banned(trio.current_time(), evil_id, "honest", proven=True) is None
        # An Error frame told the peer why, then the stream was closed.
        while data := await theirs.receive_some(65536):
            evil.receive_data(data)
        evil.receive_data(b"")
        seen = []
        while not isinstance(event := evil.next_event(), Signal):
            seen.append(event)
        assert any(isinstance(m, Error) and m.code == ERR_PROTOCOL for m in seen)
        # Reconnecting is refused while banned...
        ours2, theirs2 = trio.testing.memory_stream_pair()
        nursery.start_soon(
            lambda: a.run_stream(ours2, outbound=False, address="evil:2", source="memory")
        )
        again = Session(evil_id, "default", 9)
        await theirs2.send_all(again.send_hello())
        await trio.sleep(1)
        assert evil_id not in a.conns
        # ...and honest peers are still served.
        link(nursery, b, a)
        await wait_until(lambda: installed(sb) == 1, timeout=300)
        nursery.cancel_scope.cancel()


async def test_manual_policy_and_rollback_are_respected(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    site, (sa, _), (sb, _) = two_nodes(tmp_path)
    site.publish("2.0", random_tree(4, files=4))
    api.import_dir(sa, site.bundle("v2"), apply_after=True)
    sd = StateDir(sb)
    cfg = sd.read_config()
    manual = dataclasses.replace(cfg.components["app"], auto_apply=False)
    sd.write_config(dataclasses.replace(cfg, components={"app": manual}))

    a, b = make_service(sa, 1), make_service(sb, 2)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve)
        await nursery.start(b.serve)
        link(nursery, b, a)
        await wait_until(lambda: b.lifecycle.complete.get("app", (0,))[0] == 2, timeout=300)
        await trio.sleep(5)
        assert installed(sb) is None  # manual: complete, announced, not applied
        assert (await b.lifecycle.apply_release("app")).serial == 2
        assert installed(sb) == 2
        # The operator rolls a (auto-apply) back: the daemon must not undo that.
        assert (await a.lifecycle.rollback("app")).serial == 1
        nursery.cancel_scope.cancel()
    a2 = make_service(sa, 3)
    async with trio.open_nursery() as nursery:
        await nursery.start(a2.serve)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert installed(sa) == 1


async def test_crossed_dials_leave_exactly_one_connection(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    _, (sa, _), (sb, _) = two_nodes(tmp_path)
    a, b = make_service(sa, 1), make_service(sb, 2)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve)
        await nursery.start(b.serve)
        link(nursery, a, b)
        link(nursery, b, a)
        await trio.sleep(5)
        assert len(a.conns) == len(b.conns) == 1
        conn_a, conn_b = next(iter(a.conns.values())), next(iter(b.conns.values()))
        assert conn_a.outbound != conn_b.outbound  # the same connection, seen from both ends
        dialer = a.node.config.node_id if conn_a.outbound else b.node.config.node_id
        assert dialer == min(a.node.config.node_id, b.node.config.node_id)
        await wait_until(lambda: installed(sb) == 1, timeout=300)
        nursery.cancel_scope.cancel()


async def test_token_bucket_holds_the_average_rate(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(100_000, burst=100_000)
    start = trio.current_time()
    for _ in range(30):
        await bucket.consume(50_000)  # 1.5 MB at 100 kB/s, 100 kB of burst
    assert 13.5 <= trio.current_time() - start <= 14.5


async def test_bandwidth_cap_slows_the_transfer_to_its_rate(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    _, (sa, _), (sb, _) = two_nodes(tmp_path)  # 4 files of ~70 kB: ~290 kB to move
    a = make_service(sa, 1, bandwidth_limit=50_000)
    b = make_service(sb, 2)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve)
        await nursery.start(b.serve)
        start = trio.current_time()
        link(nursery, b, a)
        await wait_until(
            lambda: b.lifecycle.complete.get("app", (0,))[0] == 1, timeout=300, step=0.1
        )
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    moved = b.fetch.received["app"].bytes
    assert moved > 250_000
    # The seed's upload is capped at 50 kB/s (after a burst of 64 kB).
    assert (moved - 64 * 1024) / 50_000 * 0.9 <= elapsed <= moved / 50_000 * 1.5


async def test_a_slow_link_the_receiver_was_not_told_of_is_not_dropped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A sole source is asked for up to 12 MiB at once. At 25 kB/s (the seed's
    cap; the receiver knows nothing of it) the last of those requests waits
    minutes behind the answers before it. The receiver used to drop the link
    once a request went 120 s unanswered, though answers kept coming, and the
    release never arrived; a request is late only when the peer went quiet."""
    site = Site(tmp_path)
    site.publish("1.0", random_tree(3, files=8, size=1_750_000))  # ~180 blobs: 3 batches
    (sa, _), (sb, _) = site.node("a"), site.node("b")
    api.import_dir(sa, site.bundle("v1"))
    a = make_service(sa, 1, bandwidth_limit=25_000)
    b = make_service(sb, 2)
    events: list[str] = []
    stop = observe(lambda event, _: events.append(event))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(a.serve)
            await nursery.start(b.serve)
            start = trio.current_time()
            link(nursery, b, a)
            await wait_until(
                lambda: b.lifecycle.complete.get("app", (0,))[0] == 1, timeout=1200, step=1.0
            )
            elapsed = trio.current_time() - start
            closed = events.count("peer-closed")
            nursery.cancel_scope.cancel()
    finally:
        stop()
    got = b.fetch.received["app"]
    assert got.bytes > 13_000_000 and got.duplicate_bytes == 0
    assert closed == 0
    assert elapsed <= got.bytes / 25_000 * 1.1  # the link's rate, no restarts


async def test_nodes_of_the_previous_version_still_swarm_with_new_ones(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A site updating itself runs mixed versions: a peer without "proof", "view"
    and "swarm" (what the previous version spoke) is admitted unproven, gets Have
    instead of HaveBits, no view messages, and the release crosses it both ways."""
    site, (sa, _), (sb, _) = two_nodes(tmp_path)
    sc, _ = site.node("c")
    old = frozenset({FEATURE_RANGE, FEATURE_HAVE, "request", "batch"})
    a = make_service(sa, 1)  # the seed: holds 1.0
    b = make_service(sb, 2, features=old)  # the older node in the middle
    c = make_service(sc, 3)
    async with trio.open_nursery() as nursery:
        for svc in (a, b, c):
            await nursery.start(svc.serve)
        link(nursery, b, a)  # a - b - c: everything c gets passes through b
        link(nursery, c, b)
        await wait_until(lambda: installed(sb) == 1 and installed(sc) == 1, timeout=600)
        conn_ab = a.conns[b.node.config.node_id]
        assert not conn_ab.session.proven and not conn_ab.session.supports("swarm")
        assert a.overlay.view.degree == 1  # judged as a link at once, no Neighbor
        nursery.cancel_scope.cancel()
    assert set(c.fetch.received["app"].by_peer) == {b.node.config.node_id.hex()}
    assert set(b.fetch.received["app"].by_peer) == {a.node.config.node_id.hex()}


async def test_an_expired_release_a_peer_offers_is_skipped_not_held_against_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """a holds a release that has since expired (its clock says so too, so it
    offers what it holds): b fetches the manifest, finds it past its date and
    leaves it -- a skip with its reason, no fetch error, no ban."""
    site = Site(tmp_path)
    src = make_tree(tmp_path / "src" / "1.0", random_tree(5, files=2))
    cli("publish", site.repo, "app", "1.0", src, "--expires-days", "1")
    (sa, _), (sb, _) = site.node("a"), site.node("b")
    api.import_dir(sa, site.bundle("v1"))
    monkeypatch.setenv(NOW_ENV, str(int(time.time()) + 3 * 86400))
    a, b = make_service(sa, 1), make_service(sb, 2)
    feed = MetricsFeed(b)
    seen: list[tuple[str, dict[str, object]]] = []

    def sink(event: str, fields: dict[str, object]) -> None:
        seen.append((event, fields))
        feed.on_event(event, fields)

    unobserve = observe(sink)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(a.serve)
            await nursery.start(b.serve)
            link(nursery, b, a)
            await wait_until(lambda: any(e == "manifest-skipped" for e, _ in seen), 120)
            await trio.sleep(60)
            conns = len(b.conns)
            nursery.cancel_scope.cancel()
    finally:
        unobserve()
    skipped = [f for e, f in seen if e == "manifest-skipped"]
    assert {f["why"] for f in skipped} == {"expired"} and "expired" in str(skipped[0]["reason"])
    assert not [e for e, _ in seen if e in ("manifest-refused", "peer-banned")]
    assert conns == 1 and installed(sb) is None
    feed.metrics.registry.render()
    skips = dict(feed.metrics.registry.metrics["p2pupd_manifest_skips"].values)
    assert skips[("expired",)] == len(skipped)
    assert all(v == 0 for v in feed.metrics.registry.metrics["p2pupd_fetch_errors"].values.values())


async def test_answers_waiting_to_land_hold_back_new_requests_past_their_budget(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from p2pupd.daemon.service import fetch

    _, (sa, _), (sb, _) = two_nodes(tmp_path)
    monkeypatch.setattr(fetch, "LANDING_BYTES", 1)  # one answer waiting stops the asking
    # Two requests at a time, so the release takes several rounds of asking.
    shallow = dataclasses.replace(SwarmConfig(), sole_source=2, max_in_flight=2)
    monkeypatch.setattr(SwarmConfig, "for_rate", lambda self, rate: shallow)
    waiting_at_ask: list[int] = []
    real_ask = fetch.FetchManager._ask

    def ask(self: fetch.FetchManager, run: fetch._Attempt, *args: object) -> None:
        waiting_at_ask.append(run.landing_bytes)
        real_ask(self, run, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(fetch.FetchManager, "_ask", ask)
    a, b = make_service(sa, 1), make_service(sb, 2)

    async def slow_disk(fn: Callable[[], object]) -> object:
        await trio.sleep(0.01)  # the loop runs on while a batch lands, as in the daemon
        return await inline(fn)

    b.offload = slow_disk  # type: ignore[assignment]
    await b_gets_it_from_a(a, b, sb)
    assert len(waiting_at_ask) > 2 and max(waiting_at_ask) == 0
    assert b.fetch.received["app"].bytes > 250_000  # all of it came, past the budget
