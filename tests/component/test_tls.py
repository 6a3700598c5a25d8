"""TLS 1.3 peer links with site credentials (daemon/net/tls.py), over real loopback TCP.

Each test runs both ends of a link: a member (credential from the real site
tool) and a peer that is a member, an outsider, a stranger with a
self-signed certificate, a member of another site, a plaintext speaker, an
expired or a revoked node. Only members get through ``secure``; everyone
else is refused before a single application byte is exchanged.
"""

from __future__ import annotations

import datetime
import os
import ssl
import time
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID

from p2pupd.daemon.net.tls import TLSStream, make_context, secure
from p2pupd.protocol.errors import NotMemberError
from p2pupd.protocol.site.membership import EnrolRequest, RevocationList, TrustedSite
from p2pupd.protocol.site.sealed import x25519_public
from p2pupd.tools.site.authority import SiteAuthority

NOW = int(time.time())


class Member:
    def __init__(self, site: SiteAuthority, expires: int | None = None) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.node_id = os.urandom(16)
        req = EnrolRequest(self.node_id, self.key.public_key().public_bytes_raw(),
                           x25519_public(X25519PrivateKey.generate()), "t", NOW, "").sign(self.key)  # fmt: skip
        doc, _ = site.enroll(req, NOW, expires)
        m = site.site.verify_membership(doc, self.node_id, self.public, NOW)
        self.der = m.credential.der
        self.cas = site.site.ca_certificates()

    @property
    def public(self) -> bytes:
        return self.key.public_key().public_bytes_raw()

    def ctx(self, server: bool) -> ssl.SSLContext:
        return make_context(server, self.key, self.der, self.cas)


@pytest.fixture
def site(tmp_path: Path) -> SiteAuthority:
    return SiteAuthority.init(tmp_path / "site", "plant-7", NOW)


async def link(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    trusted: TrustedSite,
    *,
    revocations: RevocationList | None = None,
    now: int = NOW,
    client_plain: bytes | None = None,
) -> tuple[object, object]:
    """Run a real TCP link: the server side ``secure``s it; return (server, client) outcomes."""
    results: dict[str, object] = {}
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def server() -> None:
        stream = await listeners[0].accept()
        try:
            tls, cred = await secure(stream, server_ctx, server_side=True, site=trusted,
                                     revocations=revocations, now=now)  # fmt: skip
        except NotMemberError as exc:
            results["server"] = exc
            return
        results["server"] = cred
        await tls.send_all(b"hello member")
        await tls.aclose()

    async def client() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        if client_plain is not None:  # a peer that speaks the plaintext protocol
            await stream.send_all(client_plain)
            got = b""
            with trio.move_on_after(5):
                while chunk := await stream.receive_some(4096):
                    got += chunk
            results["client"] = got
            await stream.aclose()
            return
        tls = TLSStream(stream, client_ctx, server_side=False)
        try:
            await tls.do_handshake()
            results["client"] = await tls.receive_some()
        except Exception as exc:
            results["client"] = exc
        finally:
            await tls.transport.aclose()

    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(server)
            n.start_soon(client)
    await listeners[0].aclose()
    return results["server"], results["client"]


async def test_two_members_talk_over_tls13(site: SiteAuthority) -> None:
    a, b = Member(site), Member(site)
    server, client = await link(a.ctx(True), b.ctx(False), site.site)
    assert getattr(server, "node_id", None) == b.node_id
    assert client == b"hello member"


async def test_outsider_without_credential_is_refused_at_the_handshake(site: SiteAuthority) -> None:
    a = Member(site)
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # has the root, not a credential
    bare.check_hostname, bare.verify_mode = False, ssl.CERT_NONE
    server, client = await link(a.ctx(True), bare, site.site)
    assert isinstance(server, NotMemberError) and "handshake" in str(server)
    assert client != b"hello member"


async def test_self_signed_certificate_is_refused(site: SiteAuthority, tmp_path: Path) -> None:
    a = Member(site)
    key = Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2pupd node x")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2100, 1, 1))
        .sign(key, None)
    )  # fmt: skip
    forged = make_context(False, key, cert.public_bytes(serialization.Encoding.DER),
                          [cert.public_bytes(serialization.Encoding.DER)])  # fmt: skip
    server, client = await link(a.ctx(True), forged, site.site)
    assert isinstance(server, NotMemberError)
    assert client != b"hello member"


async def test_member_of_another_site_is_refused(site: SiteAuthority, tmp_path: Path) -> None:
    other = SiteAuthority.init(tmp_path / "other", "plant-7", NOW)  # same name, other key
    a, stranger = Member(site), Member(other)
    # The stranger trusts both sites (it cannot make ours trust its own).
    ctx = make_context(False, stranger.key, stranger.der, [*stranger.cas, *a.cas])
    server, client = await link(a.ctx(True), ctx, site.site)
    assert isinstance(server, NotMemberError)
    assert client != b"hello member"


async def test_plaintext_peer_gets_nothing(site: SiteAuthority) -> None:
    a = Member(site)
    hello = b"\x00\x00\x00\x20P2PU" + b"\x00" * 28  # a plaintext frame where TLS is expected
    server, client = await link(a.ctx(True), a.ctx(False), site.site, client_plain=hello)
    assert isinstance(server, NotMemberError)
    assert isinstance(client, bytes) and b"P2PU" not in client and b"hello" not in client


async def test_expired_credential_is_refused_after_the_handshake(site: SiteAuthority) -> None:
    a, b = Member(site), Member(site, expires=NOW + 60)
    server, client = await link(a.ctx(True), b.ctx(False), site.site, now=NOW + 3600)
    assert isinstance(server, NotMemberError) and "expired" in str(server)
    assert client != b"hello member"


async def test_revoked_node_is_refused(site: SiteAuthority) -> None:
    a, b = Member(site), Member(site)
    data, _, _ = site.revoke(b.node_id.hex()[:8], NOW)
    rl = site.site.verify_revocations(data)
    server, client = await link(a.ctx(True), b.ctx(False), site.site, revocations=rl)
    assert isinstance(server, NotMemberError) and "revoked" in str(server)
    assert client != b"hello member"


async def test_credential_signed_by_a_revoked_site_key_is_refused(site: SiteAuthority) -> None:
    old = Member(site)
    site.rotate(NOW, compromised=True)
    new = Member(site)
    server, client = await link(new.ctx(True), old.ctx(False), site.site)
    assert isinstance(server, NotMemberError)
    assert client != b"hello member"
