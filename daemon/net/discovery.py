"""mDNS discovery, only to bootstrap: browse while the view needs addresses, a few beacons.

Theory of operation
-------------------
mDNS is how a node finds its first peers on a segment, not the membership
protocol: once it has links, the partial view (protocol/fleet/view.py) and
its shuffles keep it in touch with the site. Every multicast packet reaches
every node, so anything done per node and per event grows with N^2; hence:

* *Browse only when the view wants addresses* (``host.bootstrap_wanted()``:
  below half its target with nobody left to dial -- at start, after a
  partition). Browsing stops as soon as it does not, and resumes when it
  does again (``host.changed`` is set whenever that may have changed).
  Queries ask for unicast answers (QU), so only the asker hears them.
* *A few beacons register*: a node registers its own service only if its
  first browse round (``BEACON_ROUND_SECONDS``) found fewer than
  ``beacons`` services of its cluster. A site thus has a handful of
  registered nodes, each query is answered by a handful, and joiners keep
  the number topped up as beacons go away. No TXT record changes when a
  release arrives (no ``holdings``): nothing in mDNS is per release.
* Found services of our cluster and protocol version that are not us go to
  the view's passive view (``host.add_known``); the view decides whom to dial.

zeroconf runs its own asyncio loop on its own thread: its callbacks only
drop a name into a bounded memory channel through the ``TrioToken``; every
blocking call runs in a worker thread. Every zeroconf or OS error is wrapped
into ``DiscoveryError`` at this boundary; the supervisor restarts the
service with backoff, so a site without multicast degrades to static peers
instead of stopping the daemon.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from typing import Any, Protocol

import ifaddr
import trio
from zeroconf import (
    DNSQuestionType,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from p2pupd.daemon.errors import DaemonError
from p2pupd.daemon.events import log
from p2pupd.daemon.net.peers import format_endpoint
from p2pupd.protocol import PROTOCOL_VERSION
from p2pupd.protocol.session import HandshakeError, negotiate_version
from p2pupd.protocol.wire import PeerAddr

SERVICE_TYPE = "_p2pupd._tcp.local."
RESOLVE_MS = 3000
CLOSE_SECONDS = 5.0
BEACONS = 8  # services a site keeps registered
BEACON_ROUND_SECONDS = 2.0  # the first browse round, before deciding to register
RECHECK_SECONDS = 5.0


class DiscoveryError(DaemonError):
    """mDNS could not be started or used (no multicast, bad interface, ...)."""


def local_addresses() -> list[str]:
    """IPv4 addresses of this host's interfaces, loopback last."""
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                found.append(ip.ip)
    return sorted(set(found), key=lambda a: (ipaddress.ip_address(a).is_loopback, a))


class DiscoveryHost(Protocol):
    """What discovery needs of the node: who it is, and its view's wishes."""

    @property
    def node_id(self) -> bytes: ...
    @property
    def cluster(self) -> str: ...

    def bootstrap_wanted(self) -> bool:
        """True while the view wants addresses."""
        ...

    def bootstrap_changed(self) -> trio.Event:
        """An event set when ``bootstrap_wanted`` may have changed."""
        ...

    def add_known(self, addrs: list[PeerAddr]) -> None:
        """Addresses found: to the passive view."""
        ...


