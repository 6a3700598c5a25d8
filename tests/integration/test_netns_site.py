"""A site on a real (virtual) LAN: members find each other by mDNS and talk TLS 1.3;
nobody else gets anything. Each node is a ``p2pupd daemon`` in its own network
namespace on one bridge (169.254.77.0/24), enrolled through the real ``site``
commands.

* three enrolled nodes converge on a release imported on one of them;
* an outsider holding the root file but no credential finds them by mDNS,
  is refused at the TLS handshake by each, gets no release and is counted;
* a node whose credential expired is refused (and refuses); re-enrolled on
  site -- no publisher involved -- it rejoins and converges;
* a revoked node is cut off by every member within the bounded wait, the
  revocation list handed to one member only.

Needs root and iproute2 (CI has both); skips with the reason elsewhere.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _cluster import Cluster, Node, Publisher, random_files, wait_until
from _kit import cli
from _netns import netns_unavailable

pytestmark = [pytest.mark.netns, pytest.mark.slow]

CONVERGE_SECONDS = 60.0
REVOKE_SECONDS = 15.0  # the bounded wait for every member to cut a revoked node off
DAY = 86400


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    pub = Publisher(tmp_path / "pub")
    pub.publish("1.0", random_files(7, 900_000))
    pub.bundle("v1")
    c = Cluster(tmp_path / "lan", pub, 5)
    try:
        yield c
    except BaseException:
        print(c.report())
        raise
    finally:
        c.close()


def enrol(site_dir: Path, node: Node, *, expires_days: float | None = None,
          now: int | None = None) -> None:  # fmt: skip
    """request, enroll, join (routed to the node's daemon if one runs)."""
    req, mem = node.state.parent / "enrol.msgpack", node.state.parent / "member.msgpack"
    extra = [] if expires_days is None else ["--expires-days", str(expires_days)]
    old = os.environ.get("P2PUPD_NOW")
    if now is not None:
        os.environ["P2PUPD_NOW"] = str(now)
    try:
        cli("site", "request", "--state-dir", node.state, "--out", req)
        cli("site", "enroll", req, "--site-dir", site_dir, "--out", mem, *extra)
        cli("site", "join", mem, "--state-dir", node.state)
    finally:
        if old is None:
            os.environ.pop("P2PUPD_NOW", None)
        else:
            os.environ["P2PUPD_NOW"] = old


def test_site_on_a_lan(cluster: Cluster, tmp_path: Path) -> None:
    pub = cluster.publisher
    site_dir = tmp_path / "sitedir"
    cli("site", "init", site_dir, "--name", "plant-7")
    members, outsider, late = cluster.nodes[:3], cluster.nodes[3], cluster.nodes[4]
    for n in [*members, late]:
        cli("init", "--state-dir", n.state, "--trust", pub.root_file,
            "--site", site_dir / "site.pub", "--component", f"app={n.target}")  # fmt: skip
    for n in members:
        enrol(site_dir, n)
    enrol(site_dir, late, expires_days=1, now=int(time.time()) - 2 * DAY)
    cluster.install(pub.bundles["v1"], [members[0]])
    cluster.start()  # mDNS only: every node finds every other one
    ids = {n.name: n.node_id() for n in cluster.nodes}

    # Three members converge, over TLS.
    cluster.wait_serial(1, CONVERGE_SECONDS, members)
    cluster.wait_mesh(CONVERGE_SECONDS, members)
    for n in members:
        doc = n.peers()
        assert doc["site"]["tls"] is True and doc["site"]["site"] == "plant-7", n.name
        assert ids[outsider.name] not in n.connected() and ids[late.name] not in n.connected()

    # The outsider found them (mDNS reveals them as before) and was refused by each
    # at the TLS handshake; it has nothing.
    wait_until(
        lambda: all(
            any("handshake" in r["reason"] for r in n.peers()["site"]["recent"]) for n in members
        ),
        CONVERGE_SECONDS,
        "every member to refuse the outsider at the TLS handshake",
    )
    assert outsider.events("mdns-found"), "the outsider should see the members by mDNS"
    assert not outsider.events("peer-connected")
    assert outsider.serial() is None
    # The expired node refuses to take part, and is refused.
    assert late.serial() is None and not late.events("peer-connected")
    assert "expired" in str(late.status()["site"]["problem"])

    # Re-enrolled on site (same node key), it rejoins and converges.
    enrol(site_dir, late)
    cluster.wait_serial(1, CONVERGE_SECONDS, [late])

    # Revoke members[2]; the list goes to members[0] only; every member cuts it off.
    victim = members[2]
    rl = tmp_path / "rl.msgpack"
    cli("site", "revoke", ids[victim.name][:8], "--site-dir", site_dir, "--out", rl)
    t0 = time.monotonic()
    cli("site", "update", rl, "--state-dir", members[0].state)
    others = [members[0], members[1], late]
    wait_until(
        lambda: all(ids[victim.name] not in n.connected() for n in others),
        REVOKE_SECONDS,
        "every member to cut the revoked node off",
    )
    took = time.monotonic() - t0
    for n in others:
        assert n.status()["site"]["revocations"]["sequence"] == 1, n.name
    time.sleep(2)  # the revoked node keeps trying (mDNS, redials): it stays out
    assert all(ids[victim.name] not in n.connected() for n in others)
    assert not victim.connected()
    print(f"revocation: every member cut the revoked node off within {took:.1f} s")
    for n in cluster.nodes:
        assert "Traceback" not in n.text(), n.name
