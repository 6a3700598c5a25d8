"""Site membership rules (protocol/site/membership.py), one attack per test.

Documents are made by the real site tool (tools/site/authority.py) in a temp
directory; the rules are then applied to bytes, with the clock passed in.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2pupd.protocol.errors import (
    BadSignatureError,
    ExpiredError,
    MixAndMatchError,
    RevokedKeyError,
    RollbackError,
    SchemaError,
    UnknownKeyError,
)
from p2pupd.protocol.site.membership import (
    EnrolRequest,
    TrustedSite,
    newer_revocations,
    verify_enrol_request,
)
from p2pupd.protocol.site.sealed import x25519_public
from p2pupd.tools.site.authority import SiteAuthority, SiteError, ca_certificate

NOW = 1_800_000_000
DAY = 86400


class FakeNode:
    def __init__(self, node_id: bytes | None = None) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.box = X25519PrivateKey.generate()
        self.node_id = node_id or Ed25519PrivateKey.generate().public_key().public_bytes_raw()[:16]

    @property
    def public(self) -> bytes:
        return self.key.public_key().public_bytes_raw()

    def request(self, site: str = "") -> bytes:
        return EnrolRequest(
            self.node_id, self.public, x25519_public(self.box), "linux-x86_64", NOW, site
        ).sign(self.key)


@pytest.fixture
def site(tmp_path: Path) -> SiteAuthority:
    return SiteAuthority.init(tmp_path / "site", "plant-7", NOW)


def pinned(site: SiteAuthority) -> TrustedSite:
    return TrustedSite.load((site.root / "site.pub").read_bytes())


def credential(site: SiteAuthority, node: FakeNode, expires: int | None = None) -> bytes:
    doc, _ = site.enroll(node.request(), NOW, expires)
    m = pinned(site).verify_membership(doc, node.node_id, node.public, NOW)
    return m.credential.der


def test_enrolled_node_is_admitted_and_bound_to_its_id_and_key(site: SiteAuthority) -> None:
    node = FakeNode()
    doc, _rec = site.enroll(node.request(site.doc.key_id), NOW, NOW + 30 * DAY)
    m = pinned(site).verify_membership(doc, node.node_id, node.public, NOW)
    assert (m.credential.node_id, m.credential.node_key) == (node.node_id, node.public)
    assert m.credential.not_after == NOW + 30 * DAY
    # The same document presented by another node is not its membership.
    other = FakeNode()
    with pytest.raises(MixAndMatchError):
        pinned(site).verify_membership(doc, other.node_id, other.public, NOW)


def test_forged_enrolment_request_is_refused(site: SiteAuthority) -> None:
    node, thief = FakeNode(), FakeNode()
    # The thief asks to certify the node's key under the node's id, signing with its own key.
    forged = EnrolRequest(
        node.node_id, node.public, x25519_public(thief.box), "linux-x86_64", NOW, ""
    ).sign(thief.key)
    with pytest.raises((BadSignatureError, UnknownKeyError)):
        verify_enrol_request(forged)
    with pytest.raises((BadSignatureError, UnknownKeyError)):
        site.enroll(forged, NOW, None)


def test_request_for_another_site_is_not_enrolled(site: SiteAuthority, tmp_path: Path) -> None:
    other = SiteAuthority.init(tmp_path / "other", "plant-8", NOW)
    with pytest.raises(MixAndMatchError):
        site.enroll(FakeNode().request(other.doc.key_id), NOW, None)


def test_credential_of_another_site_is_refused(site: SiteAuthority, tmp_path: Path) -> None:
    other = SiteAuthority.init(tmp_path / "other", "plant-7", NOW)  # same name, other key
    der = credential(other, FakeNode())
    with pytest.raises(UnknownKeyError):
        pinned(site).check_credential(der, NOW, None)


def test_self_signed_certificate_is_refused(site: SiteAuthority) -> None:
    """A node that makes its own 'site CA' with the site's name, and a credential under it."""
    node = FakeNode()
    real = x509.load_der_x509_certificate(credential(site, node))
    fake_ca = Ed25519PrivateKey.generate()
    forged = (
        x509.CertificateBuilder()
        .subject_name(real.subject)
        .issuer_name(real.issuer)
        .public_key(node.key.public_key())
        .serial_number(1)
        .not_valid_before(real.not_valid_before_utc)
        .not_valid_after(real.not_valid_after_utc)
    )
    for ext in real.extensions:  # same issuer key id, names, constraints: only the signer differs
        forged = forged.add_extension(ext.value, ext.critical)
    der = forged.sign(fake_ca, None).public_bytes(serialization.Encoding.DER)
    with pytest.raises(BadSignatureError):
        pinned(site).check_credential(der, NOW, None)
    selfsigned = (
        x509.CertificateBuilder()
        .subject_name(real.subject)
        .issuer_name(real.subject)
        .public_key(node.key.public_key())
        .serial_number(2)
        .not_valid_before(real.not_valid_before_utc)
        .not_valid_after(real.not_valid_after_utc)
        .sign(node.key, None)
        .public_bytes(serialization.Encoding.DER)
    )
    with pytest.raises(SchemaError):  # no issuer id, no node name: not a credential at all
        pinned(site).check_credential(selfsigned, NOW, None)


