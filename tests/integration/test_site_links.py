"""Site members talk TLS 1.3 with credentials; everyone else gets nothing. Real daemons, loopback.

Each node is a real ``p2pupd daemon`` process with static peers (no mDNS),
enrolled through the real ``site`` commands. Shown: two members spread a
release over TLS; an outsider holding the root but no credential is refused
at the TLS handshake, receives nothing and is counted in ``peers``; a
revocation taken by a member (``site update``, routed to its daemon) cuts the
revoked node off at once and keeps it out; a node whose credential expired is
refused and, re-enrolled on site, rejoins and catches up.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from _daemonkit import random_tree
from _kit import Site
from test_daemon_processes import Daemon, cli, daemons, private_cluster, status

DAY = 86400


def enrol(site_dir: Path, state: Path, *, expires_days: float | None = None,
          now: int | None = None) -> None:  # fmt: skip
    """Enrol the node at ``state`` (request, enroll, join), optionally at a past clock."""
    env = {} if now is None else {"P2PUPD_NOW": str(now)}
    req, mem = state.parent / "enrol.msgpack", state.parent / "member.msgpack"
    extra = [] if expires_days is None else ["--expires-days", str(expires_days)]
    for args in (
        ["site", "request", "--state-dir", state, "--out", req],
        ["site", "enroll", req, "--site-dir", site_dir, "--out", mem, *extra],
        ["site", "join", mem, "--state-dir", state],
    ):
        r = _cli_env(env, *args)
        assert r.returncode == 0, r.stderr


def _cli_env(env: dict[str, str], *args: str | Path) -> object:
    if not env:
        return cli(*args)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return cli(*args)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def peers(state: Path) -> dict[str, object]:
    r = cli("peers", "--json", "--state-dir", state)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def connected(state: Path) -> list[str]:
    return [p["node_id"] for p in peers(state)["connected"]]  # type: ignore[index, union-attr]


def wait(pred: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_members_only(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.publish("1.0", random_tree(31, files=4, size=150_000))
    bundle = site.bundle("v1")
    site_dir = tmp_path / "sitedir"
    assert cli("site", "init", site_dir, "--name", "plant-7").returncode == 0
    nodes = {n: site.node(n) for n in ("a", "b", "out", "late")}
    for n in ("a", "b", "late"):
        state = nodes[n][0]
        r = cli("init", "--state-dir", state, "--trust", site.root_file, "--site",
                site_dir / "site.pub", "--component", f"app={nodes[n][1]}")  # fmt: skip
        assert r.returncode == 0, r.stderr
    enrol(site_dir, nodes["a"][0])
    enrol(site_dir, nodes["b"][0])
    # "late" was enrolled for one day, two days ago: its credential has expired.
    enrol(site_dir, nodes["late"][0], expires_days=1, now=int(time.time()) - 2 * DAY)
    private_cluster(*(s for s, _ in nodes.values()))
    ids = {n: str(status(s)["node_id"]) for n, (s, _) in nodes.items()}
    sa, sb, so, sl = (nodes[n][0] for n in ("a", "b", "out", "late"))

    with daemons() as running:
        a = Daemon(sa, "--no-mdns")
        running.append(a)
        assert "event=site-member site=plant-7" in a.text()
        peer = ("--peer", f"127.0.0.1:{a.port}")
        b = Daemon(sb, "--no-mdns", *peer)
        out = Daemon(so, "--no-mdns", *peer)
        late = Daemon(sl, "--no-mdns", *peer)
        running += [b, out, late]
        assert "event=no-site" in out.text()
        assert re.search(r"event=not-a-member .*expired", late.text())

        # Members: TLS, the release spreads.
        assert cli("import", bundle, "--state-dir", sa).returncode == 0
        b.wait_for(re.compile(r"event=applied component=app version=1\.0"))
        assert connected(sb) == [ids["a"]]
        assert peers(sa)["site"]["tls"] is True  # type: ignore[index]

        # The outsider (root, no credential) and the expired node get nothing.
        wait(lambda: peers(sa)["site"]["refused"] >= 2)  # type: ignore[index, operator]
        reasons = " ".join(r["reason"] for r in peers(sa)["site"]["recent"])  # type: ignore[index, union-attr]
        assert "handshake" in reasons
        assert ids["out"] not in connected(sa) and ids["late"] not in connected(sa)
        assert status(so)["components"]["app"]["serial"] is None  # type: ignore[index]
        assert "event=peer-connected" not in out.text()
        assert "event=peer-connected" not in late.text()

        # Revocation: a takes the list; b is cut off at once and stays out.
        data_rl = tmp_path / "rl.msgpack"
        r = cli("site", "revoke", ids["b"][:8], "--site-dir", site_dir, "--out", data_rl)
        assert r.returncode == 0, r.stderr
        assert cli("site", "update", data_rl, "--state-dir", sa).returncode == 0
        wait(lambda: ids["b"] not in connected(sa), timeout=5)
        time.sleep(1.5)  # b keeps redialling: it must stay out
        assert ids["b"] not in connected(sa)
        assert "revoked" in " ".join(r["reason"] for r in peers(sa)["site"]["recent"])  # type: ignore[index, union-attr]

        # The expired node is re-enrolled on site (same node key) and catches up.
        enrol(site_dir, sl)
        late.wait_for(re.compile(r"event=applied component=app version=1\.0"), timeout=60)
        assert ids["late"] in connected(sa)
    for d in (a, b, out, late):
        assert "Traceback" not in d.text()


def test_revocation_gossips_to_every_member(tmp_path: Path) -> None:
    """The operator hands the revocation list to one member; the site spreads it.

    a is a hub; b and c dial a; d (to be revoked) dials only b. The list goes
    to c alone, yet b -- two hops away -- cuts d off, and a replayed older
    list (the same one) moves nothing.
    """
    site = Site(tmp_path)
    site.publish("1.0", random_tree(41, files=2, size=60_000))
    site_dir = tmp_path / "sitedir"
    assert cli("site", "init", site_dir, "--name", "plant-9").returncode == 0
    nodes = {n: site.node(n) for n in ("a", "b", "c", "d")}
    for state, target in nodes.values():
        r = cli("init", "--state-dir", state, "--trust", site.root_file, "--site",
                site_dir / "site.pub", "--component", f"app={target}")  # fmt: skip
        assert r.returncode == 0, r.stderr
        enrol(site_dir, state)
    private_cluster(*(s for s, _ in nodes.values()))
    ids = {n: str(status(s)["node_id"]) for n, (s, _) in nodes.items()}
    with daemons() as running:
        a = Daemon(nodes["a"][0], "--no-mdns")
        running.append(a)
        b = Daemon(nodes["b"][0], "--no-mdns", "--peer", f"127.0.0.1:{a.port}")
        c = Daemon(nodes["c"][0], "--no-mdns", "--peer", f"127.0.0.1:{a.port}")
        running += [b, c]
        d = Daemon(nodes["d"][0], "--no-mdns", "--peer", f"127.0.0.1:{b.port}")
        running.append(d)
        wait(lambda: ids["d"] in connected(nodes["b"][0]) and len(connected(nodes["a"][0])) == 2)
        rl = tmp_path / "rl.msgpack"
        assert cli("site", "revoke", ids["d"][:8], "--site-dir", site_dir, "--out", rl).returncode == 0
        t0 = time.monotonic()
        assert cli("site", "update", rl, "--state-dir", nodes["c"][0]).returncode == 0
        wait(lambda: ids["d"] not in connected(nodes["b"][0]), timeout=10)
        took = time.monotonic() - t0
        for n in ("a", "b", "c"):
            sd = status(nodes[n][0])["site"]
            assert sd["revocations"] == {"sequence": 1, "revoked": 1}, (n, sd)  # type: ignore[index]
        assert "event=site-news" in b.text()
        r = cli("site", "update", rl, "--state-dir", nodes["a"][0], "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["changed"] is False
        time.sleep(1.5)  # d keeps redialling b: it must stay out
        assert ids["d"] not in connected(nodes["b"][0])
        assert ids["b"] in connected(nodes["a"][0]) and ids["c"] in connected(nodes["a"][0])
    print(f"revocation reached b (two hops) and cut d off in {took:.2f} s")
    for x in (a, b, c, d):
        assert "Traceback" not in x.text()
