"""TLS 1.3 contexts for peer links, from a node's key and its site credential.

Theory of operation. Both sides of a link present their membership
credential (an X.509 certificate over the node key, issued by the site CA;
protocol/site/membership.py) and require the other's: ``CERT_REQUIRED`` on
both ends, TLS 1.3 only, trust anchors = the CA certificates of the site's
live issuing keys. OpenSSL then proves that the peer holds the private key of
a certificate chaining to the site (the handshake's CertificateVerify signs
the transcript, so a relay cannot splice two sessions). OpenSSL's own time
check is off (``X509_V_FLAG_NO_CHECK_TIME``): expiry, revocation and the node
id binding are the pure rules' to judge, on the node's trusted clock, right
after the handshake and before a single frame is sent.

The private key never touches the disk: ``ssl`` only loads keys from paths,
so the PEM goes through an anonymous memory file (``memfd``) opened by its
``/proc/self/fd`` path and closed at once.
"""

from __future__ import annotations

import contextlib
import os
import ssl

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pupd.daemon.errors import DaemonError
from p2pupd.protocol.errors import CodecError, NotMemberError, VerificationError
from p2pupd.protocol.site.membership import Credential, RevocationList, TrustedSite

# X509_V_FLAG_NO_CHECK_TIME (OpenSSL >= 1.1.0): not exported by Python's ssl.
NO_CHECK_TIME = 0x200000


class TLSSetupError(DaemonError):
    """A TLS context could not be built from the node's key and credential."""


def _pem_path_fd(data: bytes) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("p2pupd-tls", os.MFD_CLOEXEC)
    else:  # pragma: no cover - Linux has memfd
        raise TLSSetupError("this system has no memfd_create")
    os.write(fd, data)
    return fd


def make_context(
    server: bool, key: Ed25519PrivateKey, credential: bytes, cas: list[bytes]
) -> ssl.SSLContext:
    """A TLS 1.3 context presenting ``credential`` (DER) and requiring one under ``cas`` (DER)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # peers are named by node id, checked by the membership rules
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags = ssl.VerifyFlags(ctx.verify_flags | NO_CHECK_TIME)
    ctx.options |= ssl.OP_NO_COMPRESSION
    try:
        pem_cas = "".join(
            x509.load_der_x509_certificate(c).public_bytes(serialization.Encoding.PEM).decode()
            for c in cas
        )
        ctx.load_verify_locations(cadata=pem_cas)
        cert_pem = x509.load_der_x509_certificate(credential).public_bytes(
            serialization.Encoding.PEM
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fds = [_pem_path_fd(cert_pem), _pem_path_fd(key_pem)]
        try:
            ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
    except (ValueError, ssl.SSLError, OSError) as exc:
        raise TLSSetupError(f"cannot set up TLS with this node's credential: {exc}") from None
    return ctx


class TLSClosedError(DaemonError):
    """The TLS handshake failed or the peer's TLS stream broke."""


