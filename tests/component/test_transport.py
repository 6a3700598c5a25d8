"""``PeerConnection.send_request`` (callbacks, queueing, batches, the watchdog) and a
fetch of many chunks over memory streams under MockClock."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing
from _daemonkit import Site, link, make_service, wait_until

from p2pupd.daemon import api
from p2pupd.daemon.net.transport import PeerConnection
from p2pupd.daemon.service.fetch import IDLE_SECONDS
from p2pupd.protocol.errors import RemoteProtocolError
from p2pupd.protocol.session import Session
from p2pupd.protocol.wire import (
    FEATURE_BATCH,
    Announce,
    ChunkData,
    ChunkMissing,
    ChunkRequest,
    Have,
    Request,
    Response,
)

D1, D2, D3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32


class Server:
    """A Handler that serves D1 (b"one") and lacks the rest; ``silent`` answers nothing."""

    def __init__(self, silent: bool = False) -> None:
        self.silent = silent
        self.asked: list[Request] = []

    def admit(self, conn: PeerConnection) -> str | None:
        return None

    def joined(self, conn: PeerConnection) -> None:
        pass

    def message(self, conn: PeerConnection, msg: Announce | Have) -> None:
        pass

    async def answer(self, conn: PeerConnection, req: Request) -> Response:
        self.asked.append(req)
        if self.silent:
            await trio.sleep_forever()
        assert isinstance(req, ChunkRequest)
        if req.digest == D1:
            return ChunkData(req.request_id, D1, b"one")
        return ChunkMissing(req.request_id, req.digest)

    def broke_protocol(self, conn: PeerConnection, exc: RemoteProtocolError) -> None:
        raise AssertionError(f"unexpected protocol error: {exc}")


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


async def connect(nursery: trio.Nursery, server: Server, max_in_flight: int = 16) -> PeerConnection:
    """A client connection to ``server``; both speak "batch"."""
    a_stream, b_stream = trio.testing.memory_stream_pair()
    features = frozenset({FEATURE_BATCH})
    client = PeerConnection(
        a_stream,
        Session(b"A" * 16, "c", 0, features, max_in_flight),
        address="b",
        outbound=True,
        source="memory",
    )
    peer = PeerConnection(
        b_stream,
        Session(b"B" * 16, "c", 0, features, max_in_flight),
        address="a",
        outbound=False,
        source="memory",
    )
    nursery.start_soon(client.run, Server())
    nursery.start_soon(peer.run, server)
    await wait_until(lambda: client.joined and peer.joined, timeout=5, step=0.01)
    return client


async def test_requests_beyond_the_free_slots_wait_and_each_gets_one_answer(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = Server()
    client = await connect(nursery, server, max_in_flight=2)
    got: list[tuple[int, Response | None]] = []
    for i, digest in enumerate([D1, D2, D1, D3, D1]):

        def build(session: Session, digest: bytes = digest) -> Request:
            return session.request_chunk(digest)

        assert client.send_request(build, lambda resp, i=i: got.append((i, resp)), 30)
    assert len(client.session.outstanding) == 2  # the other three wait their turn
    await wait_until(lambda: len(got) == 5, timeout=5, step=0.01)
    assert sorted(i for i, _ in got) == [0, 1, 2, 3, 4]
    by_index = dict(got)
    assert all(isinstance(by_index[i], ChunkData) for i in (0, 2, 4))
    assert all(isinstance(by_index[i], ChunkMissing) for i in (1, 3))
    assert not client.closed


async def test_a_batch_is_served_as_one_answer_per_digest_in_order(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = Server()
    client = await connect(nursery, server)
    got: list[Response | None] = []
    build = lambda s: s.request_chunk_batch((D2, D1, D3))  # noqa: E731
    assert client.send_request(build, got.append, 30)
    await wait_until(lambda: len(got) == 3, timeout=5, step=0.01)
    assert [type(r) for r in got] == [ChunkMissing, ChunkData, ChunkMissing]
    assert [r.digest for r in got if r is not None] == [D2, D1, D3]
    assert [type(r) for r in server.asked] == [ChunkRequest] * 3  # the handler's view
    assert not client.session.outstanding


async def test_no_answer_in_time_ends_the_connection_and_tells_the_requester(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    client = await connect(nursery, Server(silent=True), max_in_flight=1)
    got: list[Response | None] = []
    start = trio.current_time()
    assert client.send_request(lambda s: s.request_chunk_batch((D1, D2)), got.append, 7)
    assert client.send_request(lambda s: s.request_chunk(D3), got.append, 7)  # queued
    await wait_until(lambda: client.closed, timeout=60, step=0.5)
    assert 7 <= trio.current_time() - start < 9
    assert client.reason == "request failed: no answer within 7s"
    assert got == [None, None]  # once per request, the queued one included
    assert not client.send_request(lambda s: s.request_chunk(D1), got.append, 7)


class SlowServer(Server):
    """Answers each request ``delay`` seconds after taking it up, one at a time."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def answer(self, conn: PeerConnection, req: Request) -> Response:
        if not self.silent:
            await trio.sleep(self.delay)
        return await super().answer(conn, req)


async def test_requests_queued_behind_answers_are_waited_for_until_the_peer_goes_quiet(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A peer answers in order: on a slow link the last of many requests waits
    far longer than the timeout behind the others while answers keep coming.
    The connection ends only once the peer answered nothing for the timeout."""
    server = SlowServer(delay=5)
    client = await connect(nursery, server)
    got: list[Response | None] = []
    start = trio.current_time()
    for _ in range(4):  # answered at 5, 10, 15 and 20 s: the last 20 s after it was sent
        assert client.send_request(lambda s: s.request_chunk(D1), got.append, 7)
    await wait_until(lambda: len(got) == 4, timeout=60, step=0.5)
    assert all(isinstance(r, ChunkData) for r in got) and not client.closed
    assert 20 <= trio.current_time() - start < 21
    server.silent = True
    answered = trio.current_time()
    assert client.send_request(lambda s: s.request_chunk(D1), got.append, 7)
    await wait_until(lambda: client.closed, timeout=60, step=0.5)
    assert 7 <= trio.current_time() - answered < 9
    assert client.reason == "request failed: no answer within 7s"
    assert got[4:] == [None]


async def test_a_served_release_of_many_chunks_needs_no_idle_waits(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Each answer wakes the fetch at once: no chunk waits for a timeout."""
    site = Site(tmp_path)
    site.publish("1.0", {f"f{i}.bin": random.Random(i).randbytes(50_000) for i in range(40)})
    (sa, _), (sb, _) = site.node("a"), site.node("b")
    api.import_dir(sa, site.bundle("v1"))
    a, b = make_service(sa, 1), make_service(sb, 2)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve)
        await nursery.start(b.serve)
        start = trio.current_time()
        link(nursery, b, a)
        await wait_until(lambda: b.lifecycle.complete.get("app", (0,))[0] == 1, 60, step=0.01)
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert b.fetch.received["app"].blobs >= 40
    assert elapsed < IDLE_SECONDS / 2  # virtual time: gossip and fetch never wait idle
