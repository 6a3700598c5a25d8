"""A throw-away LAN of Linux network namespaces joined by a bridge; and a
namespace with no network at all (``offline_host``).

Each host gets its own namespace (``p2pt-<id>-<n>``) with a veth pair whose
peer end is enslaved to a bridge (``p2pb-<id>``) in the root namespace, and a
link-local address 169.254.77.<n>/24, so real mDNS multicast and TCP flow
between hosts exactly as on a site LAN and reach nothing else. Links can be cut
(``partition``) and healed, and shaped with ``tc`` for bandwidth caps.
Everything created is removed on ``close()``, including processes started in
the namespaces.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

SUBNET = "169.254.77"


def netns_unavailable() -> str | None:
    """Return why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "network-namespace tests need root"
    if shutil.which("ip") is None:
        return "network-namespace tests need iproute2 (`ip`)"
    probe = f"p2pt-probe-{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@dataclass
class Host:
    index: int
    ns: str
    veth: str  # the root-namespace end, on the bridge
    addr: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def cmd(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def run(
        self, argv: Sequence[str], timeout: float = 60, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.cmd(argv), capture_output=True, text=True, timeout=timeout, env=env, check=False
        )

    def spawn(
        self, argv: Sequence[str], log_path: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(log_path, "ab")  # noqa: SIM115 - owned by the process record
        p = subprocess.Popen(
            self.cmd(argv), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self.procs.append(p)
        return p


class Lan:
    """Hosts on one bridge. Use as a context manager; see module doc."""

    def __init__(self, n_hosts: int) -> None:
        self.tag = secrets.token_hex(3)
        self.bridge = f"p2pb-{self.tag}"
        self.hosts: list[Host] = []
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("link", "set", self.bridge, "up")
            for i in range(1, n_hosts + 1):
                self._add_host(i)
        except BaseException:
            self.close()
            raise

    def _add_host(self, i: int) -> None:
        ns = f"p2pt-{self.tag}-{i}"
        veth, inner = f"p2pv{self.tag}{i}", f"p2pi{self.tag}{i}"
        _ip("netns", "add", ns)
        host = Host(i, ns, veth, f"{SUBNET}.{i}")
        self.hosts.append(host)
        _ip("link", "add", veth, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", ns)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "set", inner, "name", "eth0")
        _ip("-n", ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up", "multicast", "on")
        # mDNS goes to 224.0.0.251: give multicast a route out of eth0.
        _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def partition(self, host: Host) -> None:
        """Cut ``host`` off the LAN (its link goes down on the bridge side)."""
        _ip("link", "set", host.veth, "down")

    def heal(self, host: Host) -> None:
        _ip("link", "set", host.veth, "up")

    def shape(self, host: Host, rate: str) -> None:
        """Cap ``host``'s egress and ingress at ``rate`` (e.g. ``"40mbit"``) with tc."""
        for dev, ns in (("eth0", host.ns), (host.veth, None)):
            argv = [
                "tc",
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "64kb",
                "latency",
                "50ms",
            ]
            if ns:
                argv = ["ip", "netns", "exec", ns, *argv]
            subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30)

    def close(self) -> None:
        for h in self.hosts:
            for p in h.procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=10)
            # Anything else still running inside the namespace.
            r = _ip("netns", "pids", h.ns, check=False)
            for pid in r.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("link", "del", h.veth, check=False)
            _ip("netns", "del", h.ns, check=False)
        _ip("link", "del", self.bridge, check=False)

    def __enter__(self) -> Lan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def offline_host() -> Iterator[Host]:
    """A namespace with loopback up and nothing else: no other link, no route,
    so any connection beyond 127.0.0.0/8 fails at once (ENETUNREACH) and no
    packet leaves. For proving that something works without a network."""
    ns = f"p2pt-{secrets.token_hex(3)}-off"
    _ip("netns", "add", ns)
    host = Host(0, ns, "", "127.0.0.1")
    try:
        _ip("-n", ns, "link", "set", "lo", "up")
        yield host
    finally:
        for p in host.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        for pid in _ip("netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _ip("netns", "del", ns, check=False)
