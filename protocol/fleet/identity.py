"""Node identity: a node id is the hash of the node's public key, proven on every connection.

Theory of operation
-------------------
Every node has an Ed25519 *node key* (``STATE/node.key``; it also signs the
node's request files). Its node id is ``node_id_of(public key)``: the first
16 bytes of a domain-separated SHA-256. Nobody can therefore claim a node id
without holding the matching private key -- provided the claim is *proven*,
which is what feature "proof" of the wire protocol does:

1. Each side's Hello carries its public key and a fresh random challenge
   (16+ bytes, never reused). A Hello whose node id is not the hash of its
   public key is refused (``HandshakeError``).
2. After both Hellos, each side sends ``Proof``: its signature over
   ``proof_statement`` -- a context string, the cluster, the signer's id and
   key, *the other side's* challenge, its own challenge, and the IP address it
   sees the other side at. The receiver checks the signature with the key
   from the Hello (a bad signature is a forgery: ``HandshakeError``) and
   compares that address with its own end of the connection.
3. Signature good and address matching: the peer is *proven*. Signature good
   but address different: the statement was made on another connection --
   a relay (an attacker passing an honest node's answers through), or a NAT
   between the two -- so the peer is admitted as *unproven*, exactly like a
   peer of an older version without the feature.

What proven buys (protocol/fleet/admission.py): bans and the one-connection-per-id
rule key on proven ids; an unproven peer's misdeeds are charged to its
address only, so claiming an honest node's id and misbehaving bans the
attacker's address, never the honest node.

Node ids of older state dirs are random (``secrets.token_bytes(16)``); a
daemon migrates such a node once at start: it makes the node key if there is
none and re-derives the id from it, keeping the old id as ``former node id``
so that bundles cut for a request made under the old id still import
(daemon/bundles/siterequest.py ``identity_for``).

With TLS 1.3 and site membership (protocol/site/membership.py)
----------------------------------------------------------------
The node key is also the key of the node's site credential (an X.509
certificate naming the node id, issued by the site), so on a site member's
links TLS's CertificateVerify proves possession of the node key over the
TLS transcript -- bound to that TLS session end to end, which a relay cannot
splice -- and the credential binds the key to the node id. Feature "proof"
is then redundant and not offered on such a link (the daemon counts the
peer as proven by its credential); the statement's address binding exists
only because plain TCP has no channel to bind to. A later version may
instead keep ``Proof`` on TLS links with the RFC 9266 ``tls-exporter`` value
in place of the address, one code path for both transports. A node enrolled
under a random id of an older version keeps it (its credential names it),
so it is the one case where a node id is not ``node_id_of`` its key; such a
node offers no proof on plain links either.
"""

from __future__ import annotations

import functools
import ipaddress

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from p2pupd.protocol import encoding, ids

NODE_ID_CONTEXT = b"p2pupd node id v1\0"
PROOF_CONTEXT = "p2pupd hello proof v1"
NODE_ID_BYTES = 16
CHALLENGE_BYTES = 32


def node_id_of(public_key: bytes) -> bytes:
    """The node id that belongs to an Ed25519 public key (16 bytes)."""
    return ids.sha256(NODE_ID_CONTEXT + public_key)[:NODE_ID_BYTES]


@functools.lru_cache(maxsize=4096)
def normal_host(host: str) -> str:
    """``host`` in one spelling: an IPv4-mapped IPv6 address as IPv4, brackets and zone off."""
    bare = host.strip("[]").split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return bare
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def proof_statement(
    cluster: str,
    signer_id: bytes,
    signer_key: bytes,
    verifier_challenge: bytes,
    signer_challenge: bytes,
    verifier_host: str,
) -> bytes:
    """The bytes a ``Proof`` signs (canonical msgpack; see the module docstring)."""
    return encoding.encode(
        [
            PROOF_CONTEXT,
            cluster,
            signer_id,
            signer_key,
            verifier_challenge,
            signer_challenge,
            normal_host(verifier_host),
        ]
    )


class NodeKey:
    """A node's private key, as the session needs it: its public half, its id, signing."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_key = private.public_key().public_bytes_raw()
        self.node_id = node_id_of(self.public_key)

    @classmethod
    def generate(cls) -> NodeKey:
        """A new random key (tests and the fleet simulator; daemons load theirs)."""
        return cls(Ed25519PrivateKey.generate())

    def sign(self, statement: bytes) -> bytes:
        """Ed25519 signature over ``statement``."""
        return self._private.sign(statement)


def verify_signature(public_key: bytes, statement: bytes, signature: bytes) -> bool:
    """True if ``signature`` is ``public_key``'s over ``statement``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, statement)
    except (InvalidSignature, ValueError):
        return False
    return True
