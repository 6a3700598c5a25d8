"""A hostile p2pupd peer speaking the real wire protocol (``protocol.session``).

Run inside a namespace by ``test_netns_cluster.py``::

    python _evil_peer.py --cluster C --target HOST:PORT [--target ...]
        --valid-manifest FILE --old-manifest FILE [--attack NAME ...]

For each attack and target it dials the honest daemon with a fresh random node
id (so an earlier ban does not hide the next attack), completes the real
handshake, plays the attack, answers whatever the daemon asks in character,
and waits (bounded) for the daemon to end the connection. Attacks:

* ``forged``:    announces serial 50 and serves the newest valid manifest
                 re-labelled as serial 50, signatures kept (they no longer match);
* ``foreign``:   announces serial 51 and serves a manifest signed by a key of
                 its own (the daemon asks for a newer root: it has none);
* ``replay``:    announces serial 40 and serves an old, validly signed manifest;
* ``corrupt``:   announces the valid release of ``--valid-manifest`` (not yet
                 on the honest nodes), serves its real manifest, then answers
                 every chunk request with random bytes of the right length;
* ``oversized``: sends a frame header announcing 64 MiB (limit: 4 MiB);
* ``garbage``:   sends a well-framed body that is not msgpack;
* ``batch-skew``: like ``corrupt`` but speaking "batch": answers the daemon's
                 ChunkBatchRequest with data for another digest than the next
                 one due (the daemon must refuse it, whatever the bytes);
* ``batch-oversized``: speaks "batch" and sends a ChunkBatchRequest of
                 ``MAX_BATCH_DIGESTS + 1`` digests.

Each attack proves its fresh id with a fresh node key (feature "proof"), so
the honest node bans that id, not the attacker's address, and the next
attack gets its own hearing. Finally ``rejoin`` reconnects with the first
attack's node key to show the ban holds.

Two more modes play issue 13's lockout attacks instead (``--mode``):

* ``silent``: opens ``--count`` connections to the target from this one
  address, completes each handshake and says nothing; holds them
  ``--hold`` seconds; one JSON line: how many were admitted, refused
  before or after the handshake, and closed by the node while held.
* ``impostor``: claims the node id ``--claim`` (an honest node's) without
  proof, and sends one malformed frame; one JSON line as for an attack. One JSON line per connection on stdout: attack, target, node id (hex),
requests the daemon made, and how the connection ended (``Error`` code and
message, ``Bye``, eof, or timeout). Exit code 0 unless it could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pupd.protocol import encoding, limits
from p2pupd.protocol.errors import RemoteProtocolError
from p2pupd.protocol.fleet.identity import CHALLENGE_BYTES, NodeKey
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.session import CLOSED, NEED_DATA, Session, Signal, State
from p2pupd.protocol.trust import RELEASE_TYPE, Envelope, sign
from p2pupd.protocol.wire import (
    FEATURE_BATCH,
    FEATURE_PROOF,
    MAX_BATCH_DIGESTS,
    Announce,
    AnnounceEntry,
    Bye,
    ChunkBatchRequest,
    ChunkData,
    ChunkMissing,
    ChunkRequest,
    Error,
    ManifestData,
    ManifestMissing,
    ManifestRequest,
    Message,
    Request,
    RootMissing,
    RootRequest,
    encode_message,
)

CONNECT_SECONDS = 5.0
ATTACK_SECONDS = 8.0  # the daemon must have ended the connection by then
ATTACKS = (
    "forged", "foreign", "replay", "corrupt", "oversized", "garbage", "batch-skew",
    "batch-oversized",
)  # fmt: skip
BATCH_ATTACKS = ("batch-skew", "batch-oversized")  # these speak "batch"


@dataclass
class Outcome:
    attack: str
    target: str
    node_id: str
    requests: list[str] = field(default_factory=list)
    ended: str = "timeout"
    error_code: int | None = None
    message: str = ""


@dataclass
class Offer:
    """What to announce and the envelope to serve when asked for it."""

    serial: int
    envelope: bytes
    corrupt_chunks: bool = False

    def entry(self) -> AnnounceEntry:
        env = Envelope.decode(self.envelope, limits.MAX_MANIFEST_BYTES)
        return AnnounceEntry("app", self.serial, env.payload_digest())


def relabel(envelope: bytes, serial: int, key: Ed25519PrivateKey | None) -> bytes:
    """``envelope``'s manifest with ``serial`` changed: old signatures, or re-signed by ``key``."""
    env = Envelope.decode(envelope, limits.MAX_MANIFEST_BYTES)
    doc = encoding.decode(env.payload, limits.MAX_MANIFEST_BYTES)
    assert isinstance(doc, dict)
    doc["serial"] = serial
    payload = encoding.encode(doc)
    if key is None:
        return Envelope(payload, env.signatures).encode()
    return sign(RELEASE_TYPE, payload, [key]).encode()


