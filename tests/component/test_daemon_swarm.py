"""Many in-process nodes over memory streams, under MockClock: the real Session,
Gossip, ReleaseSwarm, fetch and apply code, a real BlobStore and real Applier on
small trees per node. They must converge on the newest valid release, and never
accept, store or announce an invalid one, while lying nodes get banned."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import trio
import trio.testing
from _daemonkit import Site, installed, link, make_service, random_tree, wait_until
from conftest import tree_snapshot
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pupd.daemon.service.nodeservice import NodeService
from p2pupd.daemon.state.node import Node
from p2pupd.protocol import ids
from p2pupd.protocol.fleet import bitfield
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.trust import sign
from p2pupd.protocol.wire import (
    Announce,
    ChunkData,
    ChunkRequest,
    Have,
    HaveBits,
    ManifestData,
    ManifestRangeData,
    ManifestRangeRequest,
    ManifestRequest,
    Request,
    Response,
)

FAKE_SERIAL = 99


def forged_manifest(node: Node) -> bytes:
    """A manifest for serial 99 signed by a key the root does not list."""
    real = node.manifest("app", node.releases.serials("app")[-1])
    fake = Manifest("app", "9.9", FAKE_SERIAL, real.created, real.files)
    return sign("release", fake.encode(), [Ed25519PrivateKey.generate()]).encode()


class ForgerService(NodeService):
    """Announces serial 99 and serves a forged manifest for it."""

    def announcement(self) -> Announce:
        return Announce.from_holdings({"app": (FAKE_SERIAL, ids.sha256(b"forged"))})

    def respond(self, req: Request) -> Response:
        if isinstance(req, ManifestRequest) and req.serial == FAKE_SERIAL:
            return ManifestData(req.request_id, forged_manifest(self.node))
        if isinstance(req, ManifestRangeRequest) and req.serial == FAKE_SERIAL:
            data = forged_manifest(self.node)
            return ManifestRangeData(req.request_id, 0, len(data), data[: req.length])
        return super().respond(req)


class ReplayService(ForgerService):
    """Announces serial 99 but replays the genuine, validly signed 1.0 manifest for it."""

    def respond(self, req: Request) -> Response:
        if isinstance(req, ManifestRequest | ManifestRangeRequest) and req.serial == FAKE_SERIAL:
            data = self.node.releases.get_bytes("app", 1)
            if isinstance(req, ManifestRequest):
                return ManifestData(req.request_id, data)
            return ManifestRangeData(req.request_id, 0, len(data), data[: req.length])
        return super().respond(req)


class CorruptService(NodeService):
    """Claims to hold every blob of every release and serves garbage of the right size."""

    def message(self, conn, msg):  # type: ignore[no-untyped-def]
        super().message(conn, msg)
        if isinstance(msg, Have) and not msg.complete:
            conn.post(Have(msg.component, msg.serial, True))
        if isinstance(msg, HaveBits):  # a swarm peer: offer it every blob
            try:
                count = len(self.node.manifest(msg.component, msg.serial).blob_sizes())
            except Exception:
                return
            for offset, bits in bitfield.to_wire((1 << count) - 1, count):
                conn.post(HaveBits(msg.component, msg.serial, offset, bits))

    def respond(self, req: Request) -> Response:
        if isinstance(req, ChunkRequest):
            size = self._sizes().get(req.digest, 1000)
            return ChunkData(req.request_id, req.digest, b"\x00" * size)
        return super().respond(req)

    def _sizes(self) -> dict[bytes, int]:
        out: dict[bytes, int] = {}
        for s in self.node.releases.serials("app"):
            out.update(self.node.manifest("app", s).blob_sizes())
        return out


def evil_node_ids(services: list[NodeService]) -> set[str]:
    return {s.node.config.node_id.hex() for s in services}


@pytest.mark.slow
async def test_fifty_nodes_converge_on_newest_valid_release(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "p2pupd.daemon")
    site = Site(tmp_path)
    site.publish("1.0", random_tree(1))
    v1_bundle = site.bundle("v1")
    v2_files = random_tree(1)
    v2_files["f0.bin"] = v2_files["f0.bin"][:30_000] + b"changed" + v2_files["f0.bin"][30_000:]
    v2_files["new.txt"] = b"only in 2.0\n"
    site.publish("2.0", v2_files)
    v2_bundle = site.bundle("v2")

    n_honest, rng = 47, random.Random(6)
    nodes = [site.node(f"n{i}") for i in range(n_honest + 3)]
    from p2pupd.daemon import api

    api.import_dir(nodes[0][0], v1_bundle)  # the first seed holds 1.0
    for i in (n_honest, n_honest + 1, n_honest + 2):  # liars hold 1.0 too, to talk about it
        api.import_dir(nodes[i][0], v1_bundle)

    honest = [make_service(nodes[i][0], seed=i, gossip_interval=10.0) for i in range(n_honest)]
    forger = make_service(nodes[n_honest][0], seed=100, cls=ForgerService, gossip_interval=10.0)
    corrupt = make_service(nodes[n_honest + 1][0], seed=101, cls=CorruptService)
    replayer = make_service(nodes[n_honest + 2][0], seed=102, cls=ReplayService)
    liars = [forger, corrupt, replayer]
    services = [*honest, *liars]

    async with trio.open_nursery() as nursery:
        for svc in services:
            await nursery.start(svc.serve)
        for i in range(n_honest):  # a ring plus random chords: connected, small diameter
            link(nursery, honest[i], honest[(i + 1) % n_honest])
            link(nursery, honest[i], honest[rng.randrange(n_honest)] if i % 2 else honest[i - 7])
        for liar in liars:
            for j in rng.sample(range(n_honest), 6):
                link(nursery, liar, honest[j])

        await trio.sleep(30)
        # 2.0 arrives on a node far from the first seed, while 1.0 is spreading.
        await honest[n_honest // 2].lifecycle.import_dir(v2_bundle, apply_after=False)

        await wait_until(
            lambda: all(installed(state) == 2 for state, _ in nodes[:n_honest]), timeout=3600
        )
        nursery.cancel_scope.cancel()

    v2_tree = tree_snapshot(site.sources["2.0"])
    for state, target in nodes[:n_honest]:
        node = Node(state)
        st = node.state.read_state("app")
        assert st.installed == 2 and st.high_water == 2
        assert set(node.releases.serials("app")) <= {1, 2}
        assert tree_snapshot(target) == v2_tree
    # Every neighbour of a liar that talked to it banned it.
    liar_ids = evil_node_ids(liars)
    bans = [b["who"] for svc in honest for b in svc.admission.bans(0.0 - 1e9)]
    for liar in liars:
        assert f"id:{liar.node.config.node_id.hex()}" in bans
    assert all(b.split(":", 1)[1] in liar_ids for b in bans if b.startswith("id:"))
    # Lies are refused and punished; nothing else goes wrong on the way.
    assert "peer-crash" not in caplog.text and "service-failed" not in caplog.text
    assert "fetch-failed" not in caplog.text and "apply-failed" not in caplog.text
    # Blobs came from several peers, not all from one seed.
    sources = {p for svc in honest for p in (svc.fetch.received.get("app") or _Empty()).by_peer}
    assert len(sources) > 10


class _Empty:
    by_peer: dict[str, int] = {}
