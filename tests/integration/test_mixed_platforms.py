"""A mixed-platform site over the LAN: real daemons on 127.0.0.1, one of them an
x86-64 node and one configured as aarch64 (`init --platform linux-aarch64`).

A stick with both variants of a release, imported on the x86-64 node, reaches the
aarch64 node over the LAN and it installs its own variant within the bounded
wait; the same for the bundle a publisher cuts for the site's request (collected
by the x86-64 node's daemon). The x86-64 node carries the aarch64 variant and
never installs it; neither node logs a refused manifest or bans the other.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from _daemonkit import Site
from _kit import cli as cli_inproc
from _kit import make_tree, tree_snapshot
from test_daemon_processes import Daemon, cli, daemons, linked_pair, private_cluster

X86, ARM = "linux-x86_64", "linux-aarch64"
WAIT_SECONDS = 20.0  # the bounded wait for the aarch64 node to install its variant
SHARED = random.Random(11).randbytes(300_000)
V1 = {"bin/tool": random.Random(12).randbytes(200_000), "share/data": SHARED, "etc/conf": b"1\n"}


def build(version: str, platform: str) -> dict[str, bytes]:
    """``version`` of the tree as built for ``platform``: its binary differs per build."""
    tool = bytearray(V1["bin/tool"])
    tool[1_000:1_064] = random.Random(f"{version}-{platform}").randbytes(64)
    return {**V1, "bin/tool": bytes(tool), "etc/conf": f"{version}\n".encode()}


def publish_variants(site: Site, version: str) -> dict[str, Path]:
    out = {}
    for platform in (X86, ARM):
        src = make_tree(site.base / "src" / f"{version}-{platform}", build(version, platform))
        cli_inproc("publish", site.repo, "app", version, src, "--platform", platform)
        out[platform] = src
    return out


def wait_installed(state: Path, version: str, daemon: Daemon) -> float:
    """Seconds until ``status`` shows ``version`` live (at most ``WAIT_SECONDS``)."""
    t0 = time.monotonic()
    for _ in range(int(WAIT_SECONDS / 0.2) + 1):
        r = cli("status", "--json", "--state-dir", state)
        if r.returncode == 0 and json.loads(r.stdout)["components"]["app"]["version"] == version:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"{version} not installed after {WAIT_SECONDS} s:\n{daemon.text()}")


def test_variants_reach_the_aarch64_node_from_a_stick_and_from_a_site_bundle(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path)
    site.publish("1.0", V1)  # universal: both nodes run it
    v1 = site.bundle("v1")
    (sx, tx), (sa, ta) = site.node("x86", platform=X86), site.node("arm", platform=ARM)
    for state in (sx, sa):
        r = cli("import", v1, "--apply", "--state-dir", state)
        assert r.returncode == 0, r.stderr
    private_cluster(sx, sa)
    v2 = publish_variants(site, "2.0")
    stick = site.bundle("v2")  # a full export: every variant
    with daemons() as running:
        x, a = linked_pair(running, sx, sa)

        # 1. The stick, imported on the x86-64 node (routed to its daemon).
        r = cli("import", stick, "--state-dir", sx, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["carried"] == [
            {"component": "app", "version": "2.0", "serial": 2, "platform": ARM}
        ]
        took = wait_installed(sa, "2.0", a)
        wait_installed(sx, "2.0", x)
        print(f"aarch64 node installed 2.0 {took:.1f} s after the import on the x86-64 node")
        assert tree_snapshot(ta) == tree_snapshot(v2[ARM])
        assert tree_snapshot(tx) == tree_snapshot(v2[X86])

        # 2. A site request, collected by the x86-64 node's daemon, and the
        # publisher's bundle for it, imported on the x86-64 node again.
        v3 = publish_variants(site, "3.0")
        req_dir = tmp_path / "request"
        req_dir.mkdir()
        r = cli("export", "--request", req_dir, "--state-dir", sx, "--json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["unanswered"] == [] and len(doc["site"]) == 2
        bundle = tmp_path / "site-bundle"
        r = cli("export", site.repo, bundle, "--for", doc["request"], "--json")
        assert r.returncode == 0, r.stderr
        assert "site request of 2 nodes: the bundle serves each" in json.loads(r.stdout)["notes"]
        r = cli("import", bundle, "--state-dir", sx, "--json")
        assert r.returncode == 0, r.stderr
        assert [c["platform"] for c in json.loads(r.stdout)["carried"]] == [ARM]
        took = wait_installed(sa, "3.0", a)
        wait_installed(sx, "3.0", x)
        print(f"aarch64 node installed 3.0 {took:.1f} s after the import on the x86-64 node")
        assert tree_snapshot(ta) == tree_snapshot(v3[ARM])
        assert tree_snapshot(tx) == tree_snapshot(v3[X86])
        status = json.loads(cli("status", "--json", "--state-dir", sx).stdout)
        assert status["components"]["app"]["carried"][-1] == {"serial": 3, "platform": ARM}
        assert x.stop() == 0 and a.stop() == 0
    for d in (x, a):
        text = d.text()
        assert "Traceback" not in text
        assert "event=manifest-refused" not in text and "event=peer-banned" not in text
    # The x86-64 node carried the aarch64 variant and installed only its own.
    applied = [h for h in json.loads(cli("history", "app", "--json", "--state-dir", sx).stdout)
               ["history"] if h["event"] == "applied"]  # fmt: skip
    assert [h["version"] for h in applied] == ["1.0", "2.0", "3.0"]
    assert "event=variant-carried" in a.text()  # the aarch64 node carries x86's in turn
