"""Site requests through the daemon: ask every connected peer for its request file.

Theory of operation. ``p2pupd export --request`` with a daemon running speaks
for the whole site, not just this node: the daemon sends ``NodeRequestQuery``
to every joined peer that advertised the "request" feature, waits up to
``ANSWER_SECONDS`` for their ``NodeRequestData``, and wraps the answers with
its own request in a site request signed by its node key
(``siterequest.build_site_request``). Each answer must be a request signed by
the key it names *and* name the node id the peer proved in its Hello; one that
is not is logged and dropped (it could only have made the bundle bigger), and
peers that did not answer are reported so the operator knows whose needs are
missing. The publisher's bundle then carries what every member needs, so it
can be imported on any of them and spread over the LAN.

Answering a peer costs a scan of the store, so one answer is built at a time
and reused for ``REUSE_SECONDS``: a peer asking in a loop gets the same bytes
instead of keeping a disk busy. An answer lists at most ``PEER_MAX_EXTRA``
loose blobs so it fits in one frame (a request that omits some only makes a
bundle larger).
"""

from __future__ import annotations

import time
from typing import Any

import trio

from p2pupd.daemon.bundles.siterequest import build_request, build_site_request, peer_request
from p2pupd.daemon.events import log, short
from p2pupd.daemon.net.transport import PeerConnection, TransferError
from p2pupd.daemon.service.links import Links
from p2pupd.daemon.state.statedir import now_seconds
from p2pupd.protocol.errors import CodecError, VerificationError
from p2pupd.protocol.wire import FEATURE_REQUEST, NodeRequestData, NodeRequestQuery

ANSWER_SECONDS = 5.0
REUSE_SECONDS = 10.0
PEER_MAX_EXTRA = 60_000  # x 34 encoded bytes: ~2 MB, inside one data frame


class SiteRequests:
    """See the module docstring."""

    def __init__(self, links: Links) -> None:
        self._links = links
        self._lock = trio.Lock()
        self._answer: tuple[float, bytes] | None = None

    async def answer(self, req: NodeRequestQuery) -> NodeRequestData:
        """Answer a peer's query with this node's request (built at most every few seconds)."""
        async with self._lock:
            now = time.monotonic()
            if self._answer is None or now - self._answer[0] > REUSE_SECONDS:
                node = self._links.node
                data = await self._links.offload(
                    lambda: build_request(node, now_seconds(), max_extra=PEER_MAX_EXTRA)[0]
                )
                self._answer = (now, data)
            return NodeRequestData(req.request_id, self._answer[1])

    async def collect(self, site: bool, timeout: float = ANSWER_SECONDS) -> dict[str, Any]:
        """Return ``{"data": request bytes, "unanswered": [peer id hex]}``.

        With ``site`` every able peer is asked; otherwise the request is this
        node's alone.
        """
        node = self._links.node
        own = await self._links.offload(lambda: build_request(node, now_seconds())[0])
        if not site:
            return {"data": own, "unanswered": []}
        asked = [
            c
            for c in list(self._links.conns.values())
            if c.joined and c.session.supports(FEATURE_REQUEST)
        ]
        got: dict[bytes, bytes] = {}

        async def ask(conn: PeerConnection) -> None:
            try:
                resp = await conn.request(lambda s: s.request_node_request(), timeout)
            except TransferError:
                return
            if not isinstance(resp, NodeRequestData):
                return
            try:
                got[conn.node_id] = peer_request(resp.data, conn.node_id)
            except (VerificationError, CodecError) as exc:
                log("site-request-refused", peer=short(conn.node_id), reason=str(exc))

        with trio.move_on_after(timeout + 1.0):
            async with trio.open_nursery() as nursery:
                for conn in asked:
                    nursery.start_soon(ask, conn)
        answers = [got[c.node_id] for c in asked if c.node_id in got]
        data = await self._links.offload(lambda: build_site_request(node, own, answers))
        unanswered = [c.node_id.hex() for c in asked if c.node_id not in got]
        log("site-request", members=1 + len(answers), unanswered=len(unanswered))
        return {"data": data, "unanswered": unanswered}
