"""Collecting a site request over memory streams: an honest peer's request is
wrapped, a peer that answers with another node's request is dropped, and a peer
that never answers is reported instead of stalling the collection."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from _daemonkit import Site, link, make_service, random_tree, wait_until

from p2pupd.daemon import api
from p2pupd.daemon.bundles.siterequest import build_request
from p2pupd.daemon.service.nodeservice import NodeService
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.state.statedir import now_seconds
from p2pupd.protocol.request import verify_any_request
from p2pupd.protocol.wire import NodeRequestData, NodeRequestQuery


def three_nodes(tmp_path: Path) -> tuple[Path, Path, Path]:
    site = Site(tmp_path)
    site.publish("1.0", random_tree(5, files=2))
    a, b, c = site.node("a")[0], site.node("b")[0], site.node("c")[0]
    api.import_dir(a, site.bundle("v1"))
    return a, b, c


async def collect_from(a: NodeService, peers: list[NodeService]) -> dict[str, object]:
    async with trio.open_nursery() as nursery:
        for s in (a, *peers):
            await nursery.start(s.serve)
        for p in peers:
            link(nursery, a, p)
        await wait_until(
            lambda: len([c for c in a.conns.values() if c.joined]) == len(peers), 10, 0.1
        )
        got = await a.site_requests.collect(site=True, timeout=3.0)
        nursery.cancel_scope.cancel()
    return got


async def test_an_honest_peer_is_a_member(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sa, sb, _ = three_nodes(tmp_path)
    a, b = make_service(sa, 1), make_service(sb, 2)
    got = await collect_from(a, [b])
    site = verify_any_request(got["data"])  # type: ignore[arg-type]
    assert [m.node_id for m in site.members] == [Node(sa).config.node_id, Node(sb).config.node_id]
    assert got["unanswered"] == []
    assert site.collector.components[0].installed == 1


async def test_a_peer_answering_for_another_node_is_dropped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sa, sb, sc = three_nodes(tmp_path)
    stolen = build_request(Node(sc), now_seconds())[0]  # c's genuine, signed request

    class Liar(NodeService):
        async def answer(self, conn, req):  # type: ignore[no-untyped-def]
            if isinstance(req, NodeRequestQuery):
                return NodeRequestData(req.request_id, stolen)
            return await super().answer(conn, req)

    a, b = make_service(sa, 1), make_service(sb, 2, cls=Liar)
    got = await collect_from(a, [b])
    site = verify_any_request(got["data"])  # type: ignore[arg-type]
    assert [m.node_id for m in site.members] == [Node(sa).config.node_id]
    assert got["unanswered"] == [Node(sb).config.node_id.hex()]


async def test_a_silent_peer_is_reported_not_waited_for(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sa, sb, sc = three_nodes(tmp_path)

    class Silent(NodeService):
        async def answer(self, conn, req):  # type: ignore[no-untyped-def]
            if isinstance(req, NodeRequestQuery):
                await trio.sleep_forever()
            return await super().answer(conn, req)

    a, b, c = make_service(sa, 1), make_service(sb, 2, cls=Silent), make_service(sc, 3)
    start = trio.current_time()
    got = await collect_from(a, [b, c])
    assert trio.current_time() - start < 20
    site = verify_any_request(got["data"])  # type: ignore[arg-type]
    assert [m.node_id for m in site.members] == [Node(sa).config.node_id, Node(sc).config.node_id]
    assert got["unanswered"] == [Node(sb).config.node_id.hex()]
