"""Variants a node carries for nodes of other platforms: stored, verified, never installed.

Theory of operation. The rules are protocol/fleet/variants.py's; this module
keeps what they decide on disk:

* **Where.** ``releases/<c>/<serial>.<platform>.msgpack`` (``CarriedStore``
  in trusted.py), beside the node's own ``<serial>.msgpack``.
  ``ReleaseStore`` (and so the apply engine, gc's own releases, rollback,
  status) reads only names that are a bare serial, so a carried variant can
  never be taken for the node's own release -- and older p2pupd versions,
  which read the same way, ignore these files.
* **What goes in.** ``verify_carried``: signed under the pinned root (the
  rules a release from outside meets: signatures, threshold, expiry), of a
  configured component, another platform's variant, and of a release the
  node holds itself (its own envelope of that serial is stored) -- rule 2.
  The node's rollback mark moves only with its own releases: a carried
  variant is pinned to a serial the mark already allowed.
* **What it needs.** ``carry_needed``: rule 3's blob set (``carry_blobs``
  from the newest earlier release a node of that platform may hold), less
  the blobs this store has.
* **How long.** ``prune`` (called by gc) drops carried variants of serials
  gc no longer keeps for the node itself -- rule 4; ``keep_blobs`` says
  which blobs gc keeps for those it does.

Reads re-verify under the node's root chain, as for its own releases.
"""

from __future__ import annotations

from p2pupd.daemon.errors import DaemonError, NotFoundError, StorageError
from p2pupd.daemon.state.node import Node
from p2pupd.protocol import limits
from p2pupd.protocol.errors import MixAndMatchError, P2pupdError, RevokedKeyError
from p2pupd.protocol.fleet.variants import VariantRules, carry_base, carry_blobs, release_key
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.trust import Envelope


class NotCarriedError(DaemonError):
    """A valid variant this node does not carry (no variant of another platform, or
    of a release it does not hold): the offer was honest, just not for it."""


def rules_of(node: Node) -> VariantRules:
    """The node's platform rules: which variant each configured component installs."""
    cfg = node.config
    return VariantRules({name: cfg.platform_of(name) for name in cfg.components})


def verify_carried(
    node: Node, data: bytes, component: str, serial: int, platform: str, now: int | None
) -> tuple[Manifest, Envelope, bool]:
    """Verify envelope ``data`` offered as the ``platform`` variant of (component, serial).

    Returns the manifest, its envelope and whether it is new here. Raises a
    ``VerificationError`` or ``RemoteProtocolError`` when the offer was bad
    (signature, expiry, another release than offered: ``MixAndMatchError``)
    and ``NotCarriedError`` when it is not one this node carries, which is
    decided on what the offer claims, before the signature is checked.
    Reads state, writes nothing.
    """
    # What the offer claims decides first, before the signature is checked:
    # a variant this node does not carry costs it a lookup, not a verification.
    if rules_of(node).carried(release_key(component, platform)) is None:
        raise NotCarriedError(f"{component} serial {serial} for {platform}: not carried here")
    if not node.releases.has(component, serial):
        raise NotCarriedError(
            f"{component} serial {serial} for {platform}: this node does not hold that release"
        )
    man, env = node.trusted_root().verify_release(data, now, component)
    if (man.serial, man.platform) != (serial, platform):
        raise MixAndMatchError(
            f"manifest offered as {component} serial {serial} for {platform} is serial "
            f"{man.serial} for {man.platform or 'every platform'}"
        )
    try:
        held = Envelope.decode(
            node.carried.get_bytes(component, serial, platform), limits.MAX_MANIFEST_BYTES
        )
    except (DaemonError, P2pupdError):  # absent or unreadable: stored anew
        return man, env, True
    return man, env, held.payload_digest() != env.payload_digest()


def persist_carried(node: Node, man: Manifest, env: Envelope) -> None:
    """Store a variant ``verify_carried`` accepted. Raises ``StorageError``."""
    assert man.platform is not None
    node.carried.put(man.component, man.serial, man.platform, env)


def base_for(node: Node, man: Manifest) -> Manifest | None:
    """The newest release older than ``man`` that a node of its platform may hold and
    this node knows: a universal release of its own, or a variant it carries."""
    assert man.platform is not None
    chain = node.trust_chain()
    c, platform = man.component, man.platform
    found: list[tuple[int, str | None]] = [(s, None) for s in node.releases.serials(c)]
    found += [(s, p) for s, p in node.carried.carried(c) if p == platform]
    for serial, variant in sorted(found, key=lambda f: (f[0], f[1] or ""), reverse=True):
        if serial >= man.serial:
            continue
        try:
            if variant is None:
                cand = node.releases.get(chain, c, serial)[0]
            else:
                cand = node.carried.get(chain, c, serial, variant)[0]
        except (NotFoundError, StorageError, RevokedKeyError):
            continue
        best = carry_base(platform, man.serial, [cand])
        if best is not None:
            return best
    return None


def carry_needed(node: Node, man: Manifest) -> dict[bytes, int]:
    """Blobs (digest -> size) still to fetch to carry variant ``man`` (rule 3)."""
    blobs = carry_blobs(man, base_for(node, man))
    return {d: size for d, size in blobs.items() if not node.store.has(d)}


def keep_blobs(node: Node, component: str, serials: set[int]) -> set[bytes]:
    """Every blob named by the carried variants of ``serials`` (gc keeps them)."""
    chain = node.trust_chain()
    keep: set[bytes] = set()
    for serial, platform in node.carried.carried(component):
        if serial not in serials:
            continue
        try:
            keep.update(node.carried.get(chain, component, serial, platform)[0].blob_sizes())
        except (NotFoundError, StorageError, RevokedKeyError):
            continue  # unreadable: carried for others only, never a reason to keep
    return keep


def prune(node: Node, component: str, serials: set[int]) -> int:
    """Drop carried variants of ``component`` whose serial is not in ``serials``
    (those gc keeps for the node itself); returns how many went."""
    gone = 0
    for serial, platform in node.carried.carried(component):
        if serial not in serials:
            node.carried.remove(component, serial, platform)
            gone += 1
    return gone
