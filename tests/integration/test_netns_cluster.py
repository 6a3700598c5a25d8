"""Real daemons on a real (virtual) LAN: each node is a ``p2pupd daemon``
process in its own Linux network namespace on one bridge (169.254.77.0/24),
finding the others by mDNS alone.

* a release imported on one node is applied on all four, byte-identical;
* a hostile peer (forged, foreign-signed and replayed manifests, corrupt
  chunks, oversized and garbage frames) is banned by every honest node and
  changes nothing; the honest nodes then still converge on the next release;
* a partitioned node does not get a release while cut off, and converges
  once the link heals;
* a daemon SIGKILLed in the middle of a fetch resumes after a restart from
  what it had stored, without fetching that again;
* one host cannot lock a node out (issue 13, item 3): 64 silent connections
  from one address get at most the per-address share and are dropped, while
  an honest node joins meanwhile; a peer that claims an honest node's id
  without proving it and breaks the protocol gets its own address banned,
  never the honest node.

Needs root and iproute2 (CI has both); skips with the reason elsewhere.
Daemon logs are kept under tmp_path and their tails printed on failure.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from _cluster import (
    Cluster,
    Node,
    Publisher,
    random_files,
    wait_until,
)
from _netns import netns_unavailable
from conftest import tree_snapshot

from p2pupd.daemon.state.statedir import StateDir
from p2pupd.protocol import limits
from p2pupd.protocol.manifest import Manifest
from p2pupd.protocol.trust import Envelope

pytestmark = [pytest.mark.netns, pytest.mark.slow]

EVIL_PEER = Path(__file__).with_name("_evil_peer.py")
CONVERGE_SECONDS = 60.0
MESH_SECONDS = 30.0

MakeCluster = Callable[..., Cluster]
# What each attack of _evil_peer.py must be told when the honest node hangs up.
WHY_BANNED = {
    "forged": "does not verify",  # signatures kept, serial changed
    "foreign": "does not list",  # signed by a key the root does not know
    "replay": "is serial 1",  # an old valid manifest offered as serial 40
    "corrupt": "failed its hash check",
    "oversized": "exceeds",
    "garbage": "malformed",
    "batch-skew": "not the next one of the batch",  # data for a digest out of turn
    "batch-oversized": "batch must be",  # more digests than one batch may ask for
    "rejoin": "banned:",  # the first attacker id, back again
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Publisher:
    """v1, v2 (one file changed, one added: most content is reused) and v3,
    with a bundle of each taken when it was the newest."""
    pub = Publisher(tmp_path_factory.mktemp("site"))
    v1 = random_files(1, 1_200_000)
    pub.publish("1.0", v1)
    pub.bundle("v1")
    v2 = dict(v1, **random_files(2, 300_000, files=1), **{"new/readme.txt": b"v2\n"})
    pub.publish("2.0", v2)
    pub.bundle("v2")
    pub.publish("3.0", dict(v2, **random_files(3, 400_000, files=1)))
    pub.bundle("v3")
    return pub


@pytest.fixture
def make_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MakeCluster]:
    """Build clusters; tear every one down (daemons, namespaces, links) afterwards,
    printing the tail of each daemon log if the test failed."""
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    made: list[Cluster] = []
    failed_before = request.session.testsfailed

    def make(publisher: Publisher, n: int, spare_hosts: int = 0) -> Cluster:
        cluster = Cluster(tmp_path / f"lan{len(made)}", publisher, n, spare_hosts=spare_hosts)
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        failed = request.session.testsfailed > failed_before
        for cluster in made:
            try:
                if failed:
                    _show(request, cluster.report())
            finally:
                cluster.close()


def _show(request: pytest.FixtureRequest, text: str) -> None:
    """Write past pytest's capture (teardown output is otherwise hidden)."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        print(text)
        return
    with capman.global_and_fixture_disabled():
        sys.stderr.write(f"\n===== daemon logs of {request.node.name} =====\n{text}\n")


def manifest(pub: Publisher, serial: int) -> Manifest:
    env = Envelope.decode(pub.envelope(serial), limits.MAX_MANIFEST_BYTES)
    return Manifest.decode(env.payload)


def assert_tree(node: Node, src: Path) -> None:
    assert tree_snapshot(node.target) == tree_snapshot(src), f"{node.name}: target differs"


# ----- (a) -------------------------------------------------------------------------


