"""The seam between the node service and the services it runs (gossip, fetch, site collection).

``NodeService`` owns the open node, the peer table and the live connections;
the services below it need a narrow slice of that and nothing else, so they
take it as this ``typing.Protocol`` instead of importing ``NodeService``
(which imports them). What a service must *tell* the rest of the node -- a
release is complete, a peer offered a manifest -- goes through constructor
callbacks, wired by ``NodeService`` to ``Lifecycle``, the one coordinator above
gossip and fetch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from p2pupd.daemon.errors import DaemonError
from p2pupd.daemon.net.peers import PeerTable
from p2pupd.daemon.net.transport import PeerConnection
from p2pupd.daemon.offload import Offload
from p2pupd.daemon.state.node import Node
from p2pupd.protocol.fleet.variants import VariantRules
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.wire import FEATURE_VARIANTS, Announce, AnnounceEntry

MAX_PLATFORMS_CACHED = 256  # (component, serial) -> platform of our releases, for spelling


class Links(Protocol):
    """What a service may use of the node service: the node, its peers, blocking work."""

    node: Node
    offload: Offload
    peers: PeerTable
    conns: dict[bytes, PeerConnection]  # joined peers by node id (read only)
    spelling: Spelling

    def ban(self, peer: bytes, reason: str, until: float | None = None, code: int = ...) -> None:
        """Refuse ``peer`` for a while and disconnect it."""
        ...


class Spelling:
    """How release keys are named to and read from each peer (protocol/fleet/variants.py).

    Inside the daemon a release is ``app`` (ours) or ``app@platform`` (a
    variant carried for others); a peer that speaks "variants" hears our own
    variants with their platform too, an older peer hears our own releases
    by component alone and nothing we carry.
    """

    def __init__(self, rules: VariantRules, manifest: Callable[[str, int], Manifest]) -> None:
        """``manifest(component, serial)``: one of our own stored releases (raises
        ``DaemonError``), read to learn a release's platform once."""
        self.rules = rules
        self._manifest = manifest
        self._platforms: dict[tuple[str, int], str | None] = {}

    def note(self, man: Manifest) -> None:
        """Remember the platform of one of our own releases (saves reading it again).

        The daemon notes every release it reads at start or starts fetching, so
        ``platform_of`` reads a manifest from disk on the event loop only for a
        release it met another way (a complete one an import brought). A variant
        carried for another platform is not ours and is not noted."""
        if self.rules.key_of(man) != man.component:
            return
        if len(self._platforms) >= MAX_PLATFORMS_CACHED:
            self._platforms.clear()
        self._platforms[man.component, man.serial] = man.platform

    def platform_of(self, component: str, serial: int) -> str | None:
        """The platform of our own release (component, serial); None if universal
        or unknown."""
        key = (component, serial)
        if key not in self._platforms:
            try:
                self.note(self._manifest(component, serial))
            except DaemonError:
                return None
        return self._platforms.get(key)

    @staticmethod
    def speaks(conn: PeerConnection) -> bool:
        return conn.session.supports(FEATURE_VARIANTS)

    def read(self, conn: PeerConnection, name: str) -> str | None:
        """Our key for a release ``conn``'s peer named ``name``; None: not ours to track."""
        return self.rules.from_wire(name, self.speaks(conn))

    def write(self, conn: PeerConnection, key: str, serial: int) -> str | None:
        """How to name our release (key, serial) to ``conn``'s peer; None: not to it."""
        platform = None if "@" in key else self.platform_of(key, serial)
        return self.rules.to_wire(key, platform, self.speaks(conn))

    def request(self, conn: PeerConnection, key: str) -> str:
        """How to ask ``conn``'s peer for the manifest of our release ``key``."""
        return self.rules.request_key(key, self.speaks(conn))

    def announce(
        self, conn: PeerConnection, own: Announce, carrying: dict[str, tuple[int, bytes]]
    ) -> Announce:
        """Our Announce for ``conn``'s peer: ``own`` as it is to an older peer; to one
        that speaks "variants", our variants named with their platform and the
        variants we carry (``carrying``) besides."""
        if not self.speaks(conn):
            return own
        named: dict[str, tuple[int, bytes]] = {}
        for e in own.entries:
            name = self.write(conn, e.component, e.serial) or e.component
            named[name] = (e.serial, e.manifest_digest)
        named.update(carrying)
        return Announce.from_holdings(named)

    def read_announce(
        self, conn: PeerConnection, entries: tuple[AnnounceEntry, ...]
    ) -> list[tuple[str, int, bytes]]:
        """A peer's Announce in our keys (the newest serial where two names meet)."""
        out: dict[str, tuple[int, bytes]] = {}
        for e in entries:
            key = self.read(conn, e.component)
            if key is not None and e.serial > out.get(key, (0, b""))[0]:
                out[key] = (e.serial, e.manifest_digest)
        return [(k, s, d) for k, (s, d) in sorted(out.items())]
