"""`p2pupd demo` end to end (a smaller payload): three real daemons on this
machine, a delta-only stick into one, every node ends on v2 byte for byte,
and nothing is left behind."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile


def demo_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "p2pupd-demo-*")))


def daemon_pids() -> set[int]:
    r = subprocess.run(["pgrep", "-f", "p2pupd-demo-.*/state"], capture_output=True, text=True,
                       check=False)  # fmt: skip
    return {int(p) for p in r.stdout.split()}


def test_cluster_demo_converges_on_v2() -> None:
    before_dirs, before_pids = demo_dirs(), daemon_pids()
    r = subprocess.run(
        [sys.executable, "-m", "p2pupd.tools.cli", "demo", "--json", "--image-mib", "1"],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    nodes = {n["node"]: n for n in doc["nodes"]}
    assert set(nodes) == {"node1", "node2", "node3"}
    for n in nodes.values():
        assert n["version"] == "2.0" and n["serial"] == 2 and n["identical"], n
    # The stick carried deltas, not the release; the others fetched over the LAN.
    assert doc["stick_bytes"] < doc["release_bytes"] / 5
    for name in ("node2", "node3"):
        assert 0 < nodes[name]["bytes_received"] < doc["release_bytes"] / 5
        assert nodes[name]["from"]
    # The site view one node holds: every node's signed report, all on v2.
    site = doc["site"]
    assert sorted(r["node"] for r in site["nodes"]) == ["node1", "node2", "node3"]
    assert all(r["version"] == "2.0" and r["state"] == "committed" for r in site["nodes"])
    assert site["release"]["on_it"] == 3 and site["release"]["failed"] == 0
    assert demo_dirs() == before_dirs
    assert daemon_pids() <= before_pids


def test_offline_demo() -> None:
    r = subprocess.run([sys.executable, "-m", "p2pupd.tools.cli", "demo", "--offline"],
                       capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "rollback: appliance 1.0 live again" in r.stdout
