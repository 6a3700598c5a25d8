"""The site authority: a site's keys, its CA, credentials and revocation lists.

Theory of operation. A *site directory* lives on the site operator's machine
(not on the publisher's, and ideally not on a node):

    site.key              Ed25519 site key and X25519 seal key, two PEM blocks, mode 0600
    site.pub              the signed site document nodes pin (``init --site``)
    chain/<v>.msgpack     every site document version (rotation history)
    ca.pem                the site CA certificate (for openssl and friends)
    nodes/<id>.msgpack    one record per enrolled node (its keys, serial, expiry, revoked)
    revocations.msgpack   the newest signed revocation list

``enroll`` verifies a node's signed enrolment request, certifies its node key
(X.509, issued by the site CA: the node key is the certificate key, the node
id is the certificate's URI subjectAltName) and seals the site's seal key to
the node's box key, so the node can open sealed sticks. The result, a
*membership* document signed by the site key, is all the node needs
(``p2pupd site join``). ``revoke`` writes a revocation list with the next
sequence number, naming every node revoked so far. All rules a node applies
live in protocol/membership.py; this module only makes documents.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pupd.daemon.api import atomic_write
from p2pupd.protocol import encoding
from p2pupd.protocol.errors import CodecError, MixAndMatchError, P2pupdError
from p2pupd.protocol.site.membership import (
    MEMBERSHIP_TYPE,
    NO_EXPIRY,
    SPEC_VERSION,
    EnrolRequest,
    RevocationList,
    Revoked,
    SiteDoc,
    TrustedSite,
    issuer_key_identifier,
    membership_context,
    node_uri,
    verify_enrol_request,
)
from p2pupd.protocol.site.sealed import seal_to, x25519_public
from p2pupd.protocol.trust import key_id, sign

# A credential is valid from a day before it was made: a node's clock may lag
# the operator's (air-gapped clocks drift), and a fresh credential must work.
BACKDATE = datetime.timedelta(days=1)
KEY_FILE = "site.key"
PUB_FILE = "site.pub"
REVOCATIONS_FILE = "revocations.msgpack"


class SiteError(P2pupdError):
    """The site directory is missing, incomplete or unwritable (exit code 2)."""


def _ts(t: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t, datetime.UTC)


def _pem(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_secret(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except FileExistsError:
        raise SiteError(f"{path} exists; refusing to overwrite a site key") from None
    except OSError as exc:
        raise SiteError(f"cannot write {path}: {exc.strerror}") from None


def _key_usage(sign_certs: bool) -> x509.KeyUsage:
    """A CA signs certificates only; a node key signs TLS handshakes only."""
    return x509.KeyUsage(
        digital_signature=not sign_certs,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=sign_certs,
        crl_sign=sign_certs,
        encipher_only=False,
        decipher_only=False,
    )


def ca_certificate(name: str, key: Ed25519PrivateKey, now: int) -> bytes:
    """The site CA certificate (DER): self-signed by the site key, may only sign node certs."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"p2pupd site {name}"),
        ]
    )
    kid = issuer_key_identifier(key_id(key.public_key().public_bytes_raw()))
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_ts(now) - BACKDATE)
        .not_valid_after(_ts(NO_EXPIRY))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(sign_certs=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier(kid), critical=False)
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.DER)


def node_certificate(
    doc: SiteDoc, key: Ed25519PrivateKey, req: EnrolRequest, now: int, expires: int | None
) -> tuple[bytes, int]:
    """A credential for ``req``'s node (DER) and its serial number."""
    ca = x509.load_der_x509_certificate(doc.ca)
    serial = x509.random_serial_number()
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, doc.name),
                    x509.NameAttribute(NameOID.COMMON_NAME, f"p2pupd node {req.node_id.hex()}"),
                ]
            )
        )
        .issuer_name(ca.subject)
        .public_key(Ed25519PublicKey.from_public_bytes(req.node_key))
        .serial_number(serial)
        .not_valid_before(_ts(now) - BACKDATE)
        .not_valid_after(_ts(NO_EXPIRY if expires is None else expires))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(sign_certs=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(node_uri(req.node_id))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier(issuer_key_identifier(doc.key_id), None, None),
            critical=False,
        )
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.DER), serial


@dataclass(frozen=True)
class NodeRecord:
    """What the site remembers of an enrolled node."""

    node_id: bytes
    node_key: bytes
    box_key: bytes
    platform: str
    serial: str  # the credential's serial number, hex (X.509 serials exceed 64 bits)
    enrolled: int
    expires: int | None
    revoked: int | None = None

    def to_value(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id, "node_key": self.node_key, "box_key": self.box_key,
            "platform": self.platform, "serial": self.serial, "enrolled": self.enrolled,
            "expires": self.expires, "revoked": self.revoked,
        }  # fmt: skip

    @classmethod
    def from_value(cls, v: Any) -> NodeRecord:
        return cls(**v)