class TLSStream(trio.abc.Stream):
    """A TLS 1.3 stream over a trio stream, moving whole socket reads through OpenSSL.

    Why not ``trio.SSLStream``: it hands back one TLS record (at most 16 KiB)
    per ``receive_some``, with a trio checkpoint and lock round trip each, which
    on a bulk link left it at 1.3-2.4 times less throughput than this stream
    here (``make bench BENCH=tls``). This stream reads up to ``RECV_BYTES`` from the socket at
    once and decrypts every record that arrived in one go. TLS 1.3 has no
    renegotiation, so the only traffic besides application data is the
    handshake and post-handshake messages (tickets, key updates), which
    OpenSSL handles inside ``read``; anything it wants to send is flushed
    under the send lock, in order.

    One task may receive while another sends (the transport's reader and
    writer); every write to the socket goes through ``_send_lock`` and takes
    whatever OpenSSL queued so far, so records leave in the order made.
    """

    RECV_BYTES = 1024 * 1024

    def __init__(
        self, transport: trio.abc.Stream, ctx: ssl.SSLContext, *, server_side: bool
    ) -> None:
        self.transport = transport
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=server_side)
        self._send_lock = trio.Lock()
        self._eof = False
        self._buf = bytearray(self.RECV_BYTES)
        self._view = memoryview(self._buf)

    def peer_certificate(self) -> bytes | None:
        """The DER certificate the peer presented (after the handshake)."""
        return self._obj.getpeercert(binary_form=True)

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._out.read()
            if data:
                await self.transport.send_all(data)

    async def _feed(self) -> bool:
        """Read from the socket into OpenSSL; False at end of stream.

        On a socket, into one reused buffer: a fresh 1 MiB ``bytes`` per read
        would be mapped, faulted in and unmapped again each time.
        """
        if isinstance(self.transport, trio.SocketStream):
            try:
                n = await self.transport.socket.recv_into(self._buf)
            except OSError as exc:
                raise trio.BrokenResourceError(f"connection lost: {exc}") from exc
            data: bytes | bytearray | memoryview = self._view[:n]
        else:
            data = await self.transport.receive_some(self.RECV_BYTES)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    async def do_handshake(self) -> None:
        """Complete the TLS handshake; ``TLSClosedError`` saying why it failed."""
        while not self._handshake_step():
            await self._flush()
            try:
                more = await self._feed()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise TLSClosedError(f"connection lost during the TLS handshake: {exc}") from None
            if not more:
                raise TLSClosedError("peer closed the connection during the TLS handshake")
        await self._flush()

    def _handshake_step(self) -> bool:
        """One OpenSSL handshake step: True when done, False when it needs the peer's bytes."""
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as exc:
            # The alert OpenSSL queued (it tells the peer why) is sent by the caller's aclose.
            raise TLSClosedError(f"TLS handshake failed: {exc.reason or exc}") from None
        return True

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Decrypted bytes: every record that is in, up to ``max_bytes``; b"" at the end."""
        limit = max_bytes or self.RECV_BYTES
        while True:
            parts: list[bytes] = []
            n = 0
            try:
                while n < limit:
                    try:
                        b = self._obj.read(limit - n)
                    except ssl.SSLWantReadError:
                        break
                    if not b:
                        break
                    parts.append(b)
                    n += len(b)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._eof = True
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS error: {exc.reason or exc}") from None
            if self._out.pending:
                await self._flush()  # a key update, or an alert
            if parts:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if self._eof:
                return b""
            if not await self._feed():
                self._eof = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._obj.write(data)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS error: {exc.reason or exc}") from None
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def abort(self) -> None:
        """After a failed handshake: send the alert OpenSSL queued (bounded), close the socket."""
        try:
            with trio.move_on_after(1):
                await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await self.transport.aclose()

    async def aclose(self) -> None:
        """Send close_notify (best effort) and close the socket."""
        try:
            with trio.move_on_after(1):
                with contextlib.suppress(ssl.SSLError, ValueError):
                    self._obj.unwrap()
                await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await self.transport.aclose()


async def secure(
    stream: trio.abc.Stream,
    ctx: ssl.SSLContext,
    *,
    server_side: bool,
    site: TrustedSite,
    revocations: RevocationList | None,
    now: int,
) -> tuple[TLSStream, Credential]:
    """TLS handshake, then the membership rules on the peer's credential.

    Returns the secured stream and the peer's credential. Raises
    ``NotMemberError`` (the peer is refused: it gets no frame from us) when
    the handshake fails -- no certificate, one not chaining to the site's CA,
    a plaintext peer -- or the credential is expired, revoked or issued by a
    revoked site key; the stream is closed then.
    """
    tls = TLSStream(stream, ctx, server_side=server_side)
    try:
        await tls.do_handshake()
        der = tls.peer_certificate()
        if der is None:
            raise NotMemberError("peer presented no credential")
        try:
            cred = site.check_credential(der, now, revocations)
        except (VerificationError, CodecError) as exc:
            raise NotMemberError(f"peer's credential is refused: {exc}") from None
    except TLSClosedError as exc:
        await tls.abort()
        raise NotMemberError(str(exc)) from None
    except NotMemberError:
        with contextlib.suppress(Exception):
            await tls.aclose()
        raise
    return tls, cred