class Conn:
    """A blocking socket and a ``Session`` playing one attack."""

    def __init__(
        self,
        target: str,
        cluster: str,
        node_id: bytes,
        out: Outcome,
        sizes: dict[bytes, int],
        features: frozenset[str] = frozenset(),
        key: NodeKey | None = None,
    ) -> None:
        host, port = target.rsplit(":", 1)
        self.sizes = sizes  # chunk sizes of the offered release
        self.sock = socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS)
        if key is not None:  # prove the id: the honest node then keys its ban to it
            self.session = Session(
                node_id, cluster, 0, features | {FEATURE_PROOF},
                key=key, challenge=os.urandom(CHALLENGE_BYTES),
                local_host=self.sock.getsockname()[0], remote_host=host,
            )  # fmt: skip
        else:
            self.session = Session(node_id, cluster, 0, features)
        self.out = out
        self.sock.sendall(self.session.send_hello())

    def events(self, deadline: float) -> list[Message] | None:
        """Messages from one read; None when the connection ended (recorded in ``out``)."""
        self.sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = self.sock.recv(256 * 1024)
        except TimeoutError:
            return []
        except OSError as exc:
            if self.out.ended == "timeout":  # else the reason came before the reset
                self.out.ended = f"reset: {exc}"
            return None
        self.session.receive_data(data)
        msgs: list[Message] = []
        try:
            while True:
                ev = self.session.next_event()
                if self.session.proof_due:
                    self.sock.sendall(self.session.send_proof())
                if ev is NEED_DATA:
                    return msgs
                if ev is CLOSED:
                    break
                assert not isinstance(ev, Signal)
                if isinstance(ev, Error):
                    self.out.ended, self.out.error_code, self.out.message = (
                        "error",
                        ev.code,
                        ev.message,
                    )
                elif isinstance(ev, Bye):
                    self.out.ended, self.out.message = "bye", ev.reason
                else:
                    msgs.append(ev)
        except RemoteProtocolError as exc:
            self.out.ended = f"protocol error from honest node?! {exc}"
        if self.out.ended == "timeout":
            self.out.ended = "eof"
        return None

    def handshake(self, deadline: float) -> bool:
        while self.session.state is not State.OPEN:
            if time.monotonic() >= deadline or self.events(deadline) is None:
                return False
        return True

    def answer(self, req: Request, offer: Offer | None) -> None:
        self.out.requests.append(type(req).__name__)
        resp: Message
        if isinstance(req, ManifestRequest):
            if offer is not None and req.serial == offer.serial:
                resp = ManifestData(req.request_id, offer.envelope)
            else:
                resp = ManifestMissing(req.request_id)
        elif isinstance(req, ChunkRequest):
            size = self.sizes.get(req.digest, 1024)
            if offer is not None and offer.corrupt_chunks:
                resp = ChunkData(req.request_id, req.digest, secrets.token_bytes(size))
            else:
                resp = ChunkMissing(req.request_id, req.digest)
        elif isinstance(req, ChunkBatchRequest):
            # Data for a digest other than the next one due: encoded by hand,
            # since our own session would refuse to send it.
            wrong = req.batch[1] if len(req.batch) > 1 else secrets.token_bytes(32)
            data = secrets.token_bytes(self.sizes.get(wrong, 1024))
            self.sock.sendall(encode_message(ChunkData(req.request_id, wrong, data)))
            return
        elif isinstance(req, RootRequest):
            resp = RootMissing(req.request_id)
        else:  # range requests are never sent to a peer without the "range" feature
            raise AssertionError(f"unexpected {type(req).__name__}")
        self.sock.sendall(self.session.send(resp))

    def play(self, attack: str, offer: Offer | None, deadline: float) -> None:
        """Run the attack until the honest node hangs up or ``deadline``."""
        if offer is not None:
            self.sock.sendall(self.session.send(Announce((offer.entry(),))))
        elif attack == "oversized":
            self.sock.sendall((64 * limits.MiB).to_bytes(4, "big") + b"\x93" * 4096)
        elif attack == "garbage":
            body = b"\xc1" + secrets.token_bytes(63)  # 0xc1 is never valid msgpack
            self.sock.sendall(len(body).to_bytes(4, "big") + body)
        elif attack == "batch-oversized":
            digests = [secrets.token_bytes(32) for _ in range(MAX_BATCH_DIGESTS + 1)]
            body = encoding.encode([ChunkBatchRequest.TYPE, 1, digests])
            self.sock.sendall(len(body).to_bytes(4, "big") + body)
        for _ in range(10_000):
            if time.monotonic() >= deadline:
                return
            msgs = self.events(deadline)
            if msgs is None:
                return
            for msg in msgs:
                if isinstance(msg, Request) and self.session.state is State.OPEN:
                    try:
                        self.answer(msg, offer)
                    except OSError:  # hung up on us: read why (the Error frame)
                        self.drain(deadline)
                        return

    def drain(self, deadline: float) -> None:
        for _ in range(100):
            if time.monotonic() >= deadline or self.events(deadline) is None:
                return

    def close(self) -> None:
        self.sock.close()


def manifest_of(envelope: bytes) -> Manifest:
    """The manifest inside a signed envelope (not verified: we are the attacker)."""
    return Manifest.decode(Envelope.decode(envelope, limits.MAX_MANIFEST_BYTES).payload)


