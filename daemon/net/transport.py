"""Driving a sans-IO ``Session`` over a trio stream: one ``PeerConnection`` per peer.

Theory of operation
-------------------
A connection runs three tasks around one ``protocol.session.Session``:

* the **reader** receives bytes, feeds the session and dispatches each event
  without ever waiting on the network: requests go to a queue, responses wake
  the task that asked, everything else (Announce, Have, the view's messages,
  site and rollout news) goes to the handler (which must not block);
* the **writer** is the only task that sends: everything else *posts* a
  message, which runs ``session.send`` at once (so bytes leave in the order
  the session saw them) and queues the frame. It writes whatever is queued
  at once, up to ``WRITE_BYTES``; on a socket as one ``sendmsg`` of the
  frames' pieces, so a blob's bytes are never copied into a joined buffer;
* the **server** answers the peer's requests one at a time
  (``Handler.answer``), queuing data frames only while less than
  ``DATA_QUEUE_BYTES`` of them wait for the writer, so a peer that does not
  read its answers stalls only its own server and ties up at most that much
  memory plus one frame.

Because the reader never blocks on a send, two peers sending big answers to
each other cannot deadlock on full TCP buffers. ``request`` waits for a free
session slot, posts, and waits (bounded) for the answer; on timeout or
cancellation it cancels the request in the session, which keeps the slot until
the peer answers, as the peer still counts it.

``send_request`` is the same without a task per request, for the fetch's
stream of chunk requests: each answer is handed to a callback that the reader
calls (so it must not block; a ``ChunkBatchRequest`` gets one call per
digest), requests beyond the free session slots wait in a queue that the
reader drains as answers free slots, and one **watchdog** task ends the
connection when one of them goes unanswered past its timeout (for a batch:
no next answer within it). When the connection ends, every callback still
waiting gets ``None`` once.

The server answers a ``ChunkBatchRequest`` as the ChunkRequests it stands
for, one ``Handler.answer`` per digest, so a node serves a blob the same way
whichever way it was asked for.

Each task catches the peer's errors (``RemoteProtocolError``, a broken or
closed stream, ``OSError``) and ends the connection with a reason; nothing a
peer sends escapes ``run`` except bugs, which the caller's wrapper logs. On a
protocol error the peer is sent an ``Error`` saying why; on ``close`` a
``Bye``; both are flushed for at most ``FLUSH_SECONDS``.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from p2pupd.daemon.errors import DaemonError
from p2pupd.daemon.net.ratelimit import Limits
from p2pupd.protocol import limits
from p2pupd.protocol.errors import LocalProtocolError, RemoteProtocolError
from p2pupd.protocol.session import CLOSED, HandshakeError, Session, Signal, State
from p2pupd.protocol.site.membership import Credential
from p2pupd.protocol.wire import (
    Bye,
    ChunkBatchRequest,
    ChunkRequest,
    Error,
    Hello,
    Message,
    PeerAddr,
    Proof,
    Request,
    Response,
)

RECV_BYTES = 1 * limits.MiB  # one read takes many chunk frames; bounded by what was fed
HANDSHAKE_SECONDS = 10.0
FLUSH_SECONDS = 2.0
DATA_QUEUE_BYTES = 1 * limits.MiB  # answers queued for the writer before the server waits
WRITE_BYTES = 1 * limits.MiB  # the most one write gathers from the queue
COALESCE_BYTES = 64 * limits.KiB  # what one write gathers under a bandwidth cap (smooth bursts)
MAX_PIECES = 64  # buffers per sendmsg (the kernel allows 1024)
# Seconds of silence before the kernel probes a connection. Peers that speak
# "view" ping every link each minute (protocol/fleet/view.py), so probes only
# ever go to a link that went quiet, or to an older peer's: a site of idle
# nodes must not pay two packets per link every few seconds.
KEEPALIVE_IDLE = 120
KEEPALIVE_INTERVAL = 5
STALE_SECONDS = 15.0  # a connection silent this long yields to a new one from its peer
# An admitted peer must say something within this long (every version
# announces at once), or it is holding a slot for nothing: closed.
FIRST_MESSAGE_SECONDS = 20.0
ERR_PROTOCOL = 400
ERR_REFUSED = 403
ERR_HANDSHAKE = 409


class TransferError(DaemonError):
    """A request did not complete: the peer left or did not answer in time."""


class ListenError(DaemonError):
    """The TCP listener could not be opened."""


class Handler(Protocol):
    """What a connection needs from the node (implemented by ``core.NodeService``)."""

    def admit(self, conn: PeerConnection) -> str | None:
        """Called once the handshake is done: None to accept, else why not."""

    def joined(self, conn: PeerConnection) -> None: ...

    def message(self, conn: PeerConnection, msg: Message) -> None:
        """Anything but a request, a response, Hello, Proof, Bye or Error: Announce,
        Have, HaveBits, the view's messages, SiteNews, ReportNews and
        ReportDigest. Must not block."""

    async def answer(self, conn: PeerConnection, req: Request) -> Response:
        """The response to one of the peer's requests."""
        ...

    def broke_protocol(self, conn: PeerConnection, exc: RemoteProtocolError) -> None: ...


