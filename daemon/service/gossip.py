"""Driving ``protocol.gossip``: announce what we hold, fetch and verify newer manifests.

Theory of operation
-------------------
The pure ``Gossip`` object decides; this service carries its actions out:

* ``SendAnnounce(peer)`` posts our Announce on that peer's connection.
* ``RequestManifest(peer, component, serial, digest)`` starts a task that
  fetches the signed envelope (one ``ManifestRequest``, or ranged pieces when
  both sides speak "range", so manifests larger than a frame still travel),
  then hands it to ``on_offer`` (``Lifecycle.accept_from_peer``): verify against the
  pinned root, check it is the serial and digest the peer announced, persist
  it (``gate.persist_release``) and start fetching its blobs.
* ``Ban(peer, ...)`` (after ``on_manifest_rejected``) bans and disconnects.

What we *hold* for gossip is every release whose manifest we verified and
stored, whether or not its blobs are here yet (``verified``): announcing it
at once lets the whole site learn of a release in a few hops while its
blobs follow, served by anyone who has some (protocol/fleet/swarm.py).
Meanwhile the serial is already at our high-water mark, and any request
gossip plans for it or below is skipped: a second copy of a release we know
is useless, and an older one would fail the rollback check and wrongly get
an honest peer banned. A ``Have`` for a release we do not know is a hint
(``on_hint``) that asks its sender for the manifest.

A manifest signed by keys our root does not know may be signed under a newer
root: before banning, the peer is asked for root N+1, N+2, ... and each is
accepted only through ``TrustStore.advance`` (threshold of old and new keys).
Expired or other-platform releases are valid, so they are skipped, not
punished: an older peer announces its own platform's variant under the bare
component name, which a node of another platform fetches once and then
leaves alone for ``FOREIGN_RETRY_SECONDS`` (``manifest-skipped``, not an
error in the metrics). A peer that speaks "variants" names every variant
with its platform (``Spelling``, links.py), so a node asks it for its own
variant by name, and for the others' only to carry them
(protocol/fleet/variants.py).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from p2pupd.daemon.errors import DaemonError
from p2pupd.daemon.events import log, short
from p2pupd.daemon.net.transport import PeerConnection, TransferError
from p2pupd.daemon.service.links import Links
from p2pupd.daemon.state.carried import NotCarriedError
from p2pupd.daemon.state.gate import NotForThisNodeError, OtherPlatformError
from p2pupd.protocol.errors import (
    ExpiredError,
    RemoteProtocolError,
    ThresholdError,
    UnknownKeyError,
    VerificationError,
)
from p2pupd.protocol.gossip import Action, Ban, Gossip, RequestManifest, SendAnnounce
from p2pupd.protocol.session import Session
from p2pupd.protocol.wire import (
    FEATURE_RANGE,
    MAX_RANGE_BYTES,
    Announce,
    ManifestData,
    ManifestMissing,
    ManifestRangeData,
    RootData,
)

MAX_TICK_SECONDS = 30.0
MAX_ROTATIONS = 8
# A valid manifest not for this node (another platform's, say) is not asked of
# that peer again for this long: it will not change, and it is no one's fault.
FOREIGN_RETRY_SECONDS = 600.0


class GossipService:
    """See the module docstring."""

    def __init__(
        self,
        links: Links,
        rng: random.Random,
        *,
        announcement: Callable[[PeerConnection], Announce],
        high_water: Callable[[str], int],
        on_offer: Callable[[bytes, RequestManifest[bytes]], Awaitable[None]],
        on_root: Callable[[int, bytes], Awaitable[None]],
        interval: float,
        request_timeout: float,
        ban_seconds: float,
    ) -> None:
        """``announcement(conn)``: the Announce we send that peer; ``high_water(c)``: the newest
        serial accepted for ``c``; ``on_offer(envelope, action)``: verify, persist and
        fetch a manifest a peer sent (raises what verification raises);
        ``on_root(version, data)``: accept a newer root."""
        self._links = links
        self._announcement = announcement
        self._high_water = high_water
        self._on_offer = on_offer
        self._on_root = on_root
        self._rng = rng
        self._interval = interval
        self._timeout = request_timeout
        self._ban_seconds = ban_seconds
        self.gossip: Gossip[bytes] = Gossip(
            rng, tracked=links.node.config.components, variants=links.spelling.rules
        )
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None

    def load(self, holdings: dict[str, tuple[int, bytes]]) -> None:
        """Start from these complete holdings (before ``serve``)."""
        self.gossip = Gossip(
            self._rng,
            holdings=holdings,
            tracked=self._links.node.config.components,
            announce_interval=self._interval,
            request_timeout=self._timeout,
            ban_seconds=self._ban_seconds,
            variants=self._links.spelling.rules,
        )

    @property
    def holdings(self) -> dict[str, tuple[int, bytes]]:
        return self.gossip.holdings

    def announcement(self) -> Announce:
        """Our own releases (what an older peer hears; ``carrying`` adds the rest)."""
        return self.gossip.announcement()

    @property
    def carrying(self) -> dict[str, tuple[int, bytes]]:
        return self.gossip.carrying

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the tick loop (periodic announces, timeouts) until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                now = trio.current_time()
                self._run(self.gossip.tick(now))
                deadline = self.gossip.next_deadline()
                wait = MAX_TICK_SECONDS if deadline is None else deadline - now
                with trio.move_on_after(min(MAX_TICK_SECONDS, max(wait, 0.01))):
                    await self._wake.wait()
                self._wake = trio.Event()

    # ----- events from the node ------------------------------------------------

    def peer_joined(self, peer: bytes) -> None:
        """Announce ourselves to a peer that finished its handshake."""
        self._run(self.gossip.peer_joined(peer, trio.current_time()))

    def peer_left(self, peer: bytes) -> None:
        """Forget a peer; re-plan what it owed us."""
        self._run(self.gossip.peer_left(peer, trio.current_time()))

    def on_hint(self, peer: bytes, component: str, serial: int) -> None:
        """A peer has blobs of a release we do not know: ask it for the manifest."""
        self._run(self.gossip.on_hint(peer, component, serial, trio.current_time()))

    def on_announce(self, peer: bytes, entries: list[tuple[str, int, bytes]]) -> None:
        """Record a peer's holdings (in our keys); request newer manifests."""
        self._run(self.gossip.on_announce(peer, entries, trio.current_time()))

    def verified(self, component: str, serial: int, digest: bytes) -> None:
        """A release's manifest is verified and stored: announce it to the peers behind.

        At once, not when its blobs are all here: peers start fetching from
        whoever has blobs of it (knowledge runs ahead of data).
        """
        self._run(self.gossip.on_manifest_verified(component, serial, digest, trio.current_time()))
        self._wake.set()

    # ----- carrying out actions ------------------------------------------------

    def _run(self, actions: list[Action[bytes]]) -> None:
        for action in actions:
            if isinstance(action, SendAnnounce):
                conn = self._links.conns.get(action.peer)
                if conn is not None:
                    conn.post(self._announcement(conn))
            elif isinstance(action, RequestManifest):
                if self._high_water(action.component) >= action.serial:
                    continue  # already accepted (fetching its blobs) or newer
                if self._nursery is not None:
                    self._nursery.start_soon(self._get_manifest, action)
            elif isinstance(action, Ban):
                self._links.ban(action.peer, action.reason, until=action.until)

    async def _get_manifest(self, action: RequestManifest[bytes]) -> None:
        conn = self._links.conns.get(action.peer)
        if conn is None:
            return
        c, s, peer = action.component, action.serial, action.peer
        try:
            data = await fetch_manifest(conn, self._links.spelling.request(conn, c), s, self._timeout)
        except TransferError:
            return  # gossip's own timeout retries elsewhere
        except RemoteProtocolError as exc:
            self._rejected(peer, c, s, f"bad manifest transfer: {exc}")
            return
        if data is None:
            self._run(self.gossip.on_manifest_unavailable(peer, c, s, trio.current_time()))
            return
        for attempt in range(2):
            try:
                await self._on_offer(data, action)
                return
            except (NotForThisNodeError, NotCarriedError) as exc:
                # Valid and honest, just not for this node: no fault, no error.
                why = "platform" if isinstance(exc, OtherPlatformError) else "other"
                log("manifest-skipped", component=c, serial=s, peer=short(peer), why=why,
                    reason=str(exc))  # fmt: skip
                now = trio.current_time()
                self._run(self.gossip.on_manifest_unavailable(peer, c, s, now, FOREIGN_RETRY_SECONDS))
                return
            except ExpiredError as exc:
                # Signed and honest, only past its date (the peer may just
                # hold an old release): skipped, not the peer's fault.
                log("manifest-skipped", component=c, serial=s, peer=short(peer), why="expired",
                    reason=str(exc))  # fmt: skip
                self._run(self.gossip.on_manifest_unavailable(peer, c, s, trio.current_time()))
                return
            except (UnknownKeyError, ThresholdError) as exc:
                if attempt == 0 and await self._rotate_root(conn):
                    continue  # signed under a newer root we now trust: verify again
                self._rejected(peer, c, s, str(exc))
                return
            except (VerificationError, RemoteProtocolError) as exc:
                self._rejected(peer, c, s, str(exc))
                return
            except DaemonError as exc:  # our own storage failed: not the peer's fault
                log("manifest-store-failed", component=c, serial=s, reason=str(exc))
                return

    def _rejected(self, peer: bytes, component: str, serial: int, reason: str) -> None:
        log("manifest-refused", component=component, serial=serial, peer=short(peer), reason=reason)
        now = trio.current_time()
        self._run(self.gossip.on_manifest_rejected(peer, component, serial, now, reason))

    async def _rotate_root(self, conn: PeerConnection) -> bool:
        """Fetch and accept newer roots from ``conn``; True if the pinned root advanced."""
        advanced = False
        for _ in range(MAX_ROTATIONS):
            version = self._links.node.trusted_root().version + 1
            try:
                resp = await conn.request(
                    partial(Session.request_root, version=version), self._timeout
                )
            except TransferError:
                break
            if not isinstance(resp, RootData):
                break
            try:
                await self._on_root(version, resp.data)
            except (VerificationError, RemoteProtocolError) as exc:
                log("root-refused", version=version, peer=short(conn.node_id), reason=str(exc))
                break
            advanced = True
        return advanced


