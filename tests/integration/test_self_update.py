"""p2pupd updates itself through its own channel, on three nodes in network namespaces.

Versions are built from this checkout by the builder ``make dist`` runs and
installed by their artifacts' own install.sh (_selfupdate.py): N as it is,
N+1 with another version number; N+2 is N+1's version directory with one
module changed so that its daemon exits at start-up.
Each node runs N from an installed prefix (``PREFIX/current/bin/p2pupd
daemon``, no systemd: the watchdog restarts it when needed), with
``init --self-update PREFIX``. The publisher publishes the version
directories of N+1 and N+2 as releases of component ``p2pupd`` (N+2 as deltas
against N+1).

* N+1 imported from a stick on one node: every node ends up *running* N+1 --
  each daemon restarted into it (same pid), proved itself (peers back) and
  only then made it live and announced it, so the other two got it over the
  network and did the same.
* N+2 imported on the first node: its trial run dies at start-up; the
  watchdog (N+1's code) marks it bad and starts N+1 again, which is live
  throughout. The others never take N+2: a node announces only the release
  of p2pupd it runs and proved, so it never reached them.
* N+3 (N+1's tree again) on the first node, whose health command for p2pupd
  now fails: the trial run starts, cannot prove itself, records why and hands
  the node (and its lock) back to N+1 in the same process.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _cluster import PORT, Node, Publisher, wait_until
from _dist import build_artifact
from _kit import cli
from _netns import Lan, netns_unavailable
from _selfupdate import broken_tree, install, project_version, source_copy

from p2pupd.daemon.ops import self_platform

pytestmark = [pytest.mark.netns, pytest.mark.slow]

N_NODES = 3
TRIAL_SECONDS = 60  # the self component's health timeout: start, state, a peer back
CONFIG = "[network]\ngossip_interval = 2\n"


@dataclass(frozen=True)
class Versions:
    n: str
    n1: str
    n2: str
    n3: str  # N+1's tree published again, refused by a failing health command
    installed: Path  # a prefix with N installed (copied for each node)
    tree1: Path  # N+1's version directory: the release tree
    tree2: Path  # N+2's (broken)


@pytest.fixture(scope="module")
def versions(dist_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Versions:
    base = tmp_path_factory.mktemp("versions")
    n = project_version()
    n1, n2, n3 = f"{n}.post1", f"{n}.post2", f"{n}.post3"

    def build() -> tuple[Path, Path]:
        src = source_copy(base / f"src-{n1}", n1)
        art = build_artifact(base / f"art-{n1}", source=src, offline=True)
        tree1 = install(art, base / f"root-{n1}") / n1
        return tree1, broken_tree(tree1, base / n2)

    # A build and two installs on two cores: side by side.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        trees = pool.submit(build)
        inst = pool.submit(install, dist_artifact, base / "root-n")
        return Versions(n, n1, n2, n3, inst.result(), *trees.result())


@dataclass
class SelfNode:
    node: Node
    prefix: Path
    config: Path

    def start(self) -> None:
        """Run the installed p2pupd's daemon, as systemd's ExecStart would (no systemd here)."""
        n = self.node
        argv = [str(self.prefix / "current" / "bin" / "p2pupd"), "daemon",
                "--state-dir", str(n.state), "--listen", f"{n.addr}:{PORT}",
                "--mdns-interface", n.addr, "--config", str(self.config)]  # fmt: skip
        n.starts.append(n.log.stat().st_size if n.log.exists() else 0)
        n.proc = n.host.spawn(argv, str(n.log), env=daemon_env())
        n.wait_log(r"event=ready", 60)

    def status(self) -> dict[str, Any] | None:
        """``status --json`` from the running daemon, or None if none answers."""
        r = self.node.run("status", "--json", timeout=30)
        if r.returncode != 0:
            return None
        doc: dict[str, Any] = json.loads(r.stdout)
        return doc if doc.get("daemon", {}).get("running") else None

    def runs(self, version: str) -> bool:
        """The daemon runs ``version`` and p2pupd's component has it live."""
        doc = self.status()
        return (
            doc is not None
            and doc["daemon"]["version"] == version
            and doc["components"]["p2pupd"]["version"] == version
        )

    def live_dir(self) -> str:
        return os.readlink(self.prefix / "current")


def daemon_env() -> dict[str, str]:
    """The environment a node's daemon runs in: not under systemd (INVOCATION_ID
    would make the watchdog leave the restart to a supervisor), no Python settings."""
    drop = ("INVOCATION_ID", "NOTIFY_SOCKET", "PYTHONPATH", "PYTHONHOME")
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.fixture
def site(versions: Versions, tmp_path: Path) -> Iterator[tuple[Publisher, list[SelfNode]]]:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    pub = Publisher(tmp_path / "publisher")
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    lan = Lan(N_NODES)
    nodes: list[SelfNode] = []
    try:
        for host in lan.hosts:
            name = f"n{host.index}"
            prefix = tmp_path / name / "opt" / "p2pupd"
            prefix.parent.mkdir(parents=True)
            subprocess.run(["cp", "-a", str(versions.installed), str(prefix)], check=True)
            state = tmp_path / name / "state"
            cli("init", "--state-dir", state, "--trust", pub.root_file, "--self-update", prefix,
                "--health-timeout", str(TRIAL_SECONDS))  # fmt: skip
            node = Node(host, name, state, prefix / "current", tmp_path / name / "daemon.log")
            nodes.append(SelfNode(node, prefix, config))
        yield pub, nodes
    except BaseException:
        for sn in nodes:
            print(f"----- {sn.node.name} -----\n{sn.node.tail(60)}")
        raise
    finally:
        lan.close()


