"""Platform variants on a mixed site: what a node installs, what it carries for others.

Theory of operation
-------------------
A release is universal (one manifest) or a set of platform variants sharing
one serial and version, each its own signed manifest naming its platform
(docs/publisher-guide.md). Every rule about them is here:

1. **Install only your own.** A node installs a universal release or the
   variant of its own platform (``installs``), never another's: the gate
   that accepts a release for installing, the importer and the apply engine
   each ask this rule.
2. **Carry the other variants of the release you hold.** A node that holds
   release ``s`` of a component (its own variant, accepted) also stores the
   signed manifests of the release's other variants, fetches the blobs a
   node of that platform needs, and serves them. It never carries a variant
   of a release it does not hold itself (``carry_serial``): what it carries
   is bounded by what it keeps, and no peer can make it store anything of a
   release it did not take. A release with no variant for the node's own
   platform is therefore not carried by it (it says so: "no variant of ...").
3. **Carry what a node one release behind needs** (``carry_blobs``): the
   blobs ``export --from-version`` would put on a stick for a node of that
   platform holding the newest earlier release the carrier knows of that
   platform (or universal) -- deltas where they pay, chunks of what is new.
   For an update of a large image that is a few MB of patches, not a second
   copy of the image; a node further behind finds its chunks at nodes of its
   own platform that run the release, or on a stick made for it.
4. **Keep them as long as your own.** gc keeps a carried variant's blobs
   and manifest exactly as long as it keeps the node's own release of the
   same serial (installed, kept, newer than installed, newest), so carrying
   at most multiplies the store's bound by the number of variants; at most
   ``MAX_CARRIED_VARIANTS`` other platforms are carried per component.

Why carry every variant of a held release instead of only what neighbours
ask for: in a partial view (protocol/fleet/view.py) a node of a rare
platform is surrounded by nodes of the common one, and the nodes between the
one that imported a stick and it cannot know they lie on its path; "carry
what some neighbour needs" grows, hop by hop, into "everyone carries it"
anyway, after a round of messages per hop and with state per peer. Carrying
what a node one release behind needs costs each node about one more delta
per variant, needs no new per-peer state, and works whatever the topology.

Release keys
------------
Inside the daemon and on the wire a release is named by a *key*: ``app`` for
the node's own releases (universal or its own platform's variant) and
``app@linux-aarch64`` for a variant it carries. '@' is in neither a
component nor a platform name, so a key parses one way. Peers that both
speak Hello feature "variants" spell every variant with its platform
(``to_wire``: ``app@linux-x86_64`` for the sender's own x86 variant, ``app``
only for a universal release) and read keys back into their own terms
(``from_wire``: a key of the reader's own platform is its ``app``). An older
peer hears only plain names, exactly as before, and never a carried key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from p2pupd.protocol import ids
from p2pupd.protocol.deltaplan import needed_blobs
from p2pupd.protocol.errors import CodecError
from p2pupd.protocol.manifest import Manifest

SEP = "@"
MAX_CARRIED_VARIANTS = 8  # other platforms carried per component (a publisher's mistake bound)


def release_key(component: str, platform: str | None = None) -> str:
    """``component`` or ``component@platform``."""
    return component if platform is None else f"{component}{SEP}{platform}"


def split_key(key: str) -> tuple[str, str | None]:
    """(component, platform or None) of a release key; ``CodecError`` if malformed."""
    component, sep, platform = key.partition(SEP)
    ids.check_component(component)
    if not sep:
        return component, None
    return component, ids.check_platform(platform)


@dataclass(frozen=True)
class VariantRules:
    """One node's platform rules (see the module docstring).

    ``platforms``: the platform each configured component installs (the
    node's platform, or a component's own, e.g. p2pupd's
    ``linux-x86_64-cp311``).
    """

    platforms: Mapping[str, str]
    max_carried: int = MAX_CARRIED_VARIANTS

    def installs(self, component: str, platform: str | None) -> bool:
        """Rule 1: True for a universal release or this node's variant of a configured
        component."""
        own = self.platforms.get(component)
        return own is not None and platform in (None, own)

    def key_of(self, man: Manifest) -> str:
        """The key this node files ``man`` under: its component, or ``component@platform``
        for another platform's variant."""
        if man.platform is None or man.platform == self.platforms.get(man.component):
            return man.component
        return release_key(man.component, man.platform)

    def carried(self, key: str) -> tuple[str, str] | None:
        """(component, platform) if ``key`` names another platform's variant of a
        configured component, else None."""
        if SEP not in key:
            return None
        try:
            component, platform = split_key(key)
        except CodecError:
            return None
        own = self.platforms.get(component)
        if own is None or platform is None or platform == own:
            return None
        return component, platform

    def from_wire(self, key: str, variants: bool) -> str | None:
        """Our key for a key a peer used (``variants``: the peer speaks "variants").

        None for a variant of a component this node does not run.
        """
        if SEP not in key:
            return key
        if not variants:
            return None  # an older peer never says it (the session refuses it)
        try:
            component, platform = split_key(key)
        except CodecError:
            return None
        own = self.platforms.get(component)
        if own is None:
            return None
        return component if platform == own else key

    def to_wire(self, key: str, platform: str | None, variants: bool) -> str | None:
        """How to name our release ``key`` (whose manifest is for ``platform``) to a peer.

        None: a carried variant, which an older peer is never told of.
        """
        if SEP in key:
            return key if variants else None
        if variants and platform is not None:
            return release_key(key, platform)
        return key

    def request_key(self, key: str, variants: bool) -> str:
        """How to ask a peer for the manifest of our release ``key``: to a peer that
        speaks "variants", with our platform (it may hold ours as a carried variant)."""
        if SEP in key or not variants or key not in self.platforms:
            return key
        return release_key(key, self.platforms[key])

    def carry_serial(self, serial: int, held: int, carried_now: int, already: bool) -> bool:
        """Rule 2 (and 4's cap): carry a variant of release ``serial`` when this node
        holds that very release (``held``: its newest accepted serial of the
        component), and ``carried_now`` other variants leave room for it
        (``already``: it is one of them)."""
        return serial == held and (already or carried_now < self.max_carried)


def carry_base(platform: str, serial: int, candidates: Iterable[Manifest]) -> Manifest | None:
    """The newest of ``candidates`` older than ``serial`` that a node of ``platform``
    may hold (universal or that platform's variant), or None."""
    best: Manifest | None = None
    for man in candidates:
        fits = man.serial < serial and man.platform in (None, platform)
        if fits and (best is None or man.serial > best.serial):
            best = man
    return best


def carry_blobs(variant: Manifest, base: Manifest | None) -> dict[bytes, int]:
    """Rule 3: the blobs a node of ``variant``'s platform holding ``base`` needs.

    It has ``base``'s files on disk and its hooks in its store (what
    ``export --from-version`` assumes too), and nothing else. Without a base,
    every chunk and hook. Decided from the variant alone, never from what the
    carrier's own store holds, so every carrier aims at the same set.
    """
    held = [base] if base is not None else []
    hooks = {h.sha256 for h in base.hooks.values()} if base is not None else set()
    return needed_blobs(variant, held, hooks.__contains__)
