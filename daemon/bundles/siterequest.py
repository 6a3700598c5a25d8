"""The node key and the request file a site sends its publisher.

Theory of operation. A node signs its requests with a *node key*: an Ed25519
key made on first use and kept in ``STATE/node.key`` (mode 0600, written
atomically, never leaves the node). Its public half travels in every request;
a bundle cut for that request carries the request back, and the importer
accepts it only when it names this node's id *and* public key (see
protocol/request.py for what this does and does not protect). A node that
never made a request has no key, so it refuses every bundle cut for one.

``build_request`` summarises the node compactly: per component the installed
serial and high-water mark, per stored release its digest and whether its files
are on disk and its blobs complete in the store; only the store blobs no
complete release accounts for are listed one by one.

``build_site_request`` is the daemon's version: this node's request plus the
signed requests its peers sent it (each verified, and bound to the node id the
peer proved in its Hello), wrapped and signed with this node's key.
"""

from __future__ import annotations

from dataclasses import replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pupd.daemon.errors import CorruptStoreError, NotFoundError, StorageError
from p2pupd.daemon.fsutil import atomic_write
from p2pupd.daemon.state.membership import MembershipStore
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.state.statedir import MAX_FORMER_IDS, NodeConfig, StateDir
from p2pupd.protocol.errors import CodecError, MixAndMatchError, VerificationError
from p2pupd.protocol.fleet.identity import NodeKey
from p2pupd.protocol.request import (
    MAX_EXTRA_BLOBS,
    MAX_REQUEST_RELEASES,
    ComponentHave,
    HeldRelease,
    Request,
    sign_request,
    sign_site_request,
    verify_request,
)

NODE_KEY_FILE = "node.key"
NODE_KEY_MODE = 0o600


def _read_key(state: StateDir) -> Ed25519PrivateKey | None:
    path = state.root / NODE_KEY_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read node key {path}: {exc.strerror}") from None
    if len(raw) != 32:
        raise CorruptStoreError(f"node key {path} is damaged (expected 32 bytes)")
    return Ed25519PrivateKey.from_private_bytes(raw)


def node_key(state: StateDir) -> Ed25519PrivateKey:
    """Return the node key, creating it on first use (caller holds the node lock).

    Raises ``StorageError`` if it cannot be read or written.
    """
    key = _read_key(state)
    if key is None:
        key = Ed25519PrivateKey.generate()
        atomic_write(state.root / NODE_KEY_FILE, key.private_bytes_raw(), mode=NODE_KEY_MODE)
    return key


def identity_for(
    state: StateDir, config: NodeConfig, *, fresh: bool = False
) -> tuple[NodeKey, NodeConfig]:
    """The node key as the wire's proof needs it, and the config with the id it proves.

    A node id is the hash of the node key (protocol/fleet/identity.py). A
    state dir from before that has a random id: it is replaced by the derived
    one and the config rewritten, the old id kept in ``former_node_ids``
    (unless ``fresh``: a node just made, whose random id was never used). A
    node enrolled in a site keeps its id: its credential names that id and
    binds it to the node key, and TLS proves the key on every link. The
    caller holds the node lock. Raises ``StorageError`` if the key or the
    config cannot be written.
    """
    key = NodeKey(node_key(state))
    if config.node_id == key.node_id:
        return key, config
    if not fresh and MembershipStore(state).credential_bytes() is not None:
        return key, config
    former = () if fresh else (config.node_id, *config.former_node_ids)
    new = replace(config, node_id=key.node_id, former_node_ids=former[:MAX_FORMER_IDS])
    state.write_config(new)
    return key, new


def node_identity(node: Node, *, fresh: bool = False) -> NodeKey:
    """``identity_for`` on an open node (its config updated too)."""
    key, node.config = identity_for(node.state, node.config, fresh=fresh)
    return key


def node_public_key(state: StateDir) -> bytes | None:
    """Return the node's public key, or None if it never made one."""
    key = _read_key(state)
    return None if key is None else key.public_key().public_bytes_raw()


def build_request(
    node: Node, now: int, *, max_extra: int = MAX_EXTRA_BLOBS
) -> tuple[bytes, Request]:
    """Return (signed request file bytes, request) describing ``node``.

    The caller holds the node lock (the node key may be created). Stored
    releases that fail re-verification are left out; at most ``max_extra``
    loose blobs are listed (a request sent to a peer must fit in a frame).
    Raises ``StorageError``.
    """
    key = node_key(node.state)
    chain = node.trust_chain()
    trusted = chain.current
    states = node.state.read_states()
    store = set(node.store.iter_digests())
    held: list[HeldRelease] = []
    covered: set[bytes] = set()
    for comp in node.releases.components():
        st = states.get(comp)
        on_disk: set[int] = set()
        if st is not None:
            on_disk = set(st.kept) | ({st.installed} if st.installed is not None else set())
        for serial in reversed(node.releases.serials(comp)):
            try:
                man, env = node.releases.get(chain, comp, serial)
            except (NotFoundError, StorageError, CodecError, VerificationError):
                continue
            blobs = man.chunk_digests() | {h.sha256 for h in man.hooks.values()}
            complete = blobs <= store
            if complete:
                covered |= blobs
            held.append(
                HeldRelease(comp, serial, env.payload_digest(), serial in on_disk, complete)
            )
    # Keep what is on disk first, then the newest: a dropped entry only makes
    # the bundle bigger (its blobs are then sent again), never wrong.
    held.sort(key=lambda r: (not r.on_disk, -r.serial, r.component))
    extras = sorted(store - covered)
    req = Request(
        node_id=node.config.node_id,
        node_key=key.public_key().public_bytes_raw(),
        repository=trusted.root.name,
        root_version=trusted.version,
        root_digest=trusted.envelope.payload_digest(),
        platform=node.config.platform,
        created=now,
        components=tuple(
            ComponentHave(
                name,
                states[name].installed if name in states else None,
                states[name].high_water if name in states else 0,
            )
            for name in sorted(node.config.components)
        ),
        releases=tuple(held[:MAX_REQUEST_RELEASES]),
        extra_blobs=tuple(extras[:max_extra]),
        extra_truncated=len(extras) > max_extra,
        site_seal=_site_seal(node),
    )
    return sign_request(req, key), req


def _site_seal(node: Node) -> bytes | None:
    """The seal key of this node's site, if the node is a member (holds the key to open
    what is sealed to it): the publisher then seals the bundle it cuts for the request."""
    site = node.membership.site()
    if site is None:
        return None
    try:
        keys = node.membership.seal_keys(node.config.node_id)
    except StorageError:  # damaged membership: ask for a plain bundle rather than fail
        return None
    return site.current.seal if keys else None


def peer_request(data: bytes, peer_id: bytes) -> bytes:
    """Check a request a peer sent us: valid, and made by the node that peer is.

    Raises ``VerificationError``/``CodecError`` (the peer misbehaved) otherwise.
    """
    req, _ = verify_request(data)
    if req.node_id != peer_id:
        raise MixAndMatchError(
            f"peer {peer_id.hex()[:12]} sent the request of node {req.node_id.hex()[:12]}"
        )
    return data


def build_site_request(node: Node, own: bytes, peers: list[bytes]) -> bytes:
    """Return the signed site request of ``own`` and the ``peers``' requests.

    The caller holds the node lock and has checked each peer's document with
    ``peer_request``. With no peer answer the result is ``own`` unchanged.
    """
    return sign_site_request(own, peers, node_key(node.state)) if peers else own