# Called with the peer's answer, or None when the connection ended first.
AnswerFn = Callable[[Response | None], None]


class PeerConnection:
    """One peer conversation over ``stream``; see the module docstring."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        session: Session,
        *,
        address: str,
        outbound: bool,
        source: str,
        limits_: Limits | None = None,
        kind: Any = None,
        dialled: PeerAddr | None = None,
        local_host: str = "",
        remote_host: str = "",
    ) -> None:
        self.stream = stream
        self.session = session
        self.address = address
        self.outbound = outbound
        self.source = source
        self.kind = kind  # why we dialled (protocol.fleet.view.Kind), outbound only
        self.dialled = dialled  # the address we dialled, outbound only
        self.local_host = local_host  # our end's IP ("" if not a socket)
        self.remote_host = remote_host
        self.full = False  # the peer said ViewFull before closing
        self.referrals: tuple[PeerAddr, ...] = ()  # addresses its ViewFull gave
        self.said = False  # the peer sent something after the handshake
        self.handshake_host: str | None = None  # an inbound handshake slot to give back
        self.last_sent = trio.current_time()
        self.limits = limits_ or Limits()
        self.joined = False
        self.closed = False
        # The peer's site credential when the link is TLS (daemon/service/sitegate.py);
        # its node id is the only one the peer may claim in its Hello.
        self.credential: Credential | None = None
        self.reason = ""
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_seen = trio.current_time()
        # Frames for the writer: (pieces, bytes of them that are answers to credit back).
        self._out_send, self._out_recv = trio.open_memory_channel[tuple[tuple[bytes, ...], int]](
            math.inf
        )
        self._req_send, self._req_recv = trio.open_memory_channel[Request](
            limits.MAX_IN_FLIGHT_PER_PEER * 2
        )
        self._data_queued = 0  # bytes of answers posted and not yet written
        self._data_room = trio.lowlevel.ParkingLot()  # the server, waiting for them to go
        self._waiters: dict[int, AnswerFn] = {}
        # send_request's requests: request id -> (give up at, timeout).
        self._deadlines: dict[int, tuple[float, float]] = {}
        self._answered_at = -math.inf  # when the peer last answered any request
        self._backlog: deque[tuple[Callable[[Session], Request], AnswerFn, float]] = deque()
        self._watch: trio.CancelScope | None = None  # the watchdog's sleep
        self._slots = trio.lowlevel.ParkingLot()
        self._inner: trio.CancelScope | None = None
        self._writer_done = trio.Event()
        self._final: Message | None = None

    @property
    def node_id(self) -> bytes:
        """The peer's node id (valid once the handshake is done)."""
        hello = self.session.peer_hello
        return hello.node_id if hello is not None else b""

    @property
    def proven(self) -> bool:
        """The peer's node id is bound to this connection: by its Hello proof, or by
        the site credential TLS checked."""
        return self.session.proven or self.credential is not None

    @property
    def peer_hello(self) -> Hello | None:
        return self.session.peer_hello

    # ----- sending -----------------------------------------------------------

    def _post_bytes(self, data: bytes) -> None:
        """Queue bytes the session already produced (our Proof)."""
        self._out_send.send_nowait(((data,), 0))

    def post(self, msg: Message) -> bool:
        """Queue ``msg``; returns False if the connection can no longer send it."""
        if self.closed or self._final is not None:
            return False
        try:
            data = self.session.send(msg)
        except LocalProtocolError:
            if self.session.state in (State.CLOSED, State.ERROR):
                return False
            raise
        self._out_send.send_nowait(((data,), 0))
        return True

    async def _post_data(self, msg: Response) -> None:
        while self._data_queued >= DATA_QUEUE_BYTES:
            await self._data_room.park()
        if self.session.state is not State.OPEN or self._final is not None:
            return  # the peer said Bye meanwhile: nobody to answer
        parts = self.session.send_parts(msg)
        size = sum(map(len, parts))
        self._data_queued += size
        self._out_send.send_nowait((parts, size))

    async def request(self, build: Callable[[Session], Request], timeout: float) -> Response:
        """Send the request ``build(session)`` makes and return the peer's answer.

        Waits for a free in-flight slot first. Raises ``TransferError`` if the
        connection ends or no answer comes within ``timeout`` seconds -- of
        its sending and of the peer's last answer to anything, as for
        ``send_request`` (see ``_watchdog``).
        """
        while not self.session.can_request:
            if self.closed or self.session.state is not State.OPEN:
                raise TransferError(f"connection to {self.address} is closed")
            await self._slots.park()
        req = build(self.session)
        event, answers = trio.Event(), list[Response | None]()

        def answered(resp: Response | None) -> None:
            answers.append(resp)
            event.set()

        self._waiters[req.request_id] = answered
        try:
            if not self.post(req):
                raise TransferError(f"connection to {self.address} is closed")
            deadline = trio.current_time() + timeout
            while True:
                with trio.move_on_at(deadline):
                    await event.wait()
                if event.is_set() or self.closed or self._answered_at + timeout <= deadline:
                    break
                deadline = self._answered_at + timeout  # answering others: queued behind
        finally:
            if not event.is_set():  # timed out, cancelled or never sent
                self._waiters.pop(req.request_id, None)
                if req.request_id in self.session.outstanding:
                    self.session.cancel_request(req.request_id)
        if not answers or answers[0] is None:
            why = self.reason or f"no answer within {timeout:.0f}s"
            raise TransferError(f"{type(req).__name__} to {self.address} failed: {why}")
        return answers[0]

    def send_request(
        self, build: Callable[[Session], Request], on_answer: AnswerFn, timeout: float
    ) -> bool:
        """Send ``build(session)`` as soon as a slot is free; the answer goes to ``on_answer``.

        Returns False (and never calls ``on_answer``) if the connection can no
        longer send. Otherwise ``on_answer`` is called exactly once, from the
        reader (it must not block): with the answer, or with None when the
        connection ends first. No answer within ``timeout`` seconds ends the
        connection.
        """
        if self.closed or self._final is not None or self.session.state is not State.OPEN:
            return False
        if self._backlog or not self.session.can_request:
            self._backlog.append((build, on_answer, timeout))
        else:
            self._send_now(build, on_answer, timeout)
        return True

    def _send_now(
        self, build: Callable[[Session], Request], on_answer: AnswerFn, timeout: float
    ) -> None:
        req = build(self.session)
        deadline = trio.current_time() + timeout
        self._waiters[req.request_id] = on_answer
        self._deadlines[req.request_id] = (deadline, timeout)
        if self._watch is not None and deadline < self._watch.deadline:
            self._watch.deadline = deadline
        self.post(req)

    def _send_backlog(self) -> None:
        """Send queued ``send_request`` requests while session slots are free."""
        while self._backlog and self.session.can_request and not self.closed:
            self._send_now(*self._backlog.popleft())

    # ----- running -----------------------------------------------------------

    async def run(self, handler: Handler) -> str:
        """Run the conversation until it ends; returns why it ended."""
        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._guard, self._writer)
                self.post(self.session.hello)
                with trio.CancelScope() as self._inner:
                    async with trio.open_nursery() as inner:
                        inner.start_soon(self._guard, self._reader, handler, inner)
                        inner.start_soon(self._handshake_timer)
                        inner.start_soon(self._watchdog)
                self._flush_final()
                with trio.move_on_after(FLUSH_SECONDS):
                    await self._writer_done.wait()
                outer.cancel_scope.cancel()
        finally:
            self.closed = True
            self._slots.unpark_all()
            waiting = [*self._waiters.values(), *(entry[1] for entry in self._backlog)]
            self._waiters.clear()
            self._deadlines.clear()
            self._backlog.clear()
            for on_answer in waiting:
                on_answer(None)  # the requester gives up on this peer
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self.stream.aclose()
        return self.reason

    def close(self, reason: str, error_code: int | None = None) -> None:
        """End the connection, telling the peer why (``Bye``, or ``Error`` with a code)."""
        if self._final is None and not self.closed:
            self._final = (
                Bye(reason[:200]) if error_code is None else Error(error_code, reason[:200])
            )
        self._end(reason)

    def _end(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason
        if self._inner is not None:
            self._inner.cancel()

    def _flush_final(self) -> None:
        final, self._final = self._final, None
        if final is not None:
            with contextlib.suppress(LocalProtocolError):
                self._out_send.send_nowait(((self.session.send(final),), 0))
        self._out_send.close()

    async def _guard(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run a task, turning the peer's faults into the end of this connection."""
        try:
            await fn(*args)
        except HandshakeError as exc:
            self.close(f"handshake refused: {exc}", ERR_HANDSHAKE)
        except RemoteProtocolError as exc:
            self.close(f"protocol error: {exc}", ERR_PROTOCOL)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._end(f"connection lost: {exc or type(exc).__name__}")

    async def _handshake_timer(self) -> None:
        await trio.sleep(HANDSHAKE_SECONDS)
        if not self.joined:
            self.close("handshake timed out", ERR_HANDSHAKE)
            return
        await trio.sleep(FIRST_MESSAGE_SECONDS)
        if not self.said:
            self.close(f"said nothing for {FIRST_MESSAGE_SECONDS:.0f}s", ERR_REFUSED)

    async def _watchdog(self) -> None:
        """End the connection when the peer stops answering ``send_request`` requests.

        A request is late once its timeout passed since it was sent *and*
        since the peer last answered anything: a peer answers in order, so
        on a slow link a request waits behind the answers before it (a deep
        window of requests at 25 kB/s is minutes of them) while the peer is
        plainly alive. Which requests are worth waiting for is the swarm's
        business (it re-plans a blob after its own, shorter timeout).
        """
        while True:
            soonest = min((d for d, _ in self._deadlines.values()), default=math.inf)
            with trio.CancelScope(deadline=soonest) as scope:
                self._watch = scope
                await trio.sleep_forever()
            self._watch = None
            now = trio.current_time()
            late = [(rid, t) for rid, (d, t) in self._deadlines.items() if d <= now]
            if not late:
                continue
            quiet = now - self._answered_at
            if all(quiet < t for _, t in late):  # still answering: queued behind those
                for rid, t in late:
                    self._deadlines[rid] = (self._answered_at + t, t)
                continue
            self.close(f"request failed: no answer within {min(t for _, t in late):.0f}s")
            return

    async def _writer(self) -> None:
        gather = WRITE_BYTES if self.limits.upload is None else COALESCE_BYTES
        try:
            async for parts, credit in self._out_recv:
                pieces = list(parts)
                size = sum(map(len, parts))
                while size < gather and len(pieces) < MAX_PIECES:  # one write for all queued
                    try:
                        more, more_credit = self._out_recv.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    pieces.extend(more)
                    size += sum(map(len, more))
                    credit += more_credit
                if self.limits.upload is not None:
                    await self.limits.upload.consume(size)
                await self._write(pieces)
                self.bytes_out += size
                self.last_sent = trio.current_time()
                if credit:
                    self._data_queued -= credit
                    self._data_room.unpark_all()
        finally:
            self._writer_done.set()

    async def _write(self, pieces: list[bytes]) -> None:
        """Send ``pieces`` in order: gathered by the kernel on a socket, else joined."""
        if not isinstance(self.stream, trio.SocketStream) or not hasattr(
            self.stream.socket, "sendmsg"
        ):
            await self.stream.send_all(pieces[0] if len(pieces) == 1 else b"".join(pieces))
            return
        sock, views = self.stream.socket, [memoryview(p) for p in pieces if p]
        while views:
            sent = await sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views.pop(0))
            if sent:
                views[0] = views[0][sent:]

    async def _reader(self, handler: Handler, nursery: trio.Nursery) -> None:
        while True:
            data = await self.stream.receive_some(RECV_BYTES)
            self.bytes_in += len(data)
            self.last_seen = trio.current_time()
            if data and self.limits.download is not None:
                await self.limits.download.consume(len(data))
            self.session.receive_data(bytes(data) if isinstance(data, bytearray) else data)
            try:
                while True:
                    event = self.session.next_event()
                    if isinstance(event, Signal):
                        if event is CLOSED:
                            self._end(self.reason or "closed by peer")
                            return
                        break
                    self._dispatch(event, handler)
                    if self.session.proof_due:  # both Hellos are through
                        self._post_bytes(self.session.send_proof())
                    # Admit the peer as soon as its Hello is through, before
                    # anything that arrived with it in the same read: an
                    # Announce must find the peer registered, and a bad frame
                    # right behind the Hello must still get it banned.
                    if not self.joined and self.session.state is State.OPEN:
                        refusal = handler.admit(self)
                        if refusal is not None:
                            self.close(refusal, ERR_REFUSED)
                            return
                        self.joined = True
                        handler.joined(self)
                        nursery.start_soon(self._guard, self._server, handler)
            except RemoteProtocolError as exc:
                if self.joined and not isinstance(exc, HandshakeError):
                    handler.broke_protocol(self, exc)
                raise
            finally:
                self._send_backlog()  # answers free request slots
                self._slots.unpark_all()

    def _dispatch(self, msg: Message, handler: Handler) -> None:
        if self.joined:
            self.said = True
        if isinstance(msg, Request):
            try:
                self._req_send.send_nowait(msg)
            except trio.WouldBlock:  # the session caps requests, so this is a bug
                raise LocalProtocolError("request queue overflow") from None
        elif isinstance(msg, Response):
            rid = msg.request_id
            self._answered_at = self.last_seen  # the read that carried it
            if self.session.in_flight(rid):  # a batch: more answers to come
                on_answer = self._waiters.get(rid)
                timing = self._deadlines.get(rid)
                if timing is not None:  # the clock restarts for the next answer
                    self._deadlines[rid] = (self._answered_at + timing[1], timing[1])
            else:
                on_answer = self._waiters.pop(rid, None)
                self._deadlines.pop(rid, None)
            if on_answer is not None:
                on_answer(msg)
        elif isinstance(msg, Bye):
            self.reason = f"peer said bye: {msg.reason}" if msg.reason else "peer said bye"
        elif isinstance(msg, Error):
            self.reason = f"peer reported error {msg.code}: {msg.message}"
        elif not isinstance(msg, Hello | Proof) and self.joined:
            handler.message(self, msg)  # Announce, Have(Bits), the view's messages

    async def _server(self, handler: Handler) -> None:
        async for req in self._req_recv:
            while True:  # answer what is queued without a scheduling round per request
                if isinstance(req, ChunkBatchRequest):
                    for digest in req.batch:
                        if self._final is not None or self.session.state is not State.OPEN:
                            break
                        answer = await handler.answer(self, ChunkRequest(req.request_id, digest))
                        await self._post_data(answer)
                else:
                    await self._post_data(await handler.answer(self, req))
                try:
                    req = self._req_recv.receive_nowait()
                except trio.WouldBlock:
                    break


async def serve_listener(
    host: str,
    port: int,
    on_stream: Callable[[trio.SocketStream, str], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept TCP connections on ``host:port`` and run ``on_stream`` for each.

    Reports the bound port through ``task_status`` (useful with port 0).
    ``on_stream`` must catch its own errors. Raises ``ListenError``.
    """
    try:
        listeners = await trio.open_tcp_listeners(port, host=host or None)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None

    async def handle(stream: trio.SocketStream) -> None:
        keepalive(stream)
        bulk(stream)
        try:
            peer = stream.socket.getpeername()
            address = f"{peer[0]}:{peer[1]}" if ":" not in peer[0] else f"[{peer[0]}]:{peer[1]}"
        except OSError:
            address = "?"
        await on_stream(stream, address)

    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def dial(host: str, port: int, timeout: float = 10.0) -> trio.SocketStream:
    """Open a TCP connection; raises ``TransferError`` on failure or timeout."""
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
        keepalive(stream)
        bulk(stream)
        return stream
    except trio.TooSlowError:
        raise TransferError(f"connecting to {host}:{port} timed out") from None
    except OSError as exc:
        raise TransferError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None


def keepalive(stream: trio.SocketStream) -> None:
    """Let the kernel notice a peer that vanished without a FIN (partition, power cut).

    Without it a silent half-open connection would count as the peer's one
    connection forever. Dead after ~``KEEPALIVE_IDLE + 4 * KEEPALIVE_INTERVAL`` s.
    """
    sock = trio.socket
    with contextlib.suppress(OSError, AttributeError):
        stream.setsockopt(sock.SOL_SOCKET, sock.SO_KEEPALIVE, 1)
        stream.setsockopt(sock.IPPROTO_TCP, sock.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        stream.setsockopt(sock.IPPROTO_TCP, sock.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        stream.setsockopt(sock.IPPROTO_TCP, sock.TCP_KEEPCNT, 4)


def bulk(stream: trio.SocketStream) -> None:
    """Let the kernel hold ``WRITE_BYTES`` of unsent data, not trio's 16 KiB.

    trio sets TCP_NOTSENT_LOWAT to 16 KiB for interactive latency; a connection
    moving blobs to a reader slower than us would then wake its writer every
    16 KiB. Our own queues are bounded (``DATA_QUEUE_BYTES``), so this only
    trades a little latency behind a bulk transfer for far fewer wake-ups.
    """
    with contextlib.suppress(OSError, AttributeError):
        stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NOTSENT_LOWAT, WRITE_BYTES)
