"""Real ``p2pupd daemon`` processes on 127.0.0.1: a release imported into one
spreads to the other (static peers, then real zeroconf multicast discovery), is
applied there, and both shut down cleanly on SIGTERM."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _daemonkit import Site, random_tree

from p2pupd.daemon.state.statedir import StateDir

LISTEN_RE = re.compile(r"event=listening addr=127\.0\.0\.1:(\d+)")


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pupd.tools.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Daemon:
    def __init__(self, state: Path, *extra: str) -> None:
        self.log = state.parent / "daemon.log"
        self._out = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p2pupd.tools.cli", "daemon", "--state-dir", str(state),
             "--listen", "127.0.0.1:0", *extra],
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.port = int(self.wait_for(LISTEN_RE).group(1))
        self.wait_for(re.compile(r"event=ready"))

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = pattern.search(self.text())
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern.pattern!r} in daemon log:\n{self.text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._out.close()
        return code


@contextlib.contextmanager
def daemons() -> Iterator[list[Daemon]]:
    running: list[Daemon] = []
    try:
        yield running
    finally:
        for d in running:
            d.stop()


def linked_pair(running: list[Daemon], first: Path, second: Path) -> tuple[Daemon, Daemon]:
    """Start daemons on ``first`` and ``second`` (no mDNS; the second dials the first),
    add them to ``running`` and wait until each has the link."""
    a = Daemon(first, "--no-mdns")
    running.append(a)
    b = Daemon(second, "--no-mdns", "--peer", f"127.0.0.1:{a.port}")
    running.append(b)
    a.wait_for(re.compile(r"event=peer-connected"))
    b.wait_for(re.compile(r"event=peer-connected"))
    return a, b


def private_cluster(*states: Path) -> None:
    """Give these nodes a cluster id of their own, so no other p2pupd on this host joins."""
    cluster = f"test-{secrets.token_hex(4)}"
    for state in states:
        sd = StateDir(state)
        sd.write_config(dataclasses.replace(sd.read_config(), cluster=cluster))


def multicast_on_loopback() -> bool:
    """True if a multicast datagram sent on 127.0.0.1 comes back on this host."""
    group = "239.255.77.77"
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        rx.bind(("", 0))
        port = rx.getsockname()[1]
        try:
            mreq = socket.inet_aton(group) + socket.inet_aton("127.0.0.1")
            rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            tx.sendto(b"p2pupd-probe", (group, port))
            rx.settimeout(1.0)
            return rx.recv(64) == b"p2pupd-probe"
        except OSError:
            return False


def status(state: Path) -> dict[str, object]:
    r = cli("status", "--json", "--state-dir", state)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_static_peers_spread_an_imported_release(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.publish("1.0", random_tree(21, files=5, size=200_000))
    bundle = site.bundle("v1")
    (sa, _), (sb, tb) = site.node("a"), site.node("b")
    private_cluster(sa, sb)
    with daemons() as running:
        a, b = linked_pair(running, sa, sb)
        r = cli("import", bundle, "--state-dir", sa)  # the node lock is the daemon's: routed
        assert r.returncode == 0, r.stderr
        m = b.wait_for(re.compile(r"event=applied component=app version=1\.0 serial=1 from=(\S+)"))
        doc = status(sb)
        a_id = status(sa)["node_id"]
        assert isinstance(a_id, str) and m.group(1) == a_id[:12]
        app = doc["components"]["app"]  # type: ignore[index]
        assert app["serial"] == 1 and list(app["received"]["from"]) == [a_id]
        peers = json.loads(cli("peers", "--json", "--state-dir", sb).stdout)
        assert [p["node_id"] for p in peers["connected"]] == [a_id]
        assert b.stop() == 0 and a.stop() == 0
    for d in (a, b):
        assert "event=stopped" in d.text() and "Traceback" not in d.text()
    assert not (sa / "control.sock").exists()
    assert sorted(p.name for p in tb.iterdir()) == sorted(
        p.name for p in site.sources["1.0"].iterdir()
    )


def test_mdns_discovery_between_two_daemons(tmp_path: Path) -> None:
    if not multicast_on_loopback():
        pytest.skip("multicast datagrams on 127.0.0.1 do not loop back on this host")
    site = Site(tmp_path)
    site.publish("1.0", random_tree(22))
    (sa, _), (sb, _) = site.node("a"), site.node("b")
    private_cluster(sa, sb)
    assert cli("import", site.bundle("v1"), "--state-dir", sa).returncode == 0
    with daemons() as running:
        for state in (sa, sb):  # no --peer: they must find each other by mDNS alone
            running.append(Daemon(state, "--mdns-interface", "127.0.0.1"))
        a, b = running
        b.wait_for(re.compile(r"event=mdns-found"))
        b.wait_for(re.compile(r"event=applied component=app version=1\.0 serial=1"))
        assert b.stop() == 0 and a.stop() == 0
    assert "event=mdns-registered" in a.text()
    assert os.path.exists(sb / "releases" / "app" / "1.msgpack")
