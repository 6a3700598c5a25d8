"""Rollouts across real daemons in network namespaces (mDNS, TCP, real health checks).

* six daemons; a release in waves whose health check fails on the canary: no
  other node applies it, ``fleet`` on every node shows the failure and the
  brake; the publisher's next (good) release then rolls out wave by wave, each
  wave starting only after the one before it committed and soaked;
* (four daemons) ``rollout halt`` on one node holds a release on every node, a resume from a
  key that is not an operator's moves nothing elsewhere, the operator's
  resume lets it run to the end.

Needs root and iproute2 (CI has both); skips with the reason elsewhere.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _cluster import Cluster, Node, Publisher, random_files, wait_until
from _kit import cli
from _netns import netns_unavailable
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pupd.daemon import api
from p2pupd.protocol.rollout.policy import RolloutPolicy
from p2pupd.protocol.rollout.waves import place

pytestmark = [pytest.mark.netns, pytest.mark.slow]

N = 6
SOAK = 4  # seconds: scaled down from the minutes a real site would use
BAD_POLICY = "waves=1,50% soak=0 halt-after=1"
GOOD_POLICY = f"waves=1,50% soak={SOAK}s halt-after=1"
WAIT = 90.0
VIEW = 3  # links per node in the six-node test


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """``N`` nodes on v1 (fewer with ``@pytest.mark.parametrize("cluster", [n], indirect=True)``)."""
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    pub = Publisher(tmp_path / "site")
    pub.publish("1.0", random_files(1, 200_000))
    pub.bundle("v1")
    c = Cluster(tmp_path / "lan", pub, getattr(request, "param", N))
    failed_before = request.session.testsfailed
    try:
        c.install(pub.bundles["v1"])
        yield c
    finally:
        if request.session.testsfailed > failed_before:
            print(c.report(60))
        c.close()


def configure(c: Cluster, operators: list[str] | None = None, view: int | None = None) -> Path:
    """A daemon config with the rollout timings scaled down for a test; ``view``: the
    most links a node keeps (its partial view), so that nodes are not all neighbours."""
    path = c.base / "config.toml"
    keys = ", ".join(f'"{k}"' for k in operators or [])
    text = (
        f"[rollout]\noperators = [{keys}]\nreport_interval = 5\nsettle = 3\nlive = 60\ngone = 600\n"
    )
    if view is not None:
        text += f"[network]\nview_target = {view - 1}\nview_max = {view}\n"
    path.write_text(text)
    return path


def publish(c: Cluster, version: str, policy: str, seed: int) -> Path:
    src = c.base / "src" / version
    for rel, data in random_files(seed, 200_000).items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    cli("publish", c.publisher.repo, "app", version, src, "--rollout", policy)
    return c.publisher.bundle(f"v{version}")


def fleet(node: Node) -> dict[str, Any]:
    """``fleet --json`` of the node's daemon, asked over its control socket from here
    (a unix socket is a path, not in a network namespace: no process per poll)."""
    return api.fleet(node.state)


def app(node: Node) -> dict[str, Any]:
    doc: dict[str, Any] = api.status(node.state)["components"]["app"]
    return doc


def release(doc: dict[str, Any], serial: int) -> dict[str, Any]:
    return next((r for r in doc["releases"] if r["serial"] == serial), {})


def wait_site_view(c: Cluster) -> None:
    n = len(c.nodes)
    wait_until(
        lambda: all(len(fleet(x)["nodes"]) == n for x in c.nodes), WAIT, "every node to see all"
    )


def links(node: Node) -> int:
    return len(api.peers(node.state)["connected"])


def history(node: Node, event: str, serial: int) -> list[dict[str, Any]]:
    return [
        h for h in api.history(node.state, "app") if h["event"] == event and h["serial"] == serial
    ]


def test_a_failing_canary_stops_the_release_and_the_next_one_goes_wave_by_wave(
    cluster: Cluster,
) -> None:
    c = cluster
    script = c.base / "health.sh"
    script.write_text('#!/bin/sh\ntest "$P2PUPD_VERSION" != 2.0\n')
    script.chmod(0o755)
    for node in c.nodes:  # every node's health check refuses 2.0
        cli("init", "--state-dir", node.state, "--trust", c.publisher.root_file,
            "--component", f"app={node.target}", "--health-cmd", script)  # fmt: skip
    # Views of at most 3 links among 6 nodes: each node has at least two that are
    # not its neighbours, whose reports reach it only relayed by others.
    c.start("--config", str(configure(c, view=VIEW)))
    wait_site_view(c)
    # (Joins may evict: right after a start a node can briefly hold one link more.)
    wait_until(lambda: all(links(n) <= VIEW for n in c.nodes), WAIT, "views of at most 3")
    ids = {bytes.fromhex(n.node_id()): n for n in c.nodes}

    bad = publish(c, "2.0", BAD_POLICY, seed=2)
    c.nodes[2].check("import", bad)
    canary = ids[place(RolloutPolicy.parse(BAD_POLICY), "app", 2, list(ids)).order[0]]
    wait_until(lambda: all(release(fleet(n), 2).get("braked") for n in c.nodes), WAIT, "the brake")
    wait_until(lambda: all(app(n)["serial"] == 1 for n in c.nodes), 10, "nodes back on 1")
    for node in c.nodes:
        tried = history(node, "health-failed", 2)
        assert bool(tried) == (node is canary), node.name  # only the canary ever tried
        rel = release(fleet(node), 2)
        assert rel["failed"] == 1 and rel["on_it"] == 0
        assert rel["failures"][0]["node_id"] == canary.node_id()
        assert "health check exited with 1" in rel["failures"][0]["reason"]
        if node is not canary:
            assert app(node)["rollout"]["go"] == "brake"
    table = c.nodes[0].check("fleet")  # the human table names the failure too
    assert "braked" in table and canary.node_id()[:12] in table

    good = publish(c, "3.0", GOOD_POLICY, seed=3)
    started = time.time()
    c.nodes[4].check("import", good)
    c.wait_serial(3, WAIT)
    order = [ids[i] for i in place(RolloutPolicy.parse(GOOD_POLICY), "app", 3, list(ids)).order]
    applied = {n.name: history(n, "applied", 3)[-1]["time"] for n in c.nodes}
    waves = [order[:1], order[1:3], order[3:]]  # 6 nodes: (1, 3, 6)
    for earlier, later in itertools.pairwise(waves):
        # Each wave starts only once every node before it ran committed for the soak.
        assert min(applied[n.name] for n in later) >= max(applied[n.name] for n in earlier) + SOAK
    for node in c.nodes:
        assert release(fleet(node), 3)["on_it"] == N
    print(
        f"\n{N} nodes, views of {VIEW}, waves {GOOD_POLICY!r}: all on 3.0 "
        f"{max(applied.values()) - started:.1f} s after the import; waves applied at "
        + ", ".join(
            "+" + "/".join(f"{applied[n.name] - started:.1f}" for n in wave) + " s"
            for wave in waves
        )
    )


@pytest.mark.parametrize("cluster", [4], indirect=True)
def test_rollout_halt_and_resume(cluster: Cluster) -> None:
    c = cluster
    operator = c.nodes[3]
    key = Ed25519PrivateKey.generate()  # the operator node's key, made before its first start
    (operator.state / "node.key").write_bytes(key.private_bytes_raw())
    (operator.state / "node.key").chmod(0o600)
    public = key.public_key().public_bytes_raw().hex()
    c.start("--config", str(configure(c, [public])))
    wait_site_view(c)
    assert api.status(operator.state)["node_key"] == public

    v2 = publish(c, "2.0", "waves=1,50% soak=0", seed=2)
    c.nodes[1].check("rollout", "halt", "app", "--serial", "2", "--reason", "disks on order")
    c.nodes[0].check("import", v2)
    wait_until(
        lambda: all((app(n).get("rollout") or {}).get("go") == "halted" for n in c.nodes),
        WAIT,
        "the halt on every node",
    )
    assert all(app(n)["serial"] == 1 for n in c.nodes)
    assert "disks on order" in app(c.nodes[3])["rollout"]["reason"]

    out = c.nodes[2].check("rollout", "resume", "app", "--serial", "2")
    assert "not a rollout operator key" in out  # it says so, and the others refuse it
    wait_until(lambda: bool(c.nodes[0].events("rollout-action-refused")), 30, "the refusal")
    assert all(app(n)["serial"] == 1 for n in c.nodes if n is not c.nodes[2])

    operator.check("rollout", "resume", "app", "--serial", "2", "--reason", "disks replaced")
    c.wait_serial(2, WAIT)
    for node in c.nodes:
        rel = release(fleet(node), 2)
        assert not rel["halted"] and rel["on_it"] == len(c.nodes)
