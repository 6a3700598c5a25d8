"""mDNS discovery: register and browse ``_p2pupd._tcp.local.`` with zeroconf.

Theory of operation
-------------------
zeroconf runs its own asyncio loop on its own thread. This service:

1. opens ``Zeroconf`` (optionally bound to ``interfaces``, e.g. 127.0.0.1 in
   tests or one site NIC) and registers our instance ``p2pupd-<id>`` with TXT
   ``id`` (node id hex), ``cluster``, ``proto`` (protocol version) and
   ``holdings`` (a digest of what we hold, refreshed when it changes) -- all in
   worker threads, since these calls block;
2. browses the service type; zeroconf calls our handler on *its* thread, and
   the handler only crosses into trio (``trio.from_thread.run_sync`` with our
   ``TrioToken``) to drop the name into a bounded memory channel -- it never
   blocks on, or raises into, zeroconf;
3. resolves each name in a worker thread (``get_service_info``), keeps
   services of our cluster and protocol version that are not us, and hands
   their address to the dialer as a candidate; a removed service withdraws it.

Every zeroconf or OS error is wrapped into ``DiscoveryError`` at this
boundary; the supervisor restarts the service with backoff, so a site without
multicast degrades to static peers instead of stopping the daemon.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import Any, Protocol

import ifaddr
import trio
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from p2pupd.daemon.errors import DaemonError
from p2pupd.daemon.events import log
from p2pupd.daemon.net.peers import PeerTable, format_endpoint
from p2pupd.protocol import PROTOCOL_VERSION
from p2pupd.protocol.session import HandshakeError, negotiate_version

SERVICE_TYPE = "_p2pupd._tcp.local."
RESOLVE_MS = 3000
CLOSE_SECONDS = 5.0


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
    """What discovery needs of the node service: its peers and a holdings digest."""

    @property
    def node_id(self) -> bytes: ...
    @property
    def cluster(self) -> str: ...

    peers: PeerTable
    on_holdings: list[Callable[[], None]]  # called when what we hold changes

    def holdings_digest(self) -> str:
        """A short digest of what this node holds (published in TXT)."""
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
        on_found: Callable[[], None] | None = None,
    ) -> None:
        self.core = core
        self.port = port
        self.interfaces = interfaces
        self.listen_host = listen_host
        self.on_found = on_found
        cfg = core
        self.name = f"p2pupd-{cfg.node_id.hex()[:12]}.{SERVICE_TYPE}"
        self._names: dict[str, str] = {}  # service name -> endpoint
        self._zc: Zeroconf | None = None
        self._info: ServiceInfo | None = None

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
                "holdings": self.core.holdings_digest(),
            },
            server=f"p2pupd-{cfg.node_id.hex()[:12]}.local.",
        )

    def _open(self) -> Zeroconf:
        try:
            if self.interfaces:
                zc = Zeroconf(interfaces=list(self.interfaces), ip_version=IPVersion.V4Only)
            else:
                zc = Zeroconf(ip_version=IPVersion.V4Only)
        except Exception as exc:  # zeroconf and the OS raise many types here
            raise DiscoveryError(f"cannot start mDNS: {exc}") from None
        try:
            self._info = self._service_info()
            zc.register_service(self._info, allow_name_change=True)
        except Exception as exc:
            zc.close()
            raise DiscoveryError(f"cannot register mDNS service: {exc}") from None
        return zc

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Register, browse and feed found peers to the dialer until cancelled."""
        token = trio.lowlevel.current_trio_token()
        send, recv = trio.open_memory_channel[tuple[str, str]](256)

        def on_change(
            zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
        ) -> None:
            # On zeroconf's thread: hand over and return; never raise into it.
            kind = "removed" if state_change is ServiceStateChange.Removed else "seen"
            with contextlib.suppress(Exception):
                trio.from_thread.run_sync(_offer, send, (kind, name), trio_token=token)

        zc = await trio.to_thread.run_sync(self._open)
        self._zc = zc
        browser: ServiceBrowser | None = None
        try:
            try:
                browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
            except Exception as exc:
                raise DiscoveryError(f"cannot browse mDNS: {exc}") from None
            self.core.on_holdings.append(self._holdings_changed)
            log(
                "mdns-registered", name=self.name, addrs=",".join(self._addresses()), port=self.port
            )
            task_status.started()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                async for kind, name in recv:
                    if name == self.name:
                        continue
                    if kind == "removed":
                        self._removed(name)
                    else:
                        nursery.start_soon(self._resolve, name)
        finally:
            with contextlib.suppress(ValueError):
                self.core.on_holdings.remove(self._holdings_changed)
            self._zc = None
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_SECONDS):
                await trio.to_thread.run_sync(
                    _close, zc, browser, self._info, abandon_on_cancel=True
                )

    _nursery: trio.Nursery | None = None

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
        endpoint = format_endpoint(addrs[0], info.port)
        old = self._names.get(name)
        if old != endpoint:
            if old is not None:
                self.core.peers.remove_candidate(old, "mdns")
            self._names[name] = endpoint
            self.core.peers.add_candidate(addrs[0], info.port, "mdns", node_id)
            log("mdns-found", peer=node_id.hex()[:12], addr=endpoint)
            if self.on_found is not None:
                self.on_found()

    def _removed(self, name: str) -> None:
        endpoint = self._names.pop(name, None)
        if endpoint is not None:
            self.core.peers.remove_candidate(endpoint, "mdns")
            log("mdns-lost", addr=endpoint)

    def _holdings_changed(self) -> None:
        if self._nursery is not None and self._zc is not None:
            self._nursery.start_soon(self._update)

    async def _update(self) -> None:
        zc = self._zc
        if zc is None:
            return
        info = self._service_info()
        try:
            await trio.to_thread.run_sync(lambda: zc.update_service(info), abandon_on_cancel=True)
            self._info = info
        except Exception as exc:
            log("mdns-update-failed", level=logging.WARNING, reason=repr(exc))


def _offer(send: trio.MemorySendChannel[tuple[str, str]], item: tuple[str, str]) -> None:
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