class Discovery:
    """See the module docstring."""

    def __init__(
        self,
        core: DiscoveryHost,
        port: int,
        *,
        interfaces: tuple[str, ...] = (),
        listen_host: str = "",
        beacons: int = BEACONS,
    ) -> None:
        self.core = core
        self.port = port
        self.interfaces = interfaces
        self.listen_host = listen_host
        self.beacons = beacons
        self.name = f"p2pupd-{core.node_id.hex()[:12]}.{SERVICE_TYPE}"
        self._seen: set[str] = set()  # service names of our cluster resolved
        self._zc: Zeroconf | None = None
        self._info: ServiceInfo | None = None
        self.registered = False
        self.browsing = False

    def _addresses(self) -> list[str]:
        if self.interfaces:
            return list(self.interfaces)
        if self.listen_host and self.listen_host not in ("0.0.0.0", "::"):
            return [self.listen_host]
        return [a for a in local_addresses() if ":" not in a][:4] or ["127.0.0.1"]

    def _service_info(self) -> ServiceInfo:
        cfg = self.core
        return ServiceInfo(
            SERVICE_TYPE,
            self.name,
            addresses=[socket.inet_aton(a) for a in self._addresses()],
            port=self.port,
            properties={
                "id": cfg.node_id.hex(),
                "cluster": cfg.cluster,
                "proto": str(PROTOCOL_VERSION),
            },
            server=f"p2pupd-{cfg.node_id.hex()[:12]}.local.",
        )

    def _open(self) -> Zeroconf:
        try:
            if self.interfaces:
                return Zeroconf(interfaces=list(self.interfaces), ip_version=IPVersion.V4Only)
            return Zeroconf(ip_version=IPVersion.V4Only)
        except Exception as exc:  # zeroconf and the OS raise many types here
            raise DiscoveryError(f"cannot start mDNS: {exc}") from None

    def _register(self, zc: Zeroconf) -> None:
        try:
            self._info = self._service_info()
            zc.register_service(self._info, allow_name_change=True)
        except Exception as exc:
            raise DiscoveryError(f"cannot register mDNS service: {exc}") from None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Browse while the view wants addresses, register if the site lacks beacons."""
        token = trio.lowlevel.current_trio_token()
        send, recv = trio.open_memory_channel[str](256)

        def on_change(
            zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
        ) -> None:
            # On zeroconf's thread: hand over and return; never raise into it.
            if state_change is not ServiceStateChange.Removed:
                with contextlib.suppress(Exception):
                    trio.from_thread.run_sync(_offer, send, name, trio_token=token)

        zc = await trio.to_thread.run_sync(self._open)
        self._zc = zc
        browser: ServiceBrowser | None = None
        try:
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._resolver, recv)
                first = True
                while True:
                    changed = self.core.bootstrap_changed()
                    wanted = self.core.bootstrap_wanted() or first
                    if wanted and browser is None:
                        browser = await trio.to_thread.run_sync(
                            lambda: ServiceBrowser(
                                zc,
                                SERVICE_TYPE,
                                handlers=[on_change],
                                question_type=DNSQuestionType.QU,
                            )
                        )
                        self.browsing = True
                        log("mdns-browsing")
                    if first:
                        await trio.sleep(BEACON_ROUND_SECONDS)
                        first = False
                        if len(self._seen) < self.beacons:
                            await trio.to_thread.run_sync(self._register, zc)
                            self.registered = True
                            log("mdns-registered", name=self.name, port=self.port,
                                addrs=",".join(self._addresses()), seen=len(self._seen))  # fmt: skip
                        continue
                    if not wanted and browser is not None:
                        await trio.to_thread.run_sync(browser.cancel)
                        browser = None
                        self.browsing = False
                        log("mdns-idle", seen=len(self._seen))
                    with trio.move_on_after(RECHECK_SECONDS):
                        await changed.wait()
        except Exception as exc:
            raise DiscoveryError(f"mDNS failed: {exc}") from None
        finally:
            self._zc = None
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_SECONDS):
                await trio.to_thread.run_sync(
                    _close, zc, browser, self._info, abandon_on_cancel=True
                )

    async def _resolver(self, recv: trio.MemoryReceiveChannel[str]) -> None:
        async with trio.open_nursery() as nursery:
            async for name in recv:
                if name != self.name:
                    nursery.start_soon(self._resolve, name)

    async def _resolve(self, name: str) -> None:
        zc = self._zc
        if zc is None:
            return
        try:
            info = await trio.to_thread.run_sync(
                lambda: zc.get_service_info(SERVICE_TYPE, name, timeout=RESOLVE_MS),
                abandon_on_cancel=True,
            )
        except Exception as exc:
            log("mdns-resolve-failed", level=logging.DEBUG, name=name, reason=repr(exc))
            return
        if info is None:
            return
        props = _text_props(info.properties)
        cfg = self.core
        try:
            node_id = bytes.fromhex(props.get("id", ""))
        except ValueError:
            return
        if (
            len(node_id) != 16
            or node_id == cfg.node_id
            or props.get("cluster") != cfg.cluster
            or not speaks_with(props.get("proto"))
            or not info.port
        ):
            return
        addrs = info.parsed_addresses(IPVersion.V4Only)
        if not addrs:
            return
        try:
            addr = PeerAddr(addrs[0], info.port)
        except Exception:  # not something we would dial
            return
        if name not in self._seen and len(self._seen) < 4 * self.beacons:
            self._seen.add(name)
            log("mdns-found", peer=node_id.hex()[:12], addr=format_endpoint(addrs[0], info.port))
        self.core.add_known([addr])


def _offer(send: trio.MemorySendChannel[str], item: str) -> None:
    with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        send.send_nowait(item)  # a full channel drops a hint; the browser repeats


def speaks_with(proto: str | None) -> bool:
    """Whether a service whose TXT ``proto`` is ``proto`` speaks a protocol
    version we can talk at (the handshake's rule, ``session.negotiate_version``)."""
    if proto is None or not proto.isascii() or not proto.isdigit() or len(proto) > 9:
        return False
    try:
        negotiate_version(int(proto))
    except HandshakeError:
        return False
    return True


def _text_props(props: dict[bytes, bytes | None] | Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (props or {}).items():
        if isinstance(k, bytes) and isinstance(v, bytes):
            out[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
    return out


def _close(zc: Zeroconf, browser: ServiceBrowser | None, info: ServiceInfo | None) -> None:
    with contextlib.suppress(Exception):
        if browser is not None:
            browser.cancel()
        if info is not None:
            zc.unregister_service(info)
        zc.close()