def test_release_imported_on_one_node_is_applied_on_all(
    site: Publisher, make_cluster: MakeCluster
) -> None:
    cluster = make_cluster(site, 4)
    cluster.install(site.bundles["v1"])
    cluster.start()  # no --peer anywhere: mDNS is the only way to find each other
    cluster.wait_mesh(MESH_SECONDS)
    ids = {n.name: n.node_id() for n in cluster.nodes}
    for node in cluster.nodes:
        found = {e["peer"] for e in node.events("mdns-found")}
        assert found >= {ids[m.name][:12] for m in cluster.nodes if m is not node}, node.name
        assert {p["source"] for p in node.peers()["connected"]} <= {"mdns", "incoming"}
        assert node.serial() == 1

    first, *others = cluster.nodes
    out = first.check("import", site.bundles["v2"])  # routed to n1's running daemon
    assert "imported app 2.0 (serial 2)" in out
    cluster.wait_serial(2, CONVERGE_SECONDS)

    v1_blobs, v2 = manifest(site, 1).blob_sizes(), manifest(site, 2)
    changed = sum(s for d, s in v2.blob_sizes().items() if d not in v1_blobs)
    for node in cluster.nodes:
        assert_tree(node, site.sources["2.0"])
        app = node.app()
        assert app["serial"] == 2 and app["version"] == "2.0"
        assert any(e["serial"] == "2" for e in node.events("applied")), node.name
    assert first.app()["origin"] == {"serial": 2, "from": "import"}
    member_ids = set(ids.values())
    for node in others:
        received = node.app()["received"]
        assert received["serial"] == 2
        # Only content v1 lacks travelled, and only from cluster members.
        assert 0 < received["bytes"] <= changed < sum(v2.blob_sizes().values())
        assert set(received["from"]) <= member_ids - {ids[node.name]}
        assert sum(received["from"].values()) == received["bytes"]


# ----- (b) -------------------------------------------------------------------------


