"""Accepting a verified release: the one path every signed manifest takes into a node.

Theory of operation. Whatever brought a manifest -- a bundle (``importer``),
a peer (``gossip_service``) -- it becomes part of the node in two steps:

1. ``verify_offer`` (network) or the importer's own bundle checks decide it is
   trustworthy: signatures against the pinned root, expiry on the node clock,
   the component it was offered as, the modes it would install
   (``manifest.check_modes`` against the component's configuration), and the
   rollback rule (``check_serial`` against the component's high-water
   mark). Nothing is written.
2. ``persist_release`` stores the envelope (atomic write) and only then raises
   the high-water mark and records the event in the component's history, so a
   crash in between leaves a stored release the mark still allows to re-accept.

The blobs a release needs are fetched or copied separately; ``needed_for``
says which are still missing (``deltaplan.needed_blobs``: the cheapest path
given the versions on disk), and a release with nothing missing is complete.
"""

from __future__ import annotations

from p2pupd.daemon.errors import DaemonError, NotFoundError, StorageError
from p2pupd.daemon.state import carried, components
from p2pupd.daemon.state.node import Node
from p2pupd.protocol.deltaplan import needed_blobs
from p2pupd.protocol.errors import HazardousModeError, MixAndMatchError, RevokedKeyError
from p2pupd.protocol.manifest import Manifest, check_modes
from p2pupd.protocol.trust import Envelope, check_serial


class NotForThisNodeError(DaemonError):
    """A validly signed release this node does not take (component or platform)."""


class OtherPlatformError(NotForThisNodeError):
    """A validly signed variant for another platform than the one this node installs
    (it may carry it for others: carried.py; it never installs it)."""


def verify_offer(
    node: Node, data: bytes, component: str, serial: int, now: int | None
) -> tuple[Manifest, Envelope, bool]:
    """Verify manifest envelope ``data`` a peer offered as (``component``, ``serial``).

    Returns the manifest, its envelope and whether it is new (False: the very
    release already held at the high-water mark). Raises a
    ``VerificationError`` or ``RemoteProtocolError`` when the peer sent
    something bad (signature, threshold, expiry, mix-and-match, rollback,
    malformed bytes) and ``NotForThisNodeError`` when it is valid but not for
    this node. Reads state, writes nothing.
    """
    man, env = node.trusted_root().verify_release(data, now, component)
    if man.serial != serial:
        raise MixAndMatchError(
            f"manifest offered as {component} serial {serial} is serial {man.serial}"
        )
    if component not in node.config.components:
        raise NotForThisNodeError(f"component {component!r} is not configured on this node")
    platform = node.config.platform_of(component)
    if man.platform is not None and man.platform != platform:
        raise OtherPlatformError(
            f"{component} {man.version} is for platform {man.platform}, "
            f"this node installs {platform}"
        )
    try:
        check_modes(man, node.config.components[component].allow_hazardous_modes)
    except HazardousModeError as exc:  # valid, and the peer is honest: just not for us
        raise NotForThisNodeError(str(exc)) from None
    st = node.state.read_state(component)
    is_new = check_serial(man, st.high_water, st.high_digest, env.payload_digest())
    return man, env, is_new


def persist_release(
    node: Node, man: Manifest, env: Envelope, digest: bytes, event: str, detail: str
) -> None:
    """Store a verified release, raise the high-water mark, record ``event``.

    The caller verified ``env`` (and its serial) and holds the node lock (or
    the daemon's state mutex). ``digest`` is ``env.payload_digest()``.
    Raises ``StorageError``.
    """
    node.releases.put(man.component, man.serial, env)
    components.accepted(node, man, digest, event, detail)


def held_manifests(node: Node, component: str) -> list[Manifest]:
    """Manifests of the versions of ``component`` whose files are on disk."""
    st = node.state.read_state(component)
    serials = ([st.installed] if st.installed is not None else []) + list(st.kept)
    out = []
    for s in serials:
        try:
            out.append(node.manifest(component, s))
        except (NotFoundError, StorageError, RevokedKeyError):  # revoked: never a base
            continue
    return out


def needed_for(node: Node, man: Manifest) -> dict[bytes, int]:
    """Blobs (digest -> size) still to receive before ``man`` can be built here; for
    another platform's variant, before this node carries it (``carried.carry_needed``)."""
    if man.platform is not None and man.platform != node.config.platform_of(man.component):
        return carried.carry_needed(node, man)
    return needed_blobs(man, held_manifests(node, man.component), node.store.has)
