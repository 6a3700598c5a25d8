"""Site membership: who may join a site's swarm. The trust rules, pure.

Theory of operation
-------------------
A **site** is the customer's own trust anchor, separate from the publisher's
root (see docs/security-model.md for why it is not a role in the root). The
site operator holds a *site key* (Ed25519, signs credentials and revocation
lists) and a *seal key* (X25519, opens sticks sealed to the site). Nodes pin
the public **site document**: a self-signed envelope (document type ``site``)
naming the site, its key, its seal key's public half and the site's CA
certificate (the same key, as X.509, so TLS can chain to it).

A node becomes a **member** when the operator turns its *enrolment request*
(node id, node key, node box key; signed by the node key, so nobody can
enrol a key they do not hold) into a **credential**: an X.509 certificate
over the node key, issued by the site CA, naming the node id, valid until an
optional expiry. The node key is the certificate key, so in TLS the
handshake's CertificateVerify proves possession of the node key and of the
credential at once.

A **revocation list** (document type ``site-revocations``) is signed by the
site key, names revoked node ids and node key ids, and carries a sequence
number. A node keeps the highest sequence it has seen; an older list (a
replay) moves nothing, and two different lists with one sequence are refused.
Lists are cumulative: each names every revocation still in force.

Site key **rotation** (``TrustedSite.rotate``) follows the root's rule: site
document N+1 is signed by the key of N and its own; it may declare earlier
site keys compromised (``revoked``). Credentials issued by any key of the
chain stay valid (a routine rotation does not force re-enrolment) unless that
key is revoked.

Rules, one check each (time is always passed in, never read):
  1. a document decodes canonically and has its schema ........ CodecError/SchemaError
  2. a site document is signed by its own key (and, rotating,
     by the previous one); version exactly N+1; same name ....... BadSignatureError/RollbackError/MixAndMatchError
  3. an enrolment request is signed by the node key it names ... BadSignatureError
  4. a credential is an X.509 v3 leaf over an Ed25519 key,
     naming exactly one node id ................................ SchemaError
  5. it is issued by a key of the site chain, signature valid .. UnknownKeyError/BadSignatureError
  6. its issuing key is not revoked by the site chain ........... RevokedKeyError
  7. now is within its validity ................................. ExpiredError
  8. its node id and key are not on the revocation list ......... RevokedKeyError
  9. a revocation list is signed by a live site key, for this
     site; its sequence is above the one held (equal: the same
     list) ...................................................... BadSignatureError/MixAndMatchError/RollbackError
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtensionOID

from p2pupd.protocol import encoding, limits
from p2pupd.protocol.errors import (
    BadSignatureError,
    CodecError,
    ExpiredError,
    MixAndMatchError,
    RevokedKeyError,
    RollbackError,
    SchemaError,
    UnknownKeyError,
)
from p2pupd.protocol.trust import Envelope, Role, check_signatures, key_id, sign

SITE_TYPE = "site"
ENROL_TYPE = "enrol-request"
MEMBERSHIP_TYPE = "membership"
REVOCATIONS_TYPE = "site-revocations"
SPEC_VERSION = 1
NODE_ID_BYTES = 16
MAX_SITE_DOC_BYTES = 64 * 1024
MAX_ENROL_BYTES = 16 * 1024
MAX_CREDENTIAL_BYTES = 16 * 1024
# A revocation list gossips in one frame (wire.SiteNews), so it fits one:
# about 95 bytes per revoked node.
MAX_REVOCATIONS_BYTES = limits.MAX_FRAME_BYTES - 4 * limits.KiB
MAX_REVOKED_NODES = 40_000
MAX_MEMBERSHIP_BYTES = MAX_REVOCATIONS_BYTES + 1 * limits.MiB  # carries the newest list
MAX_SITE_NAME_CHARS = 64

# What decoding each payload may spend (protocol/limits.DecodeBudget). A site
# document and an enrolment request are self-signed -- the key is inside -- and
# a membership document names the site chain its signer is found in, so those
# are decoded before their signature can be checked, under small budgets. A
# revocation list is decoded only after a live site key's signature over its
# raw bytes verified.
SITE_DOC_BUDGET = limits.DecodeBudget(
    max_bytes=MAX_SITE_DOC_BYTES, max_objects=2 * 1024 + 32, max_depth=2, max_len=1024,
    max_str=1024, max_bin=MAX_CREDENTIAL_BYTES, name="site document",
)  # fmt: skip
ENROL_BUDGET = limits.DecodeBudget(
    max_bytes=MAX_ENROL_BYTES, max_objects=32, max_depth=1, max_len=16, max_str=128,
    max_bin=64, name="enrolment request",
)  # fmt: skip
MEMBERSHIP_BUDGET = limits.DecodeBudget(
    max_bytes=MAX_MEMBERSHIP_BYTES, max_objects=128, max_depth=2, max_len=64, max_str=64,
    max_bin=MAX_REVOCATIONS_BYTES, name="membership document",
)  # fmt: skip
REVOCATIONS_BUDGET = limits.DecodeBudget(
    max_bytes=MAX_REVOCATIONS_BYTES, max_objects=4 * MAX_REVOKED_NODES + 32, max_depth=3,
    max_len=MAX_REVOKED_NODES, max_str=128, max_bin=64, name="revocation list",
)  # fmt: skip
NODE_URI_PREFIX = "urn:p2pupd:node:"


def seal_key_id(public_raw: bytes) -> str:
    """The id of an X25519 seal key (hex sha256 over a type tag and the raw key)."""
    return key_id(b"x25519\x00" + public_raw)


def membership_context(node_id: bytes) -> bytes:
    """What the site's seal key is sealed to a node for: this purpose, this node."""
    return b"site seal key\x00" + node_id


