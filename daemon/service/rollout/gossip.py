"""Carrying reports and rollout actions over peer connections (wire feature "report").

Theory of operation
-------------------
``protocol.rollout.spread.Spread`` decides who hears what; this service
carries its sends out (``ReportNews``, ``ReportDigest`` on the peer's
connection, only to peers that advertised "report": older peers never see
them) and feeds what peers send into the ``RolloutService``.

Incoming news is rate-limited per peer before anything is decoded
(``Spread.admit``), queued (at most ``MAX_QUEUED`` documents; the excess is
dropped and counted), and checked by a task of its own: a signature check is
~0.1 ms, and a burst of news (a node joining a site of 10,000 hears them all)
must not stall the connections, so reports are checked ``BATCH`` at a time in
a worker thread (``RolloutService.offer_reports``; the check releases the
GIL) and only their bookkeeping runs on the event loop. Documents accepted for the
first time are pushed on (``Spread.learned``): actions always, reports when
they came as news or in a small digest answer (a healed partition), not when
a digest answer brought hundreds (this node catching up on joining: old news
to everyone else). The rest were echoes, replays or forgeries and go no
further. A digest from a peer is answered with what it lacks.
"""

from __future__ import annotations

import random
from collections import deque

import trio

from p2pupd.daemon.net.transport import PeerConnection
from p2pupd.daemon.service.links import Links
from p2pupd.daemon.service.rollout.service import RolloutService
from p2pupd.protocol.rollout.ledger import ActionVerdict
from p2pupd.protocol.rollout.spread import SendNews, Spread, SpreadAction
from p2pupd.protocol.wire import (
    FEATURE_REPORT,
    MAX_DIGEST_ACTIONS,
    MAX_DIGEST_REPORTS,
    ReportDigest,
    ReportNews,
)

MAX_QUEUED = 4096
CATCH_UP_RELAY = 32  # new reports from one digest answer still passed on
BATCH = 64  # reports checked per worker-thread hop
TICK_SECONDS = 30.0


class ReportGossip:
    """See the module docstring."""

    def __init__(self, links: Links, rollout: RolloutService, rng: random.Random) -> None:
        self._links = links
        self._rollout = rollout
        self.spread: Spread[bytes] = Spread(rng)
        # (peer, is_report, doc, relay): relay False for answers to our digest
        self._queue: deque[tuple[bytes, bool, bytes, bool]] = deque()
        self._wake = trio.Event()
        self.queue_dropped = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check queued news and send periodic digests until cancelled."""
        task_status.started()
        while True:
            await self._drain()
            table = self._rollout.table
            if table is not None:
                self._run(self.spread.tick(trio.current_time(), len(table)))
            deadline = self.spread.next_deadline()
            wait = TICK_SECONDS if deadline is None else deadline - trio.current_time()
            with trio.move_on_after(min(TICK_SECONDS, max(wait, 0.05))):
                await self._wake.wait()
            self._wake = trio.Event()

    # ----- events from the node -------------------------------------------------------

    def peer_joined(self, conn: PeerConnection) -> None:
        if conn.session.supports(FEATURE_REPORT) and self._rollout.table is not None:
            self._run(self.spread.peer_joined(conn.node_id, trio.current_time()))

    def peer_left(self, peer: bytes) -> None:
        self.spread.peer_left(peer)

    def message(self, conn: PeerConnection, msg: ReportNews | ReportDigest) -> None:
        """A peer's news (queued for checking) or digest (answered at once); must not block."""
        peer = conn.node_id
        if isinstance(msg, ReportDigest):
            self._answer(peer, msg)
            return
        docs = [(True, d) for d in msg.reports] + [(False, d) for d in msg.actions]
        relay = msg.relay
        take = self.spread.admit(peer, len(docs), trio.current_time())
        room = MAX_QUEUED - len(self._queue)
        if take > room:
            self.queue_dropped += take - room
            take = max(room, 0)
        for is_report, doc in docs[:take]:
            self._queue.append((peer, is_report, doc, relay))
        if take:
            self._wake.set()

    def send_own(self, reports: list[bytes], actions: list[bytes]) -> None:
        """Documents this node made: every connected peer hears of them."""
        self._run(self.spread.learned(reports, actions, None))

    # ----- internals ---------------------------------------------------------------------

    async def _drain(self) -> None:
        # per origin: (reports pushed as news, reports from a digest answer, actions)
        by_origin: dict[bytes, tuple[list[bytes], list[bytes], list[bytes]]] = {}
        while self._queue:
            # A run of reports (at most BATCH) is checked in one worker-thread
            # hop; an action is taken where it stands, so order is kept.
            run: list[tuple[bytes, bytes, bool]] = []
            while self._queue and len(run) < BATCH and self._queue[0][1]:
                peer, _, doc, relay = self._queue.popleft()
                run.append((peer, doc, relay))
            if run:
                offers = await self._rollout.offer_reports([doc for _, doc, _ in run])
                for (peer, doc, relay), offer in zip(run, offers, strict=True):
                    if offer.accepted:
                        by_origin.setdefault(peer, ([], [], []))[0 if relay else 1].append(doc)
                await trio.sleep(0)
                continue
            peer, _, doc, _ = self._queue.popleft()
            if self._rollout.offer_action(doc) is ActionVerdict.ACCEPTED:
                by_origin.setdefault(peer, ([], [], []))[2].append(doc)  # always passed on
        for origin, (news, caught_up, actions) in by_origin.items():
            # A digest answer with a handful of new reports is news this node
            # missed (a healed partition): pass it on. Hundreds are a catch-up
            # (this node just joined): old news to everyone else.
            if len(caught_up) <= CATCH_UP_RELAY:
                news += caught_up
            self._run(self.spread.learned(news, actions, origin))

    def _answer(self, peer: bytes, msg: ReportDigest) -> None:
        table, ledger = self._rollout.table, self._rollout.ledger
        if table is None or ledger is None:
            return
        theirs = dict(msg.summary)
        actions = {d: doc for led in ledger.releases() for d, doc in led.docs.items()}
        self._run(self.spread.on_digest(peer, theirs, msg.known, table.newer_than(theirs), actions))

    def digest(self) -> ReportDigest:
        """Our ``ReportDigest``: every report held (node id, seq) and every action digest."""
        table, ledger = self._rollout.table, self._rollout.ledger
        assert table is not None and ledger is not None
        summary = tuple(sorted(table.summary().items()))[:MAX_DIGEST_REPORTS]
        known = sorted({d for led in ledger.releases() for d in led.docs})[:MAX_DIGEST_ACTIONS]
        return ReportDigest(summary, tuple(known))

    def _run(self, actions: list[SpreadAction[bytes]]) -> None:
        for action in actions:
            conn = self._links.conns.get(action.peer)
            if conn is None or not conn.session.supports(FEATURE_REPORT):
                continue
            if isinstance(action, SendNews):
                conn.post(ReportNews(action.reports, action.actions, action.relay))
            else:
                conn.post(self.digest())
