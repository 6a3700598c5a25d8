"""A mixed site: an old p2pupd and this one exchange releases on one LAN.

The old one is p2pupd as it was at ``OLD_COMMIT`` of this repository's history
(main when self-update work began: protocol version 1 with an exact-match
handshake, no state format marker, no bundle format marker), exported with
``git archive`` and installed into a venv of its own with no index, from the
offline artifact's wheels (_selfupdate.py). Two network namespaces, real mDNS:

* the old node imports a stick the new exporter wrote (marked bundle format
  1.0, which the old reader ignores) that also carries p2pupd's own release;
* the new daemon finds the old one, they connect (the new speaks the old's
  protocol version and only the features both offer), and the new node
  fetches 1.0 from the old one;
* 2.0 imported on the new node travels to the old one, which applies it;
* the new CLI reads the old node's unmarked state directory as it is, and a
  locked command migrates it to this version's format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from _cluster import P2PUPD, PORT, Publisher, random_files, wait_until
from _kit import cli, make_tree, tree_snapshot
from _netns import Host, Lan, netns_unavailable
from _selfupdate import has_commit, old_p2pupd

from p2pupd.daemon.ops import self_platform
from p2pupd.daemon.state import stateformat

pytestmark = [pytest.mark.netns, pytest.mark.slow]

# main when the self-update work began (the merge of the apply-faults branch).
OLD_COMMIT = "85bff3387b633e66089bc6d64614944e1c19c869"


@pytest.fixture(scope="module")
def old(dist_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not has_commit(OLD_COMMIT):
        pytest.skip(f"commit {OLD_COMMIT[:12]} is not in this clone (a shallow checkout?)")
    return old_p2pupd(OLD_COMMIT, tmp_path_factory.mktemp("old"), dist_artifact / "wheels")


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "P2PUPD_"))}


def run(host: Host, argv: list[str | Path], timeout: float = 120) -> str:
    r = host.run([str(a) for a in argv], timeout=timeout, env=env())
    assert r.returncode == 0, f"{argv}: {r.stderr}"
    return r.stdout


def status(host: Host, cmd: list[str | Path], state: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(run(host, [*cmd, "status", "--state-dir", state, "--json"]))
    return doc


def events(log: Path, name: str) -> list[dict[str, str]]:
    """``key=value`` fields of the ``event=name`` lines of a daemon log."""
    out = []
    for line in log.read_text().splitlines():
        if f" event={name} " in f"{line} ":
            out.append(dict(kv.split("=", 1) for kv in line.split() if "=" in kv))
    return out


def connected(host: Host, cmd: list[str | Path], state: Path) -> set[str]:
    doc = json.loads(run(host, [*cmd, "peers", "--state-dir", state, "--json"]))
    return {p["node_id"] for p in doc["connected"]}


def test_an_old_and_a_new_daemon_exchange_releases(old: Path, tmp_path: Path) -> None:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    old_cmd: list[str | Path] = [old]
    new_cmd: list[str | Path] = list(P2PUPD)
    pub = Publisher(tmp_path / "publisher")
    v1 = random_files(1, 600_000)
    src1 = pub.publish("1.0", v1)
    # A stick that also carries p2pupd's own release (variants per CPU and CPython).
    own = tmp_path / "own"
    (own / "bin").mkdir(parents=True)
    (own / "bin" / "p2pupd").write_text("#!/bin/sh\n")
    cli("publish", pub.repo, "p2pupd", "9.9", own, "--platform", self_platform())
    stick1 = pub.bundle("s1")
    assert (
        json.loads((stick1 / "index.json").read_text())["annotations"]["org.p2pupd.bundle.format"]
        == "1.0"
    )

    with Lan(2) as lan:
        h_old, h_new = lan.hosts
        st_old, st_new = tmp_path / "old" / "state", tmp_path / "new" / "state"
        t_old, t_new = tmp_path / "old" / "app", tmp_path / "new" / "app"
        run(h_old, [*old_cmd, "init", "--state-dir", st_old, "--trust", pub.root_file,
                    "--component", f"app={t_old}"])  # fmt: skip
        run(h_new, [*new_cmd, "init", "--state-dir", st_new, "--trust", pub.root_file,
                    "--component", f"app={t_new}"])  # fmt: skip
        assert not (st_old / "format").exists()  # the old code writes no marker

        # The old node imports the new exporter's stick (and skips p2pupd: not its component).
        out = run(h_old, [*old_cmd, "import", stick1, "--state-dir", st_old, "--apply"])
        assert "p2pupd" in out
        assert tree_snapshot(t_old) == tree_snapshot(src1)

        logs = {}
        for name, host, cmd, st in (
            ("old", h_old, old_cmd, st_old),
            ("new", h_new, new_cmd, st_new),
        ):
            logs[name] = tmp_path / f"{name}.log"
            host.spawn(
                [str(a) for a in cmd] + ["daemon", "--state-dir", str(st), "--listen",
                 f"{host.addr}:{PORT}", "--mdns-interface", host.addr],
                str(logs[name]), env=env(),
            )  # fmt: skip
        try:
            ids = {
                "old": status(h_old, old_cmd, st_old)["node_id"],
                "new": status(h_new, new_cmd, st_new)["node_id"],
            }

            def met() -> bool:
                return ids["old"] in connected(h_new, new_cmd, st_new) and ids["new"] in connected(
                    h_old, old_cmd, st_old
                )

            wait_until(met, 60, "the old and the new daemon to connect", 0.5)

            # Old -> new: the new node fetches 1.0 from the old one.
            def has(host: Host, cmd: list[str | Path], st: Path, serial: int) -> bool:
                return status(host, cmd, st)["components"]["app"]["serial"] == serial

            wait_until(lambda: has(h_new, new_cmd, st_new, 1), 90, "1.0 on the new node", 0.5)
            assert tree_snapshot(t_new) == tree_snapshot(src1)

            # New -> old: 2.0 (deltas against 1.0) imported on the new node. The
            # site has a node of p2pupd 0.1.0, so the publisher writes the patch
            # format it applies (with the newest, its apply fails: "patch is in
            # an unknown format").
            v2 = {**v1, "data/f0.bin": v1["data/f0.bin"][:-1000] + os.urandom(1000)}
            src2 = make_tree(pub.base / "src" / "app-2.0", v2)
            cli("publish", pub.repo, "app", "2.0", src2, "--patch-format", "1")
            stick2 = tmp_path / "s2"
            cli("export", pub.repo, stick2, "--from-version", "1.0", "--component", "app")
            run(h_new, [*new_cmd, "import", stick2, "--state-dir", st_new])
            wait_until(lambda: has(h_new, new_cmd, st_new, 2), 90, "2.0 on the new node", 0.5)
            wait_until(lambda: has(h_old, old_cmd, st_old, 2), 90, "2.0 on the old node", 0.5)
            assert tree_snapshot(t_old) == tree_snapshot(src2)
            got = [e for e in events(logs["old"], "release-complete") if e.get("serial") == "2"]
            assert got and int(got[0]["bytes"]) < 100_000  # a delta, not the 150 kB file
        except BaseException:
            for name, log in logs.items():
                text = log.read_text() if log.exists() else ""
                print(f"----- {name} -----\n" + "\n".join(text.splitlines()[-40:]))
            raise
        finally:
            for host in lan.hosts:
                for p in host.procs:
                    p.terminate()
                for p in host.procs:
                    p.wait(timeout=30)

        # The state directory the old code made: read as it is, then migrated by a
        # command that holds the lock. (p2pupd 0.1.0 predates the marker, so it cannot
        # refuse format 2, whose packed blobs it would not see; the marker tells every
        # later version: oldest reader 2.)
        assert status(h_new, new_cmd, st_old)["components"]["app"]["serial"] == 2
        assert not (st_old / "format").exists()
        run(h_new, [*new_cmd, "gc", "--state-dir", st_old])
        marker = stateformat.read_marker(st_old)
        assert (marker.format, marker.oldest_reader) == (2, 2)
        assert status(h_new, new_cmd, st_old)["components"]["app"]["serial"] == 2
