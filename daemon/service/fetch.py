"""Fetching a release's blobs from several peers at once (drives ``protocol.planner``).

Theory of operation
-------------------
One ``ReleaseFetch`` per component, for the newest accepted release; a newer
accepted release replaces it (blobs already stored count for the new one).

1. *What is missing*: ``gate.needed_for`` -- ``deltaplan.needed_blobs``, the
   cheapest path given the versions on disk and the store. So a restart
   resumes from what is stored, and an empty answer means complete.
2. *Who has what*: peers that speak "have" tell us with ``Have`` messages
   which blobs of the release they can serve (all of them, or a list that
   grows as their own fetch proceeds); peers that do not are assumed to hold
   everything of a release they announce. We send our own ``Have`` to every
   peer when a fetch starts and to each peer that joins, answer a peer's
   first ``Have`` for a release with ours, and tell peers that are fetching
   the same release about each blob we store (batched every
   ``COMMIT_SECONDS``). Fetching nodes thus serve each other instead of
   all pulling from the first node that had the release.
3. *Plan*: the pure ``FetchPlanner`` picks (peer, blob) pairs -- rarest first,
   per-peer cap, reassignment on timeout. Blobs that fit a frame are asked
   for without a task of their own (``PeerConnection.send_request``): from a
   peer that speaks "batch", up to ``MAX_BATCH_DIGESTS`` per
   ``ChunkBatchRequest`` and ``BATCH_PEER_CAP`` in flight, else one
   ``ChunkRequest`` each and ``PER_PEER_CAP`` in flight. The reader hands
   each answer to a callback that queues it and wakes the fetch loop; the
   loop hands what arrived to a worker thread as one batch
   (``Spool.put_many`` hash-checks it on every core and appends it to a
   pack), applies the outcomes to the planner and sends the next requests,
   so each turn of the loop handles a batch of chunks and one write carries
   its requests; the connections keep reading while the batch is hashed. A blob's planner slot is freed only once it is landed, so the
   per-peer caps also bound what waits to be landed. A larger blob (patches,
   hooks) gets a task that fetches ranged pieces (``ranged.get_ranged``)
   and streams them into the store (``BlobStore.put_stream``). Spooled blobs
   are made durable and committed to the store in batches (``spool``), at
   the latest before the release counts as complete.
   A mismatch bans and disconnects the peer; a peer that does not answer
   within ``hard_timeout`` is disconnected; ChunkMissing just steers the
   planner elsewhere.
4. *Done*: ``on_complete`` (``Lifecycle.release_complete``) announces the release and, for
   an ``auto_apply`` component, applies it.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from p2pupd.daemon.errors import DaemonError
from p2pupd.daemon.events import log
from p2pupd.daemon.net.ranged import get_ranged
from p2pupd.daemon.net.transport import PeerConnection, TransferError
from p2pupd.daemon.service.links import Links
from p2pupd.daemon.service.serving import Content
from p2pupd.daemon.state.gate import needed_for
from p2pupd.daemon.store.spool import Spool
from p2pupd.protocol import limits
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.planner import FetchPlanner
from p2pupd.protocol.session import Session
from p2pupd.protocol.wire import (
    FEATURE_BATCH,
    FEATURE_HAVE,
    FEATURE_RANGE,
    MAX_BATCH_DIGESTS,
    MAX_HAVE_DIGESTS,
    MAX_PAYLOAD_BYTES,
    Announce,
    ChunkData,
    Have,
    Request,
    Response,
)

PER_PEER_CAP = 14  # of the session's 16 in flight; the rest is for manifest and root requests
# Blobs in flight to a peer that speaks "batch": enough to keep it busy while
# our answers travel and a batch of them lands (they take few session slots),
# and no more: blobs queued at one peer cannot be reassigned to a neighbour
# that gets them later. With 64, six nodes on 50 mbit links each queued their
# whole release at the seed (swarm 2.01x one node alone, two full copies out
# of the seed); with 24, 1.47x and 1.45 copies.
BATCH_PEER_CAP = 24
COMMIT_SECONDS = 0.25  # spooled blobs are flushed, stored and announced in batches
IDLE_SECONDS = 5.0
RETRY_SECONDS = 30.0
# A blob up to this size goes in one ChunkData frame (room for the envelope).
SINGLE_FRAME_BYTES = MAX_PAYLOAD_BYTES - 4 * limits.KiB


@dataclass
class Received:
    """What arrived for one release: shown by ``status --json``."""

    serial: int
    bytes: int = 0
    blobs: int = 0
    by_peer: dict[str, int] = field(default_factory=dict)

    def to_doc(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "bytes": self.bytes,
            "blobs": self.blobs,
            "from": self.by_peer,
        }


@dataclass
class ReleaseFetch:
    man: Manifest
    digest: bytes
    have: set[bytes] = field(default_factory=set)  # blobs of the release we can serve
    needed: dict[bytes, int] | None = None
    planner: FetchPlanner[bytes] | None = None
    # Haves that arrived before the planner existed: peer -> (complete, digests).
    early: dict[bytes, tuple[bool, set[bytes]]] = field(default_factory=dict)
    wake: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def key(self) -> tuple[str, int]:
        return (self.man.component, self.man.serial)


# What became of one request: the bytes (to land), True (landed), False (bad
# bytes), None (the peer lacks the blob), a connection (it ended before
# answering) or a store error.
Outcome = bytes | bool | PeerConnection | DaemonError | None


@dataclass
class _Attempt:
    """One planner's go at a release: the answers to its requests come back here.

    Callbacks hold the attempt they asked for, so the answers to an earlier
    attempt's requests never reach a newer attempt's planner.
    """

    rf: ReleaseFetch
    planner: FetchPlanner[bytes]
    needed: dict[bytes, int]
    results: list[tuple[bytes, bytes, Outcome]] = field(default_factory=list)

    def report(self, peer: bytes, digest: bytes, outcome: Outcome) -> None:
        """Queue an outcome for the fetch loop and wake it."""
        self.results.append((peer, digest, outcome))
        self.rf.wake.set()


class FetchManager:
    """See the module docstring."""

    def __init__(
        self,
        links: Links,
        rng: random.Random,
        *,
        content: Content,
        servable: Callable[[str, int], tuple[bool, list[bytes]] | None],
        holding: Callable[[str], int],
        on_complete: Callable[[Manifest, bytes], Awaitable[None]],
        request_timeout: float,
        hard_timeout: float,
        ban_seconds: float,
    ) -> None:
        """``servable(c, s)``: what we can serve of a stored release (cached);
        ``holding(c)``: the serial of the complete release we hold (0: none);
        ``on_complete``: awaited once a release's every blob is stored."""
        self._links = links
        self._content = content
        self._servable = servable
        self._holding = holding
        self._on_complete = on_complete
        self._rng = rng
        self._request_timeout = request_timeout
        self._hard_timeout = hard_timeout
        self._ban_seconds = ban_seconds
        self.active: dict[str, ReleaseFetch] = {}
        self.received: dict[str, Received] = {}
        self._interested: dict[tuple[str, int], set[bytes]] = {}  # peers fetching it
        self._heard: set[tuple[bytes, str, int]] = set()  # (peer, release) that sent us a Have
        self._pending: dict[tuple[str, int], list[bytes]] = {}  # Have updates to send
        self._commit_wanted = trio.Event()
        self.spool = Spool(links.node.root, links.node.store)
        self._nursery: trio.Nursery | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run fetches and the batched commits (and Have updates) until cancelled."""
        await self._links.offload(self.spool.resume)  # keeps what a killed run received
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    await self._commit_wanted.wait()
                    await trio.sleep(COMMIT_SECONDS)  # batch what lands meanwhile
                    self._commit_wanted = trio.Event()
                    await self.commit()
            finally:
                self.spool.close()

    def start(self, man: Manifest, digest: bytes) -> None:
        """Fetch what ``man`` still needs (replacing an older fetch of its component)."""
        old = self.active.get(man.component)
        if old is not None:
            if old.man.serial >= man.serial:
                return
            old.scope.cancel()
        rf = ReleaseFetch(man, digest)
        self.active[man.component] = rf
        self.received[man.component] = Received(man.serial)
        for key in [k for k in self._interested if k[0] == man.component and k[1] < man.serial]:
            del self._interested[key]
        assert self._nursery is not None, "FetchManager.serve is not running"
        self._nursery.start_soon(self._run, rf)

    def restart(self, component: str, serial: int) -> bool:
        """Re-plan the running fetch of (component, serial) from what the store holds.

        For blobs that arrived another way (an import of the same release): the
        running planner only counts what peers send and would wait for them
        forever; the new fetch finds them stored and completes. Returns False
        if no such fetch was running.
        """
        rf = self.active.get(component)
        if rf is None or rf.man.serial != serial:
            return False
        rf.scope.cancel()
        del self.active[component]
        self.start(rf.man, rf.digest)
        return True

    # ----- the fetch -----------------------------------------------------------

    async def _run(self, rf: ReleaseFetch) -> None:
        c = rf.man.component
        with rf.scope:
            while True:
                try:
                    await self._fetch(rf)
                    break
                except DaemonError as exc:  # our store failed (full disk, I/O)
                    log(
                        "fetch-failed",
                        component=c,
                        serial=rf.man.serial,
                        reason=str(exc),
                        retry_in=RETRY_SECONDS,
                    )
                    await trio.sleep(RETRY_SECONDS)
            if self.active.get(c) is rf:
                del self.active[c]
            await self._on_complete(rf.man, rf.digest)

    async def _fetch(self, rf: ReleaseFetch) -> None:
        node = self._links.node
        while needed := await self._links.offload(lambda: needed_for(node, rf.man)):
            rf.needed = needed
            _, have = await self._links.offload(lambda: self._content.servable(rf.man))
            rf.have = set(have)
            planner: FetchPlanner[bytes] = FetchPlanner(
                needed,
                self._rng,
                per_peer_cap=PER_PEER_CAP,
                request_timeout=self._request_timeout,
                ban_seconds=self._ban_seconds,
                peer_cap=self._peer_cap,
            )
            rf.planner = planner
            for peer, (complete, digests) in rf.early.items():
                if complete:
                    planner.peer_has_all(peer)
                else:
                    planner.peer_has(peer, digests)
            rf.early.clear()
            for conn in list(self._links.conns.values()):
                self._use_announce(rf, conn)
                self._tell(conn, rf.key)
            log(
                "fetch-started",
                component=rf.man.component,
                version=rf.man.version,
                serial=rf.man.serial,
                blobs=len(needed),
                bytes=sum(needed.values()),
            )
            run = _Attempt(rf, planner, needed)
            async with trio.open_nursery() as nursery:  # ranged transfers
                while True:
                    await self._land(run)
                    failure = self._settle(run)
                    if failure is not None or planner.done:
                        break
                    now = trio.current_time()
                    self._ask(run, planner.next_requests(now), nursery)
                    deadline = planner.next_deadline()
                    wait = IDLE_SECONDS if deadline is None else min(IDLE_SECONDS, deadline - now)
                    with trio.move_on_after(max(wait, 0.001)):
                        await rf.wake.wait()
                    rf.wake = trio.Event()
                nursery.cancel_scope.cancel()  # late duplicates of reassigned requests
            if failure is not None:
                raise failure  # our store failed: _run retries later
            await self.commit()  # durable before the release can count as complete

    def _peer_cap(self, peer: bytes) -> int:
        conn = self._links.conns.get(peer)
        batch = conn is not None and conn.session.supports(FEATURE_BATCH)
        return BATCH_PEER_CAP if batch else PER_PEER_CAP

    def _ask(self, run: _Attempt, pairs: list[tuple[bytes, bytes]], nursery: trio.Nursery) -> None:
        """Ask each peer for its digests; the outcomes arrive in ``run.results``."""
        by_peer: dict[bytes, list[bytes]] = {}
        for peer, digest in pairs:
            by_peer.setdefault(peer, []).append(digest)
        for peer, digests in by_peer.items():
            conn = self._links.conns.get(peer)
            if conn is None:  # it left since the planner chose it
                run.planner.remove_peer(peer)
                continue
            small = [d for d in digests if run.needed[d] <= SINGLE_FRAME_BYTES]
            for digest in digests:
                if run.needed[digest] > SINGLE_FRAME_BYTES:
                    if conn.session.supports(FEATURE_RANGE):
                        nursery.start_soon(self._get_ranged, run, conn, digest, run.needed[digest])
                    else:
                        run.report(peer, digest, None)  # too big for a peer without ranges
            if conn.session.supports(FEATURE_BATCH):
                for i in range(0, len(small), MAX_BATCH_DIGESTS):
                    batch = tuple(small[i : i + MAX_BATCH_DIGESTS])
                    build = partial(Session.request_chunk_batch, digests=batch)
                    on_answer = partial(self._on_batch, run, conn, deque(batch))
                    self._send(run, conn, build, on_answer, batch)
            else:
                for digest in small:
                    one = partial(Session.request_chunk, digest=digest)
                    on_answer = partial(self._on_chunk, run, conn, digest)
                    self._send(run, conn, one, on_answer, (digest,))

    def _send(
        self,
        run: _Attempt,
        conn: PeerConnection,
        build: Callable[[Session], Request],
        on_answer: Callable[[Response | None], None],
        digests: tuple[bytes, ...],
    ) -> None:
        if not conn.send_request(build, on_answer, self._hard_timeout):
            for digest in digests:
                run.report(conn.node_id, digest, conn)

    def _on_batch(
        self, run: _Attempt, conn: PeerConnection, due: deque[bytes], resp: Response | None
    ) -> None:
        """One answer to a ChunkBatchRequest; the session checked it is for ``due[0]``."""
        if resp is None:  # the connection ended: nothing more comes
            for digest in due:
                run.report(conn.node_id, digest, conn)
            due.clear()
        else:
            self._on_chunk(run, conn, due.popleft(), resp)

    def _on_chunk(
        self, run: _Attempt, conn: PeerConnection, digest: bytes, resp: Response | None
    ) -> None:
        """The peer's answer for one blob (called by its reader: must not block)."""
        peer = conn.node_id
        if isinstance(resp, ChunkData):
            good_size = len(resp.data) == run.needed[digest]
            run.report(peer, digest, resp.data if good_size else False)
        else:  # ChunkMissing, or None: the connection ended first
            run.report(peer, digest, conn if resp is None else None)

    async def _get_ranged(
        self, run: _Attempt, conn: PeerConnection, digest: bytes, size: int
    ) -> None:
        peer = conn.node_id
        try:
            store, offload = self._links.node.store, self._links.offload
            got = await get_ranged(conn, digest, size, store, offload, self._hard_timeout)
        except TransferError as exc:
            if not conn.closed:
                conn.close(f"request failed: {exc}")
            run.report(peer, digest, conn)
        except DaemonError as exc:  # our store failed
            run.report(peer, digest, exc)
        else:
            if got:
                self._committed([digest])  # streamed straight into the store
            run.report(peer, digest, got)

    async def _land(self, run: _Attempt) -> None:
        """Spool the blobs that arrived, as one batch in a worker thread.

        Their outcomes become True (stored at the next commit), False (bad
        bytes) or the store's error. Answers arriving meanwhile queue behind.
        """
        results, run.results = run.results, []
        batch = [(digest, o) for _, digest, o in results if isinstance(o, bytes)]
        if batch:
            landed = iter(await self._links.offload(partial(self.spool.put_many, batch)))
            results = [(p, d, next(landed) if isinstance(o, bytes) else o) for p, d, o in results]
        run.results = results + run.results

    def _settle(self, run: _Attempt) -> DaemonError | None:
        """Apply the answers that arrived since the last call to the planner.

        Returns the first store error spooling ran into, if any.
        """
        failure = None
        results, run.results = run.results, []
        planner, now = run.planner, trio.current_time()
        for peer, digest, outcome in results:
            if isinstance(outcome, bytes):  # arrived while the last batch was spooled
                run.results.append((peer, digest, outcome))
                run.rf.wake.set()
                continue
            if outcome is True:
                planner.on_chunk_received(peer, digest, True, now)
                self._received(run.rf, peer, run.needed[digest])
            elif outcome is False:
                planner.on_chunk_received(peer, digest, False, now)
                self._links.ban(peer, f"blob {digest.hex()[:16]} failed its hash check")
            elif outcome is None:
                planner.on_chunk_missing(peer, digest, now)
            elif isinstance(outcome, DaemonError):
                failure = failure or outcome
            elif self._links.conns.get(peer) in (outcome, None):
                planner.remove_peer(peer)  # that connection ended; a newer one stays
        return failure

    def _received(self, rf: ReleaseFetch, peer: bytes, size: int) -> None:
        self._commit_wanted.set()
        rec = self.received.setdefault(rf.man.component, Received(rf.man.serial))
        rec.bytes += size
        rec.blobs += 1
        rec.by_peer[peer.hex()] = rec.by_peer.get(peer.hex(), 0) + size
        info = self._links.peers.get(peer)
        if info is not None:
            info.blobs_in += 1

    async def commit(self) -> None:
        """Make spooled blobs durable and store them, then tell interested peers."""
        self._committed(await self._links.offload(self.spool.commit))

    def _committed(self, digests: list[bytes]) -> None:
        for rf in self.active.values():
            if rf.needed is None:
                continue
            new = [d for d in digests if d in rf.needed]
            rf.have.update(new)
            if new and self._interested.get(rf.key):
                self._pending.setdefault(rf.key, []).extend(new)
        self._send_pending()

    # ----- who has what ----------------------------------------------------------

    def on_have(self, conn: PeerConnection, msg: Have) -> None:
        """A peer told us what it can serve of (component, serial)."""
        key, peer = (msg.component, msg.serial), conn.node_id
        rf = self.active.get(msg.component)
        fetching = rf is not None and rf.man.serial == msg.serial
        holding = self._holding(msg.component) == msg.serial
        if not (fetching or holding):
            return  # a release we do not know (yet): our own Have will ask later
        if not msg.complete:
            self._interested.setdefault(key, set()).add(peer)
        first = (peer, *key) not in self._heard
        self._heard.add((peer, *key))
        if rf is not None and fetching:
            if rf.planner is not None:
                if msg.complete:
                    rf.planner.peer_has_all(peer)
                else:
                    rf.planner.peer_has(peer, msg.digests)
                rf.wake.set()
            else:  # remember it, bounded by the release's own blob list
                complete, known = rf.early.setdefault(peer, (False, set()))
                blobs = rf.man.blob_sizes()
                known.update(d for d in msg.digests if d in blobs)
                rf.early[peer] = (complete or msg.complete, known)
        if first:  # a peer starting on this release: tell it what we have
            self._tell(conn, key)

    def _use_announce(self, rf: ReleaseFetch, conn: PeerConnection) -> None:
        """A peer without "have" that announces the release is taken to hold all of it."""
        if rf.planner is None or conn.session.supports(FEATURE_HAVE) or not conn.joined:
            return
        info = self._links.peers.get(conn.node_id)
        if info is not None and info.announced.get(rf.man.component) == (rf.man.serial, rf.digest):
            rf.planner.peer_has_all(conn.node_id)
            rf.wake.set()

    def on_announce(self, conn: PeerConnection, msg: Announce) -> None:
        """Use announcers of a release as sources when they lack "have"."""
        for entry in msg.entries:
            rf = self.active.get(entry.component)
            if rf is not None:
                self._use_announce(rf, conn)

    def peer_joined(self, conn: PeerConnection) -> None:
        """Tell a new peer what we hold of every release we are fetching."""
        for rf in list(self.active.values()):
            self._tell(conn, rf.key)

    def peer_left(self, peer: bytes) -> None:
        """Forget a peer in every planner and Have table."""
        for rf in self.active.values():
            if rf.planner is not None:
                rf.planner.remove_peer(peer)
                rf.wake.set()
            rf.early.pop(peer, None)
        for peers in self._interested.values():
            peers.discard(peer)
        self._heard = {t for t in self._heard if t[0] != peer}

    def release_done(self, component: str, serial: int) -> None:
        """We hold (component, serial) in full: tell the peers still fetching it."""
        key = (component, serial)
        for peer in list(self._interested.get(key, ())):
            conn = self._links.conns.get(peer)
            if conn is not None:
                self._tell(conn, key)

    def _tell(self, conn: PeerConnection, key: tuple[str, int]) -> None:
        """Send our Have for release ``key`` (what we can serve of it) to ``conn``."""
        if not conn.joined or not conn.session.supports(FEATURE_HAVE):
            return
        rf = self.active.get(key[0])
        if rf is not None and rf.man.serial == key[1]:
            complete, digests = False, sorted(rf.have)
        else:
            servable = self._servable(*key)
            if servable is None:
                return
            complete, digests = servable
        if complete:
            conn.post(Have(key[0], key[1], True))
            return
        for i in range(0, max(len(digests), 1), MAX_HAVE_DIGESTS):
            conn.post(Have(key[0], key[1], False, tuple(digests[i : i + MAX_HAVE_DIGESTS])))

    def _send_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for key, digests in pending.items():
            for peer in list(self._interested.get(key, ())):
                conn = self._links.conns.get(peer)
                if conn is None or not conn.session.supports(FEATURE_HAVE):
                    continue
                for i in range(0, len(digests), MAX_HAVE_DIGESTS):
                    conn.post(Have(key[0], key[1], False, tuple(digests[i : i + MAX_HAVE_DIGESTS])))

    # ----- reporting ------------------------------------------------------------

    def status(self, component: str) -> dict[str, Any] | None:
        """The ``fetch`` part of a component in ``status --json`` (None when idle)."""
        rf = self.active.get(component)
        if rf is None:
            return None
        doc: dict[str, Any] = {"serial": rf.man.serial, "version": rf.man.version}
        if rf.planner is not None and rf.needed is not None:
            now = trio.current_time()
            doc.update(
                needed_bytes=sum(rf.needed.values()),
                done_bytes=rf.planner.bytes_done,
                progress=round(rf.planner.progress, 4),
                unavailable_blobs=len(rf.planner.unavailable(now)),
            )
        return doc