async def fetch_manifest(
    conn: PeerConnection,
    component: str,
    serial: int,
    timeout: float,
    piece: int = MAX_RANGE_BYTES,
) -> bytes | None:
    """The envelope bytes ``conn``'s peer holds for (component, serial), or None.

    Uses ranged requests of ``piece`` bytes when both sides speak "range",
    so a manifest larger than a frame still arrives.

    Raises ``TransferError`` (gone, timeout) or ``RemoteProtocolError`` (the
    pieces do not add up).
    """
    if not conn.session.supports(FEATURE_RANGE):
        resp = await conn.request(lambda s: s.request_manifest(component, serial), timeout)
        return resp.data if isinstance(resp, ManifestData) else None
    parts: list[bytes] = []
    offset, total = 0, None
    while total is None or offset < total:
        at = offset
        resp = await conn.request(
            partial(
                Session.request_manifest_range,
                component=component,
                serial=serial,
                offset=at,
                length=piece,
            ),
            timeout,
        )
        if isinstance(resp, ManifestMissing):
            return None
        if not isinstance(resp, ManifestRangeData):  # the session matched kinds already
            raise RemoteProtocolError(f"unexpected {type(resp).__name__}")
        if total is None:
            total = resp.total
        elif resp.total != total:
            raise RemoteProtocolError("manifest size changed between pieces")
        if not resp.data and offset < total:
            raise RemoteProtocolError("empty manifest piece")
        parts.append(resp.data)
        offset += len(resp.data)
    return b"".join(parts)