class SiteAuthority:
    """An open site directory (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            pem = (root / KEY_FILE).read_bytes()
            self.site = TrustedSite.from_chain(self._chain())
        except FileNotFoundError as exc:
            raise SiteError(
                f"{root} is not a site directory ({Path(exc.filename).name} is missing; "
                "`p2pupd site init` makes one)"
            ) from None
        except OSError as exc:
            raise SiteError(f"cannot read site directory {root}: {exc.strerror}") from None
        self.key, self.seal = _load_keys(pem, root / KEY_FILE)
        doc = self.site.current
        if (
            self.key.public_key().public_bytes_raw() != doc.key
            or x25519_public(self.seal) != doc.seal
        ):
            raise SiteError(f"{root / KEY_FILE} does not hold the keys of {root / PUB_FILE}")

    @property
    def doc(self) -> SiteDoc:
        return self.site.current

    def _chain(self) -> dict[int, bytes]:
        d = self.root / "chain"
        return {int(p.stem): p.read_bytes() for p in d.glob("*.msgpack") if p.stem.isdigit()}

    @classmethod
    def init(cls, root: Path, name: str, now: int) -> SiteAuthority:
        """Make a new site: keys (0600), CA certificate, site document."""
        if (root / KEY_FILE).exists():
            raise SiteError(f"{root / KEY_FILE} exists; refusing to overwrite a site key")
        key, seal = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
        try:
            doc = SiteDoc(
                name, 1, key.public_key().public_bytes_raw(), x25519_public(seal),
                ca_certificate(name, key, now),
            )  # fmt: skip
            data = doc.sign([key])
            TrustedSite.load(data)  # the document a node will pin must pass its rules
        except (ValueError, CodecError) as exc:
            raise SiteError(f"cannot make site {name!r}: {exc}") from None
        try:
            for d in (root, root / "chain", root / "nodes"):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SiteError(f"cannot create {root}: {exc.strerror}") from None
        _write_secret(root / KEY_FILE, _pem(key) + _pem(seal))
        atomic_write(root / "chain" / "1.msgpack", data)
        atomic_write(root / PUB_FILE, data)
        atomic_write(
            root / "ca.pem",
            x509.load_der_x509_certificate(doc.ca).public_bytes(serialization.Encoding.PEM),
        )
        return cls(root)

    def rotate(self, now: int, compromised: bool) -> bytes:
        """Replace the site key (document N+1, signed by the old key and the new); returns it.

        With ``compromised`` the old key is revoked: every credential it issued
        is refused from then on, so every member must be enrolled again. The
        seal key is kept (sticks sealed to the site still open); a seal key
        believed stolen calls for a new site (``site init``).
        """
        new = Ed25519PrivateKey.generate()
        old = self.doc
        revoked = (*old.revoked, old.key_id) if compromised else old.revoked
        doc = SiteDoc(
            old.name, old.version + 1, new.public_key().public_bytes_raw(), old.seal,
            ca_certificate(old.name, new, now), tuple(revoked),
        )  # fmt: skip
        data = doc.sign([self.key, new])
        site = self.site.rotate(data)  # the rules every node applies
        tmp = self.root / (KEY_FILE + ".new")
        tmp.unlink(missing_ok=True)
        _write_secret(tmp, _pem(new) + _pem(self.seal))
        atomic_write(self.root / "chain" / f"{doc.version}.msgpack", data)
        os.replace(tmp, self.root / KEY_FILE)
        atomic_write(self.root / PUB_FILE, data)
        atomic_write(
            self.root / "ca.pem",
            x509.load_der_x509_certificate(doc.ca).public_bytes(serialization.Encoding.PEM),
        )
        self.site, self.key = site, new
        return data

    # -- nodes --------------------------------------------------------------------------

    def _record_path(self, node_id: bytes) -> Path:
        return self.root / "nodes" / f"{node_id.hex()}.msgpack"

    def records(self) -> list[NodeRecord]:
        out = []
        for p in sorted((self.root / "nodes").glob("*.msgpack")):
            try:
                out.append(NodeRecord.from_value(encoding.decode(p.read_bytes())))
            except (OSError, CodecError, TypeError) as exc:
                raise SiteError(f"{p} is damaged: {exc}") from None
        return out

    def find(self, prefix: str) -> NodeRecord:
        """The enrolled node whose id starts with ``prefix`` (hex, at least 4 chars)."""
        prefix = prefix.lower()
        hits = [r for r in self.records() if r.node_id.hex().startswith(prefix)]
        if len(prefix) < 4 or len(hits) != 1:
            what = "no enrolled node" if not hits else f"{len(hits)} enrolled nodes"
            raise SiteError(f"{what} of site {self.doc.name!r} match {prefix!r}")
        return hits[0]

    def enroll(self, request: bytes, now: int, expires: int | None) -> tuple[bytes, NodeRecord]:
        """Return (membership document, record) for the node of the signed ``request``.

        Raises a verification error for a forged request or one made for
        another site, and ``SiteError`` for a revoked node.
        """
        req = verify_enrol_request(request)
        if (
            req.site
            and req.site != self.doc.key_id
            and req.site not in {d.key_id for d in self.site.docs.values()}
        ):
            raise MixAndMatchError(
                f"node {req.node_id.hex()[:12]} pinned site key {req.site[:16]}, not this site's "
                f"({self.doc.key_id[:16]}): it belongs to another site"
            )
        old = self._read_record(req.node_id)
        if old is not None and old.revoked is not None:
            raise SiteError(
                f"node {req.node_id.hex()[:12]} was revoked; a revoked node is not enrolled "
                "again (re-initialise it: a new state directory makes a new node)"
            )
        revoked_keys = {r.node_key for r in self.records() if r.revoked is not None}
        if req.node_key in revoked_keys:
            raise SiteError("this node key was revoked with another node; it is not enrolled again")
        if expires is not None and expires <= now:
            raise SiteError("expiry must be in the future")
        cert, serial = node_certificate(self.doc, self.key, req, now, expires)
        epk, sealed = seal_to(
            self.seal.private_bytes_raw(), req.box_key, X25519PrivateKey.generate(),
            membership_context(req.node_id),
        )  # fmt: skip
        rl = self.revocations()
        payload = {
            "_type": MEMBERSHIP_TYPE,
            "spec": SPEC_VERSION,
            "site": [self.site.envelopes[v] for v in sorted(self.site.envelopes)],
            "node_id": req.node_id,
            "credential": cert,
            "epk": epk,
            "sealed": sealed,
            "revocations": rl[1] if rl is not None else None,
        }
        doc = sign(MEMBERSHIP_TYPE, encoding.encode(payload), [self.key]).encode()
        rec = NodeRecord(
            req.node_id, req.node_key, req.box_key, req.platform, f"{serial:x}", now, expires
        )
        atomic_write(self._record_path(req.node_id), encoding.encode(rec.to_value()), mode=0o600)
        return doc, rec

    def _read_record(self, node_id: bytes) -> NodeRecord | None:
        try:
            return NodeRecord.from_value(encoding.decode(self._record_path(node_id).read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, CodecError, TypeError) as exc:
            raise SiteError(f"record of node {node_id.hex()[:12]} is damaged: {exc}") from None

    # -- revocation ----------------------------------------------------------------------

    def revocations(self) -> tuple[RevocationList, bytes] | None:
        try:
            data = (self.root / REVOCATIONS_FILE).read_bytes()
        except FileNotFoundError:
            return None
        return self.site.verify_revocations(data), data

    def revoke(self, prefix: str, now: int) -> tuple[bytes, RevocationList, NodeRecord]:
        """Revoke an enrolled node: the next revocation list (signed) and the node's record."""
        rec = self.find(prefix)
        held = self.revocations()
        entries = list(held[0].entries) if held else []
        if rec.revoked is None:
            rec = NodeRecord(**{**rec.to_value(), "revoked": now})
            atomic_write(
                self._record_path(rec.node_id), encoding.encode(rec.to_value()), mode=0o600
            )
        if rec.node_id not in {e.node_id for e in entries}:
            entries.append(Revoked(rec.node_id, key_id(rec.node_key), now))
        rl = RevocationList(self.doc.name, (held[0].sequence if held else 0) + 1, tuple(entries))
        data = rl.sign(self.key)
        atomic_write(self.root / REVOCATIONS_FILE, data)
        return data, rl, rec


def _load_keys(pem: bytes, path: Path) -> tuple[Ed25519PrivateKey, X25519PrivateKey]:
    end = b"-----END PRIVATE KEY-----"
    blocks = [b + end for b in pem.split(end) if b.strip()]
    try:
        keys = [serialization.load_pem_private_key(b, password=None) for b in blocks]
    except (ValueError, TypeError):
        raise SiteError(f"{path} is not a site key file") from None
    if (
        len(keys) != 2
        or not isinstance(keys[0], Ed25519PrivateKey)
        or not isinstance(keys[1], X25519PrivateKey)
    ):
        raise SiteError(f"{path} is not a site key file (Ed25519 and X25519 keys)")
    return keys[0], keys[1]