def test_malicious_peer_is_banned_and_changes_nothing(
    site: Publisher, make_cluster: MakeCluster
) -> None:
    cluster = make_cluster(site, 3, spare_hosts=1)
    cluster.install(site.bundles["v2"])
    cluster.start()
    cluster.wait_mesh(MESH_SECONDS)
    honest = cluster.nodes
    ids = {n.node_id() for n in honest}
    cluster_id = _cluster_id(honest[0])
    evil_host = cluster.spare[0]

    r = evil_host.run(
        [sys.executable, str(EVIL_PEER), "--cluster", cluster_id,
         *(a for n in honest for a in ("--target", n.endpoint)),
         "--valid-manifest", str(site.repo / "releases/app/3.msgpack"),
         "--old-manifest", str(site.repo / "releases/app/1.msgpack")],
        timeout=200,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    outcomes = [json.loads(line) for line in r.stdout.splitlines()]
    assert {o["attack"] for o in outcomes} == set(WHY_BANNED)
    assert len(outcomes) == (len(WHY_BANNED) - 1) * len(honest) + len(honest)
    for o in outcomes:
        # Every honest node hung up on the attacker itself and told it why.
        assert o["ended"] == "error" and o["error_code"] in (400, 403), o
        assert o["message"].startswith("banned:") or o["message"].startswith("protocol error")
        assert WHY_BANNED[o["attack"]] in o["message"], o
        if o["attack"] in ("forged", "foreign", "replay"):
            assert "ManifestRequest" in o["requests"], o  # it did look, then refused
        if o["attack"] == "corrupt":
            assert "ChunkRequest" in o["requests"], o
        if o["attack"] == "batch-skew":
            assert "ChunkBatchRequest" in o["requests"], o

    evil_ids = {o["node_id"] for o in outcomes}
    assert evil_ids.isdisjoint(ids)
    for node in honest:
        bans = {b["who"]: b["reason"] for b in node.peers()["banned"]}
        mine = [o for o in outcomes if o["target"] == node.endpoint and o["attack"] != "rejoin"]
        assert {w for w in bans if w.startswith("id:")} == {f"id:{o['node_id']}" for o in mine}
        for o in mine:
            assert WHY_BANNED[o["attack"]] in bans[f"id:{o['node_id']}"], (node.name, o)
        assert len(node.events("peer-banned")) >= len(mine)
        assert node.connected() == ids - {node.node_id()}  # no honest node was blamed
        app = node.app()
        assert app["serial"] == 2 and app["version"] == "2.0"
        # The forged and replayed serials (40, 50, 51) did not raise the rollback
        # high-water mark (that would freeze the node); v3 is valid, only its
        # chunks were corrupt, and nothing of it was applied.
        assert app["high_water"] == 3
        assert_tree(node, site.sources["2.0"])
        accepted = {e["serial"] for e in node.events("manifest-accepted")}
        assert accepted == {"3"}, accepted

    # The honest network carries on: the real v3 arrives on one node and spreads.
    honest[0].check("import", site.bundles["v3"])
    cluster.wait_serial(3, CONVERGE_SECONDS)
    for node in honest:
        assert_tree(node, site.sources["3.0"])
        froms = set(node.app()["received"]["from"] or {})
        assert froms.isdisjoint(evil_ids), node.name  # no byte came from the attacker
        applied = node.events("applied")[-1]
        assert applied["serial"] == "3", applied
        assert not set(applied["from"].split(",")) & {e[:12] for e in evil_ids}, applied
        assert node.stop() == 0
        fsck = node.run("fsck", "--json")
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def _cluster_id(node: Node) -> str:
    return StateDir(node.state).read_config().cluster


# ----- (c) -------------------------------------------------------------------------


def test_partition_that_heals_converges(site: Publisher, make_cluster: MakeCluster) -> None:
    cluster = make_cluster(site, 3)
    cluster.install(site.bundles["v1"])
    cluster.start()
    cluster.wait_mesh(MESH_SECONDS)
    n1, n2, n3 = cluster.nodes

    cluster.lan.partition(n3.host)
    n1.check("import", site.bundles["v2"])
    cluster.wait_serial(2, CONVERGE_SECONDS, [n1, n2])
    assert n3.serial() == 1
    assert not n3.events("manifest-accepted"), "n3 heard of v2 through a cut link"
    assert_tree(n3, site.sources["1.0"])

    cluster.lan.heal(n3.host)
    cluster.wait_serial(2, CONVERGE_SECONDS, [n3])
    assert_tree(n3, site.sources["2.0"])
    received: dict[str, Any] = n3.app()["received"]
    assert received["serial"] == 2 and received["bytes"] > 0
    assert set(received["from"]) <= {n1.node_id(), n2.node_id()}


# ----- (d) -------------------------------------------------------------------------


def test_daemon_killed_mid_fetch_resumes_without_refetching(
    tmp_path: Path, make_cluster: MakeCluster
) -> None:
    pub = Publisher(tmp_path / "big")
    src = pub.publish("1.0", random_files(7, 12 * limits.MiB, files=6))
    bundle = pub.bundle("v1")
    sizes = manifest(pub, 1).blob_sizes()
    total = sum(sizes.values())
    cluster = make_cluster(pub, 2)
    seed, leech = cluster.nodes
    cluster.install(bundle, [seed])
    seed.start("--bandwidth-limit", "2M")  # ~6 s for the whole release
    leech.start()
    first = leech.wait_log(r"event=fetch-started .* bytes=(\d+)", MESH_SECONDS)
    assert int(first.group(1)) == total

    def progressed() -> bool:
        fetch = leech.app()["fetch"]
        return fetch is not None and fetch.get("done_bytes", 0) >= total * 0.3

    wait_until(progressed, 30, "the leech to have fetched 30 %")
    assert leech.kill() < 0  # SIGKILL: no clean shutdown, nothing flushed on the way out
    assert not leech.events("release-complete"), "killed too late: the fetch had finished"
    stored = {d: s for d, s in leech.store_blobs().items() if bytes.fromhex(d) in sizes}
    stored_bytes = sum(stored.values())
    assert 0 < stored_bytes < total

    leech.start()
    second = leech.wait_log(r"event=fetch-started .* blobs=(\d+) bytes=(\d+)", 20)
    # It asks only for what the store lacks: nothing stored is fetched again
    # (and intact records the killed daemon had spooled but not committed are
    # salvaged at start, so it may ask for less still).
    again_blobs, again_bytes = int(second.group(1)), int(second.group(2))
    assert 0 < again_bytes <= total - stored_bytes
    assert again_blobs <= len(sizes) - len(stored)
    cluster.wait_serial(1, CONVERGE_SECONDS, [leech])
    assert_tree(leech, src)
    received = leech.app()["received"]
    assert received["bytes"] == again_bytes
    assert received["blobs"] == again_blobs
    assert set(leech.store_blobs()) >= set(stored)


# ----- (e) issue 13, item 3: no lockout --------------------------------------------

PER_HOST = 8  # the daemon's default per-address share (config per_host)


def test_a_slow_link_is_kept_while_the_peer_keeps_answering(
    tmp_path: Path, make_cluster: MakeCluster
) -> None:
    """A 4 Mbit/s link (tc) and a 2 s ``peer_timeout``: the receiver asks for
    the whole release at once (a sole source), in batches of 64 blobs, and
    the last batch is answered ~8 s after it was sent, queued behind the
    others. The seed answers all along, so the link is kept: a request is
    late only once the peer has also said nothing for its timeout."""
    pub = Publisher(tmp_path / "slow")
    src = pub.publish("1.0", random_files(11, 5 * limits.MiB, files=4))
    bundle = pub.bundle("v1")
    blobs = len(manifest(pub, 1).blob_sizes())
    assert blobs > 64  # more than one batch
    config = tmp_path / "slow.toml"
    config.write_text("[network]\npeer_timeout = 2\n")
    cluster = make_cluster(pub, 2)
    seed, leech = cluster.nodes
    cluster.install(bundle, [seed])
    cluster.lan.shape(seed.host, "4mbit")
    seed.start("--config", str(config), mdns=False)
    leech.start("--config", str(config), "--peer", seed.endpoint, mdns=False)
    cluster.wait_serial(1, CONVERGE_SECONDS, [leech])
    assert_tree(leech, src)
    began = leech.wait_log(r"ts=(\S+)Z level=\w+ event=fetch-started", 1).group(1)
    ended = leech.wait_log(r"ts=(\S+)Z level=\w+ event=release-complete", 1).group(1)
    took = (datetime.fromisoformat(ended) - datetime.fromisoformat(began)).total_seconds()
    assert took > 4 * 2  # the link, not the timeout, set the pace
    dropped = [
        e["reason"]
        for node in (seed, leech)
        for e in node.events("peer-closed")
        if "no answer" in e.get("reason", "")
    ]
    assert dropped == []
    assert leech.app()["received"]["from"] == {seed.node_id(): leech.app()["received"]["bytes"]}


def test_silent_connections_from_one_host_do_not_lock_honest_peers_out(
    site: Publisher, make_cluster: MakeCluster
) -> None:
    cluster = make_cluster(site, 3, spare_hosts=1)
    target, a, late = cluster.nodes
    cluster.start(nodes=[target, a])
    cluster.wait_mesh(MESH_SECONDS, [target, a])
    report_path = cluster.base / "silent.json"
    # 64 connections from one address: each proves a fresh id, then says nothing.
    proc = cluster.spare[0].spawn(
        [sys.executable, str(EVIL_PEER), "--cluster", _cluster_id(target), "--mode", "silent",
         "--target", target.endpoint, "--count", "64", "--hold", "45"],
        str(report_path),
    )  # fmt: skip
    try:
        wait_until(lambda: len(target.connected()) >= 2 + 1, 20, "the attacker's links")
        # The daemon's sockets stay bounded: the attacker's share, not 64.
        assert target.proc is not None
        fds = Path(f"/proc/{target.proc.pid}/fd")
        sockets = sum(1 for f in fds.iterdir() if os.readlink(f).startswith("socket:"))
        assert sockets <= 2 + PER_HOST + 16, sockets  # links, the share, mDNS/control/listener
        # Meanwhile an honest node starts and joins: it gets in.
        late.start()
        wait_until(lambda: late.node_id() in target.connected(), MESH_SECONDS, "the late node")
        assert a.node_id() in target.connected()  # nobody honest was pushed out
    finally:
        proc.wait(timeout=120)
    report = json.loads(report_path.read_text().splitlines()[-1])
    assert report["count"] == 64
    assert 1 <= report["admitted"] <= PER_HOST  # its per-address share, not every slot
    assert report["refused_before"] + report["refused_after"] == 64 - report["admitted"]
    # And the node let go of them for saying nothing (first-message timeout).
    assert report["closed_by_node"] == report["admitted"], report
    assert any("said nothing" in r for r in report["reasons"]), report
    honest = {a.node_id(), late.node_id()}
    assert target.connected() >= honest


def test_claiming_an_honest_id_and_misbehaving_bans_only_the_claimant(
    site: Publisher, make_cluster: MakeCluster
) -> None:
    cluster = make_cluster(site, 2, spare_hosts=1)
    target, honest = cluster.nodes
    cluster.start()
    cluster.wait_mesh(MESH_SECONDS)
    honest_id = honest.node_id()
    evil = cluster.spare[0]

    def impostor() -> dict[str, Any]:
        r = evil.run(
            [sys.executable, str(EVIL_PEER), "--cluster", _cluster_id(target),
             "--mode", "impostor", "--target", target.endpoint, "--claim", honest_id],
            timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout.splitlines()[-1]))

    # While the honest node is linked (its id proven), a claim without proof is refused.
    out = impostor()
    assert out["ended"] == "error" and "with proof" in out["message"], out
    assert honest_id in target.connected()
    # With the honest node away, the claim gets in unproven; its malformed frame
    # bans the claimant's address, not the id it claimed.
    honest.stop()
    wait_until(lambda: honest_id not in target.connected(), 30, "the honest node to leave")
    out = impostor()
    assert out["ended"] == "error" and "protocol error" in out["message"], out
    bans = {b["who"]: b["reason"] for b in target.peers()["banned"]}
    assert f"host:{evil.addr}" in bans
    assert f"id:{honest_id}" not in bans
    # The honest node comes back and is welcome.
    honest.start()
    wait_until(lambda: honest_id in target.connected(), MESH_SECONDS, "the honest node's return")
    assert not any(b["who"].startswith("id:") for b in target.peers()["banned"])
