"""Issue 13: an unauthenticated LAN peer serving a huge manifest, against a real daemon.

A real ``p2pupd daemon`` process listens on 127.0.0.1; the test plays a hostile
peer over a real socket with the real wire protocol: it announces a higher
serial of the node's component and serves, in ranged pieces, an envelope whose
payload is megabytes of nested maps (on main, 64 MB of such msgpack got the
daemon OOM-killed). The daemon must refuse it (the signature over the raw
payload fails before anything in it is decoded) and stay up; its peak RSS
(``VmHWM``, reset before each attack through ``/proc/PID/clear_refs``) may grow
only with the bytes it was sent -- the transfer buffer and the payload the
signature is checked over -- never with what they would decode to.
"""

from __future__ import annotations

import re
import secrets
import socket
import time
from pathlib import Path

from _hostile import nested_maps
from _kit import Site, cli
from test_daemon_processes import Daemon, private_cluster

from p2pupd.daemon.state.statedir import StateDir
from p2pupd.protocol import ids, limits
from p2pupd.protocol.session import CLOSED, NEED_DATA, Session, State
from p2pupd.protocol.trust import Envelope, TrustedRoot
from p2pupd.protocol.wire import (
    FEATURE_RANGE,
    Announce,
    AnnounceEntry,
    ManifestMissing,
    ManifestRangeData,
    ManifestRangeRequest,
    ManifestRequest,
    Message,
    Request,
    RootMissing,
    RootRequest,
)

MiB = limits.MiB
ATTACK_SECONDS = 20.0


def status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} for {pid}")


def serve_hostile_manifest(
    port: int, cluster: str, serial: int, envelope: bytes, source: str = "127.0.0.1"
) -> list[str]:
    """Connect from ``source`` as a fresh peer, announce ``serial`` and serve
    ``envelope`` until hung up on. (An unproven peer is banned by its address,
    so each attack comes from an address of its own.)

    Returns the kinds of request the daemon made.
    """
    digest = ids.sha256(envelope)
    session = Session(secrets.token_bytes(16), cluster, 0, frozenset({FEATURE_RANGE}))
    asked: list[str] = []
    deadline = time.monotonic() + ATTACK_SECONDS
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as sock:
        sock.sendall(session.send_hello())
        announced = False
        while time.monotonic() < deadline:
            if session.state is State.OPEN and not announced:
                sock.sendall(session.send(Announce((AnnounceEntry("app", serial, digest),))))
                announced = True
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data = sock.recv(1 << 20)
            except OSError:
                return asked
            if not data:
                return asked
            session.receive_data(data)
            while (ev := session.next_event()) is not NEED_DATA:
                if ev is CLOSED:
                    return asked
                if isinstance(ev, Request) and session.state is State.OPEN:
                    asked.append(type(ev).__name__)
                    try:
                        sock.sendall(session.send(answer(ev, envelope)))
                    except OSError:
                        return asked
    return asked


def answer(req: Message, envelope: bytes) -> Message:
    if isinstance(req, ManifestRangeRequest):
        piece = envelope[req.offset : req.offset + req.length]
        return ManifestRangeData(req.request_id, req.offset, len(envelope), piece)
    if isinstance(req, ManifestRequest):
        return ManifestMissing(req.request_id)
    if isinstance(req, RootRequest):
        return RootMissing(req.request_id)
    raise AssertionError(f"unexpected {type(req).__name__}")


def test_hostile_peer_serving_huge_msgpack_costs_only_the_bytes_it_sent(tmp_path: Path) -> None:
    site = Site(tmp_path / "site")
    site.publish("1.0", {"bin/tool": b"#!/bin/sh\necho 1\n"})
    state, _ = site.node("n1")
    cli("import", "--state-dir", state, site.bundle("v1"))
    private_cluster(state)
    cluster = StateDir(state).read_config().cluster
    release_key = TrustedRoot.load(site.root_file.read_bytes()).root.roles["release"].keyids[0]
    daemon = Daemon(state, "--no-mdns")
    figures = []
    try:
        for n, mib in enumerate((4, 16, 48)):
            # Signed by a key the root lists, with a signature that cannot verify.
            envelope = Envelope(nested_maps(mib * MiB), ((release_key, bytes(64)),)).encode()
            Path(f"/proc/{daemon.proc.pid}/clear_refs").write_text("5")
            before = status(daemon.proc.pid, "VmRSS")
            asked = serve_hostile_manifest(
                daemon.port, cluster, 10 + n, envelope, source=f"127.0.0.{2 + n}"
            )
            daemon.wait_for(re.compile(rf"event=manifest-refused component=app serial={10 + n} .*"))
            peak = (status(daemon.proc.pid, "VmHWM") - before) / MiB
            figures.append((mib, peak, asked.count("ManifestRangeRequest")))
            assert daemon.proc.poll() is None, daemon.text()
        log = daemon.text()
    finally:
        assert daemon.stop() == 0
    for mib, peak, pieces in figures:
        print(
            f"  hostile peer, {mib} MiB of nested maps: daemon peak +{peak:.1f} MiB, {pieces} pieces"
        )
        assert pieces >= mib * MiB // limits.MAX_FRAME_BYTES  # it was really sent
        assert peak <= 4 * mib + 32, figures
    assert "does not verify" in log
    assert "Traceback" not in log
