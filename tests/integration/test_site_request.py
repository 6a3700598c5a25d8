"""A whole site's request through the daemon: `export --request` with a daemon running
collects every connected peer's signed request; the publisher cuts one bundle that
serves each member from its own version; any member imports it, a stranger cannot."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from _daemonkit import Site, random_tree
from _store import stored_sizes
from test_daemon_processes import cli, daemons, linked_pair, private_cluster

from p2pupd.daemon.state.statedir import StateDir
from p2pupd.protocol.request import verify_any_request


def manual_apply(state: Path) -> None:
    """Keep the node on the version it has, so the site's members differ."""
    sd = StateDir(state)
    cfg = sd.read_config()
    comps = {n: dataclasses.replace(c, auto_apply=False) for n, c in cfg.components.items()}
    sd.write_config(dataclasses.replace(cfg, components=comps))


def installed(state: Path) -> int | None:
    r = cli("status", "--json", "--state-dir", state)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["components"]["app"]["serial"]  # type: ignore[no-any-return]


def blob_names(bundle: Path) -> set[str]:
    return {p.name for p in (bundle / "blobs" / "sha256").iterdir()}


def store_names(state: Path) -> set[str]:
    return set(stored_sizes(state))


def test_site_request_collects_peers_and_its_bundle_serves_every_member(tmp_path: Path) -> None:
    site = Site(tmp_path)
    v1 = random_tree(31, files=6, size=120_000)
    site.publish("1.0", v1)
    b1 = site.bundle("v1")
    v2 = {**v1, "f0.bin": v1["f0.bin"][:50_000] + b"two" + v1["f0.bin"][50_000:]}
    site.publish("2.0", v2)
    b2 = site.bundle("v2")
    v3 = {**v2, "f1.bin": v2["f1.bin"][:9_000] + b"three" + v2["f1.bin"][9_000:]}
    site.publish("3.0", v3)

    (sa, _), (sb, tb), (sc, _) = site.node("a"), site.node("b"), site.node("c")
    for state, bundle in ((sa, b1), (sb, b2), (sc, b1)):
        r = cli("import", bundle, "--apply", "--state-dir", state)
        assert r.returncode == 0, r.stderr
    manual_apply(sa)
    manual_apply(sb)
    private_cluster(sa, sb)
    stick = tmp_path / "stick"
    stick.mkdir()
    with daemons() as running:
        a, b = linked_pair(running, sa, sb)

        # On node a, with its daemon running: a request for the whole site.
        r = cli("export", "--request", stick, "--state-dir", sa, "--json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["unanswered"] == []
        a_id, b_id = (
            doc["node_id"],
            json.loads(cli("status", "--json", "--state-dir", sb).stdout)["node_id"],
        )
        assert [m["node_id"] for m in doc["site"]] == [a_id, b_id]
        assert {m["node_id"]: m["components"]["app"] for m in doc["site"]} == {a_id: 1, b_id: 2}
        req_file = Path(doc["request"])
        site_req = verify_any_request(req_file.read_bytes())
        assert [m.node_id.hex() for m in site_req.members] == [a_id, b_id]
        assert "event=site-request members=2" in a.text()

        # --this-node speaks for a alone, even with the daemon running.
        alone = tmp_path / "alone.msgpack"
        r = cli("export", "--request", alone, "--this-node", "--state-dir", sa)
        assert r.returncode == 0, r.stderr
        assert len(verify_any_request(alone.read_bytes()).members) == 1

        # The publisher: one bundle for both members.
        r = cli("export", site.repo, stick / "bundle", "--for", req_file, "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert [x["version"] for x in out["releases"]] == ["3.0"]
        assert out["for_node"] == a_id and "site request of 2 nodes" in out["notes"][0]
        carried = blob_names(stick / "bundle")
        both_had = store_names(sa) & store_names(sb)
        assert not carried & both_had, "the bundle carries a blob every member already had"

        # b, which did not collect the request, imports it and applies 3.0.
        r = cli("import", stick / "bundle", "--state-dir", sb, "--json")
        assert r.returncode == 0, r.stderr
        r = cli("apply", "app", "--state-dir", sb)
        assert r.returncode == 0, r.stderr
        assert installed(sb) == 3
        assert b.stop() == 0 and a.stop() == 0
    for d in (a, b):
        assert "Traceback" not in d.text()
    for name, data in v3.items():
        assert (tb / name).read_bytes() == data

    # c is not a member: the bundle may lack what c needs, so it is refused.
    before = store_names(sc)
    r = cli("import", stick / "bundle", "--state-dir", sc)
    assert r.returncode == 3, r.stderr
    assert "not one of them" in r.stderr and r.stderr.count("\n") == 1
    assert store_names(sc) == before and installed(sc) == 1