def test_p2pupd_updates_itself_and_a_broken_release_stops_at_the_first_node(
    versions: Versions, site: tuple[Publisher, list[SelfNode]]
) -> None:
    pub, nodes = site
    first, others = nodes[0], nodes[1:]
    plat = self_platform()
    cli("publish", pub.repo, "p2pupd", versions.n1, versions.tree1, "--platform", plat)
    stick1 = pub.base / "stick-n1"
    cli("export", pub.repo, stick1)

    for sn in nodes:
        sn.start()
    for sn in nodes:  # as installed: N runs, no release of p2pupd applied yet
        doc = sn.status()
        assert doc is not None and doc["daemon"]["version"] == versions.n, doc
        assert doc["components"]["p2pupd"]["serial"] is None
    ids = {sn.node.name: sn.node.node_id() for sn in nodes}

    def meshed() -> bool:
        return all(
            sn.node.connected() >= {ids[o.node.name] for o in nodes if o is not sn} for sn in nodes
        )

    wait_until(meshed, 60, "the three daemons to connect", 0.5)
    pids = {sn.node.name: sn.node.proc.pid for sn in nodes if sn.node.proc}

    # -- N+1 from a stick on one node; the others get it over the network ---------------
    first.node.check("import", stick1, timeout=300)
    for sn in nodes:
        wait_until(lambda sn=sn: sn.runs(versions.n1), 300, f"{sn.node.name} to run N+1", 1.0)
    for sn in nodes:
        n = sn.node
        doc = sn.status()
        assert doc is not None
        # Restarted into it in place: the same process (systemd's main pid), now N+1.
        assert doc["daemon"]["pid"] == pids[n.name]
        comp = doc["components"]["p2pupd"]
        assert comp["serial"] == 1 and comp["bad"] == {}
        assert sn.live_dir() == ".current.p2pupd-v1"
        # Tried before it went live, proved, then committed -- in that order.
        text = n.text()
        trial, commit = text.index("event=self-update-trial"), text.index("self-update-committed")
        assert text.index("event=self-update-exec") > trial and commit > trial
    # The first node had it from the stick; the others from peers, not from it alone.
    assert all(sn.node.events("manifest-accepted")[0]["from"] != "import" for sn in others)

    # -- N+2, whose daemon exits at start-up ----------------------------------------------
    cli("publish", pub.repo, "p2pupd", versions.n2, versions.tree2, "--platform", plat)
    stick2 = pub.base / "stick-n2"
    out = json.loads(cli("export", pub.repo, stick2, "--from-version", versions.n1, "--json"))
    assert out["bytes_written"] < 5_000_000  # deltas against N+1, not the 100 MB tree
    first.node.check("import", stick2, timeout=300)

    def marked_bad() -> bool:
        doc = first.status()
        return doc is not None and "2" in doc["components"]["p2pupd"]["bad"]

    wait_until(marked_bad, 240, "the first node to roll N+2 back", 1.0)
    assert first.runs(versions.n1)
    comp = (first.status() or {})["components"]["p2pupd"]
    assert comp["serial"] == 1 and comp["available"]["serial"] == 2
    assert "trial run" in comp["bad"]["2"], comp["bad"]
    assert first.live_dir() == ".current.p2pupd-v1"  # N+2 was never live
    assert not (first.prefix / ".current.p2pupd-v2").exists()
    text = first.node.text()
    assert "this build of the daemon is broken on purpose" in text
    assert "event=self-update-watchdog" in text

    # The others never hear of it: a node announces only the p2pupd it runs and proved.
    wait_until(lambda: len(first.node.connected()) == N_NODES - 1, 60, "the first node's peers")
    for _ in range(2):  # gossip rounds (every 2 s) with everyone connected
        time.sleep(2.5)
        for sn in others:
            doc = sn.status()
            assert doc is not None
            comp = doc["components"]["p2pupd"]
            assert (comp["serial"], comp["high_water"]) == (1, 1), comp
            assert doc["daemon"]["version"] == versions.n1
    for sn in others:
        assert sn.node.text().count("event=self-update-trial") == 1  # N+1's only

    # -- a new version that starts but fails its proof hands back by itself -------------
    # N+3 is N+1's tree again; the first node's health command for p2pupd fails, so
    # the trial run gives up, records why and execs the old version with the lock.
    first.node.check("config", "set", "components.p2pupd.health_cmd", "sh -c 'exit 3'")
    cli("publish", pub.repo, "p2pupd", versions.n3, versions.tree1, "--platform", plat)
    stick3 = pub.base / "stick-n3"
    cli("export", pub.repo, stick3, "--from-version", versions.n1)
    pid = (first.status() or {})["daemon"]["pid"]
    first.node.check("import", stick3, timeout=300)

    def refused() -> bool:
        doc = first.status()
        return doc is not None and "3" in doc["components"]["p2pupd"]["bad"]

    wait_until(refused, 240, "the first node to refuse N+3", 1.0)
    doc = first.status()
    assert doc is not None and first.runs(versions.n1)
    assert doc["daemon"]["pid"] == pid  # handed back in place: no watchdog needed
    assert doc["components"]["p2pupd"]["bad"]["3"].startswith("health command: ")
    assert first.live_dir() == ".current.p2pupd-v1"
    assert 'reason="handing back: health command:' in first.node.text()