def run_attack(
    attack: str,
    target: str,
    cluster: str,
    offer: Offer | None,
    node_id: bytes,
    sizes: dict[bytes, int],
    key: NodeKey | None = None,
) -> Outcome:
    out = Outcome(attack, target, node_id.hex())
    deadline = time.monotonic() + ATTACK_SECONDS
    features = frozenset({FEATURE_BATCH}) if attack in BATCH_ATTACKS else frozenset[str]()
    try:
        conn = Conn(target, cluster, node_id, out, sizes, features, key)
    except OSError as exc:
        out.ended = f"connect failed: {exc}"
        return out
    try:
        if conn.handshake(deadline):
            conn.play(attack, offer, deadline)
    finally:
        conn.close()
    return out


def silent(target: str, cluster: str, count: int, hold: float) -> dict[str, object]:
    """Open ``count`` connections that finish the handshake and say nothing; hold them."""
    conns: list[Conn] = []
    report: dict[str, object] = {"mode": "silent", "target": target, "count": count}
    refused_early = refused_late = 0
    deadline = time.monotonic() + 15.0
    for _ in range(count):
        out = Outcome("silent", target, "")
        try:
            key = NodeKey.generate()
            conn = Conn(target, cluster, key.node_id, out, {}, frozenset(), key)
        except OSError:
            refused_early += 1
            continue
        if conn.handshake(min(deadline, time.monotonic() + 5.0)) and out.ended == "timeout":
            conns.append(conn)
        else:
            refused_late += 1 if out.ended == "error" else 0
            refused_early += 0 if out.ended == "error" else 1
            conn.close()
    report.update(admitted=len(conns), refused_before=refused_early, refused_after=refused_late)
    end = time.monotonic() + hold
    closed = 0
    for conn in conns:  # hold them: read (and ignore) what comes, note who hangs up
        while time.monotonic() < end and conn.out.ended == "timeout":
            if conn.events(min(end, time.monotonic() + 0.2)) is None:
                break
        closed += conn.out.ended != "timeout"
    report["closed_by_node"] = closed
    report["reasons"] = sorted({c.out.message for c in conns if c.out.message})
    for conn in conns:
        conn.close()
    return report


def impostor(target: str, cluster: str, claim: bytes) -> Outcome:
    """Claim ``claim`` (an honest node's id) without proof, then send a malformed frame."""
    out = Outcome("impostor", target, claim.hex())
    deadline = time.monotonic() + ATTACK_SECONDS
    try:
        conn = Conn(target, cluster, claim, out, {})
    except OSError as exc:
        out.ended = f"connect failed: {exc}"
        return out
    try:
        if conn.handshake(deadline):
            body = b"\xc1" + secrets.token_bytes(15)  # never valid msgpack
            conn.sock.sendall(len(body).to_bytes(4, "big") + body)
            conn.drain(deadline)
    finally:
        conn.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--target", action="append", required=True, metavar="HOST:PORT")
    ap.add_argument("--valid-manifest", type=Path)
    ap.add_argument("--old-manifest", type=Path)
    ap.add_argument("--attack", action="append", choices=ATTACKS)
    ap.add_argument("--mode", choices=("attacks", "silent", "impostor"), default="attacks")
    ap.add_argument("--count", type=int, default=64, help="silent: connections to open")
    ap.add_argument("--hold", type=float, default=30.0, help="silent: seconds to hold them")
    ap.add_argument("--claim", help="impostor: the node id (hex) to claim")
    args = ap.parse_args(argv)
    if args.mode == "silent":
        for target in args.target:
            print(json.dumps(silent(target, args.cluster, args.count, args.hold)), flush=True)
        return 0
    if args.mode == "impostor":
        for target in args.target:
            out = impostor(target, args.cluster, bytes.fromhex(args.claim))
            print(json.dumps(out.__dict__), flush=True)
        return 0
    assert args.valid_manifest and args.old_manifest, "attacks need both manifests"
    valid = args.valid_manifest.read_bytes()
    old = args.old_manifest.read_bytes()
    man = manifest_of(valid)
    sizes = man.blob_sizes()
    offers: dict[str, Offer | None] = {
        "forged": Offer(50, relabel(valid, 50, None)),
        "foreign": Offer(51, relabel(valid, 51, Ed25519PrivateKey.generate())),
        "replay": Offer(40, old),
        "corrupt": Offer(man.serial, valid, corrupt_chunks=True),
        "oversized": None,
        "garbage": None,
        "batch-skew": Offer(man.serial, valid),
        "batch-oversized": None,
    }
    first: dict[str, NodeKey] = {}
    for attack in args.attack or ATTACKS:
        for target in args.target:
            key = NodeKey.generate()  # a fresh, proven identity per attack
            first.setdefault(target, key)
            out = run_attack(attack, target, args.cluster, offers[attack], key.node_id, sizes, key)
            print(json.dumps(out.__dict__), flush=True)
    for target, key in first.items():  # the ban must hold for a known offender
        out = run_attack("rejoin", target, args.cluster, None, key.node_id, sizes, key)
        print(json.dumps(out.__dict__), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
