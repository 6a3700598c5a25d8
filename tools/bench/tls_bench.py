"""Peer-link throughput with and without TLS 1.3, in the same run: trio over loopback.

Run: ``python -m p2pupd.tools.bench tls [--mb 512] [--write-kib 1024]``.

Two processes (one core each on a two-core machine), TCP on 127.0.0.1: the
sender writes ``--mb`` MiB in ``--write-kib`` writes through a trio stream,
the receiver reads it with 1 MiB reads and acknowledges the last byte. Modes:

* ``plain``: ``trio.SocketStream``, as peer links are today;
* ``tls``: ``daemon/net/tls.TLSStream`` over it, TLS 1.3, both sides
  presenting a site credential made by the real site tool (Ed25519
  certificates), contexts from ``daemon/net/tls.py`` (OpenSSL picks
  AES-256-GCM);
* ``trio-ssl``: the same with ``trio.SSLStream`` (for comparison: it returns
  one TLS record per read).

The handshake is timed separately. trio's SSLStream encrypts and decrypts
through MemoryBIOs, so each byte is copied once more on each side than on a
plain socket; the table shows what that costs here. The target of issue 16
is TLS >= 80 % of plaintext.
"""

from __future__ import annotations

import argparse
import os
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2pupd.daemon.net.tls import TLSStream, make_context
from p2pupd.protocol.site.membership import EnrolRequest, TrustedSite
from p2pupd.protocol.site.sealed import x25519_public
from p2pupd.tools.site.authority import SiteAuthority

MiB = 1024 * 1024


def make_node(site: SiteAuthority, base: Path, name: str) -> None:
    """A node key and its credential in ``base/name.{key,der}``."""
    key = Ed25519PrivateKey.generate()
    req = EnrolRequest(os.urandom(16), key.public_key().public_bytes_raw(),
                       x25519_public(X25519PrivateKey.generate()), "bench", int(time.time()),
                       "").sign(key)  # fmt: skip
    doc, rec = site.enroll(req, int(time.time()), None)
    m = site.site.verify_membership(doc, rec.node_id, rec.node_key, int(time.time()))
    (base / f"{name}.der").write_bytes(m.credential.der)
    (base / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def context(base: Path, name: str, server: bool) -> ssl.SSLContext:
    key = serialization.load_pem_private_key((base / f"{name}.key").read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    site = TrustedSite.load((base / "site" / "site.pub").read_bytes())
    return make_context(server, key, (base / f"{name}.der").read_bytes(), site.ca_certificates())


async def _wrap(
    sock: trio.SocketStream, base: Path, name: str, server: bool, mode: str
) -> trio.abc.Stream:
    ctx = context(base, name, server)
    if mode == "trio-ssl":
        s = trio.SSLStream(sock, ctx, server_side=server)
        await s.do_handshake()
        return s
    t = TLSStream(sock, ctx, server_side=server)
    await t.do_handshake()
    return t


async def receive(base: Path, mode: str, total: int) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    sock = await listeners[0].accept()
    stream: trio.abc.Stream = sock
    if mode != "plain":
        stream = await _wrap(sock, base, "b", True, mode)
    got = 0
    while got < total:
        data = await stream.receive_some(MiB)
        if not data:
            break
        got += len(data)
    await stream.send_all(b"!")
    await trio.sleep(0.2)


async def send(base: Path, mode: str, port: int, total: int, write: int) -> tuple[float, float]:
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    t0 = time.perf_counter()
    stream: trio.abc.Stream = sock
    if mode != "plain":
        stream = await _wrap(sock, base, "a", False, mode)
    t1 = time.perf_counter()
    block = os.urandom(write)
    sent = 0
    while sent < total:
        await stream.send_all(block)
        sent += len(block)
    await stream.receive_some(1)
    return t1 - t0, time.perf_counter() - t1


def run(base: Path, mode: str, total: int, write: int) -> tuple[float, float]:
    recv = subprocess.Popen(
        [sys.executable, "-m", "p2pupd.tools.bench.tls_bench", "--receive", mode,
         "--dir", str(base), "--bytes", str(total)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert recv.stdout is not None
    port = int(recv.stdout.readline())
    try:
        return trio.run(send, base, mode, port, total, write)
    finally:
        recv.wait(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=512, help="MiB per run (default 512)")
    ap.add_argument("--write-kib", type=int, default=1024, help="bytes per write, KiB")
    ap.add_argument("--runs", type=int, default=3, help="runs per mode; the best is shown")
    ap.add_argument("--receive", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.receive:
        trio.run(receive, Path(args.dir), args.receive, args.bytes)
        return 0
    total = args.mb * MiB
    with tempfile.TemporaryDirectory(prefix="p2pupd-tls-bench-") as tmp:
        base = Path(tmp)
        site = SiteAuthority.init(base / "site", "bench", int(time.time()))
        make_node(site, base, "a")
        make_node(site, base, "b")
        results: dict[str, tuple[float, float]] = {}
        for mode in ("plain", "tls", "trio-ssl") * args.runs:
            hs, secs = run(base, mode, total, args.write_kib * 1024)
            if mode not in results or secs < results[mode][1]:
                results[mode] = (hs, secs)
    plain = total / results["plain"][1] / MiB
    print(f"{args.mb} MiB over loopback, {args.write_kib} KiB writes, best of {args.runs}")
    print(f"{'mode':<8} {'handshake ms':>13} {'MiB/s':>9} {'of plain':>9}")
    for mode, (hs, secs) in results.items():
        rate = total / secs / MiB
        print(f"{mode:<8} {hs * 1000:>13.1f} {rate:>9.0f} {rate / plain:>8.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