def node_uri(node_id: bytes) -> str:
    """The subjectAltName URI a credential names its node by."""
    return NODE_URI_PREFIX + node_id.hex()


def _bytes(v: Any, n: int, what: str) -> bytes:
    if not isinstance(v, bytes) or len(v) != n:
        raise SchemaError(f"{what} must be {n} bytes")
    return v


def _int(v: Any, what: str, minimum: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise SchemaError(f"{what} must be an integer >= {minimum}")
    return v


def _name(v: Any) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= MAX_SITE_NAME_CHARS or not v.isprintable():
        raise SchemaError(f"site name must be printable text of 1..{MAX_SITE_NAME_CHARS} chars")
    return v


def _env(data: bytes, max_bytes: int, what: str) -> Envelope:
    """The envelope alone (its payload not decoded: ``limits.ENVELOPE_BUDGET``)."""
    if len(data) > max_bytes:
        raise SchemaError(f"{what} of {len(data)} bytes exceeds limit {max_bytes}")
    return Envelope.decode(data, max_bytes)


def _value(env: Envelope, budget: limits.DecodeBudget) -> dict[str, Any]:
    v = encoding.decode(env.payload, budget=budget)
    if not isinstance(v, dict):
        raise SchemaError(f"{budget.name} is not a map")
    return v


def _envelope(
    data: bytes, budget: limits.DecodeBudget
) -> tuple[Envelope, dict[str, Any]]:
    """Envelope and payload of a document decoded before its signature (small budgets)."""
    env = _env(data, budget.max_bytes, budget.name)
    return env, _value(env, budget)


def _signed_by(doc_type: str, env: Envelope, public: bytes, what: str) -> None:
    kid = key_id(public)
    check_signatures(doc_type, env, {kid: public}, Role((kid,), 1), what)


# -- the site document --------------------------------------------------------------


@dataclass(frozen=True)
class SiteDoc:
    """One version of a site's public document."""

    name: str
    version: int
    key: bytes  # Ed25519 public key: signs credentials and revocation lists
    seal: bytes  # X25519 public key: sticks sealed to the site
    ca: bytes  # DER of the site CA certificate (self-signed by ``key``)
    revoked: tuple[str, ...] = ()  # key ids of earlier site keys declared compromised

    @property
    def key_id(self) -> str:
        return key_id(self.key)

    @property
    def seal_id(self) -> str:
        return seal_key_id(self.seal)

    def to_value(self) -> dict[str, Any]:
        return {
            "_type": SITE_TYPE,
            "spec": SPEC_VERSION,
            "name": self.name,
            "version": self.version,
            "key": self.key,
            "seal": self.seal,
            "ca": self.ca,
            "revoked": sorted(self.revoked),
        }

    @classmethod
    def from_value(cls, v: dict[str, Any]) -> SiteDoc:
        if v.get("_type") != SITE_TYPE or v.get("spec") != SPEC_VERSION:
            raise SchemaError("document is not a p2pupd site document")
        revoked = v.get("revoked")
        if (
            not isinstance(revoked, list)
            or len(revoked) > 1024
            or not all(isinstance(k, str) and len(k) == 64 for k in revoked)
        ):
            raise SchemaError("site document: revoked must be a list of key ids")
        ca = v.get("ca")
        if not isinstance(ca, bytes) or not 0 < len(ca) <= MAX_CREDENTIAL_BYTES:
            raise SchemaError("site document: ca must be a DER certificate")
        doc = cls(
            _name(v.get("name")),
            _int(v.get("version"), "site version", 1),
            _bytes(v.get("key"), 32, "site key"),
            _bytes(v.get("seal"), 32, "site seal key"),
            ca,
            tuple(revoked),
        )
        if doc.key_id in doc.revoked:
            raise SchemaError("site document revokes its own key")
        ca_key = _ed25519_key(_load_cert(ca, "site CA certificate"), "site CA certificate")
        if ca_key != doc.key:
            raise SchemaError("site CA certificate is not over the site key")
        return doc

    def sign(self, keys: Iterable[Ed25519PrivateKey]) -> bytes:
        """The signed envelope of this document (for the site tool)."""
        return sign(SITE_TYPE, encoding.encode(self.to_value()), keys).encode()


class TrustedSite:
    """The site a node pinned, and every site document accepted since (rules 2, 5-6, 9)."""

    def __init__(self, docs: Mapping[int, SiteDoc], envelopes: Mapping[int, bytes]) -> None:
        self.docs = dict(sorted(docs.items()))
        self.envelopes = dict(envelopes)
        self.current = self.docs[max(self.docs)]
        self.revoked = {k for d in self.docs.values() for k in d.revoked}

    @property
    def name(self) -> str:
        return self.current.name

    @property
    def version(self) -> int:
        return self.current.version

    @classmethod
    def load(cls, data: bytes) -> TrustedSite:
        """Pin a site from its document (the operator chose to trust it): self-signed check."""
        env, v = _envelope(data, SITE_DOC_BUDGET)
        doc = SiteDoc.from_value(v)
        _signed_by(SITE_TYPE, env, doc.key, f"site {doc.name} v{doc.version}")
        return cls({doc.version: doc}, {doc.version: data})

    @classmethod
    def from_chain(cls, chain: Mapping[int, bytes]) -> TrustedSite:
        """Load a stored chain: the lowest version pinned, each next one rotated in."""
        if not chain:
            raise SchemaError("empty site chain")
        versions = sorted(chain)
        site = cls.load(chain[versions[0]])
        for v in versions[1:]:
            site = site.rotate(chain[v])
        return site

    def rotate(self, data: bytes) -> TrustedSite:
        """Return the site after accepting document N+1 (signed by N's key and its own)."""
        env = _env(data, MAX_SITE_DOC_BYTES, "site document")
        cur = self.current
        # The old key's signature first, over the raw bytes: a document no key
        # of ours signed is never decoded.
        _signed_by(SITE_TYPE, env, cur.key, f"site {cur.name} v{cur.version + 1} (old key)")
        doc = SiteDoc.from_value(_value(env, SITE_DOC_BUDGET))
        if doc.version != cur.version + 1:
            raise RollbackError(f"site document v{doc.version} cannot follow v{cur.version}")
        if doc.name != cur.name:
            raise MixAndMatchError(f"site document for {doc.name!r} cannot follow {cur.name!r}")
        _signed_by(SITE_TYPE, env, doc.key, f"site {doc.name} v{doc.version} (new key)")
        return TrustedSite({**self.docs, doc.version: doc}, {**self.envelopes, doc.version: data})

    def walk(self, chain: Mapping[int, bytes]) -> TrustedSite:
        """Rotate through the documents of ``chain`` newer than ours; a held version must match."""
        for version, data in chain.items():
            held = self.envelopes.get(version)
            if held is not None and _payload(held) != _payload(data):
                raise MixAndMatchError(
                    f"site document v{version} is not the one this node trusts: another site"
                )
        site = self
        while site.version + 1 in chain:
            site = site.rotate(chain[site.version + 1])
        return site

    def issuers(self) -> dict[str, SiteDoc]:
        """Site keys that may issue credentials now, by key id (none revoked)."""
        return {d.key_id: d for d in self.docs.values() if d.key_id not in self.revoked}

    def ca_certificates(self) -> list[bytes]:
        """DER of the CA certificate of each live issuing key (what TLS chains to)."""
        return [d.ca for d in self.issuers().values()]

    # -- revocation lists (rule 9) ---------------------------------------------------

    def verify_revocations(self, data: bytes) -> RevocationList:
        """Verify a revocation list: signed by a live site key, for this site.

        The signature over the raw payload is checked before the payload is
        decoded (``REVOCATIONS_BUDGET``).
        """
        env = _env(data, MAX_REVOCATIONS_BYTES, "revocation list")
        live = self.issuers()
        signer = [kid for kid, _ in env.signatures if kid in live]
        if not signer:
            raise UnknownKeyError("revocation list is not signed by a live key of this site")
        _signed_by(REVOCATIONS_TYPE, env, live[signer[0]].key, "revocation list")
        rl = RevocationList.from_value(_value(env, REVOCATIONS_BUDGET))
        if rl.site != self.name:
            raise MixAndMatchError(
                f"revocation list is for site {rl.site!r}, this node is in site {self.name!r}"
            )
        return rl

    def classify(self, data: bytes) -> str:
        """Which document ``data`` is, by the signature that verifies over it (no decoding):
        ``REVOCATIONS_TYPE`` (a live key), ``SITE_TYPE`` (the current key: a rotation).

        Raises the signature error when neither does.
        """
        env = _env(data, MAX_REVOCATIONS_BYTES, "site document")
        live = self.issuers()
        signer = [kid for kid, _ in env.signatures if kid in live]
        if not signer:
            raise UnknownKeyError("document is not signed by a live key of this site")
        try:
            _signed_by(REVOCATIONS_TYPE, env, live[signer[0]].key, "revocation list")
            return REVOCATIONS_TYPE
        except BadSignatureError:
            _signed_by(SITE_TYPE, env, self.current.key, "site document")
            return SITE_TYPE

    # -- credentials (rules 4-8) -----------------------------------------------------

    def check_credential(
        self, der: bytes, now: int, revocations: RevocationList | None
    ) -> Credential:
        """Return the credential in ``der`` if it admits its node now; raise the rule broken."""
        cred = parse_credential(der)
        doc = next((d for d in self.docs.values() if d.key_id.startswith(cred.issuer)), None)
        if doc is None:
            raise UnknownKeyError(
                f"credential of node {cred.node_id.hex()[:12]} is issued by key "
                f"{cred.issuer[:16]}, which site {self.name!r} does not list (another site?)"
            )
        if doc.key_id in self.revoked:
            raise RevokedKeyError(
                f"credential of node {cred.node_id.hex()[:12]} is issued by site key "
                f"{cred.issuer[:16]}, which the site revoked as compromised"
            )
        try:
            _load_cert(der, "credential").verify_directly_issued_by(_load_cert(doc.ca, "site CA"))
        except (ValueError, TypeError, InvalidSignature):
            raise BadSignatureError(
                f"credential of node {cred.node_id.hex()[:12]} does not verify under the site key"
            ) from None
        if now < cred.not_before:
            raise ExpiredError(
                f"credential of node {cred.node_id.hex()[:12]} is not valid before "
                f"{cred.not_before} (node clock says {now})"
            )
        if cred.not_after is not None and now > cred.not_after:
            raise ExpiredError(
                f"credential of node {cred.node_id.hex()[:12]} expired at {cred.not_after} "
                f"(node clock says {now}): re-enrol it with `p2pupd site enroll`"
            )
        if revocations is not None:
            revocations.check(cred)
        return cred

    # -- membership documents --------------------------------------------------------

    def verify_membership(
        self, data: bytes, node_id: bytes, node_key: bytes, now: int
    ) -> Membership:
        """Verify the membership document the site operator made for this node.

        Its site chain must walk from the pinned site (rule 2), it must be
        signed by a live site key, and its credential must admit this very
        node now (rules 4-8: its node id and its key are this node's).
        """
        env, v = _envelope(data, MEMBERSHIP_BUDGET)
        if v.get("_type") != MEMBERSHIP_TYPE or v.get("spec") != SPEC_VERSION:
            raise SchemaError("document is not a p2pupd membership document")
        chain_v, cred, epk, sealed, rl_v = (
            v.get("site"),
            v.get("credential"),
            v.get("epk"),
            v.get("sealed"),
            v.get("revocations"),
        )
        if not isinstance(chain_v, list) or not 0 < len(chain_v) <= 64:
            raise SchemaError("membership document: bad site chain")
        chain: dict[int, bytes] = {}
        for d in chain_v:
            if not isinstance(d, bytes):
                raise SchemaError("membership document: bad site chain")
            _, dv = _envelope(d, SITE_DOC_BUDGET)
            chain[SiteDoc.from_value(dv).version] = d
        if not isinstance(cred, bytes) or not isinstance(sealed, bytes) or len(sealed) > 256:
            raise SchemaError("membership document: bad credential or sealed key")
        if rl_v is not None and not isinstance(rl_v, bytes):
            raise SchemaError("membership document: bad revocation list")
        site = self.walk(chain)
        live = site.issuers()
        signer = [kid for kid, _ in env.signatures if kid in live]
        if not signer:
            raise UnknownKeyError("membership document is not signed by a live key of this site")
        _signed_by(MEMBERSHIP_TYPE, env, live[signer[0]].key, "membership document")
        rl = site.verify_revocations(rl_v) if rl_v is not None else None
        c = site.check_credential(cred, now, rl)
        if c.node_id != node_id or c.node_key != node_key:
            raise MixAndMatchError(
                f"membership is for node {c.node_id.hex()[:12]} (key {c.key_id[:12]}), "
                f"this is node {node_id.hex()[:12]}"
            )
        return Membership(site, c, _bytes(epk, 32, "membership epk"), sealed, rl, rl_v)


@dataclass(frozen=True)
class Membership:
    """A verified membership document: what ``site join`` installs."""

    site: TrustedSite
    credential: Credential
    epk: bytes  # the site's seal key, sealed to the node's box key
    sealed: bytes
    revocations: RevocationList | None
    revocations_bytes: bytes | None


def _payload(data: bytes) -> bytes:
    try:
        return Envelope.decode(data, MAX_SITE_DOC_BYTES).payload
    except CodecError:
        return data


# -- enrolment requests ---------------------------------------------------------------


@dataclass(frozen=True)
class EnrolRequest:
    """What a node asks the site operator to certify (rule 3)."""

    node_id: bytes
    node_key: bytes  # Ed25519: the key its credential will be over
    box_key: bytes  # X25519: the site's seal key is sealed to it
    platform: str
    created: int
    site: str  # key id of the site the node pinned ("" if none)

    def to_value(self) -> dict[str, Any]:
        return {
            "_type": ENROL_TYPE,
            "spec": SPEC_VERSION,
            "node_id": self.node_id,
            "node_key": self.node_key,
            "box_key": self.box_key,
            "platform": self.platform,
            "created": self.created,
            "site": self.site,
        }

    @classmethod
    def from_value(cls, v: dict[str, Any]) -> EnrolRequest:
        if v.get("_type") != ENROL_TYPE or v.get("spec") != SPEC_VERSION:
            raise SchemaError("document is not a p2pupd enrolment request")
        platform, site = v.get("platform"), v.get("site")
        if not isinstance(platform, str) or not 0 < len(platform) <= 64:
            raise SchemaError("enrolment request: bad platform")
        if not isinstance(site, str) or len(site) not in (0, 64):
            raise SchemaError("enrolment request: bad site key id")
        return cls(
            _bytes(v.get("node_id"), NODE_ID_BYTES, "node id"),
            _bytes(v.get("node_key"), 32, "node key"),
            _bytes(v.get("box_key"), 32, "node box key"),
            platform,
            _int(v.get("created"), "created"),
            site,
        )

    def sign(self, key: Ed25519PrivateKey) -> bytes:
        return sign(ENROL_TYPE, encoding.encode(self.to_value()), [key]).encode()


def verify_enrol_request(data: bytes) -> EnrolRequest:
    """Return the request in ``data`` if the node key it names signed it (rule 3)."""
    env, v = _envelope(data, ENROL_BUDGET)
    req = EnrolRequest.from_value(v)
    _signed_by(ENROL_TYPE, env, req.node_key, f"enrolment request of node {req.node_id.hex()[:12]}")
    return req


# -- credentials ------------------------------------------------------------------------


@dataclass(frozen=True)
class Credential:
    """The facts of a membership certificate (rule 4), before any trust decision."""

    node_id: bytes
    node_key: bytes  # the certificate's Ed25519 public key
    issuer: str  # the issuing site key's id, first 20 bytes (its authority key identifier)
    serial: int
    not_before: int
    not_after: int | None  # None: no expiry (X.509's 99991231235959Z)
    der: bytes

    @property
    def key_id(self) -> str:
        return key_id(self.node_key)


NO_EXPIRY = 253402300799  # 9999-12-31T23:59:59Z, RFC 5280's "no well-defined expiration"


def _load_cert(der: bytes, what: str) -> x509.Certificate:
    if len(der) > MAX_CREDENTIAL_BYTES:
        raise SchemaError(f"{what} of {len(der)} bytes exceeds limit {MAX_CREDENTIAL_BYTES}")
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise SchemaError(f"{what} is not an X.509 certificate: {exc}") from None


def _ed25519_key(cert: x509.Certificate, what: str) -> bytes:
    try:
        key = cert.public_key()
    except ValueError:
        raise SchemaError(f"{what} has an unreadable key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SchemaError(f"{what} is not over an Ed25519 key")
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def parse_credential(der: bytes) -> Credential:
    """Read a credential's facts; ``SchemaError`` unless it is a leaf naming one node (rule 4).

    Which site key issued it is read from the issuer's CA key id (the
    authority key identifier holds the site key id's first 20 bytes).
    """
    cert = _load_cert(der, "credential")
    node_key = _ed25519_key(cert, "credential")
    if cert.version is not x509.Version.v3:
        raise SchemaError("credential is not an X.509 v3 certificate")
    try:
        bc = cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        aki = cert.extensions.get_extension_for_oid(ExtensionOID.AUTHORITY_KEY_IDENTIFIER).value
    except (x509.ExtensionNotFound, ValueError):
        raise SchemaError(
            "credential lacks its basic constraints, node name or issuer id"
        ) from None
    assert isinstance(bc, x509.BasicConstraints)
    assert isinstance(san, x509.SubjectAlternativeName)
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    if bc.ca:
        raise SchemaError("credential is a CA certificate, not a node's")
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
    nodes = [u[len(NODE_URI_PREFIX) :] for u in uris if u.startswith(NODE_URI_PREFIX)]
    if len(nodes) != 1 or len(nodes[0]) != NODE_ID_BYTES * 2:
        raise SchemaError("credential must name exactly one node id")
    try:
        node_id = bytes.fromhex(nodes[0])
    except ValueError:
        raise SchemaError("credential names a malformed node id") from None
    if aki.key_identifier is None or len(aki.key_identifier) != 20:
        raise SchemaError("credential lacks the id of its issuing key")
    not_after = int(cert.not_valid_after_utc.timestamp())
    return Credential(
        node_id,
        node_key,
        aki.key_identifier.hex(),
        cert.serial_number,
        int(cert.not_valid_before_utc.timestamp()),
        None if not_after >= NO_EXPIRY else not_after,
        der,
    )


def issuer_key_identifier(site_key_id: str) -> bytes:
    """The 20-byte (SubjectKeyIdentifier-sized) key identifier of a site key."""
    return bytes.fromhex(site_key_id)[:20]


# -- revocation lists -------------------------------------------------------------------


@dataclass(frozen=True)
class Revoked:
    node_id: bytes
    key_id: str  # the node key's id (trust.key_id)
    time: int  # when the operator revoked it (informative)


@dataclass(frozen=True)
class RevocationList:
    site: str
    sequence: int
    entries: tuple[Revoked, ...]

    def to_value(self) -> dict[str, Any]:
        return {
            "_type": REVOCATIONS_TYPE,
            "spec": SPEC_VERSION,
            "site": self.site,
            "sequence": self.sequence,
            "revoked": [[e.node_id, e.key_id, e.time] for e in self.entries],
        }

    @classmethod
    def from_value(cls, v: dict[str, Any]) -> RevocationList:
        if v.get("_type") != REVOCATIONS_TYPE or v.get("spec") != SPEC_VERSION:
            raise SchemaError("document is not a p2pupd revocation list")
        raw = v.get("revoked")
        if not isinstance(raw, list) or len(raw) > MAX_REVOKED_NODES:
            raise SchemaError(f"revocation list must list at most {MAX_REVOKED_NODES} nodes")
        entries = []
        for e in raw:
            if not isinstance(e, list) or len(e) != 3:
                raise SchemaError("revocation list: malformed entry")
            kid = e[1]
            if not isinstance(kid, str) or len(kid) != 64:
                raise SchemaError("revocation list: malformed key id")
            entries.append(Revoked(_bytes(e[0], NODE_ID_BYTES, "node id"), kid, _int(e[2], "time")))
        return cls(_name(v.get("site")), _int(v.get("sequence"), "sequence", 1), tuple(entries))

    def sign(self, key: Ed25519PrivateKey) -> bytes:
        return sign(REVOCATIONS_TYPE, encoding.encode(self.to_value()), [key]).encode()

    def node_ids(self) -> set[bytes]:
        return {e.node_id for e in self.entries}

    def key_ids(self) -> set[str]:
        return {e.key_id for e in self.entries}

    def check(self, cred: Credential) -> None:
        """Raise ``RevokedKeyError`` if ``cred``'s node or key is revoked (rule 8)."""
        if cred.node_id in self.node_ids() or cred.key_id in self.key_ids():
            raise RevokedKeyError(
                f"node {cred.node_id.hex()[:12]} is revoked from site {self.site!r} "
                f"(revocation list {self.sequence})"
            )


def newer_revocations(
    held: RevocationList | None, held_bytes: bytes | None, new: RevocationList, new_bytes: bytes
) -> bool:
    """Apply rule 9's sequence check: True if ``new`` replaces ``held``, False if it is ``held``.

    Raises ``RollbackError`` for an older list (a replay) or a different list
    under the held sequence.
    """
    if held is None or new.sequence > held.sequence:
        return True
    if new.sequence == held.sequence and _payload_any(new_bytes) == _payload_any(held_bytes):
        return False
    raise RollbackError(
        f"revocation list {new.sequence} is not newer than the list {held.sequence} held here"
    )


def _payload_any(data: bytes | None) -> bytes | None:
    if data is None:
        return None
    try:
        return Envelope.decode(data, MAX_REVOCATIONS_BYTES).payload
    except CodecError:
        return data
