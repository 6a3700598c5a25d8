"""A release imported into a running node spreads to its neighbours through them.

Four in-process nodes, every pair linked, under MockClock: the real Session,
swarm, fetch, spool and store. The node that imports the release is its first
holder and offers each neighbour different blobs (super-seeding), so the
neighbours must relay the rest among themselves. Two faults made them wait:
a node offered the blobs it received before it could serve them (they were
not committed yet), and a neighbour that asked too soon heard "missing" and
never asked it again (they are served from the spool now); and new blobs
waited for the offers' timer, up to 5 s, to be offered.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import trio
import trio.testing
from _daemonkit import Site, link, make_service, random_tree, wait_until

from p2pupd.daemon.service.nodeservice import NodeService
from p2pupd.protocol.wire import ChunkMissing, Request, Response


class CountingService(NodeService):
    """Counts the blobs it answered "missing" for."""

    missing = 0

    def respond(self, req: Request) -> Response:
        resp = super().respond(req)
        if isinstance(resp, ChunkMissing):
            self.missing += 1
        return resp


async def test_neighbours_of_a_first_holder_relay_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    site = Site(tmp_path)
    site.publish("1.0", random_tree(4, files=4, size=400_000))
    bundle = site.bundle("v1")
    nodes = [site.node(f"n{i}") for i in range(4)]
    services = [
        make_service(state, seed=i, cls=CountingService) for i, (state, _) in enumerate(nodes)
    ]
    first, others = services[0], services[1:]

    async with trio.open_nursery() as nursery:
        for svc in services:
            await nursery.start(svc.serve)
        for i, a in enumerate(services):
            for b in services[i + 1 :]:
                link(nursery, a, b)
        await trio.sleep(1.0)  # all linked, nothing to fetch yet

        await first.lifecycle.import_dir(bundle, apply_after=False)
        start = trio.current_time()
        await wait_until(
            lambda: all(svc.fetch.status("app") is None and "app" in svc.fetch.received
                        for svc in others),
            timeout=60,
            step=0.05,
        )  # fmt: skip
        took = trio.current_time() - start
        nursery.cancel_scope.cancel()

    blobs = {d for svc in others for d in svc.node.manifest("app", 1).blob_sizes()}
    assert len(blobs) > 10  # more than one offer's worth for each neighbour
    for svc in others:
        got = svc.fetch.received["app"]
        assert got.blobs == len(blobs)
        # Some came from the other neighbours, not all from the first holder.
        assert set(got.by_peer) - {first.node.config.node_id.hex()}
    # Nobody offered what it could not serve yet.
    assert all(svc.missing == 0 for svc in others)
    # Commits every 0.25 s and offers batched by 0.05 s: well under a second
    # of (virtual) time each round; before, up to 5 s per round of relays.
    assert took < 2.0, took


def test_a_blob_committed_between_the_two_looks_is_served_not_missing(tmp_path: Path) -> None:
    """Content looks in the store, then in the spool; the spool's commit (a worker
    thread) may move the blob from one to the other in between. It is served
    from the store then: "missing" would make the asker never ask us again."""
    site = Site(tmp_path)
    state, _ = site.node("n0")
    svc = make_service(state, seed=0)
    data = b"landed, then committed meanwhile" * 100
    digest = hashlib.sha256(data).digest()

    def committed_meanwhile(d: bytes, max_bytes: int) -> bytes | None:
        svc.node.store.put_bytes(data, d)  # the commit took it from the spool
        return None

    svc.content.spooled = committed_meanwhile
    assert svc.content.read_blob(digest, len(data)) == data
    other = hashlib.sha256(b"never landed").digest()
    svc.content.spooled = lambda d, n: None
    assert svc.content.read_blob(other, 1 << 20) is None
