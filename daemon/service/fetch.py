"""Fetching a release's blobs from the swarm (drives ``protocol.fleet.swarm``).

Theory of operation
-------------------
One ``ReleaseFetch`` per release key, for the newest accepted release of a
component -- and for each other platform's variant of it the node carries
(key ``app@platform``; protocol/fleet/variants.py); a newer accepted
release replaces it (blobs already stored count for the new one).

1. *What is missing*: ``gate.needed_for`` -- ``deltaplan.needed_blobs``, the
   cheapest path given the versions on disk and the store (for a carried
   variant: what a node of its platform one release behind needs). So a
   restart resumes from what is stored, and an empty answer means complete.
2. *Who offers what*: the component's ``ReleaseSwarm``, kept by ``Offers``
   (offers.py), fed by the neighbours' ``HaveBits`` (or ``Have``, or an
   older peer's Announce) and telling them ours. A fetch starts as soon as
   the manifest is verified, so the neighbours hear "I am in" before a single
   blob is here, and every blob that lands is offered onward (in batches).
3. *Plan*: the swarm picks (peer, blobs) -- rarest first, a few in flight
   per neighbour and in all, re-planned on timeout. Blobs that fit a frame
   are asked for without a task of their own (``PeerConnection.send_request``):
   one ``ChunkBatchRequest`` per peer and turn from a peer that speaks
   "batch", else one ``ChunkRequest`` each. The reader hands each answer to
   a callback that queues it for a *lander* (one per core) and tells the
   loop, which frees the request's slot (``ReleaseSwarm.on_arrived``) and asks
   for more while the bytes wait to be checked -- up to ``LANDING_BYTES`` of
   them, the bound on what a fetch holds beyond its requests in flight (so
   the request window covers the wire's latency only, not the hash check's
   and the disk's too: a 4 MiB window held until landing capped one peer at
   about 160 MB/s when a batch took 25 ms to land). A lander takes
   everything that arrived since its last batch to a worker thread
   (``Spool.put_batch`` hash-checks it and appends it to a pack in one
   write) and queues the outcomes for the fetch loop, which tells the swarm
   and sends the next requests. Nothing waits on anything else: the
   connections keep reading, the loop keeps asking, and the landers keep
   both cores hashing. A larger blob
   (patches, hooks) gets a task that fetches ranged pieces
   (``ranged.get_ranged``) and streams them into the store
   (``BlobStore.put_stream``). Spooled blobs are made durable and committed to
   the store in batches (every ``COMMIT_SECONDS``; ``spool``), at the latest
   before the release counts as complete. They are served before that,
   from the spool (``Spool.read``, through ``Content``), so a blob is
   relayed the moment it landed: offered only once committed, each relay
   hop would wait up to ``COMMIT_SECONDS`` (the fleet simulator, so
   modelled: 300 nodes complete in 4.1 times one copy's time, not 2.7).
   A mismatch bans and disconnects the peer; a peer that does not answer
   within ``hard_timeout`` is disconnected; ChunkMissing just steers the
   swarm elsewhere.
4. *Done*: ``on_complete`` (``Lifecycle.release_complete``) announces the
   release and, for an ``auto_apply`` component, applies it; the swarm goes
   on serving it (a node that got none of it from peers is its *first
   holder* and super-seeds).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from p2pupd.daemon import heap
from p2pupd.daemon.errors import DaemonError
from p2pupd.daemon.events import log
from p2pupd.daemon.net.ranged import get_ranged
from p2pupd.daemon.net.transport import PeerConnection, TransferError
from p2pupd.daemon.service.links import Links
from p2pupd.daemon.service.offers import Offers
from p2pupd.daemon.service.serving import Content
from p2pupd.daemon.state.gate import needed_for
from p2pupd.daemon.store.spool import HASH_THREADS, Spool
from p2pupd.protocol import limits
from p2pupd.protocol.fleet.swarm import Fetch, ReleaseSwarm
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.session import Session
from p2pupd.protocol.wire import (
    FEATURE_BATCH,
    FEATURE_RANGE,
    MAX_BATCH_DIGESTS,
    MAX_PAYLOAD_BYTES,
    ChunkData,
    Request,
    Response,
)

COMMIT_SECONDS = 0.25  # spooled blobs are flushed, stored and announced in batches
LANDING_BYTES = 16 * limits.MiB  # arrived, not yet checked: past it, no new requests
IDLE_SECONDS = 5.0
LANDERS = HASH_THREADS  # batches hash-checked at once: one per core (two at most)
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
    # Second copies of a blob: the swarm's end game asks idle holders for blobs
    # already in flight elsewhere (protocol/fleet/swarm.py), and both may answer.
    duplicate_bytes: int = 0

    def to_doc(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "bytes": self.bytes,
            "blobs": self.blobs,
            "duplicate_bytes": self.duplicate_bytes,
            "from": self.by_peer,
        }


@dataclass
class ReleaseFetch:
    man: Manifest
    digest: bytes
    needed: dict[bytes, int] | None = None
    swarm: ReleaseSwarm[bytes] | None = None
    wake: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


# What became of one request: the bytes (to land; a view of the read that
# brought them), True (landed), False (bad bytes), None (the peer lacks the
# blob), a connection (it ended before answering) or a store error.
Payload = bytes | memoryview
Outcome = Payload | bool | PeerConnection | DaemonError | None


@dataclass
class _Attempt:
    """One swarm's go at a release: the answers to its requests come back here.

    Callbacks hold the attempt they asked for, so the answers to an earlier
    attempt's requests never reach a newer attempt's swarm. Bytes that arrive
    wait in ``arrived`` for the lander; every other outcome (and what the
    lander made of the bytes) waits in ``results`` for the fetch loop.
    """

    rf: ReleaseFetch
    swarm: ReleaseSwarm[bytes]
    needed: dict[bytes, int]
    results: list[tuple[bytes, bytes, Outcome]] = field(default_factory=list)
    arrived: list[tuple[bytes, bytes, Payload]] = field(default_factory=list)
    land_wake: trio.Event = field(default_factory=trio.Event)
    fresh: list[tuple[bytes, bytes]] = field(default_factory=list)  # arrived: for the swarm
    landing_bytes: int = 0  # memory the arrived bytes hold until they land
    # Read buffers that arrived views keep alive: id -> views not yet landed.
    # A view holds its whole read (up to RECV_BYTES, other frames too), so
    # the budget is charged each buffer once, in full, while any view of it
    # waits. (The decoder keeps views only of reads that are at least half
    # chunks: padding around small blobs makes them copies.)
    pinned: dict[int, int] = field(default_factory=dict)

    def report(self, peer: bytes, digest: bytes, outcome: Outcome) -> None:
        """Queue an outcome (bytes for the lander, the rest for the loop) and wake it."""
        if isinstance(outcome, bytes | memoryview):
            self.arrived.append((peer, digest, outcome))
            self.fresh.append((peer, digest))
            self.landing_bytes += self._pin(outcome)
            self.land_wake.set()
        else:
            self.results.append((peer, digest, outcome))
        self.rf.wake.set()

    def _pin(self, data: Payload) -> int:
        """Bytes ``data`` newly holds in memory (its buffer's, for the first view)."""
        if isinstance(data, bytes):
            return len(data)
        key = id(data.obj)
        views = self.pinned.get(key, 0)
        self.pinned[key] = views + 1
        return 0 if views else memoryview(data.obj).nbytes

    def unpin(self, data: Payload) -> int:
        """Bytes freed once ``data`` landed (its buffer's, with its last view)."""
        if isinstance(data, bytes):
            return len(data)
        key = id(data.obj)
        views = self.pinned.pop(key) - 1
        if views:
            self.pinned[key] = views
            return 0
        return memoryview(data.obj).nbytes


class FetchManager:
    """See the module docstring."""

    def __init__(
        self,
        links: Links,
        offers: Offers,
        *,
        content: Content,
        on_complete: Callable[[Manifest, bytes, bool], Awaitable[None]],
        hard_timeout: float,
    ) -> None:
        """``on_complete(man, digest, first_holder)``: awaited once a release's every
        blob is stored (``first_holder``: none of it came from peers)."""
        self._links = links
        self._key_of = links.spelling.rules.key_of
        self._offers = offers
        self._content = content
        self._on_complete = on_complete
        self._hard_timeout = hard_timeout
        self.active: dict[str, ReleaseFetch] = {}
        self.received: dict[str, Received] = {}
        self._commit_wanted = trio.Event()
        self.spool = Spool(links.node.root, links.node.store)
        content.spooled = self.spool.read  # what landed is served before its commit
        self._nursery: trio.Nursery | None = None

    def wake(self, key: str) -> None:
        """What the release's swarm may ask for changed: plan again."""
        rf = self.active.get(key)
        if rf is not None:
            rf.wake.set()

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
        """Fetch what ``man`` still needs (replacing an older fetch of its key)."""
        key = self._key_of(man)
        old = self.active.get(key)
        if old is not None:
            if old.man.serial >= man.serial:
                return
            old.scope.cancel()
        self._links.spelling.note(man)  # its platform, for naming it to peers
        rf = ReleaseFetch(man, digest)
        self.active[key] = rf
        self.received[key] = Received(man.serial)
        assert self._nursery is not None, "FetchManager.serve is not running"
        self._nursery.start_soon(self._run, rf)

    def restart(self, key: str, serial: int) -> bool:
        """Re-plan the running fetch of (component, serial) from what the store holds.

        For blobs that arrived another way (an import of the same release): the
        running planner only counts what peers send and would wait for them
        forever; the new fetch finds them stored and completes. Returns False
        if no such fetch was running.
        """
        rf = self.active.get(key)
        if rf is None or rf.man.serial != serial:
            return False
        rf.scope.cancel()
        del self.active[key]
        self.start(rf.man, rf.digest)
        return True

    def stop_carried(self, component: str, below: int) -> None:
        """End the fetches of variants of ``component`` carried for other platforms
        of releases older than ``below``."""
        for key, rf in list(self.active.items()):
            found = self._links.spelling.rules.carried(key)
            if found is not None and found[0] == component and rf.man.serial < below:
                rf.scope.cancel()
                del self.active[key]

    # ----- the fetch -----------------------------------------------------------

    async def _run(self, rf: ReleaseFetch) -> None:
        c = self._key_of(rf.man)
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
            rec = self.received.get(c)
            first_holder = rec is None or rec.serial != rf.man.serial or rec.bytes == 0
            await self._on_complete(rf.man, rf.digest, first_holder)
        await self._links.offload(heap.trim)  # the landing budget's memory, back

    async def _fetch(self, rf: ReleaseFetch) -> None:
        node = self._links.node
        while needed := await self._links.offload(lambda: needed_for(node, rf.man)):
            rf.needed = needed
            _, have = await self._links.offload(lambda: self._content.servable(rf.man))
            swarm = self._offers.fetching(rf.man, rf.digest, needed, have)
            rf.swarm = swarm
            carried = self._key_of(rf.man) != rf.man.component
            log(
                "fetch-started",
                component=rf.man.component,
                version=rf.man.version,
                serial=rf.man.serial,
                blobs=len(needed),
                bytes=sum(needed.values()),
                platform=rf.man.platform if carried else None,  # a variant carried for others
            )
            run = _Attempt(rf, swarm, needed)
            async with trio.open_nursery() as nursery:  # the lander, ranged transfers
                for _ in range(LANDERS):
                    nursery.start_soon(self._lander, run)
                while True:
                    failure = self._settle(run)
                    if failure is not None or swarm.done:
                        break
                    now = trio.current_time()
                    if run.landing_bytes < LANDING_BYTES:  # else a landing wakes us
                        self._ask(run, swarm.next_requests(now), nursery)
                    deadline = swarm.next_deadline()
                    wait = IDLE_SECONDS if deadline is None else min(IDLE_SECONDS, deadline - now)
                    with trio.move_on_after(max(wait, 0.001)):
                        await rf.wake.wait()
                    rf.wake = trio.Event()
                nursery.cancel_scope.cancel()  # late duplicates of re-planned requests
            if failure is not None:
                raise failure  # our store failed: _run retries later
            await self.commit()  # durable before the release can count as complete

    def _ask(self, run: _Attempt, fetches: list[Fetch[bytes]], nursery: trio.Nursery) -> None:
        """Ask each peer for its blobs; the outcomes arrive in ``run.results``."""
        for fetch in fetches:
            peer = fetch.peer
            digests = [run.swarm.index.digests[b] for b in fetch.blobs]
            conn = self._links.conns.get(peer)
            if conn is None:  # it left since the swarm chose it
                run.swarm.peer_left(peer)
                continue
            small = [d for d in digests if run.needed[d] <= SINGLE_FRAME_BYTES]
            for digest in digests:
                if run.needed[digest] > SINGLE_FRAME_BYTES:
                    if conn.session.supports(FEATURE_RANGE):
                        nursery.start_soon(self._get_ranged, run, conn, digest, run.needed[digest])
                    else:
                        run.report(peer, digest, None)  # too big for a peer without ranges
            if conn.session.supports(FEATURE_BATCH) and len(small) > 1:
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

    async def _lander(self, run: _Attempt) -> None:
        """Spool what arrived, a batch at a time in a worker thread, until cancelled.

        It runs beside the fetch loop, so the loop settles answers and sends
        the next requests while a batch is hash-checked: the wire never waits
        for the disk or the hash, and what arrives during one batch is the
        next (larger) batch. Each blob's outcome becomes True (stored at the
        next commit), False (bad bytes) or the store's error.
        """
        while True:
            await run.land_wake.wait()
            run.land_wake = trio.Event()
            arrived, run.arrived = run.arrived, []
            if not arrived:
                continue
            batch = [(digest, data) for _, digest, data in arrived]
            landed = await self._links.offload(partial(self.spool.put_batch, batch))
            run.results += [(p, d, o) for (p, d, _), o in zip(arrived, landed, strict=True)]
            run.landing_bytes -= sum(run.unpin(data) for _, _, data in arrived)
            run.rf.wake.set()

    def _settle(self, run: _Attempt) -> DaemonError | None:
        """Apply the answers that arrived since the last call to the swarm.

        Returns the first store error spooling ran into, if any. The blobs
        that landed reach the swarm (and the counters) once per peer and call,
        not one by one: each update tells every interested neighbour.
        """
        failure = None
        swarm, now = run.swarm, trio.current_time()
        if run.fresh:
            fresh_by: dict[bytes, list[int]] = {}
            for peer, digest in run.fresh:
                fresh_by.setdefault(peer, []).append(swarm.index.position[digest])
            run.fresh = []
            for peer, blobs in fresh_by.items():
                swarm.on_arrived(peer, blobs)
        results, run.results = run.results, []
        component = self._key_of(run.rf.man)
        landed: dict[bytes, list[int]] = {}
        fresh: dict[bytes, list[int]] = {}  # peer -> [bytes, blobs] of first copies
        held, duplicate = swarm.held, 0
        for peer, digest, outcome in results:
            blob = swarm.index.position[digest]
            if outcome is True:  # in the spool: servable from there until committed
                landed.setdefault(peer, []).append(blob)
                size = run.needed[digest]
                if held >> blob & 1:  # held already: an end-game copy
                    duplicate += size
                else:
                    held |= 1 << blob
                    count = fresh.setdefault(peer, [0, 0])
                    count[0] += size
                    count[1] += 1
            elif outcome is False:
                self._offers.run(component, swarm.on_blob(peer, blob, False, now))
            elif outcome is None:
                swarm.on_missing(peer, blob, now)
            elif isinstance(outcome, DaemonError):
                failure = failure or outcome
            # else the connection ended: Offers.peer_left re-planned its blobs
        for peer, blobs in landed.items():
            swarm.on_blobs(peer, blobs, now)
        if landed:
            self._received(run.rf, landed, fresh, duplicate)
        return failure

    def _received(
        self,
        rf: ReleaseFetch,
        landed: dict[bytes, list[int]],
        fresh: dict[bytes, list[int]],
        duplicate: int,
    ) -> None:
        self._commit_wanted.set()
        # Their offers are batched (have_interval) by the offers' timers,
        # which sleep up to MAX_TICK_SECONDS unless told: neighbours that
        # needed these from us waited up to 5 s.
        self._offers.poke()
        rec = self.received.setdefault(self._key_of(rf.man), Received(rf.man.serial))
        rec.duplicate_bytes += duplicate  # traffic, not content
        for peer, (size, blobs) in fresh.items():
            rec.bytes += size
            rec.blobs += blobs
            rec.by_peer[peer.hex()] = rec.by_peer.get(peer.hex(), 0) + size
        for peer, all_blobs in landed.items():
            info = self._links.peers.get(peer)
            if info is not None:
                info.blobs_in += len(all_blobs)

    async def commit(self) -> None:
        """Make spooled blobs durable and commit them to the store."""
        await self._links.offload(self.spool.commit)

    def _committed(self, digests: list[bytes]) -> None:
        """Blobs that went straight into the store (ranged transfers): servable now."""
        now = trio.current_time()
        for rf in self.active.values():
            if rf.swarm is not None:
                rf.swarm.add_held(rf.swarm.index.bits_of(digests), now)
        self._offers.poke()

    # ----- reporting ------------------------------------------------------------

    def status(self, component: str) -> dict[str, Any] | None:
        """The ``fetch`` part of a component in ``status --json`` (None when idle)."""
        rf = self.active.get(component)
        if rf is None:
            return None
        doc: dict[str, Any] = {"serial": rf.man.serial, "version": rf.man.version}
        swarm = rf.swarm
        if swarm is not None and rf.needed is not None:
            needed = sum(rf.needed.values())
            doc.update(
                needed_bytes=needed,
                done_bytes=swarm.bytes_done,
                progress=round(swarm.bytes_done / needed, 4) if needed else 1.0,
                unavailable_blobs=swarm.unavailable().bit_count(),
            )
        return doc