def test_expired_credential_is_refused_and_reenrolment_admits_again(site: SiteAuthority) -> None:
    node = FakeNode()
    der = credential(site, node, expires=NOW + DAY)
    trusted = pinned(site)
    assert trusted.check_credential(der, NOW + DAY - 1, None).node_id == node.node_id
    with pytest.raises(ExpiredError):
        trusted.check_credential(der, NOW + DAY + 1, None)
    # Re-enrolled on site (same node key, no publisher involved): admitted again.
    doc, _ = site.enroll(node.request(), NOW + 2 * DAY, NOW + 60 * DAY)
    m = trusted.verify_membership(doc, node.node_id, node.public, NOW + 2 * DAY)
    assert m.credential.not_after == NOW + 60 * DAY


def test_revoked_node_is_refused_and_not_enrolled_again(site: SiteAuthority) -> None:
    node, other = FakeNode(), FakeNode()
    der, der_other = credential(site, node), credential(site, other)
    data, _rl, _ = site.revoke(node.node_id.hex()[:8], NOW)
    trusted = pinned(site)
    held = trusted.verify_revocations(data)
    with pytest.raises(RevokedKeyError):
        trusted.check_credential(der, NOW, held)
    assert trusted.check_credential(der_other, NOW, held).node_id == other.node_id
    with pytest.raises(SiteError):
        site.enroll(node.request(), NOW, None)
    # The same key under a new node id is not a way back in either.
    with pytest.raises(SiteError):
        site.enroll(EnrolRequest(b"\x01" * 16, node.public, x25519_public(node.box),
                                 "linux-x86_64", NOW, "").sign(node.key), NOW, None)  # fmt: skip


def test_replayed_older_revocation_list_moves_nothing(site: SiteAuthority) -> None:
    a, b = FakeNode(), FakeNode()
    credential(site, a), credential(site, b)
    first, _rl1, _ = site.revoke(a.node_id.hex()[:8], NOW)
    second, _rl2, _ = site.revoke(b.node_id.hex()[:8], NOW)
    trusted = pinned(site)
    r1, r2 = trusted.verify_revocations(first), trusted.verify_revocations(second)
    assert (r1.sequence, r2.sequence) == (1, 2)
    assert r2.node_ids() == {a.node_id, b.node_id}  # cumulative
    assert newer_revocations(r1, first, r2, second) is True
    assert newer_revocations(r2, second, r2, second) is False
    with pytest.raises(RollbackError):
        newer_revocations(r2, second, r1, first)  # the replay
    # Another list under a held sequence (a forged twin) is refused too.
    twin = type(r2)(r2.site, 2, r1.entries).sign(site.key)
    with pytest.raises(RollbackError):
        newer_revocations(r2, second, trusted.verify_revocations(twin), twin)


def test_revocation_list_of_another_site_or_key_is_refused(
    site: SiteAuthority, tmp_path: Path
) -> None:
    other = SiteAuthority.init(tmp_path / "other", "plant-8", NOW)
    credential(other, node := FakeNode())
    data, _, _ = other.revoke(node.node_id.hex()[:8], NOW)
    with pytest.raises(UnknownKeyError):  # the signature is checked first, before decoding
        pinned(site).verify_revocations(data)
    same_name = SiteAuthority.init(tmp_path / "twin", "plant-7", NOW)
    credential(same_name, node2 := FakeNode())
    data, _, _ = same_name.revoke(node2.node_id.hex()[:8], NOW)
    with pytest.raises(UnknownKeyError):
        pinned(site).verify_revocations(data)


def test_credential_signed_by_a_revoked_site_key_is_refused(site: SiteAuthority) -> None:
    node, later = FakeNode(), FakeNode()
    old_der = credential(site, node)
    v1 = pinned(site)
    rotated = v1.rotate(site.rotate(NOW, compromised=True))
    with pytest.raises(RevokedKeyError):
        rotated.check_credential(old_der, NOW, None)
    # A credential from the new key is admitted; the routine (non-compromise)
    # rotation keeps the old key's credentials valid.
    assert rotated.check_credential(credential(site, later), NOW, None).node_id == later.node_id
    routine = rotated.rotate(site.rotate(NOW, compromised=False))
    assert routine.check_credential(credential(site, FakeNode()), NOW, None)
    with pytest.raises(RevokedKeyError):  # a revocation stays in force down the chain
        routine.check_credential(old_der, NOW, None)


def test_site_rotation_needs_both_keys_and_the_next_version(site: SiteAuthority) -> None:
    v1 = pinned(site)
    v1_key = site.key
    data = site.rotate(NOW, compromised=False)
    doc = v1.rotate(data).current
    # Signed by the new key alone: refused (a thief of nothing cannot rotate).
    alone = type(doc)(doc.name, doc.version, doc.key, doc.seal, doc.ca).sign([site.key])
    with pytest.raises((BadSignatureError, UnknownKeyError)):
        v1.rotate(alone)
    with pytest.raises(UnknownKeyError):  # v3 is signed by v2's key, which v1 does not know
        v1.rotate(site.rotate(NOW, compromised=False))
    # Signed by v1's key and a new one, but numbered v3: skipping a version.
    new = Ed25519PrivateKey.generate()
    skip = type(doc)(doc.name, 3, new.public_key().public_bytes_raw(), doc.seal,
                     ca_certificate(doc.name, new, NOW))  # fmt: skip
    with pytest.raises(RollbackError):
        v1.rotate(skip.sign([v1_key, new]))


def test_pinned_site_document_must_be_self_signed(site: SiteAuthority) -> None:
    doc = site.doc
    stranger = Ed25519PrivateKey.generate()
    with pytest.raises((BadSignatureError, UnknownKeyError)):
        TrustedSite.load(doc.sign([stranger]))
