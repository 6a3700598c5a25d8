"""Who may connect: TLS 1.3 with site credentials on every peer link of a site member.

Theory of operation
-------------------
``SiteGate`` stands between a TCP stream and the peer protocol
(``NodeService.run_stream`` calls ``secure`` before anything else). A node
with no site keeps today's open behaviour: the stream passes through as it
is. A node of a site:

* holds a valid credential: the link is TLS 1.3, both sides present their
  credential (daemon/net/tls.py), and the peer's is judged by the membership
  rules on the node's clock (protocol/site/membership.py) before one frame
  is sent: no Hello, no announce, no blob for a peer without a valid,
  unrevoked credential of this site. The peer's node id is then the one its
  credential names; ``NodeService.admit`` refuses a Hello claiming another.
* has none (not enrolled, expired, revoked): it can neither prove itself nor
  be proven to, so it refuses every link and dials nobody useful. It keeps
  running what it has, and rejoins with ``site join`` of a fresh credential
  (``reload``).

Every refusal is counted (``refused``, the ``peer-refused`` event behind the
``p2pupd_peers_refused`` metric) and the last few are kept for ``peers``.
``reload`` re-reads the membership after ``site join``/``site update`` and
returns the connected peers whose credentials no longer pass (a revocation
just arrived, or they expired), for the caller to cut off; ``recheck`` does
the same on a timer.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections import deque
from dataclasses import dataclass

import trio

from p2pupd.daemon.bundles.siterequest import node_key
from p2pupd.daemon.events import log
from p2pupd.daemon.net.tls import TLSSetupError, make_context, secure
from p2pupd.daemon.state.node import Node
from p2pupd.daemon.state.statedir import now_seconds
from p2pupd.protocol.errors import CodecError, NotMemberError, P2pupdError, VerificationError
from p2pupd.protocol.site.membership import Credential, RevocationList, TrustedSite

RECENT_REFUSALS = 32
HANDSHAKE_SECONDS = 10.0


@dataclass(frozen=True)
class Refusal:
    address: str
    reason: str
    time: float


class SiteGate:
    """See the module docstring."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.site: TrustedSite | None = None
        self.revocations: RevocationList | None = None
        self.problem: str | None = None  # why this node cannot take part, if it cannot
        self._server: ssl.SSLContext | None = None
        self._client: ssl.SSLContext | None = None
        self._news: list[bytes] = []
        self.refused = 0
        self.recent: deque[Refusal] = deque(maxlen=RECENT_REFUSALS)
        self.reload()

    @property
    def enabled(self) -> bool:
        """True when the node is in a site: links are TLS with credentials, or refused."""
        return self.site is not None

    def reload(self) -> None:
        """Re-read the site, the revocation list and this node's credential; rebuild TLS."""
        ms = self.node.membership
        try:
            self.site = ms.site()
            if self.site is None:
                self._server = self._client = None
                return
            held = ms.revocations(self.site)
            self.revocations = held[0] if held else None
            self._news = [self.site.envelopes[v] for v in sorted(self.site.envelopes)]
            self._news += [held[1]] if held else []
            der = ms.credential_bytes()
            if der is None:
                raise NotMemberError("this node is not enrolled (no credential)")
            key = node_key(self.node.state)
            cred = self.site.check_credential(der, now_seconds(), self.revocations)
            if cred.node_id != self.node.config.node_id:
                raise NotMemberError("this node's credential names another node")
            cas = self.site.ca_certificates()
            self._server = make_context(True, key, der, cas)
            self._client = make_context(False, key, der, cas)
            self.problem = None
        except (P2pupdError, TLSSetupError) as exc:
            self._server = self._client = None
            self.problem = str(exc)
            log("not-a-member", level=logging.WARNING, detail=self.problem)

    async def secure(
        self, stream: trio.abc.Stream, *, inbound: bool, address: str
    ) -> tuple[trio.abc.Stream, Credential | None] | None:
        """The stream to speak the peer protocol on, and the peer's credential; None: refused."""
        if self.site is None:
            return stream, None
        ctx = self._server if inbound else self._client
        if ctx is None:
            self.refuse(address, f"this node is not a member: {self.problem}")
            await _close(stream)
            return None
        try:
            with trio.fail_after(HANDSHAKE_SECONDS):
                tls, cred = await secure(
                    stream, ctx, server_side=inbound, site=self.site,
                    revocations=self.revocations, now=now_seconds(),
                )  # fmt: skip
        except NotMemberError as exc:
            self.refuse(address, str(exc))
            return None
        except trio.TooSlowError:
            self.refuse(address, "TLS handshake timed out")
            await _close(stream)
            return None
        return tls, cred

    def news(self) -> list[bytes]:
        """What this node tells a member that joins: its site documents and revocation list."""
        return list(self._news)

    def refuse(self, address: str, reason: str) -> None:
        self.refused += 1
        self.recent.append(Refusal(address, reason[:200], trio.current_time()))
        log("peer-refused", level=logging.WARNING, addr=address, reason=reason[:200])

    def still_valid(self, cred: Credential | None) -> str | None:
        """None if ``cred`` still admits its peer now, else why not."""
        if self.site is None or cred is None:
            return None
        if self._server is None:
            return f"this node is not a member: {self.problem}"
        try:
            self.site.check_credential(cred.der, now_seconds(), self.revocations)
        except (VerificationError, CodecError) as exc:
            return str(exc)
        return None

    def doc(self, now: float) -> dict[str, object]:
        """The ``refused`` part of ``p2pupd peers --json``."""
        return {
            "site": None if self.site is None else self.site.name,
            "tls": self._server is not None,
            "problem": self.problem,
            "refused": self.refused,
            "recent": [
                {"address": r.address, "reason": r.reason, "seconds_ago": round(now - r.time, 1)}
                for r in self.recent
            ],
        }


async def _close(stream: trio.abc.Stream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1), contextlib.suppress(
        trio.BrokenResourceError, trio.ClosedResourceError, OSError
    ):
        await stream.aclose()
